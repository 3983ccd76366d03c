"""The KV cache: per layer, GQA k/v stored un-repeated, per-sequence lengths.

Layout per layer: k, v ``[B, Hkv, capacity, D]``, preallocated (a decode step writes in place
instead of concatenating). ``lengths[layer][b]`` is how many slots sequence b has filled in that
layer. Layers may differ in capacity and length (token pruning keeps fewer tokens in later layers);
``positions[b]`` is the next RoPE position of sequence b, which is not a slot count once layers
hold fewer tokens than the sequence has seen.
"""
from __future__ import annotations

import torch

from ..kernels import gather_kv
from .policies import KVPolicy, make_policies


class CacheFullError(ValueError):
    """A write would go past a layer's capacity."""


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 capacity: int | list[int], dtype: torch.dtype, device: torch.device | str,
                 policies: dict | None = None):
        caps = [capacity] * num_layers if isinstance(capacity, int) else list(capacity)
        if len(caps) != num_layers:
            raise ValueError(f"capacity needs one entry per layer ({num_layers}), got {len(caps)}")
        self.batch, self.num_kv_heads, self.head_dim = batch, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k = [torch.zeros(batch, num_kv_heads, c, head_dim, dtype=dtype, device=device) for c in caps]
        self.v = [torch.zeros_like(k) for k in self.k]
        # host copies of the lengths: shapes and loop bounds are decided on the host without a sync
        self._lengths = [[0] * batch for _ in caps]
        self._lengths_dev: list[torch.Tensor | None] = [None] * num_layers
        self.positions = [0] * batch
        # each layer's KV policy (``runtime/policies``), made from the Program's parameters; it owns its
        # state (slot ages, scores, page bounds, offloaded KV). Layers without one are dense.
        self._policy_params = dict(policies or {})
        self.policies: dict[int, KVPolicy] = make_policies(self._policy_params)
        # between begin_speculation and end_speculation the tokens written are drafts: a multi-token write
        # is verified token by token by the policies, and truncate may roll the drafts back
        self.speculating = False

    @classmethod
    def for_program(cls, program, batch: int, capacity: int | list[int]) -> "KVCache":
        i = program.info
        return cls(i.num_layers, batch, i.num_kv_heads, i.head_dim, capacity, i.dtype, i.device, program.policies)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def capacity(self, layer: int) -> int:
        return self.k[layer].shape[2]

    def lengths(self, layer: int) -> list[int]:
        return self._lengths[layer]

    def lengths_tensor(self, layer: int) -> torch.Tensor:
        t = self._lengths_dev[layer]
        if t is None:
            t = torch.tensor(self._lengths[layer], dtype=torch.long, device=self.device)
            self._lengths_dev[layer] = t
        return t

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write k/v of T new tokens ([B, Hkv, T, D]) at each sequence's current length."""
        T = k_new.shape[2]
        starts = self._lengths[layer]
        cap = self.capacity(layer)
        if max(starts) + T > cap:
            raise CacheFullError(
                f"layer {layer}: writing {T} tokens after {max(starts)} cached ones exceeds the cache "
                f"capacity of {cap} tokens; use a shorter prompt, fewer new tokens, or a larger max_cache_len")
        k, v = self.k[layer], self.v[layer]
        if min(starts) == max(starts):
            s = starts[0]
            k[:, :, s:s + T] = k_new
            v[:, :, s:s + T] = v_new
        else:
            idx = (self.lengths_tensor(layer)[:, None] + torch.arange(T, device=self.device))
            idx = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k.scatter_(2, idx, k_new.to(k.dtype))
            v.scatter_(2, idx, v_new.to(v.dtype))

    def advance(self, layer: int, counts: list[int]) -> None:
        """Mark ``counts[b]`` more slots of sequence b as filled in ``layer``."""
        self._set_lengths(layer, [a + c for a, c in zip(self._lengths[layer], counts)])

    def _set_lengths(self, layer: int, lengths: list[int]) -> None:
        self._lengths[layer] = list(lengths)
        self._lengths_dev[layer] = None               # the device copy is rebuilt on next use

    def compact(self, layer: int, index: torch.Tensor, kept: list[int], headroom: int | None = None) -> None:
        """Keep only the slots ``index`` of each sequence, in that order: ``[B, K]`` (the same slots
        for every KV head) or ``[B, Hkv, K]`` (per KV head, as SnapKV and H2O choose). K = max kept;
        shorter rows pad with any valid slot. The layer's buffers shrink to K plus ``headroom`` new
        slots (default: the same headroom as before): the memory is released, not just masked."""
        K = index.shape[-1]
        filled = max(self._lengths[layer])
        if headroom is None:
            headroom = self.capacity(layer) - filled
        for buf in (self.k, self.v):
            kept_kv = gather_kv(buf[layer][:, :, :filled], index)
            new = torch.zeros(self.batch, self.num_kv_heads, K + headroom, self.head_dim, dtype=self.dtype,
                              device=self.device)
            new[:, :, :K] = kept_kv
            buf[layer] = new
        self._set_lengths(layer, kept)

    def write_slots(self, layer: int, slots: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write one new token per sequence (k/v [B, Hkv, 1, D]) into the given slot of each KV head
        (``slots [B, Hkv]``): a slot below the length overwrites an evicted token. Lengths are not
        changed (the caller advances the sequences that appended)."""
        if int(slots.max()) >= self.capacity(layer):
            raise CacheFullError(f"layer {layer}: slot {int(slots.max())} is past the capacity {self.capacity(layer)}")
        idx = slots[:, :, None, None].expand(-1, -1, 1, self.head_dim)
        self.k[layer].scatter_(2, idx, k_new.to(self.dtype))
        self.v[layer].scatter_(2, idx, v_new.to(self.dtype))

    def begin_speculation(self) -> None:
        """Draft tokens follow: until ``end_speculation`` a write of several tokens is a verification (each
        token reads what a one-token decode step would read, ``KVPolicy.verify``), and ``truncate`` may
        roll drafts back (the policies keep what that needs). Called again, it starts over from the current
        lengths."""
        for pol in self.policies.values():
            pol.begin_speculation(self)
        self.speculating = True

    def end_speculation(self) -> None:
        """The drafts were accepted or rolled back."""
        for pol in self.policies.values():
            pol.end_speculation(self)
        self.speculating = False

    def truncate(self, layer: int, lengths: list[int]) -> None:
        """Forget the slots past ``lengths[b]`` (rejected speculative tokens): the next write goes there.
        The layer's cache policy rolls its state back with them (``KVPolicy.truncate``) or refuses (state
        that decode changed and the policy cannot restore, e.g. decode-time eviction)."""
        old = self._lengths[layer]
        self._check_shorter(layer, lengths, "truncate")
        pol = self.policies.get(layer)
        if pol is not None:
            pol.truncate(self, list(old), list(lengths))      # raises before anything changed
        self._set_lengths(layer, lengths)

    def resize(self, layer: int, capacity: int) -> None:
        """Reallocate ``layer`` to ``capacity`` slots, keeping its filled ones (room for a probe forward, and
        back after it)."""
        filled = max(self._lengths[layer])
        if capacity < filled:
            raise ValueError(f"layer {layer}: cannot resize to {capacity} slots, {filled} are filled")
        for buf in (self.k, self.v):
            new = torch.zeros(self.batch, self.num_kv_heads, capacity, self.head_dim, dtype=self.dtype,
                              device=self.device)
            new[:, :, :filled] = buf[layer][:, :, :filled]
            buf[layer] = new

    def rewind(self, layer: int, lengths: list[int]) -> None:
        """Forget the slots past ``lengths[b]`` that a probe forward wrote. Unlike ``truncate`` this is
        allowed under any policy: no policy saw those tokens, so its state still describes the cache."""
        self._check_shorter(layer, lengths, "rewind")
        self._set_lengths(layer, lengths)

    def _check_shorter(self, layer: int, lengths: list[int], what: str) -> None:
        if any(n > m for n, m in zip(lengths, self._lengths[layer])):
            raise ValueError(f"layer {layer}: cannot {what} {self._lengths[layer]} to {lengths}")

    def reset(self, headroom: int, tokens: int) -> None:
        """Empty the cache and reallocate every layer to ``tokens + headroom`` slots."""
        for buf in (self.k, self.v):
            for layer in range(self.num_layers):
                buf[layer] = torch.zeros(self.batch, self.num_kv_heads, tokens + headroom, self.head_dim,
                                         dtype=self.dtype, device=self.device)
        self._lengths = [[0] * self.batch for _ in range(self.num_layers)]
        self._lengths_dev = [None] * self.num_layers
        self.positions = [0] * self.batch
        self.policies = make_policies(self._policy_params)
        self.speculating = False

    def view(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, :upto], self.v[layer][:, :, :upto]

    def nbytes(self) -> int:
        """Physical bytes held by the k/v buffers (allocated capacity, not just filled slots) and the
        policies' per-layer state."""
        state = [t for p in self.policies.values() for t in p.state_tensors()]
        return sum(t.numel() * t.element_size() for t in self.k + self.v + state)

    def host_bytes(self) -> int:
        """Bytes of KV offloaded to host memory (not counted by ``nbytes``)."""
        return sum(t.numel() * t.element_size() for p in self.policies.values() for t in p.host_tensors())

    def used_bytes(self) -> int:
        """Bytes of the filled slots."""
        per_tok = self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size() * 2
        return sum(sum(ls) for ls in self._lengths) * per_tok

    def __repr__(self) -> str:
        caps = sorted({self.capacity(i) for i in range(self.num_layers)})
        return (f"KVCache({self.num_layers} layers, batch {self.batch}, {self.num_kv_heads} kv heads x "
                f"{self.head_dim}, capacity {caps}, {self.nbytes() / 2**20:.1f} MiB)")
