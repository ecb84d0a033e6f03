"""The chat pane: message bubbles, the composer, streaming that never blocks, and smart auto-scroll."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication, QKeyEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.conversation_store import Message
from app.markdown_view import MarkdownView

RENDER_INTERVAL_MS = 60    # a streaming reply is re-rendered at most ~16 times a second
FOLLOW_SLACK_PX = 24       # within this of the bottom counts as "at the bottom"
ROLE_NAMES = {"user": "You", "assistant": "Assistant", "system": "System"}


def describe_stats(stats: dict) -> str:
    """'128 tokens · 23.4 tok/s · stopped' for a finished reply."""
    parts = []
    if stats.get("new_tokens"):
        parts.append(f"{stats['new_tokens']} tokens")
    if stats.get("decode_tokens_per_s"):
        parts.append(f"{stats['decode_tokens_per_s']:.1f} tok/s")
    reason = stats.get("finish_reason")
    if reason == "cancelled":
        parts.append("stopped")
    elif reason == "length":
        parts.append("context full" if stats.get("context_full") else "hit the token limit")
    elif reason == "error":
        parts.append("failed")
    if stats.get("dropped_messages"):
        parts.append(f"{stats['dropped_messages']} oldest message(s) left out")
    return " · ".join(parts)


def _repolish(widget: QWidget) -> None:
    widget.style().unpolish(widget)
    widget.style().polish(widget)


class ElidedLabel(QLabel):
    """A one-line label that shortens itself with … instead of pushing the layout wider."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._full = text
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setText(text)

    def setText(self, text: str) -> None:
        self._full = text
        self.setToolTip(text)
        self._elide()

    def full_text(self) -> str:
        return self._full

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        width = max(40, self.width())
        super().setText(self.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideRight, width))


class MessageWidget(QFrame):
    """One message: who, the text, and its actions (copy, edit for the user, regenerate)."""

    edit_submitted = Signal(int, str)
    regenerate_requested = Signal(int)
    version_requested = Signal(int, int)  # message id, version index

    def __init__(self, message: Message, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.message = message
        self.setObjectName("message")
        self.setProperty("role", message.role)
        self.setProperty("interrupted", message.role == "assistant" and not message.complete)
        self.text = message.content
        self.dirty = False

        role = ROLE_NAMES.get(message.role, message.role)
        if "summary_of" in message.stats:  # the first message of a chat that goes on from another
            role = f"Summary of “{message.stats.get('summary_of_title', 'an earlier chat')}”"
        self.role_label = QLabel(role)
        self.role_label.setObjectName("messageRole")
        self.meta_label = ElidedLabel()  # shortens rather than widening the bubble
        self.meta_label.setObjectName("messageMeta")
        self.copy_button = self._action("Copy", "Copy this message")
        self.copy_button.clicked.connect(self.copy_text)
        self.edit_button = self._action("Edit", "Edit this message and continue from here")
        self.edit_button.clicked.connect(self.start_edit)
        self.edit_button.setVisible(message.role == "user")
        self.regen_button = self._action("Regenerate", "Write this reply again")
        self.regen_button.clicked.connect(lambda: self.regenerate_requested.emit(self.message.id))
        self.regen_button.setVisible(False)
        versions = message.stats.get("versions") or []
        shown = int(message.stats.get("version", len(versions) - 1))
        self.prev_button = self._action("‹", "The previous version of this reply")
        self.prev_button.clicked.connect(lambda: self.version_requested.emit(self.message.id, shown - 1))
        self.next_button = self._action("›", "The next version of this reply")
        self.next_button.clicked.connect(lambda: self.version_requested.emit(self.message.id, shown + 1))
        self.version_label = QLabel(f"{shown + 1}/{len(versions)}")
        self.version_label.setObjectName("messageMeta")
        self.has_versions = len(versions) > 1
        self._can_go = (shown > 0, shown < len(versions) - 1)

        header = QHBoxLayout()
        header.setContentsMargins(0, 0, 0, 0)
        header.setSpacing(6)
        header.addWidget(self.role_label)
        header.addWidget(self.meta_label, 1)
        for b in (self.prev_button, self.version_label, self.next_button, self.copy_button, self.edit_button,
                  self.regen_button):
            header.addWidget(b)

        self.body = MarkdownView(self)
        self.body.code_copied.connect(lambda _i: self.flash("Code copied"))
        self.editor = QPlainTextEdit(self)
        self.editor.setVisible(False)
        self.editor.setMinimumHeight(80)
        self.save_button = QPushButton("Save && send")
        self.save_button.setDefault(True)
        self.save_button.clicked.connect(self.submit_edit)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_edit)
        self.edit_bar = QWidget(self)
        bar = QHBoxLayout(self.edit_bar)
        bar.setContentsMargins(0, 0, 0, 0)
        bar.addStretch(1)
        bar.addWidget(self.cancel_button)
        bar.addWidget(self.save_button)
        self.edit_bar.setVisible(False)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(14, 10, 14, 10)
        layout.setSpacing(4)
        layout.addLayout(header)
        layout.addWidget(self.body)
        layout.addWidget(self.editor)
        layout.addWidget(self.edit_bar)
        self.render()
        self.set_meta(describe_stats(message.stats) if message.role == "assistant" else "")
        if message.role == "assistant" and not message.complete and not message.stats:
            self.set_meta("interrupted")

    def _action(self, text: str, tip: str) -> QToolButton:
        b = QToolButton(self)
        b.setObjectName("messageAction")
        b.setText(text)
        b.setToolTip(tip)
        b.setCursor(Qt.CursorShape.PointingHandCursor)
        return b

    def render(self) -> None:
        self.dirty = False
        self.body.set_content(self.text, markdown=self.message.role == "assistant")

    def append(self, text: str) -> None:
        self.text += text
        self.dirty = True

    def set_meta(self, text: str) -> None:
        self.meta_label.setText(text)

    def flash(self, text: str) -> None:
        old = self.meta_label.full_text()
        self.meta_label.setText(text)
        QTimer.singleShot(1500, self, lambda: self.meta_label.setText(old))

    def copy_text(self) -> None:
        QGuiApplication.clipboard().setText(self.text)
        self.flash("Copied")

    def set_actions_enabled(self, enabled: bool) -> None:
        for b in (self.edit_button, self.regen_button):
            b.setEnabled(enabled)
        self.prev_button.setEnabled(enabled and self._can_go[0])
        self.next_button.setEnabled(enabled and self._can_go[1])

    def show_versions(self, on: bool) -> None:
        """‹ 2/3 › on the last reply, once it has been regenerated (earlier replies keep their choice)."""
        for w in (self.prev_button, self.version_label, self.next_button):
            w.setVisible(on and self.has_versions)

    def start_edit(self) -> None:
        self.editor.setPlainText(self.text)
        for w, editing in ((self.body, False), (self.editor, True), (self.edit_bar, True)):
            w.setVisible(editing)
        self.editor.setFocus()

    def cancel_edit(self) -> None:
        for w, editing in ((self.body, False), (self.editor, True), (self.edit_bar, True)):
            w.setVisible(not editing)

    def submit_edit(self) -> None:
        text = self.editor.toPlainText().strip()
        if not text:
            return
        self.cancel_edit()
        self.edit_submitted.emit(self.message.id, text)


