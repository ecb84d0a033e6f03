"""Quantized experts and dense layers: torch's kernels compute the dequantized weights, the cache never
changes a format's tokens, and a quantized model is stock transformers on its dequantized weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import EngineError, Session, load_model
from engine.cache.policies import POLICIES
from engine.moe.interface import expert_tensor_names, is_experts_module
from engine.moe.quantize import dequantize, qmatmul, quantize
from test_equivalence import PROMPT, engine_tokens
from tiny_models import ARCHITECTURES

QUANTIZED = ["int8", "int4"]


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_kernels_compute_the_dequantized_weights(fmt):
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    q, scale = quantize(w, fmt)
    d = dequantize(q, scale, fmt)
    err = (d - w).norm() / w.norm()
    assert err < (0.01 if fmt == "int8" else 0.1)  # 8 bits per channel, 4 bits per group of 128
    x = torch.randn(5, 128)
    torch.testing.assert_close(qmatmul(x, q, scale, fmt, torch.float32), x @ d.T, rtol=1e-5, atol=1e-4)
    xb = x.bfloat16().float()  # bfloat16 activations: the weights are the same, the rows rounded
    torch.testing.assert_close(qmatmul(x, q, scale, fmt, torch.bfloat16), xb @ d.T, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cache_never_changes_the_tokens_of_a_format(tiny_model_factory, monkeypatch, arch, fmt):
    """At budgets 0, partial and 1, every policy, simulated cache and forced slots, and with the budget
    changed mid-reply: the same tokens within one format (backend pinned: its choice is timed at load)."""
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", f"{fmt}-bf16")
    path = tiny_model_factory(arch)
    expected = None
    for force_slots in (False, True):
        loaded = load_model(path, device="cpu", budget=0, force_slots=force_slots, profile=None, experts=fmt)
        rt = loaded.runtime
        assert rt.format == fmt and rt.cpu_matmul == f"{fmt}-bf16" and loaded.dense == fmt
        session = Session(loaded)
        expected = expected or engine_tokens(session)
        for policy in POLICIES:
            rt.set_policy(policy)
            for budget in (0, 0.3, 1.0):
                rt.set_budget(budget)
                assert engine_tokens(session) == expected, (force_slots, policy, budget)
        budgets = [0, 1.0, 0.25, 0.75, 0.1]
        assert engine_tokens(session, on_token=lambda n: rt.set_budget(budgets[n % len(budgets)])) == expected
        assert rt.snapshot()["experts"] == fmt


def _dequantized_stock(path, loaded) -> torch.nn.Module:
    """Stock transformers with the engine's experts replaced by their dequantized weights."""
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = [m for m in loaded.model.modules() if hasattr(m, "_moe_tensors")]
    theirs = [m for m in stock.modules() if is_experts_module(m)]
    assert len(ours) == len(theirs) > 0
    with torch.no_grad():
        for mine, stock_module in zip(ours, theirs):
            for name in expert_tensor_names(stock_module):
                if name.endswith("_bias"):
                    continue
                q, s = mine._moe_tensors[name + ".q"], mine._moe_tensors[name + ".scale"]
                d = torch.stack([dequantize(q[e], s[e], loaded.experts) for e in range(q.shape[0])])
                getattr(stock_module, name).copy_(d.transpose(1, 2) if stock_module.is_transposed else d)
    return stock


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantized_experts_are_stock_transformers_on_the_dequantized_weights(tiny_model_factory, monkeypatch,
                                                                            arch, fmt):
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", f"{fmt}-fp32")  # float32 activations: only the weights differ
    path = tiny_model_factory(arch)
    loaded = load_model(path, device="cpu", budget=0.3, profile=None, experts=fmt, dense="source")
    stock = _dequantized_stock(path, loaded)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ours, theirs = loaded.model(ids).logits, stock(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    out = stock.generate(ids, max_new_tokens=len(engine_tokens(Session(loaded))), do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert engine_tokens(Session(loaded)) == out[0, len(PROMPT):].tolist()


def test_dense_int8_follows_the_dequantized_weights(tiny_model_factory, monkeypatch):
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", "int8-fp32")
    path = tiny_model_factory("qwen2_moe")  # shared experts and attention: dense layers of every kind
    loaded = load_model(path, device="cpu", profile=None, experts="int8", dense="int8")
    stock = _dequantized_stock(path, loaded)
    layers = dict(loaded.model.named_modules())
    with torch.no_grad():
        for name, module in stock.named_modules():
            mine = layers.get(name)
            if isinstance(module, torch.nn.Linear) and hasattr(mine, "q"):
                module.weight.copy_(dequantize(mine.q, mine.scale, "int8"))
        ids = torch.tensor([PROMPT])
        torch.testing.assert_close(loaded.model(ids).logits, stock(ids).logits, rtol=1e-4, atol=1e-4)
    assert any(hasattr(m, "q") for m in layers.values())  # really quantized
    assert not any(hasattr(layers[n], "q") for n in layers if n.endswith(("gate", "router")))  # routers not


def test_format_choices_and_messages(tiny_model_factory):
    path = tiny_model_factory("qwen3_moe")
    with pytest.raises(EngineError, match="unknown weight format 'fp8'; choose one of source, int8, int4, auto"):
        load_model(path, device="cpu", profile=None, experts="fp8")
    auto = load_model(path, device="cpu", profile=None)
    assert (auto.experts, auto.dense) == ("source", "source")  # a tiny model fits: the checkpoint's precision
    info = auto.info.to_dict()
    assert info["auto_experts"] == "source"
    sizes = {f: info["formats"][f]["expert_bytes"] for f in ("source", "int8", "int4")}
    assert sizes["source"] == auto.info.expert_bytes
    assert sizes["source"] > 3 * sizes["int8"] and sizes["int8"] > 1.5 * sizes["int4"]
    int4 = load_model(path, device="cpu", profile=None, experts="int4", budget=1.0)
    assert int4.runtime.expert_bytes == sizes["int4"]  # the estimate is what the runtime holds
    assert int4.runtime.cache.capacity == int4.runtime.num_experts * int4.runtime.num_layers


def test_int4_refused_where_the_kernel_cannot_take_the_shape(tmp_path):
    from tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path / "odd", "qwen3_moe", hidden=48)  # 48 input channels: no group of 32
    with pytest.raises(EngineError, match="int4 kernel"):
        load_model(path, device="cpu", profile=None, experts="int4")
    assert load_model(path, device="cpu", profile=None, experts="int8").experts == "int8"


def test_saved_copy_is_used_checked_and_rebuilt(tiny_model_factory, monkeypatch):
    import os

    from engine.model import loader, quantized_copy

    path = tiny_model_factory("mixtral")
    calls = []
    real = loader.quantize_stack
    monkeypatch.setattr(loader, "quantize_stack", lambda *a: (calls.append(a[1]), real(*a)))
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", "int8-bf16")

    def tokens():
        loaded = load_model(path, device="cpu", profile=None, experts="int8")
        return engine_tokens(Session(loaded))

    first = tokens()
    folder = quantized_copy.copy_dir(path, "int8")
    assert calls and (folder / "manifest.json").exists() and not folder.with_name("int8.partial").exists()
    calls.clear()
    assert tokens() == first and not calls  # read from the copy, nothing quantized again
    next(folder.glob("*.safetensors")).write_bytes(b"\x00" * 16)  # damaged
    assert tokens() == first and calls
    calls.clear()
    (folder / quantized_copy.MANIFEST).unlink()  # a load cut short before the copy was complete
    assert tokens() == first and calls
    calls.clear()
    weights = path / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the source changed
    assert tokens() == first and calls


def test_disk_full_while_saving_leaves_nothing_and_the_model_loads(tiny_model_factory, monkeypatch, caplog):
    import errno

    from engine.model import quantized_copy

    def full(tensors, file):
        file.write_bytes(b"\x00" * 100)  # part of the file got out before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantized_copy, "_write", full)
    path = tiny_model_factory("qwen3_moe")
    loaded = load_model(path, device="cpu", profile=None, experts="int4")
    assert loaded.experts == "int4" and engine_tokens(Session(loaded))
    folder = quantized_copy.copy_dir(path, "int4")
    assert not folder.exists() and not folder.with_name("int4.partial").exists()
    assert "No space left on device" in caplog.text


def test_demo_model_keeps_its_greedy_choices_when_quantized():
    """Top-1 agreement with source over held-out replies' tokens (the full evaluation, with accuracy per
    format: `python -m tools.demo_model.evaluate --formats source,int8,int4`)."""
    from engine.paths import DEMO_MODEL_DIR
    from tools.demo_model.evaluate import top1_agreement

    if not (DEMO_MODEL_DIR / "config.json").exists():
        pytest.skip("the demo model is not built")
    assert top1_agreement(DEMO_MODEL_DIR, "int8", per_family=4) >= 0.99
    assert top1_agreement(DEMO_MODEL_DIR, "int4", per_family=4) >= 0.95
