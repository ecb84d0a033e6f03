"""One engine, one generation at a time: jobs from HTTP handlers, served FIFO by the model's owner.

HTTP handlers never touch the model. They submit a `Job` to a `JobBoard` and read its events; the
board is bounded so a flood of clients gets a quick "busy" instead of an ever-growing wait, and a job
whose client went away is cancelled (before it starts, or within one token once it runs). Who owns the
model decides where jobs run: `GenerationQueue` is a thread of its own (`python -m engine serve`); the
app's engine worker runs them between chat replies.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import EngineError
from ..model.sampling import GenerationParams
from ..model.session import Session

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


class PromptError(EngineError):
    """The request cannot be served as asked; `code` is OpenAI's name for the reason."""

    def __init__(self, message: str, code: str = "invalid_prompt"):
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    """A prompt (chat messages, text or token ids) and where its output goes.

    `emit(kind, value)` is called on the engine thread: ("start", prompt token count), ("text", str) per
    piece, ("done", stats); or ("error", PromptError) at any point instead. Tokenizing happens on the
    engine thread too, since a tokenizer must not be used from two threads at once."""

    prompt: list[dict] | str | list[int]
    params: GenerationParams
    emit: Callable[[str, object], None]
    max_tokens_given: bool = False  # refuse, rather than shorten, a reply that cannot fit the context
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


class JobBoard:
    """The engine as the HTTP side sees it. `enqueue` hands a job to the model's owner (from an HTTP
    thread), which calls `taken()` and then steps `run(session, job)` on its own thread; `model_id` None
    means no model is loaded."""

    def __init__(self, enqueue: Callable[[Job], None], model_id: str | None = None, context_length: int = 0,
                 max_waiting: int = 16):
        self._enqueue = enqueue
        self.model_id = model_id
        self.context_length = context_length
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiting = 0
        self.busy = False
        self.totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cancelled": 0}
        self.last_stats: dict = {}
        self.snapshot: dict = {}  # runtime numbers, refreshed by the owner after each job

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._waiting + int(self.busy)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise QueueFull(f"{self._waiting} requests are already waiting")
            self._waiting += 1
        self._enqueue(job)

    def taken(self) -> None:
        """The owner took a job off the queue (to run it, or to refuse it)."""
        with self._lock:
            self._waiting -= 1

    # -- on the model owner's thread --------------------------------------------------------------
    def run(self, session: Session, job: Job) -> Iterator[None]:
        """Serve one job, one step per token, so an owner with other work can interleave."""
        self.busy = True
        try:
            yield from self._serve(session, job)
        finally:
            self.busy = False

    def _serve(self, session: Session, job: Job) -> Iterator[None]:
        if job.cancel.is_set():
            self.totals["cancelled"] += 1
            job.emit("error", PromptError("cancelled before it started", "cancelled"))
            return
        try:
            ids = self._prompt_ids(session, job)
            job.emit("start", len(ids))
            for event in session.generate(ids, job.params, job.cancel):
                if event.text:
                    job.emit("text", event.text)
                yield
        except PromptError as e:
            job.emit("error", e)
            return
        except EngineError as e:
            job.emit("error", PromptError(str(e), "engine_error"))
            return
        except Exception as e:  # a bug or an odd model must not take the server down with it
            log.exception("generation failed")
            job.emit("error", PromptError(f"generation failed: {e}", "engine_error"))
            return
        stats = dict(session.last_stats)
        self.last_stats = stats
        self.totals["requests"] += 1
        self.totals["prompt_tokens"] += stats.get("prompt_tokens", 0)
        self.totals["completion_tokens"] += stats.get("new_tokens", 0)
        if stats.get("finish_reason") == "cancelled":
            self.totals["cancelled"] += 1
        runtime = session.loaded.runtime
        self.snapshot = runtime.snapshot() if runtime is not None else {}
        job.emit("done", stats)

    def _prompt_ids(self, session: Session, job: Job) -> list[int]:
        prompt = job.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            try:
                ids = session.encode_chat(prompt)
            except EngineError as e:
                raise PromptError(str(e)) from None
            except Exception as e:  # the template's own checks, e.g. roles that must alternate
                raise PromptError(f"the model's chat template refused these messages: {e}") from None
        elif isinstance(prompt, str):
            if session.tokenizer is None:
                raise PromptError("this model has no tokenizer: send token ids as the prompt")
            ids = session.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise PromptError("the prompt is empty")
        context = session.context_length
        if len(ids) >= context:
            raise PromptError(f"the prompt has {len(ids)} tokens; this model's context is {context} tokens",
                              "context_length_exceeded")
        room = context - len(ids)
        if job.max_tokens_given and job.params.max_new_tokens > room:
            raise PromptError(f"the prompt ({len(ids)} tokens) plus max_tokens ({job.params.max_new_tokens}) "
                              f"exceeds this model's context of {context} tokens", "context_length_exceeded")
        job.params.max_new_tokens = min(job.params.max_new_tokens, room)
        return ids


class GenerationQueue(JobBoard):
    """A thread that owns the session and serves jobs FIFO: the standalone server."""

    def __init__(self, session: Session, model_id: str = "model", max_waiting: int = 16):
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        super().__init__(self._jobs.put, model_id, session.context_length, max_waiting)
        self.session = session
        runtime = session.loaded.runtime
        self.snapshot = runtime.snapshot() if runtime is not None else {}
        self._thread = threading.Thread(target=self._run, name="moe-chat-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.taken()
            for _ in self.run(self.session, job):
                pass
