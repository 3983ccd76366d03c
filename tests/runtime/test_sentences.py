"""Sentence segmentation on token ids and sentence-granular selection: awkward text (no punctuation,
one very long sentence, the chat template), exact kept sets on fixtures, and the recipes' plumbing."""
import pytest
import torch

import skimfx
from skimfx.runtime.selection import topk_sentences
from skimfx.runtime.sentences import segment, segment_batch, sentence_end_table


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def sentences_of(tok, text, max_len=64):
    ids = torch.tensor(tok(text).input_ids)
    sid = segment(ids, sentence_end_table(tok), max_len)
    return [tok.decode(ids[sid == s]) for s in range(int(sid.max()) + 1)]


def test_prose_splits_after_sentence_ends(tok):
    got = sentences_of(tok, "The cat sat. Did it? Yes! It said: \"no.\" Then\nit left")
    assert got == ["The cat sat.", " Did it?", " Yes!", " It said: \"no.\"", " Then\n", "it left"]


def test_no_punctuation_and_run_on_sentences_are_cut_at_max_len(tok):
    ids = torch.tensor(tok("word " * 150).input_ids)
    sid = segment(ids, sentence_end_table(tok), max_len=40)
    sizes = torch.bincount(sid).tolist()
    assert len(ids) > 120 and sizes == [40, 40, 40, len(ids) - 120]


def test_chat_template_markers_end_sentences(tok):
    msgs = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    got = sentences_of(tok, text)
    # each special marker closes a segment: "Be brief" and "Hi there" never share one with the other turn
    assert not any("Be brief" in s and "Hi there" in s for s in got)
    assert all(s.endswith(("<|im_start|>", "<|im_end|>", "\n")) for s in got[:-1])


def test_segment_batch_pads_with_the_last_sentence():
    ends = torch.zeros(10, dtype=torch.bool)
    ends[1] = True
    ids = torch.tensor([[3, 1, 3, 3, 1, 3], [1, 3, 3, 0, 0, 0]])
    got = segment_batch(ids, [6, 3], ends, max_len=64)
    assert got.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]


def test_topk_sentences_exact_fixture():
    # 4 sentences: [0-2] [3-4] [5-8] [9-11]; the last 2 tokens are forced
    sid = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]])
    scores = torch.tensor([[0.1, 0.9, 0.1, 0.2, 0.3, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    # max: s0 0.9, s2 0.5, s1 0.3, s3 0 (forced tail: tokens 10, 11 -> s3 adds 1 more token)
    idx, kept = topk_sentences(scores, sid, keep=7, lengths=[12], keep_last=2)
    # room = 5 tokens: s0 (3) fits, s2 (4) does not, s1 (2) fits -> {0,1,2,3,4} + tail {10,11}
    assert kept == [7] and idx[0].tolist() == [0, 1, 2, 3, 4, 10, 11]
    # mean: s1 0.25, s0 0.367, s2 0.125 -> s0, s1 again
    idx, kept = topk_sentences(scores, sid, keep=7, lengths=[12], keep_last=2, reduce="mean")
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 10, 11]
    # a budget covering the prompt keeps everything; a ragged second row pads with its last index
    idx, kept = topk_sentences(scores.repeat(2, 1), sid.repeat(2, 1), keep=12, lengths=[12, 5], keep_last=2)
    assert kept == [12, 5] and idx[1].tolist() == [0, 1, 2, 3, 4] + [4] * 7


def test_recipe_validation_and_tokenizer_requirement(smollm2):
    model, tok = smollm2
    with pytest.raises(skimfx.RecipeError, match="granularity"):
        skimfx.PromptDistill(layers=8, keep=64, granularity="paragraph")
    with pytest.raises(skimfx.RecipeError, match="sentence_reduce"):
        skimfx.GemFilter(layer=8, keep=64, granularity="sentence", sentence_reduce="sum")
    with pytest.raises(skimfx.RecipeError, match="tokenizer"):
        skimfx.compile(model, "promptdistill:layers=8,keep=64,granularity=sentence")


def test_sentence_pruning_keeps_whole_sentences_on_the_real_model(smollm2):
    model, tok = smollm2
    text = ("Paris is the capital of France. The river Seine runs through it. "
            "Bread is baked every morning in small shops. ") * 6 + "Question: what runs through Paris? Answer:"
    ids = tok(text).input_ids
    cm = skimfx.compile(model, skimfx.PromptDistill(layers=8, keep=48, granularity="sentence"), tokenizer=tok)
    g = cm.generate([ids], max_new_tokens=4)
    kept = g.stats.selected[8][0]
    sid = segment(torch.tensor(ids), sentence_end_table(tok), 64).tolist()
    tail = set(range(len(ids) - 8, len(ids)))
    groups = {}
    for i in kept:
        groups.setdefault(sid[i], set()).add(i)
    for s, members in groups.items():
        whole = {i for i, x in enumerate(sid) if x == s}
        assert members == whole or members <= tail | whole and whole & tail, f"sentence {s} kept partly"
    assert len(kept) <= 48 and tail <= set(kept)
    assert "whole sentences" in str(cm.program)
