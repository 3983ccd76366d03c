"""short-m@k: the forked prefill against HF's own forward, the vote against a plainly written reference,
the stopping rule (the first m to finish vote, the rest are abandoned at that step), majority@k, the
answer extractors, and the errors."""
from collections import Counter

import pytest
import torch

import skimfx
from skimfx import RecipeError, ShortMK
from skimfx.recipes.generation import last_line, last_number
from skimfx.runtime.decoding import VotedGeneration, fork_prefill
from skimfx.runtime.decoding.majority import vote
from skimfx.runtime.steps import decode_step
from tiny import tiny_model


class DigitTokenizer:
    """Text of a token list for random-weight models: each id as a number on its own line."""

    def decode(self, ids, skip_special_tokens=True):
        return "\n".join(str(i % 7) for i in ids)


def reference_vote(chains, voters, answers):
    """The rule written out: most frequent readable answer among the voters; equal counts -> the answer
    with the shortest chain (then the lower row); no readable answer -> the shortest voter."""
    readable = [i for i in voters if answers[i] is not None]
    if not readable:
        return sorted(voters, key=lambda i: (len(chains[i]), i))[0]
    counts = Counter(answers[i] for i in readable)
    top = max(counts.values())
    best = [i for i in readable if counts[answers[i]] == top]
    return sorted(best, key=lambda i: (len(chains[i]), i))[0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_forked_prefill_decodes_like_hf(arch):
    """k rows over one prefill: each row's next-token logits after its own tokens equal HF's forward on
    prompt + those tokens."""
    model = tiny_model(arch)
    cm = skimfx.compile(model)
    prompt = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        cache, first = fork_prefill(cm.program, prompt, 3, 4)
        ref0 = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(first, ref0, atol=2e-4, rtol=1e-4)
        steps = [[5, 77, 300], [9, 9, 41]]
        for i, toks in enumerate(steps):
            got = decode_step(cm.program, cache, torch.tensor(toks))
            for row in range(3):
                seq = prompt + [s[row] for s in steps[:i + 1]]
                ref = model(torch.tensor([seq])).logits[0, -1]
                torch.testing.assert_close(got[row], ref, atol=2e-4, rtol=1e-4)
    assert cache.lengths(0) == [len(prompt) + 2] * 3 and cache.positions == [len(prompt) + 2] * 3


def test_vote_rule_against_reference():
    chains = [[1] * 5, [1] * 3, [1] * 4, [1] * 2, [1] * 6]
    cases = [["7", "8", "7", "8", None],        # 2-2 tie: "8" has the shortest chain (row 3)
             ["7", "7", "9", "9", "9"],
             [None, None, None, None, None],
             ["5", None, "5", None, "6"],
             ["1", "2", "3", "4", "5"]]          # all different: the shortest chain
    for answers in cases:
        for voters in ([0, 1, 2], [3, 1, 2, 0], [0, 1, 2, 3, 4], [4]):
            row, ans = vote(chains, voters, answers)
            assert row == reference_vote(chains, voters, answers), (answers, voters)
            assert ans == answers[row]


def _short_mk(model, k, m, **kw):
    return skimfx.compile(model, ShortMK(k=k, m=m, answer="last_line"), tokenizer=DigitTokenizer())


def test_first_m_to_finish_vote_and_the_rest_are_abandoned():
    model = tiny_model("llama")
    prompts = [torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(s)).tolist() for s in (2, 3)]
    stops = set(range(0, 60))                  # about one token in nine ends a chain
    cm = _short_mk(model, 8, 3)
    g = cm.generate(prompts, max_new_tokens=40, temperature=1.0, seed=0, stop_tokens=stops)
    assert isinstance(g, VotedGeneration) and len(g.votes) == 2
    for b, v in enumerate(g.votes):
        assert len(v.samples) == 8 and len(v.voters) == 3
        ended = [i for i, r in enumerate(v.reasons) if r != "abandoned"]
        assert set(v.voters) <= set(ended)
        last = max(len(v.samples[i]) for i in v.voters)
        # every voter finished no later than any chain that did not vote
        for i in range(8):
            if i not in v.voters:
                assert len(v.samples[i]) >= last
            if v.reasons[i] == "abandoned":
                assert len(v.samples[i]) == last and not stops & set(v.samples[i])
            if v.reasons[i] == "stop":
                assert v.samples[i][-1] in stops and not stops & set(v.samples[i][:-1])
        # voters are the first m in finishing order (length, then row)
        order = sorted(ended, key=lambda i: (len(v.samples[i]), i))
        assert v.voters == order[:3]
        assert v.answers == [last_line(DigitTokenizer().decode(s)) for s in v.samples]
        assert v.chosen == reference_vote(v.samples, v.voters, v.answers)
        assert g.tokens[b] == v.samples[v.chosen] and g.finish_reasons[b] == v.reasons[v.chosen]
    assert g.stats.decode_tokens == sum(v.tokens_generated for v in g.votes) - 2 * 8


