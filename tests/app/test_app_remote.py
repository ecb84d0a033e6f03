"""Chatting with a model on another server: the app against a real `python -m engine serve` process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from app.remote_dialog import load_key, parse_remote_source, remote_source, save_key
from app.settings import Key, Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tiny_model):
    """A real server process on the tiny model; `kill()` ends it like a crash would."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--model", str(tiny_model), "--port", str(port),
                             "--model-name", "tiny", "--api-key", "k1"], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.time() < deadline, "serve did not come up"
        time.sleep(0.2)
    proc.url = f"http://127.0.0.1:{port}/v1"
    yield proc
    proc.kill()
    proc.wait(10)


def connect(qtbot, window, url: str, key: str):
    """Through the model picker's "Connect to a server…", as a user finds it."""
    from app.remote_dialog import RemoteDialog

    picker = window.open_model_picker()
    picker.remote_button.click()
    qtbot.waitUntil(lambda: window.findChild(RemoteDialog) is not None and window.findChild(RemoteDialog).isVisible())
    dialog = window.findChild(RemoteDialog)
    dialog.url.setCurrentText(url)
    dialog.key.setText(key)
    with qtbot.waitSignal(window.client.remote_models_listed, timeout=20_000):
        dialog.list_button.click()
    return dialog


def test_chat_stop_and_a_dead_server_through_the_remote_path(qtbot, make_window, serve):
    settings = Settings()
    settings.set_value(Key.MAX_TOKENS, 300)
    window = make_window(settings=settings)

    dialog = connect(qtbot, window, serve.url, "wrong")
    assert "refused the API key (401)" in dialog.message.text() and not dialog.connect_button.isEnabled()
    dialog.key.setText("k1")
    with qtbot.waitSignal(window.client.remote_models_listed, timeout=20_000):
        dialog.list_button.click()
    assert dialog.models.currentText() == "tiny" and dialog.connect_button.isEnabled()
    with qtbot.waitSignal(window.client.model_loaded, timeout=20_000) as loaded:
        dialog.connect_button.click()
    info = loaded.args[1]
    assert info["remote"] and info["source"] == remote_source(serve.url, "tiny")
    assert window.device_label.text() == f"remote · {serve.url}"
    assert window.settings.value(Key.MODEL_SOURCE) == remote_source(serve.url, "tiny")
    qtbot.waitUntil(lambda: "on the server" in window.panels.hit_rate.summary.text(), timeout=5000)

    tokens = []
    window.client.token.connect(lambda *_: tokens.append(1))
    window.send_message("Tell me a long story")
    qtbot.waitUntil(lambda: len(tokens) >= 3, timeout=60_000)
    with qtbot.waitSignal(window.client.reply_finished, timeout=3000) as finished:
        stopped_at = time.perf_counter()
        window.stop()
    assert time.perf_counter() - stopped_at < 2
    assert finished.args[1]["finish_reason"] == "cancelled" and finished.args[1]["new_tokens"] < 300
    replies = [m for m in window.store.messages(window.conversation_id) if m.role == "assistant"]
    assert replies[-1].content and replies[-1].stats["finish_reason"] == "cancelled"

    with qtbot.waitSignal(window.client.reply_finished, timeout=60_000) as finished:
        window.send_message("Hello again")
    assert finished.args[1]["finish_reason"] in ("length", "eos") and finished.args[1]["new_tokens"] >= 1

    serve.kill()
    serve.wait(10)
    with qtbot.waitSignal(window.client.reply_finished, timeout=30_000) as finished:
        window.send_message("Are you still there?")
    assert finished.args[1]["finish_reason"] == "error"
    assert "could not reach" in window.last_error and serve.url in window.last_error
    users = [m.content for m in window.store.messages(window.conversation_id) if m.role == "user"]
    assert users[-1] == "Are you still there?"  # what the user wrote is kept


def test_remote_sources_and_keys_round_trip(monkeypatch):
    import app.remote_dialog as remote_dialog

    assert parse_remote_source(remote_source("http://h:1/v1/", "m#1")) == ("http://h:1/v1", "m#1")
    assert parse_remote_source("/models/qwen") is None
    settings = Settings()
    monkeypatch.setattr(remote_dialog, "_keyring", lambda: None)
    warning = save_key(settings, "http://h:1/v1", "secret")
    assert "plain text" in warning and load_key(settings, "http://h:1/v1") == "secret"

    class Ring:
        store: dict = {}

        def set_password(self, service, url, key):
            self.store[(service, url)] = key

        def get_password(self, service, url):
            return self.store.get((service, url))

    ring = Ring()
    monkeypatch.setattr(remote_dialog, "_keyring", lambda: ring)
    assert save_key(settings, "http://h:1/v1", "other") == ""
    assert settings.value(Key.REMOTE_KEYS) == [] and load_key(settings, "http://h:1/v1") == "other"
