"""Chat with a model on an OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, LM Studio, ours).

`RemoteSession` streams like `Session` does (an iterator of TokenEvents, `last_stats` at the end), so
the app's worker treats a remote model like a local one. Standard library HTTP only: a cancel closes
the socket at once, even while a read is waiting for the server.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import EngineError

if TYPE_CHECKING:  # this module stays free of torch: the window imports it for the two source helpers
    from .sampling import GenerationParams
    from .session import TokenEvent

FINISH = {"stop": "eos", "length": "length"}
REMOTE_PREFIX = "remote:"


class RemoteError(EngineError):
    """A remote server could not be used; the message says why, in words for the chat."""


@dataclass
class RemoteInfo:
    name: str
    base_url: str

    def to_dict(self) -> dict:
        return {"name": self.name, "model_type": "remote", "remote": True, "base_url": self.base_url,
                "has_tokenizer": True}


@dataclass
class RemoteModel:
    """Stands where a LoadedModel would: no weights, no runtime, the server does the work."""

    info: RemoteInfo
    api_key: str | None = None
    runtime: None = None
    tokenizer: None = None
    remote: bool = True
    experts: str = "remote"
    dense: str = "remote"
    context_length: int = 0  # 0: the server did not say


def remote_source(base_url: str, model: str) -> str:
    """How a remote model is remembered as the last model (never with its key)."""
    return f"{REMOTE_PREFIX}{base_url.rstrip('/')}#{model}"


def parse_remote_source(source: str) -> tuple[str, str] | None:
    if not source.startswith(REMOTE_PREFIX) or "#" not in source:
        return None
    url, model = source[len(REMOTE_PREFIX):].split("#", 1)
    return url, model


def _split(base_url: str) -> tuple[type[http.client.HTTPConnection], str, int | None, str]:
    parts = urlsplit(base_url.rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteError(f"{base_url!r} is not a server address; write it as http://host:port/v1")
    conn = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return conn, parts.hostname, parts.port, parts.path


def _request(base_url: str, api_key: str | None, method: str, path: str, body: dict | None, timeout: float):
    conn_cls, host, port, prefix = _split(base_url)
    conn = conn_cls(host, port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request(method, prefix + path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
    except (socket.timeout, TimeoutError):
        conn.close()
        raise RemoteError(f"{base_url} did not answer within {timeout:.0f} s") from None
    except OSError as e:
        conn.close()
        raise RemoteError(f"could not reach {base_url} ({e.strerror or e}); is the server running?") from None
    if response.status >= 400:
        detail = _error_detail(response.read())
        conn.close()
        raise RemoteError(_status_message(base_url, response.status, detail, response.getheader("Retry-After")))
    return conn, response


def _error_detail(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip()[:200]


def _status_message(base_url: str, status: int, detail: str, retry_after: str | None) -> str:
    if status == 401:
        return f"{base_url} refused the API key (401): check the key saved for this server"
    if status == 429:
        wait = f" in {retry_after} s" if retry_after else " in a moment"
        return f"{base_url} is busy (429); try again{wait}"
    if status == 404:
        return f"{base_url}: not found (404): {detail}"
    return f"{base_url} answered {status}: {detail}"


def _model_entries(base_url: str, api_key: str | None, timeout: float) -> list[dict]:
    conn, response = _request(base_url, api_key, "GET", "/models", None, timeout)
    try:
        entries = json.loads(response.read())["data"]
        if not all(isinstance(m, dict) and "id" in m for m in entries):
            raise TypeError
        return entries
    except (ValueError, KeyError, TypeError):
        raise RemoteError(f"{base_url}/models did not answer as an OpenAI-compatible server does") from None
    finally:
        conn.close()


def list_remote_models(base_url: str, api_key: str | None = None, timeout: float = 10) -> list[str]:
    """The model ids the server offers (`GET /models`)."""
    return [str(m["id"]) for m in _model_entries(base_url, api_key, timeout)]


def connect_remote(base_url: str, model: str, api_key: str | None = None, timeout: float = 10) -> RemoteModel:
    """Check that the server answers and serves `model`, then stand in for a loaded model."""
    entries = {str(m["id"]): m for m in _model_entries(base_url, api_key, timeout)}
    if model not in entries:
        offered = ", ".join(entries) or "none"
        raise RemoteError(f"{base_url} does not serve {model!r} (it serves: {offered})")
    # ours and llama.cpp say context_length, vLLM and SGLang max_model_len
    context = entries[model].get("context_length") or entries[model].get("max_model_len")
    remote = RemoteModel(RemoteInfo(model, base_url.rstrip("/")), api_key)
    if isinstance(context, int) and context > 0:
        remote.context_length = context
    return remote


class RemoteSession:
    def __init__(self, remote: RemoteModel, timeout: float = 60):
        self.loaded = remote
        self.timeout = timeout
        self.tokenizer = None
        self.context_length = remote.context_length
        self.last_stats: dict = {}

    def reset(self) -> None:
        """Nothing is kept here: the server owns its own KV cache."""

    def chat(self, messages: list[dict], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        remote = self.loaded
        body = {"model": remote.info.name, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": 0.0 if params.greedy else params.temperature, "top_p": params.top_p}
        if not remote.context_length or params.max_new_tokens < remote.context_length // 2:
            # else leave it out: the server fills what room the prompt leaves
            body["max_tokens"] = params.max_new_tokens
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop[:4]
        conn, response = _request(remote.info.base_url, remote.api_key, "POST", "/chat/completions", body,
                                  self.timeout)
        return self._stream(conn, response, cancel or threading.Event())

    def _stream(self, conn, response, cancel: threading.Event) -> Iterator[TokenEvent]:
        from .session import TokenEvent

        stats = {"finish_reason": "length", "prompt_tokens": 0, "new_tokens": 0, "reused_prompt_tokens": 0,
                 "prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0, "time_to_first_token_s": 0.0,
                 "dropped_messages": 0, "remote": True}
        self.last_stats = stats
        done = threading.Event()
        threading.Thread(target=self._close_on_cancel, args=(conn, cancel, done), daemon=True).start()
        t0 = time.perf_counter()
        first = None
        try:
            for raw in response:
                if cancel.is_set():
                    stats["finish_reason"] = "cancelled"
                    return
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RemoteError(f"the server stopped the reply: {chunk['error'].get('message', chunk['error'])}")
                if chunk.get("usage"):
                    stats["prompt_tokens"] = chunk["usage"].get("prompt_tokens", 0)
                    stats["new_tokens"] = chunk["usage"].get("completion_tokens", stats["new_tokens"])
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if choice.get("finish_reason"):
                        stats["finish_reason"] = FINISH.get(choice["finish_reason"], choice["finish_reason"])
                    if text:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            stats["time_to_first_token_s"] = now - t0
                        stats["new_tokens"] += 1
                        if now > first:
                            stats["decode_tokens_per_s"] = (stats["new_tokens"] - 1) / (now - first)
                        yield TokenEvent(-1, text)
            if not cancel.is_set():
                raise RemoteError(f"the connection to {self.loaded.info.base_url} ended mid-reply")
            stats["finish_reason"] = "cancelled"
        except (OSError, http.client.HTTPException, ValueError) as e:
            if cancel.is_set():
                stats["finish_reason"] = "cancelled"
                return
            raise RemoteError(f"the connection to {self.loaded.info.base_url} was lost mid-reply ({e})") from None
        finally:
            done.set()
            conn.close()

    @staticmethod
    def _close_on_cancel(conn, cancel: threading.Event, done: threading.Event) -> None:
        """Stop lands at once: shutting the socket down wakes a read that waits for the server."""
        while not done.is_set():
            if cancel.wait(0.05):
                sock = conn.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
