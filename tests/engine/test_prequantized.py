"""Pre-quantized checkpoints as the Hub ships them: FP8 block-scaled weights (the Qwen3 / DeepSeek -FP8
releases) and GPT-OSS's MXFP4 experts. transformers dequantizes them on the CPU tensor by tensor; the
engine then holds them at the source precision (exactly the dequantized values) or quantizes them into
int8/int4 as they arrive. Other quantization methods are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine import Session, inspect_model, load_model
from engine.errors import ModelError
from engine.moe.interface import expert_tensor_names, is_experts_module
from test_equivalence import NEW, PROMPT, engine_tokens
from test_quantized import _dequantized_stock

FP8_BLOCK = 32  # the releases use 128; the tiny models' matrices are 32-64 wide
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _fp8_block_scaled(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes and the per-block `weight_scale_inv` that multiplies them back."""
    o, i = w.shape
    blocks = w.float().reshape(o // FP8_BLOCK, FP8_BLOCK, i // FP8_BLOCK, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    codes = (blocks / scale[:, None, :, None]).reshape(o, i).to(torch.float8_e4m3fn)
    return codes, scale


def _fp8_dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    o, i = codes.shape
    blocks = codes.float().reshape(o // FP8_BLOCK, FP8_BLOCK, i // FP8_BLOCK, FP8_BLOCK)
    return (blocks * scale[:, None, :, None]).reshape(o, i)


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[experts, out, in] -> GPT-OSS's blocks [experts, out, in/32, 16] (two e2m1 codes a byte, low
    nibble first) and scales [experts, out, in/32] (a power-of-two exponent, biased by 127)."""
    e, o, i = w.shape
    groups = w.float().reshape(e, o, i // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -100) / 6.0)).clamp(-127, 127)
    values = groups / torch.exp2(exponent)[..., None]
    index = (values.abs()[..., None] - FP4_VALUES).abs().argmin(-1)
    codes = (index | (((values < 0) & (index > 0)).long() << 3)).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), (exponent + 127).to(torch.uint8)


def _mxfp4_dequantized(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    signed = torch.cat([FP4_VALUES, -FP4_VALUES])
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32).long()
    values = signed[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.reshape(*scales.shape[:-1], -1)


def _rewrite(src: Path, out: Path, tensors: dict, quantization: dict) -> Path:
    out.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            (out / p.name).write_bytes(p.read_bytes())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def fp8_model(tiny_model_factory, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny Qwen3-MoE whose attention and expert matrices are FP8 in blocks (router, norms, embedding
    and head stay), and the exact float32 values the FP8 weights stand for."""
    tensors, exact = {}, {}
    for key, w in _state(tiny_model_factory("qwen3_moe")).items():
        if w.dim() == 2 and ".layers." in key and key.endswith("proj.weight"):
            tensors[key], tensors[key + "_scale_inv"] = _fp8_block_scaled(w)
            exact[key] = _fp8_dequantized(tensors[key], tensors[key + "_scale_inv"])
        else:
            tensors[key] = w
    for layer in range(3):  # stacked as transformers holds Qwen3-MoE experts: [experts, out, in]
        prefix = f"model.layers.{layer}.mlp.experts."
        per_expert = lambda name: [exact.pop(f"{prefix}{e}.{name}.weight") for e in range(8)]  # noqa: E731
        exact[prefix + "gate_up_proj"] = torch.stack([torch.cat(pair) for pair in
                                                     zip(per_expert("gate_proj"), per_expert("up_proj"))])
        exact[prefix + "down_proj"] = torch.stack(per_expert("down_proj"))
    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    return _rewrite(tiny_model_factory("qwen3_moe"), tmp_path_factory.mktemp("fp8") / "qwen3_moe", tensors,
                    quantization), exact


@pytest.fixture(scope="module")
def mxfp4_model(tiny_model_factory, tmp_path_factory) -> tuple[Path, dict]:
    """A tiny GPT-OSS with MXFP4 experts (as the releases ship them), and their exact values."""
    tensors, exact = {}, {}
    for key, w in _state(tiny_model_factory("gpt_oss")).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _mxfp4(w.transpose(1, 2))  # held [in, out]; MXFP4 groups run along `in`
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
            exact[key] = _mxfp4_dequantized(blocks, scales).transpose(1, 2)
        else:
            tensors[key] = w
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return _rewrite(tiny_model_factory("gpt_oss"), tmp_path_factory.mktemp("mxfp4") / "gpt_oss", tensors,
                    quantization), exact


@pytest.fixture(params=["fp8", "mxfp4"])
def prequantized(request) -> tuple[str, Path, dict]:
    path, exact = request.getfixturevalue(f"{request.param}_model")
    return request.param, path, exact


def test_source_holds_exactly_the_dequantized_values_and_matches_stock(prequantized):
    method, path, exact = prequantized
    assert inspect_model(path).checkpoint_quantization == method
    loaded = load_model(path, device="cpu", budget=0, profile=None, experts="source", dense="source")
    for key, value in exact.items():
        module_path, _, name = key.rpartition(".")
        module = loaded.model.get_submodule(module_path)
        if is_experts_module(module):  # `exact` holds them as transformers does
            assert name in expert_tensor_names(module)
            held = getattr(module, name)
        else:  # FP8 attention projections
            held = module.weight
        torch.testing.assert_close(held.float(), value, rtol=0, atol=0)
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    out = stock.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    expected = out[0, len(PROMPT):].tolist()
    for force_slots in (False, True):
        loaded = load_model(path, device="cpu", budget=0, force_slots=force_slots, profile=None, experts="source")
        session = Session(loaded)
        for budget in (0, 0.3, 1.0):
            loaded.runtime.set_budget(budget)
            assert engine_tokens(session) == expected, (method, force_slots, budget)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_from_a_prequantized_checkpoint(prequantized, monkeypatch, fmt):
    """int8/int4 made from the dequantized weights as they load: stock transformers on those weights
    gives the same tokens, and the cache never changes them."""
    method, path, _ = prequantized
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", f"{fmt}-fp32")  # float32 activations: only the weights differ
    loaded = load_model(path, device="cpu", budget=0.3, profile=None, experts=fmt, dense="source")
    assert loaded.experts == fmt
    stock = _dequantized_stock(path, loaded)
    out = stock.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    session = Session(loaded)
    expected = engine_tokens(session)
    assert expected == out[0, len(PROMPT):].tolist()
    for budget in (0, 1.0):
        loaded.runtime.set_budget(budget)
        assert engine_tokens(session) == expected, (method, fmt, budget)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_other_quantization_methods_are_refused_by_name(tiny_model_factory, tmp_path, method):
    path = _rewrite(tiny_model_factory("qwen3_moe"), tmp_path / method, _state(tiny_model_factory("qwen3_moe")),
                    {"quant_method": method, "bits": 4})
    with pytest.raises(ModelError, match=f"quantized with '{method}'.*original bf16/fp16 release"):
        inspect_model(path)
