"""How full the model's context is: the status bar meter, the reply footer, the state pill."""

from __future__ import annotations

from app.chat_view import describe_stats


def test_the_context_meter_follows_the_conversation(qtbot, window, send):
    total = window.client.model_info["context_length"]
    assert total == 256 and window.context_label.text() == ""
    stats = send(window, "Hello there")
    used = stats["prompt_tokens"] + stats["new_tokens"]
    assert window.context_label.text() == f"Context {used:,} / {total:,}"
    first = window.conversation_id
    window.new_conversation()
    assert window.context_label.text() == "Context 0 / 256"
    window.open_conversation(first)  # read back from the stored reply
    assert window.context_label.text() == f"Context {used:,} / {total:,}"
    window._show_context({"prompt_tokens": 200, "new_tokens": 56})
    assert window.context_label.text() == "Context 256 / 256 · full"


def test_the_footer_says_when_the_context_stopped_a_reply():
    assert describe_stats({"new_tokens": 5, "finish_reason": "length"}).endswith("hit the token limit")
    assert describe_stats({"new_tokens": 5, "finish_reason": "length", "context_full": True}).endswith("context full")
    assert "2 oldest message(s) left out" in describe_stats({"finish_reason": "eos", "dropped_messages": 2})


def test_the_state_pill_does_not_say_ready_without_a_model(qtbot, make_window, tmp_path):
    window = make_window(model=str(tmp_path / "nowhere"), wait=False)
    qtbot.waitUntil(lambda: bool(window.last_error), timeout=60_000)
    qtbot.waitUntil(lambda: window.state_chip.text() == "no model", timeout=5000)


def test_export_suggests_the_documents_folder():
    from PySide6.QtCore import QStandardPaths

    from app.main_window import default_export_path

    docs = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation)
    path = default_export_path("Plans: 2027/Q1?", "md")
    assert str(path.parent) == docs and path.name == "Plans_ 2027_Q1_.md"
    assert default_export_path("", "json").name == "chat.json"