def test_majority_over_all_k_waits_for_every_chain():
    model = tiny_model("llama")
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    stops = set(range(0, 60))
    short = _short_mk(model, 6, 2).generate(prompt, max_new_tokens=30, temperature=1.0, seed=3, stop_tokens=stops)
    full = _short_mk(model, 6, 6).generate(prompt, max_new_tokens=30, temperature=1.0, seed=3, stop_tokens=stops)
    assert "abandoned" not in full.votes[0].reasons and sorted(full.votes[0].voters) == list(range(6))
    # the same seed samples the same chains: short-2@6's are prefixes of majority@6's
    for a, b in zip(short.votes[0].samples, full.votes[0].samples):
        assert b[:len(a)] == a
    assert short.votes[0].tokens_generated <= full.votes[0].tokens_generated


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chains_follow_the_model(arch):
    """top_k=1 makes every sampled chain the greedy one: all k equal dense greedy generation."""
    model = tiny_model(arch)
    prompt = torch.randint(0, 512, (25,), generator=torch.Generator().manual_seed(5)).tolist()
    dense = skimfx.compile(model).generate(prompt, max_new_tokens=12, stop_tokens=[])
    g = _short_mk(model, 4, 2).generate(prompt, max_new_tokens=12, temperature=0.8, top_k=1, stop_tokens=[3])
    ref = dense.tokens[0]
    for s in g.votes[0].samples:
        cut = ref.index(3) + 1 if 3 in ref else len(ref)
        assert s == ref[:cut]


def test_answer_extractors():
    assert last_number("so 12 + 30 = 42.") == "42"
    assert last_number("it costs 1,200 dollars, not 1,100.50") == "1100.50"
    assert last_number("-3 is 3.0 less than 0") == "0" and last_number("x = 7.0") == "7"
    assert last_number("no digits") is None
    assert last_line("a\n\n  b c  \n\n") == "b c" and last_line("   ") is None


def test_errors():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="at most k"):
        ShortMK(k=2, m=3)
    with pytest.raises(RecipeError, match="positive"):
        ShortMK(k=0, m=0)
    with pytest.raises(RecipeError, match="answer must be"):
        ShortMK(answer="first_word")
    with pytest.raises(RecipeError, match="tokenizer"):
        skimfx.compile(model, ShortMK())
    cm = _short_mk(model, 4, 2)
    with pytest.raises(ValueError, match="temperature > 0"):
        cm.generate([1, 2, 3], max_new_tokens=4, stop_tokens=[0])
    with pytest.raises(ValueError, match="stop tokens"):
        cm.generate([1, 2, 3], max_new_tokens=4, temperature=1.0, stop_tokens=[])
    with pytest.raises(ValueError, match="one decoding mode"):
        skimfx.compile(model, [ShortMK(), skimfx.SelfSpeculative()], tokenizer=DigitTokenizer())
    with pytest.raises(ValueError, match="cannot run over the KV cache policy"):
        skimfx.compile(model, [skimfx.SnapKV(budget=8, window=4), ShortMK()], tokenizer=DigitTokenizer())
    assert skimfx.parse_recipe("shortmk:k=8,m=3") == [ShortMK(k=8, m=3)]


@pytest.mark.slow
def test_short_mk_on_smollm2(smollm2):
    model, tok = smollm2
    cm = skimfx.compile(model, ShortMK(k=4, m=2), tokenizer=tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4? Answer with the number."}],
                                  add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.inference_mode():
        cache, first = fork_prefill(cm.program, ids, 2, 2)
        got = decode_step(cm.program, cache, torch.tensor([28, 314]))
        torch.testing.assert_close(first, model(torch.tensor([ids])).logits[0, -1], atol=2e-3, rtol=1e-3)
        for row, t in enumerate((28, 314)):
            torch.testing.assert_close(got[row], model(torch.tensor([ids + [t]])).logits[0, -1], atol=2e-3,
                                       rtol=1e-3)
    g = cm.generate(ids, max_new_tokens=24, temperature=0.7, seed=0)
    v = g.votes[0]
    assert len(v.voters) == 2 and v.answer == last_number(tok.decode(g.tokens[0], skip_special_tokens=True))


@pytest.mark.slow
def test_cli_generate_votes(capsys):
    from skimfx.cli import main

    rc = main(["generate", "--recipe", "shortmk:k=3,m=2", "--temperature", "0.7", "--seed", "0",
               "--max-new-tokens", "12", "--prompt", "What is 2 + 2?"])
    err = capsys.readouterr().err
    assert rc == 0 and "[vote] answers of the first 2 to finish" in err
    rc = main(["generate", "--recipe", "shortmk:k=3,m=2", "--max-new-tokens", "4", "--prompt", "What is 2 + 2?"])
    assert rc == 2 and "temperature > 0" in capsys.readouterr().err
