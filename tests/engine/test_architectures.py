"""Every transformers MoE architecture with a text path, built tiny from its own config class: the engine's
greedy tokens equal stock transformers' at budgets 0, partial and 1, through the slot (copy) path."""

from __future__ import annotations

import pytest
import torch

from arch_zoo import make_zoo_model, model_class, tiny_config
from engine import GenerationParams, Session, load_model
from engine.model.session import text_model

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128]
NEW = 8
# Swept with tests/arch_zoo.py on transformers 5.25: these build and run in stock transformers (and match).
# Vision-language, OCR and omni models run text-only through their conditional-generation class.
TEXT_ARCHITECTURES = [
    "afmoe", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "deepseek_v4", "dots1", "ergo", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint",
    "gemma4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "jamba", "kimi_linear",
    "kolibri1", "kolibri1_1", "laguna", "lara_mini", "lfm2_moe", "longcat_flash", "mellum", "mimo_v2_flash",
    "minicpm5_moe", "minimax", "minimax_m2", "mistral4", "mixtral", "nemotron_h", "olmoe", "phimoe",
    "qwen2_moe", "qwen3_moe", "qwen3_next", "solar_open", "zaya",
]
# Omni models (qwen3_omni_moe) run their thinker, the sub-model that writes text.
VISION_LANGUAGE = [
    "aria", "deepseek_ocr2", "dots3_note", "ernie4_5_vl_moe", "glm4v_moe", "glm5_next", "hy_v4_vl", "inkling2",
    "inkling2_loop", "inkling_mm_model", "minimax_m3_vl", "mistral_large4", "muse_spark", "qwen3_5_moe",
    "qwen3_omni_moe", "qwen3_vl_moe", "qwen4_exp", "step3p7", "unlimited_ocr",
]


@pytest.mark.parametrize("model_type", TEXT_ARCHITECTURES + VISION_LANGUAGE)
def test_engine_matches_stock_transformers(tmp_path, model_type):
    path = make_zoo_model(tmp_path / model_type, model_type)
    stock = text_model(model_class(model_type).from_pretrained(path))
    out = stock.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    expected = out[0, len(PROMPT):].tolist()
    assert _tokens_with_experts_shuffled(stock) != expected, "the tiny model ignores its experts"
    del stock
    loaded = load_model(path, device="cpu", budget=0, force_slots=True, profile=None)
    assert loaded.runtime is not None and loaded.runtime.num_layers > 0, "no MoE layers found"
    session = Session(loaded)
    for budget in (0, 0.3, 1.0):
        loaded.runtime.set_budget(budget)
        session.reset()
        session.eos_ids = set()
        tokens = [ev.token_id for ev in session.generate(
            PROMPT, GenerationParams(max_new_tokens=NEW, greedy=True, repetition_penalty=1.0))]
        assert tokens == expected, (model_type, budget)
    assert loaded.runtime.step > 0, "the runtime never saw a step of the model that wrote the text"


def _tokens_with_experts_shuffled(model) -> list[int]:
    """Greedy tokens when each token runs the wrong experts: the equality above means something only if
    these differ."""
    from engine.moe.interface import expert_tensor_names, is_experts_module

    with torch.no_grad():
        for module in filter(is_experts_module, model.modules()):
            for name in expert_tensor_names(module):
                getattr(module, name).copy_(getattr(module, name).roll(1, 0))
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3", "phimoe",
                                        "hunyuan_v1_moe", "afmoe"])  # the last two: a linear inside the gate
