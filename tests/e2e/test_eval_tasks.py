"""Evaluation tasks: seeded generators whose answers are in the prompt, scoring, and perplexity /
agreement measures that separate dense from an aggressive recipe."""
import pytest

import skimfx
from skimfx.eval import passkey_prompts
from skimfx.eval.agreement import agreement
from skimfx.eval.perplexity import perplexity
from skimfx.eval.synthetic import SYNTHETIC, Example, score

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("task", list(SYNTHETIC))
def test_synthetic_tasks_are_seeded_and_answerable(smollm2, task):
    _, tok = smollm2
    a = SYNTHETIC[task](tok, 600, n=3, seed=1)
    b = SYNTHETIC[task](tok, 600, n=3, seed=1)
    c = SYNTHETIC[task](tok, 600, n=3, seed=2)
    assert [e.ids for e in a] == [e.ids for e in b] and [e.ids for e in a] != [e.ids for e in c]
    for e in a:
        text = tok.decode(e.ids)
        assert all(ans in text for ans in e.answers)          # every answer is in the context
        assert 450 <= len(e.ids) <= 900


def test_score_counts_answers_found(smollm2):
    _, tok = smollm2
    ex = Example(ids=[], answers=("AB", "CD"))
    assert score(tok, ex, tok("AB and cd").input_ids) == 1.0
    assert score(tok, ex, tok("only AB").input_ids) == 0.5
    assert score(tok, ex, tok("nothing").input_ids) == 0.0


def test_passkey_needle_positions(smollm2):
    _, tok = smollm2
    for p in passkey_prompts(tok, 500, depths=(0.0, 1.0), keys_per_depth=1):
        assert p.key_spans and all(tok.decode(p.ids[a:b]).strip() == p.key for a, b in p.key_spans)


def test_perplexity_and_agreement_separate_dense_from_heavy_pruning(smollm2, smollm2_compiled):
    model, tok = smollm2
    heavy = skimfx.compile(model, "promptdistill:layers=1,keep=16", tokenizer=tok)
    dense_ppl = perplexity(smollm2_compiled.program, tok, context_tokens=300, continuation_tokens=32)
    heavy_ppl = perplexity(heavy.program, tok, context_tokens=300, continuation_tokens=32)
    assert 1.0 < dense_ppl < 50 and heavy_ppl > dense_ppl
    ids = [p.ids for p in passkey_prompts(tok, 300, depths=(0.5,), keys_per_depth=2)]
    same = agreement(smollm2_compiled.program, smollm2_compiled.program, ids, n_tokens=8)
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-6
    diff = agreement(smollm2_compiled.program, heavy.program, ids, n_tokens=8)
    assert diff["top1"] < 1.0 and diff["kl"] > 0.01


def test_essay_perplexity_windows_and_errors(smollm2, smollm2_compiled):
    """The long text: windows spread over the essays; one window equals the single-window call; a context
    longer than the license says to use the essays; bad arguments are clear errors."""
    import math

    from skimfx.eval.perplexity import text_ids

    model, tok = smollm2
    p = smollm2_compiled.program
    one = perplexity(p, tok, context_tokens=400, continuation_tokens=16, text="essays")
    three = perplexity(p, tok, context_tokens=400, continuation_tokens=16, text="essays", windows=3)
    assert 1.0 < one < 100 and 1.0 < three < 100 and one != three        # other windows, other tokens
    heavy = skimfx.compile(model, "promptdistill:layers=1,keep=16", tokenizer=tok)
    assert perplexity(heavy.program, tok, context_tokens=400, continuation_tokens=16, text="essays", windows=3) > three
    assert len(text_ids(tok, "essays")) > 50_000
    too_long = len(text_ids(tok, "license")) + 1
    with pytest.raises(ValueError, match="text='essays' is longer"):
        perplexity(p, tok, context_tokens=too_long)
    with pytest.raises(ValueError, match="unknown text 'novel'"):
        perplexity(p, tok, context_tokens=100, text="novel")
    with pytest.raises(ValueError, match="windows=0"):
        perplexity(p, tok, context_tokens=100, windows=0)
    assert not math.isnan(one)


def test_eval_task_perplexity_essays(smollm2, tmp_path):
    from skimfx.eval import evaluate

    model, tok = smollm2
    rows = evaluate(model, tok, ["streamingllm:recent=64"], "perplexity_essays", length=600, n_prompts=2,
                    out_dir=tmp_path)
    assert [r["recipe"] for r in rows][0] == "dense" and len(rows) == 2
    assert rows[0]["prompt_tokens"] == 600 and rows[1]["perplexity"] > rows[0]["perplexity"] > 1.0
    assert (tmp_path / "eval_perplexity_essays.md").exists()
