"""KVzip: the kept pairs against the paper's rule computed from HF's own modules (HF runs the prompt and
each reconstruction with its own cache; the test takes each layer's reconstruction queries and keys from
it and applies the softmax / max rule), for every scope; generation after compression against HF with
the per-head mask it implies (the reconstruction leaves no trace); ragged batches, the probe's cache
room, combinations, bad parameters; SmolLM2 with KVzip's instruction."""
import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import skimfx
from skimfx import AdaKV, GemFilter, KVzip, PromptDistill, RecipeError
from skimfx.recipes import KVZIP_PROMPT, kvzip_prompt_ids
from skimfx.runtime.policies.kvzip import max_attention_received
from tiny import tiny_model

from tests.runtime.test_kv_policies import _hf_with_layer_mask, per_head_kept_mask, prompts  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _reconstruction(model, prefilled, n, rec, local_cols=None):
    """HF runs ``rec`` after the ``n`` prompt tokens of its cache ``prefilled`` (on a copy; positions
    continuing). Returns per layer (the reconstruction's post-RoPE queries [Hq, m, D], the cache's keys
    [Hkv, n + m, D]). ``local_cols``: the cached positions the reconstruction may read (besides itself,
    causally)."""
    m = len(rec)
    D = model.config.head_dim
    queries = {}

    def pre_hook(layer):
        def hook(mod, args, kwargs):
            h = kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            q = mod.q_proj(h).view(1, m, -1, D).transpose(1, 2)
            queries[layer] = apply_rotary_pos_emb(q, q, cos, sin)[0][0]
            if local_cols is not None:
                mask = torch.zeros(1, 1, m, n + m, dtype=torch.bool)
                mask[..., local_cols] = True
                mask[..., n:] = torch.ones(m, m, dtype=torch.bool).tril()
                kwargs["attention_mask"] = mask
            return args, kwargs
        return hook

    cache = copy.deepcopy(prefilled)
    with torch.no_grad():
        handles = [blk.self_attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                   for i, blk in enumerate(model.model.layers)]
        try:
            model(torch.tensor([rec]), cache=cache, position_ids=torch.arange(n, n + m)[None], use_cache=True)
        finally:
            for h in handles:
                h.remove()
    return [(queries[l], cache.layers[l].keys[0]) for l in range(len(model.model.layers))]


def kvzip_reference(model, ids, budget, chunk, scope, sinks=4, overlap=8, prompt_ids=(), repeat_ids=(),
                    suffix_ids=(), start=0, scores=False):
    """KVzip's rule: for each chunk [s, e) of the prompt after its first ``start`` tokens (a template's
    header), the reconstruction ``instruction + ids[s - overlap:s] + suffix_ids + ids[s:e]`` runs after the
    prompt (instruction: ``prompt_ids`` for the first chunk, ``repeat_ids`` after; no overlap into the
    header); every reconstruction query's softmax attention (scaled by 1/sqrt(D), causal over the
    reconstruction) over the scoring keys: "full": the whole prompt; "chunk" / "local": the sinks and the
    chunk (and "local" reconstructs reading only those). A pair's score is the max over the queries, the
    GQA group and the chunks (0 in the header); the sinks are kept; top ``budget`` per KV head (or, with
    ``scores``, the scores [L, Hkv, n])."""
    cfg = model.config
    L, Hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    G, D, n = cfg.num_attention_heads // Hkv, cfg.head_dim, len(ids)
    score = torch.zeros(L, Hkv, n)
    with torch.no_grad():
        prefilled = model(torch.tensor([ids]), use_cache=True).cache
    for s in range(start, n, chunk):
        e = min(n, s + chunk)
        instruction = list(repeat_ids) if s > start and repeat_ids else list(prompt_ids)
        rec = instruction + ids[max(start, s - overlap):s] + list(suffix_ids) + ids[s:e]
        m = len(rec)
        cols = list(range(n)) if scope == "full" else list(range(min(sinks, s))) + list(range(s, e))
        per_layer = _reconstruction(model, prefilled, n, rec, cols if scope == "local" else None)
        for layer, (q, keys) in enumerate(per_layer):
            k = torch.cat([keys[:, cols], keys[:, n:]], 1).repeat_interleave(G, 0)     # [Hq, K + m, D]
            logits = q @ k.transpose(-1, -2) / D ** 0.5                                 # [Hq, m, K + m]
            K = len(cols)
            sees = torch.ones(m, K + m, dtype=torch.bool)
            sees[:, K:] = torch.ones(m, m, dtype=torch.bool).tril()
            p = torch.softmax(logits.masked_fill(~sees, float("-inf")), -1)
            received = p.amax(1).view(Hkv, G, -1).amax(1)[:, :K]                        # [Hkv, K]
            score[layer][:, cols] = torch.maximum(score[layer][:, cols], received)
    score[:, :, :sinks] = float("inf")
    if scores:
        return score
    return [[sorted(score[l, h].topk(budget).indices.tolist()) for h in range(Hkv)] for l in range(L)]


