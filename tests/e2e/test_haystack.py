"""Needle-in-a-haystack prompts over the essays: exact length, one needle at the asked depth, the
question where the format puts it, seeded, and the same needles in every format."""
import pytest

from skimfx.eval.haystack import niah_prompts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("question_first", [False, True])
@pytest.mark.parametrize("answer_prefix", [False, True])
def test_prompt_layout(smollm2, question_first, answer_prefix):
    _, tok = smollm2
    ps = niah_prompts(tok, 1200, depths=(0.0, 0.5, 1.0), per_depth=2, seed=3, question_first=question_first,
                      answer_prefix=answer_prefix)
    assert len(ps) == 6
    for p in ps:
        assert len(p.ids) == 1200                       # the template, needle and haystack fill it exactly
        text = tok.decode(p.ids)
        assert text.count(p.answer) == 1                # one needle, never in the question or prefix
        city = text.split("What is the special magic number for ")[1].split(" ")[0]
        needle_at = text.index(f"The special magic number for {city} is: {p.answer}")
        question_at = text.index("What is the special magic number")
        assert (question_at < needle_at) == question_first
        assert text.rstrip().endswith("mentioned in the provided text is") == answer_prefix
    # the needle's depth in the haystack follows the asked depth
    pos = [tok.decode(p.ids).index(p.answer) for p in ps]
    assert pos[0] < pos[2] < pos[4] and pos[1] < pos[3] < pos[5]


def test_seeded_and_shared_across_formats(smollm2):
    _, tok = smollm2
    a = niah_prompts(tok, 800, depths=(0.3,), per_depth=3, seed=5)
    b = niah_prompts(tok, 800, depths=(0.3,), per_depth=3, seed=5)
    c = niah_prompts(tok, 800, depths=(0.3,), per_depth=3, seed=6)
    d = niah_prompts(tok, 800, depths=(0.3,), per_depth=3, seed=5, question_first=True, answer_prefix=False)
    assert [p.ids for p in a] == [p.ids for p in b] != [p.ids for p in c]
    assert [p.answer for p in a] == [p.answer for p in d]
    assert len({p.answer for p in a}) == 3


def test_correct_reads_the_answer(smollm2):
    _, tok = smollm2
    p = niah_prompts(tok, 600, depths=(0.5,), per_depth=1)[0]
    assert p.correct(tok, tok(f" {p.answer}.", add_special_tokens=False).input_ids)
    assert not p.correct(tok, tok(" 1234567.", add_special_tokens=False).input_ids) or p.answer == "1234567"


def test_bad_arguments(smollm2):
    _, tok = smollm2
    with pytest.raises(ValueError, match="at least 256"):
        niah_prompts(tok, 100)
    with pytest.raises(ValueError, match="depths"):
        niah_prompts(tok, 1000, depths=(1.5,))


@pytest.mark.parametrize("task", ["niah", "ruler_niah_single_1"])
def test_skimfx_eval_runs_the_long_context_tasks(smollm2, tmp_path, task):
    """``skimfx eval --task niah`` / ``ruler_*``: dense and a recipe scored on the same prompts."""
    from skimfx.eval import evaluate

    model, tok = smollm2
    rows = evaluate(model, tok, ["snapkv:budget=0.5"], task, length=700, n_prompts=2, out_dir=tmp_path)
    assert len(rows) == 2 and rows[0]["recipe"] == "dense" and rows[1]["recipe"] != "dense"
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert rows[0]["accuracy"] > 0                # the small model finds a needle at 700 tokens
    assert (tmp_path / f"eval_{task}.md").exists()
