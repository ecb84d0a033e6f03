"""The OpenAI-compatible HTTP API over one GenerationQueue (the subset local chat front ends use).

Requests are checked here, in OpenAI's error shape; everything that touches the tokenizer or the model
runs on the queue's engine thread. A streamed reply's client going away cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..model.sampling import GenerationParams
from .generation_queue import Job, JobBoard, PromptError, QueueFull
from .metrics import ServerMetrics

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
STATUS = {"context_length_exceeded": 400, "invalid_prompt": 400, "cancelled": 499, "engine_error": 500,
          "model_not_loaded": 503}
RETRY_AFTER_S = 2


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False,
            open_low: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if value > high or value < low or (open_low and value == low):
        bounds = f"{'(' if open_low else '['}{low}, {high}]"
        raise ApiError(400, f"'{name}' is {value}; it must be in {bounds}", name)
    return value


def sampling_params(body: dict, context_length: int) -> tuple[GenerationParams, bool]:
    """OpenAI's defaults (temperature 1, top_p 1, no top-k, no repetition penalty); temperature 0 is
    greedy. Also says whether max_tokens was given, so a reply that cannot fit is refused."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported: one engine, one reply at a time", "n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, 1, context_length, integer=True)
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1, open_low=True)
    seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    params = GenerationParams(
        max_new_tokens=max_tokens or context_length, greedy=temperature == 0, temperature=temperature,
        top_p=top_p, top_k=0, repetition_penalty=1.0, seed=seed, stop=stop)
    return params, max_tokens is not None


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role: one of {sorted(ROLES)}", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise ApiError(400, f"messages[{i}]: only text content is supported", f"messages[{i}].content")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


def completion_prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                   "prompt")


class _Stream:
    """A job's events, handed from the engine thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server shut down under a running job: nobody is listening
            pass


def create_app(engine: JobBoard, api_key: str | None = None) -> FastAPI:
    """The model id and context are read from `engine` per request: in the app, the model can change."""
    app = FastAPI(title="MoE Chat", docs_url=None, redoc_url=None)
    metrics = ServerMetrics(engine)
    created = int(time.time())

    @app.middleware("http")
    async def check_key_and_count(request: Request, call_next):
        route = request.url.path
        if api_key and route.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response = ApiError(401, "incorrect or missing API key; send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key").response()
                metrics.responses.labels(route, "401").inc()
                return response
        response = await call_next(request)
        metrics.responses.labels(route if response.status_code != 404 else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response({"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if engine.model_id is None:
            raise ApiError(503, "no model is loaded; pick one in MoE Chat first", code="model_not_loaded",
                           kind="server_error")
        model = body.get("model")
        if model is not None and model != engine.model_id:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{engine.model_id}'",
                           "model", "model_not_found")
        return body

    async def start(request: Request, prompt, body: dict) -> tuple[Job, _Stream, int]:
        """Queue the job and wait until the engine takes it (or refuses it): errors keep their status."""
        params, given = sampling_params(body, engine.context_length)
        stream = _Stream(asyncio.get_running_loop())
        job = Job(prompt, params, stream.emit, max_tokens_given=given)
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        kind, value = await _next(request, job, stream)
        if kind == "error":
            raise ApiError(STATUS.get(value.code, 400), str(value), code=value.code,
                           kind="server_error" if STATUS.get(value.code, 400) >= 500 else "invalid_request_error")
        return job, stream, value

    async def _next(request: Request, job: Job, stream: _Stream):
        """The next event; a client that has gone away cancels the job."""
        while True:
            try:
                return await asyncio.wait_for(stream.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    raise ApiError(499, "the client went away", code="cancelled") from None

    async def collect(request: Request, job: Job, stream: _Stream) -> tuple[str, dict]:
        pieces = []
        try:
            while True:
                kind, value = await _next(request, job, stream)
                if kind == "text":
                    pieces.append(value)
                elif kind == "done":
                    return "".join(pieces), value
                else:
                    raise ApiError(500, str(value), code=value.code, kind="server_error")
        finally:
            job.cancel.set()  # a no-op once done; stops the engine if this request was cancelled

    def usage(prompt_tokens: int, stats: dict) -> dict:
        completion = stats.get("new_tokens", 0)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def sse(job: Job, stream: _Stream, prompt_tokens: int, chunk, include_usage: bool) -> AsyncIterator[str]:
        """`chunk(text, finish_reason)` builds one event's JSON; the engine is cancelled if the client
        leaves (the response task is cancelled, so `finally` runs). Pieces that arrived while the last
        chunk was written go out as one: the loop never falls behind the engine."""
        pending = None
        try:
            while True:
                kind, value = pending or await stream.events.get()
                pending = None
                if kind == "text":
                    while not stream.events.empty():
                        pending = stream.events.get_nowait()
                        if pending[0] != "text":
                            break
                        value, pending = value + pending[1], None
                    yield f"data: {json.dumps(chunk(value, None))}\n\n"
                elif kind == "done":
                    yield f"data: {json.dumps(chunk(None, FINISH.get(value.get('finish_reason'), 'stop')))}\n\n"
                    if include_usage:
                        last = chunk(None, None)
                        last["choices"] = []
                        last["usage"] = usage(prompt_tokens, value)
                        yield f"data: {json.dumps(last)}\n\n"
                    break
                else:
                    error = {"message": str(value), "type": "server_error", "code": value.code}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()

    def include_usage(body: dict) -> bool:
        options = body.get("stream_options") or {}
        return bool(isinstance(options, dict) and options.get("include_usage"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "queue_depth": engine.depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": created, "owned_by": "moe-chat",
                "context_length": engine.context_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()] if engine.model_id is not None else []}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != engine.model_id:
            raise ApiError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        messages = chat_messages(body)
        job, stream, prompt_tokens = await start(request, messages, body)
        rid, now, model_id = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_id
        if body.get("stream"):
            first = [True]

            def chunk(text, finish):
                delta = {} if text is None else {"content": text}
                if first[0]:
                    delta, first[0] = {"role": "assistant", "content": text or ""}, False
                return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            return StreamingResponse(sse(job, stream, prompt_tokens, chunk, include_usage(body)),
                                     media_type="text/event-stream")
        text, stats = await collect(request, job, stream)
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": FINISH.get(stats.get("finish_reason"), "stop")}],
                "usage": usage(prompt_tokens, stats)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        prompt = completion_prompt(body)
        job, stream, prompt_tokens = await start(request, prompt, body)
        rid, now, model_id = f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_id

        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        if body.get("stream"):
            return StreamingResponse(sse(job, stream, prompt_tokens, chunk, include_usage(body)),
                                     media_type="text/event-stream")
        text, stats = await collect(request, job, stream)
        response = chunk(text, FINISH.get(stats.get("finish_reason"), "stop"))
        response["usage"] = usage(prompt_tokens, stats)
        return response

    @app.get("/")
    async def root():
        return PlainTextResponse(f"MoE Chat is serving {engine.model_id}: the OpenAI API is under /v1\n")

    return app
