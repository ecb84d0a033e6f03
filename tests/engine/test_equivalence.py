"""The hybrid engine must give stock transformers' greedy tokens at every budget, policy and cache mode."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import GenerationParams, Session, load_model
from engine.cache.policies import POLICIES
from engine.moe.cpu_split import OneRowLinear
from tiny_models import ARCHITECTURES

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128]
NEW = 16
GREEDY = GenerationParams(max_new_tokens=NEW, greedy=True, repetition_penalty=1.0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def reference_tokens(path, device: str = "cpu") -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path).to(device)
    out = model.generate(torch.tensor([PROMPT], device=device), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def split_tokens(loaded) -> list[int]:
    """The tokens with the CPU experts split over two threads."""
    from engine.moe.cpu_split import SplitRunner

    rt = loaded.runtime
    rt.cpu.split = SplitRunner(workers=1)
    try:
        return engine_tokens(Session(loaded))
    finally:
        rt.cpu.split.close()
        rt.cpu.split = None


def engine_tokens(session: Session, on_token=None) -> list[int]:
    session.reset()
    session.eos_ids = set()  # compare full-length runs, as the reference does
    tokens = []
    for ev in session.generate(PROMPT, GREEDY):
        tokens.append(ev.token_id)
        if on_token:
            on_token(len(tokens))
    return tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("device,force_slots", [
    ("cpu", False), ("cpu", True), pytest.param("cuda", False, marks=needs_cuda)], ids=["simulated", "slots", "cuda"])
def test_same_greedy_tokens_as_transformers(tiny_model_factory, arch, device, force_slots):
    path = tiny_model_factory(arch)
    expected = reference_tokens(path, device)
    loaded = load_model(path, device=device, budget=0, force_slots=force_slots, profile=None)
    rt = loaded.runtime
    assert rt is not None and rt.simulated_cache is (device == "cpu" and not force_slots)
    session = Session(loaded)
    for policy in POLICIES:
        rt.set_policy(policy)
        for budget in (0, 0.3, 1.0):
            rt.set_budget(budget)
            rt.reset_stats()
            assert engine_tokens(session) == expected, (arch, policy, budget)
            snap = rt.snapshot()
            assert snap["policy"] == policy
            assert snap["hits"] + snap["misses"] + snap["fetches"] == (len(PROMPT) + NEW - 1) * 2 * rt.num_layers
            if budget == 0:
                assert snap["hits"] == 0
            else:
                assert snap["hits"] > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("force_slots", [False, True], ids=["simulated", "slots"])
def test_cpu_experts_split_over_two_threads(tiny_model_factory, arch, force_slots):
    """The decode step's CPU experts spread over worker threads (on when torch has 2+ threads)."""
    from engine.moe.cpu_split import SplitRunner

    path = tiny_model_factory(arch)
    loaded = load_model(path, device="cpu", budget=0.3, force_slots=force_slots, profile=None)
    rt = loaded.runtime
    for ways in (2, 3):  # two and three parts (top-k 2 models run two)
        rt.cpu.split = SplitRunner(workers=ways - 1)
        try:
            assert engine_tokens(Session(loaded)) == reference_tokens(path), ways
        finally:
            rt.cpu.split.close()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("force_slots", [False, True], ids=["simulated", "slots"])
def test_numpy_cpu_matmuls(tiny_model_factory, arch, force_slots):
    """numpy computes the CPU SwiGLU experts, on one thread and split over two: the same tokens."""
    path = tiny_model_factory(arch)
    expected = reference_tokens(path)
    loaded = load_model(path, device="cpu", budget=0.3, force_slots=force_slots, profile=None)
    rt = loaded.runtime
    rt.set_cpu_matmul("numpy")
    swiglu = arch != "gpt_oss"  # GPT-OSS's clamped, biased gate stays with torch
    assert rt.cpu.weights[0].swiglu is swiglu and rt.cpu_matmul == ("numpy" if swiglu else "torch")
    assert all((own.backend == "numpy") is swiglu for own in rt.cpu.weights)
    assert engine_tokens(Session(loaded)) == expected
    assert split_tokens(loaded) == expected
    rt.set_cpu_matmul("torch")
    assert isinstance(rt.cpu.weights[0].mats1[0], torch.Tensor)
    assert engine_tokens(Session(loaded)) == expected


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("force_slots", [False, True], ids=["simulated", "slots"])
def test_out_in_layout_by_mv_and_by_mm(tiny_model_factory, arch, force_slots, monkeypatch):
    """Weights held out-in (as checkpoints ship them; chosen where it streams faster, see cpu_layout):
    experts by torch.mv and by mm, dense layers by torch.mv, on one thread and split over two, give
    stock's tokens."""
    monkeypatch.setenv("MOE_CHAT_CPU_LAYOUT", "out-in mv")
    path = tiny_model_factory(arch)
    expected = reference_tokens(path)
    loaded = load_model(path, device="cpu", budget=0.3, force_slots=force_slots, profile=None)
    rt = loaded.runtime
    assert all(w.out_in for w in rt.cpu.weights)
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.is_contiguous() and isinstance(vars(m).get("forward"), OneRowLinear) for m in linears)
    for backend in ("torch-mv", "torch"):
        rt.set_cpu_matmul(backend)
        assert rt.cpu_matmul == backend
        assert engine_tokens(Session(loaded)) == expected
    assert split_tokens(loaded) == expected


