"""The budget slider on its own, with real-model sizes (tens of GiB): units, limits and refusals."""

from __future__ import annotations

from PySide6.QtCore import Qt

from app.budget_slider import BudgetBar

GiB = 2**30
EXPERT = 48 * 2**20  # one expert of a large MoE
INFO = {
    "has_runtime": True, "expert_bytes": EXPERT, "expert_bytes_total": 128 * 48 * EXPERT,
    "max_budget_bytes": 700 * EXPERT, "budget_bytes": 100 * EXPERT, "policy": "lru",
    "policies": {"lru": "least recently used", "lfu": "least frequently used"},
}


def test_slider_moves_in_experts_and_sends_bytes_beyond_32_bits(qtbot):
    bar = BudgetBar()
    qtbot.addWidget(bar)
    bar.set_model(INFO)
    assert bar.slider.maximum() == 700 and bar.slider.value() == 100
    assert bar.value_label.text() == "4.7 GiB · 100 experts · 2%"
    with qtbot.waitSignal(bar.budget_requested, timeout=2000) as blocker:
        bar.slider.setValue(600)  # debounced, then sent
    assert blocker.args == [600 * EXPERT] and 600 * EXPERT > 2**31


def test_typed_values_that_do_not_fit_are_refused_with_a_message(qtbot):
    bar = BudgetBar()
    qtbot.addWidget(bar)
    bar.set_model(INFO)
    sent = []
    bar.budget_requested.connect(sent.append)
    bar.edit.setText("40GiB")
    qtbot.keyClick(bar.edit, Qt.Key.Key_Return)
    assert not sent and bar.message.isVisibleTo(bar)
    assert "does not fit" in bar.message.text() and "32.8 GiB" in bar.message.text()
    assert bar.slider.value() == 100  # back where the engine is
    bar.edit.setText("12 GiB")
    qtbot.keyClick(bar.edit, Qt.Key.Key_Return)
    assert sent == [12 * GiB] and not bar.message.isVisibleTo(bar)
    bar.edit.setText("a lot")
    qtbot.keyClick(bar.edit, Qt.Key.Key_Return)
    assert "not a size" in bar.message.text() and sent == [12 * GiB]


def test_no_cache_means_a_disabled_slider(qtbot):
    bar = BudgetBar()
    qtbot.addWidget(bar)
    bar.set_model({"has_runtime": False})
    assert not bar.slider.isEnabled() and bar.value_label.text() == "no expert cache"
    bar.set_model(None)
    assert bar.value_label.text() == "no model"
