"""Hogwild! inference (Rodionov et al. 2025, "Hogwild! Inference: Parallel LLM Generation via Concurrent
Attention"): n workers generate at the same time over one shared KV cache, each seeing the others' tokens
as they are produced.

The cache is a set of blocks: the prompt, then one block per worker (its header, then its tokens). Every
token's k/v is computed once, by the worker that wrote it, and stored in its block. Each worker reads the
blocks in its own order, the paper's layout: the prompt, the other workers' blocks, its own block last, laid
end to end from position 0, so the blocks start at different positions in different workers' views, and a
block's start moves as the blocks before it grow.

RoPE makes that free of recomputation: a query at position p and a key at position s + j score
``(R(p) q) . (R(s + j) k) = (R(p - s) q) . (R(j) k)``. The keys are stored rotated at their position inside
their block (j; a new token's key, computed at its position in its writer's view, is rotated back by its
block's start), and for each block the query is rotated back by that block's start in the reader's view
before the scores are taken; the scores of all blocks then go through one softmax. No key or value is
recomputed or re-stored when the layout changes. The rotation tables are the model's own: the Program's
prologue computes the cos/sin of any positions (per layer: Gemma 3's local and global RoPE differ).

A step: every worker that is still running feeds its last token in one batch of rows; each row's query
sees the prompt, the other workers' blocks as they were before the step (tokens written in the same step
are not yet visible: they are produced concurrently) and its own block up to itself. A worker stops at a
stop token or after ``max_new_tokens``; the others go on. Sliding-window layers apply the window to the
positions in the reader's view.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ...program import HogwildConfig, Program
from ..context import Ctx
from ..executor import Executor
from ..sampling import SamplingConfig, sample
from ..stats import Generation, Stats
from ..steps import pad_right
from .loop import register

PROMPT = 0                      # block 0 is the prompt; worker w writes block w + 1


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RopeTables:
    """The cos/sin that each layer's RoPE uses, for any positions, read from the Program's prologue."""

    def __init__(self, ex: Executor):
        self.ex = ex
        program = ex.program
        D = program.info.head_dim
        env = self.prologue(torch.tensor([0, 1], device=program.info.device))
        self.names: list[tuple[str, str]] = []
        for layer, st in enumerate(ex.layers):
            hidden = program.hidden_input(layer)
            cand = [n for n in st.inputs if n != hidden and n in env and env[n].shape[-1] == D]
            at0 = {n: env[n][0, 0].float() for n in cand}
            cos = [n for n in cand if torch.allclose(at0[n], torch.ones_like(at0[n]), atol=1e-6)]
            sin = [n for n in cand if torch.allclose(at0[n], torch.zeros_like(at0[n]), atol=1e-6)]
            if len(cos) != 1 or len(sin) != 1:
                raise ValueError(f"Hogwild! re-rotates cached keys with the model's RoPE; layer {layer} reads "
                                 f"{st.inputs}, with no single cos/sin pair among them (a model without rotary "
                                 "position embeddings cannot rearrange its cache this way)")
            c, s = env[cos[0]][0, 1].float(), env[sin[0]][0, 1].float()
            if not torch.allclose(c * c + s * s, torch.ones_like(c), atol=1e-4):
                raise ValueError(f"layer {layer}: the RoPE tables are scaled (cos^2 + sin^2 != 1, an attention factor "
                                 "of a RoPE scaling), so rotations do not compose; Hogwild! needs plain RoPE")
            self.names.append((cos[0], sin[0]))

    def prologue(self, positions: torch.Tensor) -> dict:
        """The prologue's values at ``positions`` [N] (the token ids do not matter for cos/sin)."""
        ids = torch.zeros(1, len(positions), dtype=torch.long, device=positions.device)
        return self.ex.embed(None, ids, positions[None])

    def at(self, deltas: list[int]) -> "Rotations":
        dev = self.ex.program.info.device
        env = self.prologue(torch.tensor(deltas, device=dev))
        return Rotations({d: i for i, d in enumerate(deltas)},
                         [(env[c][0].float(), env[s][0].float()) for c, s in self.names])


@dataclass
class Rotations:
    """cos/sin per layer for a set of position offsets."""

    index: dict[int, int]
    tables: list[tuple[torch.Tensor, torch.Tensor]]

    def rotate(self, layer: int, x: torch.Tensor, delta: int) -> torch.Tensor:
        """``x`` [..., D] (float) rotated by ``delta`` positions with layer ``layer``'s RoPE."""
        cos, sin = self.tables[layer]
        i = self.index[delta]
        return x * cos[i] + rotate_half(x) * sin[i]


