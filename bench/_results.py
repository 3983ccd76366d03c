"""Shared by the benchmark scripts: write a result table (markdown + json), load a model (the embedded
one, or its architecture with random weights), get pyplot if installed."""
from __future__ import annotations

import json
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def save(stem: str, lines: list[str], data, out: str | Path | None = None) -> None:
    """<out>/<stem>.md (the table, also printed) and <stem>.json (the raw rows); out: bench/results."""
    out = Path(out) if out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    print("\n".join(lines))


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
