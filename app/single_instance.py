"""One running app per data folder: a second launch asks the first to show its window, then exits.

Two windows on one chat database would each show a stale sidebar and overwrite each other's settings.
A QLockFile in the data folder decides who runs: taking it is atomic, and a lock left by a crashed
process is taken over because its PID is gone. The request to raise the window is a file beside it
that the running app watches. Both are QtCore only (the bundle leaves QtNetwork out). A folder that
cannot hold the lock (read-only) is not guarded: the history is in memory there, so nothing is shared.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from PySide6.QtCore import QFileSystemWatcher, QLockFile, QObject, Signal

LOCK_NAME = "moe-chat.lock"
RAISE_NAME = "moe-chat.raise"  # a later launch writes here; the running app raises its window

log = logging.getLogger(__name__)


class SingleInstance(QObject):
    """acquire() -> True when this process is the one to run; emits raise_requested for later launches."""

    raise_requested = Signal()

    def __init__(self, data_dir: Path | str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.data_dir = Path(data_dir)
        self.message = ""  # for a second launch: what to print before exiting 0
        self._lock = QLockFile(str(self.data_dir / LOCK_NAME))
        self._lock.setStaleLockTime(0)  # only a dead owner makes a lock stale, never its age
        self._raise_file = self.data_dir / RAISE_NAME
        self._watcher: QFileSystemWatcher | None = None

    def acquire(self) -> bool:
        """Take the data folder, or ask the app that holds it to raise its window; False means: exit now."""
        if self._lock.tryLock(0):
            self._watch()
            return True
        if self._lock.error() != QLockFile.LockError.LockFailedError:
            log.warning("no single-instance lock in %s (%s); starting unguarded", self.data_dir, self._lock.error())
            return True
        pid = self._lock.getLockInfo()[0]  # (pid, hostname, app name)
        try:
            self._raise_file.write_text(f"{time.time()}\n", encoding="utf-8")
            asked = "it was asked to bring its window to the front"
        except OSError:
            asked = "switch to its window"
        self.message = f"MoE Chat is already running on {self.data_dir} (process {pid}); {asked}."
        return False

    def _watch(self) -> None:
        try:
            self._raise_file.write_text("", encoding="utf-8")
        except OSError as exc:
            log.warning("cannot watch %s (%s): a second launch cannot raise this window", self._raise_file, exc)
            return
        self._watcher = QFileSystemWatcher([str(self._raise_file)], self)
        self._watcher.fileChanged.connect(self._on_changed)

    def _on_changed(self, path: str) -> None:
        if path not in self._watcher.files() and Path(path).exists():
            self._watcher.addPath(path)  # replaced rather than written: watch the new file
        if Path(path).exists() and Path(path).stat().st_size:
            self.raise_requested.emit()

    def release(self) -> None:
        """Let the next launch run (the OS does the same when the process dies: the lock goes stale)."""
        if self._watcher is not None:
            self._watcher.removePaths(self._watcher.files())
            self._watcher = None
        self._lock.unlock()
