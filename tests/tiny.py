"""Small random-weight configs of the architectures skimfx supports (and one it does not)."""
import torch
import transformers as tf

COMMON = dict(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048)


def tiny_configs() -> dict:
    return {
        "llama": tf.LlamaConfig(**COMMON, head_dim=16),
        "qwen2": tf.Qwen2Config(**COMMON),  # q/k/v projections with bias
        "qwen3": tf.Qwen3Config(**COMMON, head_dim=16),  # qk-norm
        "mistral": tf.MistralConfig(**COMMON, head_dim=16, sliding_window=48),
        "gemma3": tf.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=32, sliding_window=40,
                                      query_pre_attn_scalar=24,
                                      layer_types=["sliding_attention", "full_attention"] * 2),
    }


def tiny_model(arch: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tiny_configs()[arch]
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    # random init leaves norms at 1 and biases at 0: perturb them so every parameter matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model
