"""Fixtures for the desktop app: offscreen Qt, temp data, real windows on a tiny model, no stray threads."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is imported anywhere: no display

import pytest
import shiboken6
from PySide6.QtCore import QCoreApplication, QEvent, QStandardPaths, QThread

from app.settings import Key, Settings

TEST_MAX_TOKENS = 12
TEST_SEED = 0  # fixed sampling: the tiny random model's replies (and where it would stop) are reproducible


@pytest.fixture(autouse=True)
def app_data_dir(tmp_path, monkeypatch):
    """Chats and settings live in a temp folder (MOE_CHAT_DATA), and Qt's own paths in test mode."""
    QStandardPaths.setTestModeEnabled(True)
    folder = tmp_path / "user-data"
    monkeypatch.setenv("MOE_CHAT_DATA", str(folder))
    return folder


@pytest.fixture(autouse=True)
def hf_cache(hf_cache):
    """Every app test gets the empty Hugging Face cache, so the model picker never scans the real one."""
    return hf_cache


@pytest.fixture(autouse=True)
def no_dangling_qthreads(monkeypatch):
    """napari-style: every QThread a test starts must have stopped by the end of the test."""
    started: list[QThread] = []
    original = QThread.start

    def start(self, *args, **kwargs):
        started.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QThread, "start", start)
    yield
    running = [t for t in started if shiboken6.isValid(t) and t.isRunning()]
    for t in running:  # do not let one failure hang the rest of the session
        t.quit()
        t.wait(5000)
    assert not running, f"{len(running)} QThread(s) still running after the test: {[t.objectName() for t in running]}"


@pytest.fixture
def make_window(qtbot, tiny_model):
    """make(model=tiny, wait=True) -> a shown MainWindow on the real engine; closed after the test.

    model="" means "none chosen", i.e. the embedded demo model.
    """
    from app.main_window import MainWindow

    windows = []

    def make(model=None, wait: bool = True, settings: Settings | None = None, **kwargs) -> MainWindow:
        if settings is None:
            settings = Settings()
            settings.set_value(Key.MAX_TOKENS, TEST_MAX_TOKENS)
        settings.set_value(Key.SEED, TEST_SEED)
        w = MainWindow(settings, model=str(tiny_model if model is None else model), **kwargs)
        windows.append(w)
        w.show()
        if wait:
            qtbot.waitUntil(lambda: w.client.model_info is not None, timeout=60_000)
        return w

    yield make
    for w in windows:
        if shiboken6.isValid(w):
            w.close()
            w.deleteLater()
    # destroyed now, not at some event loop in a later test, where freeing widgets under a running test
    # is one suspect for a rare segfault seen once in CI (QListWidget.clear)
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()


@pytest.fixture
def window(make_window):
    return make_window()


@pytest.fixture
def send(qtbot):
    """send(window, text) -> stats: send through the window and wait for the whole reply."""

    def send(window, text: str, timeout: int = 60_000) -> dict:
        with qtbot.waitSignal(window.client.reply_finished, timeout=timeout) as blocker:
            assert window.send_message(text)
        return blocker.args[1]

    return send