class SharedBlocks:
    """The shared KV cache: per layer and block, k/v ``[Hkv, capacity, D]`` with keys rotated at their
    position inside the block; one length per block (every layer holds every token)."""

    def __init__(self, program: Program, capacities: list[int]):
        i = program.info
        self.k = [[torch.zeros(i.num_kv_heads, c, i.head_dim, dtype=i.dtype, device=i.device) for c in capacities]
                  for _ in range(i.num_layers)]
        self.v = [[torch.zeros_like(t) for t in row] for row in self.k]
        self.lengths = [0] * len(capacities)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for rows in (self.k, self.v) for row in rows for t in row)


@dataclass
class Row:
    """One batch row of a forward: the block it writes, the blocks it reads in order (its own last), and how
    many of its T new tokens are real. ``starts``: each block's first position in this row's view."""

    writer: int
    order: list[int]
    n_new: int
    starts: dict[int, int] = field(default_factory=dict)


class HogwildCtx(Ctx):
    """The lowered attention op over the shared blocks (see the module docstring). ``trace``, when given,
    receives per layer each row's queries, view [(block, start, visible length)] and output, and under
    "blocks" the shared blocks (for tests of the layout)."""

    def __init__(self, blocks: SharedBlocks, rows: list[Row], program: Program, rot: Rotations,
                 trace: dict | None = None):
        super().__init__(None, [r.n_new for r in rows], program)
        self.blocks, self.rows, self.rot, self.trace = blocks, rows, rot, trace
        self.before = list(blocks.lengths)

    @torch.compiler.disable
    def attend(self, layer: int, q, k, v, *, scale: float, window: int | None, softcap: float | None):
        info = self.program.info
        Hkv, D = info.num_kv_heads, info.head_dim
        g = info.num_heads // Hkv
        T = q.shape[2]
        outs = []
        for r, row in enumerate(self.rows):
            own, n = row.writer, row.n_new
            before = self.before[own]
            own_start = row.starts[own]
            # the new tokens' keys were rotated at their view positions: store them at their block positions
            self.blocks.k[layer][own][:, before:before + n] = \
                self.rot.rotate(layer, k[r, :, :n].float(), -own_start).to(info.dtype)
            self.blocks.v[layer][own][:, before:before + n] = v[r, :, :n]
            qr = q[r].float().view(Hkv, g, T, D)
            pos_q = own_start + before + torch.arange(T, device=q.device)
            scores, values, pos_k, view = [], [], [], []
            for b in row.order:
                nb = before + n if b == own else self.before[b]
                if nb == 0:
                    continue
                # R(p - s) q . R(j) k: the query rotated back by the block's start in this view
                qb = self.rot.rotate(layer, qr, -row.starts[b])
                scores.append(torch.einsum("hgtd,hkd->hgtk", qb, self.blocks.k[layer][b][:, :nb].float()) * scale)
                values.append(self.blocks.v[layer][b][:, :nb].float())
                pos_k.append(row.starts[b] + torch.arange(nb, device=q.device))
                view.append((b, row.starts[b], nb))
            s = torch.cat(scores, -1)
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            pk = torch.cat(pos_k)
            hide = pk[None, :] > pos_q[:, None]
            if window is not None:
                hide |= pos_q[:, None] - pk[None, :] >= window
            s = s.masked_fill(hide, float("-inf"))
            o = torch.einsum("hgtk,hkd->hgtd", torch.softmax(s, -1), torch.cat(values, 1)).reshape(Hkv * g, T, D)
            outs.append(o.to(q.dtype))
            if self.trace is not None:
                self.trace.setdefault(layer, []).append(dict(writer=own, q=q[r, :, :n].clone(), out=o[:, :n].clone(),
                                                             view=view))
        return torch.stack(outs)


@dataclass
class HogwildGeneration(Generation):
    """A ``Generation`` whose tokens are each prompt's worker blocks end to end (each with its header);
    ``workers[b][w]``: the tokens worker w generated; ``steps[b]``: the decode steps the workers ran."""

    workers: list[list[list[int]]] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


