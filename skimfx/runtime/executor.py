"""The one stage executor: runs a Program's stages over an environment of named values.

Every way of running a Program goes through ``Executor``: the prefill / decode forward (``forward``:
all stages in order, with token selection between them), and the decoding modes and calibrations that
stop, skip or resume layers (``embed``, ``run_layers``, ``exit``, ``logits``, ``fill_kv``). Values flow
between stages by name (``Stage.inputs`` / ``Stage.outputs``); the residual stream between layers is
found by name from the Program (``Program.hidden_input`` / ``hidden_output``), never by position.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..program import Program, Stage, gather_tokens
from .context import Ctx
from .sentences import segment_batch


@dataclass
class Rerun:
    """A GemFilter selection: run the whole model again on these token indices [B, K]."""

    index: torch.Tensor
    kept: list[int]


class Executor:
    """Runs the stages of ``program``. ``layer_tokens`` counts layers x tokens computed by
    ``run_layers`` (what a decoding mode that skips layers saves)."""

    def __init__(self, program: Program):
        if program.stages is None:
            raise ValueError("the Program is not split into stages; run the split_layers pass")
        self.program = program
        self.prologue = program.stages[0]
        self.epilogue = program.stages[-1]
        self.layers = program.layer_stages
        self.num_layers = len(self.layers)
        self._hidden_in = [program.hidden_input(l) for l in range(self.num_layers)]
        self.layer_tokens = 0

    # -- one stage --------------------------------------------------------------------------------
    @staticmethod
    def run(stage: Stage, ctx: Ctx | None, env: dict) -> tuple:
        """Run ``stage`` on the values it reads from ``env``; its outputs are added to ``env``."""
        outs = stage.module(ctx, *[env[n] for n in stage.inputs])
        env.update(zip(stage.outputs, outs))
        return outs

    # -- pieces of a forward, for decoding modes and calibrations ----------------------------------
    def embed(self, ctx: Ctx, input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """The prologue on ``input_ids [B, T]`` at ``position_ids [B, T]`` -> the environment."""
        env = {"input_ids": input_ids, "position_ids": position_ids}
        self.run(self.prologue, ctx, env)
        return env

    def run_layers(self, ctx: Ctx, env: dict, lo: int, hi: int, skip: tuple[int, ...] = ()) -> dict:
        """Layers lo..hi-1 on ``env``; a layer in ``skip`` passes its input residual stream through (and
        caches nothing)."""
        for l in range(lo, hi):
            if l in skip:
                self.set_hidden(env, l, self.layer_input(env, l))
                continue
            self.run(self.layers[l], ctx, env)
            self.layer_tokens += self.hidden(env, l).shape[1]
        return env

    def layer_input(self, env: dict, layer: int) -> torch.Tensor:
        """The residual stream entering ``layer`` [B, T, hidden]."""
        return env[self._hidden_in[layer]]

    def set_layer_input(self, env: dict, layer: int, h: torch.Tensor) -> None:
        env[self._hidden_in[layer]] = h

    def hidden(self, env: dict, layer: int) -> torch.Tensor:
        """The residual stream leaving ``layer`` [B, T, hidden]."""
        return env[self.program.hidden_output(layer)]

    def set_hidden(self, env: dict, layer: int, h: torch.Tensor) -> None:
        env[self.program.hidden_output(layer)] = h

    def exit(self, ctx: Ctx, env: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exit branch after ``layer``: (top-1 token, its probability, top-2 margin) per token."""
        st = self.program.exits[layer]
        return st.module(ctx, *[env[n] for n in st.inputs])

    def logits(self, ctx: Ctx | None, env: dict) -> torch.Tensor:
        """The epilogue (final norm + LM head) -> logits [B, T, V]."""
        (out,) = self.run(self.epilogue, ctx, env)
        return out

    def fill_kv(self, ctx: Ctx, env: dict, layer: int) -> None:
        """CALM state propagation: every layer above ``layer`` caches the k/v computed from its output."""
        h = self.hidden(env, layer)
        for m in range(layer + 1, self.num_layers):
            st = self.program.kv_fill[m]
            hidden_in = self._hidden_in[m]
            k, v = st.module(None, *[h if n == hidden_in else env[n] for n in st.inputs])
            ctx.fill(m, k, v)            # through layer m's KV policy, as its decode step would write them

    # -- the whole forward ------------------------------------------------------------------------
    def forward(self, ctx: Ctx, input_ids: torch.Tensor, position_ids: torch.Tensor,
                last_only: bool = False) -> torch.Tensor | Rerun:
        """Run all stages; returns logits [B, T, V], or [B, V] at each sequence's last real token.

        A selection stage (``ctx.prune``) gathers every token-axis value that a later stage reads, so
        later layers run on the kept tokens; a GemFilter selection returns ``Rerun`` instead.
        """
        program = self.program
        env = {"input_ids": input_ids, "position_ids": position_ids}
        stages = program.stages
        sentence_rules = [s.max_sentence for s in program.selections.values()
                          if s.granularity == "sentence" and ctx.prune] + \
            [p.max_sentence for p in program.policies.values() if p.sentence_granular and ctx.compress]
        if sentence_rules and input_ids.shape[1] > 1:
            if program.sentence_ends is None:
                raise ValueError("sentence-granular selection needs the tokenizer's sentence endings: compile with "
                                 "skimfx.compile(model, recipe, tokenizer=tok)")
            ctx.sentence_ids = segment_batch(input_ids, ctx.n_valid, program.sentence_ends, min(sentence_rules))
        handled = False                 # the select stage ahead ran inside its layer, or prunes nothing
        for i, st in enumerate(stages):
            if st.kind == "select":
                if handled or not ctx.prune or not self._prunes(ctx, program.selections[st.layer]):
                    handled = False
                    continue
                (index,) = st.module(ctx, *[env[n] for n in st.inputs])
                rerun = self._select(ctx, env, i, index, ())
                if rerun is not None:
                    return rerun
                continue
            nxt = stages[i + 1] if i + 1 < len(stages) else None
            if st.kind == "layer" and ctx.prune and nxt is not None and nxt.kind == "select" and nxt.folded is not None:
                handled = True
                if self._prunes(ctx, program.selections[nxt.layer]):
                    # the selection runs right after this layer's attention, the rest of the layer on the kept tokens
                    *outs, index = nxt.folded(ctx, *[env[n] for n in st.inputs])
                    env.update(zip(st.outputs, outs))
                    rerun = self._select(ctx, env, i + 1, index, nxt.folded_gathered)
                    if rerun is not None:
                        return rerun
                    continue
            if st.kind == "epilogue" and last_only:
                # only each sequence's last real token goes through the final norm and LM head
                last = torch.tensor(ctx.n_valid, device=input_ids.device)[:, None] - 1
                args = [gather_tokens(env[n], program.values[n].token_axis, last) for n in st.inputs]
                env.update(zip(st.outputs, st.module(ctx, *args)))
                continue
            self.run(st, ctx, env)
        out = env[stages[-1].outputs[0]]
        return out[:, 0] if last_only else out

    def _prunes(self, ctx: Ctx, sel) -> bool:
        """Whether ``sel`` drops tokens of this prefill (a warning says so when it does not)."""
        if all(n <= sel.tokens(p) for n, p in zip(ctx.n_valid, ctx.prompt_lens)):
            warnings.warn(f"{sel.method or 'selection'} at layer {sel.layer}: keep={sel.describe_keep()} of "
                          f"{max(ctx.prompt_lens)} prompt tokens leaves {max(ctx.n_valid)} in place, so no "
                          "tokens are pruned", stacklevel=5)
            return False
        return True

    def _select(self, ctx: Ctx, env: dict, i: int, index: torch.Tensor, gathered: tuple[str, ...]) -> Rerun | None:
        """Apply the selection of stage ``i`` (index [B, K]): gather every token-axis value that a later
        stage reads (except ``gathered``, already gathered), compact earlier layers' KV where asked. A
        GemFilter selection returns ``Rerun`` instead."""
        program = self.program
        sel = program.selections[program.stages[i].layer]
        ctx.selected[sel.layer] = [row[:k] for row, k in zip(index.tolist(), ctx.kept)]
        if sel.mode == "rerun":
            return Rerun(index, ctx.kept)
        later = {n for s in program.stages[i + 1:] for n in s.inputs}
        for name in (later & env.keys()) - set(gathered):
            env[name] = gather_tokens(env[name], program.values[name].token_axis, index)
        if ctx.sentence_ids is not None:
            ctx.sentence_ids = torch.gather(ctx.sentence_ids, 1, index)
        if sel.truncate_earlier_kv:
            for layer in range(sel.layer + 1):
                ctx.cache.compact(layer, index, ctx.kept)
        ctx.n_valid = ctx.kept
        return None


__all__ = ["Executor", "Rerun"]
