"""One app per data folder: a second launch raises the first window and exits; a crash never blocks a start."""

from __future__ import annotations

import subprocess
import sys

from app.single_instance import LOCK_NAME, SingleInstance


def test_a_second_launch_asks_the_first_to_raise_its_window(qtbot, tmp_path):
    first = SingleInstance(tmp_path)
    assert first.acquire() and first.message == ""
    second = SingleInstance(tmp_path)
    with qtbot.waitSignal(first.raise_requested, timeout=5000):
        assert not second.acquire()
    assert "already running" in second.message and str(tmp_path) in second.message
    first.release()
    third = SingleInstance(tmp_path)  # the first one quit: the next launch runs
    assert third.acquire()
    third.release()


def test_another_data_folder_is_another_instance(tmp_path):
    a, b = SingleInstance(tmp_path / "a"), SingleInstance(tmp_path / "b")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert a.acquire() and b.acquire()
    a.release()
    b.release()


def test_a_lock_left_by_a_crashed_process_does_not_block_start(tmp_path):
    """The child takes the lock and dies without unlocking (os._exit), as a crash would."""
    code = (
        "import os, sys\n"
        "from PySide6.QtCore import QLockFile\n"
        f"lock = QLockFile({str(tmp_path / LOCK_NAME)!r})\n"
        "assert lock.tryLock(0)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (tmp_path / LOCK_NAME).exists()  # the stale lock is there
    guard = SingleInstance(tmp_path)
    assert guard.acquire()
    guard.release()


def test_a_folder_that_cannot_hold_a_lock_starts_unguarded(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    guard = SingleInstance(blocker / "data")  # no folder can be made under a file, even by root
    assert guard.acquire() and guard.message == ""
    guard.release()


FIRST = """
import sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
import app.__main__ as m

qt = QApplication(sys.argv[:1])  # main() reuses it; the timers below need it
shown = m.bring_to_front

def spy(window):
    shown(window)
    print("raised", window.isVisible(), flush=True)
    quit_when_started(window)

def quit_when_started(window):
    # quit once the engine has started (its failed load is in): quitting while the engine thread
    # still imports torch is a separate problem (the thread outlives the 2 s shutdown wait)
    if window.last_error or window.client.model_info:
        qt.quit()
    else:
        QTimer.singleShot(100, lambda: quit_when_started(window))

m.bring_to_front = spy
QTimer.singleShot(90_000, qt.quit)  # never hang the suite
sys.exit(m.main(sys.argv[1:]))
"""


def test_two_launches_of_the_app_on_one_data_folder(tmp_path):
    """The real `python -m app` twice: the second exits 0 with a message and the first raises its window."""
    import os
    import time
    from pathlib import Path

    from app.single_instance import RAISE_NAME

    root = Path(__file__).resolve().parents[2]
    data = tmp_path / "data"
    no_model = tmp_path / "no-model"  # a quick failed load: the window is up either way
    no_model.mkdir()
    args = ["--data-dir", str(data), "--model", str(no_model)]
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    first = subprocess.Popen([sys.executable, "-c", FIRST, *args], cwd=root, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not (data / RAISE_NAME).exists():  # the first one holds the folder and watches for requests
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first instance never took the data folder"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "app", *args], cwd=root, env=env, capture_output=True,
                                text=True, timeout=120, check=False)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "already running" in second.stdout and str(first.pid) in second.stdout
        out, err = first.communicate(timeout=90)
        assert "raised True" in out, err[-3000:]
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
