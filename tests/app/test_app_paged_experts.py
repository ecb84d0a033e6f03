"""The memory panel says so when the loaded model's experts page in from the SSD (the free RAM is what
`$MOE_CHAT_AVAILABLE_RAM` says, so the tiny model does not fit it whole)."""

from __future__ import annotations

from app.panels import PAGED_NOTICE
from engine.model.loader import AVAILABLE_RAM_ENV, RAM_HEADROOM, inspect_model


def test_memory_panel_shows_experts_paged_from_the_ssd(qtbot, make_window, tiny_model, monkeypatch):
    f = inspect_model(tiny_model).formats("cpu")["int4"]
    monkeypatch.setenv(AVAILABLE_RAM_ENV, str(int((f["paged_ram_needed_bytes"] + f["ram_needed_bytes"]) / 2 / RAM_HEADROOM)))
    window = make_window()
    assert window.client.model_info["experts"] == "int4"
    notice = window.panels.memory.notice
    qtbot.waitUntil(lambda: notice.isVisible(), timeout=10_000)
    assert PAGED_NOTICE in notice.text() and "slower" in notice.text()
