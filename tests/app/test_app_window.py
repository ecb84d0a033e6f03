"""The real main window on the real engine (tiny model): chat, stop, regenerate, edit, search, history,
budget slider, and closing mid-reply."""

from __future__ import annotations

import json
import time

import numpy as np
from PySide6.QtCore import Qt

from app.settings import Key, Settings


def assistant_messages(window):
    return [m for m in window.store.messages(window.conversation_id) if m.role == "assistant"]


def test_enter_sends_and_the_reply_streams_into_the_view(qtbot, window):
    view = window.chat_view
    seen_while_streaming = []
    window.client.token.connect(lambda *_: seen_while_streaming.append(
        view.stream_widget is not None and window.generating))
    qtbot.keyClicks(view.input, "Hello there")
    qtbot.keyClick(view.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(view.input, "second line")
    assert view.input.toPlainText() == "Hello there\nsecond line"  # Shift+Enter adds a line
    with qtbot.waitSignal(window.client.reply_finished, timeout=60_000):
        qtbot.keyClick(view.input, Qt.Key.Key_Return)
    assert view.input.toPlainText() == ""
    assert seen_while_streaming and all(seen_while_streaming)
    messages = window.store.messages(window.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].content == "Hello there\nsecond line"
    assert messages[1].complete and messages[1].stats["new_tokens"] >= 1
    widget = view.widgets[-1]
    assert widget.text == messages[1].content and widget.meta_label.full_text()
    assert not window.generating and view.send_button.text() == "Send"
    assert window.sidebar.list.count() == 1
    assert window.store.conversation(window.conversation_id).title == "Hello there second line"


def test_esc_stops_mid_reply(qtbot, make_window):
    settings = Settings()
    settings.set_value(Key.MAX_TOKENS, 400)
    window = make_window(settings=settings)
    tokens = []
    window.client.token.connect(lambda *_: tokens.append(1))
    window.send_message("Tell me a long story")
    assert window.chat_view.send_button.text() == "Stop"
    qtbot.waitUntil(lambda: len(tokens) >= 3, timeout=60_000)
    with qtbot.waitSignal(window.client.reply_finished, timeout=5000) as blocker:
        at_stop = window.client.worker._tokens
        qtbot.keyClick(window.chat_view.input, Qt.Key.Key_Escape)
    stats = blocker.args[1]
    assert stats["finish_reason"] == "cancelled" and stats["new_tokens"] <= at_stop + 1
    reply = assistant_messages(window)[-1]
    assert reply.complete and reply.stats["finish_reason"] == "cancelled"
    assert "stopped" in window.chat_view.widgets[-1].meta_label.full_text()


def test_a_streaming_reply_reaches_the_database_within_a_second(qtbot, make_window):
    settings = Settings()
    settings.set_value(Key.MAX_TOKENS, 400)
    window = make_window(settings=settings)
    window.send_message("Write a lot")
    reply_id = window.active.message.id
    assert window.flush_timer.isActive() and window.flush_timer.interval() <= 1000
    qtbot.waitUntil(lambda: bool(window.active and window.active.text), timeout=60_000)
    t0 = time.monotonic()
    flushed_while_streaming = []

    def flushed() -> bool:
        if window.store.message(reply_id).content and window.active is not None:
            flushed_while_streaming.append(window.store.message(reply_id))
        return bool(flushed_while_streaming) or window.active is None

    qtbot.waitUntil(flushed, timeout=2500)
    if flushed_while_streaming:  # (a random tiny model may end its reply early)
        assert time.monotonic() - t0 <= 1.5 and not flushed_while_streaming[0].complete
        window.stop()
    qtbot.waitUntil(lambda: window.active is None, timeout=5000)
    assert window.store.message(reply_id).complete


def test_regenerate_replaces_the_last_reply(qtbot, window, send):
    send(window, "Hi")
    old = assistant_messages(window)[-1]
    button = window.chat_view.widgets[-1].regen_button
    assert button.isVisible()
    with qtbot.waitSignal(window.client.reply_finished, timeout=60_000):
        qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    replies = assistant_messages(window)
    assert len(replies) == 1 and replies[0].id != old.id and replies[0].complete
    assert len(window.chat_view.widgets) == 2


def test_edit_a_user_message_and_continue_from_there(qtbot, window, send):
    send(window, "first question")
    send(window, "second question")
    first = window.chat_view.widgets[0]
    assert first.edit_button.isVisible()
    qtbot.mouseClick(first.edit_button, Qt.MouseButton.LeftButton)
    assert first.editor.isVisible()
    first.editor.setPlainText("a better first question")
    with qtbot.waitSignal(window.client.reply_finished, timeout=60_000):
        qtbot.mouseClick(first.save_button, Qt.MouseButton.LeftButton)
    messages = window.store.messages(window.conversation_id)
    assert [(m.role, m.content) for m in messages][:1] == [("user", "a better first question")]
    assert [m.role for m in messages] == ["user", "assistant"] and messages[1].complete
    assert len(window.chat_view.widgets) == 2


def test_copy_message_and_export(qtbot, window, send, tmp_path):
    send(window, "Export me")
    widget = window.chat_view.widgets[0]
    qtbot.mouseClick(widget.copy_button, Qt.MouseButton.LeftButton)
    from PySide6.QtGui import QGuiApplication

    assert QGuiApplication.clipboard().text() == "Export me"
    md = window.export_conversation(window.conversation_id, "md", tmp_path / "chat.md")
    js = window.export_conversation(window.conversation_id, "json", tmp_path / "chat.json")
    assert "### You\n\nExport me" in md.read_text(encoding="utf-8")
    data = json.loads(js.read_text(encoding="utf-8"))
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]


