"""The draft-length schedule of self-speculation: measured step costs (``StepCosts``) and the
acceptance model (``Acceptance``), which together pick the number of drafts with the best expected
tokens per second."""
from __future__ import annotations

import time

from ...kernels import one_time


class StepTimer:
    """Times one step. ``seconds()`` is None when a kernel did one-time work during it (``kernels.one_time``:
    a GEMM path measured for a new row count, a weight re-laid out): such a time is mostly that work, and the
    schedule would otherwise take it for the cost of the width and pass that width over from then on."""

    def __init__(self):
        self.work = one_time.count()
        self.t0 = time.perf_counter()

    def seconds(self) -> float | None:
        dt = time.perf_counter() - self.t0
        return None if one_time.count() != self.work else dt


class StepCosts:
    """Measured time of a whole draft-and-verify step by the number of drafts k (exponentially averaged).

    How the cost grows with k is the machine's business: on a GPU a wider verification is almost free,
    on a few CPU cores a pass over 2 tokens can cost twice a pass over 1 while 9 tokens cost little
    more than 2, so it is measured, not modelled. An unmeasured k is interpolated linearly between the
    measured ones, a plain step standing for k = 0, and extrapolated along the line through the two
    largest (a model draft costs its layers once per token)."""

    def __init__(self):
        self.seconds: dict[int, float] = {}

    def add(self, k: int, seconds: float | None) -> None:
        if seconds is not None:                              # None: a step that did one-time work (StepTimer)
            self.seconds[k] = average(self.seconds.get(k), seconds)

    def __call__(self, k: int, plain: float | None = None) -> float:
        """The estimated time at ``k``; ``plain`` stands for k = 0 (None: below the smallest measured k the
        cost is taken as that k's, as a pass over fewer rows costs no more)."""
        if k in self.seconds:
            return self.seconds[k]
        lo = max((j for j in self.seconds if j < k), default=0)
        hi = min((j for j in self.seconds if j > k), default=None)
        if lo == 0 and plain is None:
            return self.seconds[hi]
        c_lo = self.seconds.get(lo, plain)
        if hi is None:                                       # above every measured k
            lo2 = max((j for j in self.seconds if j < lo), default=0)
            c_lo2 = self.seconds.get(lo2, plain)
            if c_lo2 is None:                                # one measured k and no plain step: flat
                return c_lo
            return c_lo + max(0.0, c_lo - c_lo2) * (k - lo) / (lo - lo2) if lo > 0 else c_lo
        return c_lo + (self.seconds[hi] - c_lo) * (k - lo) / (hi - lo)


class Acceptance:
    """The probability that a draft token is accepted given that its predecessors were: a geometric
    model with decayed counts and a prior. A step with k drafts then emits ``(1 - p^(k+1)) / (1 - p)``
    tokens on average."""

    def __init__(self, prior: float, decay: float = 0.9):
        self.hits, self.misses = 2.0 * prior, 2.0 * (1 - prior)
        self.decay = decay
        self.idle = 0                                         # steps passed over since this kind last drafted
        self.patience: int | None = None                      # idle steps before a retry (doubles while it fails)

    def observe(self, k: int, accepted: int) -> None:
        self.hits = self.decay * self.hits + accepted
        self.misses = self.decay * self.misses + (accepted < k)
        self.idle = 0

    def expected(self, k: int) -> float:
        """Tokens a step with k drafts emits on average (the accepted drafts plus the model's own token)."""
        p = min(self.hits / (self.hits + self.misses), 0.999)
        return (1 - p ** (k + 1)) / (1 - p)

    def best(self, k_max: int, cost: StepCosts, plain: float, first: int) -> tuple[int, float]:
        """(k, expected tokens per second) at the best k, given a plain step's time. Drafts grow at most
        to twice the longest measured one (``first`` before any is measured): exploring a long draft
        that turns out slow costs one step, and doubling bounds that step."""
        k_max = min(k_max, 2 * max(cost.seconds, default=first // 2))
        rates = [(self.expected(k) / cost(k, plain), k) for k in range(1, k_max + 1)]
        rate, k = max(rates)
        return k, rate


def average(old: float | None, new: float | None) -> float | None:
    """A step time, exponentially averaged; a step that did one-time work (None) leaves it."""
    if new is None:
        return old
    return new if old is None else 0.7 * old + 0.3 * new


__all__ = ["StepCosts", "Acceptance", "StepTimer", "average"]