def test_bf16_out_in_cache_never_changes_tokens(tiny_model_factory, monkeypatch):
    """bfloat16 experts and dense layers by torch.mv: budget 0, partial and all, simulated and forced slots, the same
    tokens (and stock transformers' on this tiny model)."""
    monkeypatch.setenv("MOE_CHAT_CPU_LAYOUT", "out-in mv")
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", "torch-mv")
    path = tiny_model_factory("qwen3_moe", dtype=torch.bfloat16)
    got = []
    for budget, force_slots in [(0, False), (0.3, False), (0.3, True), (1.0, True)]:
        loaded = load_model(path, device="cpu", budget=budget, force_slots=force_slots, profile=None)
        assert loaded.runtime.cpu_matmul == "torch-mv" and loaded.info.dtype == "bfloat16"
        got.append(engine_tokens(Session(loaded)))
        loaded.runtime.close()
    assert all(g == got[0] for g in got)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert got[0] == out[0, len(PROMPT):].tolist()


def test_cpu_matmul_backend_chosen_by_timing(tiny_model_factory, monkeypatch):
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", "auto")
    path = tiny_model_factory("qwen3_moe")
    loaded = load_model(path, device="cpu", budget=0.3, profile=None)
    assert loaded.runtime.cpu_matmul in ("numpy", "torch")
    assert engine_tokens(Session(loaded)) == reference_tokens(path)
    with pytest.raises(ValueError, match="numpy or torch"):
        loaded.runtime.set_cpu_matmul("mkl")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v2"])
def test_budget_changed_mid_generation(tiny_model_factory, arch, device):
    path = tiny_model_factory(arch)
    expected = reference_tokens(path, device)
    loaded = load_model(path, device=device, budget=0.5, force_slots=True, profile=None)
    rt = loaded.runtime
    budgets = [0, 1.0, 0.25, 0.75, 0.1, 0.6]
    sizes = []

    def resize(n):
        rt.set_budget(budgets[n % len(budgets)])
        sizes.append(rt.cache.capacity)

    assert engine_tokens(Session(loaded), on_token=resize) == expected
    assert len(set(sizes)) > 3
    # the slot tensors really shrink with the budget
    rt.set_budget(0.25)
    assert rt.slots.tensors[rt.names[0]].shape[0] == rt.cache.capacity == int(0.25 * rt.expert_bytes_total) // rt.expert_bytes


def test_model_without_moe_runs_plain(tiny_model_factory):
    path = tiny_model_factory("llama")
    loaded = load_model(path, device="cpu", profile=None)
    assert loaded.runtime is None and loaded.info.num_moe_layers == 0
    assert engine_tokens(Session(loaded)) == reference_tokens(path)


def test_numpy_swiglu_gate_matches_torch():
    """The numpy gate is torch's silu(gate) * up, also where exp overflows (no warning either)."""
    import warnings
    from types import SimpleNamespace

    import numpy as np

    from engine.moe.expert_math import NumpyCpu

    gate = np.array([[-200.0, -90.0, -1.5, 0.0, 0.7, 30.0, 200.0]], dtype=np.float32)
    up = np.array([[1.0, -2.0, 3.0, 4.0, -0.5, 2.0, 1.0]], dtype=np.float32)
    identity = SimpleNamespace(mats1=[np.eye(14, dtype=np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = NumpyCpu.swiglu(np.concatenate([gate, up], axis=1), [0], [1], identity)
    want = torch.nn.functional.silu(torch.from_numpy(gate)) * torch.from_numpy(up)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-6, atol=0)