def test_search_across_conversations(qtbot, window, send):
    send(window, "Where do penguins live?")
    penguins = window.conversation_id
    window.new_conversation()
    send(window, "Explain the expert cache")
    other = window.conversation_id
    assert set(window.sidebar.ids()) == {penguins, other}
    qtbot.keyClicks(window.sidebar.search, "PENGUIN")
    qtbot.waitUntil(lambda: window.sidebar.ids() == [penguins], timeout=3000)
    assert "1 conversation" in window.sidebar.hint.text()
    window.sidebar.list.setCurrentRow(0)  # picking a hit opens that conversation
    assert window.conversation_id == penguins
    assert window.chat_view.widgets[0].text == "Where do penguins live?"
    window.sidebar.search.clear()
    qtbot.waitUntil(lambda: len(window.sidebar.ids()) == 2, timeout=3000)


def test_rename_delete_and_system_prompt(qtbot, window, send):
    send(window, "Keep me")
    keep = window.conversation_id
    window.rename_conversation(keep, "Renamed chat")
    assert window.sidebar.list.currentItem().text() == "Renamed chat"
    assert window.chat_view.title_label.full_text() == "Renamed chat"
    window.chat_view.system_toggle.setChecked(True)
    window.chat_view.system_edit.setPlainText("Answer like a pirate.")
    qtbot.waitUntil(lambda: window.store.conversation(keep).system_prompt == "Answer like a pirate.", timeout=3000)
    assert window._engine_messages(keep)[0] == {"role": "system", "content": "Answer like a pirate."}
    window.new_conversation()
    send(window, "Delete me")
    doomed = window.conversation_id
    window.delete_conversation(doomed)
    assert window.store.conversation(doomed) is None
    assert window.sidebar.ids() == [keep] and window.conversation_id == keep


def test_restart_finds_the_history(qtbot, make_window, send, tiny_model):
    first = make_window()
    send(first, "Remember this message")
    conv = first.conversation_id
    reply = assistant_messages(first)[-1].content
    first.close()
    assert not first.client.is_running()
    second = make_window()
    assert second.conversation_id == conv  # reopens the last conversation
    assert second.sidebar.ids() == [conv]
    texts = [w.text for w in second.chat_view.widgets]
    assert texts == ["Remember this message", reply]


