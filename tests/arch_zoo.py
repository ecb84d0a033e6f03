"""Tiny random checkpoints of every transformers architecture whose experts use `@use_experts_implementation`.

A config class's own defaults describe a real model (billions of parameters); `tiny_config` shrinks
them by field name, the same rule for every architecture, plus a short list of per-architecture fixes
where a config demands it. The architecture list is read from transformers itself, so a new release's
MoE models are swept without anyone adding them here.
"""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path

import torch

from tiny_models import INIT_STD, VOCAB_SIZE, make_tokenizer

LAYERS = 3
HIDDEN = 64
# field name -> tiny value; a field is shrunk only where its default is larger (or the value says so)
SIZES = {
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN,
    "intermediate_size": 64, "ffn_hidden_size": 64, "dense_intermediate_size": 64,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "shared_intermediate_size": 32,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_heads": 4, "n_head": 4, "head_dim": 16,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "moe_top_k": 2, "top_k": 2, "moe_k": 2, "num_experts_per_token": 2,
    "n_group": 1, "topk_group": 1, "num_expert_group": 1, "topk_groups": 1,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8, "index_kpool": 4,
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
    "indexer_compress_ratio": 4, "hc_lowrank": 16, "index_num_heads": 2, "mlp_only_intermediate_size": 64,
    "max_position_embeddings": 256, "sliding_window": 16, "attention_chunk_size": 16,
    "first_k_dense_replace": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "linear_head_dim": 16, "linear_num_heads": 4,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_head_dim": 16, "ssm_state_size": 16,
    "mamba_n_groups": 1, "n_groups": 1, "mamba_d_conv": 4, "conv_kernel": 4, "mamba_expand": 2,
    "time_step_rank": 8, "mamba_dt_rank": 8, "chunk_size": 16, "conv_L_cache": 3,
    "num_nextn_predict_layers": 0, "mtp_num_layers": 0,
    "unpadded_vocab_size": VOCAB_SIZE - 64,  # the head's rows; the embedding is padded to vocab_size
    # vision / audio towers of vision-language and omni models
    "depth": 2, "num_layers": LAYERS, "out_hidden_size": HIDDEN, "text_hidden_size": HIDDEN,
    "projection_dim": HIDDEN, "image_size": 32, "patch_size": 8, "spatial_merge_size": 2,
    "temporal_patch_size": 2, "num_position_embeddings": 16, "num_mel_bins": 16, "output_dim": HIDDEN,
    "projection_intermediate_size": 64,
    "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "n_window": 8,
    "adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN, "adapter_input_size": HIDDEN,
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers")
# sizes a config may leave unset (None) by default that a model cannot be built without
REQUIRED = {"num_experts_per_tok", "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "head_dim",
            "num_experts", "moe_top_k", "moe_intermediate_size",
            "indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio"}
TOKEN_IDS = {"pad_token_id": 4, "eos_token_id": 0, "bos_token_id": 1}

# Per-architecture fixes a config demands (kept short; the generic rule does the rest).
FIXES: dict[str, dict] = {
    "gemma4": {"text_config": {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2,
                               "moe_intermediate_size": 32}},
    "hunyuan_v1_moe": {"num_experts": 8, "moe_topk": 2},  # defaults to one expert
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"]},  # no default; checkpoints name them
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense", "sparse", "sparse"]}},
    "jamba": {"attn_layer_period": 3, "attn_layer_offset": 2},  # else no attention layer among three
    "inkling_mm_model": {"vision_config": {"patch_size": 2}},  # few patch scales: no scipy assignment
    # defaults to all-Mamba; Granite-4 checkpoints mix in attention layers
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    # mrope sections the modeling code assumes where the config leaves them out (shrunk with the rotary)
    "glm4v_moe": {"text_config": {"rope_parameters": {"mrope_section": [8, 12, 12]}}},
    "ernie4_5_vl_moe": {"text_config": {"rope_parameters": {"mrope_section": [22, 22, 20]}}},
    # rotary over the rope part only; zero (identity) experts and top-k under this name
    "longcat_flash": {"head_dim": 8, "moe_topk": 2, "zero_expert_num": 2, "expert_ffn_hidden_size": 32},
    # the default puts experts from layer 3 on and leaves the window unset
    "step3p7": {"text_config": {"mlp_layer_types": ["dense", "sparse", "sparse"], "sliding_window": 16,
                                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                "share_expert_dim": 32}},
    # the thinker and talker read fields their config classes do not declare (checkpoints set them)
    "qwen3_omni_moe": {"thinker_config": {"vision_start_token_id": VOCAB_SIZE - 20},
                       "talker_config": {"text_config": {"shared_expert_intermediate_size": 32},
                                         "spatial_merge_size": 2}},
}


def moe_model_types() -> list[str]:
    """The model type of every model folder of the installed transformers whose modeling code uses the
    experts decorator (a folder's own name, else its top-level config's: `inkling` is `inkling_mm_model`)."""
    import transformers

    root = os.path.dirname(transformers.__file__)
    found = set()
    for path in glob.glob(os.path.join(root, "models", "*", "modeling_*.py")):
        with open(path, encoding="utf-8") as f:
            if "@use_experts_implementation" in f.read():
                found.update(_folder_model_types(Path(path).parent.name))
    return sorted(found)


def _folder_model_types(folder: str) -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name

    if folder in CONFIG_MAPPING:
        return [folder]
    types = [t for t in CONFIG_MAPPING if model_type_to_module_name(t) == folder]
    subs = {c for t in types for c in (getattr(CONFIG_MAPPING[t], "sub_configs", None) or {}).values()}
    return [t for t in types if CONFIG_MAPPING[t] not in subs] or [folder]


def _per_layer(values: list, layers: int) -> list:
    """`layers` entries of a per-layer list, covering as many of its distinct values as fit."""
    n = len(values)
    chosen = [0, n - 1]
    for i, v in enumerate(values):
        if len(chosen) < layers and all(values[c] != v for c in chosen):
            chosen.append(i)
    while len(chosen) < layers:
        chosen.append(n // 2)
    chosen = sorted(chosen[:layers])
    if all(type(v) is int and v <= i for i, v in enumerate(values)):  # layer indices (KV shared from layer v)
        return [chosen.index(values[c]) if values[c] in chosen else j for j, c in enumerate(chosen)]
    return [values[i] for i in chosen]


def _small(key: str, value, scale: int = 1):
    if isinstance(value, bool) or key not in SIZES:
        return value
    if isinstance(value, list) and value and all(type(v) is int and v > 0 for v in value):
        # one size per group (Ernie-4.5-VL's text and vision experts): shrunk together, still different
        top = SIZES[key] * scale
        return [max(1, v * top // max(value)) for v in value] if max(value) > top else value
    if value is None:
        return SIZES[key] * scale if key in REQUIRED else None
    return min(value, SIZES[key] * scale) if isinstance(value, int) and value > 0 else value


def _overrides(defaults: dict, layers: int) -> dict:
    """The keyword arguments that make a config of these defaults tiny (sub-configs as dicts)."""
    out = {}
    old_layers = next((defaults[k] for k in LAYER_COUNTS if isinstance(defaults.get(k), int)), None)
    for key, value in defaults.items():
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")) and key != "per_layer_config":
            out[key] = _overrides(value, layers)
        elif key in LAYER_COUNTS and isinstance(value, int):
            out[key] = layers
        elif key == "per_layer_config" and value:
            # one override, on the last layer, at twice the tiny sizes: still heterogeneous
            first = next(iter(value.values()))
            out[key] = {str(layers - 1): {k: _small(k, v, 2) for k, v in first.items()}}
        elif old_layers and isinstance(value, list) and len(value) == old_layers != layers:
            out[key] = _per_layer(value, layers)  # per-layer lists keep their kinds
        elif _small(key, value) != value:
            out[key] = _small(key, value)
        elif key in TOKEN_IDS and key in defaults:
            out[key] = TOKEN_IDS[key]
        elif key.endswith(("_token_id", "_token_index")) and isinstance(value, int) and value >= VOCAB_SIZE:
            out[key] = VOCAB_SIZE - 1 - len([k for k in out if k.endswith(("_token_id", "_token_index"))])
    if defaults.get("num_key_value_heads") and defaults["num_key_value_heads"] == defaults.get("num_attention_heads"):
        out["num_key_value_heads"] = out.get("num_attention_heads", SIZES["num_attention_heads"])  # MLA, MHA
    rope = defaults.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("mrope_section"):  # sections of the tiny rotary half-size
        heads = out.get("num_attention_heads") or defaults.get("num_attention_heads") or 1
        dim = out.get("qk_rope_head_dim") or out.get("head_dim") or defaults.get("head_dim") or HIDDEN // heads
        half = int(dim * rope.get("partial_rotary_factor", 1.0)) // 2
        old = rope["mrope_section"]
        section = [max(1, s * half // sum(old)) for s in old]
        section[-1] += half - sum(section)  # the spatial (first) sections stay equal where they were
        out["rope_parameters"] = {**rope, "mrope_section": section}
    if "vocab_size" in defaults:
        out["vocab_size"] = VOCAB_SIZE
    if old_layers:
        out["_old_layers"] = old_layers
    return out


def _fix_layer_lists(overrides: dict, built: dict, defaults: dict, layers: int) -> bool:
    """Per-layer lists the config did not rebuild for the new layer count, or rebuilt without some of
    its kinds (three layers of a 3:1 linear/full pattern are all linear); True if any was fixed."""
    fixed = False
    old = overrides.pop("_old_layers", None)
    for key, value in built.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(overrides.get(key), dict) and isinstance(default, dict):
            fixed |= _fix_layer_lists(overrides[key], value, default, layers)
        elif old and isinstance(value, list) and isinstance(default, list) and len(default) == old != layers:
            wanted = _per_layer(default, layers)
            if len(value) != layers or set(map(str, value)) != set(map(str, wanted)):
                overrides[key] = wanted
                fixed = True
    return fixed


def _settable(cls) -> set[str] | None:
    """The names a config class takes: its fields and aliases. Other keys of `to_dict()` are derived in
    `__post_init__` (DeepSeek-V3's head_dim is its qk_rope_head_dim), and so are fields that default to
    "auto" (Granite-MoE-Hybrid's mamba_d_head); passing them would override that."""
    import dataclasses

    if not dataclasses.is_dataclass(cls):
        return None
    aliases = getattr(cls, "attribute_map", {})
    fields = {f.name for f in dataclasses.fields(cls) if f.default != "auto"}
    return fields | set(aliases) | set(aliases.values())


def _strip(overrides: dict, cls=None) -> dict:
    settable = _settable(cls) if cls is not None else None
    subs = getattr(cls, "sub_configs", {}) or {}
    return {k: _strip(v, subs.get(k)) if isinstance(v, dict) and k != "per_layer_config" else v
            for k, v in overrides.items() if k != "_old_layers" and (settable is None or k in settable)}


def tiny_config(model_type: str, layers: int = LAYERS):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fixes = FIXES.get(model_type, {})
    defaults = _merge(cls().to_dict(), fixes)  # fixes are what a checkpoint sets; they are shrunk like the rest
    overrides = _overrides(defaults, layers)
    overrides.update(initializer_range=INIT_STD, tie_word_embeddings=False)
    config = cls(**_merge(fixes, _strip(overrides, cls)))
    if _fix_layer_lists(overrides, config.to_dict(), defaults, layers):
        config = cls(**_merge(fixes, _strip(overrides, cls)))
    return config


def _merge(base: dict, top: dict) -> dict:
    """`base` with `top` on it, sub-config by sub-config (a fix may name a field the class lacks)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


@functools.cache
def model_class(model_type: str):
    """The class a text chat runs: the causal LM if transformers has one for this config, else the
    conditional-generation one (Qwen3.5-MoE's causal LM takes only its text sub-config)."""
    import transformers
    from transformers.models.auto import modeling_auto as ma
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"):
        cls = getattr(transformers, getattr(ma, mapping, {}).get(model_type) or "", None)
        config_class = getattr(cls, "config_class", None)
        if cls is not None and (config_class is None or issubclass(CONFIG_MAPPING[model_type], config_class)):
            return cls
    return None


def _head_class(model_type: str):
    """A model with no text head still gets a checkpoint (with its own head), to be refused by name."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    for mapping in sorted(n for n in dir(ma) if n.startswith("MODEL_FOR_") and n.endswith("_MAPPING_NAMES")):
        name = getattr(ma, mapping).get(model_type)
        if isinstance(name, str) and hasattr(transformers, name):
            return getattr(transformers, name)
    return None


def make_zoo_model(out_dir: Path | str, model_type: str, *, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(model_type)
    cls = model_class(model_type) or _head_class(model_type)
    torch.manual_seed(seed)
    model = cls._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("experts" in name or "gate" in name or "router" in name):
                p.normal_(0.0, INIT_STD * 2)
    model.save_pretrained(out)
    make_tokenizer(out)
    return out
