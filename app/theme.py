"""Light and dark themes: one QPalette, one style sheet template, and the plot colours to match."""

from __future__ import annotations

from string import Template

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QPalette
from PySide6.QtWidgets import QApplication

from app.paths import resource_dir

THEMES = ("light", "dark")

COLORS: dict[str, dict[str, str]] = {
    "light": dict(
        window="#f7f8fa", surface="#ffffff", sidebar="#eff1f5", text="#1d2129", muted="#6b7280",
        border="#dde1e8", hover="#e4e7ee", selected="#dfe5fb", chip="#e4e7ee",
        accent="#4f63e0", accent_hover="#3f52cc", on_accent="#ffffff", badge="#8a94a6",
        user_bubble="#eef1fe", user_border="#d3dafb", alt_row="#f8f9fb", scroll="#c5cad3",
        warn="#f4c15d", stop="#d9534f", error_bg="#fdecec", error_text="#a12828", error_border="#f5c2c2",
        info_bg="#eef1fe", code_bg="#f2f4f7", link="#3f52cc",
    ),
    "dark": dict(
        window="#1b1d21", surface="#24272d", sidebar="#16181b", text="#e4e6eb", muted="#9aa1ad",
        border="#33373f", hover="#2c3037", selected="#303a66", chip="#2f333a",
        accent="#7085f5", accent_hover="#8596ff", on_accent="#0e1020", badge="#5b6270",
        user_bubble="#262c48", user_border="#36406e", alt_row="#272a30", scroll="#454a54",
        warn="#e3b04b", stop="#e0605b", error_bg="#3a1f22", error_text="#ff9d9a", error_border="#5c2a2e",
        info_bg="#262c48", code_bg="#1b1d22", link="#9aaaff",
    ),
}

# Series colours for pyqtgraph, readable on both backgrounds.
SERIES = {
    "light": dict(a="#4f63e0", b="#e8833a", c="#2e9e6a", d="#c2417e", grid=60),
    "dark": dict(a="#8596ff", b="#f4a261", c="#52c48f", d="#e879a9", grid=50),
}


def system_theme() -> str:
    """'dark' when the desktop asks for dark, else 'light'."""
    hints = QGuiApplication.styleHints()
    scheme = getattr(hints, "colorScheme", lambda: Qt.ColorScheme.Unknown)()
    return "dark" if scheme == Qt.ColorScheme.Dark else "light"


def resolve(name: str) -> str:
    return name if name in THEMES else system_theme()


def palette(name: str) -> QPalette:
    c = {k: QColor(v) for k, v in COLORS[name].items()}
    p = QPalette()
    roles = QPalette.ColorRole
    p.setColor(roles.Window, c["window"])
    p.setColor(roles.WindowText, c["text"])
    p.setColor(roles.Base, c["surface"])
    p.setColor(roles.AlternateBase, c["code_bg"])
    p.setColor(roles.Text, c["text"])
    p.setColor(roles.Button, c["surface"])
    p.setColor(roles.ButtonText, c["text"])
    p.setColor(roles.ToolTipBase, c["surface"])
    p.setColor(roles.ToolTipText, c["text"])
    p.setColor(roles.PlaceholderText, c["muted"])
    p.setColor(roles.Highlight, c["accent"])
    p.setColor(roles.HighlightedText, c["on_accent"])
    p.setColor(roles.Link, c["link"])
    p.setColor(roles.Mid, c["border"])
    for role in (roles.Text, roles.WindowText, roles.ButtonText):
        p.setColor(QPalette.ColorGroup.Disabled, role, c["muted"])
    return p


def style_sheet(name: str) -> str:
    template = Template((resource_dir() / "styles" / "app.qss").read_text(encoding="utf-8"))
    styles = (resource_dir() / "styles").as_posix()  # the spin box and combo box arrows live here
    return template.safe_substitute(COLORS[name], styles=styles)


def apply(app: QApplication, name: str) -> str:
    """Apply a theme ('light', 'dark' or 'system') to the whole application; returns the one used."""
    used = resolve(name)
    app.setStyle("Fusion")
    app.setPalette(palette(used))
    app.setStyleSheet(style_sheet(used))
    app.setProperty("moe_theme", used)
    return used


def current() -> str:
    app = QApplication.instance()
    value = app.property("moe_theme") if app is not None else None
    return value if value in THEMES else "light"


def color(key: str) -> str:
    return COLORS[current()][key]


def app_icon() -> QIcon:
    return QIcon(str(resource_dir() / "icons" / "app.svg"))
