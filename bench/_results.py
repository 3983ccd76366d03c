"""Shared by the benchmark scripts: write a result table (markdown + json) with the provenance of the run,
publish it into its section of docs/benchmarks.md, load a model (the embedded one, or its architecture
with random weights), get pyplot if installed."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PAGES = (DOC, ROOT / "docs" / "gpu.md", ROOT / "README.md")      # pages with script-owned sections
PROVENANCE = "Provenance:"


def warm_up(model, tok, ids: list[int]) -> None:
    """One dense prefill of ``ids``: the first prefill of a length in a process pays for allocating its
    buffers, so the row measured first (usually dense) would otherwise be the slower for it."""
    import skimfx

    skimfx.compile(model, tokenizer=tok).generate([ids], max_new_tokens=1)


def provenance() -> dict:
    """What produced a result: commit (``+dirty`` with uncommitted changes), library versions, machine."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    # uncommitted changes to code (results and the pages they are published into do not count)
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!docs", ":!README.md"):
        commit += "+dirty"
    try:
        import triton
        triton_v = triton.__version__
    except Exception:                        # not installed, or a broken install
        triton_v = "none"
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(commit=commit, date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), python=platform.python_version(),
                torch=torch.__version__, triton=triton_v, transformers=transformers.__version__,
                machine=f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
                        + (f"; {gpu}" if gpu else ""),
                command="python " + " ".join([Path(sys.argv[0]).name if sys.argv[0] else "?"] + sys.argv[1:]))


def provenance_line(p: dict | None = None) -> str:
    p = p or provenance()
    return (f"{PROVENANCE} `{p['command']}` at commit {p['commit']} on {p['date']}; torch {p['torch']}, triton "
            f"{p['triton']}, transformers {p['transformers']}, Python {p['python']}; {p['machine']}.")


def save(stem: str, lines: list[str], data, out: str | Path | None = None) -> None:
    """<out>/<stem>.md (the table, also printed, with the run's provenance) and <stem>.json (the raw rows
    and the provenance); out: bench/results, whose tables are also published into docs/benchmarks.md."""
    out = Path(out) if out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n\n" + provenance_line(prov) + "\n")
    if isinstance(data, dict):
        data = {**data, "provenance": prov}
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    print("\n".join(lines))
    if out.resolve() == RESULTS.resolve():
        publish(stem)


def finish(stem: str, out: str | Path | None = None) -> None:
    """For scripts that write <stem>.md themselves: append the run's provenance, then publish it."""
    out = Path(out) if out is not None else RESULTS
    md = out / f"{stem}.md"
    text = md.read_text().rstrip("\n")
    md.write_text(text + "\n\n" + provenance_line() + "\n")
    if out.resolve() == RESULTS.resolve():
        publish(stem)


# -- docs/benchmarks.md: each result owns a marked section, rewritten from bench/results/<stem>.md -------------
def _markers(stem: str) -> tuple[str, str]:
    return f"<!-- bench:{stem} -->", f"<!-- /bench:{stem} -->"


def section_text(stem: str) -> str:
    """The published form of bench/results/<stem>.md: its headings demoted under the page's, links to the
    plots next to it, and a note when the run recorded no provenance."""
    md = (RESULTS / f"{stem}.md").read_text().rstrip("\n")
    md = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 1, 6) + " ", md, flags=re.M)
    if PROVENANCE not in md:
        md += ("\n\n" + PROVENANCE + " not recorded (this result was produced before results recorded their "
               "commit and machine; re-run the script to refresh it).")
    plots = sorted(p.name for p in RESULTS.glob(f"{stem}*.png"))
    for name in plots:
        md += f"\n\n![{name}](../bench/results/{name})"
    return md


def publish(stem: str, pages=PAGES) -> int:
    """Rewrite the section of ``stem`` (between its markers) in every page that has one, from
    bench/results/<stem>.md; returns how many pages had it."""
    done = 0
    for doc in pages:
        if not doc.exists():
            continue
        text = doc.read_text()
        span = section_span(text, stem)
        if span is None:
            continue
        doc.write_text(text[:span[0]] + "\n" + section_text(stem) + "\n" + text[span[1]:])
        done += 1
    return done


def section_span(text: str, stem: str) -> tuple[int, int] | None:
    """Where the body of ``stem``'s section lies in a page's ``text`` (between its markers), or None."""
    start, end = _markers(stem)
    if start not in text or end not in text:
        return None
    return text.index(start) + len(start), text.index(end)


def sections(doc: Path) -> list[str]:
    """The stems that ``doc`` has sections for, in page order."""
    return re.findall(r"<!-- bench:([\w.-]+) -->", doc.read_text()) if doc.exists() else []


# The embedded models' architectures, for random-weight runs (values from their GGUF configs): speed does not
# depend on the weights, so a GPU machine without the GGUF packages still measures the real shapes.
SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                                         rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "gemma3-270m": ("Gemma3TextConfig", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                             num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=256, max_position_embeddings=32768, sliding_window=512,
                                             query_pre_attn_scalar=256)),
}


def load_model(name: str, random_weights: bool, device: str, dtype: torch.dtype):
    """``(model, tokenizer)``: the embedded model, or (``random_weights``) its architecture with seeded
    random weights and no tokenizer."""
    import skimfx

    if not random_weights:
        return skimfx.load_model(name, dtype=dtype, device=device)
    import transformers as tf

    cls, kw = SHAPES[name]
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(getattr(tf, cls)(**kw), dtype=dtype).to(device).eval(), None


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two generations agree, over the shorter one."""
    n = min(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else float("nan")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, stem: str) -> None:
    """bench/results/<stem>.png."""
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    plt.close(fig)


def delta_calibration(path: str, dense, tok) -> "skimfx.DeltaCalibration":
    """The calibrated DELTA placement: loaded from ``path``, or made and saved there. Made on two 4k passkey
    prompts of seeds 101 and 102, held out from every measured prompt (attention_share.py uses seed 1,
    sparse.py and delta_placement.py seeds 0 and 11), 10% budget."""
    import skimfx
    from skimfx.eval import passkey_prompts

    if Path(path).exists():
        return skimfx.DeltaCalibration.load(path)
    prompts = [passkey_prompts(tok, 4096, depths=(0.5,), keys_per_depth=1, seed=s)[0].ids for s in (101, 102)]
    cal = skimfx.calibrate_delta(dense, prompts, budget=0.1, steps=16)
    cal.save(path)
    print(cal.report(), flush=True)
    return cal
