"""What a call measured: ``Stats`` (and the decoding modes' ``DecodeStats``), and the ``Generation`` it
returns. Plain records with no runtime imports, so that ``engine`` and the ``decoding`` package, which
is built on ``engine``, both use them without importing each other at module level."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    """What a decoding mode did, summed over the prompts of a call."""

    tokens: int = 0
    layer_tokens: int = 0                                    # layers x tokens computed in decode
    exits: dict[int, int] = field(default_factory=dict)      # exit layer -> tokens emitted there
    drafted: dict[str, int] = field(default_factory=dict)    # draft source -> drafted tokens
    accepted: dict[str, int] = field(default_factory=dict)   # draft source -> accepted drafts
    verify_steps: dict[str, int] = field(default_factory=dict)
    plain_steps: int = 0

    def acceptance(self, source: str) -> float:
        return self.accepted.get(source, 0) / self.drafted[source] if self.drafted.get(source) else float("nan")


@dataclass
class Stats:
    """Measurements of one call. Decode throughput counts the tokens of sequences still running."""

    prompt_tokens: list[int]
    ttft_s: float = 0.0                 # prefill + first token
    decode_s: float = 0.0
    decode_tokens: int = 0
    kv_bytes: int = 0                   # physical bytes of the KV cache on the model's device
    kv_host_bytes: int = 0              # bytes of KV offloaded to host memory (SentenceKV)
    moved_bytes: int = 0                # bytes copied from offloaded KV during decode (host -> device on a GPU)
    kv_used_bytes: int = 0              # bytes of the filled slots
    kv_prefill_bytes: int = 0           # physical bytes of the KV cache right after prefill
    layer_tokens: list[int] = field(default_factory=list)  # prompt tokens each layer holds after prefill
    selected: dict[int, list[list[int]]] = field(default_factory=dict)  # selection layer -> kept indices
    kv_kept: dict[int, list[list[list[int]]]] = field(default_factory=dict)  # evicting layer -> [b][head] slots
    reads: dict[int, list[int]] = field(default_factory=dict)  # layer -> [keys read, keys cached] in decode
    decoding: DecodeStats | None = None  # what an early-exit / speculative decoding mode did

    @property
    def attended_fraction(self) -> float:
        """Keys read / keys cached over all layers and decode steps (1.0 when dense)."""
        r = sum(v[0] for v in self.reads.values())
        c = sum(v[1] for v in self.reads.values())
        return r / c if c else float("nan")

    def layer_attended_fraction(self) -> dict[int, float]:
        return {l: r / c for l, (r, c) in sorted(self.reads.items()) if c}

    @property
    def moved_bytes_per_token(self) -> float:
        """Bytes copied from offloaded KV per generated token (all layers)."""
        return self.moved_bytes / self.decode_tokens if self.decode_tokens else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def __str__(self) -> str:
        return (f"prompt {sum(self.prompt_tokens)} tok, TTFT {self.ttft_s * 1e3:.0f} ms, decode "
                f"{self.decode_tokens_per_s:.1f} tok/s, KV {self.kv_bytes / 2**20:.1f} MiB")


@dataclass
class Generation:
    """New tokens per prompt (prompt not included), why each stopped, and the stats."""

    tokens: list[list[int]]
    finish_reasons: list[str]           # "stop" (a stop token) or "length"
    stats: Stats
    prompts: list[list[int]] = field(default_factory=list)

    @property
    def sequences(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens)]


__all__ = ["Stats", "DecodeStats", "Generation"]
