"""The vLLM plugin: Quest-style sparse decode inside vLLM's own attention backend.

Installed with ``pip install "skimfx[vllm]"``; vLLM loads it from the ``vllm.general_plugins`` entry point
``skimfx`` in every process (``VLLM_PLUGINS=skimfx`` selects it alone). ``register`` overrides the path of
vLLM's CPU attention backend (``register_backend(AttentionBackendEnum.CPU_ATTN, ...)``) with
``SparseDecodeCPUBackend``, a subclass that keeps vLLM's metadata builder and kernel and changes two things:

- at every KV write (``do_kv_cache_update``) it refreshes the key min/max of the blocks written
  (``block_selection.update_block_bounds``);
- at each attention call, decode rows (one query token) holding more than the budget read only the blocks
  Quest ranks highest (plus the sink and newest blocks): the row of the block table lists just those and
  the sequence length shrinks to match, and vLLM's unmodified kernel runs on that (with its scheduler
  metadata rebuilt for the new lengths). Prefill rows pass through.

The recipe comes from ``SKIMFX_VLLM_RECIPE`` (e.g. ``quest:token_budget=2048``; unset or empty: the
plugin registers nothing and vLLM runs as shipped). ``SKIMFX_VLLM_SINK_BLOCKS`` (default 1) and
``SKIMFX_VLLM_MIN_CONTEXT`` (default 0) tune it; ``SKIMFX_VLLM_STATS=path`` writes the counters of the
process as JSON after every decode step (the engine's worker is another process under ``vllm serve``).
In-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) read them with ``counters()``.

Layers with a sliding window, ALiBi, shared KV, an fp8 cache or a non-decoder attention type pass
through: compacting blocks would move keys out of the window or change ALiBi's distances.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from .block_selection import (STATS_ENV, DecodeCounters, SparseDecodeSettings, block_scores, compact_rows,
                              select_blocks, update_block_bounds)

_COUNTERS = DecodeCounters()
_SETTINGS: SparseDecodeSettings | None = None
_SETTINGS_READ = False


def counters() -> DecodeCounters:
    """This process's decode counters (summed over layers and requests since start or ``reset``)."""
    return _COUNTERS


def settings() -> SparseDecodeSettings | None:
    """The settings from the environment, read once per process (None: pass-through)."""
    global _SETTINGS, _SETTINGS_READ
    if not _SETTINGS_READ:
        _SETTINGS = SparseDecodeSettings.from_env()
        _SETTINGS_READ = True
    return _SETTINGS


def register() -> None:
    """The ``vllm.general_plugins`` entry point: route vLLM's CPU attention backend through the sparse-decode
    subclass when ``SKIMFX_VLLM_RECIPE`` names a recipe. Safe to call more than once (vLLM calls it in
    every process)."""
    if settings() is None:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.SparseDecodeCPUBackend")


def _write_stats() -> None:
    path = os.environ.get(STATS_ENV)
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_COUNTERS.as_dict(), f)
        os.replace(tmp, path)


def _count_dense_decode(md) -> None:
    """Decode rows of a layer the plugin leaves dense (below ``dense_layers``, or a pass-through layer)."""
    q_len = (md.query_start_loc[1:] - md.query_start_loc[:-1]).tolist()
    held = sum(n for n, q in zip(md.seq_lens.tolist(), q_len) if q == 1)
    if held:
        _COUNTERS.decode_calls += 1
        _COUNTERS.decode_rows += sum(q == 1 for q in q_len)
        _COUNTERS.keys_total += held
        _COUNTERS.keys_read += held