@register(HogwildConfig)
class HogwildDecoder:
    """n workers over one shared cache (see the module docstring)."""

    def __init__(self, config: HogwildConfig):
        if config.workers < 1:
            raise ValueError(f"Hogwild! needs at least one worker, got {config.workers}")
        if len(config.headers) != config.workers or any(len(h) == 0 for h in config.headers):
            raise ValueError(f"Hogwild! needs one non-empty header per worker ({config.workers}), got "
                             f"{[len(h) for h in config.headers]} tokens")
        self.config = config

    def forward(self, ex: Executor, blocks: SharedBlocks, rot_tables: RopeTables, rows: list[Row],
                ids: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """Feed ``ids [R, T]`` (right-padded to each row's ``n_new``); returns each row's next-token logits."""
        for row in rows:
            start = 0
            for b in row.order:
                row.starts[b] = start
                start += blocks.lengths[b]
        deltas = sorted({-s for row in rows for s in row.starts.values()})
        ctx = HogwildCtx(blocks, rows, ex.program, rot_tables.at(deltas), trace)
        T = ids.shape[1]
        pos = torch.stack([row.starts[row.writer] + blocks.lengths[row.writer] + torch.arange(T) for row in rows])
        out = ex.forward(ctx, ids, pos.to(ids.device), last_only=True)
        for row in rows:
            blocks.lengths[row.writer] += row.n_new
        return out

    def generate(self, program: Program, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig,
                 stop_tokens=frozenset(), max_cache_len: int | None = None, callback=None,
                 trace: dict | None = None) -> HogwildGeneration:
        cfg = self.config
        n = cfg.workers
        if program.policies or program.selections:
            raise ValueError("Hogwild! keeps its own shared cache of blocks: it does not run with KV cache policies or "
                             "prompt pruning")
        longest = max(map(len, prompts)) + sum(map(len, cfg.headers)) + n * max_new_tokens
        if max_cache_len is not None and longest > max_cache_len:
            raise ValueError(f"a worker's view can reach {longest} positions (prompt + {n} headers + {n} x "
                             f"max_new_tokens={max_new_tokens}) > max_cache_len={max_cache_len}; ask for fewer tokens")
        ex = Executor(program)
        rope = RopeTables(ex)
        gen = torch.Generator(device=program.info.device)
        if sampling.seed is not None:
            gen.manual_seed(sampling.seed)
        dev = program.info.device
        stats = Stats(prompt_tokens=[len(p) for p in prompts])
        out, reasons, workers, steps = [], [], [], []

        def order(w: int) -> list[int]:
            return [PROMPT] + [u + 1 for u in range(n) if u != w] + [w + 1]

        with torch.inference_mode():
            for b, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                blocks = SharedBlocks(program, [len(prompt)] + [len(h) + max_new_tokens for h in cfg.headers])
                self.forward(ex, blocks, rope, [Row(PROMPT, [PROMPT], len(prompt))], torch.tensor([prompt], device=dev),
                             trace)
                # each worker's header: it sees the prompt and its own header (no worker has written yet)
                rows = [Row(w + 1, order(w), len(h)) for w, h in enumerate(cfg.headers)]
                logits = self.forward(ex, blocks, rope, rows, pad_right([list(h) for h in cfg.headers], dev), trace)
                tok = sample(logits, sampling, gen).tolist()
                stats.ttft_s += time.perf_counter() - t0
                t1 = time.perf_counter()
                made: list[list[int]] = [[] for _ in range(n)]
                why = ["length"] * n
                active = list(range(n))
                n_steps = 0
                while True:
                    still = []
                    for w, t in zip(active, tok):
                        made[w].append(t)
                        if callback is not None:
                            callback(b, t)
                        if t in stop_tokens:
                            why[w] = "stop"
                        elif len(made[w]) < max_new_tokens:
                            still.append(w)
                    active = still
                    if not active:
                        break
                    ids = torch.tensor([[made[w][-1]] for w in active], device=dev)
                    logits = self.forward(ex, blocks, rope, [Row(w + 1, order(w), 1) for w in active], ids, trace)
                    tok = sample(logits, sampling, gen).tolist()
                    n_steps += 1
                stats.decode_s += time.perf_counter() - t1
                if trace is not None:
                    trace["blocks"] = blocks
                stats.decode_tokens += sum(map(len, made)) - n
                stats.kv_bytes = max(stats.kv_bytes, blocks.nbytes())
                workers.append(made)
                steps.append(n_steps)
                out.append([t for w in range(n) for t in list(cfg.headers[w]) + made[w]])
                reasons.append("stop" if all(r == "stop" for r in why) else "length")
        return HogwildGeneration(tokens=out, finish_reasons=reasons, stats=stats, prompts=[list(p) for p in prompts],
                                 workers=workers, steps=steps)


__all__ = ["HogwildDecoder", "HogwildGeneration", "HogwildCtx", "RopeTables", "SharedBlocks", "Row"]
