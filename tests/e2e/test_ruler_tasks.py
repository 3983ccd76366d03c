"""RULER's generators (lm-eval 0.4.13) drawn offline: the asked number of samples, sized to the length,
every reference answer inside the prompt, seeded, and RULER's own scorer on perfect and wrong answers."""
import pytest

from skimfx.eval.ruler import TASKS, ruler_samples

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_hold_their_answers(smollm2, task):
    _, tok = smollm2
    samples = ruler_samples(task, tok, 1024, n=2, seed=3)
    assert len(samples) == 2
    for s in samples:
        # sized to the length by the generator (cwe grows in steps of whole word lists, so it can fall short)
        assert 512 <= len(s.ids) <= 1024 + 64
        text = tok.decode(s.ids)
        assert s.outputs and all(o in text for o in s.outputs)
        perfect = tok(" " + ", ".join(s.outputs), add_special_tokens=False).input_ids
        assert s.score(tok, perfect) == 1.0
        assert s.score(tok, tok(" no idea", add_special_tokens=False).input_ids) == 0.0
    again = ruler_samples(task, tok, 1024, n=2, seed=3)
    assert [s.ids for s in again] == [s.ids for s in samples]


def test_unknown_task_and_bad_count(smollm2):
    _, tok = smollm2
    with pytest.raises(ValueError, match="offline tasks"):
        ruler_samples("qa_squad", tok, 1024, n=1)
    with pytest.raises(ValueError, match="n must be"):
        ruler_samples("vt", tok, 1024, n=0)
