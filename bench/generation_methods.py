"""Generation-time methods vs their baselines on SmolLM2-135M-Instruct (``--model``: another embedded model), each baseline in the same process.

1. short-m@k (Hassid et al. 2025): k=8 sampled answers sharing one prefill, the first m=3 to finish vote,
   against majority voting over all 8 (majority@8), short-1@8 and one greedy answer. Task with a checkable
   answer: small additions ("What is 7 + 5?") and retrieval of one of three numbers from the prompt
   ("Anna's number is 47, ... What is Ben's number?"); the answer is the last number of the text. Per
   method: accuracy, tokens sampled over all chains, wall time.
2. Activation-Steered Compression (Azizi et al. 2025): the steering vector from 100 (quick: 20) pairs of
   verbose / concise answers to such questions (built from templates, drawn with another seed than the evaluation
   questions), alpha chosen under a KL bound, the layer chosen on validation questions (a third seed); answer
   length (tokens to EOS) and accuracy, greedy, steered vs dense.
3. Sorted sub-models (Truncate): the first k layers + the head, raw (the model's own norm and head on layer
   k-1) and through a ridge exit adapter (``calibrate_exits``), vs the full model: perplexity and top-1
   agreement with the full model on held-out text, and decode tokens/s.
4. Hogwild! (Rodionov et al. 2025): 2 and 4 workers over one shared cache vs one worker (which is dense
   generation of the same prompt), greedy, on tasks made of independent parts (four short questions in one
   prompt): wall time, decode steps, tokens, and how many parts the text answers.

Every number comes from this run. Wall-clock numbers depend on the machine's load; accuracy, agreement,
perplexity, token counts do not.

    python bench/generation_methods.py                 # all four, full size (about an hour on 2 idle cores)
    python bench/generation_methods.py --quick         # a smoke run: few questions, two depths
    python bench/generation_methods.py --only shortmk  # one of shortmk, steer, truncate, hogwild

Writes bench/results/generation_<method>.md and .json.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

import skimfx
from _results import RESULTS, save
from skimfx import Hogwild, ShortMK, Steer, Truncate, hogwild_prompt
from skimfx.eval import chat_ids
from skimfx.recipes.generation import last_number

MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct",
               "gemma3-270m": "Gemma 3 270M"}


def stem(args, name: str) -> str:
    """Result file name: the method's, plus the model's when it is not the default one."""
    return name if args.model == "smollm2-135m" else f"{name}_{args.model}"


NAMES = ["Anna", "Ben", "Carl", "Dora", "Emil", "Fay", "Gus", "Hana", "Ivan", "Jill", "Kurt", "Lena"]


def questions(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(kind, question, answer): additions of two numbers up to 12, and retrieval of one of three numbers."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            out.append(("add", f"What is {a} + {b}? Answer with the number.", str(a + b)))
        else:
            who = rng.sample(NAMES, 3)
            nums = rng.sample(range(10, 99), 3)
            j = rng.randrange(3)
            facts = ", ".join(f"{w}'s number is {x}" for w, x in zip(who, nums))
            out.append(("recall", f"{facts}. What is {who[j]}'s number?", str(nums[j])))
    return out


def steering_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(question, verbose answer, concise answer) over the same kinds of question (other numbers and names): the
    same content at two lengths, so that their difference is the verbosity (a bare number as the concise side
    would also carry "a number, not a sentence")."""
    pairs = []
    for kind, q, ans in questions(n, seed):
        if kind == "add":
            a, b = q.split("What is ")[1].split("?")[0].split(" + ")
            verbose = (f"Let's work this out step by step. We need to add {a} and {b}. Starting from {a} and "
                       f"counting up {b} more, we reach {ans}. We can check it: {ans} minus {b} is {a}, so the sum "
                       f"is right. Therefore, the final answer is {ans}.")
            concise = f"{a} + {b} = {ans}."
        else:
            who = q.split("What is ")[1].split("'s")[0]
            verbose = (f"To answer this question, I need to look carefully at the information given. The text lists "
                       f"three people and their numbers. Reading through the list, I find {who}, and the number "
                       f"given for {who} is {ans}. The other numbers belong to other people, so they are not "
                       f"relevant here. So, {who}'s number is {ans}.")
            concise = f"{who}'s number is {ans}."
        pairs.append((q, verbose, concise))
    return pairs


