"""Agreement with dense: top-1 token agreement and KL(dense || recipe) of next-token distributions,
teacher-forced along the dense model's own greedy continuation (so both models are scored on the
same contexts, not on diverging texts)."""
from __future__ import annotations

import torch

from ..runtime import KVCache, decode_step, generate, prefill
from ..runtime.steps import plan_capacity
from ..runtime.sampling import SamplingConfig


def teacher_forced_logits(program, prompts: list[list[int]], continuation: list[list[int]]) -> torch.Tensor:
    """Next-token logits [B, N, V] at the end of each prompt and after each continuation token."""
    n = min(len(c) for c in continuation)
    cache = KVCache.for_program(program, len(prompts), plan_capacity(program, max(map(len, prompts)), n))
    with torch.inference_mode():
        out = [prefill(program, cache, prompts)]
        for t in range(n - 1):
            tok = torch.tensor([c[t] for c in continuation], device=cache.device)
            out.append(decode_step(program, cache, tok))
    return torch.stack(out, dim=1).float()


def agreement(dense_program, program, prompts: list[list[int]], n_tokens: int = 32) -> dict:
    """{"top1": fraction of steps whose argmax equals dense's, "kl": mean KL(dense || recipe) in nats}."""
    cont = generate(dense_program, prompts, n_tokens, SamplingConfig(), stop_tokens=set()).tokens
    return logit_agreement(teacher_forced_logits(dense_program, prompts, cont),
                           teacher_forced_logits(program, prompts, cont))


def logit_agreement(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Two [..., V] logit tensors of the same contexts: {"top1": share of equal argmaxes, "kl": mean
    KL(ref || got) in nats}."""
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return {"top1": top1, "kl": kl}
