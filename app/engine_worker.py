"""The only door between the window and the engine: one worker object on its own QThread.

`EngineWorker` owns the loaded model and lives on a QThread. The window talks to it through
`EngineClient`, whose request signals reach the worker and whose result signals come back through
queued connections only, so no engine call ever runs on the GUI thread.

Generation is stepped one token per event-loop turn (a zero-interval timer), so budget and policy
changes, model listings and the stats timer are all served *between two steps* without reloading.
Stop is an atomic flag (`threading.Event`, as in gpt4all-chat) that any thread may set; the engine
checks it every step and the worker never emits a token after it has seen it.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from typing import Any

import psutil
from PySide6.QtCore import QObject, Qt, QThread, QTimer, Signal, Slot

# Pure-Python parts of the engine the GUI thread may use at once (no torch behind them): one data
# folder and one way to write sizes for the app and the engine alike.
from engine.paths import DATA_DIR_ENV, user_data_dir  # noqa: F401 - re-exported for app.paths
from engine.units import format_bytes  # noqa: F401 - re-exported for the panels
from engine.model.remote_session import parse_remote_source, remote_source  # noqa: F401 - for the window

# The engine (torch, transformers) is imported on the worker thread when it starts, so the window
# appears at once and the GUI thread never pays for, or blocks on, that import.
_engine: dict = {}


def _import_engine() -> dict:
    if not _engine:
        from engine import errors
        from engine.cache.policies import POLICIES
        from engine.model import loader, session
        from engine.paths import DEMO_MODEL_DIR

        _engine.update(loader=loader, session=session, errors=errors, policies=dict(POLICIES),
                       demo_dir=DEMO_MODEL_DIR)
    return _engine


STATS_INTERVAL_MS = 200          # 5 updates a second, also while idle (memory)
MIN_STATS_GAP_S = 0.1            # never more than 10 a second, whatever triggers them
PROGRESS_GAP_S = 0.05
Q = Qt.ConnectionType.QueuedConnection
SUMMARY_MAX_TOKENS = 512         # a summary's budget; never more than a quarter of the context, so it fits a new chat
SUMMARY_REQUEST = (
    "Summarize our conversation so far for a new chat that will continue it: the topics, the facts and "
    "decisions, and the open questions, in a few short paragraphs. Write only the summary."
)


def summary_messages(messages: list[dict]) -> list[dict]:
    """The conversation with the request to summarize it as the last user turn. The session leaves out
    the oldest turns that do not fit the context, never the system prompt or this request."""
    out = [dict(m) for m in messages if m.get("content")]
    if out and out[-1]["role"] == "user":  # two user turns in a row break some chat templates
        out[-1]["content"] += "\n\n" + SUMMARY_REQUEST
        return out
    return out + [{"role": "user", "content": SUMMARY_REQUEST}]


def demo_model_source() -> str | None:
    """The embedded demo model's folder, or None when this build has none on disk (worker thread)."""
    path = _import_engine()["demo_dir"]
    return str(path) if path is not None and (path / "config.json").is_file() else None


def _is_engine_error(exc: BaseException) -> bool:
    return bool(_engine) and isinstance(exc, _engine["errors"].EngineError)


def _user_message(exc: BaseException, what: str) -> str:
    """EngineError messages are written for people; anything else gets context around it."""
    if _is_engine_error(exc):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"{what} ran out of memory. Close other programs or choose a smaller model."
    return f"{what} failed: {type(exc).__name__}: {exc}"


