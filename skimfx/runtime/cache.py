"""The KV cache: per layer, GQA k/v stored un-repeated, per-sequence lengths.

Layout per layer: k, v ``[B, Hkv, capacity, D]``, preallocated (a decode step writes in place
instead of concatenating). ``lengths[layer][b]`` is how many slots sequence b has filled in that
layer. Layers may differ in capacity and length (token pruning keeps fewer tokens in later layers);
``positions[b]`` is the next RoPE position of sequence b, which is not a slot count once layers
hold fewer tokens than the sequence has seen.

Head groups (``split_heads``): a layer whose KV heads keep different numbers of tokens (AdaKV's head
budgets, DuoAttention's retrieval and streaming heads) is stored as groups of KV heads, each group its own
``[B, heads in group, capacity, D]`` tensors sized to what its heads hold: heads that keep the same count
for every sequence share a group (Duo: one group of full heads, one of streaming heads), any other head
is a group of its own. The memory is really released: a layer's bytes are the sum of its groups'. Such a
layer's ``lengths`` are each sequence's largest head length; ``write`` / ``advance`` / ``truncate`` /
``rewind`` / ``resize`` apply to every group; the policy that split it attends per group
(``runtime/policies/headwise.py``). The uniform buffers ``k[layer]`` / ``v[layer]`` of a split layer
are empty, and ``view`` / ``compact`` / ``write_slots`` refuse it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import gather_kv
from .policies import KVPolicy, make_policies


class CacheFullError(ValueError):
    """A write would go past a layer's capacity."""


@dataclass
class HeadGroup:
    """KV heads of a split layer stored together: ``k``/``v`` [B, len(heads), capacity, D]; every head of
    the group holds ``lengths[b]`` tokens of sequence b."""

    heads: tuple[int, ...]
    k: torch.Tensor
    v: torch.Tensor
    lengths: list[int]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


@dataclass
class LayerSnapshot:
    """A copy of one layer: its uniform buffers (``k``/``v``) or its head groups, and its lengths."""

    k: torch.Tensor | None
    v: torch.Tensor | None
    lengths: list[int]
    groups: list[HeadGroup] | None


