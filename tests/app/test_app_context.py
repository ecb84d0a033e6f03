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


def test_engine_settings_apply_at_the_next_load(qtbot, window, tiny_model, monkeypatch):
    from app.settings import Key
    from app.settings_dialog import SettingsDialog
    from engine.model import loader

    dialog = SettingsDialog(window.settings, window)
    assert dialog.device.currentData() == "auto" and dialog.threads.value() == 0 and dialog.context.value() == 0
    dialog.device.setCurrentIndex(dialog.device.findData("cpu"))
    dialog.threads.setValue(2)
    dialog.context.setValue(64)
    dialog.accept()
    assert window.apply_engine_settings() and not window.apply_engine_settings()  # only when changed
    seen = {}
    real = loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    with qtbot.waitSignal(window.client.model_loaded, timeout=60_000) as loaded:
        window.load_model(str(tiny_model))
    assert seen["device"] == "cpu" and seen["threads"] == 2
    assert loaded.args[1]["context_length"] == 64 and window.settings.value(Key.CONTEXT_LENGTH) == 64


def test_a_chat_keeps_its_own_sampling_and_its_model(qtbot, window, send, tiny_model_factory):
    from PySide6.QtWidgets import QDialogButtonBox

    send(window, "Hello")
    cid = window.conversation_id
    assert window.store.chat_settings(cid)["model"] == window.client.model_info["source"]
    dialog = window.open_chat_settings()
    dialog.fields["max_new_tokens"].setValue(3)
    dialog.fields["temperature"].setValue(window.settings.sampling()["temperature"])  # equal: not kept
    dialog.accept()
    assert window.store.chat_settings(cid)["sampling"] == {"max_new_tokens": 3}
    stats = send(window, "Tell me more")
    assert stats["new_tokens"] <= 3  # this chat's max tokens, not the default
    other = window.new_conversation()
    assert "sampling" not in window.store.chat_settings(other)
    with qtbot.waitSignal(window.client.model_loaded, timeout=60_000):
        window.load_model(str(tiny_model_factory("qwen3_moe", layers=6)))
    window.open_conversation(cid)
    assert not window.chat_view.banner.isHidden() and "was held with" in window.chat_view.banner.text()
    dialog = window.open_chat_settings()
    assert dialog.fields["max_new_tokens"].value() == 3
    dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.StandardButton.RestoreDefaults).click()
    dialog.accept()
    assert "sampling" not in window.store.chat_settings(cid)


def test_a_chat_that_outgrew_the_context_offers_two_ways_on(qtbot, window, send):
    view = window.chat_view
    send(window, "Hello there")
    assert view.context_offer.isHidden()
    window._offer_context_choices({"finish_reason": "length", "context_full": True})
    assert not view.context_offer.isHidden() and "context is full" in view.context_offer_label.text()
    assert view.drop_button.text() == "Go on without the oldest turns"
    assert view.summary_button.text() == "New chat with a summary" and view.summary_button.isEnabled()
    view.drop_button.click()  # the engine leaves the oldest turns out by itself
    assert view.context_offer.isHidden()
    window._offer_context_choices({"dropped_messages": 2})
    assert "2 oldest message(s)" in view.context_offer_label.text()
    window.new_conversation()
    assert view.context_offer.isHidden()  # it belongs to the chat whose last reply outgrew the context
