"""Starting the app: the demo model by default, and `python -m app --self-test`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PySide6.QtGui import QImage

from app import engine_worker
from app.settings import Key, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_model_is_loaded_when_none_was_chosen(qtbot, make_window, tiny_model, monkeypatch):
    engine_worker._import_engine()
    monkeypatch.setitem(engine_worker._engine, "demo_dir", tiny_model)  # stands in for resources/demo-model
    window = make_window(model="")
    assert Path(window.client.model_info["path"]) == tiny_model
    assert window.budget_bar.slider.isEnabled()


def test_a_missing_demo_model_says_what_to_do(qtbot, make_window, tmp_path, monkeypatch):
    engine_worker._import_engine()
    monkeypatch.setitem(engine_worker._engine, "demo_dir", tmp_path / "no-demo-here")
    window = make_window(model="", wait=False)
    qtbot.waitUntil(lambda: window.chat_view.banner.isVisible(), timeout=30_000)
    assert "Choose" in window.chat_view.banner.text() and window.client.model_info is None
    assert not window.send_message("hello?")  # refused with a message, the text stays in the box
    assert window.chat_view.input.toPlainText() == "hello?"


def test_self_test_failure_is_reported_as_json(qtbot, tmp_path, capsys):
    from app.self_test import run_self_test

    broken = tmp_path / "broken"
    broken.mkdir()
    settings = Settings()
    code = run_self_test(settings, model=str(broken), timeout_s=60)
    out = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and "config.json" in report["reason"]
    assert settings.value(Key.MAX_TOKENS) > 0


def test_self_test_command_end_to_end(tiny_model, tmp_path):
    shot = tmp_path / "window.png"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    result = subprocess.run(
        [sys.executable, "-m", "app", "--self-test", "--model", str(tiny_model), "--screenshot", str(shot),
         "--theme", "dark", "--timeout", "120"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] is True
    assert report["tokens"] >= 1 and report["budget_changes"] == 2 and report["panel_updates"] > 0
    assert report["server_tokens"] >= 1  # the local server answered through the same window
    assert set(report) >= {"ok", "reply_chars", "tokens", "budget_changes", "panel_updates"}
    image = QImage(str(shot))
    assert image.width() >= 960 and image.height() >= 600
