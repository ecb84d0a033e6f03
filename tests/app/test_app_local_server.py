"""The app's local server: the worker thread stays the model's only user; chat and API requests queue."""

from __future__ import annotations

import threading

import openai
import psutil
import pytest

from app.engine_worker import EngineClient

ASK = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture
def client(qtbot):
    c = EngineClient()
    c.start()
    yield c
    c.stop_server()
    assert c.shutdown(5000)


def start_server(qtbot, client) -> str:
    with qtbot.waitSignal(client.server_changed, timeout=20_000) as blocker:
        client.start_server(0)
    assert blocker.args[0]["error"] is None
    return blocker.args[0]["url"]


def api(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)


def in_thread(fn):
    """Run a blocking client call off the GUI thread, so Qt keeps delivering signals meanwhile."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised by the caller's assert
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_without_a_model_the_server_says_so(qtbot, client):
    url = start_server(qtbot, client)
    assert url.startswith("http://127.0.0.1:")
    c = api(url)
    assert c.models.list().data == []
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="x", messages=ASK, max_tokens=2)
    assert e.value.status_code == 503 and "no model" in e.value.message
    listening = {x.laddr.ip for x in psutil.Process().net_connections("inet") if x.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}


def test_chat_and_api_share_the_one_model(qtbot, client, tiny_model):
    with qtbot.waitSignal(client.model_loaded, timeout=60_000):
        client.load(str(tiny_model), 0, "lru")
    url = start_server(qtbot, client)
    model_id = api(url).models.list().data[0].id
    assert model_id == client.model_info["name"]
    stream_thread, streamed = in_thread(lambda: "".join(
        chunk.choices[0].delta.content or "" for chunk in api(url).chat.completions.create(
            model=model_id, messages=ASK, max_tokens=200, temperature=0, stream=True) if chunk.choices))
    qtbot.waitUntil(lambda: client.worker._job_steps is not None, timeout=30_000)
    chat_tokens = []
    client.token.connect(lambda rid, text: chat_tokens.append(rid))
    with qtbot.waitSignal(client.reply_finished, timeout=60_000) as blocker:  # asked while the API request runs
        rid = client.generate(ASK, {"max_new_tokens": 5, "greedy": True})
    assert blocker.args[1]["finish_reason"] in ("length", "eos") and set(chat_tokens) <= {rid}
    qtbot.waitUntil(lambda: not stream_thread.is_alive(), timeout=60_000)
    assert "error" not in streamed and streamed["value"]
    whole_thread, whole = in_thread(lambda: api(url).chat.completions.create(
        model=model_id, messages=ASK, max_tokens=200, temperature=0).choices[0].message.content)
    qtbot.waitUntil(lambda: not whole_thread.is_alive(), timeout=60_000)
    assert whole["value"] == streamed["value"]  # the chat in between did not disturb the API's replies


def test_stopping_the_server_closes_the_port(qtbot, client):
    url = start_server(qtbot, client)
    with qtbot.waitSignal(client.server_changed, timeout=10_000) as blocker:
        client.stop_server()
    assert blocker.args[0] == {"url": None, "error": None} and client.server_url is None
    with pytest.raises(openai.APIConnectionError):
        api(url).models.list()


def test_a_port_in_use_is_reported_not_fatal(qtbot, client):
    url = start_server(qtbot, client)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    other = EngineClient()
    other.start()
    try:
        with qtbot.waitSignal(other.server_changed, timeout=20_000) as blocker:
            other.start_server(port)
        assert blocker.args[0]["url"] is None and "in use" in blocker.args[0]["error"]
    finally:
        assert other.shutdown(5000)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_settings_turn_the_server_on_and_the_window_shows_its_address(qtbot, make_window):
    from PySide6.QtWidgets import QApplication, QPushButton

    from app.settings import Key
    from app.settings_dialog import SettingsDialog

    window = make_window()
    assert not window.server_label.isVisible()
    port = free_port()
    dialog = SettingsDialog(window.settings, window)
    assert not dialog.server_enabled.isChecked()  # off by default
    dialog.server_enabled.setChecked(True)
    dialog.server_port.setValue(port)
    dialog.server_key.setText("  sekret ")
    assert dialog.base_url.text() == f"http://127.0.0.1:{port}/v1"
    QApplication.clipboard().clear()
    dialog.findChild(QPushButton, "copyBaseUrl").click()
    assert QApplication.clipboard().text() == f"http://127.0.0.1:{port}/v1"
    dialog.accept()
    assert window.settings.value(Key.SERVER_API_KEY) == "sekret"
    with qtbot.waitSignal(window.client.server_changed, timeout=20_000):
        window.apply_server_settings()
    url = f"http://127.0.0.1:{port}/v1"
    assert window.server_label.isVisible() and url in window.server_label.text()
    hits_before = window.client.last_stats.get("hits", 0) + window.client.last_stats.get("misses", 0)
    t, box = in_thread(lambda: openai.OpenAI(base_url=url, api_key="sekret", max_retries=0).chat.completions.create(
        model=window.client.model_info["name"], messages=ASK, max_tokens=8, temperature=0))
    qtbot.waitUntil(lambda: not t.is_alive(), timeout=60_000)
    assert "error" not in box and box["value"].usage.completion_tokens >= 1
    qtbot.waitUntil(lambda: window.client.last_stats.get("hits", 0) + window.client.last_stats.get("misses", 0)
                    > hits_before, timeout=10_000)  # the panels see the server's traffic
    window.settings.set_value(Key.SERVER_ENABLED, False)
    with qtbot.waitSignal(window.client.server_changed, timeout=10_000):
        window.apply_server_settings()
    assert not window.server_label.isVisible()
