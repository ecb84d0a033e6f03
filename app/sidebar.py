"""The conversation list: new, rename, delete, export, and search across every conversation's text."""

from __future__ import annotations

import datetime as dt

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.conversation_store import ConversationStore

SEARCH_DEBOUNCE_MS = 200


def _when(timestamp: float) -> str:
    day = dt.datetime.fromtimestamp(timestamp)
    today = dt.date.today()
    if day.date() == today:
        return day.strftime("%H:%M")
    if (today - day.date()).days < 7:
        return day.strftime("%a")
    return day.strftime("%d %b")


class Sidebar(QWidget):
    conversation_selected = Signal(int)
    new_requested = Signal()
    rename_requested = Signal(int, str)
    delete_requested = Signal(int)
    export_requested = Signal(int, str)  # conversation id, "md" | "json"

    def __init__(self, store: ConversationStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("sidebar")
        self.store = store
        self.current_id: int | None = None
        self.new_button = QPushButton("+   New chat")
        self.new_button.setObjectName("newChatButton")
        self.new_button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.new_button.setToolTip("Start a new conversation (Ctrl+N)")
        self.new_button.clicked.connect(self.new_requested)
        self.search = QLineEdit()
        self.search.setObjectName("searchField")
        self.search.setPlaceholderText("Search all chats…")
        self.search.setClearButtonEnabled(True)
        self.search.setToolTip("Finds text in every message of every conversation (Ctrl+F)")
        self._search_timer = QTimer(self, singleShot=True, interval=SEARCH_DEBOUNCE_MS)
        self._search_timer.timeout.connect(self.refresh)
        self.search.textChanged.connect(self._search_timer.start)
        self.hint = QLabel()
        self.hint.setObjectName("sidebarHint")
        self.hint.setVisible(False)
        self.list = QListWidget()
        self.list.setObjectName("conversationList")
        self.list.setWordWrap(True)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        # the row, not the items: no item pointer is wrapped for Python while `refresh()` replaces the items
        # (one suspect for a segfault inside clear() seen once in CI)
        self.list.currentRowChanged.connect(self._on_current)
        self.list.itemDoubleClicked.connect(lambda item: self.ask_rename(item.data(Qt.ItemDataRole.UserRole)))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 12, 10, 10)
        layout.setSpacing(8)
        layout.addWidget(self.new_button)
        layout.addWidget(self.search)
        layout.addWidget(self.hint)
        layout.addWidget(self.list, 1)
        self._filling = False

    @property
    def query(self) -> str:
        return self.search.text().strip()

    def refresh(self) -> None:
        """Rebuild the list: every conversation, or the search hits with a snippet of the match."""
        self._filling = True
        # taken back one by one, so Python deletes the items (and their wrappers) itself: clear()
        # deleted them in C++, and shiboken segfaulted there now and then, releasing an item's wrapper
        while self.list.count():
            self.list.takeItem(self.list.count() - 1)
        if self.query:
            hits = self.store.search(self.query)
            for hit in hits:
                item = QListWidgetItem(f"{hit.title}\n{hit.snippet}")
                item.setToolTip(hit.snippet)
                item.setData(Qt.ItemDataRole.UserRole, hit.conversation_id)
                self.list.addItem(item)
            self.hint.setText(f"{len(hits)} conversation{'s' if len(hits) != 1 else ''} match “{self.query}”"
                              if hits else f"Nothing matches “{self.query}”")
            self.hint.setVisible(True)
        else:
            self.hint.setVisible(False)
            for conv in self.store.conversations():
                item = QListWidgetItem(conv.title)
                item.setToolTip(f"{conv.title}\nlast message {_when(conv.updated)}")
                item.setData(Qt.ItemDataRole.UserRole, conv.id)
                self.list.addItem(item)
        self._select(self.current_id)
        self._filling = False

    def set_current(self, conversation_id: int | None) -> None:
        self.current_id = conversation_id
        self._filling = True
        self._select(conversation_id)
        self._filling = False

    def ids(self) -> list[int]:
        return [self.list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.list.count())]

    def _select(self, conversation_id: int | None) -> None:
        for i in range(self.list.count()):
            if self.list.item(i).data(Qt.ItemDataRole.UserRole) == conversation_id:
                self.list.setCurrentRow(i)
                return
        self.list.setCurrentRow(-1)

    def _on_current(self, row: int) -> None:
        if row >= 0 and not self._filling:
            cid = self.list.item(row).data(Qt.ItemDataRole.UserRole)
            if cid != self.current_id:
                self.conversation_selected.emit(cid)

    def _menu(self, pos) -> None:
        item = self.list.itemAt(pos)
        if item is None:
            return
        cid = item.data(Qt.ItemDataRole.UserRole)
        menu = QMenu(self)
        menu.addAction("Rename…", lambda: self.ask_rename(cid))
        menu.addAction("Export as Markdown…", lambda: self.export_requested.emit(cid, "md"))
        menu.addAction("Export as JSON…", lambda: self.export_requested.emit(cid, "json"))
        menu.addSeparator()
        menu.addAction("Delete…", lambda: self.ask_delete(cid))
        menu.exec(self.list.mapToGlobal(pos))

    def ask_rename(self, conversation_id: int) -> None:
        conv = self.store.conversation(conversation_id)
        if conv is None:
            return
        title, ok = QInputDialog.getText(self, "Rename conversation", "Title:", text=conv.title)
        if ok and title.strip():
            self.rename_requested.emit(conversation_id, title.strip())

    def ask_delete(self, conversation_id: int) -> None:
        conv = self.store.conversation(conversation_id)
        if conv is None:
            return
        answer = QMessageBox.question(self, "Delete conversation",
                                      f"Delete “{conv.title}” and all its messages? This cannot be undone.")
        if answer == QMessageBox.StandardButton.Yes:
            self.delete_requested.emit(conversation_id)