def head_groups(counts: list[list[int]]) -> list[tuple[int, ...]]:
    """Heads whose kept counts ``counts[b][h]`` agree for every sequence, grouped, in head order."""
    by_counts: dict[tuple[int, ...], list[int]] = {}
    for h in range(len(counts[0])):
        by_counts.setdefault(tuple(row[h] for row in counts), []).append(h)
    return sorted((tuple(hs) for hs in by_counts.values()), key=lambda hs: hs[0])


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
        self.groups: list[list[HeadGroup] | None] = [None] * num_layers     # split layers' head groups
        self.positions = [0] * batch
        # each layer's KV policy (``runtime/policies``), made from the Program's parameters; it owns its
        # state (slot ages, scores, page bounds, offloaded KV). Layers without one are dense.
        self._policy_params = dict(policies or {})
        self.policies: dict[int, KVPolicy] = make_policies(self._policy_params)
        # between begin_speculation and end_speculation the tokens written are drafts: a multi-token write
        # is verified token by token by the policies, and truncate may roll the drafts back
        self.speculating = False
        self._spec_base: list[list[int]] = []      # each layer's lengths at begin_speculation

    @classmethod
    def for_program(cls, program, batch: int, capacity: int | list[int]) -> "KVCache":
        i = program.info
        return cls(i.num_layers, batch, i.num_kv_heads, i.head_dim, capacity, i.dtype, i.device, program.policies)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def capacity(self, layer: int) -> int:
        """Slots of the layer; for a split layer, its longest sequence plus the room every group has left."""
        groups = self.groups[layer]
        if groups is None:
            return self.k[layer].shape[2]
        return max(self._lengths[layer]) + min(g.capacity - max(g.lengths) for g in groups)

    def is_split(self, layer: int) -> bool:
        """Whether ``layer`` is stored as head groups (``split_heads``)."""
        return self.groups[layer] is not None

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
        if self.groups[layer] is not None:
            for g in self.groups[layer]:
                idx = torch.tensor(g.heads, device=k_new.device)
                self._write_rows(layer, g.k, g.v, g.lengths, k_new.index_select(1, idx), v_new.index_select(1, idx),
                                 None)
            return
        self._write_rows(layer, self.k[layer], self.v[layer], self._lengths[layer], k_new, v_new,
                         self.lengths_tensor(layer))

    def _write_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, starts: list[int], k_new: torch.Tensor,
                    v_new: torch.Tensor, starts_dev: torch.Tensor | None) -> None:
        """Write T tokens ([B, H, T, D]) into ``k``/``v`` [B, H, cap, D] at ``starts[b]`` (``starts_dev``: the
        same on the device, or None)."""
        T = k_new.shape[2]
        cap = k.shape[2]
        if max(starts) + T > cap:
            raise CacheFullError(
                f"layer {layer}: writing {T} tokens after {max(starts)} cached ones exceeds the cache "
                f"capacity of {cap} tokens; use a shorter prompt, fewer new tokens, or a larger max_cache_len")
        if min(starts) == max(starts):
            s = starts[0]
            k[:, :, s:s + T] = k_new
            v[:, :, s:s + T] = v_new
        else:
            if starts_dev is None:
                starts_dev = torch.tensor(starts, device=self.device)
            idx = (starts_dev[:, None] + torch.arange(T, device=self.device))
            idx = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k.scatter_(2, idx, k_new.to(k.dtype))
            v.scatter_(2, idx, v_new.to(v.dtype))

    def advance(self, layer: int, counts: list[int]) -> None:
        """Mark ``counts[b]`` more slots of sequence b as filled in ``layer``."""
        self._set_lengths(layer, [a + c for a, c in zip(self._lengths[layer], counts)])

    def _set_lengths(self, layer: int, lengths: list[int]) -> None:
        if self.groups[layer] is not None:     # every head gained or lost the same tokens
            for g in self.groups[layer]:
                g.lengths = [a + n - o for a, n, o in zip(g.lengths, lengths, self._lengths[layer])]
        self._lengths[layer] = list(lengths)
        self._lengths_dev[layer] = None               # the device copy is rebuilt on next use

    def compact(self, layer: int, index: torch.Tensor, kept: list[int], headroom: int | None = None) -> None:
        """Keep only the slots ``index`` of each sequence, in that order: ``[B, K]`` (the same slots
        for every KV head) or ``[B, Hkv, K]`` (per KV head, as SnapKV and H2O choose). K = max kept;
        shorter rows pad with any valid slot. The layer's buffers shrink to K plus ``headroom`` new
        slots (default: the same headroom as before): the memory is released, not just masked."""
        self._refuse_split(layer, "compact")
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

    def split_heads(self, layer: int, index: torch.Tensor, counts: list[list[int]],
                    headroom: int | list[int] | None = None, groups: list[tuple[int, ...]] | None = None) -> None:
        """Keep ``counts[b][h]`` slots of KV head h of sequence b: the first ``counts[b][h]`` of ``index
        [B, Hkv, K]`` (the rest of a row is padding), in that order, and store the layer as head groups
        (``groups``, default ``head_groups(counts)``; the heads of a group must keep equal counts), each sized
        to its own longest row plus ``headroom`` slots (one for all groups or one per group; default: the
        same headroom as before). The layer's uniform buffers are released."""
        self._refuse_split(layer, "split")
        filled = max(self._lengths[layer])
        if headroom is None:
            headroom = self.capacity(layer) - filled
        groups = head_groups(counts) if groups is None else [tuple(g) for g in groups]
        if sorted(h for g in groups for h in g) != list(range(self.num_kv_heads)) or \
                any(row[h] != row[g[0]] for g in groups for h in g for row in counts):
            raise ValueError(f"layer {layer}: head groups {groups} must cover each KV head once, and the heads of a "
                             "group must keep equal counts")
        rooms = [headroom] * len(groups) if isinstance(headroom, int) else list(headroom)
        made = []
        for heads, room in zip(groups, rooms):
            n = [counts[b][heads[0]] for b in range(self.batch)]
            K = max(n)
            sel = torch.tensor(heads, device=self.device)
            kv = []
            for buf in (self.k, self.v):
                kept = gather_kv(buf[layer][:, :, :filled].index_select(1, sel), index.index_select(1, sel)[..., :K])
                new = torch.zeros(self.batch, len(heads), K + room, self.head_dim, dtype=self.dtype,
                                  device=self.device)
                new[:, :, :K] = kept
                kv.append(new)
            made.append(HeadGroup(heads, kv[0], kv[1], n))
        for buf in (self.k, self.v):
            buf[layer] = buf[layer].new_zeros(self.batch, self.num_kv_heads, 0, self.head_dim)
        self.groups[layer] = made
        self._lengths[layer] = [max(row) for row in counts]
        self._lengths_dev[layer] = None

    def set_group_lengths(self, layer: int, group: int, lengths: list[int]) -> None:
        """Group ``group`` of a split layer now holds ``lengths[b]`` tokens (a policy that writes into its slots
        itself, e.g. DuoAttention's rolling window); the layer's lengths follow."""
        groups = self.groups[layer]
        if any(n > groups[group].capacity for n in lengths):
            raise CacheFullError(f"layer {layer}: head group {groups[group].heads} holds {groups[group].capacity} "
                                 f"slots, not {max(lengths)}")
        groups[group].lengths = list(lengths)
        self._lengths[layer] = [max(g.lengths[b] for g in groups) for b in range(self.batch)]
        self._lengths_dev[layer] = None

    def head_lengths(self, layer: int) -> list[list[int]]:
        """Tokens held per sequence and KV head: ``[B][Hkv]``."""
        if self.groups[layer] is None:
            return [[n] * self.num_kv_heads for n in self._lengths[layer]]
        out = [[0] * self.num_kv_heads for _ in range(self.batch)]
        for g in self.groups[layer]:
            for b, n in enumerate(g.lengths):
                for h in g.heads:
                    out[b][h] = n
        return out

    def _refuse_split(self, layer: int, what: str) -> None:
        if self.groups[layer] is not None:
            raise ValueError(f"layer {layer} is stored as head groups (its KV heads hold different numbers of "
                             f"tokens), so it cannot {what} as one tensor; its policy reads the groups "
                             f"(cache.groups[{layer}])")

    def write_slots(self, layer: int, slots: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write one new token per sequence (k/v [B, Hkv, 1, D]) into the given slot of each KV head
        (``slots [B, Hkv]``): a slot below the length overwrites an evicted token. Lengths are not
        changed (the caller advances the sequences that appended)."""
        self._refuse_split(layer, "write_slots")
        if int(slots.max()) >= self.capacity(layer):
            raise CacheFullError(f"layer {layer}: slot {int(slots.max())} is past the capacity {self.capacity(layer)}")
        idx = slots[:, :, None, None].expand(-1, -1, 1, self.head_dim)
        self.k[layer].scatter_(2, idx, k_new.to(self.dtype))
        self.v[layer].scatter_(2, idx, v_new.to(self.dtype))

    def begin_speculation(self) -> None:
        """Draft tokens follow: until ``end_speculation`` a write of several tokens is a verification (each
        token reads what a one-token decode step would read, ``KVPolicy.verify``), and ``rollback`` may
        forget drafts (the policies keep what that needs). Called again, it starts over from the current
        lengths."""
        self._spec_base = [list(n) for n in self._lengths]
        for pol in self.policies.values():
            pol.begin_speculation(self)
        self.speculating = True

    def end_speculation(self) -> None:
        """The drafts were accepted or rolled back."""
        for pol in self.policies.values():
            pol.end_speculation(self)
        self.speculating = False

    def rollback(self, keep: list[int]) -> None:
        """Keep the first ``keep[b]`` tokens that sequence b wrote since ``begin_speculation`` and forget the
        rest (rejected drafts), in every layer. A layer without a policy, or whose policy only appends, holds
        its length at the start plus ``keep[b]``; a policy that evicted during the drafts restores the layer
        as it was after the kept tokens (``KVPolicy.rollback``)."""
        if not self.speculating:
            raise ValueError("rollback forgets tokens written since begin_speculation; none was called")
        for layer in range(self.num_layers):
            base = self._spec_base[layer]
            pol = self.policies.get(layer)
            if pol is None:
                self.truncate(layer, [b + k for b, k in zip(base, keep)])
                continue
            new = pol.rollback(self, base, keep)
            if new != self._lengths[layer]:
                self._check_shorter(layer, new, "roll back")
                self._set_lengths(layer, new)

    def snapshot(self, layer: int) -> "LayerSnapshot":
        """A copy of ``layer``'s slots and lengths (what a decode step that evicts may overwrite)."""
        groups = self.groups[layer]
        if groups is None:
            return LayerSnapshot(self.k[layer].clone(), self.v[layer].clone(), list(self._lengths[layer]), None)
        return LayerSnapshot(None, None, list(self._lengths[layer]),
                             [HeadGroup(g.heads, g.k.clone(), g.v.clone(), list(g.lengths)) for g in groups])

    def restore(self, layer: int, snap: "LayerSnapshot", rows: list[int]) -> None:
        """Sequences ``rows`` of ``layer`` become what ``snap`` holds (slots and lengths)."""
        everyone = sorted(rows) == list(range(self.batch))
        if everyone:
            if snap.groups is None:
                self.k[layer], self.v[layer] = snap.k.clone(), snap.v.clone()
                self.groups[layer] = None
            else:
                self.groups[layer] = [HeadGroup(g.heads, g.k.clone(), g.v.clone(), list(g.lengths))
                                      for g in snap.groups]
            self._lengths[layer] = list(snap.lengths)
            self._lengths_dev[layer] = None
            return
        now = self.groups[layer]
        if (snap.groups is None) != (now is None) or (
                now is not None and [g.k.shape for g in now] != [g.k.shape for g in snap.groups]) or (
                now is None and self.k[layer].shape != snap.k.shape):
            raise ValueError(f"layer {layer}: its layout changed since the snapshot; only the whole batch can be "
                             "restored")
        idx = torch.tensor(rows, device=self.device)
        pairs = [(self.k[layer], snap.k), (self.v[layer], snap.v)] if now is None else \
            [(g.k, s.k) for g, s in zip(now, snap.groups)] + [(g.v, s.v) for g, s in zip(now, snap.groups)]
        for dst, src in pairs:
            dst.index_copy_(0, idx, src.index_select(0, idx))
        if now is not None:
            for g, s in zip(now, snap.groups):
                for b in rows:
                    g.lengths[b] = s.lengths[b]
        for b in rows:
            self._lengths[layer][b] = snap.lengths[b]
        self._lengths_dev[layer] = None

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
        if self.groups[layer] is not None:           # every group's room changes by the same amount
            delta = capacity - self.capacity(layer)
            for g in self.groups[layer]:
                top, cap = max(g.lengths), g.capacity + delta
                g.k, g.v = (torch.cat([t[:, :, :top], t.new_zeros(t.shape[0], t.shape[1], cap - top, t.shape[3])],
                                      dim=2) for t in (g.k, g.v))
            return
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
        self.groups = [None] * self.num_layers
        self.positions = [0] * self.batch
        self.policies = make_policies(self._policy_params)
        self.speculating = False

    def view(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._refuse_split(layer, "be viewed")
        return self.k[layer][:, :, :upto], self.v[layer][:, :, :upto]

    def nbytes(self) -> int:
        """Physical bytes held by the k/v buffers (allocated capacity, not just filled slots) and the
        policies' per-layer state."""
        state = [t for p in self.policies.values() for t in p.state_tensors()]
        groups = [t for gs in self.groups if gs for g in gs for t in (g.k, g.v)]
        return sum(t.numel() * t.element_size() for t in self.k + self.v + groups + state)

    def host_bytes(self) -> int:
        """Bytes of KV offloaded to host memory (not counted by ``nbytes``)."""
        return sum(t.numel() * t.element_size() for p in self.policies.values() for t in p.host_tensors())

    def used_bytes(self) -> int:
        """Bytes of the filled slots."""
        per_head = self.head_dim * torch.empty((), dtype=self.dtype).element_size() * 2
        return sum(sum(map(sum, self.head_lengths(l))) for l in range(self.num_layers)) * per_head

    def __repr__(self) -> str:
        caps = sorted({self.capacity(i) for i in range(self.num_layers)})
        return (f"KVCache({self.num_layers} layers, batch {self.batch}, {self.num_kv_heads} kv heads x "
                f"{self.head_dim}, capacity {caps}, {self.nbytes() / 2**20:.1f} MiB)")
