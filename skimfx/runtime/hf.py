"""The compiled model users hold: HF-shaped ``__call__`` and a ``generate`` that takes prompts.

It keeps a reference to the user's model (its weights are the graph's weights; fusion makes the q/k/v and
gate/up parameters views of one merged buffer, values unchanged) and checks before each call that the
model still holds the tensors it was compiled with (``model_guard``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..program import Program
from .cache import KVCache
from .engine import DECODE_MODES, Generation, extend, generate, pad_right
from .model_guard import ModelSnapshot
from .policies import POLICIES
from .sampling import SamplingConfig


@dataclass
class CausalLMOutput:
    """What HF's forward returns, for the fields skimfx computes."""

    logits: torch.Tensor

    def __getitem__(self, i):
        return (self.logits,)[i]


class CompiledModel:
    """``skimfx.compile(model)`` returns this.

    - ``cm(input_ids, attention_mask=None)`` -> ``.logits [B, T, V]``, like the HF model.
    - ``cm.generate(prompts, max_new_tokens=…)`` -> ``Generation`` (new tokens, finish reasons, stats).
    """

    def __init__(self, model: torch.nn.Module, program: Program, tokenizer=None,
                 max_cache_len: int | None = None, decode: str = "auto"):
        self.model = model
        self.program = program
        self.tokenizer = tokenizer
        self.max_cache_len = max_cache_len or program.info.max_positions
        self.decode = self._decode_mode(decode)
        self.snapshot = ModelSnapshot(model, program)

    def check_model(self) -> None:
        """Raise ``ModelChangedError`` if the user's model no longer holds the tensors (dtype, device,
        storage) it was compiled with; run before every call."""
        self.snapshot.check(self.model)

    def _decode_mode(self, decode: str) -> str:
        """"auto": the captured step replayed as a CUDA graph on a GPU when every KV policy has a captured
        step and no decoding mode (early exit, self-speculation) is set; the eager runtime otherwise (on a
        CPU compiling the step takes minutes, which only long generations repay: ask for "compiled")."""
        if decode != "auto":
            if decode not in DECODE_MODES:
                raise ValueError(f"decode must be 'auto' or one of {DECODE_MODES}, got {decode!r}")
            return decode
        static = self.program.decoding is None and all(POLICIES[p.method].supports_static_params(p)
                                                       for p in self.program.policies.values())
        return "graph" if static and self.program.info.device.type == "cuda" else "eager"

    @property
    def info(self):
        return self.program.info

    @property
    def device(self) -> torch.device:
        return self.program.info.device

    # ---- input checks -------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.device != self.device:
            raise ValueError(
                f"input_ids are on {ids.device} but the model is on {self.device}; "
                f"move them with input_ids.to('{self.device}')")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.info.vocab_size}); got {int(ids.min())}..{int(ids.max())}")

    def _prompts(self, inputs, attention_mask=None) -> list[list[int]]:
        """Normalise a tensor [B, T] (+ mask), a token list, a list of token lists, or text."""
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: skimfx.compile(model, tokenizer=tok)")
            texts = [inputs] if isinstance(inputs, str) else list(inputs)
            prompts = [self.tokenizer(t).input_ids for t in texts]
        elif isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.dim() == 2 else inputs[None]
            if ids.dim() != 2:
                raise ValueError(f"input_ids must be [B, T] or [T], got shape {tuple(inputs.shape)}")
            self._check_ids(ids)
            if attention_mask is None:
                prompts = ids.tolist()
            else:
                prompts = _unpad(ids, attention_mask)
        elif isinstance(inputs, (list, tuple)):
            prompts = [list(inputs)] if not inputs or isinstance(inputs[0], int) else [list(p) for p in inputs]
        else:
            raise TypeError(f"prompts must be a tensor, a list of token ids, or text; got {type(inputs).__name__}")
        if not prompts:
            raise ValueError("no prompts given")
        for b, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {b} is empty: give at least one token (e.g. the BOS token)")
            if min(p) < 0 or max(p) >= self.info.vocab_size:
                raise ValueError(f"prompt {b}: token ids must be in [0, {self.info.vocab_size})")
            if len(p) > self.max_cache_len:
                raise ValueError(
                    f"prompt {b} has {len(p)} tokens but the cache holds at most {self.max_cache_len} "
                    "(the model's context); shorten the prompt or compile with a larger max_cache_len")
        return prompts

    # ---- HF-style forward ---------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> CausalLMOutput:
        """Logits for every position, [B, T, V] (padding positions, if any, get zeros)."""
        self.check_model()
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        prompts = self._prompts(ids, attention_mask)
        lens = [len(p) for p in prompts]
        cache = KVCache.for_program(self.program, len(prompts), max(lens))
        with torch.inference_mode():
            logits = extend(self.program, cache, pad_right(prompts, self.device), lens, all_logits=True)
        if attention_mask is None:
            return CausalLMOutput(logits=logits)
        full = logits.new_zeros(ids.shape[0], ids.shape[1], logits.shape[-1])
        for b, row in enumerate(attention_mask.bool()):
            full[b, row.nonzero().squeeze(-1)] = logits[b, :lens[b]]
        return CausalLMOutput(logits=full)

    forward = __call__

    # ---- generation ---------------------------------------------------------------------------
    def stop_tokens(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(src, "eos_token_id", None)
            if eos is not None:
                ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    def generate(self, prompts=None, max_new_tokens: int = 32, *, input_ids=None, attention_mask=None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, do_sample: bool | None = None,
                 stop_tokens: Sequence[int] | None = None, eos_token_id=None,
                 callback: Callable[[int, int], None] | None = None, decode: str | None = None,
                 backend: str = "inductor") -> Generation:
        """Generate for one prompt or a batch (token lists of any lengths, a [B, T] tensor with an
        optional attention mask, or text when a tokenizer was given).

        Greedy by default; ``temperature > 0`` (or ``do_sample=True``) samples with ``top_k`` /
        ``top_p``, seeded by ``seed``. Stops at the model's EOS tokens unless ``stop_tokens`` is
        given (``[]`` for none). ``callback(batch_index, token_id)`` streams tokens. ``decode`` overrides
        the compiled model's decode mode ("eager", "compiled", "graph"; ``backend`` for torch.compile).
        """
        self.check_model()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        inputs = input_ids if input_ids is not None else prompts
        if inputs is None:
            raise ValueError("generate needs prompts (token ids, a tensor, or text)")
        batch = self._prompts(inputs, attention_mask)
        if do_sample and temperature == 0.0:
            temperature = 1.0
        if do_sample is False:
            temperature = 0.0
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if stop_tokens is None:
            stop_tokens = ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id) \
                if eos_token_id is not None else self.stop_tokens()
        return generate(self.program, batch, max_new_tokens, sampling, set(stop_tokens),
                        max_cache_len=self.max_cache_len, callback=callback,
                        decode=self._decode_mode(decode) if decode is not None else self.decode, backend=backend)

    def compile_stages(self, **torch_compile_kwargs) -> "CompiledModel":
        """``torch.compile`` every stage in place and return self. Keyword arguments go to
        ``torch.compile`` (default ``dynamic=True``, so new prompt lengths do not recompile). The
        runtime calls inside a stage (cached attention, token selection) are excluded from tracing,
        so each layer compiles to the graph before its attention and the graph after it."""
        torch_compile_kwargs.setdefault("dynamic", True)
        for stage in self.program.stages:
            stage.module = torch.compile(stage.module, **torch_compile_kwargs)
        return self

    @property
    def hf(self) -> "HFCausalLM":
        """This model behind the exact interface of a HF ``PreTrainedModel`` for causal LM (what
        lm-eval's ``HFLM(pretrained=...)`` and other HF harnesses call): ``generate`` returns the token
        tensor ``[B, T + new]`` and honours ``max_length`` and ``stopping_criteria``."""
        return HFCausalLM(self)

    def __repr__(self) -> str:
        return f"CompiledModel(\n{self.program}\n)"


