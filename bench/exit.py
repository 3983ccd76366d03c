"""Early exit and self-speculation vs dense on SmolLM2-135M-Instruct, one run, dense in the same process.

1. Exit calibration on real text that ships with the system (license texts, Python's documentation),
   split by document into train / held-out: top-1 agreement of an exit after layers 12/16/20/24 with
   the final layer on held-out tokens — the model's own norm + head ("raw"), a closed-form ridge
   adapter, and a distilled low-rank adapter (KL to the final layer) — and the share of tokens that
   exit at the threshold reaching 95% agreement.
2. Decoding on held-out prompts, greedy, up to 128 new tokens (stopping at the answer's end):
   prompts whose answer reuses the context (copy, re-line, fix typos, quote) and open ones (explain,
   write). Per mode: decode tokens/s and its ratio to dense, layer evaluations per emitted token
   (drafts that were rejected count), agreement with the dense answer position by position, draft
   acceptance; per prompt, the share of the answer copied from the prompt.

    python bench/exit.py            # about 20 minutes on 2 cores
    python bench/exit.py --quick    # fewer tokens and prompts, 2 layers, no distillation

Writes bench/results/exit.md, exit.json and exit.png (agreement vs speed).
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import skimfx
from _results import pyplot, save, save_figure
from skimfx import EarlyExit, SelfSpeculative
from skimfx.eval import chat_ids


def held_out_prompts(tok, texts: list[str], n_reuse: int, n_open: int) -> list[tuple[str, list[int]]]:
    """(kind, ids): context-reuse tasks over paragraphs of held-out documents, then open questions."""
    paras = [p.strip() for t in texts for p in t.split("\n\n") if 300 < len(p.strip()) < 900]
    tasks = ["Copy the following text exactly, word for word:\n\n{p}",
             "Rewrite the following text with every sentence on its own line, changing no words:\n\n{p}",
             "Fix any typos in the following text and return the whole corrected text:\n\n{p}",
             "Quote the first two sentences of this text exactly:\n\n{p}"]
    reuse = [("reuse", chat_ids(tok, tasks[i % len(tasks)].format(p=paras[(7 * i + 3) % len(paras)])))
             for i in range(n_reuse)]
    opens = ["Explain how a hash table works.", "Write a short story about a lighthouse keeper.",
             "What are the benefits of regular exercise?", "Describe the water cycle for a child."]
    return reuse + [("open", chat_ids(tok, opens[i % len(opens)])) for i in range(n_open)]


def agreement(a: list[int], ref: list[int]) -> float:
    """Positions of the dense answer ``ref`` that ``a`` reproduces (a shorter answer misses the rest)."""
    return sum(x == y for x, y in zip(a, ref)) / len(ref) if ref else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--calibration-dir", help="load the calibrations from here when present, else fit and save them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new_tokens = 32 if args.quick else args.new_tokens
    layers = (16, 24) if args.quick else (12, 16, 20, 24)
    methods = ("none", "ridge") if args.quick else ("none", "ridge", "distill")

    model, tok = skimfx.load_model("smollm2-135m")
    texts = skimfx.reference_texts()
    cals = {}
    for m in methods:
        path = Path(args.calibration_dir) / f"exits_{m}_{'_'.join(map(str, layers))}.safetensors" if args.calibration_dir else None
        if path is not None and path.exists():
            cals[m] = skimfx.ExitCalibration.load(path)
        else:
            cals[m] = skimfx.calibrate_exits(model, texts, layers, method=m, tokenizer=tok,
                                             max_tokens=3000 if args.quick else 8000,
                                             steps=40 if args.quick else 150)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                cals[m].save(path)
        print(cals[m].report(args.target), flush=True)

    # Draft&Verify: which layers a draft may skip (single-layer ablation, then growing prefixes)
    path = Path(args.calibration_dir) / "skip.safetensors" if args.calibration_dir else None
    if path is not None and path.exists():
        skip_cal = skimfx.SkipCalibration.load(path)
    else:
        skip_cal = skimfx.calibrate_skip(model, texts, tokenizer=tok, max_tokens=256 if args.quick else 512,
                                         max_skip=4 if args.quick else 8)
        if path is not None:
            skip_cal.save(path)
    print(skip_cal.report(), flush=True)

    every = 4                                           # calibrate_exits holds out every 4th document
    held = [t for i, t in enumerate(texts) if i % every == every - 1]
    prompts = held_out_prompts(tok, held, 2 if args.quick else 6, 1 if args.quick else 3)
    ids = [p for _, p in prompts]
    kinds = [k for k, _ in prompts]
    top = layers[-1]
    best = "distill" if "distill" in cals else "ridge"
    modes = {
        "dense": None,
        "lookahead (lossless)": SelfSpeculative(draft="lookahead"),
        f"exit L{top} draft, {best} (lossless)": SelfSpeculative(draft="exit", exit_layer=top, calibration=cals[best]),
        f"lookahead + exit L{top} (lossless)": SelfSpeculative(draft="lookahead/exit", exit_layer=top,
                                                               calibration=cals[best]),
    }
    # the calibration keeps every layer when no skipped set pays; the two most redundant layers show why
    forced = skip_cal.skip or tuple(sorted(skip_cal.order[:2]))
    modes[f"skip {'/'.join(map(str, forced))} draft (lossless)"] = SelfSpeculative(draft="skip", skip_layers=forced)
    # lossy: the top exit alone (each exit check costs an LM head, ~8 layers of SmolLM2), and the top two
    for m in methods:
        if m == "none":
            continue
        modes[f"early exit L{top}, {m} @{args.target:.0%}"] = EarlyExit(
            layers=(top,), calibration=cals[m], target_agreement=args.target)
    modes[f"early exit L{layers[-2]}/{top}, {best} @{args.target:.0%}"] = EarlyExit(
        layers=layers[-2:], calibration=cals[best], target_agreement=args.target)

    # every prompt runs through every mode back to back (dense first), so that the machine's drift over the
    # run falls on all modes alike; one prompt at a time (the decoding modes are batch-1)
    # Generation stops at the end of the answer (the model's EOS), as a user's would: the speed is the
    # answer's. Dense runs first and again last for each prompt, and its rate is that of both runs.
    compiled = {name: skimfx.compile(model, recipe, tokenizer=tok) for name, recipe in modes.items()}
    runs = {name: [] for name in modes}
    for i, p in enumerate(ids):
        for name, cm in compiled.items():
            runs[name].append(cm.generate([p], max_new_tokens=new_tokens))
        again = compiled["dense"].generate([p], max_new_tokens=new_tokens)
        assert again.tokens == runs["dense"][-1].tokens
        first = runs["dense"][-1].stats
        first.decode_s += again.stats.decode_s
        first.decode_tokens += again.stats.decode_tokens
        print(f"prompt {i + 1}/{len(ids)} ({kinds[i]}): " + ", ".join(
            f"{name.split(' (')[0]} {runs[name][-1].stats.decode_tokens_per_s / runs['dense'][-1].stats.decode_tokens_per_s:.2f}x"
            for name in modes if name != "dense"), flush=True)
    # per prompt: how much of the dense answer is copied from the prompt (answer tokens that end a 4-gram
    # also found in the prompt) against the lossless modes' speed-up on that prompt
    per_prompt = []
    for i, p in enumerate(ids):
        ans = runs["dense"][i].tokens[0]
        grams = {tuple(p[j:j + 4]) for j in range(len(p) - 3)}
        copied = sum(tuple((p + ans)[len(p) + j - 3:len(p) + j + 1]) in grams for j in range(len(ans))) / len(ans)
        per_prompt.append({"prompt": i + 1, "kind": kinds[i], "prompt_tokens": len(p), "copied": copied,
                           "speedup": {name: runs[name][i].stats.decode_tokens_per_s /
                                       runs["dense"][i].stats.decode_tokens_per_s
                                       for name in modes if name != "dense" and "lossless" in name}})
    rows, ref = [], {}
    for name in modes:
        for kind in ("reuse", "open"):
            outs = [g for g, k in zip(runs[name], kinds) if k == kind]
            toks = [g.tokens[0] for g in outs]
            tps = sum(g.stats.decode_tokens for g in outs) / sum(g.stats.decode_s for g in outs)
            ds = [g.stats.decoding for g in outs if g.stats.decoding is not None]
            drafted, accepted, exits = {}, {}, {}
            for d in ds:
                for k2, v in d.drafted.items():
                    drafted[k2] = drafted.get(k2, 0) + v
                for k2, v in d.accepted.items():
                    accepted[k2] = accepted.get(k2, 0) + v
                for k2, v in d.exits.items():
                    exits[k2] = exits.get(k2, 0) + v
            if name == "dense":
                ref[kind] = (toks, tps)
            row = {"mode": name, "prompts": kind, "decode_tok_s": tps,
                   "agreement": sum(agreement(a, b) for a, b in zip(toks, ref[kind][0])) / len(toks),
                   "layers_per_token": (sum(d.layer_tokens for d in ds) / sum(d.tokens for d in ds)) if ds
                   else float(model.config.num_hidden_layers),
                   "acceptance": {k2: accepted.get(k2, 0) / v for k2, v in drafted.items() if v},
                   "exits": exits}
            row["speedup"] = tps / ref[kind][1]
            rows.append(row)
            print(f"{name:<42} {kind:<5} {row['decode_tok_s']:6.2f} tok/s ({row['speedup']:.2f}x) layers/token "
                  f"{row['layers_per_token']:5.1f} agreement {row['agreement']:.0%} acceptance {row['acceptance']} "
                  f"exits {row['exits']}", flush=True)
    write(cals, skip_cal, rows, per_prompt, args, layers, new_tokens, len(ids), kinds)


def write(cals, skip_cal, rows, per_prompt, args, layers, new_tokens, n_prompts, kinds) -> None:
    cal0 = next(iter(cals.values()))
    lines = ["# Early exit and self-speculation vs dense — SmolLM2-135M-Instruct (fp32, CPU)", "",
             f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}. One run, dense in the "
             f"same process. Calibration text: the license texts in /usr/share/common-licenses, Python's LICENSE and "
             f"standard-library docstrings, every 4th document held out ({cal0.tokens[0]} train / {cal0.tokens[1]} "
             "held-out tokens, teacher-forced).", "",
             f"Top-1 agreement of each exit with the final layer on held-out tokens, and the tokens that exit at the "
             f"threshold reaching {args.target:.0%} agreement:", "",
             "| exit after layer | " + " | ".join(f"agreement {m}" for m in cals) + " | " +
             " | ".join(f"exit share {m} @{args.target:.0%}" for m in cals) + " |",
             "|---:|" + "---:|" * (2 * len(cals))]
    for l in layers:
        agr = [cals[m].agreement[l] for m in cals]
        share = [cals[m].coverage(l, cals[m].threshold(l, args.target)) for m in cals]
        lines.append(f"| {l} | " + " | ".join(f"{a:.1%}" for a in agr) + " | " + " | ".join(f"{s:.1%}" for s in share)
                     + " |")
    fit = ", ".join(f"{m} {c.seconds:.0f} s" for m, c in cals.items())
    lines += ["", f"Calibration time (hidden states + fit + held-out curves): {fit}.", "",
              "Layer skipping (Draft&Verify), `skimfx.calibrate_skip` on the start of the same text: top-1 agreement "
              "with the full model when the most redundant layers (single-layer ablation, best first) are skipped "
              "together, and the modelled speed-up of drafting with them (best k, one full verification per step):", "",
              *skip_cal.report().splitlines()[1:], "",
              f"Decoding, greedy, up to {new_tokens} new tokens stopping at the answer's end (EOS), "
              f"{kinds.count('reuse')} context-reuse prompts (copy / re-line / "
              f"fix typos / quote a held-out paragraph) and {kinds.count('open')} open prompts, one at a time, each "
              "prompt through every mode back to back (dense first and again last; its rate counts both runs): "
              "decode tokens/s and its ratio to dense on the same prompts, layer evaluations per emitted token "
              "(draft and verification passes, rejected drafts included; dense = 30), agreement with the dense "
              "answer position by position (a shorter answer misses the rest), draft acceptance per source.", "",
              "| mode | prompts | decode tok/s | × dense | layers / token | agreement | acceptance | exits per layer |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        acc = ", ".join(f"{k} {v:.0%}" for k, v in r["acceptance"].items()) or "-"
        ex = ", ".join(f"{k}: {v}" for k, v in sorted(r["exits"].items())) or "-"
        lines.append(f"| {r['mode']} | {r['prompts']} | {r['decode_tok_s']:.2f} | {r['speedup']:.2f} | "
                     f"{r['layers_per_token']:.1f} | {r['agreement']:.0%} | {acc} | {ex} |")
    names = list(per_prompt[0]["speedup"])
    lines += ["", "Per prompt: the share of the dense answer copied from the prompt (answer tokens ending a 4-gram that "
              "also occurs in the prompt) and each lossless mode's speed-up on that prompt:", "",
              "| prompt | kind | prompt tokens | answer copied | " + " | ".join(n.replace(" (lossless)", "") for n in names)
              + " |", "|---:|---|---:|---:|" + "---:|" * len(names)]
    for r in per_prompt:
        lines.append(f"| {r['prompt']} | {r['kind']} | {r['prompt_tokens']} | {r['copied']:.0%} | "
                     + " | ".join(f"{r['speedup'][n]:.2f}" for n in names) + " |")
    save("exit", lines, {
        "per_prompt": per_prompt,
        "calibration": {m: {"agreement": c.agreement, "raw_agreement": c.raw_agreement,
                            "threshold": {l: c.threshold(l, args.target) for l in layers},
                            "seconds": c.seconds, "tokens": c.tokens} for m, c in cals.items()},
        "skip_calibration": {"order": skip_cal.order, "ablation": skip_cal.ablation, "agreement": skip_cal.agreement,
                             "expected": skip_cal.expected, "skip": skip_cal.skip, "seconds": skip_cal.seconds},
        "decoding": rows})
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("reuse", "o"), ("open", "s")):
        for r in rows:
            if r["prompts"] != kind:
                continue
            ax.scatter(r["speedup"], 100 * r["agreement"], marker=marker,
                       color="black" if r["mode"] == "dense" else None)
            ax.annotate(f"{r['mode']} ({kind})", (r["speedup"], 100 * r["agreement"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel("decode speed vs dense")
    ax.set_ylabel("tokens equal to dense (%)")
    ax.set_title("early exit / self-speculation on SmolLM2-135M (o: context reuse, s: open)")
    save_figure(plt, fig, "exit")


if __name__ == "__main__":
    main()
