"""GGUF metadata -> a transformers config, through transformers' own key mapping
(`transformers.integrations.ggml.GGUF_CONFIG_MAPPING`) plus the MoE keys it lacks."""

from __future__ import annotations

import numpy as np

from ..errors import ModelError
from .reader import GGUFModel

# GGUF architecture string -> transformers model_type ("llama" with experts is Mixtral: see `model_type`)
ARCHITECTURES = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "olmoe": "olmoe", "gpt-oss": "gpt_oss",
                 "llama": "llama"}
_COMMON = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# what transformers' mapping lacks (its qwen MoE entries read no expert size, it has no olmoe or Mixtral)
EXTRA_KEYS = {
    "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
    "qwen2_moe": {"expert_feed_forward_length": "moe_intermediate_size",
                  "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
    "olmoe": {**_COMMON, "expert_count": "num_experts", "expert_used_count": "num_experts_per_tok"},
    "mixtral": {**_COMMON, "rope.dimension_count": "head_dim", "expert_count": "num_local_experts",
                "expert_used_count": "num_experts_per_tok"},
    "gpt_oss": {"expert_feed_forward_length": "intermediate_size", "attention.key_length": "head_dim",
                "attention.sliding_window": "sliding_window"},
}


def model_type(gguf: GGUFModel) -> str:
    """The transformers model_type of a GGUF architecture, or a ModelError naming the one not supported."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"{gguf.files[0].name}: the GGUF architecture {arch!r} is not supported yet "
                         f"(MoE Chat reads GGUF files of {supported})")
    if arch == "llama" and (gguf.get("expert_count") or 0) > 0:
        return "mixtral"  # llama.cpp writes Mixtral as llama with experts
    return ARCHITECTURES[arch]


def config_dict(gguf: GGUFModel) -> dict:
    """The keyword arguments of the transformers config this file's metadata describes."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    hf_type = model_type(gguf)
    keys = {**GGUF_CONFIG_MAPPING.get(hf_type, {}), **EXTRA_KEYS.get(hf_type, {})}
    out: dict = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(hf_type, {}))
    prefix = gguf.architecture + "."
    for key, value in gguf.metadata.items():
        name = keys.get(key[len(prefix):]) if key.startswith(prefix) else None
        if name and name != -1:  # None and -1 in transformers' mapping mean "not a config field"
            out[name] = float(str(np.float32(value))) if isinstance(value, float) else value  # 1e-05, not 9.99e-06
    if "vocab_size" not in out and "tokenizer.ggml.tokens" in gguf.metadata:
        out["vocab_size"] = len(gguf.metadata["tokenizer.ggml.tokens"])
    if "vocab_size" not in out and "token_embd.weight" in gguf.tensors:
        out["vocab_size"] = int(gguf.tensors["token_embd.weight"].shape[-1])
    out["tie_word_embeddings"] = "output.weight" not in gguf.tensors
    for key, name in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        if f"tokenizer.ggml.{key}_token_id" in gguf.metadata:
            out[f"{name}_token_id"] = gguf.metadata[f"tokenizer.ggml.{key}_token_id"]
    if hf_type == "gpt_oss":
        out.update(_gpt_oss(gguf, out))
    if hf_type in ("qwen2_moe", "qwen3_moe"):
        out.setdefault("decoder_sparse_step", 1)
        out.setdefault("mlp_only_layers", [])
    if hf_type == "qwen2_moe":
        out.setdefault("norm_topk_prob", False)  # llama.cpp's qwen2moe does not renormalise the top-k
    if hf_type == "olmoe":
        out.setdefault("norm_topk_prob", False)
    return out


def _gpt_oss(gguf: GGUFModel, out: dict) -> dict:
    """GPT-OSS: rope scaling (YaRN) and its alternating sliding-window layers (llama.cpp: even layers slide)."""
    extra = {}
    prefix = gguf.architecture + ".rope.scaling."
    scaling = {k[len(prefix):]: v for k, v in gguf.metadata.items() if k.startswith(prefix)}
    if scaling.get("type"):
        from transformers import GptOssConfig

        rope = dict(GptOssConfig().rope_parameters)  # beta_fast, beta_slow, truncate: not in GGUF files
        rope.update(rope_type=scaling.pop("type"), rope_theta=out.get("rope_theta", rope.get("rope_theta")))
        for k, v in scaling.items():
            rope["original_max_position_embeddings" if k == "original_context_length" else k] = v
        extra["rope_parameters"] = rope
    layers = out.get("num_hidden_layers", 0)
    extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return extra


def make_config(gguf: GGUFModel):
    """The transformers config object; a value it refuses becomes a ModelError naming the file."""
    from transformers import AutoConfig

    kwargs = config_dict(gguf)
    try:
        return AutoConfig.for_model(model_type(gguf), **kwargs)
    except Exception as e:
        raise ModelError(f"{gguf.files[0].name}: its metadata does not make a valid {model_type(gguf)} config "
                         f"({type(e).__name__}: {e}); the file is damaged or made by an unusual converter") from None
