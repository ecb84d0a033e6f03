"""Where the app keeps its data: the user's data folder, or `$MOE_CHAT_DATA` (tests, self-test)."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QStandardPaths

from app import APP_ID

DATA_DIR_ENV = "MOE_CHAT_DATA"  # shared with engine.paths, so one variable moves all user data


def data_dir() -> Path:
    """The folder for the chat database and (when overridden) the settings file; created on demand."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        path = Path(override)
    else:  # ~/.local/share/moe-chat, %APPDATA%/moe-chat, ~/Library/Application Support/moe-chat
        path = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericDataLocation)) / APP_ID
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_path() -> Path:
    return data_dir() / "conversations.sqlite3"


def settings_file() -> Path | None:
    """An INI file next to the data when the data folder is overridden, else None (platform default)."""
    return data_dir() / "settings.ini" if os.environ.get(DATA_DIR_ENV) else None


def resource_dir() -> Path:
    """The repository's (or bundle's) `resources/` folder."""
    import resources

    return Path(resources.__file__).resolve().parent
