"""The runtime's live controls and counters: budget changes, refusals, fetches, telemetry."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine import GenerationParams, Session, load_model
from engine.moe.auto_policy import AutoVerdict
from engine.moe.cost_model import CostModel, DeviceProfile
from engine.cache.profiles import load_profile, save_profile
from tiny_models import resident

GREEDY = GenerationParams(max_new_tokens=8, greedy=True, repetition_penalty=1.0)


def test_budget_forms_and_refusal(tiny_model):
    rt = load_model(tiny_model, device="cpu", budget="0", profile=None).runtime
    assert rt.budget_bytes == 0 and rt.cache.capacity == 0
    assert rt.set_budget(0.5) == rt.expert_bytes_total // 2
    assert rt.set_budget(f"{rt.expert_bytes * 3}B") == rt.expert_bytes * 3 and rt.cache.capacity == 3
    with pytest.raises(ValueError, match="does not fit"):
        rt.set_budget(rt.max_budget_bytes + rt.expert_bytes)
    with pytest.raises(ValueError, match="between 0 and 1"):
        rt.set_budget(1.5)
    with pytest.raises(ValueError):
        rt.set_budget("lots")
    assert rt.snapshot()["budget_bytes"] == rt.expert_bytes * 3


def test_budget_set_from_another_thread_lands_between_steps(tiny_model):
    loaded = load_model(tiny_model, device="cpu", budget=0, profile=None)
    rt, session = loaded.runtime, Session(loaded)
    session.eos_ids = set()
    capacities = []
    for i, _ in enumerate(session.generate("Hello", GenerationParams(max_new_tokens=10, greedy=True))):
        if i == 2:
            t = threading.Thread(target=rt.set_budget, args=(1.0,))
            t.start()
            t.join()
        capacities.append(rt.cache.capacity)
    assert capacities[0] == 0 and capacities[-1] == rt.num_layers * rt.num_experts
    assert rt.snapshot()["hits"] > 0


def test_counters_add_up(tiny_model):
    loaded = load_model(tiny_model, device="cpu", budget=0.5, profile=None)
    session = Session(loaded)
    session.eos_ids = set()
    list(session.generate([1, 2, 3, 4], GREEDY))
    snap = loaded.runtime.snapshot()
    pairs = (4 + 8 - 1) * 2  # tokens through the model x top-k
    assert all(r["hits"] + r["misses"] + r["fetches"] == pairs for r in snap["per_layer"])
    assert snap["hit_rate"] == pytest.approx(snap["hits"] / (pairs * 3))
    assert snap["cached_experts"] <= snap["capacity_experts"] == 12
    assert snap["simulated_cache"] is True and snap["peak_rss_bytes"] >= snap["rss_bytes"] > 0
    assert snap["decode_tokens_per_s"] > 0 and snap["prefill_tokens_per_s"] > 0
    assert snap["fast_device_bytes"] == loaded.info.dense_bytes + 12 * loaded.runtime.expert_bytes


def test_prefill_fetches_when_the_cost_model_says_so(tiny_model):
    """With real slots and a (modelled) fast bus, a long prompt copies experts instead of CPU work."""
    loaded = load_model(tiny_model, device="cpu", budget=1.0, force_slots=True, profile=None)
    rt = loaded.runtime
    rt.scheduler.cost = CostModel(cpu_bytes_per_s=1e9, cpu_flops_per_s=1e9,
                        device=DeviceProfile("test bus", 1e12, 1e12, 1e15, 2**34))
    session = Session(loaded)
    session.eos_ids = set()
    list(session.generate(list(range(5, 45)), GREEDY))
    snap = rt.snapshot()
    assert snap["fetches"] > 0
    assert sum(r["bytes_copied"] for r in snap["per_layer"]) > 0


def test_policy_switch_is_live(tiny_model):
    rt = load_model(tiny_model, device="cpu", profile=None).runtime
    rt.set_policy("lfu")
    assert rt.snapshot()["policy"] == "lfu"
    with pytest.raises(ValueError, match="choose one of"):
        rt.set_policy("belady-in-real-life")


def test_auto_policy_is_predictive_with_real_slots_and_lru_on_a_simulated_cache(tiny_model):
    simulated = load_model(tiny_model, device="cpu", profile=None).runtime
    slots = load_model(tiny_model, device="cpu", force_slots=True, profile=None).runtime
    assert simulated.snapshot()["policy"] == slots.snapshot()["policy"] == "auto"  # the default
    assert simulated.snapshot()["active_policy"] == "lru"
    assert slots.snapshot()["active_policy"] == "predictive"
    slots.set_policy("auto+split")
    assert slots.snapshot()["active_policy"] == "predictive+split" and slots.policy.layer_budget
    slots.set_policy("lfu")
    assert slots.snapshot()["active_policy"] == "lfu"


def test_profile_warm_starts_the_cache(tiny_model):
    loaded = load_model(tiny_model, device="cpu", budget=0.25, profile=None)
    counts = np.zeros((3, 8))
    counts[:, [6, 7]] = [10, 5]
    path = save_profile(loaded.info, counts, tokens=10, prompts=1)
    assert load_profile(loaded.info, "auto").tolist() == counts.tolist()
    warm = load_model(tiny_model, device="cpu", budget=0.25, policy="static", profile="auto").runtime
    assert sorted(resident(warm.cache)) == [(l, e) for l in range(3) for e in (6, 7)]
    assert path.exists()


def test_out_of_memory_mid_reply_halves_the_cache_and_the_reply_goes_on(tiny_model, monkeypatch):
    loaded = load_model(tiny_model, device="cpu", budget=1.0, force_slots=True, profile=None)
    session = Session(loaded)
    session.eos_ids = set()
    params = GenerationParams(max_new_tokens=10, greedy=True, repetition_penalty=1.0)
    expected = [e.token_id for e in session.generate([1, 2, 3, 4], params)]
    session.reset()
    rt = loaded.runtime
    real = rt.scheduler._pair_outputs
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:  # in the middle of a decode step
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(rt.scheduler, "_pair_outputs", flaky)
    before = rt.cache.capacity
    assert [e.token_id for e in session.generate([1, 2, 3, 4], params)] == expected
    assert rt.cache.capacity == before // 2 and rt.max_budget_bytes == rt.budget_bytes
    # the lock taken for the failed step was released: budget changes still land at once
    rt.set_budget(0)
    assert rt.cache.capacity == 0


def test_auto_verdict_weighs_saved_against_spent():
    verdict = AutoVerdict(saving_per_hit_s=1e-3, window=2)
    assert not verdict.step(0, 0, 0.0)  # the mark
    assert not verdict.step(5, 3, 0.001)
    assert not verdict.step(10, 6, 0.002)  # 4 extra hits save 4 ms, 2 ms spent: keep predictive
    assert verdict.last == {"steps": 2, "extra_hits": 4, "saved_s": 4e-3, "spent_s": 0.002}
    assert not verdict.step(11, 7, 0.004)
    assert verdict.step(12, 8, 0.006) and verdict.turned  # no extra hit for 4 ms: LRU


def test_auto_turns_to_lru_where_predictive_saves_nothing(tiny_model):
    # CPU slots: a hit costs what a miss does, so predictive's bookkeeping buys nothing
    loaded = load_model(tiny_model, device="cpu", budget=0.5, force_slots=True, profile=None)
    rt = loaded.runtime
    assert rt.auto.saving_per_hit_s == 0.0 and rt.snapshot()["active_policy"] == "predictive"
    rt.auto.window = 3
    tokens = list(Session(loaded).generate([1, 2, 3], GREEDY))
    snap = rt.snapshot()
    assert snap["policy"] == "auto" and snap["active_policy"] == "lru"
    assert snap["auto_verdict"]["turned_to_lru"] and snap["auto_verdict"]["saved_s"] == 0.0
    assert (rt.policy.last >= rt.cache.shadow.last).all()  # LRU started from the recency the shadow kept
    rt.set_policy("auto")  # chosen again: predictive again, weighed afresh
    assert rt.snapshot()["active_policy"] == "predictive" and not rt.auto.turned
    assert rt.cache.shadow is None and rt.cache.allowance == 0  # its copy cap counts afresh from what is held
    assert len(tokens) == GREEDY.max_new_tokens
