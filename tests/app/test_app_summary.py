"""A chat that outgrew the context goes on in a new chat that starts from a summary of it.

The worker writes the summary as it writes a reply (tokens, Stop within one token); only a summary that
ended well makes a new chat. A stopped or failed one makes none (not even a partial one), and the old
chat is never changed.
"""

from __future__ import annotations

import time

LONG = "Tell me about the experts and the cache. " * 6  # about 130 tokens of the tiny model's 256


def snapshot(store, cid: int) -> tuple:
    conv = store.conversation(cid)
    return conv.title, conv.system_prompt, [(m.id, m.role, m.content, m.stats) for m in store.messages(cid)]


def slow_tokens(worker, fail_after: int | None = None):
    """The worker's session yields a token every 20 ms (and raises an engine error after `fail_after`),
    so a test can stop or break a summary in the middle; returns what puts the session back."""
    from engine.errors import EngineError

    session = worker._session
    chat = session.chat

    def slow(messages, params, cancel=None):
        for n, event in enumerate(chat(messages, params, cancel=cancel)):
            if fail_after is not None and n == fail_after:
                raise EngineError("the GPU fell off the bus")
            time.sleep(0.02)
            yield event

    session.chat = slow
    return lambda: delattr(session, "chat")


def summarize(qtbot, window, timeout: int = 60_000) -> tuple[str, dict]:
    with qtbot.waitSignal(window.client.summary_finished, timeout=timeout) as done:
        assert window.summarize_to_new_chat()
    return done.args[1], done.args[2]


def test_a_full_chat_offers_a_new_chat_from_its_summary(qtbot, window, send):
    send(window, LONG)
    assert window.chat_view.context_offer.isHidden()
    stats = send(window, LONG)
    assert stats["dropped_messages"] > 0
    offer = window.chat_view.context_offer
    assert not offer.isHidden() and "oldest message(s) were left out" in window.chat_view.context_offer_label.text()
    old = window.conversation_id
    before = snapshot(window.store, old)
    states = []
    window.client.state_changed.connect(states.append)

    with qtbot.waitSignal(window.client.summary_finished, timeout=60_000) as done:
        window.chat_view.summary_button.click()
        assert window.generating and window.chat_view.send_button.text() == "Stop"
    text, stats = done.args[1], done.args[2]
    assert "summarizing" in states and stats["finish_reason"] in ("eos", "length", "stop") and text.strip()
    assert 0 < stats["new_tokens"] <= 256 // 4  # the budget: a quarter of the context at most
    assert stats["dropped_messages"] > 0  # from as many recent turns as fit

    new = window.conversation_id
    assert new != old and window.store.conversation(new).title == before[0] + " (continued)"
    [first] = window.store.messages(new)
    assert first.role == "system" and first.content == text.strip()
    assert first.stats["summary_of"] == old
    assert snapshot(window.store, old) == before  # the old chat as it was, and still listed
    assert {old, new} <= set(window.sidebar.ids()) and not window.generating
    assert window.chat_view.widgets[0].role_label.text().startswith("Summary of")
    # the model reads the summary, labelled, in the one leading system message
    [system] = [m for m in window._engine_messages(new) if m["role"] == "system"]
    assert "Summary of an earlier conversation" in system["content"] and text.strip() in system["content"]
    reply = send(window, "Go on, please")
    assert reply["finish_reason"] != "error"
    assert [m.role for m in window.store.messages(new)] == ["system", "user", "assistant"]


def test_stopping_a_summary_makes_no_new_chat(qtbot, window, send):
    send(window, "Hello there")
    old = window.conversation_id
    before, chats = snapshot(window.store, old), len(window.store.conversations())
    slow_tokens(window.client.worker)
    with qtbot.waitSignal(window.client.summary_finished, timeout=60_000) as done:
        with qtbot.waitSignal(window.client.token, timeout=60_000):
            assert window.summarize_to_new_chat()
        assert window.state_chip.text() == "summarizing…"
        window.stop()
    assert done.args[2]["finish_reason"] == "cancelled"
    assert len(window.store.conversations()) == chats and window.conversation_id == old
    assert snapshot(window.store, old) == before
    assert "summary was stopped" in window.chat_view.banner.text() and not window.generating


def test_a_failed_summary_leaves_both_chats_with_a_clear_message(qtbot, window, send):
    send(window, "Hello there")
    old = window.conversation_id
    before, chats = snapshot(window.store, old), len(window.store.conversations())
    restore = slow_tokens(window.client.worker, fail_after=2)
    text, stats = summarize(qtbot, window)
    restore()
    assert stats["finish_reason"] == "error" and stats["new_tokens"] == 2  # two tokens, then the engine failed
    assert len(window.store.conversations()) == chats and window.conversation_id == old
    assert snapshot(window.store, old) == before
    message = window.chat_view.banner.text()
    assert "Could not start a new chat from a summary" in message and "the GPU fell off the bus" in message
    assert "the chat is unchanged" in message and not window.generating
    assert send(window, "Still here?")["finish_reason"] != "error"  # the window goes on as before


def test_no_summary_without_a_model_or_without_a_chat(qtbot, make_window, tmp_path):
    window = make_window(model=str(tmp_path / "nowhere"), wait=False)
    qtbot.waitUntil(lambda: bool(window.last_error), timeout=60_000)
    assert not window.summarize_to_new_chat()  # nothing to summarize, and no model
    window.store.add_message(window.conversation_id, "user", "Hello")
    chats = len(window.store.conversations())
    assert not window.summarize_to_new_chat()
    assert "No model is loaded" in window.chat_view.banner.text()
    assert len(window.store.conversations()) == chats and window.summary is None


def test_the_summary_prompt_ends_with_the_request(qtbot):
    from app.engine_worker import SUMMARY_REQUEST, summary_messages

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    assert summary_messages(chat) == chat + [{"role": "user", "content": SUMMARY_REQUEST}]
    asked = summary_messages(chat + [{"role": "user", "content": "And then?"}])
    assert len(asked) == 4 and asked[-1]["content"] == "And then?\n\n" + SUMMARY_REQUEST  # never two user turns
    assert chat[-1] == {"role": "assistant", "content": "Hello!"}  # the caller's list is left alone


def test_the_store_starts_a_chat_from_a_summary_all_or_nothing(tmp_path):
    from app.conversation_store import ConversationStore

    store = ConversationStore(tmp_path / "chats.db")
    src = store.create_conversation("Plans", system_prompt="Be brief.")
    store.add_message(src.id, "user", "Hi")
    store.update_chat_settings(src.id, sampling={"temperature": 0.2})
    conv = store.start_from_summary(src.id, "We said hi.")
    assert conv.title == "Plans (continued)" and conv.system_prompt == "Be brief."
    assert store.chat_settings(conv.id) == {"sampling": {"temperature": 0.2}}
    [m] = store.messages(conv.id)
    assert (m.role, m.content) == ("system", "We said hi.")
    assert m.stats == {"summary_of": src.id, "summary_of_title": "Plans"}
    again = store.start_from_summary(conv.id, "Still hi.")
    assert again.title == "Plans (continued)"  # not "(continued) (continued)"
    store.delete_conversation(src.id)
    assert store.start_from_summary(src.id, "gone") is None
    assert [m.content for m in store.messages(conv.id)] == ["We said hi."]
    store.close()
