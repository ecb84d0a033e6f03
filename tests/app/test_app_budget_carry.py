"""The cache budget is remembered as a share of the experts, so the next model starts sensibly sized."""

from __future__ import annotations

from app.settings import Key


def test_the_budget_carries_over_as_a_share_of_the_new_models_experts(qtbot, make_window, tiny_model_factory):
    small, large = tiny_model_factory("qwen3_moe"), tiny_model_factory("qwen3_moe", layers=6)
    window = make_window(model=str(small))
    bar = window.budget_bar
    with qtbot.waitSignal(window.client.budget_applied, timeout=5000):
        bar.slider.setValue(bar.total_experts // 2)
    share = window.settings.value(Key.BUDGET_SHARE)
    assert 0.4 < share < 0.6
    with qtbot.waitSignal(window.client.model_loaded, timeout=60_000) as loaded:
        window.load_model(str(large))
    info = loaded.args[1]
    carried = info["budget_bytes"] / info["runtime_expert_bytes_total"]
    assert abs(carried - share) <= info["runtime_expert_bytes"] / info["runtime_expert_bytes_total"]


def test_static_is_offered_only_with_a_profile(qtbot, window):
    assert "static" not in window.client.model_info["policies"]
    assert window.budget_bar.policy.findData("static") == -1
    assert window.budget_bar.policy.findData("lru") >= 0
