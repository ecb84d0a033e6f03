"""The folders MoE Chat reads and writes: one data folder for the app and the engine alike, and the
embedded demo model. No Qt here, so the CLI, the server and the window agree on every platform."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA_DIR_ENV = "MOE_CHAT_DATA"  # one variable moves all user data (tests, the bundle's self-test)

# the trained demo model: resources/ beside the engine, or inside a PyInstaller bundle
DEMO_MODEL_DIR = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parents[1])) / "resources" / "demo-model"


def user_data_dir() -> Path:
    """`$MOE_CHAT_DATA`, else the platform's per-user data folder for moe-chat (not created here).

    ~/.local/share/moe-chat (or $XDG_DATA_HOME), %APPDATA%/moe-chat, ~/Library/Application Support/moe-chat.
    """
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "moe-chat"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "moe-chat"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "moe-chat"
