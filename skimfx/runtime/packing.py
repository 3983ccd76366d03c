"""A ragged batch packed into one row: the tokens of every sequence side by side, no padding.

A batched verification step feeds sequence b its last token plus its own k_b drafts; right-padded to the
longest row, a batch of 4 whose drafts are 8, 2, 0 and (finished) nothing runs 4 x 9 = 36 token rows
through every linear, of which 12 are real. Everything in a layer but attention works token by token
(norms, RoPE at each token's own position, the projections, the MLP), so it runs on the packed
``[1, N]`` tokens as well as on ``[B, T]``; only attention needs to know which sequence a token belongs
to. ``Ctx.attend`` therefore pads q, k, v to ``[B, H, T, D]`` for the cache and the KV policy, and packs
the output back: the cache, the policies and the attention kernels see exactly the padded call they see
without packing, while the linears (most of a step's time once rows cost compute) see only real tokens.
"""
from __future__ import annotations

import torch


class PackedRows:
    """The layout of a ragged batch with ``counts[b]`` tokens in sequence b, packed into ``N = sum(counts)``
    token positions (sequence after sequence)."""

    def __init__(self, counts: list[int], device):
        if not counts or sum(counts) == 0:
            raise ValueError(f"a packed batch needs at least one token (counts {counts})")
        if min(counts) < 0:
            raise ValueError(f"token counts must not be negative (counts {counts})")
        self.counts = list(counts)
        self.batch, self.width = len(counts), max(counts)
        self.device = device
        starts = [0]
        for n in counts[:-1]:
            starts.append(starts[-1] + n)
        self.starts = starts
        T = self.width
        # padded slot (b, t) reads packed token starts[b] + t; a padding slot reads some real token (its
        # output is never used, as padding's is not without packing)
        t = torch.arange(T)
        last = torch.tensor([max(n - 1, 0) for n in counts])
        pad = torch.tensor(starts)[:, None] + torch.minimum(t[None], last[:, None])
        self._to_padded = pad.clamp(max=sum(counts) - 1).reshape(-1).to(device)            # [B * T]
        self._to_packed = torch.cat([b * T + torch.arange(n) for b, n in enumerate(counts)]).to(device)  # [N]

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    def pack_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """Each sequence's tokens -> [1, N]."""
        if [len(r) for r in rows] != self.counts:
            raise ValueError(f"row lengths {[len(r) for r in rows]} differ from the packed counts {self.counts}")
        return torch.tensor([[t for r in rows for t in r]], dtype=torch.long, device=self.device)

    def positions(self, starts: list[int]) -> torch.Tensor:
        """Token positions [1, N]: sequence b's tokens at starts[b], starts[b] + 1, ..."""
        return torch.tensor([[s + i for s, n in zip(starts, self.counts) for i in range(n)]], dtype=torch.long,
                            device=self.device)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[1, H, N, D] -> [B, H, T, D] (padding slots hold copies of real tokens)."""
        H, D = x.shape[1], x.shape[3]
        y = x[0].index_select(1, self._to_padded)                                        # [H, B * T, D]
        return y.view(H, self.batch, self.width, D).transpose(0, 1).contiguous()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> [1, H, N, D] (the real tokens only)."""
        H, D = x.shape[1], x.shape[3]
        y = x.transpose(0, 1).reshape(H, self.batch * self.width, D)
        return y.index_select(1, self._to_packed).unsqueeze(0)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[1, N, ...] -> each sequence's [counts[b], ...]."""
        return list(x[0].split(self.counts))


__all__ = ["PackedRows"]