@pytest.mark.parametrize("scope", ["chunk", "full", "local"])
def test_kvzip_keeps_what_the_reconstruction_attends_to_most(llama, scope):
    ids = prompts(110)[0]
    recipe = KVzip(budget=30, chunk=40, scope=scope, prompt_ids=(7, 8, 9))
    g = skimfx.compile(llama, recipe).generate([ids], max_new_tokens=1)
    want = kvzip_reference(llama, ids, 30, 40, scope, prompt_ids=(7, 8, 9))
    for layer in range(3):
        assert g.stats.kv_kept[layer][0] == want[layer], (scope, layer)
    assert len({tuple(h) for h in g.stats.kv_kept[1][0]}) > 1                  # per KV head
    assert all(h[:4] == [0, 1, 2, 3] for layer in range(3) for h in g.stats.kv_kept[layer][0])   # sinks


@pytest.mark.parametrize("scope", ["chunk", "local"])
def test_kvzip_template_header_and_later_chunks(llama, scope):
    # a prompt that starts with the template's header is reconstructed after it; later chunks get the
    # repeat instruction, the overlap and the suffix
    header = (5, 6, 7, 8, 9, 10)
    ids = list(header) + prompts(104)[0]
    t = dict(prompt_ids=(11, 12), repeat_ids=(13, 14, 15), suffix_ids=(16, 17))
    g = skimfx.compile(llama, KVzip(budget=30, chunk=40, scope=scope, header_ids=header, **t)).generate(
        [ids], max_new_tokens=1)
    want = kvzip_reference(llama, ids, 30, 40, scope, start=len(header), **t)
    for layer in range(3):
        assert g.stats.kv_kept[layer][0] == want[layer], layer
    # a prompt without the header is reconstructed from its start
    other = prompts(110)[0]
    g = skimfx.compile(llama, KVzip(budget=30, chunk=40, scope=scope, header_ids=header, **t)).generate(
        [other], max_new_tokens=1)
    assert g.stats.kv_kept[1][0] == kvzip_reference(llama, other, 30, 40, scope, **t)[1]