def correct(text: str, answer: str) -> bool:
    return last_number(text) == answer


def bench_shortmk(model, tok, args) -> None:
    n = 6 if args.quick else args.questions
    new = 48 if args.quick else 96
    qs = questions(n, seed=1)
    prompts = [chat_ids(tok, q) for _, q, _ in qs]
    configs = {"greedy (1 answer)": skimfx.compile(model, tokenizer=tok),
               "majority@8": skimfx.compile(model, ShortMK(k=8, m=8), tokenizer=tok),
               "short-3@8": skimfx.compile(model, ShortMK(k=8, m=3), tokenizer=tok),
               "short-1@8": skimfx.compile(model, ShortMK(k=8, m=1), tokenizer=tok)}
    rows = {name: dict(method=name, correct=0, tokens=0, seconds=0.0, per_kind={}) for name in configs}
    configs["greedy (1 answer)"].generate(prompts[0], max_new_tokens=4)           # warm-up
    for i, (p, (kind, _, ans)) in enumerate(zip(prompts, qs)):
        for name, cm in configs.items():
            t0 = time.perf_counter()
            if name.startswith("greedy"):
                g = cm.generate(p, max_new_tokens=new)
                tokens = len(g.tokens[0])
            else:       # the same seed per question: every voting rule sees the same 8 chains (as far as it runs them)
                g = cm.generate(p, max_new_tokens=new, temperature=args.temperature, top_p=args.top_p, seed=100 + i)
                tokens = g.votes[0].tokens_generated
            dt = time.perf_counter() - t0
            ok = correct(tok.decode(g.tokens[0], skip_special_tokens=True), ans)
            r = rows[name]
            r["correct"] += ok
            r["tokens"] += tokens
            r["seconds"] += dt
            k = r["per_kind"].setdefault(kind, [0, 0])
            k[0] += ok
            k[1] += 1
    base = rows["majority@8"]
    lines = [f"# short-m@k vs majority voting — {args.model_name} ({n} questions{', quick run' if args.quick else ''})",
             "", f"k = 8 chains sampled at temperature {args.temperature} (top-p {args.top_p}), up to {new} new tokens "
             "each, over one shared "
             "prefill; the first m to finish vote on the last number of their text (ties: the shortest chain). "
             "Half the questions are additions of two numbers up to 12, half recall one of three numbers given in "
             "the prompt. The same seed per question for every voting rule, so short-m@8 runs a prefix of "
             "majority@8's chains.", "",
             "| method | accuracy | addition | recall | tokens sampled | tokens vs majority@8 | wall s | wall vs "
             "majority@8 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        kinds = {k: v[0] / v[1] for k, v in r["per_kind"].items()}
        r["accuracy"] = r["correct"] / n
        lines.append(f"| {r['method']} | {r['accuracy']:.0%} | {kinds.get('add', float('nan')):.0%} | "
                     f"{kinds.get('recall', float('nan')):.0%} | {r['tokens']} | {r['tokens'] / base['tokens']:.2f} | "
                     f"{r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} |")
    lines += ["", f"Accuracy over {n} questions of a small model is noisy: one question moves it by {1 / n:.0%}. "
              "Wall time is measured on a shared CPU (load from other processes varies during the run); the "
              "token counts do not depend on it."]
    save(stem(args, "generation_shortmk"), lines, {"rows": list(rows.values()), "questions": n, "max_new_tokens": new,
                                       "temperature": args.temperature, "top_p": args.top_p}, args.out)


def _answers(cm, tok, qs, new: int) -> dict:
    """Greedy answers to ``qs``: mean length in tokens, accuracy, share ended by EOS, lengths."""
    lengths, ok, stopped = [], 0, 0
    for _, q, ans in qs:
        g = cm.generate(chat_ids(tok, q), max_new_tokens=new)
        lengths.append(len(g.tokens[0]))
        ok += correct(tok.decode(g.tokens[0], skip_special_tokens=True), ans)
        stopped += g.finish_reasons[0] == "stop"
    return dict(mean_tokens=sum(lengths) / len(qs), accuracy=ok / len(qs), stopped=stopped / len(qs),
                lengths=lengths)


def bench_steer(model, tok, args) -> None:
    """The layer is chosen on validation questions (another seed than both the pairs and the test questions):
    among the candidate layers, the shortest answers whose validation accuracy is at least dense's (else the
    most accurate); then dense and the chosen steering answer the test questions."""
    n_pairs = 20 if args.quick else 100
    n = 6 if args.quick else args.questions
    n_val = 6 if args.quick else args.questions       # as many as the test: 12 chose a layer that did not transfer
    new = 48 if args.quick else 96
    L = model.config.num_hidden_layers
    layers = [args.steer_layer] if args.steer_layer is not None else sorted({L // 6, L // 3, L // 2, 2 * L // 3})
    dense = skimfx.compile(model, tokenizer=tok)
    val_qs = questions(n_val, seed=3)
    val_dense = _answers(dense, tok, val_qs, new)
    t0 = time.perf_counter()
    tried = []
    for layer in layers:
        cal = skimfx.calibrate_steering(model, steering_pairs(n_pairs, seed=7), tokenizer=tok, layer=layer,
                                        kl_bound=args.kl_bound, kl_pairs=8 if args.quick else 32)
        val = _answers(skimfx.compile(model, Steer(steering=cal), tokenizer=tok), tok, val_qs, new)
        tried.append((cal, val))
        print(f"layer {layer}: alpha {cal.alpha:.3g}, validation {val['mean_tokens']:.1f} tokens "
              f"(dense {val_dense['mean_tokens']:.1f}), accuracy {val['accuracy']:.0%} ({val_dense['accuracy']:.0%})",
              flush=True)
    cal_s = time.perf_counter() - t0
    ok = [t for t in tried if t[1]["accuracy"] >= val_dense["accuracy"]]
    cal, _ = min(ok, key=lambda t: t[1]["mean_tokens"]) if ok else max(tried, key=lambda t: t[1]["accuracy"])
    qs = questions(n, seed=1)
    rows = [dict(mode="dense", **_answers(dense, tok, qs, new)),
            dict(mode=f"steered after layer {cal.layer} (alpha {cal.alpha:.3g})",
                 **_answers(skimfx.compile(model, Steer(steering=cal), tokenizer=tok), tok, qs, new))]
    lines = [f"# Activation-Steered Compression — {args.model_name} ({n} questions{', quick run' if args.quick else ''})",
             "", f"Steering vectors from {cal.pairs} (verbose, concise) answer pairs (the same answer as one sentence and "
             f"as a paragraph), one per candidate layer; alpha for each chosen for a mean next-token KL of at most "
             f"{cal.kl_bound} nats to the unsteered model. The layer is chosen on {n_val} validation questions (a "
             "third seed): the shortest answers at no loss of validation accuracy. Chosen: layer "
             f"{cal.layer}, alpha {cal.alpha:.3g} (measured KL {cal.kl:.4f} nats"
             f"{'' if cal.bound_reached else '; the bound was not reached below max_alpha'}); |alpha v| = "
             f"{cal.alpha * float(cal.vector.norm()):.3g} against a residual norm of {cal.norm:.3g}. Calibration and "
             f"layer choice: {cal_s:.0f} s. Greedy answers, up to {new} new tokens, on {n} test questions.", "",
             "| mode | mean answer tokens | answer tokens vs dense | accuracy | ended by EOS |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['mean_tokens']:.1f} | {r['mean_tokens'] / rows[0]['mean_tokens']:.2f} | "
                     f"{r['accuracy']:.0%} | {r['stopped']:.0%} |")
    lines += ["", f"Layer choice (validation, dense: {val_dense['mean_tokens']:.1f} tokens, accuracy "
              f"{val_dense['accuracy']:.0%}):", "",
              "| layer | alpha | KL (nats) | validation tokens vs dense | validation accuracy |", "|---:|---:|---:|---:|---:|"]
    for c, v in tried:
        lines.append(f"| {c.layer} | {c.alpha:.3g} | {c.kl:.4f} | {v['mean_tokens'] / val_dense['mean_tokens']:.2f} | "
                     f"{v['accuracy']:.0%} |")
    lines += ["", "KL by alpha at the chosen layer (mean over the calibration positions): "
              + ", ".join(f"{a:.3g}: {k:.4f}" for a, k in cal.curve) + ".",
              "", f"Accuracy over {n} questions of a small model is noisy: one question moves it by {1 / n:.0%}."]
    save(stem(args, "generation_steer"), lines, {"rows": rows, "layer": cal.layer, "alpha": cal.alpha, "kl": cal.kl,
                                     "kl_bound": cal.kl_bound, "curve": cal.curve, "pairs": cal.pairs,
                                     "calibration_s": cal_s, "validation_dense": val_dense,
                                     "layers": [dict(layer=c.layer, alpha=c.alpha, kl=c.kl, **v) for c, v in tried]},
         args.out)


def _quality(cm, full, docs: list[list[int]]) -> tuple[float, float]:
    """(perplexity, top-1 agreement with the full model) over teacher-forced documents."""
    nll, agree, n = 0.0, 0, 0
    for ids in docs:
        x = torch.tensor([ids])
        logits = cm(x).logits[0, :-1].float()
        ref = full(x).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        n += len(ids) - 1
    return math.exp(nll / n), agree / n


def bench_truncate(model, tok, args) -> None:
    L = model.config.num_hidden_layers
    depths = (16, 24) if args.quick else (8, 12, 16, 20, 24, 28)
    texts = skimfx.reference_texts()
    cal = skimfx.calibrate_exits(model, texts, layers=[d - 1 for d in depths], method="ridge", tokenizer=tok,
                                 max_tokens=1500 if args.quick else 6000)
    every = 4                                   # calibrate_exits holds out every 4th document (held_out=0.25)
    held = texts[every - 1::every]
    docs, total = [], 0
    for t in held:
        ids = tok(t[:4000], add_special_tokens=False).input_ids[:256]
        if len(ids) >= 64:
            docs.append(ids)
            total += len(ids)
        if total >= (600 if args.quick else 3000):
            break
    full = skimfx.compile(model, tokenizer=tok)
    prompt = chat_ids(tok, "Explain how a hash table works.")
    new = 16 if args.quick else 64

    def speed(cm) -> float:
        cm.generate(prompt, max_new_tokens=4, stop_tokens=[])
        g = cm.generate(prompt, max_new_tokens=new, stop_tokens=[])
        return g.stats.decode_tokens_per_s

    ppl_full, _ = _quality(full, full, docs)
    rows = [dict(layers=L, head="full model", ppl=ppl_full, agreement=1.0, tok_s=speed(full))]
    for d in depths:
        for head, c in (("raw", None), ("ridge adapter", cal)):
            cm = skimfx.compile(model, Truncate(layers=d, calibration=c), tokenizer=tok)
            ppl, agr = _quality(cm, full, docs)
            rows.append(dict(layers=d, head=head, ppl=ppl, agreement=agr, tok_s=speed(cm) if c is not None else None))
    lines = [f"# Sorted sub-models (Truncate) — {args.model_name}{' (quick run)' if args.quick else ''}", "",
             f"The first k of {L} layers and the model's own final norm and LM head, on layer k-1's state directly "
             f"(raw) or through a ridge exit adapter fitted by calibrate_exits on {cal.tokens[0]} training tokens. "
             f"Perplexity and top-1 agreement with the full model on {total} held-out tokens ({len(docs)} documents "
             f"the adapters were not fitted on); decode tokens/s for {new} greedy tokens after a short chat prompt "
             "(shared CPU: indicative).", "",
             "| layers | head | perplexity | top-1 agreement with full | decode tok/s |", "|---:|---|---:|---:|---:|"]
    for r in rows:
        tps = "" if r["tok_s"] is None else f"{r['tok_s']:.1f}"
        lines.append(f"| {r['layers']} | {r['head']} | {r['ppl']:.1f} | {r['agreement']:.1%} | {tps} |")
    save(stem(args, "generation_truncate"), lines, {"rows": rows, "held_out_tokens": total, "train_tokens": cal.tokens[0]},
         args.out)


PARTS = [("What is the capital of France?", ("paris",)), ("What colour is a clear daytime sky?", ("blue",)),
         ("How many legs does a dog have?", ("4", "four")), ("What is 2 + 3?", ("5", "five")),
         ("What is the opposite of hot?", ("cold",)), ("Which animal says moo?", ("cow",)),
         ("What is frozen water called?", ("ice",)), ("How many days are in a week?", ("7", "seven"))]


def bench_hogwild(model, tok, args) -> None:
    n_tasks = 1 if args.quick else 4
    new = 32 if args.quick else 96
    tasks = [[PARTS[(4 * t + j) % len(PARTS)] for j in range(4)] for t in range(n_tasks)]
    rows = []
    for workers in (1, 2, 4):
        cm = skimfx.compile(model, Hogwild(workers=workers), tokenizer=tok)
        cm.generate(chat_ids(tok, "Hi"), max_new_tokens=2, stop_tokens=[])          # warm-up
        r = dict(workers=workers, seconds=0.0, steps=0, tokens=0, answered=0, parts=0)
        for parts in tasks:
            task = "Answer these questions:\n" + "\n".join(f"{i + 1}. {q}" for i, (q, _) in enumerate(parts))
            ids = chat_ids(tok, hogwild_prompt(task, workers))
            t0 = time.perf_counter()
            g = cm.generate(ids, max_new_tokens=new)
            r["seconds"] += time.perf_counter() - t0
            r["steps"] += g.steps[0] + 1
            r["tokens"] += sum(map(len, g.workers[0]))
            text = tok.decode(g.tokens[0], skip_special_tokens=True).lower()
            r["answered"] += sum(any(a in text for a in answers) for _, answers in parts)
            r["parts"] += len(parts)
        rows.append(r)
    base = rows[0]
    lines = [f"# Hogwild! workers over one shared cache — {args.model_name} ({n_tasks} task"
             f"{'s' if n_tasks > 1 else ''}{', quick run' if args.quick else ''})", "",
             f"Each task asks four short questions in one prompt, wrapped in the instructions that tell the workers "
             f"about each other; greedy, up to {new} new tokens per worker, stopping at EOS. One worker is dense "
             "generation of the same prompt (tested equal). Steps: forward passes after the prompt (all workers step "
             "together in one batch); parts answered: the expected word appears anywhere in the workers' text.", "",
             "| workers | wall s | wall vs 1 worker | decode steps | tokens (all workers) | parts answered |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} | {r['steps']} | "
                     f"{r['tokens']} | {r['answered']}/{r['parts']} |")
    lines += ["", "The paper's workers are reasoning models of 32B parameters and more; whether a 135M model splits "
              "the work shows in the parts answered. Wall time is measured on a shared CPU."]
    save(stem(args, "generation_hogwild"), lines, {"rows": rows, "tasks": n_tasks, "max_new_tokens": new}, args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few questions, two depths")
    ap.add_argument("--only", choices=("shortmk", "steer", "truncate", "hogwild"), action="append")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling for short-m@k's chains")
    ap.add_argument("--kl-bound", type=float, default=0.2)
    ap.add_argument("--steer-layer", type=int, default=None, help="one layer instead of choosing among L/6, L/3, "
                    "L/2, 2L/3 on validation questions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model; another than smollm2-135m writes "
                    "generation_<method>_<model>.{md,json}")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    args.model_name = MODEL_NAMES.get(args.model, args.model)
    torch.set_num_threads(args.threads)
    model, tok = skimfx.load_model(args.model)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run = {"shortmk": bench_shortmk, "steer": bench_steer, "truncate": bench_truncate, "hogwild": bench_hogwild}
    for name in args.only or run:
        run[name](model, tok, args)


if __name__ == "__main__":
    main()
