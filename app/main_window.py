"""The main window: conversations on the left, the chat in the middle, live engine panels on the right.

Everything the engine does goes through `EngineClient` (queued signals to a worker thread), so this
class only ever updates widgets and the SQLite store, and the window never freezes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QByteArray, QStandardPaths, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QLabel,
    QMainWindow,
    QProgressBar,
    QScrollArea,
    QSizePolicy,
    QSplitter,
    QToolBar,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app import APP_NAME, theme
from app.budget_slider import BudgetBar
from app.chat_view import ChatView
from app.conversation_store import ConversationStore, Message
from app.engine_worker import SUMMARY_MAX_TOKENS, EngineClient, format_bytes
from app.model_picker import ModelPickerDialog
from app.panels import PanelStack
from app.paths import database_path
from app.remote_dialog import RemoteDialog, load_key, parse_remote_source
from app.settings import Key, Settings
from app.settings_dialog import ChatSettingsDialog, SettingsDialog

FLUSH_INTERVAL_MS = 1000   # a streaming reply reaches the database at least once a second
SHUTDOWN_TIMEOUT_MS = 2000


@dataclass
class ActiveReply:
    request_id: int
    conversation_id: int
    message: Message
    text: str = ""
    dirty: bool = False
    versions: list[dict] = field(default_factory=list)  # earlier replies, when this one regenerates
    shown: int = 0  # which of them was shown: put back if the new reply fails before its first token


@dataclass
class SummaryJob:
    """A summary being written for a new chat; nothing is stored until it is done."""
    request_id: int
    conversation_id: int
    tokens: int = 0


def reply_versions(message: Message) -> list[dict]:
    """Every version of a reply ({"content", "stats"}), the one shown included."""
    versions = message.stats.get("versions")
    if versions:
        return list(versions)
    stats = {k: v for k, v in message.stats.items() if k not in ("versions", "version")}
    return [{"content": message.content, "stats": stats}]


def summary_note(message: Message) -> str:
    """A summary message as the model reads it: labelled, so it is taken as context, not as an instruction."""
    title = message.stats.get("summary_of_title")
    named = f" ({title})" if title else ""
    return f"Summary of an earlier conversation{named}, which this one continues:\n{message.content}"


def default_export_path(title: str, fmt: str) -> Path:
    """The chat's title as a file name, in the user's Documents folder (else home)."""
    safe = "".join(ch if ch.isalnum() or ch in " -_" else "_" for ch in title).strip() or "chat"
    docs = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.DocumentsLocation)
    return Path(docs or Path.home()) / f"{safe}.{fmt}"


class MainWindow(QMainWindow):
    def __init__(
        self,
        settings: Settings | None = None,
        store: ConversationStore | None = None,
        model: str | None = None,
        autoload: bool = True,
    ) -> None:
        super().__init__()
        self.setWindowTitle(APP_NAME)
        self.setWindowIcon(theme.app_icon())
        self.settings = settings or Settings()
        self._owns_store = store is None
        self.store = store or ConversationStore(database_path())
        self.client = EngineClient(self)
        self.conversation_id: int | None = None
        self.active: ActiveReply | None = None
        self.summary: SummaryJob | None = None
        self.picker: ModelPickerDialog | None = None
        self.last_error = ""
        self._closed = False
        self._main_load_id: int | None = None
        self._server_wanted: tuple | None = None
        self._engine_wanted: tuple | None = None  # (device, threads, context cap) last given to the worker  # (port, key) the local server was last asked to run with

        self._build_ui()
        self._connect()
        self._restore_state()
        self.client.start()
        self.apply_engine_settings()
        self.apply_server_settings()
        self._open_initial_conversation()
        if autoload:
            self.load_model(model if model is not None else self.settings.value(Key.MODEL_SOURCE))

    # -- construction ----------------------------------------------------------------------------
    def _build_ui(self) -> None:
        self.resize(1440, 900)
        self.setMinimumSize(960, 600)
        toolbar = QToolBar("Main")
        toolbar.setObjectName("mainToolBar")
        toolbar.setMovable(False)
        toolbar.setFloatable(False)
        self.addToolBar(toolbar)
        icon = QLabel()
        icon.setPixmap(theme.app_icon().pixmap(22, 22))
        toolbar.addWidget(icon)
        title = QLabel(APP_NAME)
        title.setObjectName("appTitle")
        toolbar.addWidget(title)
        self.model_button = QToolButton()
        self.model_button.setObjectName("modelButton")
        self.model_button.setText("No model  ▾")
        self.model_button.setToolTip("Choose or load a model")
        self.model_button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.model_button.clicked.connect(self.open_model_picker)
        toolbar.addWidget(self.model_button)
        self.state_chip = QLabel("starting")
        self.state_chip.setObjectName("stateChip")
        toolbar.addWidget(self.state_chip)
        spacer = QWidget()
        spacer.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        toolbar.addWidget(spacer)
        self.theme_action = QAction("Dark", self)
        self.theme_action.setToolTip("Switch between the light and dark theme")
        self.theme_action.triggered.connect(self.toggle_theme)
        toolbar.addAction(self.theme_action)
        self.panels_action = QAction("Panels", self)
        self.panels_action.setCheckable(True)
        self.panels_action.setChecked(True)
        self.panels_action.setToolTip("Show or hide the live engine panels")
        self.panels_action.toggled.connect(lambda on: self.side_panel.setVisible(on))
        toolbar.addAction(self.panels_action)
        settings_action = QAction("Settings", self)
        settings_action.triggered.connect(self.open_settings)
        toolbar.addAction(settings_action)

        from app.sidebar import Sidebar  # local: keeps the import list short

        self.sidebar = Sidebar(self.store)
        self.sidebar.setMinimumWidth(200)
        self.chat_view = ChatView()
        self.budget_bar = BudgetBar()
        self.panels = PanelStack()
        column = QWidget()
        column.setObjectName("sidePanel")
        side = QVBoxLayout(column)
        side.setContentsMargins(10, 10, 10, 10)
        side.setSpacing(8)
        side.addWidget(self.budget_bar)
        side.addWidget(self.panels, 1)
        self.side_panel = QScrollArea()  # scrolls only when the window is too short for all panels
        self.side_panel.setObjectName("sideScroll")
        self.side_panel.setWidgetResizable(True)
        self.side_panel.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.side_panel.setMinimumWidth(400)
        self.side_panel.setWidget(column)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.addWidget(self.sidebar)
        self.splitter.addWidget(self.chat_view)
        self.splitter.addWidget(self.side_panel)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([250, 750, 440])
        self.setCentralWidget(self.splitter)

        self.status_label = QLabel("Starting the engine…")
        self.device_label = QLabel()
        self.ram_label = QLabel()
        self.context_label = QLabel()
        self.context_label.setObjectName("contextLabel")
        self.context_label.setToolTip("Tokens this conversation fills of the model's context")
        self.server_label = QLabel()
        self.server_label.setObjectName("serverLabel")
        self.server_label.setVisible(False)
        self.server_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.load_bar = QProgressBar()
        self.load_bar.setRange(0, 1000)
        self.load_bar.setMaximumWidth(220)
        self.load_bar.setVisible(False)
        bar = self.statusBar()
        bar.addWidget(self.status_label, 1)
        bar.addPermanentWidget(self.load_bar)
        bar.addPermanentWidget(self.context_label)
        bar.addPermanentWidget(self.server_label)
        bar.addPermanentWidget(self.device_label)
        bar.addPermanentWidget(self.ram_label)

        self._build_menus()
        self.flush_timer = QTimer(self, interval=FLUSH_INTERVAL_MS)
        self.flush_timer.timeout.connect(self.flush_reply)

    def _build_menus(self) -> None:
        menu = self.menuBar()
        file = menu.addMenu("&File")
        file.addAction("New chat", QKeySequence.StandardKey.New, self.new_conversation)
        file.addAction("Open model…", QKeySequence("Ctrl+O"), self.open_model_picker)
        file.addAction("Connect to a server…", self.open_remote_dialog)
        file.addSeparator()
        file.addAction("Export chat as Markdown…", QKeySequence("Ctrl+Shift+E"),
                       lambda: self.export_conversation(self.conversation_id, "md"))
        file.addAction("Export chat as JSON…", lambda: self.export_conversation(self.conversation_id, "json"))
        file.addSeparator()
        file.addAction("Quit", QKeySequence.StandardKey.Quit, self.close)
        chat = menu.addMenu("&Chat")
        chat.addAction("Stop", QKeySequence("Esc"), self.stop)
        chat.addAction("Regenerate last reply", QKeySequence("Ctrl+R"), self.regenerate)
        chat.addAction("New chat with a summary", QKeySequence("Ctrl+Shift+N"), self.summarize_to_new_chat)
        chat.addAction("Rename chat…", QKeySequence("F2"), lambda: self.sidebar.ask_rename(self.conversation_id))
        chat.addAction("Delete chat…", lambda: self.sidebar.ask_delete(self.conversation_id))
        chat.addSeparator()
        chat.addAction("This chat's settings…", self.open_chat_settings)
        chat.addAction("Settings…", QKeySequence.StandardKey.Preferences, self.open_settings)
        view = menu.addMenu("&View")
        for name, text in (("light", "Light theme"), ("dark", "Dark theme"), ("system", "Follow the system")):
            view.addAction(text, lambda n=name: self.set_theme(n))
        view.addAction(self.panels_action)
        QShortcut(QKeySequence("Ctrl+F"), self, lambda: self.sidebar.search.setFocus())
        QShortcut(QKeySequence("Ctrl+L"), self, lambda: self.chat_view.input.setFocus())

    def _connect(self) -> None:
        c = self.client
        c.state_changed.connect(self._on_state)
        c.load_progress.connect(self._on_load_progress)
        c.model_loaded.connect(self._on_model_loaded)
        c.load_failed.connect(self._on_load_failed)
        c.model_unloaded.connect(lambda: self._on_model_info(None))
        c.token.connect(self._on_token)
        c.reply_finished.connect(self._on_reply_finished)
        c.summary_finished.connect(self._on_summary_finished)
        c.stats.connect(self._on_stats)
        c.budget_applied.connect(self._on_budget_applied)
        c.budget_refused.connect(self.budget_bar.refuse)
        c.policy_applied.connect(self._on_policy_applied)
        c.error.connect(self._on_error)
        c.server_changed.connect(self._on_server_changed)
        self.budget_bar.budget_requested.connect(c.set_budget)
        self.budget_bar.policy_requested.connect(c.set_policy)
        cv = self.chat_view
        cv.send_requested.connect(self.send_message)
        cv.stop_requested.connect(self.stop)
        cv.regenerate_requested.connect(lambda _mid: self.regenerate())
        cv.version_requested.connect(self.show_version)
        cv.edit_submitted.connect(self.edit_message)
        cv.system_prompt_changed.connect(self._on_system_prompt)
        cv.summary_requested.connect(self.summarize_to_new_chat)
        sb = self.sidebar
        sb.new_requested.connect(self.new_conversation)
        sb.conversation_selected.connect(self.open_conversation)
        sb.rename_requested.connect(self.rename_conversation)
        sb.delete_requested.connect(self.delete_conversation)
        sb.export_requested.connect(self.export_conversation)

    def _restore_state(self) -> None:
        geometry = self.settings.value(Key.GEOMETRY)
        if geometry:
            self.restoreGeometry(QByteArray(geometry))
        splitter = self.settings.value(Key.SPLITTER)
        if splitter:
            self.splitter.restoreState(QByteArray(splitter))
        self._update_theme_action()

    def _open_initial_conversation(self) -> None:
        conversations = self.store.conversations()
        last = self.settings.value(Key.LAST_CONVERSATION)
        ids = [c.id for c in conversations]
        if last in ids:
            self.open_conversation(last)
        elif ids:
            self.open_conversation(ids[0])
        else:
            self.new_conversation()

    # -- conversations ---------------------------------------------------------------------------
    def new_conversation(self) -> int:
        """Start a conversation (reusing the current one when it is still empty)."""
        if self.conversation_id is not None and not self.store.messages(self.conversation_id):
            self.sidebar.search.clear()
            self.chat_view.input.setFocus()
            return self.conversation_id
        conv = self.store.create_conversation(system_prompt=self.settings.value(Key.SYSTEM_PROMPT))
        self.sidebar.search.clear()
        self.sidebar.current_id = conv.id
        self.sidebar.refresh()
        self.open_conversation(conv.id)
        self.chat_view.input.setFocus()
        return conv.id

    def open_conversation(self, conversation_id: int) -> None:
        conv = self.store.conversation(conversation_id)
        if conv is None:
            return
        self.conversation_id = conversation_id
        self.settings.set_value(Key.LAST_CONVERSATION, conversation_id)
        self.sidebar.set_current(conversation_id)
        if not self.sidebar.ids() or conversation_id not in self.sidebar.ids():
            self.sidebar.refresh()
        self.chat_view.set_title(conv.title)
        self.chat_view.set_system_prompt(conv.system_prompt)
        self.chat_view.hide_banner()
        messages = self.store.messages(conversation_id)
        streaming = self.active if self.active and self.active.conversation_id == conversation_id else None
        if streaming:
            self.flush_reply()
            messages = self.store.messages(conversation_id)
        self.chat_view.set_messages(messages)
        if streaming:
            self.chat_view.begin_stream(streaming.message, streaming.text)
        replies = [m for m in messages if m.role == "assistant" and m.stats]
        self._show_context(replies[-1].stats if replies else None)
        self._offer_context_choices(replies[-1].stats if replies and replies[-1] is messages[-1] else None)
        held = self.store.chat_settings(conversation_id)
        current = self.client.model_info or {}
        if held.get("model_name") and current and held.get("model") != current.get("source"):
            self.chat_view.show_banner(
                f"This chat was held with {held['model_name']}; {current.get('name')} is loaded now. "
                "Pick the other one with the Model button to go on with it.", "info")

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self.store.rename(conversation_id, title)
        self.sidebar.refresh()
        if conversation_id == self.conversation_id:
            self.chat_view.set_title(self.store.conversation(conversation_id).title)

    def delete_conversation(self, conversation_id: int) -> None:
        if self.summary and self.summary.conversation_id == conversation_id:
            self.stop()  # its summary ends as stopped: no new chat
        if self.active and self.active.conversation_id == conversation_id:
            self.stop()
            self.active = None
            self._set_generating(False)
        self.store.delete_conversation(conversation_id)
        if conversation_id == self.conversation_id:
            self.conversation_id = None
            remaining = self.store.conversations()
            self.sidebar.refresh()
            if remaining:
                self.open_conversation(remaining[0].id)
            else:
                self.new_conversation()
        else:
            self.sidebar.refresh()

    def export_conversation(self, conversation_id: int | None, fmt: str, path: str | Path | None = None) -> Path | None:
        """Write a conversation as Markdown ('md') or JSON ('json'); asks for a file when no path is given."""
        if conversation_id is None:
            return None
        self.flush_reply()
        if path is None:
            filters = "Markdown (*.md)" if fmt == "md" else "JSON (*.json)"
            suggested = str(default_export_path(self.store.conversation(conversation_id).title, fmt))
            path, _ = QFileDialog.getSaveFileName(self, "Export conversation", suggested, filters)
            if not path:
                return None
        path = Path(path)
        if fmt == "md":
            path.write_text(self.store.export_markdown(conversation_id), encoding="utf-8")
        else:
            text = json.dumps(self.store.export_json(conversation_id), ensure_ascii=False, indent=2)
            path.write_text(text, encoding="utf-8")
        self.status_label.setText(f"Exported to {path}")
        return path

    def _on_system_prompt(self, text: str) -> None:
        if self.conversation_id is not None:
            self.store.set_system_prompt(self.conversation_id, text)

    # -- chatting --------------------------------------------------------------------------------
    @property
    def generating(self) -> bool:
        """A reply or a summary is being written: one at a time."""
        return self.active is not None or self.summary is not None

    def send_message(self, text: str) -> bool:
        """Commit the user's message and start the reply; False (text kept) when it cannot be sent."""
        text = text.strip()
        if not text:
            return False
        if self.generating or self.client.model_info is None:
            if self.client.model_info is None:
                self.chat_view.show_banner("No model is loaded yet. Wait for it to load, or choose one with "
                                           "the Model button.", "info")
            if not self.chat_view.input.toPlainText():
                self.chat_view.input.setPlainText(text)
            return False
        if self.conversation_id is None:
            self.new_conversation()
        self.chat_view.hide_banner()
        message = self.store.add_message(self.conversation_id, "user", text)
        self.chat_view.add_message(message)
        conv = self.store.conversation(self.conversation_id)
        self.chat_view.set_title(conv.title)
        self._start_reply()
        self.sidebar.refresh()
        return True

    def _engine_messages(self, conversation_id: int) -> list[dict]:
        """The conversation as the model reads it. A summary of an earlier chat joins the system prompt
        in one leading system message, the only place every chat template accepts one."""
        conv = self.store.conversation(conversation_id)
        system = [conv.system_prompt] if conv.system_prompt.strip() else []
        out = []
        for m in self.store.messages(conversation_id):
            if m.role == "system":
                system.append(summary_note(m))
            elif m.content or m.role == "user":
                out.append({"role": m.role, "content": m.content})
        return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + out

    def _start_reply(self, versions: list[dict] | None = None, shown: int = 0) -> None:
        cid = self.conversation_id
        messages = self._engine_messages(cid)
        placeholder = self.store.add_message(cid, "assistant", "", complete=False)
        params = {**self.settings.sampling(), **self.store.chat_settings(cid).get("sampling", {})}
        request_id = self.client.generate(messages, params)
        self.active = ActiveReply(request_id, cid, placeholder, versions=versions or [], shown=shown)
        self.chat_view.begin_stream(placeholder)
        self._set_generating(True)
        self.flush_timer.start()

    def stop(self) -> None:
        """Esc / Stop: the reply ends within one token; also cancels a model load in progress."""
        self.client.stop()

    def regenerate(self) -> bool:
        """Write the last reply again; the earlier versions are kept, to browse with ‹ ›."""
        if self.generating or self.conversation_id is None or self.client.model_info is None:
            return False
        messages = self.store.messages(self.conversation_id)
        if not messages or messages[-1].role != "assistant":
            return False
        last = messages[-1]
        versions = reply_versions(last)
        self.store.delete_message(last.id)
        self.chat_view.set_messages(self.store.messages(self.conversation_id))
        self._start_reply(versions, int(last.stats.get("version", len(versions) - 1)))
        return True

    def show_version(self, message_id: int, index: int) -> bool:
        """Show another version of the last reply; the conversation continues from the one shown."""
        message = self.store.message(message_id)
        if self.generating or message is None or message.conversation_id != self.conversation_id:
            return False
        versions = reply_versions(message)
        messages = self.store.messages(self.conversation_id)
        if not 0 <= index < len(versions) or messages[-1].id != message_id:
            return False
        chosen = versions[index]
        self.store.update_message(message_id, content=chosen["content"],
                                  stats={**chosen["stats"], "versions": versions, "version": index})
        self.chat_view.set_messages(self.store.messages(self.conversation_id))
        return True

    def edit_message(self, message_id: int, text: str) -> bool:
        """Replace a user message, drop everything after it, and continue from there."""
        message = self.store.message(message_id)
        if self.generating or message is None or message.role != "user" or self.client.model_info is None:
            return False
        self.store.update_message(message_id, content=text)
        self.store.truncate_after(message_id)
        self.open_conversation(message.conversation_id)
        self._start_reply()
        return True

    def flush_reply(self) -> None:
        """Write the streaming reply so far to the database (at least once a second)."""
        a = self.active
        if a is not None and a.dirty:
            self.store.update_message(a.message.id, content=a.text)
            a.dirty = False

    def _on_token(self, request_id: int, text: str) -> None:
        job = self.summary
        if job is not None and request_id == job.request_id:
            job.tokens += 1
            self.status_label.setText(f"Summarizing… {job.tokens} tokens")
            return
        a = self.active
        if a is None or request_id != a.request_id or not text:
            return
        a.text += text
        a.dirty = True
        if a.conversation_id == self.conversation_id:
            self.chat_view.append_token(text)

    def _on_reply_finished(self, request_id: int, stats: dict) -> None:
        a = self.active
        if a is None or request_id != a.request_id:
            return
        self.active = None
        self.flush_timer.stop()
        failed = stats.get("finish_reason") == "error"
        if failed and not a.text and a.versions:  # a failed regenerate: the reply shown before comes back
            shown = a.versions[a.shown]
            self.store.update_message(a.message.id, content=shown["content"], complete=True,
                                      stats={**shown["stats"], "versions": a.versions, "version": a.shown})
        elif failed and not a.text:
            self.store.delete_message(a.message.id)
        else:
            stored = stats
            if a.versions:
                versions = a.versions + [{"content": a.text, "stats": stats}]
                stored = {**stats, "versions": versions, "version": len(versions) - 1}
            self.store.update_message(a.message.id, content=a.text, complete=True, stats=stored)
        self._set_generating(False)
        if a.conversation_id == self.conversation_id:
            if (failed and not a.text) or a.versions:  # redrawn from the store: versions, or no reply
                self.chat_view.set_messages(self.store.messages(self.conversation_id))
            else:
                self.chat_view.end_stream(stats)
        info = self.client.model_info or {}
        if not failed and info:  # the chat remembers the model it was held with
            self.store.update_chat_settings(a.conversation_id, model=info.get("source", ""), model_name=info.get("name"))
        if a.conversation_id == self.conversation_id:
            self._show_context(stats)
            self._offer_context_choices(stats)
        if failed:
            self._on_error(stats.get("error", "The reply failed."))
        else:
            tps = stats.get("decode_tokens_per_s") or 0.0
            self.status_label.setText(
                f"Reply {'stopped' if stats.get('finish_reason') == 'cancelled' else 'finished'}: "
                f"{stats.get('new_tokens', 0)} tokens at {tps:.1f} tok/s")
        self.sidebar.refresh()

    def _show_context(self, stats: dict | None) -> None:
        """'Context 312 / 4096': what the last reply left in the model's context."""
        total = int((self.client.model_info or {}).get("context_length") or 0)
        if not total:
            self.context_label.setText("")
            return
        used = int((stats or {}).get("prompt_tokens", 0)) + int((stats or {}).get("new_tokens", 0))
        self.context_label.setText(f"Context {used:,} / {total:,}" + (" · full" if used >= total else ""))

    def _offer_context_choices(self, stats: dict | None) -> None:
        """When the last reply outgrew the context: go on without the oldest turns (what the engine does
        by itself), or start a new chat from a summary of this one."""
        stats = stats or {}
        if stats.get("dropped_messages"):
            text = (f"This conversation no longer fits the model's context: its {stats['dropped_messages']} "
                    "oldest message(s) were left out of this reply.")
        elif stats.get("context_full"):
            text = "The reply stopped because the model's context is full."
        else:
            self.chat_view.hide_context_offer()
            return
        self.chat_view.show_context_offer(text)

    # -- a new chat from a summary -----------------------------------------------------------------
    def summarize_to_new_chat(self) -> bool:
        """Ask the model for a summary of this chat, to start a new chat from (the worker writes it; Esc
        stops it). This chat is never changed; False when it cannot start now."""
        cid = self.conversation_id
        if self.generating or cid is None:
            return False
        if self.client.model_info is None:
            self.chat_view.show_banner("No model is loaded, so this chat cannot be summarized. Choose one with "
                                       "the Model button.", "info")
            return False
        messages = self._engine_messages(cid)
        if not any(m["role"] != "system" for m in messages):
            self.chat_view.show_banner("This chat has nothing to summarize yet.", "info")
            return False
        params = {**self.settings.sampling(), **self.store.chat_settings(cid).get("sampling", {})}
        self.summary = SummaryJob(self.client.summarize(messages, params, SUMMARY_MAX_TOKENS), cid)
        self.chat_view.hide_context_offer()
        self.chat_view.show_banner("Summarizing this chat for a new one… Esc stops; this chat stays as it is.",
                                   "info")
        self.status_label.setText("Summarizing…")
        self._set_generating(True)
        return True

    def _on_summary_finished(self, request_id: int, text: str, stats: dict) -> None:
        """A summary that ended well becomes the first message of a new chat; a stopped or failed one
        leaves no new chat, and the old one as it was."""
        job = self.summary
        if job is None or request_id != job.request_id:
            return
        self.summary = None
        self._set_generating(False)
        reason = stats.get("finish_reason")
        if reason == "cancelled":
            self.status_label.setText("Summary stopped.")
            self.chat_view.show_banner("The summary was stopped: no new chat was made, and the chat is unchanged.",
                                       "info")
            return
        conv = None
        if reason == "error":
            problem = str(stats.get("error") or "the engine failed")
        elif not text.strip():
            problem = "the model wrote nothing"
        else:
            conv = self.store.start_from_summary(job.conversation_id, text.strip())
            problem = "the chat was deleted meanwhile"
        if conv is None:
            self._on_error(f"Could not start a new chat from a summary: {problem.rstrip('.')}. No new chat was "
                           "made, and the chat is unchanged.")
            return
        self.sidebar.search.clear()
        self.sidebar.current_id = conv.id
        self.sidebar.refresh()
        self.open_conversation(conv.id)
        self.chat_view.show_banner("This chat goes on from a summary of the earlier one, which stays in the "
                                   "sidebar as it was.", "info")
        self.status_label.setText(f"New chat from a summary ({stats.get('new_tokens', 0)} tokens)")
        self.chat_view.input.setFocus()

    def _set_generating(self, on: bool) -> None:
        self.chat_view.set_generating(on)

    # -- model -----------------------------------------------------------------------------------
    def load_model(self, source: str | None) -> int:
        """Load a model on the worker ('' = the embedded demo model); the window stays usable."""
        remote = parse_remote_source(source or "")
        if remote is not None:
            return self.connect_remote(*remote, load_key(self.settings, remote[0]))
        budget = self.settings.value(Key.BUDGET_SHARE)  # a share, so it suits a model of any size
        self._main_load_id = self.client.load(source or "", budget, self.settings.value(Key.POLICY))
        name = Path(source).name if source else "demo model"
        self.status_label.setText(f"Loading {name}…")
        self.load_bar.setValue(0)
        self.load_bar.setVisible(True)
        return self._main_load_id

    def connect_remote(self, base_url: str, model: str, api_key: str = "") -> int:
        """Chat with a model on an OpenAI-compatible server; answered like a local load."""
        self._main_load_id = self.client.load_remote(base_url, model, api_key)
        self.status_label.setText(f"Connecting to {base_url}…")
        return self._main_load_id

    def open_remote_dialog(self) -> RemoteDialog:
        dialog = RemoteDialog(self.client, self.settings, self)
        dialog.connect_requested.connect(self.connect_remote)
        dialog.finished.connect(lambda _r: self._remote_dialog_closed(dialog))
        dialog.open()
        return dialog

    def _remote_dialog_closed(self, dialog: RemoteDialog) -> None:
        if getattr(dialog, "warning", ""):
            self.chat_view.show_banner(dialog.warning)
        dialog.deleteLater()

    def open_model_picker(self) -> ModelPickerDialog:
        """Open the model picker (window-modal, non-blocking); returns it so tests can drive it."""
        if self.picker is not None and self.picker.isVisible():
            self.picker.raise_()
            return self.picker
        budget = self.settings.value(Key.BUDGET_SHARE)
        self.picker = ModelPickerDialog(self.client, self.settings, budget, self)
        self.picker.finished.connect(self._on_picker_closed)
        self.picker.remote_requested.connect(self.open_remote_dialog)
        self.picker.open()
        return self.picker

    def _on_picker_closed(self, _result: int) -> None:
        picker, self.picker = self.picker, None
        if picker is not None:
            picker.deleteLater()

    def _on_load_progress(self, _load_id: int, fraction: float, message: str) -> None:
        self.load_bar.setVisible(True)
        self.load_bar.setValue(int(fraction * 1000))
        self.status_label.setText(f"Loading: {message}")

    def _on_model_loaded(self, _load_id: int, info: dict) -> None:
        self.load_bar.setVisible(False)
        self.settings.set_value(Key.MODEL_SOURCE, info.get("source", ""))
        self._on_model_info(info)
        self.chat_view.hide_banner()
        device = info.get("device", "cpu")
        where = "CPU, cache simulated (no GPU)" if info.get("simulated_cache") else device
        self.status_label.setText(f"Loaded {info.get('name', 'model')} on {where}")

    def _on_model_info(self, info: dict | None) -> None:
        self.budget_bar.set_model(info)
        self.panels.reset()
        if info is None:
            self.model_button.setText("No model  ▾")
            self.device_label.setText("")
            return
        self.model_button.setText(f"{info.get('name', 'model')}  ▾")
        self.model_button.setToolTip(
            f"{info.get('architecture', '')} · {info.get('num_experts', 0)} experts × "
            f"{info.get('num_moe_layers', 0)} MoE layers, top-{info.get('top_k', 0)}\n{info.get('path', '')}"
        )
        if info.get("remote"):
            self.device_label.setText(f"remote · {info.get('base_url', '')}")
        elif info.get("has_runtime"):
            where = "CPU · simulated GPU cache" if info.get("simulated_cache") else f"{info.get('device', '').upper()} cache"
            held = info.get("experts", "source")
            self.device_label.setText(where if held == "source" else f"{where} · {held} experts")
        else:
            self.device_label.setText("no expert cache")
        if not info.get("has_tokenizer", True):
            self.chat_view.show_banner("This model folder has no tokenizer, so it cannot chat. "
                                       "Add the tokenizer files or pick another model.")

    def _on_load_failed(self, load_id: int, message: str, cancelled: bool) -> None:
        self.load_bar.setVisible(False)
        running = self.client.model_info is not None
        suffix = " The current model keeps running." if running else ""
        self.status_label.setText("Loading cancelled." if cancelled else "Loading failed.")
        if self.picker is None and cancelled and not running:
            self.chat_view.show_banner("Loading was cancelled. Choose a model with the Model button.", "info")
        elif self.picker is None and not cancelled:
            self.chat_view.show_banner(f"Could not load the model: {message}" + ("" if running else
                                       " Choose a model with the Model button.") + suffix)
        self.last_error = message

    def _on_budget_applied(self, nbytes: int) -> None:
        self.budget_bar.set_budget(nbytes)
        total = int((self.client.model_info or {}).get("runtime_expert_bytes_total") or 0)
        if total:
            self.settings.set_value(Key.BUDGET_SHARE, min(1.0, nbytes / total))
        self.status_label.setText(f"Cache budget set to {format_bytes(nbytes)}")

    def _on_policy_applied(self, name: str) -> None:
        self.budget_bar.set_policy(name)
        self.settings.set_value(Key.POLICY, name)
        self.status_label.setText(f"Cache policy: {name}")

    def _on_stats(self, snap: dict) -> None:
        self.panels.update_stats(snap)
        self.ram_label.setText(f"RAM {format_bytes(snap.get('rss_bytes', 0))}")

    def _on_state(self, state: str) -> None:
        if state == "idle" and self.client.model_info is None:
            state = "no model"
        self.state_chip.setText({"idle": "ready", "loading": "loading…", "generating": "writing…",
                                 "summarizing": "summarizing…", "serving": "serving API…"}.get(state, state))
        self.state_chip.setProperty("state", state)
        self.state_chip.style().unpolish(self.state_chip)
        self.state_chip.style().polish(self.state_chip)

    def _on_error(self, message: str) -> None:
        self.last_error = message
        self.status_label.setText(message)
        self.chat_view.show_banner(message)

    # -- settings and theme ----------------------------------------------------------------------
    def open_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self)
        if dialog.exec():
            self.set_theme(self.settings.value(Key.THEME))
            if self.apply_engine_settings() and self.client.model_info is not None:
                self.status_label.setText("Engine settings apply from the next model load (Model ▸ load it again).")
            self.apply_server_settings()

    def apply_engine_settings(self) -> bool:
        """Hand device, threads and context cap to the worker; True when they changed."""
        wanted = (self.settings.value(Key.DEVICE), self.settings.value(Key.THREADS),
                  self.settings.value(Key.CONTEXT_LENGTH))
        if wanted == self._engine_wanted:
            return False
        self._engine_wanted = wanted
        self.client.set_load_options(*wanted)
        return True

    def open_chat_settings(self) -> ChatSettingsDialog | None:
        """This chat's own sampling (kept with the chat); the defaults stay in Settings."""
        cid = self.conversation_id
        if cid is None:
            return None
        dialog = ChatSettingsDialog(self.settings, self.store.chat_settings(cid).get("sampling", {}), self)
        dialog.accepted.connect(lambda: self.store.update_chat_settings(cid, sampling=dialog.overrides() or None))
        dialog.finished.connect(dialog.deleteLater)
        dialog.open()
        return dialog

    # -- the local server ------------------------------------------------------------------------
    def apply_server_settings(self) -> None:
        """Start, restart or stop the local server to match the settings (only when they changed)."""
        wanted = None
        if self.settings.value(Key.SERVER_ENABLED):
            wanted = (self.settings.value(Key.SERVER_PORT), self.settings.value(Key.SERVER_API_KEY))
        if wanted == self._server_wanted:
            return
        self._server_wanted = wanted
        if wanted is None:
            self.client.stop_server()
        else:
            self.client.start_server(*wanted)

    def _on_server_changed(self, state: dict) -> None:
        url = state.get("url")
        self.server_label.setVisible(url is not None)
        if url is not None:
            self.server_label.setText(f"API {url}")
            self.server_label.setToolTip("OpenAI-compatible server on the loaded model; the base URL for clients")
            self.status_label.setText(f"Local server at {url}")
        elif state.get("error"):
            self._server_wanted = None  # let the next settings change try again
            self._on_error(state["error"])

    def set_theme(self, name: str) -> None:
        self.settings.set_value(Key.THEME, name)
        app = QApplication.instance()
        theme.apply(app, name)
        self.panels.apply_theme()
        for w in self.chat_view.widgets:
            w.body.refresh_style()
        self._update_theme_action()

    def toggle_theme(self) -> None:
        self.set_theme("light" if theme.current() == "dark" else "dark")

    def _update_theme_action(self) -> None:
        self.theme_action.setText("Light theme" if theme.current() == "dark" else "Dark theme")

    # -- shutdown --------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:
        """Stop the engine and join its thread (within 2 s) before the window goes."""
        if not self._closed:
            self._closed = True
            self.flush_timer.stop()
            if self.picker is not None:
                self.picker.reject()
            a = self.active
            if a is not None:  # keep what was written; it is marked as interrupted
                self.store.update_message(a.message.id, content=a.text, complete=False,
                                          stats={"finish_reason": "cancelled"})
                self.active = None
            self.client.shutdown(SHUTDOWN_TIMEOUT_MS)
            self.settings.set_value(Key.GEOMETRY, self.saveGeometry())
            self.settings.set_value(Key.SPLITTER, self.splitter.saveState())
            self.settings.sync()
            if self._owns_store:
                self.store.close()
        super().closeEvent(event)