class PromptEdit(QPlainTextEdit):
    """Enter sends, Shift+Enter adds a line, Esc stops; grows with its text up to eight lines."""

    submitted = Signal()
    stop_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("promptEdit")
        self.setPlaceholderText("Message the model…")
        self.setTabChangesFocus(True)
        self.document().documentLayout().documentSizeChanged.connect(self._grow)
        self._grow()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        key = event.key()
        if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            if event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
                self.insertPlainText("\n")
            else:
                self.submitted.emit()
            return
        if key == Qt.Key.Key_Escape:
            self.stop_requested.emit()
            return
        super().keyPressEvent(event)

    def _grow(self, *_args) -> None:
        line = self.fontMetrics().lineSpacing()
        lines = max(1, min(8, int(self.document().size().height())))
        self.setFixedHeight(lines * line + 14)

    def sizeHint(self) -> QSize:
        return QSize(400, self.height())


class ChatView(QWidget):
    """Shows one conversation and owns the composer. Streaming text is rendered on a timer."""

    send_requested = Signal(str)
    stop_requested = Signal()
    regenerate_requested = Signal(int)
    version_requested = Signal(int, int)
    edit_submitted = Signal(int, str)
    system_prompt_changed = Signal(str)
    summary_requested = Signal()  # "New chat with a summary", offered when the context is full

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("chatPane")
        self.widgets: list[MessageWidget] = []
        self.stream_widget: MessageWidget | None = None
        self.generating = False
        self.follow = True
        self._programmatic_scroll = False

        # header: title and the per-conversation system prompt
        self.title_label = ElidedLabel("New chat")
        self.title_label.setObjectName("chatTitle")
        self.system_toggle = QToolButton()
        self.system_toggle.setObjectName("systemPromptToggle")
        self.system_toggle.setText("System prompt ▸")
        self.system_toggle.setCheckable(True)
        self.system_toggle.toggled.connect(self._toggle_system)
        self.system_edit = QPlainTextEdit()
        self.system_edit.setObjectName("systemPromptEdit")
        self.system_edit.setPlaceholderText("Instructions for the assistant in this conversation")
        self.system_edit.setFixedHeight(64)
        self.system_edit.setVisible(False)
        self._system_timer = QTimer(self, singleShot=True, interval=400)
        self._system_timer.timeout.connect(lambda: self.system_prompt_changed.emit(self.system_edit.toPlainText()))
        self.system_edit.textChanged.connect(self._system_timer.start)
        self._loading_system = False

        header = QHBoxLayout()
        header.addWidget(self.title_label, 1)
        header.addWidget(self.system_toggle)

        self.banner = QLabel()
        self.banner.setObjectName("banner")
        self.banner.setWordWrap(True)
        self.banner.setVisible(False)
        self.banner.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        # what to do when the chat outgrew the context
        self.context_offer = QFrame()
        self.context_offer.setObjectName("contextOffer")
        self.context_offer_label = QLabel()  # styled as an info banner, its choices beside it
        self.context_offer_label.setObjectName("banner")
        self.context_offer_label.setProperty("kind", "info")
        self.context_offer_label.setWordWrap(True)
        self.drop_button = QPushButton("Go on without the oldest turns")
        self.drop_button.setToolTip("Keep chatting here; each reply leaves out the oldest messages that do not fit")
        self.drop_button.clicked.connect(self.hide_context_offer)
        self.summary_button = QPushButton("New chat with a summary")
        self.summary_button.setToolTip("The model summarizes this chat; a new chat starts from the summary "
                                       "and this one stays in the sidebar")
        self.summary_button.clicked.connect(self.summary_requested)
        offer = QHBoxLayout(self.context_offer)
        offer.setContentsMargins(0, 0, 0, 0)
        offer.addWidget(self.context_offer_label, 1)
        offer.addWidget(self.drop_button)
        offer.addWidget(self.summary_button)
        self.context_offer.setVisible(False)

        # messages
        self.column = QWidget()
        self.column.setObjectName("messageColumn")
        self.column_layout = QVBoxLayout(self.column)
        self.column_layout.setContentsMargins(4, 8, 12, 8)
        self.column_layout.setSpacing(10)
        self.empty_label = QLabel()
        self.empty_label.setObjectName("emptyState")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty_label.setWordWrap(True)
        self.column_layout.addWidget(self.empty_label)
        self.column_layout.addStretch(1)
        self.set_empty_text("Ask anything. Replies stream in as the model writes them.")
        self.scroll = QScrollArea()
        self.scroll.setObjectName("messageScroll")
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(self.column)
        bar = self.scroll.verticalScrollBar()
        bar.rangeChanged.connect(self._on_range_changed)
        bar.valueChanged.connect(self._on_scrolled)

        # composer
        self.input = PromptEdit()
        self.input.submitted.connect(self._on_submit)
        self.input.stop_requested.connect(self.stop_requested)
        self.input.installEventFilter(self)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("sendButton")
        self.send_button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.send_button.clicked.connect(self._on_send_clicked)
        self.composer = QFrame()
        self.composer.setObjectName("composer")
        row = QHBoxLayout(self.composer)
        row.setContentsMargins(10, 6, 6, 6)
        row.addWidget(self.input, 1)
        row.addWidget(self.send_button, 0, Qt.AlignmentFlag.AlignBottom)
        self.hint = QLabel("Enter sends · Shift+Enter new line · Esc stops")
        self.hint.setObjectName("composerHint")

        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 12, 16, 10)
        layout.setSpacing(8)
        layout.addLayout(header)
        layout.addWidget(self.system_edit)
        layout.addWidget(self.banner)
        layout.addWidget(self.context_offer)
        layout.addWidget(self.scroll, 1)
        layout.addWidget(self.composer)
        layout.addWidget(self.hint)

        self._render_timer = QTimer(self, interval=RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render_stream)

    # conversation --------------------------------------------------------------------------
    def set_title(self, title: str) -> None:
        self.title_label.setText(title)

    def set_system_prompt(self, text: str) -> None:
        self.system_edit.blockSignals(True)
        self.system_edit.setPlainText(text)
        self.system_edit.blockSignals(False)
        self.system_toggle.setText("System prompt ▾" if self.system_toggle.isChecked() else "System prompt ▸")

    def set_empty_text(self, text: str) -> None:
        self.empty_label.setText(text)

    def set_messages(self, messages: list[Message]) -> None:
        """Show a conversation from scratch (switching, editing, regenerating)."""
        self.stream_widget = None
        for w in self.widgets:
            self.column_layout.removeItem(w.row)
            w.row.deleteLater()
            w.setParent(None)
            w.deleteLater()
        self.widgets = []
        for m in messages:
            self.add_message(m)
        self.follow = True
        self._update_actions()
        QTimer.singleShot(0, self, self.scroll_to_bottom)

    def add_message(self, message: Message) -> MessageWidget:
        w = MessageWidget(message)
        w.edit_submitted.connect(self.edit_submitted)
        w.regenerate_requested.connect(self.regenerate_requested)
        w.version_requested.connect(self.version_requested)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        if message.role == "user":  # the user's bubbles sit to the right, as in every chat app
            row.addSpacing(56)
        row.addWidget(w, 1)
        self.column_layout.insertLayout(self.column_layout.count() - 1, row)
        w.row = row
        self.widgets.append(w)
        self.empty_label.setVisible(False)
        self._update_actions()
        return w

    def widget_for(self, message_id: int) -> MessageWidget | None:
        return next((w for w in self.widgets if w.message.id == message_id), None)

    # streaming -----------------------------------------------------------------------------
    def begin_stream(self, message: Message, text: str = "") -> MessageWidget:
        w = self.widget_for(message.id) or self.add_message(message)
        w.text = text
        w.set_meta("writing…")
        w.render()
        self.stream_widget = w
        self.follow = True
        self._render_timer.start()
        return w

    def append_token(self, text: str) -> None:
        if self.stream_widget is not None:
            self.stream_widget.append(text)

    def end_stream(self, stats: dict) -> None:
        self._render_timer.stop()
        w, self.stream_widget = self.stream_widget, None
        if w is not None:
            w.message.complete = True
            w.setProperty("interrupted", False)
            _repolish(w)
            w.render()
            w.set_meta(describe_stats(stats))
        self._update_actions()

    def _render_stream(self) -> None:
        w = self.stream_widget
        if w is not None and w.dirty:
            w.render()

    def set_generating(self, generating: bool) -> None:
        self.generating = generating
        self.summary_button.setEnabled(not generating)
        self.send_button.setText("Stop" if generating else "Send")
        self.send_button.setProperty("stop", generating)
        _repolish(self.send_button)
        self._update_actions()

    def _update_actions(self) -> None:
        last_assistant = next((w for w in reversed(self.widgets) if w.message.role == "assistant"), None)
        for w in self.widgets:
            w.regen_button.setVisible(w is last_assistant and w is self.widgets[-1])
            w.show_versions(w is self.widgets[-1])
            w.set_actions_enabled(not self.generating)

    # banner --------------------------------------------------------------------------------
    def show_banner(self, text: str, kind: str = "error") -> None:
        self.banner.setText(text)
        self.banner.setProperty("kind", kind)
        _repolish(self.banner)
        self.banner.setVisible(bool(text))

    def hide_banner(self) -> None:
        self.banner.setVisible(False)

    def show_context_offer(self, text: str) -> None:
        """The chat outgrew the model's context: go on without the oldest turns, or a new chat from a summary."""
        self.context_offer_label.setText(text + " Go on here without them, or start a new chat from a summary "
                                                "of this one?")
        self.context_offer.setVisible(True)

    def hide_context_offer(self) -> None:
        self.context_offer.setVisible(False)

    # composer ------------------------------------------------------------------------------
    def _on_submit(self) -> None:
        if self.generating:
            return
        text = self.input.toPlainText().strip()
        if text:
            self.input.clear()
            self.follow = True
            self.send_requested.emit(text)

    def _on_send_clicked(self) -> None:
        if self.generating:
            self.stop_requested.emit()
        else:
            self._on_submit()

    def eventFilter(self, obj, event) -> bool:
        if obj is self.input and event.type() in (QEvent.Type.FocusIn, QEvent.Type.FocusOut):
            self.composer.setProperty("focused", event.type() == QEvent.Type.FocusIn)
            _repolish(self.composer)
        return super().eventFilter(obj, event)

    def _toggle_system(self, on: bool) -> None:
        self.system_edit.setVisible(on)
        self.system_toggle.setText("System prompt ▾" if on else "System prompt ▸")

    # auto-scroll ---------------------------------------------------------------------------
    def _on_scrolled(self, value: int) -> None:
        if not self._programmatic_scroll:
            self.follow = value >= self.scroll.verticalScrollBar().maximum() - FOLLOW_SLACK_PX

    def _on_range_changed(self, _minimum: int, maximum: int) -> None:
        if self.follow:
            self._programmatic_scroll = True
            self.scroll.verticalScrollBar().setValue(maximum)
            self._programmatic_scroll = False

    def scroll_to_bottom(self) -> None:
        self.follow = True
        bar = self.scroll.verticalScrollBar()
        self._programmatic_scroll = True
        bar.setValue(bar.maximum())
        self._programmatic_scroll = False

    def sizeHint(self) -> QSize:
        return QSize(640, 700)

