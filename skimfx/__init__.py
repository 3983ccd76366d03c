"""skimfx: capture a Hugging Face decoder as an FX graph, rewrite it to do less work, run it with a
real KV cache.

    import skimfx
    model, tok = skimfx.load_model("smollm2-135m")
    cm = skimfx.compile(model, tokenizer=tok)
    out = cm.generate("The capital of France is", max_new_tokens=16)
"""
from __future__ import annotations

import torch

from .capture import UnsupportedModelError, capture
from .models import EMBEDDED, load_model
from .passes import PassError, PassManager, default_passes, final_passes
from .program import Program
from .recipes import (RECIPES, H2O, TOVA, Delta, Dense, GemFilter, KeyDiff, Knorm, KVzip, PromptDistill, Quest, Recipe,
                      RecipeError, SentenceKV, SnapKV, StreamingLLM, EarlyExit, SelfSpeculative, kvzip_prompt_ids,
                      kvzip_template_ids,
                      parse_recipe, recipe_label, ShortMK, Steer, Truncate, Hogwild, hogwild_prompt, ExpectedAttention, AdaKV, DuoAttention)
from .runtime import CompiledModel, Generation, KVCache, ModelChangedError, Stats
from .calibrate import (DeltaCalibration, ExitAdapter, ExitCalibration, SkipCalibration, calibrate_delta, calibrate_exits,
                        calibrate_skip, reference_texts, resolve, SteeringCalibration, calibrate_steering,
                        DuoCalibration, calibrate_duo)

from .integrations.compress import PromptCompressor, compress_prompt

__version__ = "0.1.0"


def compile(model: torch.nn.Module, recipe: Recipe | list[Recipe] | str | None = None, *, tokenizer=None,
            max_cache_len: int | None = None, fuse: bool = True, passes=None, decode: str = "auto",
            pack_weights: bool = True) -> CompiledModel:
    """Capture ``model`` (a HF ``…ForCausalLM``), run the passes, return a ``CompiledModel``.

    ``recipe`` (e.g. ``PromptDistill(layers=8, keep=256)``, a list of recipes, or a string such as
    ``"promptdistill:layers=8,keep=256"``) adds the passes that skip work; None is dense. ``fuse=False`` skips the fusion pass (RMSNorm, RoPE, GLU, merged q/k/v and gate/up projections).
    ``passes`` replaces the whole pass list (advanced). The model's weights keep their values and the
    compiled model reads them in place (fusion makes the model's q/k/v and gate/up parameters
    views of one merged buffer per layer, so they are not duplicated; ``pack_weights`` below is the one
    opt-out). ``max_cache_len`` bounds prompt
    + generated tokens (default: the model's context). ``decode``: how ``generate`` runs decode steps:
    "eager" (the interpreted Program), "compiled" (one captured step under torch.compile), "graph" (that
    step replayed as a CUDA graph); "auto" = "graph" on a GPU where every KV policy has a captured step,
    else "eager". ``pack_weights``: on CPU, a weight read by passes over 2-24 rows (verifying drafted
    tokens, decoding a batch) may get a second copy in oneDNN's blocked layout, made on first use where it
    measures faster (about 2x on such passes on 2 Xeon cores); False keeps one copy of every weight
    (``skimfx.kernels.linear.packed_bytes()`` reports the copies).
    """
    if passes is None:
        recipes = parse_recipe(recipe) if isinstance(recipe, str) else \
            [] if recipe is None else [recipe] if isinstance(recipe, Recipe) else list(recipe)
        recipes = [resolve(r).with_tokenizer(tokenizer) for r in recipes]   # calibration files loaded, text tokenized
    program = capture(model)
    if passes is None:
        # recipes read what lowering found (e.g. which layers are sliding-window layers)
        program = PassManager(default_passes(fuse))(program)
        passes = [p for r in recipes for p in r.passes(program.info)] + final_passes(pack_weights)
    program = PassManager(passes)(program)
    if any(s.granularity == "sentence" for s in program.selections.values()) or \
            any(p.sentence_granular for p in program.policies.values()):
        if tokenizer is None:
            raise RecipeError("sentence-granular selection (granularity='sentence', SentenceKV) segments prompts "
                              "with the tokenizer: skimfx.compile(model, recipe, tokenizer=tok)")
        from .runtime.sentences import sentence_end_table

        program.sentence_ends = sentence_end_table(tokenizer).to(program.info.device)
    return CompiledModel(model, program, tokenizer=tokenizer, max_cache_len=max_cache_len, decode=decode)


__all__ = ["compile", "capture", "load_model", "EMBEDDED", "Program", "PassManager", "PassError",
           "default_passes", "CompiledModel", "ModelChangedError", "Generation", "Stats", "KVCache", "UnsupportedModelError",
           "Recipe", "RecipeError", "RECIPES", "Dense", "GemFilter", "PromptDistill", "SnapKV", "StreamingLLM",
           "H2O", "TOVA", "Quest", "Delta", "SentenceKV", "Knorm", "KeyDiff", "KVzip", "kvzip_prompt_ids", "kvzip_template_ids",
           "EarlyExit",
           "SelfSpeculative", "calibrate_exits",
           "ExitCalibration", "ExitAdapter", "calibrate_skip", "SkipCalibration", "calibrate_delta", "DeltaCalibration", "reference_texts", "parse_recipe",
           "recipe_label", "resolve", "ShortMK", "Truncate", "Steer", "Hogwild", "hogwild_prompt", "calibrate_steering", "SteeringCalibration",
           "compress_prompt", "PromptCompressor", "ExpectedAttention", "AdaKV", "DuoAttention", "calibrate_duo",
           "DuoCalibration"]
