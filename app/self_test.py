"""`python -m app --self-test`: drive the real window once, end to end, and print a JSON report.

Loads the model, sends one prompt and waits for the reply, moves the budget slider twice (and checks
that an impossible value is refused), checks that every panel received data, asks the local
OpenAI-compatible server for a short reply (so a bundle is proven to carry it), saves a screenshot of
the whole window, then prints `{"ok": true, ...}` and exits 0, or `{"ok": false, "reason": ...}`
and exits 1. The packaging checks reuse it on built bundles.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

import numpy as np
from PySide6.QtCore import QObject, QTimer
from PySide6.QtWidgets import QApplication

from app.main_window import MainWindow
from app.settings import Key, Settings

PROMPT = "Hello! How are you today?"
SELF_TEST_MAX_TOKENS = 48
PANEL_SETTLE_UPDATES = 3


class SelfTest(QObject):
    def __init__(self, window: MainWindow, screenshot: str | None, timeout_s: float) -> None:
        super().__init__(window)
        self.window = window
        self.screenshot = screenshot
        self.timeout_s = timeout_s
        self.report: dict = {}
        self.exit_code = 1
        self.stage = "loading the model"
        self.reply_chars = 0
        self.tokens = 0
        self.budget_changes = 0
        self.server_tokens = 0
        self._targets: list[int] = []
        self._panel_mark = 0
        self._t0 = time.monotonic()
        c = window.client
        c.model_loaded.connect(self._on_loaded)
        c.load_failed.connect(self._on_load_failed)
        c.reply_finished.connect(self._on_reply)
        c.budget_applied.connect(self._on_budget)
        c.budget_refused.connect(lambda msg: self.fail(f"a budget inside the device's limit was refused: {msg}"))
        c.error.connect(lambda msg: self.fail(f"engine error: {msg}") if self.stage.startswith("waiting") else None)
        self._timeout = QTimer(self, singleShot=True, interval=int(timeout_s * 1000))
        self._timeout.timeout.connect(lambda: self.fail(f"timed out after {timeout_s:.0f} s while {self.stage}"))
        self._timeout.start()
        self._poll = QTimer(self, interval=100)

    # stages ----------------------------------------------------------------------------------
    def _on_loaded(self, _load_id: int, info: dict) -> None:
        if self.stage != "loading the model":
            return
        if not info.get("has_runtime"):
            self.fail(f"{info.get('name')} has no MoE layers, so there is no expert cache to test")
            return
        if not info.get("has_tokenizer", True):
            self.fail(f"{info.get('name')} has no tokenizer, so it cannot chat")
            return
        self.stage = "waiting for the reply"
        if not self.window.send_message(PROMPT):
            self.fail("the window refused to send the prompt")

    def _on_load_failed(self, _load_id: int, message: str, _cancelled: bool) -> None:
        if self.stage == "loading the model":
            self.fail(f"the model did not load: {message}")

    def _on_reply(self, _request_id: int, stats: dict) -> None:
        if self.stage != "waiting for the reply":
            return
        if stats.get("finish_reason") == "error":
            self.fail(f"the reply failed: {stats.get('error')}")
            return
        messages = self.window.store.messages(self.window.conversation_id)
        reply = messages[-1] if messages and messages[-1].role == "assistant" else None
        self.reply_chars = len(reply.content) if reply else 0
        self.tokens = int(stats.get("new_tokens") or 0)
        if self.tokens < 1:
            self.fail("the model produced no tokens")
            return
        bar = self.window.budget_bar
        if bar.request_bytes(bar.max_bytes + max(1, bar.expert_bytes)):
            self.fail("a budget above what the device can hold was not refused")
            return
        top = bar.slider.maximum()
        now = bar.slider.value()
        first = top // 2 if top // 2 != now else max(1, top // 4)
        second = top if top != first else max(0, top - 1)
        self._targets = [first, second]
        self.stage = "moving the budget slider"
        self._move_next()

    def _move_next(self) -> None:
        target = self._targets.pop(0)
        self.window.budget_bar.slider.setValue(target)  # the real slider path: debounce, then the worker

    def _on_budget(self, nbytes: int) -> None:
        if self.stage != "moving the budget slider":
            return
        self.budget_changes += 1
        if self._targets:
            self._move_next()
            return
        if self.window.client.model_info.get("budget_bytes") != nbytes:
            self.fail("the engine's budget does not match the slider")
            return
        self.stage = "waiting for the panels"
        self._panel_mark = self.window.panels.updates
        self._poll.timeout.connect(self._check_panels)
        self._poll.start()

    def _check_panels(self) -> None:
        panels = self.window.panels
        if panels.updates < self._panel_mark + PANEL_SETTLE_UPDATES:
            return
        self._poll.stop()
        if not np.isfinite(panels.hit_rate._grid).any():
            self.fail("the hit-rate panel received no per-layer data")
            return
        if not panels.memory.history.t or not panels.throughput.history.t:
            self.fail("the memory or throughput panel received no data")
            return
        self.stage = "starting the local server"
        self.window.client.server_changed.connect(self._on_server)
        self.window.client.start_server(0)  # any free loopback port

    def _on_server(self, state: dict) -> None:
        if self.stage != "starting the local server":
            return
        if not state.get("url"):
            self.fail(f"the local server did not start: {state.get('error')}")
            return
        body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0})
        request = urllib.request.Request(state["url"] + "/chat/completions", body.encode(),
                                         {"Content-Type": "application/json"})
        try:  # the worker thread answers; this thread only waits (a few tokens)
            with urllib.request.urlopen(request, timeout=60) as response:
                self.server_tokens = json.loads(response.read())["usage"]["completion_tokens"]
        except (OSError, ValueError, KeyError) as e:
            self.fail(f"the local server did not answer: {e}")
            return
        self.window.client.stop_server()
        self._finish()

    def _finish(self) -> None:
        panels = self.window.panels
        self.stage = "saving the screenshot"
        QApplication.processEvents()
        if self.screenshot and not self.window.grab().save(self.screenshot):
            self.fail(f"could not save the screenshot to {self.screenshot}")
            return
        self.report = {
            "ok": True,
            "reply_chars": self.reply_chars,
            "tokens": self.tokens,
            "budget_changes": self.budget_changes,
            "panel_updates": panels.updates,
            "server_tokens": self.server_tokens,
            "model": self.window.client.model_info.get("name"),
            "device": self.window.client.model_info.get("device"),
            "seconds": round(time.monotonic() - self._t0, 2),
        }
        if self.screenshot:
            self.report["screenshot"] = self.screenshot
        self.exit_code = 0
        self._end()

    # end ---------------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        if self.report:
            return
        self.report = {"ok": False, "reason": reason}
        self.exit_code = 1
        self._end()

    def _end(self) -> None:
        self._timeout.stop()
        self._poll.stop()
        # Leave the event loop first; the window is closed after exec() returns. (Closing it inside
        # the loop would also post a last-window-closed quit that could stop later event loops.)
        QTimer.singleShot(0, lambda: QApplication.instance().exit(self.exit_code))


def run_self_test(settings: Settings, model: str | None = None, screenshot: str | None = None,
                  timeout_s: float = 300.0) -> int:
    """Run the self-test in the current QApplication; prints one JSON object, returns the exit code."""
    settings.set_value(Key.MAX_TOKENS, SELF_TEST_MAX_TOKENS)
    app = QApplication.instance()
    quit_on_close = app.quitOnLastWindowClosed()
    app.setQuitOnLastWindowClosed(False)
    try:
        window = MainWindow(settings, model=model if model is not None else "")
        window.show()
        test = SelfTest(window, screenshot, timeout_s)
        code = app.exec()
        window.close()  # stops the engine and joins its thread
    finally:
        app.setQuitOnLastWindowClosed(quit_on_close)
    report = test.report or {"ok": False, "reason": "the event loop ended before the test finished"}
    if window.store.notice:  # a damaged or unwritable history: the window ran on, the report says so
        report["history_notice"] = window.store.notice
    print(json.dumps(report), flush=True)
    if not report.get("ok"):
        print(f"self-test failed: {report.get('reason')}", file=sys.stderr)
    return 0 if report.get("ok") and code == 0 else 1
