"""The bundle's entry point: `moe-chat`'s own `main()`, plus what a frozen process needs first.

With `MOE_CHAT_BUNDLE_REPORT=FILE` set (packaging/smoke_test.py sets it) the process also writes a JSON
report there when it exits: where Python found its modules (they must all lie inside the bundle) and how
many seconds after the process started its first window was painted.
"""

import multiprocessing
import os
import sys
import time

REPORT_ENV = "MOE_CHAT_BUNDLE_REPORT"


def _process_age_s() -> float:
    """Seconds since this process was created (bootloader included), from the OS's own clock."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _install_report(path: str) -> None:
    """Record the first paint of a top-level window, and write the report at exit."""
    report: dict = {"python_started_s": round(_process_age_s(), 3)}  # bootloader and Python's own start-up

    import atexit
    import json

    from PySide6.QtCore import QEvent, QObject
    from PySide6.QtWidgets import QApplication

    class FirstPaint(QObject):
        def eventFilter(self, obj, event):
            if event.type() == QEvent.Type.Paint and "window_shown_s" not in report and obj.isWidgetType() \
                    and obj.isWindow() and obj.isVisible():
                report["window_shown_s"] = round(_process_age_s(), 3)
                report["window"] = type(obj).__name__
            return False

    spy = FirstPaint()
    original_init = QApplication.__init__

    def init_and_spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.installEventFilter(spy)

    QApplication.__init__ = init_and_spy

    def write() -> None:
        bundle = os.path.realpath(getattr(sys, "_MEIPASS", os.path.dirname(sys.executable)))
        files = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
        outside = sorted(f"{n}: {f}" for n, f in files.items()  # (a relative name: embedded in a binary)
                         if f and os.path.isabs(f) and not os.path.realpath(f).startswith(bundle + os.sep))
        report.update(frozen=bool(getattr(sys, "frozen", False)), executable=sys.executable, bundle=bundle,
                      sys_path=sys.path, modules=len(files), modules_outside_bundle=outside,
                      exited_s=round(_process_age_s(), 3))
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)

    atexit.register(write)


def run() -> int:
    multiprocessing.freeze_support()  # a child started by multiprocessing runs its task here, not the app
    for name in ("stdout", "stderr"):  # a Windows GUI process has no console streams; libraries still write
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 (open for the life of the process)
    if os.environ.get(REPORT_ENV):
        _install_report(os.environ[REPORT_ENV])
    from app.__main__ import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