def test_router_hints_read_the_right_router(tmp_path, model_type):
    """The router found beside each layer's experts, applied to that layer's own input, picks the experts
    the layer picked (plain top-k routers; grouped or corrected ones may differ a little): so a layer
    early, on the layer before's input, it is the forecast `router_hint` means it to be."""
    from engine.moe.router_hint import router_top_k

    loaded = load_model(make_zoo_model(tmp_path / model_type, model_type), device="cpu", budget=0.5,
                        force_slots=True, profile=None)
    rt = loaded.runtime
    assert all(r is not None for r in rt.routers)
    agree = []

    def check(event):
        own = router_top_k(rt.routers[event.layer], event.hidden_states, event.experts.shape[1])
        agree.extend(set(a) == set(b) for a, b in zip(own.tolist(), event.experts.tolist()))

    rt.add_observer(check)
    session = Session(loaded)
    session.eos_ids = set()
    list(session.generate(PROMPT, GenerationParams(max_new_tokens=3, greedy=True, repetition_penalty=1.0)))
    assert len(agree) > 0 and sum(agree) >= 0.9 * len(agree)


def test_post_expert_norm_path_is_among_them():
    """muse_spark normalises each expert's output before weighting it: the engine's path for that runs above."""
    from engine.moe.interface import is_experts_module

    config = tiny_config("muse_spark")
    with torch.device("meta"):
        model = model_class("muse_spark")._from_config(config)
    assert "muse_spark" in VISION_LANGUAGE
    assert any(m.has_post_expert_norm for m in filter(is_experts_module, model.modules()))


def test_a_follow_up_turn_on_a_model_owned_cache(tmp_path):
    """MiniMax makes its own cache; a conversation edited back cannot crop it, so it starts over, correctly."""
    path = make_zoo_model(tmp_path / "minimax", "minimax")
    loaded = load_model(path, device="cpu", budget=0.5, profile=None)
    session = Session(loaded)
    params = GenerationParams(max_new_tokens=4, greedy=True, repetition_penalty=1.0)
    session.eos_ids = set()
    first = [ev.token_id for ev in session.generate(PROMPT, params)]
    edited = PROMPT[:5] + [9, 9]
    again = [ev.token_id for ev in session.generate(edited, params)]
    session.reset()
    fresh = [ev.token_id for ev in session.generate(edited, params)]
    assert len(first) == 4 and again == fresh


def test_per_layer_config_memory_estimate(tmp_path):
    """Gemma-4 style configs have per-layer head sizes: the KV estimate sums the layers' own values."""
    from transformers import AutoConfig

    from engine import inspect_model

    path = make_zoo_model(tmp_path / "gemma4", "gemma4")
    info = inspect_model(path)
    text = AutoConfig.from_pretrained(path).get_text_config()
    layers = [text.per_layer_config[i] for i in range(text.num_hidden_layers)]
    assert len({layer.head_dim for layer in layers}) == 2  # the tiny config really is heterogeneous
    expected = sum(2 * layer.num_key_value_heads * layer.head_dim * 4 for layer in layers)
    assert info.kv_bytes_per_token == expected and info.num_moe_layers == 3


def test_readme_lists_the_tested_architectures():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- architectures: generated from tests/engine/test_architectures.py -->")[1]
    table = table.split("<!-- /architectures -->")[0]
    listed = {name for name in table.replace(",", " ").replace(".", " ").split() if name.startswith("`")}
    assert listed == {f"`{a}`" for a in TEXT_ARCHITECTURES + VISION_LANGUAGE}


# The MoE architectures that cannot chat, and the message that says so by name.
REFUSED = {
    "diffusion_gemma": "DiffusionGemmaForBlockDiffusion is not a text-generation architecture",  # block diffusion
    "openai_privacy_filter": "OpenAIPrivacyFilterForTokenClassification is not a text-generation architecture",
}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_a_model_that_does_not_generate_text_is_refused_with_its_name(tmp_path, model_type):
    from engine import inspect_model
    from engine.errors import ModelError

    path = make_zoo_model(tmp_path / model_type, model_type)
    with pytest.raises(ModelError, match=REFUSED[model_type]):
        inspect_model(path)


def test_every_moe_architecture_of_transformers_is_tested_or_refused():
    """A transformers release that adds an MoE model fails here until it is swept and listed."""
    from arch_zoo import moe_model_types

    listed = set(TEXT_ARCHITECTURES) | set(VISION_LANGUAGE) | set(REFUSED)
    assert sorted(set(moe_model_types()) - listed) == []