def test_kvzip_with_one_threshold_over_the_model(llama):
    # KVzip's own allocation: AdaKV without safeguard, the budget shared by every head of every layer
    ids = prompts(110)[0]
    g = skimfx.compile(llama, AdaKV(scorer=KVzip(budget=30, chunk=40, prompt_ids=(7, 8)), alpha=0.0,
                                    share="model")).generate([ids], max_new_tokens=4)
    score = kvzip_reference(llama, ids, 30, 40, "chunk", prompt_ids=(7, 8), scores=True)     # [L, Hkv, n]
    L, H, n = score.shape
    flat = score.reshape(-1).double()
    top = set(flat.topk(30 * H * L).indices.tolist())
    want = [[sorted(i % n for i in top if i // n == l * H + h) for h in range(H)] for l in range(L)]
    kept = [g.stats.kv_kept[l][0] for l in range(L)]
    assert kept == want
    assert len({sum(map(len, k)) for k in kept}) > 1                      # layers keep different totals
    D = llama.config.head_dim
    assert g.stats.kv_prefill_bytes == (30 + 4) * H * L * 2 * D * 4        # kept + room for 4 new, fp32


def test_kvzip_template_from_the_tokenizer(smollm2):
    model, tok = smollm2
    t = skimfx.kvzip_template_ids(tok)
    assert tok.decode(list(t["prompt_ids"])) == KVZIP_PROMPT
    assert tok.decode(list(t["repeat_ids"])).endswith("starting with")
    assert tok.decode(list(t["suffix_ids"])) == "<|im_end|>\n<|im_start|>assistant\n"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   return_dict=True)["input_ids"]
    assert list(chat[:len(t["header_ids"])]) == list(t["header_ids"])
    assert skimfx.KVzip(budget=0.1).with_tokenizer(tok) == skimfx.KVzip(budget=0.1, **t)


def test_scopes_differ_and_the_default_has_no_instruction(llama):
    ids = prompts(110)[0]
    kept = {s: skimfx.compile(llama, KVzip(budget=30, chunk=40, scope=s)).generate([ids], max_new_tokens=1)
            .stats.kv_kept for s in ("chunk", "full", "local")}
    assert kept["chunk"] != kept["full"] and kept["chunk"] != kept["local"]
    assert kept["chunk"][2][0] == kvzip_reference(llama, ids, 30, 40, "chunk")[2]


def test_generation_after_kvzip_equals_hf_with_the_per_head_mask(llama):
    """Decode queries read their KV head's kept prompt pairs and every generated token, at positions right
    after the prompt: the reconstruction's k/v and positions leave no trace."""
    ids = prompts(120)[0]
    g = skimfx.compile(llama, KVzip(budget=36, chunk=50, layers=1)).generate([ids], max_new_tokens=16)
    kept = g.stats.kv_kept[1][0]
    assert kept == kvzip_reference(llama, ids, 36, 50, "chunk")[1]
    seq, n, G = ids + g.tokens[0], len(ids), 3
    T = len(seq)
    mask = per_head_kept_mask(kept, n, T, 6, G)
    ref = _hf_with_layer_mask(llama, seq, {1: mask})
    assert ref[n - 1:T - 1].tolist() == g.tokens[0]


@pytest.mark.parametrize("scope", ["chunk", "full", "local"])
def test_ragged_batch_equals_each_prompt_alone(llama, scope):
    """Sequences with fewer chunks sit the later reconstruction forwards out; one whose budget covers its
    prompt is not reconstructed at all."""
    ps = prompts(130, 61, 20)
    cm = skimfx.compile(llama, KVzip(budget=24, chunk=32, scope=scope, prompt_ids=3))
    batch = cm.generate(ps, max_new_tokens=10)
    alone = [cm.generate([p], max_new_tokens=10) for p in ps]
    assert batch.tokens == [a.tokens[0] for a in alone]
    for layer in range(3):
        assert batch.stats.kv_kept[layer][:2] == [a.stats.kv_kept[layer][0] for a in alone[:2]]
        assert batch.stats.kv_kept[layer][2] == [list(range(20))] * 2


def test_the_cache_gets_room_for_the_reconstruction_and_gives_it_back(llama):
    """The cache is planned for prompt + new tokens; the reconstruction (longer than the new tokens) grows
    the layers while it runs, and afterwards they hold the budget plus the new tokens' room."""
    ps = prompts(150)
    g = skimfx.compile(llama, KVzip(budget=40, chunk=64, prompt_ids=(1, 2, 3, 4, 5))).generate(ps, max_new_tokens=4)
    assert g.stats.layer_tokens == [40, 40, 40]
    assert g.stats.kv_prefill_bytes == 3 * 2 * 2 * 16 * 4 * (40 + 4)       # layers, k/v, kv heads, D, fp32


def test_a_budget_that_covers_the_prompt_is_exactly_dense(llama):
    ps = prompts(90, 57)
    dense = skimfx.compile(llama).generate(ps, max_new_tokens=12)
    got = skimfx.compile(llama, KVzip(budget=200, chunk=32)).generate(ps, max_new_tokens=12)
    assert got.tokens == dense.tokens and got.stats.kv_kept == {}


def test_kvzip_on_the_full_attention_layers_of_gemma3():
    """Sliding-window layers stay dense (and attend with their window during the reconstruction)."""
    g3 = tiny_model("gemma3")
    cm = skimfx.compile(g3, KVzip(budget=30, chunk=40))
    assert sorted(cm.program.policies) == [1, 3]
    ps = prompts(100, 70)
    g = cm.generate(ps, max_new_tokens=8)
    assert [g.stats.layer_tokens[l] for l in (1, 3)] == [30, 30] and g.stats.layer_tokens[0] == 100
    assert g.tokens == [cm.generate([p], max_new_tokens=8).tokens[0] for p in ps]


def test_kvzip_after_a_gemfilter_rerun_reconstructs_the_kept_prompt(llama):
    cm = skimfx.compile(llama, [GemFilter(layer=1, keep=60), KVzip(budget=20, chunk=32)])
    g = cm.generate(prompts(150), max_new_tokens=6)
    assert g.stats.layer_tokens == [20, 20, 20] and len(g.tokens[0]) == 6
    assert all(max(h) < 60 for h in g.stats.kv_kept[2][0])                       # slots of the kept prompt


def test_max_attention_received_on_a_synthetic_batch():
    """Padding queries and keys past each sequence's length take no part; the GQA group's max is taken."""
    torch.manual_seed(0)
    B, Hq, Hkv, T, S, D = 2, 4, 2, 5, 12, 8
    q, keys = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D)
    start, live = torch.tensor([7, 4]), torch.tensor([5, 3])
    got = max_attention_received(q, keys, start, start + T, live, 0.3)
    for b in range(B):
        want = torch.zeros(Hkv, S)
        for h in range(Hq):
            for t in range(int(live[b])):
                k = keys[b, h // 2, :int(start[b]) + t + 1]
                p = torch.softmax(k @ q[b, h, t] * 0.3, -1)
                want[h // 2, :len(p)] = torch.maximum(want[h // 2, :len(p)], p)
        torch.testing.assert_close(got[b], want)


def test_kvzip_with_token_pruning_is_a_clear_error(llama):
    cm = skimfx.compile(llama, [PromptDistill(layers=0, keep=40), KVzip(budget=20, chunk=32, layers=(1, 2))])
    with pytest.raises(ValueError, match="without prefill token pruning"):
        cm.generate(prompts(100), max_new_tokens=2)


def test_layers_that_ask_for_different_reconstructions_are_a_clear_error(llama):
    cm = skimfx.compile(llama, [KVzip(budget=20, chunk=32, layers=0), KVzip(budget=20, chunk=48, layers=1)])
    with pytest.raises(ValueError, match="different probe forwards"):
        cm.generate(prompts(100), max_new_tokens=2)


def test_a_layer_whose_budget_covers_the_prompt_runs_the_reconstruction_densely(llama):
    ids = prompts(100)[0]
    cm = skimfx.compile(llama, [KVzip(budget=30, chunk=40, layers=(0, 2)), KVzip(budget=500, chunk=40, layers=1)])
    g = cm.generate([ids], max_new_tokens=4)
    want = kvzip_reference(llama, ids, 30, 40, "chunk")
    assert g.stats.layer_tokens == [30, 100, 30]
    assert g.stats.kv_kept[0][0] == want[0] and 1 not in g.stats.kv_kept


@pytest.mark.parametrize("kw, match", [
    (dict(budget=0), "budget must be > 0"),
    (dict(budget=1.5), r"budget as a fraction must be in \(0, 1\)"),
    (dict(budget=10, chunk=0), "chunk must be a positive integer"),
    (dict(budget=10, scope="window"), "scope must be 'chunk' or 'full' or 'local'"),
    (dict(budget=10, sinks=-1), "sinks must be an integer >= 0"),
    (dict(budget=10, overlap=1.5), "overlap must be an integer >= 0"),
    (dict(budget=4), r"budget \(4\) must exceed sinks \(4\)"),
    (dict(budget=10, prompt_ids="repeat"), "prompt_ids must be token ids"),
    (dict(budget=10, prompt_ids=(1, -2)), "prompt_ids must be token ids"),
])
def test_kvzip_bad_parameters(kw, match):
    with pytest.raises(RecipeError, match=match):
        KVzip(**kw)


def test_kvzip_recipe_string_and_printout(llama):
    rs = skimfx.parse_recipe("kvzip:budget=0.1,chunk=512,scope=local,prompt_ids=5/6/7")
    assert rs == [KVzip(budget=0.1, chunk=512, scope="local", prompt_ids=(5, 6, 7))]
    assert skimfx.parse_recipe(skimfx.recipe_label(rs)) == rs
    assert skimfx.parse_recipe("kvzip:budget=0.1,prompt_ids=5") == [KVzip(budget=0.1, prompt_ids=(5,))]
    cm = skimfx.compile(llama, "kvzip:budget=0.2,chunk=64")
    assert "kvzip: keep 20%, scored by reconstructing the prompt in chunks of 64 (chunk scope), 4 sinks" in str(cm.program)
    with pytest.raises(RecipeError, match="outside the model's vocabulary"):
        skimfx.compile(llama, KVzip(budget=0.2, prompt_ids=(5, 9999)))


@pytest.mark.slow
def test_kvzip_on_smollm2_follows_the_rule_with_the_papers_instruction(smollm2):
    model, tok = smollm2
    text = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(18))
    ids = tok(text)["input_ids"]                                                # about 200 tokens
    prompt_ids = kvzip_prompt_ids(tok)
    assert tok.decode(prompt_ids) == KVZIP_PROMPT
    cm = skimfx.compile(model, KVzip(budget=0.3, chunk=128, prompt_ids=prompt_ids), tokenizer=tok)
    g = cm.generate([ids], max_new_tokens=4)
    budget = round(0.3 * len(ids))
    want = kvzip_reference(model, ids, budget, 128, "chunk", prompt_ids=prompt_ids)
    for layer in (0, 15, 29):
        assert g.stats.kv_kept[layer][0] == want[layer], layer
    assert g.stats.layer_tokens == [budget] * 30 and len(g.tokens[0]) == 4
    # given the tokenizer, compile fills in KVzip's whole template; a chat prompt is reconstructed after its
    # header, the second chunk after the repeat instruction and the overlap, each after the template's suffix
    t = skimfx.kvzip_template_ids(tok)
    filled = skimfx.compile(model, "kvzip:budget=0.3,chunk=128", tokenizer=tok)
    assert all(getattr(filled.program.policies[0], k) == v for k, v in t.items())
    chat = list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_dict=True)["input_ids"])
    assert chat[:len(t["header_ids"])] == list(t["header_ids"]) and len(chat) > len(t["header_ids"]) + 128
    budget = round(0.3 * len(chat))
    want = kvzip_reference(model, chat, budget, 128, "chunk", start=len(t["header_ids"]),
                           prompt_ids=t["prompt_ids"], repeat_ids=t["repeat_ids"], suffix_ids=t["suffix_ids"])
    kept = filled.generate([chat], max_new_tokens=4).stats.kv_kept
    assert kept[15][0] == want[15] and kept[29][0] == want[29]