def test_budget_slider_resizes_the_cache_live_and_the_panel_follows(qtbot, window, send):
    send(window, "warm up the cache")
    bar, panels = window.budget_bar, window.panels
    runtime = window.client.worker._loaded.runtime
    assert bar.slider.maximum() == window.client.model_info["max_budget_bytes"] // bar.expert_bytes
    target = 2 if bar.slider.value() != 2 else 3
    with qtbot.waitSignal(window.client.budget_applied, timeout=5000) as blocker:
        bar.slider.setValue(target)
    assert blocker.args[0] == target * bar.expert_bytes == runtime.budget_bytes
    assert window.client.model_info["budget_bytes"] == runtime.budget_bytes
    share = window.settings.value(Key.BUDGET_SHARE)  # a share of the experts carries over between models
    assert share == runtime.budget_bytes / window.client.model_info["runtime_expert_bytes_total"]
    t0 = time.monotonic()
    qtbot.waitUntil(lambda: f"{target} of" in panels.hit_rate.summary.text(), timeout=1000)
    assert time.monotonic() - t0 < 1.0
    assert bar.value_label.text().endswith(f"{target} experts · {target / bar.total_experts:.0%}")
    # the hit-rate panel has per-layer data from the reply, and the window says the cache is simulated
    assert np.isfinite(panels.hit_rate._grid).any() and panels.hit_rate.badge.text() == "simulated"
    assert "simulated on the CPU" in panels.hit_rate.summary.text()
    assert "auto (lru)" in panels.hit_rate.summary.text()  # what the default policy chose here
    # a value above what the device can hold is refused with a message, the engine is untouched
    bar.edit.setText("64GiB")
    qtbot.keyClick(bar.edit, Qt.Key.Key_Return)
    assert bar.message.isVisible() and "does not fit" in bar.message.text()
    assert runtime.budget_bytes == target * bar.expert_bytes and bar.slider.value() == target
    # the policy selector is applied live too
    with qtbot.waitSignal(window.client.policy_applied, timeout=5000):
        bar.policy.setCurrentIndex(bar.policy.findData("lfu"))
    assert runtime.snapshot()["policy"] == "lfu"


def test_close_during_generation_joins_the_thread(qtbot, make_window):
    settings = Settings()
    settings.set_value(Key.MAX_TOKENS, 400)
    window = make_window(settings=settings)
    tokens = []
    window.client.token.connect(lambda *_: tokens.append(1))
    window.send_message("A long reply please")
    qtbot.waitUntil(lambda: len(tokens) >= 2 and bool(window.active.text), timeout=60_000)
    conv = window.conversation_id
    store_path = window.store.path
    t0 = time.monotonic()
    window.close()
    assert time.monotonic() - t0 < 2.0
    assert not window.client.is_running()
    from app.conversation_store import ConversationStore

    store = ConversationStore(store_path)
    reply = store.messages(conv)[-1]  # what was written so far is kept, marked as interrupted
    assert reply.role == "assistant" and not reply.complete and reply.content
    store.close()


def test_regenerate_keeps_the_earlier_versions_to_browse(qtbot, window, send):
    send(window, "Hi")
    first = assistant_messages(window)[-1].content
    for seed in (101, 202):  # other seeds: other replies
        window.settings.set_value(Key.SEED, seed)
        with qtbot.waitSignal(window.client.reply_finished, timeout=60_000):
            assert window.regenerate()
    reply = assistant_messages(window)[-1]
    versions = reply.stats["versions"]
    assert versions[0]["content"] == first and len(versions) == 3 and reply.stats["version"] == 2
    assert len({v["content"] for v in versions}) == 3 and reply.content == versions[2]["content"]
    widget = window.chat_view.widgets[-1]
    assert not widget.version_label.isHidden() and widget.version_label.text() == "3/3"
    assert widget.prev_button.isEnabled() and not widget.next_button.isEnabled()
    qtbot.mouseClick(widget.prev_button, Qt.MouseButton.LeftButton)
    qtbot.mouseClick(window.chat_view.widgets[-1].prev_button, Qt.MouseButton.LeftButton)
    reply = assistant_messages(window)[-1]
    assert reply.content == first and reply.stats["version"] == 0  # the conversation goes on from this one
    assert window.chat_view.widgets[-1].version_label.text() == "1/3"
    assert window.chat_view.widgets[-1].text == first
    send(window, "And then?")
    assert window.chat_view.widgets[1].version_label.isHidden()  # an earlier reply keeps its choice
    assert not window.show_version(reply.id, 2)