class HFCausalLM:
    """HF ``PreTrainedModel`` contract over a ``CompiledModel``: ``config``, ``device``, ``dtype``,
    ``eval()``, ``tie_weights()``, ``__call__(input_ids, attention_mask) -> .logits`` and
    ``generate(input_ids, attention_mask, max_length | max_new_tokens, stopping_criteria,
    pad_token_id, eos_token_id, do_sample, temperature, top_k, top_p, use_cache)`` -> LongTensor of
    prompt + new tokens per row, right-padded with ``pad_token_id`` (left-padded inputs keep their
    padding, as HF returns them)."""

    def __init__(self, compiled: CompiledModel):
        self.compiled = compiled
        self.config = compiled.model.config
        self.generation_config = getattr(compiled.model, "generation_config", None)

    @property
    def device(self) -> torch.device:
        return self.compiled.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compiled.info.dtype

    def eval(self) -> "HFCausalLM":
        return self

    def tie_weights(self) -> None:
        """Nothing to do: the compiled graph reads the model's own (already tied) weights."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw) -> CausalLMOutput:
        return self.compiled(input_ids, attention_mask=attention_mask)

    forward = __call__

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_length: int | None = None, max_new_tokens: int | None = None, stopping_criteria=None,
                 pad_token_id: int | None = None, eos_token_id=None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 use_cache: bool = True, **unused) -> torch.Tensor:
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if max_new_tokens is None:
            if max_length is None:
                raise ValueError("generate needs max_new_tokens or max_length")
            max_new_tokens = max_length - ids.shape[1]
        if max_new_tokens < 1:
            raise ValueError(f"max_length={max_length} leaves no room after a {ids.shape[1]}-token input")
        B = ids.shape[0]
        out = [[] for _ in range(B)]
        stopped = [False] * B
        pad = pad_token_id if pad_token_id is not None else 0

        def current() -> torch.Tensor:
            n = max(len(o) for o in out)
            new = torch.full((B, n), pad, dtype=ids.dtype, device=ids.device)
            for b, o in enumerate(out):
                new[b, :len(o)] = torch.tensor(o, dtype=ids.dtype)
            return torch.cat([ids, new], dim=1)

        class _Stop(Exception):
            """Every row met a stopping criterion: leave the runtime's decode loop early."""

        last_b = [B]

        def check() -> None:
            if stopping_criteria is None:
                return
            done = _criteria(stopping_criteria, current())
            for i in range(B):
                stopped[i] = stopped[i] or done[i]

        def on_token(b: int, t: int) -> None:
            # the runtime reports a step's tokens in batch order: a smaller index starts the next step,
            # so the criteria see each completed step once, as in HF's generate loop
            if b <= last_b[0]:
                check()
                if all(stopped):
                    raise _Stop
            last_b[0] = b
            if not stopped[b]:
                out[b].append(t)

        try:
            self.compiled.generate(ids, max_new_tokens, attention_mask=attention_mask, do_sample=do_sample,
                                   temperature=temperature or 0.0, top_k=top_k, top_p=top_p,
                                   eos_token_id=eos_token_id, callback=on_token)
        except _Stop:
            pass
        check()
        return current()


def _criteria(stopping_criteria, seqs: torch.Tensor) -> list[bool]:
    done = [False] * seqs.shape[0]
    for c in stopping_criteria:
        r = c(seqs, None)
        r = r.tolist() if isinstance(r, torch.Tensor) and r.dim() else [bool(r)] * seqs.shape[0]
        done = [a or bool(x) for a, x in zip(done, r)]
    return done


def _unpad(ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    if attention_mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(ids.shape)}")
    out = []
    for row, m in zip(ids.tolist(), attention_mask.bool().tolist()):
        kept = [t for t, keep in zip(row, m) if keep]
        first = m.index(True) if True in m else 0
        if kept and not all(m[first:first + len(kept)]):
            raise ValueError("attention_mask must mark one contiguous run of tokens per row (left or right padding)")
        out.append(kept)
    return out
