"""Start-up with a history that is damaged or cannot be written, and a crash that leaves its stack in the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PySide6.QtWidgets import QLabel, QMessageBox

from app import paths
from app.__main__ import show_store_notice, start_log
from app.conversation_store import ConversationStore
from app.single_instance import SingleInstance

ROOT = Path(__file__).resolve().parents[2]


def _home_under_a_file(tmp_path, monkeypatch) -> Path:
    """A HOME nobody can write, even root: it lies under a regular file, so no folder can be made in it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.delenv("MOE_CHAT_DATA", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(blocker / "home"))
    return blocker / "home"


def test_a_read_only_home_starts_with_history_in_memory_and_says_so(qtbot, make_window, tmp_path, monkeypatch):
    home = _home_under_a_file(tmp_path, monkeypatch)
    assert paths.data_dir() == home / ".local" / "share" / "moe-chat"  # returned, not raised
    store = ConversationStore(paths.database_path())
    assert store.in_memory
    assert start_log(paths.log_file()) is None  # no log file there: faulthandler stays on stderr
    guard = SingleInstance(paths.data_dir())
    assert guard.acquire()  # unguarded, not refused
    window = make_window(store=store, wait=False)
    show_store_notice(window, store)
    note = window.statusBar().findChild(QLabel, "storeNotice")
    assert note is not None and note.isVisible() and "nothing will be saved" in note.text()
    box = window.findChild(QMessageBox, "storeNoticeBox")
    qtbot.waitUntil(box.isVisible, timeout=5000)
    assert "nothing will be saved" in box.text()
    box.accept()
    chat = window.new_conversation()  # the window stays usable: new chats go to the in-memory store
    assert chat in [c.id for c in store.conversations()]
    guard.release()
    store.close()


def test_a_recovered_history_is_shown_with_where_the_old_file_went(qtbot, make_window, tmp_path):
    path = tmp_path / "c.sqlite3"
    path.write_text("not a database", encoding="utf-8")
    store = ConversationStore(path)
    window = make_window(store=store, wait=False)
    show_store_notice(window, store)
    box = window.findChild(QMessageBox, "storeNoticeBox")
    qtbot.waitUntil(box.isVisible, timeout=5000)
    assert str(store.moved_to) in box.text()
    assert "recovered" in window.statusBar().findChild(QLabel, "storeNotice").text()
    box.accept()
    store.close()


def test_a_healthy_history_shows_no_notice(make_window, tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    window = make_window(store=store, wait=False)
    show_store_notice(window, store)
    assert window.statusBar().findChild(QLabel, "storeNotice") is None
    store.close()


def test_self_test_runs_on_a_data_folder_that_cannot_be_created(tiny_model, tmp_path):
    """Before: NotADirectoryError traceback from the data folder, exit 1, no window."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    result = subprocess.run(
        [sys.executable, "-m", "app", "--self-test", "--model", str(tiny_model), "--data-dir", str(blocker / "data"),
         "--timeout", "120"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and "nothing will be saved" in report["history_notice"]
    assert "Traceback" not in result.stderr


def test_a_crash_leaves_every_thread_stack_in_the_log(tmp_path):
    log = tmp_path / "moe-chat.log"
    code = (
        "import faulthandler, logging\n"
        "from pathlib import Path\n"
        "from app.__main__ import start_log\n"
        f"assert start_log(Path({str(log)!r})) is not None\n"
        "logging.getLogger('app').warning('about to crash')\n"
        "def crash_here():\n"
        "    faulthandler._sigsegv()\n"
        "crash_here()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0
    text = log.read_text(encoding="utf-8")
    assert "MoE Chat started" in text and "about to crash" in text
    assert "Fatal Python error: Segmentation fault" in text and "crash_here" in text


def test_a_long_log_is_rotated_at_start(tmp_path):
    log = tmp_path / "moe-chat.log"
    log.write_text("x" * (2 << 20), encoding="utf-8")
    code = f"from pathlib import Path\nfrom app.__main__ import start_log\nstart_log(Path({str(log)!r}))\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert (tmp_path / "moe-chat.log.1").stat().st_size == 2 << 20
    assert log.stat().st_size < 1000
