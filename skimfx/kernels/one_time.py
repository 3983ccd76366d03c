"""A count of the one-time work kernels do inside a call: a GEMM path measured for a new shape, a weight
re-laid out. A timed step during which the count moved measured that work too, not the step: the
self-speculation schedule (``runtime.decoding.schedule.StepTimer``) drops such timings, so the first pass at
a new verification width does not make that width look ten times dearer than it is."""
from __future__ import annotations

_COUNT = [0]


def note() -> None:
    """Record one piece of one-time work (called by the kernel that does it)."""
    _COUNT[0] += 1


def count() -> int:
    """One-time work done so far in this process."""
    return _COUNT[0]


__all__ = ["note", "count"]
