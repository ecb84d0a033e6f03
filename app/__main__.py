"""`python -m app` / `moe-chat`: start the window (on the embedded demo model when none was chosen)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

# before numpy loads (torch, pyqtgraph), as engine/__init__.py explains
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

LOG_MAX_BYTES = 1 << 20  # a longer log is renamed to moe-chat.log.1 at start
_log_stream: TextIO | None = None  # stays open: faulthandler writes to its file descriptor on a crash
_log_handler: logging.Handler | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moe-chat", description="Chat with Mixture-of-Experts models.")
    p.add_argument("--model", help="model folder or Hugging Face repo id to load (default: the last one, else the demo model)")
    p.add_argument("--theme", choices=("light", "dark", "system"), help="colour theme (default: saved setting)")
    p.add_argument("--data-dir", help="keep chats and settings in this folder (default: the user's data folder)")
    p.add_argument("--self-test", action="store_true",
                   help="start the real window, chat once, move the budget slider, print a JSON report and exit")
    p.add_argument("--screenshot", help="with --self-test: save a PNG of the whole window here")
    p.add_argument("--timeout", type=float, default=300.0, help="with --self-test: give up after this many seconds")
    return p.parse_args(argv)


def start_log(path: Path) -> Path | None:
    """Log warnings to `path` and make a crash (SIGSEGV, SIGABRT) leave every thread's stack there.

    Returns the log's path, or None when it cannot be written (read-only data folder): then the stack
    goes to stderr, as Python's -X faulthandler would.
    """
    global _log_stream, _log_handler
    try:
        if path.is_file() and path.stat().st_size > LOG_MAX_BYTES:
            path.replace(path.with_name(path.name + ".1"))
        stream = open(path, "a", encoding="utf-8", buffering=1)
    except OSError:
        crash_stacks_to_stderr()
        return None
    faulthandler.enable(file=stream, all_threads=True)
    if _log_handler is not None:  # started again in the same process (tests)
        logging.getLogger().removeHandler(_log_handler)
        _log_stream.close()
    _log_stream = stream
    _log_handler = logging.StreamHandler(stream)
    _log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(_log_handler)  # warnings from everything (the root's default level)
    for name in ("app", "engine"):  # and what MoE Chat itself says
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("app").info("MoE Chat started (process %d)", os.getpid())
    return path


def crash_stacks_to_stderr() -> None:
    """faulthandler on stderr, where there is one (None in a windowed bundle on Windows)."""
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, OSError, RuntimeError, ValueError):
        pass  # no stderr, or one without a file descriptor


def check_platform_libraries() -> str:
    """'' when Qt can open its window; else what to install, instead of Qt's SIGABRT at QApplication()."""
    from app import pyside_guard

    if not pyside_guard.uses_xcb(dict(os.environ)):
        return ""
    missing = pyside_guard.missing_xcb_libraries()
    return pyside_guard.xcb_help(missing) if missing else ""


def show_store_notice(window, store) -> None:
    """Tell the user what happened to the history (recovered, or in memory only): a dialog and a status bar note."""
    if not store.notice:
        return
    from PySide6.QtWidgets import QLabel, QMessageBox

    short = "History in memory: nothing will be saved" if store.in_memory else "Chat history was recovered"
    note = QLabel(f"⚠ {short}")
    note.setObjectName("storeNotice")
    note.setToolTip(store.notice)
    window.statusBar().addPermanentWidget(note)
    box = QMessageBox(QMessageBox.Icon.Warning, "Chat history", store.notice, QMessageBox.StandardButton.Ok, window)
    box.setObjectName("storeNoticeBox")
    box.open()  # window-modal, does not block start-up


def bring_to_front(window) -> None:
    """What a second launch asks for: the running window, shown and on top."""
    if window.isMinimized():
        window.showNormal()
    window.show()
    window.raise_()
    window.activateWindow()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    temp = None
    if args.data_dir:
        os.environ["MOE_CHAT_DATA"] = args.data_dir
    elif args.self_test:  # never touch the user's chats or settings
        temp = tempfile.TemporaryDirectory(prefix="moe-chat-self-test-")
        os.environ["MOE_CHAT_DATA"] = temp.name

    if args.self_test and sys.platform.startswith("linux") and not (
        os.environ.get("QT_QPA_PLATFORM") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"  # CI and bundle checks run without a display

    problem = check_platform_libraries()
    if problem:
        print(problem, file=sys.stderr)
        return 1

    from app.paths import data_dir, database_path, log_file

    if temp is not None:  # a self-test's data folder is deleted at exit: its crash stack goes to stderr
        crash_stacks_to_stderr()
    else:
        start_log(log_file())

    from PySide6.QtWidgets import QApplication

    from app import APP_ID, APP_NAME, theme
    from app.settings import Key, Settings

    QApplication.setApplicationName(APP_ID)
    QApplication.setApplicationDisplayName(APP_NAME)
    QApplication.setDesktopFileName("moe-chat")  # Wayland matches the window to packaging/linux/moe-chat.desktop
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setWindowIcon(theme.app_icon())
    settings = Settings()
    theme.apply(app, args.theme or settings.value(Key.THEME))

    guard = store = None
    try:
        if args.self_test:
            from app.self_test import run_self_test

            return run_self_test(settings, model=args.model, screenshot=args.screenshot, timeout_s=args.timeout)
        from app.conversation_store import ConversationStore
        from app.main_window import MainWindow
        from app.single_instance import SingleInstance

        guard = SingleInstance(data_dir())
        if not guard.acquire():
            print(guard.message)
            return 0
        store = ConversationStore(database_path())
        window = MainWindow(settings, store=store, model=args.model)
        app.aboutToQuit.connect(window.close)  # however the app ends, the engine thread is joined
        guard.raise_requested.connect(lambda: bring_to_front(window))
        window.show()
        show_store_notice(window, store)
        return app.exec()
    finally:
        if store is not None:
            store.close()
        if guard is not None:
            guard.release()
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
