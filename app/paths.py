"""Where the app keeps its data: the engine's one data folder (`engine.paths`), or `$MOE_CHAT_DATA`."""

from __future__ import annotations

import os
from pathlib import Path

from app.engine_worker import DATA_DIR_ENV, user_data_dir


def data_dir() -> Path:
    """The folder for the chat database and (when overridden) the settings file; created on demand."""
    path = user_data_dir()
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
