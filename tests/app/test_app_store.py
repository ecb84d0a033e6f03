"""The SQLite conversation store: commits, search, truncation for edits, export."""

from __future__ import annotations

import json

from app.conversation_store import DEFAULT_TITLE, ConversationStore


def test_messages_are_committed_and_survive_reopening(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store = ConversationStore(path)
    conv = store.create_conversation(system_prompt="Be brief.")
    store.add_message(conv.id, "user", "What is a mixture of experts?")
    reply = store.add_message(conv.id, "assistant", "", complete=False)
    store.update_message(reply.id, content="A model that routes")  # a streaming flush
    # no close(): a crash right now must still find both messages on disk
    other = ConversationStore(path)
    messages = other.messages(conv.id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].content == "A model that routes" and not messages[1].complete
    assert other.conversation(conv.id).title == "What is a mixture of experts?"
    assert other.conversation(conv.id).system_prompt == "Be brief."
    store.close()
    other.close()


def test_search_finds_text_in_any_message_case_insensitively(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    a = store.create_conversation()
    store.add_message(a.id, "user", "Tell me about Paris")
    store.add_message(a.id, "assistant", "Paris is the capital of FRANCE.")
    b = store.create_conversation()
    store.add_message(b.id, "user", "Café naïve 日本語")
    c = store.create_conversation("Recipes")
    hits = store.search("france")
    assert [h.conversation_id for h in hits] == [a.id]
    assert "FRANCE" in hits[0].snippet
    assert [h.conversation_id for h in store.search("CAFÉ")] == [b.id]
    assert [h.conversation_id for h in store.search("日本")] == [b.id]
    assert [h.conversation_id for h in store.search("recipes")] == [c.id]  # titles count too
    assert store.search("   ") == []
    store.close()


def test_truncate_rename_delete(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    conv = store.create_conversation()
    first = store.add_message(conv.id, "user", "one")
    store.add_message(conv.id, "assistant", "two")
    store.add_message(conv.id, "user", "three")
    store.truncate_after(first.id)
    assert [m.content for m in store.messages(conv.id)] == ["one"]
    store.rename(conv.id, "  ")
    assert store.conversation(conv.id).title == DEFAULT_TITLE
    store.rename(conv.id, "Numbers")
    assert store.conversation(conv.id).title == "Numbers"
    store.delete_conversation(conv.id)
    assert store.conversation(conv.id) is None and store.messages(conv.id) == []
    store.close()


def test_export_markdown_and_json(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    conv = store.create_conversation(system_prompt="Answer in code.")
    store.add_message(conv.id, "user", "Print hello")
    store.add_message(conv.id, "assistant", "```python\nprint('hello')\n```", stats={"new_tokens": 7})
    md = store.export_markdown(conv.id)
    assert md.startswith("# Print hello")
    assert "### You\n\nPrint hello" in md and "print('hello')" in md and "Answer in code." in md
    data = json.loads(json.dumps(store.export_json(conv.id)))
    assert data["system_prompt"] == "Answer in code."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][1]["stats"] == {"new_tokens": 7}
    store.close()
