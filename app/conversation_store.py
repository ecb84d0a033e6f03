"""Conversations and messages in SQLite: every finished message is committed at once.

A streaming reply is stored as an incomplete message and rewritten by the window at least once a
second, so a crash loses at most the last second of text. Used from the GUI thread only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    complete INTEGER NOT NULL DEFAULT 1,
    stats TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, position);
"""
DEFAULT_TITLE = "New chat"


@dataclass
class Conversation:
    id: int
    title: str
    system_prompt: str
    created: float
    updated: float


@dataclass
class Message:
    id: int
    conversation_id: int
    position: int
    role: str
    content: str
    complete: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0


@dataclass
class SearchHit:
    conversation_id: int
    title: str
    snippet: str
    message_id: int | None  # None when only the title matched


def _fold(text: str | None) -> str:
    return (text or "").casefold()


class ConversationStore:
    """All chat history of one user, in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path))
        self._db.row_factory = sqlite3.Row
        self._db.create_function("fold", 1, _fold, deterministic=True)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(SCHEMA)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    # conversations -------------------------------------------------------------------------
    def create_conversation(self, title: str = DEFAULT_TITLE, system_prompt: str = "") -> Conversation:
        now = time.time()
        with self._db:
            cur = self._db.execute(
                "INSERT INTO conversations(title, system_prompt, created, updated) VALUES (?,?,?,?)",
                (title, system_prompt, now, now),
            )
        return Conversation(cur.lastrowid, title, system_prompt, now, now)

    def conversations(self) -> list[Conversation]:
        rows = self._db.execute("SELECT * FROM conversations ORDER BY updated DESC, id DESC")
        return [Conversation(**dict(r)) for r in rows]

    def conversation(self, conversation_id: int) -> Conversation | None:
        row = self._db.execute("SELECT * FROM conversations WHERE id=?", (conversation_id,)).fetchone()
        return Conversation(**dict(row)) if row else None

    def rename(self, conversation_id: int, title: str) -> None:
        with self._db:
            self._db.execute("UPDATE conversations SET title=? WHERE id=?", (title.strip() or DEFAULT_TITLE, conversation_id))

    def set_system_prompt(self, conversation_id: int, text: str) -> None:
        with self._db:
            self._db.execute("UPDATE conversations SET system_prompt=? WHERE id=?", (text, conversation_id))

    def delete_conversation(self, conversation_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM conversations WHERE id=?", (conversation_id,))

    def _touch(self, conversation_id: int) -> None:
        self._db.execute("UPDATE conversations SET updated=? WHERE id=?", (time.time(), conversation_id))

    # messages ------------------------------------------------------------------------------
    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._db.execute(
            "SELECT * FROM messages WHERE conversation_id=? ORDER BY position", (conversation_id,)
        )
        return [self._message(r) for r in rows]

    def message(self, message_id: int) -> Message | None:
        row = self._db.execute("SELECT * FROM messages WHERE id=?", (message_id,)).fetchone()
        return self._message(row) if row else None

    @staticmethod
    def _message(row: sqlite3.Row) -> Message:
        d = dict(row)
        d["complete"] = bool(d["complete"])
        d["stats"] = json.loads(d["stats"] or "{}")
        return Message(**d)

    def add_message(
        self, conversation_id: int, role: str, content: str, *, complete: bool = True, stats: dict | None = None
    ) -> Message:
        """Append a message and commit it; the first user message also names a new conversation."""
        now = time.time()
        with self._db:
            (pos,) = self._db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id=?", (conversation_id,)
            ).fetchone()
            cur = self._db.execute(
                "INSERT INTO messages(conversation_id, position, role, content, complete, stats, created)"
                " VALUES (?,?,?,?,?,?,?)",
                (conversation_id, pos, role, content, int(complete), json.dumps(stats or {}), now),
            )
            if role == "user":
                self._db.execute(
                    "UPDATE conversations SET title=? WHERE id=? AND title=?",
                    (_title_from(content), conversation_id, DEFAULT_TITLE),
                )
            self._touch(conversation_id)
        return Message(cur.lastrowid, conversation_id, pos, role, content, complete, stats or {}, now)

    def update_message(
        self, message_id: int, *, content: str | None = None, complete: bool | None = None, stats: dict | None = None
    ) -> None:
        sets, args = [], []
        if content is not None:
            sets.append("content=?")
            args.append(content)
        if complete is not None:
            sets.append("complete=?")
            args.append(int(complete))
        if stats is not None:
            sets.append("stats=?")
            args.append(json.dumps(stats))
        if not sets:
            return
        with self._db:
            self._db.execute(f"UPDATE messages SET {', '.join(sets)} WHERE id=?", (*args, message_id))

    def truncate_after(self, message_id: int) -> None:
        """Delete every message that comes after `message_id` in its conversation (edit / regenerate)."""
        msg = self.message(message_id)
        if msg is None:
            return
        with self._db:
            self._db.execute(
                "DELETE FROM messages WHERE conversation_id=? AND position>?", (msg.conversation_id, msg.position)
            )
            self._touch(msg.conversation_id)

    def delete_message(self, message_id: int) -> None:
        with self._db:
            self._db.execute("DELETE FROM messages WHERE id=?", (message_id,))

    # search and export ---------------------------------------------------------------------
    def search(self, text: str, limit: int = 100) -> list[SearchHit]:
        """Conversations whose title or any message contains `text` (case-insensitive), newest first."""
        needle = _fold(text.strip())
        if not needle:
            return []
        hits: dict[int, SearchHit] = {}
        rows = self._db.execute(
            "SELECT c.id AS cid, c.title, m.id AS mid, m.content FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE instr(fold(m.content), ?) > 0 ORDER BY c.updated DESC, m.position",
            (needle,),
        )
        for r in rows:
            if r["cid"] not in hits:
                hits[r["cid"]] = SearchHit(r["cid"], r["title"], _snippet(r["content"], needle), r["mid"])
        for r in self._db.execute(
            "SELECT id, title FROM conversations WHERE instr(fold(title), ?) > 0", (needle,)
        ):
            hits.setdefault(r["id"], SearchHit(r["id"], r["title"], r["title"], None))
        order = {c.id: i for i, c in enumerate(self.conversations())}
        return sorted(hits.values(), key=lambda h: order.get(h.conversation_id, 0))[:limit]

    def export_json(self, conversation_id: int) -> dict[str, Any]:
        conv = self.conversation(conversation_id)
        if conv is None:
            raise KeyError(conversation_id)
        return {
            "title": conv.title,
            "system_prompt": conv.system_prompt,
            "created": conv.created,
            "messages": [
                {"role": m.role, "content": m.content, "created": m.created, "stats": m.stats}
                for m in self.messages(conversation_id)
            ],
        }

    def export_markdown(self, conversation_id: int) -> str:
        data = self.export_json(conversation_id)
        parts = [f"# {data['title']}\n"]
        if data["system_prompt"]:
            parts.append(f"> **System:** {data['system_prompt']}\n")
        names = {"user": "You", "assistant": "Assistant", "system": "System"}
        for m in data["messages"]:
            parts.append(f"### {names.get(m['role'], m['role'])}\n\n{m['content']}\n")
        return "\n".join(parts)


def _title_from(content: str) -> str:
    line = " ".join(content.split())
    return (line[:48] + "…") if len(line) > 48 else (line or DEFAULT_TITLE)


def _snippet(content: str, needle: str, width: int = 40) -> str:
    i = _fold(content).find(needle)
    start = max(0, i - width)
    end = min(len(content), i + len(needle) + width)
    text = " ".join(content[start:end].split())
    return ("…" if start > 0 else "") + text + ("…" if end < len(content) else "")
