"""The interface every KV policy implements, and the registry that finds a policy by name.

A policy object belongs to one layer of one ``KVCache`` (made by ``KVCache.for_program`` from the
Program's ``CachePolicy`` parameters) and owns that layer's policy state as typed attributes (slot
ages, accumulated scores, page bounds, ...). ``Ctx.attend`` hands it every attention call of its layer:

- ``attend`` (the template): a single-token step goes to ``decode``; a multi-token write is checked
  (``check_extend``), runs the dense path, then ``after_write`` and, for the first prefill of a prompt
  (``ctx.compress``), ``after_prefill``.
- ``decode``: one new token per sequence (default: the dense path).
- ``after_write``: keep per-slot state current after tokens were written (Quest's page bounds).
- ``after_prefill``: the prompt is in: compress it (evicting policies) or summarise it (SentenceKV).
- ``probe_inputs`` / ``probe_attend`` / ``after_probes``: a policy that scores the prompt by running more
  tokens through the whole model first (KVzip's context reconstruction) asks for those forwards after
  the prompt; they attend over the full cache, their own k/v are forgotten afterwards, then it compresses.
- ``state_tensors`` / ``host_tensors``: what the state holds, for the cache's byte counts.

Self-speculation (``KVCache.begin_speculation`` .. ``end_speculation``) adds three hooks. ``verify``:
several new tokens that are decode steps checked in one pass (the last emitted token and its drafts);
query t must read exactly what ``decode`` would read for it with the layer holding the tokens up to t,
so the verified output is the policy's own one-token-at-a-time output. ``rollback`` / ``truncate``: the
cache forgets rejected drafts; the policy's state must become what it would be had they never been
written. A policy that overrides ``decode`` overrides ``verify`` too (or verifies with ``verify_stepwise``); one with state that decode changes overrides ``truncate``. A policy
that evicts during decode (``decode_evict``) needs neither: its drafts are verified as decode steps one
after the other (``verify_stepwise``), each after a snapshot of the layer and the state, and a rollback
restores the snapshot from before the first rejected draft, so a rejected draft never evicted anything.

Adding a policy: one file in this package with a ``@register``-ed subclass, its parameters and recipe
in ``recipes/kv.py``, and tests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ...program import CachePolicy

POLICIES: dict[str, type["KVPolicy"]] = {}


def register(cls: type["KVPolicy"]) -> type["KVPolicy"]:
    """Make ``cls`` the runtime of the ``CachePolicy`` parameters whose ``method`` is ``cls.name``."""
    if cls.name in POLICIES:
        raise ValueError(f"a KV policy named {cls.name!r} is already registered ({POLICIES[cls.name].__name__})")
    POLICIES[cls.name] = cls
    return cls


class KVPolicy:
    """One layer's KV policy and its state. Subclasses set ``name`` and override the hooks."""

    name: ClassVar[str] = ""

    # whether ``decode`` may overwrite cached slots (evict) with the new token; such a policy is rolled back
    # from snapshots taken before each draft token (``rollback``)
    decode_evict: bool = False

    def __init__(self, params: "CachePolicy", layer: int):
        self.params = params
        self.layer = layer
        # under self-speculation, for a policy that evicts during decode: the layer and the state as they
        # were before each draft token (index t: before the t-th token since begin_speculation)
        self._before: list[tuple] | None = None

    def bind(self, policies: dict[int, "KVPolicy"]) -> None:
        """Called once all layers' policies exist (a policy that reads another layer's state finds it)."""

    # -- the template -----------------------------------------------------------------------------
    def attend(self, ctx: "Ctx", layer: int, q, k, v, scale: float, window: int | None,
               softcap: float | None) -> torch.Tensor:
        T = q.shape[2]
        if T == 1:
            if self._before is not None:
                self._before.append(self.snapshot(ctx.cache))
            return self.decode(ctx, q, k, v, scale, softcap)
        if ctx.cache.speculating:        # a draft under verification: each token is a decode step
            if self.decode_evict:
                return self.verify_stepwise(ctx, q, k, v, scale, softcap)
            return self.verify(ctx, q, k, v, scale, softcap)
        self.check_extend(ctx, T)
        old = list(ctx.cache.lengths(layer))
        out = ctx.attend_dense(layer, q, k, v, scale, window, softcap)
        self.after_write(ctx, old)
        if ctx.compress:
            self.after_prefill(ctx, q, scale)
        return out

    # -- the hooks --------------------------------------------------------------------------------
    def check_extend(self, ctx: "Ctx", T: int) -> None:
        """Raise when the cache cannot take ``T`` tokens at once in its current state."""

    def decode(self, ctx: "Ctx", q, k, v, scale: float, softcap: float | None) -> torch.Tensor:
        """One new token per sequence: q [B, Hq, 1, D], k/v [B, Hkv, 1, D] -> [B, Hq, 1, D]."""
        old = list(ctx.cache.lengths(self.layer))
        out = ctx.attend_dense(self.layer, q, k, v, scale, None, softcap)
        self.after_write(ctx, old)
        return out

    def verify(self, ctx: "Ctx", q, k, v, scale: float, softcap: float | None) -> torch.Tensor:
        """T decode tokens at once (speculative drafts): q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D],
        query t reading what ``decode`` would read for it. Default, for a dense ``decode``: causal dense
        attention, which is exactly that."""
        old = list(ctx.cache.lengths(self.layer))
        out = ctx.attend_dense(self.layer, q, k, v, scale, None, softcap)
        self.after_write(ctx, old)
        return out

    def begin_speculation(self, cache) -> None:
        """Tokens written from now on may be rolled back (``rollback``): keep what that needs. A policy that
        evicts during decode keeps a snapshot before each draft token; one that overrides this and evicts
        calls it."""
        self._before = [] if self.decode_evict else None

    def end_speculation(self, cache) -> None:
        """The drafts were settled: what ``begin_speculation`` kept is no longer needed."""
        self._before = None

    def rollback(self, cache, base: list[int], keep: list[int]) -> list[int]:
        """Sequence b keeps the first ``keep[b]`` of the tokens written since ``begin_speculation`` (the layer
        held ``base[b]`` slots then); return the layer's lengths afterwards. A policy that only appends
        forgets the slots past ``base[b] + keep[b]`` (``truncate``); one that evicted goes back to its snapshot
        from before token ``keep[b]``: slots, lengths and state, as if the rejected drafts never came."""
        if self._before is None:
            new = [b + k for b, k in zip(base, keep)]
            self.truncate(cache, list(cache.lengths(self.layer)), new)
            return new
        for b, k in enumerate(keep):
            if k < len(self._before):
                self.restore(cache, self._before[k], [b])
        return list(cache.lengths(self.layer))

    def truncate(self, cache, old: list[int], new: list[int]) -> None:
        """The cache is about to forget the slots past ``new[b]`` (it held ``old[b]``): bring the state to
        what it would be had those tokens never been written, or raise. Default: nothing to bring back
        for a policy without state; one with state refuses."""
        if self.has_state:
            raise ValueError(f"layer {self.layer} has cache-policy state ({self.name}); it cannot be rolled back")

    # -- verification token by token, for a policy that evicts during decode ----------------------------
    def verify_stepwise(self, ctx: "Ctx", q, k, v, scale: float, softcap: float | None) -> torch.Tensor:
        """T draft tokens as T decode steps (each may evict what the next one would have read), with a
        snapshot before each when the policy evicts, so that ``rollback`` can undo the rejected ones.
        Sequence b's tokens past ``ctx.n_valid[b]`` (padding) change nothing."""
        n_valid, outs = ctx.n_valid, []
        for t in range(q.shape[2]):
            snap = None
            if self._before is not None:      # a policy that only appends needs no snapshot
                snap = self.snapshot(ctx.cache)
                self._before.append(snap)
            ctx.n_valid = [1 if t < n else 0 for n in n_valid]
            try:
                outs.append(self.decode(ctx, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], scale, softcap))
            finally:
                step, ctx.n_valid = ctx.n_valid, n_valid
            idle = [b for b, s in enumerate(step) if s == 0]
            if idle and snap is not None:
                self.restore(ctx.cache, snap, idle)
        return torch.cat(outs, dim=2)

    _NOT_STATE = ("params", "layer", "_before")

    def snapshot(self, cache) -> tuple:
        """The layer's slots and lengths and this policy's state, copied."""
        state = {}
        for name, value in vars(self).items():
            if name in self._NOT_STATE:
                continue
            state[name] = value.clone() if isinstance(value, torch.Tensor) else \
                list(value) if isinstance(value, list) else value
        return cache.snapshot(self.layer), state

    def restore(self, cache, snap: tuple, rows: list[int]) -> None:
        """Sequences ``rows`` go back to ``snap`` (from ``snapshot``): the layer's slots and lengths, and the
        rows of every state tensor or per-sequence list."""
        layer_snap, state = snap
        cache.restore(self.layer, layer_snap, rows)
        everyone = sorted(rows) == list(range(cache.batch))
        for name, saved in state.items():
            now = getattr(self, name)
            if isinstance(saved, torch.Tensor):
                if everyone or not isinstance(now, torch.Tensor) or now.shape != saved.shape:
                    if not everyone:
                        raise ValueError(f"layer {self.layer}: {self.name}'s {name} changed shape during the drafts; "
                                         "only the whole batch can be rolled back")
                    setattr(self, name, saved.clone())
                else:
                    idx = torch.tensor(rows, device=now.device)
                    now.index_copy_(0, idx, saved.index_select(0, idx))
            elif isinstance(saved, list) and isinstance(now, list) and len(saved) == cache.batch and not everyone:
                for b in rows:
                    now[b] = saved[b]
            else:
                setattr(self, name, list(saved) if isinstance(saved, list) else saved)

    def fill(self, ctx: "Ctx", k, v) -> None:
        """Cache tokens that exited below this layer (CALM): their k/v [B, Hkv, T, D], computed from the exited
        hidden state, are written as a decode step would write them, but no query reads. Default: appended,
        and the state updated (``after_write``)."""
        old = list(ctx.cache.lengths(self.layer))
        ctx.cache.write(self.layer, k, v)
        ctx.cache.advance(self.layer, ctx.n_valid)
        self.after_write(ctx, old)

    def after_write(self, ctx: "Ctx", old: list[int]) -> None:
        """Tokens were written after ``old[b]`` cached ones."""

    def after_prefill(self, ctx: "Ctx", q: torch.Tensor, scale: float) -> None:
        """The whole prompt was written and attended to (q: its queries [B, Hq, T, D])."""

    # -- probe forwards after the prompt (``runtime/probe.py`` runs them) ---------------------------
    def probe_inputs(self, ctx: "Ctx", ids: torch.Tensor, n: list[int]) -> list[list[list[int]]] | None:
        """The token ids to run through the whole model after the prompt before this layer compresses it:
        one forward per entry, entry[b] the ids of sequence b (an empty list: sequence b sits that forward
        out). Each forward starts right after the prompt; every layer forgets its k/v afterwards. ``ctx``
        is the prompt's prefill context, ``ids [B, T]`` its token ids (sequence b's are the first ``n[b]``).
        None: no probe forwards."""
        return None

    def probe_attend(self, ctx: "Ctx", q, k, v, scale: float, window: int | None,
                     softcap: float | None) -> torch.Tensor:
        """The layer's attention in probe forward ``ctx.probe``: the probe tokens' q [B, Hq, T, D] over the
        cache plus their own k/v [B, Hkv, T, D] (written after each sequence's cached tokens and forgotten
        after the forward), so no state that describes the cache may change (what the policy measures from
        the probe may be recorded). Default: the dense path."""
        return ctx.attend_dense(self.layer, q, k, v, scale, window, softcap)

    def after_probes(self, ctx: "Ctx") -> None:
        """Every probe forward this policy asked for has run (``ctx``: the prompt's prefill context)."""

    # -- the captured decode step (runtime/static.py) -----------------------------------------------
    supports_static = False     # whether ``static_decode`` exists for this policy

    @classmethod
    def supports_static_params(cls, params) -> bool:
        """``supports_static`` of a policy made from ``params`` (asked before any cache exists)."""
        return bool(cls(params, 0).supports_static)

    def prepare_static(self, cache) -> None:
        """Fix what the captured step treats as constants (budgets) and shape the state for it."""

    def static_decode(self, sctx, q, k, v, scale: float, softcap: float | None) -> torch.Tensor:
        """One decode step as a pure tensor function (no host syncs, fixed shapes): write the new k/v with
        ``sctx.write`` and attend. q [B, Hq, 1, D] -> [B, Hq, 1, D]."""
        raise NotImplementedError(f"{self.name} has no captured decode step")

    def static_count(self, n: int, b: int) -> tuple[int, int]:
        """(keys read, keys cached) of sequence ``b`` in a captured step that grew its layer to ``n`` slots
        without eviction (for the stats, as the eager step counts them)."""
        return n, n

    def static_state(self) -> list[torch.Tensor]:
        """Copies of the state the captured step mutates (restored after a warm-up run)."""
        return [t.clone() for t in self.state_tensors()]

    def restore_static_state(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self.state_tensors(), saved):
            t.copy_(s)

    # -- the state --------------------------------------------------------------------------------
    def state_tensors(self) -> list[torch.Tensor]:
        """The device tensors of this policy's state (every tensor attribute)."""
        host = {id(t) for t in self.host_tensors()}
        return [t for t in vars(self).values() if isinstance(t, torch.Tensor) and id(t) not in host]

    def host_tensors(self) -> list[torch.Tensor]:
        """KV moved to host memory (SentenceKV's offloaded prompt)."""
        return []

    @property
    def has_state(self) -> bool:
        return bool(self.state_tensors())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer {self.layer}: {self.params.describe()})"


def make_policies(params: dict[int, "CachePolicy"]) -> dict[int, KVPolicy]:
    """One policy object per layer with a ``CachePolicy``, bound to each other."""
    out = {}
    for layer, p in sorted(params.items()):
        cls = POLICIES.get(p.method)
        if cls is None:
            raise ValueError(f"layer {layer}: no KV policy is registered for {p.method!r} "
                             f"(registered: {', '.join(sorted(POLICIES))})")
        out[layer] = cls(p, layer)
    for pol in out.values():
        pol.bind(out)
    return out
