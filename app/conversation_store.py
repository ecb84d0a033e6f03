"""Conversations and messages in SQLite: every finished message is committed at once.

A streaming reply is stored as an incomplete message and rewritten by the window at least once a
second, so a crash loses at most the last second of text. Used from the GUI thread only.

Opening never fails: a damaged file is moved aside and what SQLite can still read is copied into a
fresh one; a file or folder that cannot be written keeps the history in memory. Either way `notice`
says what happened, for the window to show.
"""

from __future__ import annotations

import json
import logging
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
CREATE TABLE IF NOT EXISTS chat_settings (
    conversation_id INTEGER PRIMARY KEY REFERENCES conversations(id) ON DELETE CASCADE,
    settings TEXT NOT NULL DEFAULT '{}'
);
"""
DEFAULT_TITLE = "New chat"
CONTINUED = " (continued)"  # the title of a chat that goes on from a summary of another
TABLES = ("conversations", "messages")  # in this order: a message needs its conversation
MAX_PROBES = 100_000  # rowids looked up one by one past a damaged page, per table

log = logging.getLogger(__name__)


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
        self.in_memory = False  # True: nothing is saved (the file or its folder cannot be written)
        self.moved_to: Path | None = None  # where a damaged file went
        self.notice = ""  # what the user must be told about this history, "" when all is well
        try:
            self._db = self._open(self.path)
        except sqlite3.DatabaseError as exc:  # only damage: _open turns every other failure into OSError
            log.warning("chat database %s is damaged (%s); recovering", self.path, exc)
            self._db = self._recover()
        except OSError as exc:
            log.warning("chat database %s cannot be written (%s); history stays in memory", self.path, exc)
            self._db = self._in_memory(exc)

    def _open(self, path: Path) -> sqlite3.Connection:
        """Open and check the file; OSError when it cannot be written, DatabaseError when damaged."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size and _header(path) != b"SQLite format 3\0":
            # checked before SQLite opens it: SQLite would delete a -wal beside such a file on close
            raise sqlite3.DatabaseError(f"{path.name} is not an SQLite database")
        db = None
        try:
            db = sqlite3.connect(str(path))
            rows = [r[0] for r in db.execute("PRAGMA quick_check")]
            if rows != ["ok"]:
                raise sqlite3.DatabaseError("quick_check: " + "; ".join(map(str, rows[:3])))
            self._prepare(db, wal=True)
            (version,) = db.execute("PRAGMA user_version").fetchone()
            db.execute(f"PRAGMA user_version = {int(version)}")  # a write: fails now if the file is read-only
            return db
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            if _is_corrupt(exc):
                raise
            raise OSError(str(exc)) from exc  # cannot open, read-only, locked, disk I/O: not damage

    @staticmethod
    def _prepare(db: sqlite3.Connection, wal: bool) -> None:
        db.row_factory = sqlite3.Row
        db.create_function("fold", 1, _fold, deterministic=True)
        db.execute("PRAGMA foreign_keys = ON")
        if wal:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(SCHEMA)
        db.commit()

    def _in_memory(self, reason: OSError) -> sqlite3.Connection:
        """History in memory, starting from what the file holds if it can at least be read."""
        db = sqlite3.connect(":memory:")
        # immutable: a WAL-mode file in a read-only folder cannot get the -shm that mode=ro needs
        for options in ("mode=ro", "mode=ro&immutable=1"):
            try:
                source = sqlite3.connect(f"{self.path.resolve().as_uri()}?{options}", uri=True)
                try:
                    source.backup(db)
                    break
                finally:
                    source.close()
            except (sqlite3.Error, OSError):
                continue  # no file, or an unreadable one: start empty
        self._prepare(db, wal=False)
        self.in_memory = True
        self.notice = (f"Chat history cannot be saved ({reason}): {self.path} is not writable. "
                       "Chats are kept in memory for this session only; nothing will be saved.")
        return db

    def _recover(self) -> sqlite3.Connection:
        """Move the damaged file aside (with its -wal and -shm), then copy every readable row into a new one."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while moved.exists():
            n += 1
            moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            self.path.rename(moved)
            for suffix in ("-wal", "-shm"):  # a WAL left behind would be replayed into the new file
                side = Path(f"{self.path}{suffix}")
                if side.exists():
                    side.rename(f"{moved}{suffix}")
            db = self._open(self.path)
        except (OSError, sqlite3.DatabaseError) as exc:
            return self._in_memory(OSError(f"damaged, and could not be moved aside: {exc}"))
        self.moved_to = moved
        counts = _copy_readable(moved, db)
        saved = (f"{counts['conversations']} chat{'s' if counts['conversations'] != 1 else ''} and "
                 f"{counts['messages']} message{'s' if counts['messages'] != 1 else ''} were recovered"
                 if any(counts.values()) else "nothing in it could be read, so the history starts empty")
        self.notice = (f"The chat history file was damaged. It was moved to {moved}; {saved}. "
                       "Keep the moved file if you want to try recovering more from it.")
        return db

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

    def start_from_summary(self, source_id: int, summary: str) -> Conversation | None:
        """A new chat that goes on from a summary of `source_id`: its first message (role 'system', with
        `summary_of` in its stats) holds the summary; the system prompt and chat settings carry over, and
        the source stays as it was. All or nothing; None when the source is gone."""
        source = self.conversation(source_id)
        if source is None:
            return None
        title = source.title if source.title.endswith(CONTINUED) else source.title + CONTINUED
        stats = {"summary_of": source_id, "summary_of_title": source.title}
        now = time.time()
        with self._db:
            cid = self._db.execute(
                "INSERT INTO conversations(title, system_prompt, created, updated) VALUES (?,?,?,?)",
                (title, source.system_prompt, now, now),
            ).lastrowid
            self._db.execute(
                "INSERT INTO messages(conversation_id, position, role, content, complete, stats, created)"
                " VALUES (?, 0, 'system', ?, 1, ?, ?)", (cid, summary, json.dumps(stats), now))
            self._db.execute("INSERT INTO chat_settings(conversation_id, settings) "
                             "SELECT ?, settings FROM chat_settings WHERE conversation_id=?", (cid, source_id))
        return Conversation(cid, title, source.system_prompt, now, now)

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

    def chat_settings(self, conversation_id: int) -> dict[str, Any]:
        """What this chat keeps of its own: sampling overrides and the model it was held with."""
        row = self._db.execute("SELECT settings FROM chat_settings WHERE conversation_id=?",
                               (conversation_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    def update_chat_settings(self, conversation_id: int, **values: Any) -> None:
        """Merge `values` into the chat's settings; a value of None removes that key."""
        current = self.chat_settings(conversation_id)
        current.update(values)
        current = {k: v for k, v in current.items() if v is not None}
        with self._db:
            self._db.execute("INSERT INTO chat_settings(conversation_id, settings) VALUES (?, ?) "
                             "ON CONFLICT(conversation_id) DO UPDATE SET settings=excluded.settings",
                             (conversation_id, json.dumps(current)))

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


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (a text file, garbage pages), or a failed quick_check."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    return code is None and not isinstance(exc, sqlite3.OperationalError)