class EngineWorker(QObject):
    """Owns the engine; every slot runs on the worker thread."""

    state_changed = Signal(str)                # "idle" | "loading" | "generating"
    load_progress = Signal(int, float, str)    # load id, fraction 0..1, what is happening
    model_loaded = Signal(int, object)         # load id, model description dict (see _describe)
    load_failed = Signal(int, str, bool)       # load id, message, cancelled
    model_unloaded = Signal()
    token = Signal(int, str)                   # request id, text
    reply_finished = Signal(int, object)       # request id, stats dict (finish_reason, tokens/s, ...)
    summary_finished = Signal(int, str, object)  # request id, the summary's text, stats (as reply_finished)
    stats = Signal(object)                     # dict: runtime snapshot + rss + state, <= 10 a second
    budget_applied = Signal(object)            # bytes (an int; may pass 2**31)
    budget_refused = Signal(str)
    policy_applied = Signal(str)
    models_listed = Signal(object)             # list of dicts
    error = Signal(str)
    server_changed = Signal(object)            # {"url": str | None, "error": str | None}
    remote_models_listed = Signal(str, object, str)  # base URL, model ids, error ("" when none)
    _job_arrived = Signal(object)              # a request of the local server, from its HTTP thread

    def __init__(self) -> None:
        super().__init__()
        self._loaded = None
        self._session = None
        self._state = "idle"
        self._gen: Iterator | None = None
        self._request = 0
        self._kind = "reply"  # or "summary": what the tokens in progress are for
        self._text = ""
        self._tokens = 0
        self._stepped = False
        self._cancel = threading.Event()
        self._load_event: threading.Event | None = None
        # Written by the GUI thread (int assignment is atomic), read here: stops requests that
        # are still queued when the user presses Stop.
        self.issued_request = 0
        self.stopped_through = 0
        self.issued_load = 0
        self.cancelled_load_through = 0
        self._last_stats_t = 0.0
        self._last_progress_t = 0.0
        self._process = psutil.Process()
        self._step_timer = QTimer(self)
        self._step_timer.setInterval(0)
        self._step_timer.timeout.connect(self._step)
        self._stats_timer = QTimer(self)
        self._stats_timer.setInterval(STATS_INTERVAL_MS)
        self._stats_timer.timeout.connect(self._emit_stats)
        # The local server: its HTTP thread posts jobs here; they run between chat replies, one token
        # per event-loop turn like a reply, so this thread stays the model's only user.
        self._server = None
        self._board = None
        self._jobs: deque = deque()
        self._job: Any = None
        self._job_steps: Iterator | None = None
        self._waiting_chat: tuple | None = None
        self._job_arrived.connect(self._take_job, Q)
        self._load_options: dict = {}

    # -- called from any thread ----------------------------------------------------------------
    def stop(self) -> None:
        """Stop whatever runs: the reply in progress (and queued ones), and a model load."""
        self.stopped_through = self.issued_request
        self._cancel.set()
        self.cancel_load()

    def cancel_load(self) -> None:
        self.cancelled_load_through = self.issued_load
        event = self._load_event
        if event is not None:
            event.set()

    # -- slots (worker thread) -----------------------------------------------------------------
    @Slot()
    def start(self) -> None:
        try:
            _import_engine()
        except BaseException as exc:  # noqa: BLE001 - a broken install must be reported, not crash
            traceback.print_exc()
            self.error.emit(f"The engine could not start: {type(exc).__name__}: {exc}. Reinstall MoE Chat.")
        self._stats_timer.start()
        self._emit_stats()

    @Slot()
    def teardown(self) -> None:
        """Last call before the thread ends: stop timers, drop the model, quit the event loop."""
        self._stats_timer.stop()
        self.stop_server()
        self._finish_generation(cancelled=True)
        self._release()
        QThread.currentThread().quit()

    def _release(self) -> None:
        """Drop the current model and give its cache memory back."""
        self._end_job()
        loaded, self._loaded, self._session = self._loaded, None, None
        self._update_board()
        runtime = getattr(loaded, "runtime", None)
        if runtime is not None and hasattr(runtime, "close"):
            try:
                runtime.close()
            except Exception:  # noqa: BLE001 - releasing must not fail a shutdown
                traceback.print_exc()
        del loaded
        gc.collect()

    @Slot(object)
    def set_load_options(self, options: dict) -> None:
        """Device, CPU threads and a context cap for the loads that follow (Settings ▸ Engine)."""
        self._load_options = dict(options)

    @Slot(int, str, object, str)
    def load(self, load_id: int, source: str, budget: object, policy: str) -> None:
        """Inspect, then load; the current model keeps running unless the new one loads.

        An empty `source` means the embedded demo model.
        """
        self._finish_generation(cancelled=True)
        event = threading.Event()
        self._load_event = event
        if load_id <= self.cancelled_load_through:
            event.set()
        self._set_state("loading")
        try:
            eng = _import_engine()
            if event.is_set():
                raise eng["errors"].Cancelled("Loading was cancelled.")
            if not source:
                source = demo_model_source() or ""
                if not source:
                    raise eng["errors"].ModelError(
                        "No model is chosen and this build has no demo model. Choose one with Model ▸ Browse…")
            info = eng["loader"].inspect_model(source).to_dict()
            needed = int(info.get("ram_needed_bytes") or 0)
            if self._loaded is not None and needed > psutil.virtual_memory().available:
                # Both would not fit: free the current model first rather than fail for want of RAM.
                self._release()
                self.model_unloaded.emit()
            loaded = self._load_with_budget(load_id, source, budget, policy or "auto", event)
            if event.is_set():
                raise eng["errors"].Cancelled("Loading was cancelled.")
            self._release()
            self._loaded = loaded
            self._session = eng["session"].Session(loaded)
            cap = int(self._load_options.get("context_length") or 0)
            if cap:  # a smaller context than the model's bounds the KV cache's memory
                self._session.context_length = min(self._session.context_length, cap)
            self._update_board()
            self.model_loaded.emit(load_id, self._describe(source))
        except BaseException as exc:  # noqa: BLE001 - report every failure, keep the current model
            if _engine and isinstance(exc, _engine["errors"].Cancelled):
                self.load_failed.emit(load_id, "Loading was cancelled; the current model keeps running.", True)
                return
            if not _is_engine_error(exc):
                traceback.print_exc()
            self.load_failed.emit(load_id, _user_message(exc, f"Loading {source}"), False)
        finally:
            self._load_event = None
            self._set_state("idle")
            self._emit_stats()
            self._schedule_job()

    @Slot(int, str, str, str)
    def load_remote(self, load_id: int, base_url: str, model: str, api_key: str) -> None:
        """Chat with a model on an OpenAI-compatible server instead of a local one."""
        self._finish_generation(cancelled=True)
        self._set_state("loading")
        try:
            from engine.model.remote_session import RemoteSession, connect_remote

            self.load_progress.emit(load_id, 0.5, f"connecting to {base_url}")
            remote = connect_remote(base_url, model, api_key or None)
            self._release()
            self._loaded = remote
            self._session = RemoteSession(remote)
            self.model_loaded.emit(load_id, self._describe(remote_source(remote.info.base_url, model)))
        except BaseException as exc:  # noqa: BLE001 - the current model keeps running
            if not _is_engine_error(exc):
                traceback.print_exc()
            self.load_failed.emit(load_id, _user_message(exc, f"Connecting to {base_url}"), False)
        finally:
            self._set_state("idle")
            self._emit_stats()
            self._schedule_job()

    @Slot(str, str)
    def list_remote_models(self, base_url: str, api_key: str) -> None:
        try:
            from engine.model.remote_session import list_remote_models

            self.remote_models_listed.emit(base_url, list_remote_models(base_url, api_key or None), "")
        except BaseException as exc:  # noqa: BLE001
            self.remote_models_listed.emit(base_url, [], _user_message(exc, f"Asking {base_url} for its models"))

    def _load_with_budget(self, load_id: int, source: str, budget: object, policy: str, event) -> Any:
        def progress(fraction: float, message: str) -> None:
            now = time.monotonic()
            if fraction >= 1.0 or now - self._last_progress_t >= PROGRESS_GAP_S:
                self._last_progress_t = now
                self.load_progress.emit(load_id, float(fraction), str(message))

        load_model = _engine["loader"].load_model
        kwargs = dict(policy=policy, progress=progress, cancel=event)
        options = self._load_options
        kwargs.update({k: options[k] for k in ("device", "threads") if options.get(k)})
        if not budget:
            return load_model(source, **kwargs)
        try:
            return load_model(source, budget=budget, **kwargs)
        except ValueError as exc:  # the remembered budget does not suit this model
            self.error.emit(f"The saved cache budget does not suit this model ({exc}); using the default.")
            return load_model(source, **kwargs)

    def _describe(self, source: str) -> dict:
        info = self._loaded.info.to_dict()
        info["source"] = source
        info["policies"] = dict(_engine["policies"])
        if getattr(self._loaded.runtime, "profile", None) is None:
            info["policies"].pop("static", None)  # it caches a profile's set: without one, nothing
        remote = getattr(self._loaded, "remote", False)
        info["has_tokenizer"] = remote or (self._loaded.tokenizer is not None and info.get("has_tokenizer", True))
        info["experts"], info["dense"] = self._loaded.experts, self._loaded.dense
        info["context_length"] = int(self._session.context_length)
        rt = self._loaded.runtime
        info["has_runtime"] = rt is not None
        if rt is not None:
            snap = rt.snapshot()
            info.update(
                device=str(rt.device),
                simulated_cache=rt.simulated_cache,
                budget_bytes=int(rt.budget_bytes),
                max_budget_bytes=int(rt.max_budget_bytes),
                runtime_expert_bytes=int(rt.expert_bytes),
                runtime_expert_bytes_total=int(rt.expert_bytes_total),
                policy=snap.get("policy", "auto"),
                device_total_bytes=int(snap.get("device_total_bytes") or 0),
            )
        return info

    @Slot(int, object, object)
    def generate(self, request_id: int, messages: list, params: dict) -> None:
        """Start a reply; tokens follow one per event-loop turn until the end or Stop. A reply asked for
        while a server request runs starts right after it."""
        self._begin(request_id, messages, params, "reply")

    @Slot(int, object, object)
    def summarize(self, request_id: int, messages: list, params: dict) -> None:
        """Summarize a conversation as a reply is written (tokens, Stop within one token), from as many
        recent turns as fit the context; the whole text comes back in `summary_finished`."""
        self._begin(request_id, summary_messages(messages), params, "summary")

    def _begin(self, request_id: int, messages: list, params: dict, kind: str) -> None:
        if self._job_steps is not None:
            self._waiting_chat = (request_id, messages, params, kind)
            return
        self._finish_generation(cancelled=True)
        self._request, self._kind, self._text = request_id, kind, ""
        self._tokens = 0
        self._stepped = False
        if self._session is None:
            self._emit_done({"finish_reason": "error", "error": "No model is loaded."})
            return
        if self._loaded.tokenizer is None and not getattr(self._loaded, "remote", False):
            self._emit_done({
                "finish_reason": "error",
                "error": "This model folder has no tokenizer, so it cannot chat. Add tokenizer files or pick another model.",
            })
            return
        if kind == "summary":
            context = int(getattr(self._session, "context_length", 0) or 0)
            budget = int(params.get("max_new_tokens") or SUMMARY_MAX_TOKENS)
            params = {**params, "max_new_tokens": max(1, min(budget, context // 4)) if context else budget}
        self._cancel = threading.Event()
        if request_id <= self.stopped_through:
            self._cancel.set()
        try:
            self._gen = iter(self._session.chat(messages, self._params(params), cancel=self._cancel))
        except BaseException as exc:  # noqa: BLE001
            self._fail_generation(exc)
            return
        self._set_state("summarizing" if kind == "summary" else "generating")
        self._step_timer.start()

    def _emit_done(self, stats: dict) -> None:
        """The end of a reply or of a summary, each on its own signal."""
        if self._kind == "summary":
            self.summary_finished.emit(self._request, self._text, stats)
        else:
            self.reply_finished.emit(self._request, stats)

    @staticmethod
    def _params(params: dict):
        cls = _engine["session"].GenerationParams
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @Slot()
    def _step(self) -> None:
        if self._gen is None:
            if self._job_steps is not None:
                self._step_job()
            else:
                self._step_timer.stop()
            return
        self._stepped = True
        try:
            event = next(self._gen)  # the first call prefills; the engine checks `cancel` every step
        except StopIteration:
            self._finish_generation(cancelled=False)
            return
        except BaseException as exc:  # noqa: BLE001
            self._fail_generation(exc)
            return
        if self._cancel.is_set():  # the token was computed after Stop: drop it
            self._finish_generation(cancelled=True)
            return
        self._tokens += 1
        self._text += event.text
        self.token.emit(self._request, event.text)
        self._emit_stats()

    def _finish_generation(self, cancelled: bool) -> None:
        gen, self._gen = self._gen, None
        self._step_timer.stop()
        if gen is None:
            return
        if cancelled:
            self._cancel.set()
            try:
                gen.close()
            except Exception:  # noqa: BLE001 - closing must never fail a stop
                pass
        # The session's last_stats describe this reply once its first step ran; before that, the last one.
        stats = dict(getattr(self._session, "last_stats", None) or {}) if self._stepped else {}
        if cancelled:
            stats["finish_reason"] = "cancelled"
        stats.setdefault("finish_reason", "cancelled")
        stats["new_tokens"] = self._tokens
        context = getattr(self._session, "context_length", 0)
        if stats.get("finish_reason") == "length" and context:
            stats["context_full"] = stats.get("prompt_tokens", 0) + self._tokens >= context
        self._set_state("idle")
        self._emit_done(stats)
        self._emit_stats()
        self._schedule_job()

    def _fail_generation(self, exc: BaseException) -> None:
        if not _is_engine_error(exc):
            traceback.print_exc()
        self._gen = None
        self._step_timer.stop()
        message = _user_message(exc, "Writing the summary" if self._kind == "summary" else "Generating a reply")
        self._set_state("idle")
        if self._kind == "reply":  # a failed summary is reported by the window, with what it kept
            self.error.emit(message)
        self._emit_done({"finish_reason": "error", "error": message, "new_tokens": self._tokens})
        self._schedule_job()

    # -- the local server ------------------------------------------------------------------------
    @Slot(str, int, str)
    def start_server(self, host: str, port: int, api_key: str) -> None:
        self.stop_server()
        try:
            from engine.server.generation_queue import JobBoard
            from engine.server.serve import ServerThread

            self._board = JobBoard(self._job_arrived.emit)
            self._update_board()
            self._server = ServerThread(self._board, host, port, api_key or None)
        except BaseException as exc:  # noqa: BLE001 - a port in use must not take the app down
            self._board = None
            self.server_changed.emit({"url": None, "error": _user_message(exc, "Starting the local server")})
            return
        self.server_changed.emit({"url": self._server.url, "error": None})

    @Slot()
    def stop_server(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stop()
        self._end_job()
        while self._jobs:
            self._refuse(self._jobs.popleft(), "the local server was stopped")
        self._board = None
        self.server_changed.emit({"url": None, "error": None})

    def _update_board(self) -> None:
        """What the server offers follows the loaded model (none, or one that cannot chat)."""
        if self._board is None:
            return
        usable = self._session is not None and self._loaded.tokenizer is not None
        self._board.model_id = self._loaded.info.name if usable else None
        self._board.context_length = self._session.context_length if usable else 0

    @Slot(object)
    def _take_job(self, job: Any) -> None:
        if self._board is None:  # arrived as the server stopped
            self._refuse(job, "the local server was stopped")
            return
        self._jobs.append(job)
        self._schedule_job()

    def _schedule_job(self) -> None:
        """After the current slot: the slot may be about to start a reply of its own."""
        QTimer.singleShot(0, self._next_job)

    @Slot()
    def _next_job(self) -> None:
        if self._gen is not None or self._job_steps is not None:
            return
        if self._waiting_chat is not None:
            waiting, self._waiting_chat = self._waiting_chat, None
            self._begin(*waiting)
            return
        if not self._jobs or self._board is None:
            return
        self._job = self._jobs.popleft()
        self._board.taken()
        if self._session is None:
            self._refuse(self._job, "no model is loaded in MoE Chat", taken=True)
            self._job = None
            return
        self._job_steps = self._board.run(self._session, self._job)
        self._set_state("serving")
        self._step_timer.start()

    def _step_job(self) -> None:
        try:
            next(self._job_steps)  # the board reports its own errors to the client
        except StopIteration:
            self._job_steps = self._job = None
            self._step_timer.stop()
            self._set_state("idle")
            self._schedule_job()
        self._emit_stats()

    def _end_job(self) -> None:
        """Cancel the server request in progress (the model is going away); it ends within a token."""
        if self._job_steps is None:
            return
        self._job.cancel.set()
        for _ in self._job_steps:
            pass
        self._job_steps = self._job = None
        self._step_timer.stop()

    def _refuse(self, job: Any, message: str, taken: bool = False) -> None:
        from engine.server.generation_queue import PromptError

        if not taken and self._board is not None:
            self._board.taken()
        job.emit("error", PromptError(message, "model_not_loaded"))

    @Slot(object)
    def set_budget(self, budget: object) -> None:
        """Resize the expert cache between two steps; a value that does not fit is refused."""
        rt = self._loaded.runtime if self._loaded is not None else None
        if rt is None:
            self.budget_refused.emit("This model has no expert cache to size (no model, or no MoE layers).")
            return
        try:
            applied = rt.set_budget(budget)
        except ValueError as exc:
            self.budget_refused.emit(str(exc))
            return
        self.budget_applied.emit(int(applied if applied is not None else rt.budget_bytes))
        self._emit_stats()

    @Slot(str)
    def set_policy(self, name: str) -> None:
        rt = self._loaded.runtime if self._loaded is not None else None
        if rt is None:
            self.error.emit("This model has no expert cache, so it has no cache policy.")
            return
        try:
            rt.set_policy(name)
        except (ValueError, KeyError) as exc:
            self.error.emit(str(exc))
            return
        self.policy_applied.emit(name)
        self._emit_stats()

    @Slot(object)
    def list_models(self, extra_dirs: list) -> None:
        try:
            from engine.model import catalog

            models = catalog.list_models(extra_dirs)
        except BaseException as exc:  # noqa: BLE001
            traceback.print_exc()
            self.error.emit(_user_message(exc, "Listing models"))
            models = []
        self.models_listed.emit([dict(m) for m in models])

    # -- helpers -------------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self.state_changed.emit(state)

    @Slot()
    def _emit_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats_t < MIN_STATS_GAP_S:
            return
        self._last_stats_t = now
        rt = self._loaded.runtime if self._loaded is not None else None
        snap: dict = {}
        if rt is not None:
            try:
                snap = dict(rt.snapshot())
            except Exception as exc:  # noqa: BLE001 - stats must never break the worker
                snap = {"snapshot_error": str(exc)}
        rss = self._process.memory_info().rss
        snap.setdefault("rss_bytes", rss)
        snap.setdefault("peak_rss_bytes", rss)
        snap["has_runtime"] = rt is not None
        snap["model_loaded"] = self._loaded is not None
        if getattr(self._loaded, "remote", False):  # the server's numbers are not ours to see, but its speed is
            snap["remote"] = self._loaded.info.base_url
            if self._gen is not None:
                snap["decode_tokens_per_s"] = self._session.last_stats.get("decode_tokens_per_s", 0.0)
        snap["state"] = self._state
        snap["reply_tokens"] = self._tokens
        snap["time"] = now
        self.stats.emit(snap)


class EngineClient(QObject):
    """GUI-thread handle on the worker: starts its thread, forwards requests, re-emits results.

    Every connection between the two threads is queued. `stop()` and `cancel_load()` only set
    atomic flags, so they are safe to call at any moment.
    """

    state_changed = Signal(str)
    load_progress = Signal(int, float, str)
    model_loaded = Signal(int, object)
    load_failed = Signal(int, str, bool)
    model_unloaded = Signal()
    token = Signal(int, str)
    reply_finished = Signal(int, object)
    summary_finished = Signal(int, str, object)
    stats = Signal(object)
    budget_applied = Signal(object)
    budget_refused = Signal(str)
    policy_applied = Signal(str)
    models_listed = Signal(object)
    error = Signal(str)
    server_changed = Signal(object)
    remote_models_listed = Signal(str, object, str)

    _req_start = Signal()
    _req_teardown = Signal()
    _req_load = Signal(int, str, object, str)
    _req_generate = Signal(int, object, object)
    _req_summarize = Signal(int, object, object)
    _req_budget = Signal(object)
    _req_policy = Signal(str)
    _req_list = Signal(object)
    _req_server_start = Signal(str, int, str)
    _req_server_stop = Signal()
    _req_remote = Signal(int, str, str, str)
    _req_options = Signal(object)
    _req_remote_list = Signal(str, str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.model_info: dict | None = None
        self.state = "idle"
        self.last_stats: dict = {}
        self._thread = QThread()
        self._thread.setObjectName("engine-worker")
        self.worker = EngineWorker()
        self.worker.moveToThread(self._thread)
        slots = {
            "start": self.worker.start, "teardown": self.worker.teardown, "load": self.worker.load,
            "generate": self.worker.generate, "summarize": self.worker.summarize, "budget": self.worker.set_budget,
            "policy": self.worker.set_policy, "list": self.worker.list_models,
            "server_start": self.worker.start_server, "server_stop": self.worker.stop_server,
            "remote": self.worker.load_remote, "remote_list": self.worker.list_remote_models,
            "options": self.worker.set_load_options,
        }
        for name, slot in slots.items():
            getattr(self, f"_req_{name}").connect(slot, Q)
        for name in (
            "state_changed", "load_progress", "model_loaded", "load_failed", "model_unloaded", "token",
            "reply_finished", "summary_finished", "stats", "budget_applied", "budget_refused", "policy_applied",
            "models_listed", "error", "server_changed", "remote_models_listed",
        ):
            getattr(self.worker, name).connect(getattr(self, name), Q)
        self.model_loaded.connect(self._remember_model)
        self.model_unloaded.connect(lambda: setattr(self, "model_info", None))
        self.state_changed.connect(lambda s: setattr(self, "state", s))
        self.stats.connect(lambda s: setattr(self, "last_stats", s))
        self.budget_applied.connect(self._remember_budget)
        self.policy_applied.connect(self._remember_policy)
        self.downloads = HubDownloads(self)  # listings and downloads: threads of their own
        self.server_url: str | None = None
        self.server_changed.connect(lambda s: setattr(self, "server_url", s.get("url")))
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True
            self._req_start.emit()

    def is_running(self) -> bool:
        return self._thread.isRunning()

    # requests ------------------------------------------------------------------------------
    def load(self, source: str, budget: int | float = 0, policy: str = "auto") -> int:
        """Load `source` ('' = the demo model) with a cache budget: bytes (an int) or a share of the
        expert bytes (a float); 0 = the engine's default."""
        self.worker.issued_load += 1
        load_id = self.worker.issued_load
        # Never None through a signal: PySide6 6.12 miscounts references to it (see app.pyside_guard).
        self._req_load.emit(load_id, str(source), budget or 0, policy)
        return load_id

    def generate(self, messages: list[dict], params: dict) -> int:
        self.worker.issued_request += 1
        request_id = self.worker.issued_request
        self._req_generate.emit(request_id, list(messages), dict(params))
        return request_id

    def summarize(self, messages: list[dict], params: dict, max_tokens: int = SUMMARY_MAX_TOKENS) -> int:
        """Ask the model to summarize a conversation (at most `max_tokens`, and a quarter of its context);
        answered by `token`s, then `summary_finished`. `stop()` ends it as it ends a reply."""
        self.worker.issued_request += 1
        request_id = self.worker.issued_request
        self._req_summarize.emit(request_id, list(messages), {**params, "max_new_tokens": int(max_tokens)})
        return request_id

    def stop(self) -> None:
        self.worker.stop()

    def cancel_load(self) -> None:
        self.worker.cancel_load()

    def set_budget(self, budget: int | str) -> None:
        """Bytes (or a string such as '512MiB'); applied between two steps, or refused with a message."""
        self._req_budget.emit(budget)

    def set_policy(self, name: str) -> None:
        self._req_policy.emit(name)

    def list_models(self, extra_dirs: list[str]) -> None:
        self._req_list.emit(list(extra_dirs))

    def set_load_options(self, device: str = "auto", threads: int = 0, context_length: int = 0) -> None:
        """For the loads that follow: the fast device, CPU threads (0 = physical cores), a context cap
        (0 = the model's own)."""
        self._req_options.emit({"device": device, "threads": threads, "context_length": context_length})

    def start_server(self, port: int, api_key: str = "", host: str = "127.0.0.1") -> None:
        """The OpenAI-compatible server on the loaded model; `server_changed` says where, or why not."""
        self._req_server_start.emit(host, int(port), api_key)

    def stop_server(self) -> None:
        self._req_server_stop.emit()

    def load_remote(self, base_url: str, model: str, api_key: str = "") -> int:
        """Chat with `model` on an OpenAI-compatible server; answered like `load` (model_loaded/load_failed)."""
        self.worker.issued_load += 1
        self._req_remote.emit(self.worker.issued_load, base_url, model, api_key)
        return self.worker.issued_load

    def list_remote_models(self, base_url: str, api_key: str = "") -> None:
        self._req_remote_list.emit(base_url, api_key)

    def shutdown(self, timeout_ms: int = 2000) -> bool:
        """Stop everything and join the worker thread; True when it ended in time."""
        self.downloads.cancel_all()  # a partial file is kept: the next download continues it
        if not self._started:
            return True
        self.worker.stop()
        self._req_teardown.emit()
        # the engine's import cannot be cancelled: a quit in the first seconds waits for it to end
        ok = self._thread.wait(timeout_ms if _engine else max(timeout_ms, 60_000))
        if not ok:  # pragma: no cover - only when an engine call ignores its cancel flag
            print("moe-chat: the engine thread did not stop within", timeout_ms, "ms")
        self._started = not ok
        return ok

    # bookkeeping ---------------------------------------------------------------------------
    def _remember_model(self, _load_id: int, info: dict) -> None:
        self.model_info = info

    def _remember_budget(self, value: int) -> None:
        if self.model_info is not None:
            self.model_info["budget_bytes"] = value

    def _remember_policy(self, name: str) -> None:
        if self.model_info is not None:
            self.model_info["policy"] = name


# -- downloads from the Hugging Face Hub ---------------------------------------------------------------
# An explicit user action (the model picker's Download… button), and the only code in the app that touches the network.
# Each listing and download runs on a Python thread of its own, not on the model's worker thread, so
# chatting goes on meanwhile. engine.model.download is torch-free, so importing it here costs little.
DOWNLOAD_PROGRESS_GAP_S = 0.1


class HubDownloads(QObject):
    """The window's handle on Hub listings and downloads; its signals arrive on the GUI thread.

    `cancel()` answers at once (`download_failed(..., cancelled=True)`), and the download thread stops at
    its next read; a later download of the same repo waits for it, so two never write the same file.
    """

    listed = Signal(int, object, str)              # job id, RepoListing (or {} on error), error ("" when none)
    download_progress = Signal(int, object)        # job id, engine.model.download.Progress
    download_finished = Signal(int, str, str)      # job id, repo id, snapshot folder
    download_failed = Signal(int, str, bool)       # job id, message, cancelled

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._jobs = 0
        self._threads: dict[int, threading.Thread] = {}
        self._cancels: dict[int, threading.Event] = {}
        self._by_repo: dict[str, threading.Thread] = {}
        self.active: int | None = None  # the download the user can cancel

    def list_repo(self, repo: str) -> int:
        """List a repo's files and variants (network, on a thread); answered by `listed`."""
        from engine.model import download

        job = self._next()

        def run() -> None:
            try:
                self.listed.emit(job, download.list_repo(repo), "")
            except BaseException as exc:  # noqa: BLE001 - every failure is a message
                self.listed.emit(job, {}, _download_message(exc))

        self._start(job, run, f"hub-list-{job}")
        return job

    def download(self, plan: Any) -> int:
        """Download a plan from engine.model.download.plan_download; answered by progress, then finished or failed."""
        from engine.model import download

        job = self._next()
        cancel = self._cancels[job] = threading.Event()
        earlier = self._by_repo.get(plan.repo_id)
        last = [0.0]

        def progress(p: Any) -> None:
            now = time.monotonic()
            if cancel.is_set() or (now - last[0] < DOWNLOAD_PROGRESS_GAP_S and p.done_bytes < p.total_bytes):
                return
            last[0] = now
            self.download_progress.emit(job, p)

        def run() -> None:
            if earlier is not None:
                earlier.join()  # a cancelled download of this repo ends at its next read
            try:
                folder = download.download(plan, progress, cancel)
            except BaseException as exc:  # noqa: BLE001
                if not cancel.is_set():
                    self.download_failed.emit(job, _download_message(exc), isinstance(exc, download.DownloadCancelled))
                return
            if not cancel.is_set():
                self.download_finished.emit(job, plan.repo_id, str(folder))

        self.active = job
        self._by_repo[plan.repo_id] = self._start(job, run, f"hub-download-{job}")
        return job

    def cancel(self, job: int | None = None) -> None:
        """Cancel a download (the active one by default); its failed(cancelled) signal comes at once."""
        job = self.active if job is None else job
        event = self._cancels.get(job) if job is not None else None
        thread = self._threads.get(job) if job is not None else None
        if event is None or event.is_set() or thread is None or not thread.is_alive():
            return
        event.set()
        if job == self.active:
            self.active = None
        self.download_failed.emit(job, "The download was cancelled; press Download again to continue it.", True)

    def busy(self) -> bool:
        return any(t.is_alive() for t in self._threads.values())

    def wait(self, timeout_s: float = 5.0) -> bool:
        """Join every listing and download thread (at quit, and in tests); True when all ended."""
        deadline = time.monotonic() + timeout_s
        for thread in list(self._threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not self.busy()

    def cancel_all(self) -> None:
        for job in list(self._cancels):
            self.cancel(job)

    def _next(self) -> int:
        self._jobs += 1
        return self._jobs

    def _start(self, job: int, run, name: str) -> threading.Thread:
        # daemon: a download stuck on a dead network must never keep the app from quitting
        thread = threading.Thread(target=run, name=name, daemon=True)
        self._threads = {j: t for j, t in self._threads.items() if t.is_alive()}
        self._threads[job] = thread
        thread.start()
        return thread


def _download_message(exc: BaseException) -> str:
    """EngineError messages (with their hint) as they are; anything else with its type."""
    from engine.errors import EngineError

    if isinstance(exc, EngineError):
        return f"{exc}\n{exc.hint}" if exc.hint else str(exc)
    traceback.print_exception(exc)
    return f"Downloading failed: {type(exc).__name__}: {exc}"

