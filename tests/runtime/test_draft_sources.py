"""Where lookahead drafts come from and how their steps are timed: the joined-lines side corpus
(``join_wrapped_lines``, ``NGramDrafts(corpus=...)``, ``SelfSpeculative(reflow=...)``) and the schedule's
``StepTimer``, which drops the time of a step that did one-time kernel work."""
import time

import pytest
import torch

import skimfx
from skimfx import SelfSpeculative
from skimfx.eval import chat_ids
from skimfx.kernels import one_time
from skimfx.kernels.linear import _CHOICE, linear_packable
from skimfx.runtime.decoding import NGramDrafts, StepCosts
from skimfx.runtime.decoding.drafts import join_wrapped_lines, side_corpus
from skimfx.runtime.decoding.schedule import StepTimer, average
from tiny import tiny_model

WRAPPED = """The harbour was quiet in the early morning, and the fishing boats lay
at anchor with their nets hung out to dry. An old man sat on the sea wall
mending a rope, and every few minutes he looked up at the sky as if he
expected the weather to change. Nobody else was about. The cafe on the
corner had not yet opened its shutters, and the only sound was the slow
slap of the water against the stones of the quay."""


def test_join_wrapped_lines_joins_lines_inside_paragraphs_only():
    assert join_wrapped_lines("one two\nthree four.  Five\nsix") == "one two three four. Five six"
    # blank lines (paragraphs), indented lines (code, lists) and line-leading spaces are structure: kept
    text = "a paragraph\n\nanother one\n    indented line\n- item\n"
    assert join_wrapped_lines(text) == "a paragraph\n\nanother one\n    indented line - item\n"
    assert join_wrapped_lines("def f(x):\n    return x\n") == "def f(x):\n    return x\n"
    assert join_wrapped_lines("no break at all") == "no break at all"


def test_drafts_from_the_corpus_when_its_match_is_longer():
    text = [1, 2, 3, 9, 4, 5, 6, 7, 8]           # the prompt: "9" is a line break in the middle of 1..8
    corpus = [1, 2, 3, 4, 5, 6, 7, 8]            # the same text joined
    d = NGramDrafts(2, 3, corpus=corpus)
    assert d.propose(text + [1, 2, 3], 3) == [9, 4, 5] and d.source == 0   # a tie over 1 2 3: the text wins
    d.observe(0)                                  # rejected at once: the next tie goes to the corpus
    assert d.preferred == 1
    assert d.propose(text + [1, 2, 3], 3) == [4, 5, 6] and d.source == 1
    d.observe(3)
    assert d.preferred == 1
    # after the break the suffix "3 4" exists only in the corpus
    d2 = NGramDrafts(2, 3, corpus=corpus)
    assert d2.propose(text + [2, 3, 4], 2) == [5, 6] and d2.source == 1 and d2.order == 3
    # a longer match in the text beats a tie-break preference for the corpus
    d3 = NGramDrafts(2, 2, corpus=[7, 5, 6, 1])
    d3.preferred = 1
    assert d3.propose([3, 5, 6, 2, 3, 5, 6], 1) == [2] and d3.source == 0
    # no corpus: the text alone, as before
    assert NGramDrafts(2, 3).propose([1, 2, 3, 1, 2], 2) == [3, 1]


def test_step_timer_drops_steps_that_did_one_time_work():
    timer = StepTimer()
    time.sleep(0.001)
    assert timer.seconds() > 0
    timer = StepTimer()
    one_time.note()
    assert timer.seconds() is None
    costs = StepCosts()
    costs.add(4, None)
    assert costs.seconds == {}
    assert average(None, None) is None and average(1.0, None) == 1.0 and average(1.0, 2.0) == pytest.approx(1.3)


def test_linear_notes_its_one_time_work():
    w = torch.randn(64, 32)
    rows = torch.randn(5, 32)
    _CHOICE.clear()
    before = one_time.count()
    linear_packable(rows, w)                      # a new row bucket: the paths are measured
    assert one_time.count() > before
    settled = one_time.count()
    linear_packable(rows, w)
    assert one_time.count() == settled            # measured once: later calls are the step itself


def test_reflow_needs_the_tokenizer_and_lookahead():
    model = tiny_model("llama")
    cm = skimfx.compile(model, "selfspeculative")
    assert cm.program.decoding.reflow_with is None            # no tokenizer: drafts from the prompt as it is
    r = SelfSpeculative()
    assert r.reflow is True and r.with_tokenizer(None) is r
    assert SelfSpeculative(reflow=False).with_tokenizer(object()).reflow is False
    with pytest.raises(skimfx.RecipeError, match="reflow must be true or false"):
        SelfSpeculative(reflow="yes")


@pytest.mark.slow
def test_reflowed_drafts_are_accepted_more_and_change_no_token(smollm2):
    model, tok = smollm2
    ids = chat_ids(tok, f"{WRAPPED}\n\nCopy the text above word for word.")
    cm = skimfx.compile(model, "selfspeculative:adaptive=false", tokenizer=tok)
    assert cm.program.decoding.reflow_with is tok
    corpus = side_corpus(cm.program.decoding, ids)
    assert "boats lay at anchor" in tok.decode(corpus) and "lay\nat" not in tok.decode(corpus)
    dense = skimfx.compile(model, tokenizer=tok).generate([ids], max_new_tokens=80, stop_tokens=[tok.eos_token_id])
    joined = cm.generate([ids], max_new_tokens=80, stop_tokens=[tok.eos_token_id])
    plain = skimfx.compile(model, "selfspeculative:adaptive=false,reflow=false", tokenizer=tok).generate(
        [ids], max_new_tokens=80, stop_tokens=[tok.eos_token_id])
    assert joined.tokens == dense.tokens == plain.tokens
    assert "boats lay at anchor" in tok.decode(dense.tokens[0])         # the model quotes the joined text
    assert joined.stats.decoding.accepted["lookahead"] > plain.stats.decoding.accepted["lookahead"]
    # batched verification (two prompts) drafts from each prompt's own joined text
    two = cm.generate([ids, ids[:-3] + ids[-3:]], max_new_tokens=40, stop_tokens=[tok.eos_token_id])
    assert two.tokens[0] == dense.tokens[0][:40]


def test_step_costs_by_token_count_need_no_plain_step():
    """The batched schedule measures passes by packed token count, plain steps included, so there is no
    separate k = 0 anchor: below the smallest measured count a pass costs what that one does, above the
    largest it grows along the line through the two largest, and with one count measured it is flat."""
    c = StepCosts()
    c.add(4, 1.0)
    assert c(2) == 1.0 and c(10) == 1.0
    c.add(8, 2.0)
    assert c(6) == 1.5 and c(12) == 3.0 and c(3) == 1.0
    assert c(2, plain=0.5) == 0.75                      # with a plain step: interpolated from it, as before
