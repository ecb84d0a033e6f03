"""The chat pane on its own: keys, Markdown with copyable code, streaming cost, and auto-scroll."""

from __future__ import annotations

import time

import pytest
from PySide6.QtCore import QCoreApplication, Qt, QUrl
from PySide6.QtGui import QGuiApplication

from app.chat_view import ChatView
from app.conversation_store import Message


@pytest.fixture
def view(qtbot):
    v = ChatView()
    qtbot.addWidget(v)
    v.resize(700, 500)
    v.show()
    qtbot.waitExposed(v)
    return v


def msg(i: int, role: str, content: str, complete: bool = True) -> Message:
    return Message(id=i, conversation_id=1, position=i, role=role, content=content, complete=complete)


def test_enter_sends_shift_enter_adds_a_line_esc_stops(qtbot, view):
    sent, stops = [], []
    view.send_requested.connect(sent.append)
    view.stop_requested.connect(lambda: stops.append(1))
    qtbot.keyClicks(view.input, "one")
    qtbot.keyClick(view.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    qtbot.keyClicks(view.input, "two")
    qtbot.keyClick(view.input, Qt.Key.Key_Return)
    assert sent == ["one\ntwo"] and view.input.toPlainText() == ""
    qtbot.keyClick(view.input, Qt.Key.Key_Return)  # nothing to send
    assert sent == ["one\ntwo"]
    view.set_generating(True)
    assert view.send_button.text() == "Stop"
    qtbot.keyClicks(view.input, "queued?")
    qtbot.keyClick(view.input, Qt.Key.Key_Return)  # not sent while a reply runs, and not lost
    assert sent == ["one\ntwo"] and view.input.toPlainText() == "queued?"
    qtbot.keyClick(view.input, Qt.Key.Key_Escape)
    qtbot.mouseClick(view.send_button, Qt.MouseButton.LeftButton)
    assert stops == [1, 1]


def test_assistant_markdown_renders_and_code_blocks_copy(qtbot, view):
    view.set_messages([
        msg(1, "user", "**not bold** for the user"),
        msg(2, "assistant", "Some **bold** text.\n\n```python\nprint('hi')\n```\n\n- a\n- b"),
    ])
    user, reply = view.widgets
    assert user.body.toPlainText() == "**not bold** for the user"  # user text is shown as typed
    plain = reply.body.toPlainText()
    assert "bold" in plain and "**" not in plain and "print('hi')" in plain
    assert reply.body.code_blocks == ["print('hi')"]
    reply.body._on_anchor(QUrl("copy:0"))
    assert QGuiApplication.clipboard().text() == "print('hi')"
    assert reply.regen_button.isVisibleTo(reply) and not user.regen_button.isVisibleTo(user)
    assert user.edit_button.isVisibleTo(user) and not reply.edit_button.isVisibleTo(reply)


def test_streaming_is_cheap_and_autoscroll_stops_when_the_user_scrolls_up(qtbot, view):
    view.set_messages([msg(i, "user" if i % 2 else "assistant", f"message {i}\n\n" * 6) for i in range(12)])
    bar = view.scroll.verticalScrollBar()
    qtbot.waitUntil(lambda: bar.maximum() > 0 and bar.value() == bar.maximum(), timeout=3000)
    view.begin_stream(msg(99, "assistant", "", complete=False))
    t0 = time.perf_counter()
    for i in range(2000):  # appending a token is O(1): rendering happens on a timer
        view.append_token(f"word{i} ")
    assert time.perf_counter() - t0 < 0.1
    t0 = time.perf_counter()
    view._render_stream()
    assert time.perf_counter() - t0 < 0.5
    qtbot.waitUntil(lambda: bar.value() == bar.maximum(), timeout=3000)  # followed the new text
    bar.setValue(0)  # the user scrolls up to read
    assert not view.follow
    for i in range(300):
        view.append_token(f"more{i} ")
    view._render_stream()
    QCoreApplication.processEvents()  # let the layout grow the scroll range
    assert bar.maximum() > 0 and bar.value() == 0  # left where the user put it
    bar.setValue(bar.maximum())  # back at the bottom: following again
    assert view.follow
    view.end_stream({"new_tokens": 2300, "decode_tokens_per_s": 12.5, "finish_reason": "cancelled"})
    assert view.widgets[-1].meta_label.full_text() == "2300 tokens · 12.5 tok/s · stopped"
