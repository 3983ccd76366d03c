"""Prefill/decode/generate on random-weight models against HF, ragged batches, and bad input."""
import pytest
import torch

import skimfx
from skimfx.runtime import KVCache, decode_step, prefill
from tiny import tiny_model


@pytest.fixture(scope="module", params=["llama", "gemma3", "mistral"])
def pair(request):
    m = tiny_model(request.param)
    return m, skimfx.compile(m)


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_hf_generate_past_the_window(pair):
    model, cm = pair
    prompt = torch.randint(0, 512, (45,)).tolist()       # windows are 40 / 48: decode crosses them
    got = cm.generate(prompt, max_new_tokens=30, stop_tokens=[])
    assert got.tokens[0] == hf_greedy(model, prompt, 30)
    assert got.finish_reasons == ["length"]


def test_decode_logits_match_a_full_forward(pair):
    model, cm = pair
    ids = torch.randint(0, 512, (2, 60))
    with torch.no_grad():
        ref = model(ids).logits
    cache = KVCache.for_program(cm.program, 2, 64)
    with torch.inference_mode():
        first = prefill(cm.program, cache, ids[:, :50].tolist())
        torch.testing.assert_close(first, ref[:, 49], atol=1e-4, rtol=1e-4)
        for t in range(50, 60):
            step = decode_step(cm.program, cache, ids[:, t])
            torch.testing.assert_close(step, ref[:, t], atol=1e-4, rtol=1e-4)
    assert cache.lengths(0) == [60, 60] and cache.positions == [60, 60]


def test_ragged_batch_equals_each_prompt_alone(pair):
    model, cm = pair
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 31, 17)]
    batch = cm.generate(prompts, max_new_tokens=12, stop_tokens=[])
    for p, toks in zip(prompts, batch.tokens):
        assert cm.generate(p, max_new_tokens=12, stop_tokens=[]).tokens[0] == toks


def test_left_padded_tensor_with_attention_mask(pair):
    model, cm = pair
    ids = torch.randint(1, 512, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0                                          # left padding in row 1
    out = cm(ids, attention_mask=mask).logits
    alone = cm(ids[1:, 4:]).logits
    torch.testing.assert_close(out[1, 4:], alone[0])
    assert torch.equal(out[1, :4], torch.zeros_like(out[1, :4]))
    gen = cm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, stop_tokens=[])
    assert gen.tokens[1] == cm.generate(ids[1, 4:].tolist(), max_new_tokens=4, stop_tokens=[]).tokens[0]


def test_stop_tokens_streaming_and_stats(pair):
    model, cm = pair
    prompt = torch.randint(0, 512, (20,)).tolist()
    free = cm.generate(prompt, max_new_tokens=10, stop_tokens=[]).tokens[0]
    stop = free[3]
    streamed = []
    g = cm.generate(prompt, max_new_tokens=10, stop_tokens=[stop], callback=lambda b, t: streamed.append((b, t)))
    cut = free.index(stop) + 1
    assert g.tokens[0] == free[:cut] and g.finish_reasons == ["stop"]
    assert streamed == [(0, t) for t in free[:cut]]
    s = g.stats
    assert s.ttft_s > 0 and s.decode_tokens == cut - 1 and s.prompt_tokens == [20]
    info = cm.info
    per_token = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 4
    assert s.kv_bytes == per_token * (20 + 10)
    assert s.kv_used_bytes == per_token * (20 + cut - 1)


def test_seeded_sampling_is_reproducible(pair):
    model, cm = pair
    prompt = torch.randint(0, 512, (8,)).tolist()
    a = cm.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=7, stop_tokens=[])
    b = cm.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=7, stop_tokens=[])
    c = cm.generate(prompt, max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=8, stop_tokens=[])
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_bad_input_is_rejected_clearly():
    model = tiny_model("llama")
    cm = skimfx.compile(model, max_cache_len=64)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        cm.generate([], max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        cm.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="has 65 tokens but the cache holds at most 64"):
        cm.generate(list(range(65)), max_new_tokens=1)
    with pytest.raises(ValueError, match="max_cache_len=64"):
        cm.generate(list(range(60)), max_new_tokens=10)
    with pytest.raises(ValueError, match="integer token ids"):
        cm(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        cm(torch.tensor([[1, 600]]))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        cm.generate([1, 2], max_new_tokens=0)
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match=f"input_ids are on {other}.* but the model is on cpu"):
        cm(torch.zeros(1, 4, dtype=torch.long, device=other))
