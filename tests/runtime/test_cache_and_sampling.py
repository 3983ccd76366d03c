"""KV cache bookkeeping and sampling, on their own."""
import pytest
import torch

from skimfx.runtime import CacheFullError, KVCache, SamplingConfig, sample


def test_cache_writes_at_each_sequence_length_and_reports_bytes():
    c = KVCache(num_layers=2, batch=2, num_kv_heads=3, head_dim=4, capacity=10, dtype=torch.float32, device="cpu")
    assert c.nbytes() == 2 * 2 * (2 * 3 * 10 * 4) * 4
    k = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    c.write(0, k, -k)
    c.advance(0, [5, 2])                                  # sequence 1 had 3 padding tokens
    assert c.lengths(0) == [5, 2] and c.lengths(1) == [0, 0]
    k2 = torch.full((2, 3, 1, 4), 7.0)
    c.write(0, k2, k2)                                    # ragged starts: slot 5 for b=0, slot 2 for b=1
    c.advance(0, [1, 1])
    assert torch.equal(c.k[0][0, :, 5], torch.full((3, 4), 7.0))
    assert torch.equal(c.k[0][1, :, 2], torch.full((3, 4), 7.0))
    assert torch.equal(c.k[0][0, :, :5], k[0])            # earlier slots untouched
    assert torch.equal(c.v[0][1, :, :2], -k[1, :, :2])
    assert c.used_bytes() == (6 + 3) * 3 * 4 * 4 * 2


def test_cache_overflow_is_a_clear_error_and_changes_nothing():
    c = KVCache(1, 1, 1, 2, capacity=4, dtype=torch.float32, device="cpu")
    c.write(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    c.advance(0, [3])
    before = c.k[0].clone()
    with pytest.raises(CacheFullError, match="exceeds the cache capacity of 4"):
        c.write(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert torch.equal(c.k[0], before) and c.lengths(0) == [3]


def test_per_layer_capacities():
    c = KVCache(3, 1, 2, 8, capacity=[16, 8, 4], dtype=torch.float16, device="cpu")
    assert [c.capacity(i) for i in range(3)] == [16, 8, 4]
    assert c.nbytes() == (16 + 8 + 4) * 2 * 8 * 2 * 2


def test_greedy_and_seeded_sampling():
    logits = torch.randn(4, 100)
    assert torch.equal(sample(logits, SamplingConfig()), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingConfig(temperature=1.0, top_k=1), torch.Generator().manual_seed(1)),
                       logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingConfig(temperature=1.0, top_p=1e-6), torch.Generator().manual_seed(1)),
                       logits.argmax(-1))
    cfg = SamplingConfig(temperature=1.5, top_k=50, top_p=0.9)
    a = sample(logits, cfg, torch.Generator().manual_seed(3))
    b = sample(logits, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_top_k_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingConfig(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample(logits, SamplingConfig(temperature=1.0, top_p=0.5), g)) for _ in range(100)}
    assert draws == {0}                                   # p(0) = 0.67 >= 0.5 already


@pytest.mark.parametrize("kw,match", [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                                      ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)