def _copy_readable(damaged: Path, db: sqlite3.Connection) -> dict[str, int]:
    """Copy the rows SQLite can still read from `damaged` into `db`, row by row; counts per table."""
    counts = dict.fromkeys(TABLES, 0)
    # immutable: no -shm beside the damaged file, unless it has a WAL whose pages must be read too
    immutable = "" if Path(f"{damaged}-wal").exists() else "&immutable=1"
    try:
        source = sqlite3.connect(f"{damaged.resolve().as_uri()}?mode=ro{immutable}", uri=True)
    except sqlite3.Error:
        return counts
    try:
        conversation_ids: set[int] = set()
        for table in TABLES:
            columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            for row in _readable_rows(source, table, columns):
                if table == "messages" and row["conversation_id"] not in conversation_ids:
                    _insert(db, "conversations", {  # the chat row was lost, its messages were not
                        "id": row["conversation_id"], "title": f"Recovered chat {row['conversation_id']}",
                        "system_prompt": "", "created": row["created"], "updated": row["created"]})
                    conversation_ids.add(row["conversation_id"])
                if _insert(db, table, row) and table == "conversations":
                    conversation_ids.add(row["id"])
        db.commit()
        for table in TABLES:
            (counts[table],) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
    finally:
        source.close()
    return counts


def _readable_rows(source: sqlite3.Connection, table: str, columns: list[str]) -> list[dict]:
    """Every row that can be read: one scan, and past a damaged page, a lookup per rowid."""
    select = f"SELECT {', '.join(columns)} FROM {table}"
    rows: dict[int, dict] = {}
    try:
        for r in source.execute(select + " ORDER BY id"):
            rows[r[0]] = dict(zip(columns, r))
        return list(rows.values())
    except sqlite3.DatabaseError:
        pass
    upper = max(rows, default=0)
    for query in (f"SELECT max(id) FROM {table}", "SELECT seq FROM sqlite_sequence WHERE name=?"):
        try:
            found = source.execute(query, (table,) if "?" in query else ()).fetchone()
            upper = max(upper, int(found[0] or 0)) if found else upper
        except (sqlite3.DatabaseError, TypeError, ValueError):
            pass
    for rowid in range(1, min(upper, MAX_PROBES) + 1):
        if rowid in rows:
            continue
        try:
            r = source.execute(select + " WHERE id=?", (rowid,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        if r is not None:
            rows[rowid] = dict(zip(columns, r))
    return [rows[k] for k in sorted(rows)]


def _insert(db: sqlite3.Connection, table: str, row: dict) -> bool:
    try:
        db.execute(f"INSERT INTO {table}({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    except sqlite3.Error:
        return False  # a row damaged beyond its constraints (NULL title, a duplicate id)
    return True


def _title_from(content: str) -> str:
    line = " ".join(content.split())
    return (line[:48] + "…") if len(line) > 48 else (line or DEFAULT_TITLE)


def _snippet(content: str, needle: str, width: int = 40) -> str:
    i = _fold(content).find(needle)
    start = max(0, i - width)
    end = min(len(content), i + len(needle) + width)
    text = " ".join(content[start:end].split())
    return ("…" if start > 0 else "") + text + ("…" if end < len(content) else "")
