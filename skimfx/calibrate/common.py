"""What the calibrations share: the dense compiled model they measure, tokenizing documents up to a
budget, running teacher-forced pieces through the stage executor, and loading their files safely."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..runtime.cache import KVCache
from ..runtime.context import Ctx
from ..runtime.executor import Executor


class CalibrationFileError(ValueError):
    """A calibration file that cannot be loaded: missing, unreadable, not the kind of calibration
    asked for, or holding objects that are not plain data (refused: unpickling them could run code)."""


def _compiled(model, tokenizer, caller: str, need_tokenizer: bool = True):
    """(CompiledModel, tokenizer): ``model`` compiled dense unless it already is compiled; the tokenizer
    must be known when ``need_tokenizer`` (the caller has text to tokenize)."""
    from ..runtime.hf import CompiledModel

    cm = model if isinstance(model, CompiledModel) else _compile_dense(model, tokenizer)
    tok = tokenizer or cm.tokenizer
    if tok is None and need_tokenizer:
        raise ValueError(f"{caller} tokenizes the texts: pass tokenizer=tok")
    return cm, tok


def _compile_dense(model, tokenizer):
    """``skimfx.compile(model, tokenizer=tokenizer)`` with no recipe (built here: the calibrate package
    does not import the top level)."""
    from ..capture import capture
    from ..passes import PassManager, default_passes, final_passes
    from ..runtime.hf import CompiledModel

    program = PassManager(default_passes(True) + final_passes())(capture(model))
    return CompiledModel(model, program, tokenizer=tokenizer)


def _tokenize_upto(tok, texts: list[str], n: int) -> list[list[int]]:
    """Token ids of the documents in order until ``n`` tokens (the last one cut)."""
    out, total = [], 0
    for t in texts:
        if total >= n:
            break
        ids = tok(t[:8 * (n - total)], add_special_tokens=False).input_ids[:n - total]
        out.append(ids)
        total += len(ids)
    return out


def _start(ex: Executor, ids: list[int], start: int = 0) -> tuple[Ctx, dict]:
    """A fresh one-sequence cache for ``ids`` and the prologue run on them at positions ``start``..:
    (ctx, env) for ``ex.run_layers``."""
    program = ex.program
    T = len(ids)
    ctx = Ctx(KVCache.for_program(program, 1, T), [T], program)
    dev = program.info.device
    env = ex.embed(ctx, torch.tensor([ids], device=dev), torch.arange(start, start + T, device=dev)[None])
    return ctx, env


def _logit_agreement(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Two [..., V] logit tensors of the same contexts: {"top1": share of equal argmaxes, "kl": mean
    KL(ref || got) in nats} (as ``skimfx.eval.logit_agreement``, which this package does not import)."""
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return {"top1": top1, "kl": kl}


# -- files --------------------------------------------------------------------------------------------
# A calibration is one dict of plain data (dicts, lists, tuples, str, int, float, bool, None, tensors),
# written as a safetensors file: the tensors as its entries, the rest as JSON in its metadata, each tensor
# replaced by {"__tensor__": name}. Reading it parses JSON and raw tensor bytes, so a file can never run
# code (a pickle, which torch.save writes, can name any callable to call while it is read).
FORMAT = "skimfx-calibration/1"
_META_KEY = "skimfx"


def _encode(x, tensors: dict):
    """``x`` as JSON-ready data, its tensors moved into ``tensors``; raises TypeError on anything else."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = x.detach().cpu().contiguous().clone()    # safetensors refuses shared storage
        return {"__tensor__": name}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_encode(v, tensors) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: _encode(v, tensors) for k, v in x.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in x.items()]}
    raise TypeError(f"a calibration file holds plain data only; got a {type(x).__name__}")


def _decode(x, tensors):
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if isinstance(x, dict):
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__tuple__" in x:
            return tuple(_decode(v, tensors) for v in x["__tuple__"])
        if "__items__" in x:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in x["__items__"]}
        return {k: _decode(v, tensors) for k, v in x.items()}
    return x


def _hashable(k):
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


def _save(data: dict, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps({"format": FORMAT, "data": _encode(data, tensors)})
    save_file(tensors, str(path), metadata={_META_KEY: meta})


def _is_pickle(head: bytes) -> bool:
    """torch.save's zip archive, or a raw pickle stream (protocol 2+ starts with 0x80)."""
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _load(path: str | Path, kind: str, made_by: str, fields) -> dict:
    """The dict saved by ``kind.save`` at ``path``, read without running code from the file; the errors
    name the file and what to do."""
    from safetensors import SafetensorError, safe_open

    redo = f"make one with skimfx.{made_by}(...) and save it with .save(path)"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise CalibrationFileError(f"no {kind} file at {str(path)!r}: check the path, or {redo}") from None
    except OSError as e:
        raise CalibrationFileError(f"cannot read {kind} from {str(path)!r} ({e})") from None
    if _is_pickle(head):
        raise CalibrationFileError(
            f"refused to load {kind} from {str(path)!r}: it is a pickle (torch.save) file, the format of older "
            f"skimfx versions, and unpickling could run code from the file. Calibrations are now safetensors "
            f"files: {redo}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta is None:
            raise ValueError("it holds no skimfx calibration metadata")
        doc = json.loads(meta)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}")
        data = _decode(doc["data"], tensors)
    except (SafetensorError, ValueError, KeyError, OSError) as e:
        raise CalibrationFileError(f"cannot read {kind} from {str(path)!r} ({type(e).__name__}: {e}); it is not a "
                                   f"file saved by {kind}.save: {redo}") from None
    missing = [f for f in fields if not isinstance(data, dict) or f not in data]
    if missing:
        has = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CalibrationFileError(f"{str(path)!r} is not a file saved by {kind}.save (it lacks {missing}; it "
                                   f"holds {has}): {redo}")
    return data


class FieldsFile:
    """``save`` / ``load`` for a calibration dataclass whose fields are plain data: the fields as one dict;
    ``load`` checks that the ``REQUIRED`` ones are there (the others keep their defaults) and refuses any
    other file (safetensors + JSON, no pickle). ``MADE_BY``: the function that makes one."""

    REQUIRED: tuple[str, ...] = ()
    MADE_BY = ""

    def save(self, path: str | Path) -> None:
        """The fields as one dict of plain data; ``load`` reads it back without unpickling anything else."""
        _save({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: str | Path):
        """The calibration saved at ``path`` by ``save`` (a safetensors file: tensors + JSON, nothing executable):
        one not written by ``save`` (e.g. a pickle) is refused (``CalibrationFileError``)."""
        d = _load(path, cls.__name__, cls.MADE_BY, cls.REQUIRED)
        try:
            return cls(**d)
        except TypeError as e:
            raise CalibrationFileError(f"{str(path)!r} is not a valid {cls.__name__} file ({e}): make one with "
                                       f"skimfx.{cls.MADE_BY}(...) and save it with .save(path)") from None
