"""Run token-id prompts through vLLM offline, stock or with the skimfx plugin, each setting in its own process.

vLLM reads its plugins and attention-backend overrides once per process, so a stock run and a plugin run
cannot share one; ``run_vllm`` starts ``python -m skimfx.integrations.vllm_runner`` with the environment
of the setting (the engine in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the plugin's counters are
readable) and returns what it wrote: per job the greedy tokens of each prompt, the wall time of the job,
the plugin's counters for the job, and (``record_selection``) the blocks each layer read at the first
decode step of the job's first prompt.

Used by the plugin's acceptance tests (tests/integrations/vllm/) and bench/vllm_sparse.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def engine_env(recipe: str | None, sink_blocks: int | None = None, min_context: int | None = None) -> dict:
    """The environment of a run: offline, in-process engine, and the plugin's settings (None: stock vLLM)."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    if recipe:
        env.update(VLLM_PLUGINS="skimfx", SKIMFX_VLLM_RECIPE=recipe)
        if sink_blocks is not None:
            env["SKIMFX_VLLM_SINK_BLOCKS"] = str(sink_blocks)
        if min_context is not None:
            env["SKIMFX_VLLM_MIN_CONTEXT"] = str(min_context)
    else:
        env.update(VLLM_PLUGINS="", SKIMFX_VLLM_RECIPE="")
    return env


def run_vllm(model_dir: str, jobs: list[dict], recipe: str | None = None, *, sink_blocks: int | None = None,
             min_context: int | None = None, block_size: int = 32, max_model_len: int = 4608,
             timeout: float = 1800) -> list[dict]:
    """``jobs``: [{"name", "prompts": [[ids]], "max_tokens", "record_selection": bool}] -> one result per job."""
    with tempfile.TemporaryDirectory() as d:
        spec, out = os.path.join(d, "spec.json"), os.path.join(d, "out.json")
        with open(spec, "w") as f:
            json.dump(dict(model=model_dir, jobs=jobs, block_size=block_size, max_model_len=max_model_len,
                           plugin=bool(recipe)), f)
        env = {**os.environ, **engine_env(recipe, sink_blocks, min_context)}
        proc = subprocess.run([sys.executable, "-m", "skimfx.integrations.vllm_runner", spec, out], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(out) as f:
            return json.load(f)


def _main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    llm = LLM(model=spec["model"], dtype="float32", block_size=spec["block_size"], max_model_len=spec["max_model_len"],
              enforce_eager=True, seed=0, gpu_memory_utilization=0.2, enable_prefix_caching=False)
    counters = None
    if spec["plugin"]:
        from . import vllm as plugin

        counters = plugin.counters()
    results = []
    for job in spec["jobs"]:
        sp = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=job.get("ignore_eos", False))
        selection = None
        if job.get("record_selection") and counters is not None:
            counters.reset()
            llm.generate([{"prompt_token_ids": job["prompts"][0]}], SamplingParams(temperature=0.0, max_tokens=2),
                         use_tqdm=False)
            selection = dict(counters.last_selection)
        if counters is not None:
            counters.reset()
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], sp, use_tqdm=False)
        wall = time.perf_counter() - t
        results.append(dict(name=job["name"], tokens=[list(o.outputs[0].token_ids) for o in outs], wall_s=wall,
                            counters=counters.as_dict() if counters is not None else None, selection=selection))
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
