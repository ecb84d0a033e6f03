"""Where the app keeps its data: the engine's one data folder (`engine.paths`), or `$MOE_CHAT_DATA`."""

from __future__ import annotations

import os
from pathlib import Path

from app.engine_worker import DATA_DIR_ENV, user_data_dir


def data_dir() -> Path:
    """The folder for the chat database and (when overridden) the settings file; created on demand.

    A folder that cannot be created (read-only HOME) is still returned: the store then keeps the
    history in memory and says so, and QSettings quietly keeps its values for the session.
    """
    path = user_data_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    return path


def database_path() -> Path:
    return data_dir() / "conversations.sqlite3"


def log_file() -> Path:
    """The app's log: warnings, and the stack of every thread when the process crashes (faulthandler)."""
    return data_dir() / "moe-chat.log"


def settings_file() -> Path | None:
    """An INI file next to the data when the data folder is overridden, else None (platform default)."""
    return data_dir() / "settings.ini" if os.environ.get(DATA_DIR_ENV) else None


def resource_dir() -> Path:
    """The repository's (or bundle's) `resources/` folder."""
    import resources

    return Path(resources.__file__).resolve().parent
