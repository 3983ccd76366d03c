"""Long runs on one compiled model: resident memory stays flat after warm-up, no module-level cache
grows with the number of requests, and concurrent ``generate`` calls from two threads give the tokens
one thread gives."""
import gc
import threading

import pytest
import torch
import transformers as tf

import skimfx
from skimfx.capture import _EXPORTS
from skimfx.runtime import sentences, static
from tiny import COMMON


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def long_tiny(max_positions: int = 16384):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**COMMON, "max_position_embeddings": max_positions}, head_dim=16)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def module_caches() -> dict:
    return {"exports": len(_EXPORTS), "sentence_tables": len(sentences._TABLES),
            "step_functions": len(static._STEPS)}


@pytest.mark.slow
def test_2k_tokens_after_an_8k_prompt_keep_memory_flat():
    model = long_tiny()
    cm = skimfx.compile(model)
    prompt = torch.randint(0, 512, (8192,), generator=torch.Generator().manual_seed(0)).tolist()
    marks = {}

    def on_token(b, t, n=[0]):
        n[0] += 1
        if n[0] in (200, 2000):
            gc.collect()
            marks[n[0]] = rss_mb()

    out = cm.generate(prompt, max_new_tokens=2048, stop_tokens=[], callback=on_token)
    assert len(out.tokens[0]) == 2048
    # the cache was allocated for prompt + new tokens at prefill: decoding allocates nothing that stays
    assert marks[2000] - marks[200] < 32, marks


@pytest.mark.slow
def test_100_requests_of_mixed_lengths_and_recipes_keep_memory_and_caches_flat():
    model = long_tiny(4096)
    compiled = [skimfx.compile(model), skimfx.compile(model, "snapkv:budget=0.25,window=8"),
                skimfx.compile(model, "quest:token_budget=64,page_size=16"),
                skimfx.compile(model, "promptdistill:layers=1,keep=256")]
    g = torch.Generator().manual_seed(1)
    rss, caches = [], []
    for i in range(100):
        cm = compiled[i % len(compiled)]
        batch = 1 + i % 3
        prompts = [torch.randint(0, 512, (int(torch.randint(20, 600, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(batch)]
        cm.generate(prompts, max_new_tokens=int(torch.randint(1, 24, (1,), generator=g)), stop_tokens=[],
                    temperature=0.7 if i % 5 == 0 else 0.0, seed=i)
        if i in (19, 99):
            gc.collect()
            rss.append(rss_mb())
            caches.append(module_caches())
    assert caches[0] == caches[1], caches
    assert rss[1] - rss[0] < 48, rss


def test_two_threads_generate_the_tokens_one_thread_generates():
    model = long_tiny(2048)
    cm = skimfx.compile(model, "snapkv:budget=0.5,window=8")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (50, 90, 130, 70)]
    alone = [cm.generate(p, max_new_tokens=12, stop_tokens=[]).tokens[0] for p in prompts]
    got: dict[int, list] = {}
    errors = []

    def worker(indices):
        try:
            for _ in range(3):
                for i in indices:
                    got.setdefault(i, []).append(cm.generate(prompts[i], max_new_tokens=12, stop_tokens=[]).tokens[0])
        except Exception as e:              # reported below: an exception in a thread does not fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(idx,)) for idx in ((0, 1), (2, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, runs in got.items():
        assert all(r == alone[i] for r in runs), i
