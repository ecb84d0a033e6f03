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


# -- a damaged or unwritable file: open anyway, say what happened --------------------------------
import os  # noqa: E402
import sqlite3  # noqa: E402

import pytest  # noqa: E402

from app import conversation_store  # noqa: E402

PAGE = 4096  # SQLite's default page size


def _fill(path, chats: int = 5, messages: int = 20) -> None:
    """A history of several pages: each message is about a quarter of a page."""
    store = ConversationStore(path)
    for i in range(chats):
        conv = store.create_conversation(f"chat {i}")
        for j in range(messages):
            store.add_message(conv.id, "user" if j % 2 == 0 else "assistant", f"{i}-{j} " + "x" * 900)
    store.close()  # checkpoints the WAL: every row is in the main file now


def _quick_check(path) -> list:
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    finally:
        db.close()


def test_a_healthy_file_opens_without_a_notice(tmp_path):
    _fill(tmp_path / "c.sqlite3", chats=2, messages=2)
    store = ConversationStore(tmp_path / "c.sqlite3")
    assert store.notice == "" and store.moved_to is None and not store.in_memory
    assert len(store.conversations()) == 2
    store.close()


def test_garbage_pages_are_moved_aside_and_readable_rows_recovered(tmp_path):
    path = tmp_path / "c.sqlite3"
    _fill(path)
    with open(path, "r+b") as f:  # page 10: a leaf of the messages table, past the schema and the chats
        f.seek(9 * PAGE)
        f.write(os.urandom(PAGE))
    assert _quick_check(path) != ["ok"]
    store = ConversationStore(path)
    assert store.moved_to is not None and store.moved_to.exists()
    assert store.moved_to.name.startswith("c.sqlite3.corrupt-")
    assert str(store.moved_to) in store.notice and "damaged" in store.notice
    conversations = store.conversations()
    assert sorted(c.title for c in conversations) == [f"chat {i}" for i in range(5)]
    recovered = sum(len(store.messages(c.id)) for c in conversations)
    assert 50 < recovered < 100  # one page of messages is lost, the rest is back
    assert f"{recovered} messages" in store.notice
    store.add_message(conversations[0].id, "user", "still works")  # the new file takes writes
    store.close()
    assert _quick_check(path) == ["ok"]


def test_messages_whose_chat_row_was_lost_get_a_placeholder_chat(tmp_path):
    path = tmp_path / "c.sqlite3"
    _fill(path, chats=3, messages=4)
    with open(path, "r+b") as f:  # page 2: the conversations table
        f.seek(1 * PAGE)
        f.write(os.urandom(PAGE))
    store = ConversationStore(path)
    conversations = store.conversations()
    assert len(conversations) == 3 and all(c.title.startswith("Recovered chat") for c in conversations)
    assert [len(store.messages(c.id)) for c in conversations] == [4, 4, 4]
    store.close()


def test_a_text_file_in_place_of_the_database_starts_an_empty_history(tmp_path):
    path = tmp_path / "c.sqlite3"
    path.write_text("these are my notes, not a database\n" * 50, encoding="utf-8")
    store = ConversationStore(path)
    assert store.moved_to.read_text(encoding="utf-8").startswith("these are my notes")
    assert "nothing in it could be read" in store.notice and str(store.moved_to) in store.notice
    assert store.conversations() == [] and not store.in_memory
    store.create_conversation("fresh")
    store.close()
    assert _quick_check(path) == ["ok"]


def test_a_stale_wal_goes_aside_with_the_damaged_file(tmp_path):
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    (tmp_path / "c.sqlite3-wal").write_bytes(b"old wal")
    store = ConversationStore(path)
    assert (tmp_path / f"{store.moved_to.name}-wal").read_bytes() == b"old wal"
    assert store.conversations() == []
    store.close()


def test_a_data_folder_that_cannot_be_created_keeps_history_in_memory(tmp_path):
    """A path under a regular file cannot be made a folder, even by root (chmod would not stop root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    store = ConversationStore(blocker / "data" / "c.sqlite3")
    assert store.in_memory and "nothing will be saved" in store.notice
    conv = store.create_conversation()
    store.add_message(conv.id, "user", "kept for this session")
    assert store.messages(conv.id)[0].content == "kept for this session"
    assert blocker.read_text() == "x"
    store.close()


def test_a_read_only_file_is_loaded_into_memory(tmp_path, monkeypatch):
    """SQLite opened read-only (mode=ro) refuses writes the way a read-only file or folder does for a user."""
    path = tmp_path / "c.sqlite3"
    _fill(path, chats=2, messages=2)
    before = path.read_bytes()
    real_connect = sqlite3.connect

    def read_only(database, *args, **kwargs):
        if database == ":memory:" or kwargs.get("uri"):
            return real_connect(database, *args, **kwargs)
        return real_connect(f"{path.resolve().as_uri()}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(conversation_store.sqlite3, "connect", read_only)
    store = ConversationStore(path)
    assert store.in_memory and str(path) in store.notice and "nothing will be saved" in store.notice
    conversations = store.conversations()
    assert len(conversations) == 2  # what was saved is there
    store.add_message(conversations[0].id, "user", "only in memory")
    store.close()
    assert path.read_bytes() == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod")
def test_a_read_only_folder_keeps_history_in_memory(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    _fill(folder / "c.sqlite3", chats=1, messages=1)
    folder.chmod(0o500)
    try:
        store = ConversationStore(folder / "c.sqlite3")
        assert store.in_memory and len(store.conversations()) == 1
        store.close()
    finally:
        folder.chmod(0o700)
