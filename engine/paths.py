"""Where the engine keeps user data (profiles) without knowing about Qt."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def user_data_dir() -> Path:
    """`$MOE_CHAT_DATA`, else the platform's per-user data folder for moe-chat."""
    if os.environ.get("MOE_CHAT_DATA"):
        base = Path(os.environ["MOE_CHAT_DATA"])
    elif sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home())) / "moe-chat"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support" / "moe-chat"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "moe-chat"
    return base
