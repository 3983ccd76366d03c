"""Where a model starts to find the answer: the needle's rank among the prompt's tokens under the
prefill-pruning scoring rules, layer by layer, from one dense forward per prompt.

For each layer, the prompt tokens are scored from that layer's post-RoPE queries and keys (HF's own modules,
hooked) as PromptDistill does (last query, mean over heads, avg-pool 5) and with a 32-query softmax window
(SnapKV's observation window; mean and max over heads); the table gives the needle's rank as a fraction of
the prompt (0.05 = inside the top 5%: kept at a 10% budget at token granularity). A selection layer is
useful from the first layer where the rank is below the budget for every prompt.
"""
from __future__ import annotations

import argparse
import math

import torch

from _results import save

RULES = {"last query, mean (PromptDistill)": (1, False, "mean"), "32 queries, softmax, mean": (32, True, "mean"),
         "32 queries, softmax, max": (32, True, "max")}


def needle_ranks(model, ids: list[int], pos: int) -> dict[str, list[float]]:
    """rule -> [rank fraction of token ``pos`` at each layer]."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    rot = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"]).apply_rotary_pos_emb
    caps = {}

    def hook(i):
        def f(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            q = mod.q_proj(h).view(1, -1, H, D).transpose(1, 2)
            k = mod.k_proj(h).view(1, -1, KV, D).transpose(1, 2)
            if hasattr(mod, "q_norm"):
                q, k = mod.q_norm(q), mod.k_norm(k)
            q, k = rot(q, k, cos, sin)
            caps[i] = (q[:, :, -32:], k.repeat_interleave(H // KV, 1))
        return f

    handles = [l.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, l in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model.model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    out = {r: [] for r in RULES}
    S = len(ids)
    for i in sorted(caps):
        q, k = caps[i]
        s = torch.einsum("bhqd,bhkd->bhqk", q, k)[0] / math.sqrt(D)
        for name, (w, soft, agg) in RULES.items():
            sw = s[:, -w:, :]
            future = torch.arange(S)[None, :] > torch.arange(S - w, S)[:, None]
            p = torch.softmax(sw.masked_fill(future, float("-inf")), -1) if soft else sw.masked_fill(future, 0)
            r = p.sum(1)
            r = r.mean(0) if agg == "mean" else r.max(0).values
            r = torch.nn.functional.avg_pool1d(r[None, None], 5, 1, 2, count_include_pad=False)[0, 0]
            out[name].append((r > r[pos]).sum().item() / S)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depths", default="0.1,0.4,0.7,0.95")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import skimfx
    from skimfx.eval.haystack import niah_prompts

    model, tok = skimfx.load_model(a.model)
    prompts = niah_prompts(tok, a.length, depths=tuple(float(d) for d in a.depths.split(",")), per_depth=1,
                           seed=0, answer_prefix=False)
    per_prompt = []
    for p in prompts:
        text_pos = [i for i in range(len(p.ids) - 8) if tok.decode(p.ids[i:i + 6]).strip().startswith(p.answer[:3])]
        per_prompt.append(needle_ranks(model, p.ids, text_pos[0]))
        print(f"depth {p.depth}: done", flush=True)
    n_layers = len(next(iter(per_prompt[0].values())))
    lines = [f"# Needle rank by layer: {a.model}, {a.length}-token essay haystack prompts (no answer prefix)", "",
             f"Worst rank over {len(prompts)} prompts (needle depths {a.depths}) of the needle's first digit among the "
             "prompt's tokens, as a fraction of the prompt (lower is better; below 0.10 = kept at a 10% token "
             "budget).", "", "| layer | " + " | ".join(RULES) + " |", "|---|" + "---|" * len(RULES)]
    for layer in range(n_layers):
        lines.append(f"| {layer} | " + " | ".join(f"{max(pp[r][layer] for pp in per_prompt):.2f}" for r in RULES) + " |")
    save("selection_layer", lines, {"rows": per_prompt, "depths": a.depths, "length": a.length, "model": a.model})


if __name__ == "__main__":
    main()