def _backend_classes():
    """The subclasses of vLLM's CPU backend (defined on first use, so importing this module needs no vLLM)."""
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                     CPUAttentionMetadataBuilder)

    class SparseDecodeCPUMetadataBuilder(CPUAttentionMetadataBuilder):
        """vLLM's builder; the metadata also carries what rebuilding the kernel's scheduler metadata needs."""

        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            md = super().build(common_prefix_len, common_attn_metadata, fast_build)
            md.skimfx_scheduler_args = dict(
                num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, dtype=self.dtype,
                sliding_window_size=self.window_size, isa=self.isa, kv_cache_dtype=self.kv_cache_dtype)
            return md

    class SparseDecodeCPUImpl(CPUAttentionBackendImpl):
        """vLLM's CPU attention with Quest block bounds kept at each write and a compacted read at decode."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kmin: torch.Tensor | None = None         # [num_blocks, Hkv, D] fp32, by physical block
            self.kmax: torch.Tensor | None = None
            self.layer_index: int | None = None
            self.num_layers = get_current_vllm_config().model_config.hf_text_config.num_hidden_layers

        def _handles(self, layer) -> bool:
            s = settings()
            if s is None or self.attn_type != AttentionType.DECODER or self.sliding_window != -1 \
                    or self.alibi_slopes is not None or self.is_fp8_kv_cache \
                    or self.kv_sharing_target_layer_name is not None:
                return False
            if self.layer_index is None:
                self.layer_index = extract_layer_index(layer.layer_name)
            return s.sparse_layer(self.layer_index)

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            if not self._handles(layer):
                return
            num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
            if self.kmin is None:
                settings().check_block_size(block_size)                           # a clear error, once
            if self.kmin is None or self.kmin.shape[0] != num_blocks:
                self.kmin = torch.zeros(num_blocks, num_kv_heads, self.head_size, dtype=torch.float32)
                self.kmax = torch.zeros_like(self.kmin)
            update_block_bounds(self.kmin, self.kmax, key, slot_mapping, block_size)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                    output_block_scale=None):
            if attn_metadata is None or not self._handles(layer) or self.kmin is None:
                if attn_metadata is not None and settings() is not None and self.attn_type == AttentionType.DECODER:
                    _count_dense_decode(attn_metadata)                            # a layer that reads everything
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                       output_block_scale)
            md = self._sparse_metadata(layer, query, attn_metadata, kv_cache.shape[2])
            if self.layer_index == self.num_layers - 1:                           # once per step
                _write_stats()
            return super().forward(layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale)

        def _sparse_metadata(self, layer, query, md, block_size: int):
            """The metadata with each long decode row reading its selected blocks only."""
            s = settings()
            qsl = md.query_start_loc
            n_req = qsl.numel() - 1
            q_len = (qsl[1:] - qsl[:-1]).tolist()
            seq_lens = md.seq_lens.tolist()
            decode = [r for r in range(n_req) if q_len[r] == 1]
            if not decode:
                return md
            c = _COUNTERS
            c.decode_calls += 1
            c.decode_rows += len(decode)
            c.keys_total += sum(seq_lens[r] for r in decode)
            rows = [r for r in decode if seq_lens[r] > s.min_context]
            c.keys_read += sum(seq_lens[r] for r in decode if r not in rows)
            if not rows:
                return md
            n_read = [s.blocks_to_read(seq_lens[r], block_size) for r in rows]
            sel_lens = md.seq_lens[rows]
            q = query[qsl[rows].long()]                                            # [R, Hq, D]
            scores = block_scores(q, self.kmin, self.kmax, md.block_table[rows], sel_lens, block_size)
            chosen = select_blocks(scores, sel_lens, n_read, block_size, s.sink_blocks)
            table, lens = compact_rows(md.block_table, md.seq_lens, rows, chosen, block_size)
            c.selected_rows += len(rows)
            c.blocks_total += sum(-(-seq_lens[r] // block_size) for r in rows)
            c.blocks_read += sum(n_read)
            c.keys_read += int(lens[rows].sum())
            c.last_selection[layer.layer_name] = [sel.tolist() for sel in chosen]
            args = md.skimfx_scheduler_args
            sched = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=n_req, seq_lens=lens, query_start_loc=qsl, causal=md.causal,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=md.dynamic_causal, **args)
            return dataclasses.replace(md, block_table=table, seq_lens=lens, scheduler_metadata=sched,
                                       max_seq_len=int(lens.max()))

    class SparseDecodeCPUBackend(CPUAttentionBackend):
        """vLLM's CPU attention backend (same name, kernel and cache layout) with Quest sparse decode."""

        @staticmethod
        def get_impl_cls():
            return SparseDecodeCPUImpl

        @staticmethod
        def get_builder_cls():
            return SparseDecodeCPUMetadataBuilder

    return SparseDecodeCPUBackend, SparseDecodeCPUImpl, SparseDecodeCPUMetadataBuilder


def __getattr__(name):
    # vLLM resolves the backend by its qualified name; the classes subclass vLLM's, so they are made on demand
    if name in ("SparseDecodeCPUBackend", "SparseDecodeCPUImpl", "SparseDecodeCPUMetadataBuilder"):
        backend, impl, builder = _backend_classes()
        globals().update(SparseDecodeCPUBackend=backend, SparseDecodeCPUImpl=impl,
                         SparseDecodeCPUMetadataBuilder=builder)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["register", "counters", "settings"]
