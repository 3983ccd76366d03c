"""What a compiled model relies on in the user's model, checked before each call.

The compiled graph reads the model's own parameter and buffer tensors (no copies; fusion makes the
q/k/v and gate/up parameters views of one merged buffer per layer). Changes made in place to those
tensors (``load_state_dict`` without ``assign``, an optimizer step, ``p.copy_(...)``) are seen by the
compiled model. Changes that give a parameter a new tensor are not: ``model.to(dtype or device)``,
``.half()``, ``load_state_dict(..., assign=True)``, ``p.data = ...`` leave the compiled stages reading the
old tensors (or a mix of old and new), which fails deep inside a matmul or, worse, silently computes
with stale weights.

Options considered: (a) re-capture transparently on the next call, (b) refuse with a clear error. We
refuse: a re-capture takes seconds to minutes and doubles peak memory at a moment the user did not
choose, the recipe's calibrations may not hold for the new dtype, and a model moved to another device
mid-serving is more often a bug than an intent. The check is one pass over the parameters (~0.5 ms on a
135M model), once per ``__call__`` / ``generate``, never per decode step.
"""
from __future__ import annotations

import torch


class ModelChangedError(RuntimeError):
    """The user's model was changed after ``skimfx.compile`` in a way the compiled model cannot follow."""


def _entries(model: torch.nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _storage(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr()


def _state(model: torch.nn.Module, pinned: frozenset) -> tuple:
    return tuple((name, id(t), t.dtype, t.device, t.data_ptr() if id(t) in pinned else 0, tuple(t.shape))
                 for name, t in _entries(model))


def _held_storages(program) -> set[int]:
    """Storages of the tensors the program's modules hold (the merged q/k/v and gate/up buffers among them)."""
    modules = [program.graph_module] + [s.module for s in program.stages]
    return {_storage(b) for m in modules for _, b in m.named_buffers()}


class ModelSnapshot:
    """Identity, dtype, device and shape of every parameter and buffer of ``model`` when it was compiled,
    and the storage of those that are views of a buffer the program holds (fused projections: the program
    reads the merged buffer, so a parameter moved elsewhere would no longer be what it computes with; the
    other tensors are read through the parameter objects, which follow ``param.data = ...``).
    ``check(model)`` raises ``ModelChangedError`` naming what changed and what to do."""

    def __init__(self, model: torch.nn.Module, program=None):
        held = _held_storages(program) if program is not None else set()
        self.pinned = frozenset(id(t) for _, t in _entries(model) if _storage(t) in held)
        self.state = _state(model, self.pinned)

    def check(self, model: torch.nn.Module) -> None:
        now = _state(model, self.pinned)
        if now != self.state:
            raise ModelChangedError(self._explain(now))

    def _explain(self, now: tuple) -> str:
        was = {e[0]: e for e in self.state}
        cur = {e[0]: e for e in now}
        changes = []
        for name in [n for n in was if n not in cur][:3]:
            changes.append(f"{name} was removed")
        for name in [n for n in cur if n not in was][:3]:
            changes.append(f"{name} was added")
        for name, (_, i0, d0, dev0, p0, s0) in was.items():
            if name not in cur or len(changes) >= 3:
                continue
            _, i1, d1, dev1, p1, s1 = cur[name]
            if d1 != d0 or dev1 != dev0:
                changes.append(f"{name} is now {d1} on {dev1} (compiled as {d0} on {dev0}: e.g. model.to(...) or .half())")
            elif s1 != s0:
                changes.append(f"{name} now has shape {list(s1)} (compiled with {list(s0)})")
            elif i1 != i0:
                changes.append(f"{name} is a new tensor object (e.g. load_state_dict(..., assign=True))")
            elif p1 != p0:
                changes.append(f"{name} now points at new storage (e.g. param.data = ...), away from the merged "
                               "buffer the fused projection reads")
        more = sum(1 for n in cur if n not in was or was[n] != cur[n]) + sum(1 for n in was if n not in cur)
        listed = "; ".join(changes) + (f"; and {more - len(changes)} more" if more > len(changes) else "")
        return ("the model was changed after skimfx.compile, and the compiled model still reads the tensors it was "
                f"compiled with: {listed}. Compile it again: cm = skimfx.compile(model, ...). Changes made in place "
                "(load_state_dict without assign=True, optimizer steps, param.copy_) are followed without recompiling.")
