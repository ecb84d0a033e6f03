"""A read-only Markdown view (Qt's own Markdown support) that sizes itself to its text.

Every fenced code block gets a "Copy code" link above it, so code can be copied in one click, and
code whose fence names a language is coloured by Pygments (a light or dark style, after the palette).
"""

from __future__ import annotations

import math
import re

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import (
    QColor,
    QDesktopServices,
    QFont,
    QGuiApplication,
    QPalette,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextFormat,
)
from PySide6.QtWidgets import QSizePolicy, QTextBrowser

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)")
STYLES = {"light": "default", "dark": "monokai"}


def highlight_spans(code: str, language: str, dark: bool) -> list[tuple[int, int, QTextCharFormat]]:
    """(start, length, format) for each coloured token of `code`; none for an unknown language."""
    from pygments.lexers import get_lexer_by_name
    from pygments.styles import get_style_by_name
    from pygments.util import ClassNotFound

    try:
        lexer = get_lexer_by_name(language, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return []
    style = get_style_by_name(STYLES["dark" if dark else "light"])
    spans, pos = [], 0
    for token, value in lexer.get_tokens(code):
        look = style.style_for_token(token)
        if look["color"] or look["bold"] or look["italic"]:
            fmt = QTextCharFormat()
            if look["color"]:
                fmt.setForeground(QColor(f"#{look['color']}"))
            if look["bold"]:
                fmt.setFontWeight(QFont.Weight.Bold)
            fmt.setFontItalic(bool(look["italic"]))
            spans.append((pos, len(value), fmt))
        pos += len(value)
    return spans


def with_copy_links(text: str) -> tuple[str, list[str]]:
    """Markdown with a copy link before each fenced code block, and the blocks' code (open ones too)."""
    out: list[str] = []
    blocks: list[str] = []
    fence: str | None = None
    code: list[str] = []
    for line in text.split("\n"):
        if fence is None:
            m = _FENCE_OPEN.match(line)
            if m:
                fence, lang = m.group(1), m.group(2)
                code = []
                blocks.append("")
                label = f"*{lang}* · " if lang else ""
                out += ["", f"{label}[Copy code](copy:{len(blocks) - 1})", ""]
            out.append(line)
        else:
            out.append(line)
            s = line.strip()
            if s and s[0] == fence[0] and set(s) == {fence[0]} and len(s) >= len(fence):
                fence = None
            else:
                code.append(line)
                blocks[-1] = "\n".join(code)
    return "\n".join(out), blocks


class MarkdownView(QTextBrowser):
    """Shows one message; its height follows the text so the chat column scrolls as a whole."""

    code_copied = Signal(int)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setObjectName("messageBody")
        self.setOpenLinks(False)
        self.setFrameShape(QTextBrowser.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse
            | Qt.TextInteractionFlag.TextSelectableByKeyboard
            | Qt.TextInteractionFlag.LinksAccessibleByMouse
        )
        self.document().setDocumentMargin(2)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)
        self.anchorClicked.connect(self._on_anchor)
        self.code_blocks: list[str] = []
        self._markdown = True
        self._text = ""
        self.setFixedHeight(24)

    def set_content(self, text: str, markdown: bool = True) -> None:
        self._text, self._markdown = text, markdown
        if markdown:
            md, self.code_blocks = with_copy_links(text)
            self.setMarkdown(md)
            self._style_code_blocks()
        else:
            self.code_blocks = []
            self.setPlainText(text)
        self._fit()

    def text(self) -> str:
        return self._text

    def refresh_style(self) -> None:
        """Re-render after a theme change (code backgrounds come from the palette)."""
        self.set_content(self._text, self._markdown)

    def _style_code_blocks(self) -> None:
        """Give code blocks a background, let long lines wrap instead of being cut off, colour them."""
        doc = self.document()
        bg = self.palette().color(QPalette.ColorRole.AlternateBase)
        dark = self.palette().color(QPalette.ColorRole.Base).lightness() < 128
        cursor = QTextCursor(doc)
        runs: list[tuple[int, str, list[str]]] = []  # (start, language, lines) of each code block
        block, inside = doc.begin(), False
        while block.isValid():
            fmt = block.blockFormat()
            code = fmt.nonBreakableLines() or fmt.hasProperty(QTextFormat.Property.BlockCodeFence)
            if code:
                new = QTextBlockFormat(fmt)
                new.setNonBreakableLines(False)
                new.setBackground(bg)
                new.setLeftMargin(6)
                new.setRightMargin(6)
                cursor.setPosition(block.position())
                cursor.setBlockFormat(new)
                language = str(fmt.property(QTextFormat.Property.BlockCodeLanguage) or "")
                if not inside:
                    runs.append((block.position(), language, []))
                runs[-1][2].append(block.text())
            inside = code
            block = block.next()
        for start, language, lines in runs:
            if not language:
                continue
            for offset, length, fmt in highlight_spans("\n".join(lines), language, dark):
                cursor.setPosition(start + offset)
                cursor.setPosition(start + offset + length, QTextCursor.MoveMode.KeepAnchor)
                cursor.mergeCharFormat(fmt)

    def _on_anchor(self, url: QUrl) -> None:
        if url.scheme() == "copy":
            try:
                index = int(url.path() or url.toString().split(":", 1)[1])
            except ValueError:
                return
            if 0 <= index < len(self.code_blocks):
                QGuiApplication.clipboard().setText(self.code_blocks[index])
                self.code_copied.emit(index)
        elif url.scheme() in ("http", "https", "mailto"):
            QDesktopServices.openUrl(url)

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self.document().setTextWidth(self.viewport().width())
        self._fit()

    def _fit(self, *_args) -> None:
        height = math.ceil(self.document().size().height()) + 2 * self.frameWidth() + 2
        if height != self.height():
            self.setFixedHeight(max(20, height))
