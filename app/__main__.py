"""`python -m app` / `moe-chat`: start the window (on the embedded demo model when none was chosen)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

# before numpy loads (torch, pyqtgraph), as engine/__init__.py explains
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


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

    try:
        if args.self_test:
            from app.self_test import run_self_test

            return run_self_test(settings, model=args.model, screenshot=args.screenshot, timeout_s=args.timeout)
        from app.main_window import MainWindow

        window = MainWindow(settings, model=args.model)
        app.aboutToQuit.connect(window.close)  # however the app ends, the engine thread is joined
        window.show()
        return app.exec()
    finally:
        if temp is not None:
            temp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
