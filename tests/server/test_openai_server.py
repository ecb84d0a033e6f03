"""The OpenAI-compatible server, driven by the official `openai` client on a loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import psutil
import pytest
import uvicorn

try:  # the HTTP client the installed `openai` is built on
    import httpx2 as httpx
except ImportError:
    import httpx

from engine.model.loader import load_model
from engine.model.sampling import GenerationParams
from engine.model.session import Session
from engine.paths import DEMO_MODEL_DIR
from engine.server.generation_queue import GenerationQueue
from engine.server.serve import ServerThread

QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """The server on a thread, with its own engine thread, and an `openai` client for it."""

    def __init__(self, loaded, api_key: str | None = None, max_waiting: int = 16):
        self.engine = GenerationQueue(Session(loaded), "demo", max_waiting=max_waiting)
        self.http = ServerThread(self.engine, api_key=api_key)
        self.url = f"http://127.0.0.1:{self.http.port}"

    def client(self, key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)

    def stop(self) -> None:
        self.http.stop()
        self.engine.close()


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL_DIR, device="cpu", budget="0.3", profile=None)


@pytest.fixture(scope="module")
def server(demo):
    s = RunningServer(demo)
    yield s
    s.stop()


def greedy_in_process(loaded, messages, max_tokens=24) -> tuple[str, dict]:
    session = Session(loaded)
    params = GenerationParams(max_new_tokens=max_tokens, greedy=True, repetition_penalty=1.0)
    text = "".join(e.text for e in session.generate(session.encode_chat(messages), params))
    return text, session.last_stats


def test_models_health_and_greedy_chat_match_the_engine(server, demo):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["demo"]
    reply = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0)
    expected, stats = greedy_in_process(demo, QUESTION)
    assert reply.choices[0].message.content == expected and "5" in expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == stats["prompt_tokens"]
    assert reply.usage.completion_tokens == stats["new_tokens"]
    assert reply.usage.total_tokens == stats["prompt_tokens"] + stats["new_tokens"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_streamed_chat_equals_the_whole_reply_and_reports_usage(server):
    client = server.client()
    whole = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completions_plain_and_streamed(server):
    client = server.client()
    whole = client.completions.create(model="demo", prompt="The capital of", max_tokens=6, temperature=0)
    assert whole.choices[0].finish_reason in ("length", "stop") and whole.usage.completion_tokens >= 1
    parts = client.completions.create(model="demo", prompt="The capital of", max_tokens=6, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text


def test_stop_string_cuts_the_reply(server, demo):
    expected, _ = greedy_in_process(demo, QUESTION)
    cut = expected.index("5")
    reply = server.client().chat.completions.create(model="demo", messages=QUESTION, max_tokens=24,
                                                    temperature=0, stop=["5"])
    assert reply.choices[0].message.content == expected[:cut]
    assert reply.choices[0].finish_reason == "stop"


def test_max_tokens_gives_finish_reason_length(server):
    reply = server.client().chat.completions.create(model="demo", messages=QUESTION, max_completion_tokens=2,
                                                    temperature=0)
    assert reply.usage.completion_tokens == 2 and reply.choices[0].finish_reason == "length"


def test_seed_reproduces_a_sampled_reply(server):
    client = server.client()
    ask = dict(model="demo", messages=[{"role": "user", "content": "Tell me something."}], max_tokens=16,
               temperature=1.0, top_p=0.95)
    first = client.chat.completions.create(seed=11, **ask).choices[0].message.content
    again = client.chat.completions.create(seed=11, **ask).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **ask).choices[0].message.content for s in (1, 2, 3)}
    assert first == again
    assert len(others | {first}) > 1  # the seed really drives the sampling


@pytest.mark.parametrize("body, status, param", [
    ({"messages": []}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": QUESTION, "model": "gpt-9"}, 404, "model"),
    ({"messages": QUESTION, "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": 10**9}, 400, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": QUESTION, "temperature": 3}, 400, "temperature"),
    ({"messages": QUESTION, "top_p": 0}, 400, "top_p"),
    ({"messages": QUESTION, "n": 2}, 400, "n"),
    ({"messages": QUESTION, "stop": [1, 2]}, 400, "stop"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_bad_json_and_a_prompt_longer_than_the_context(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    long = [{"role": "user", "content": "one two three " * 400}]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="demo", messages=long, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "512" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, not with the room asked for
        server.client().chat.completions.create(model="demo", messages=QUESTION, max_tokens=510)
    assert e.value.code == "context_length_exceeded"
    assert httpx.get(server.url + "/v1/nowhere").status_code == 404


def test_api_key_is_required_when_set(demo):
    s = RunningServer(demo, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # liveness needs no key
        assert [m.id for m in s.client("sekret").models.list().data] == ["demo"]
    finally:
        s.stop()


def test_eight_concurrent_clients_are_all_served(server):
    results, errors = [], []

    def ask(i):
        try:
            r = server.client().chat.completions.create(
                model="demo", messages=[{"role": "user", "content": f"What is {i} plus 1?"}], max_tokens=12,
                temperature=0)
            results.append(r.choices[0].message.content)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 8 and all(results)


def test_past_the_queue_bound_clients_get_429_and_none_is_lost(demo):
    s = RunningServer(demo, max_waiting=1)
    served, refused, other = [], [], []

    def ask():
        try:
            s.client().chat.completions.create(model="demo", messages=QUESTION, max_tokens=40, temperature=0)
            served.append(1)
        except openai.RateLimitError as e:
            refused.append(e.response.headers.get("retry-after"))
        except Exception as e:  # noqa: BLE001
            other.append(e)

    try:
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        s.stop()
    assert not other and len(served) + len(refused) == 6
    assert served and refused and all(r == "2" for r in refused)


def test_a_client_that_leaves_mid_stream_cancels_its_generation(server):
    before = server.engine.totals["cancelled"]
    body = {"model": "demo", "messages": [{"role": "user", "content": "Count to one hundred."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(3))]
    assert got and json.loads(got[0][len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
    deadline = time.time() + 20
    while server.engine.totals["cancelled"] == before:
        assert time.time() < deadline, "the generation went on after its client left"
        time.sleep(0.05)
    assert server.engine.last_stats["new_tokens"] < 400
    reply = server.client().chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0)
    assert "5" in reply.choices[0].message.content


def test_metrics_report_speed_hit_rates_and_queue(server):
    server.client().chat.completions.create(model="demo", messages=QUESTION, max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("moe_chat_decode_tokens_per_second", 'moe_chat_layer_hit_rate{layer="0"}',
                 "moe_chat_cache_bytes", "moe_chat_queue_depth", "moe_chat_completion_tokens_total",
                 'moe_chat_http_responses_total{route="/v1/chat/completions",status="200"}'):
        assert name in text, name


def test_serve_command_on_a_tiny_model_listens_on_loopback_only(tiny_model, tmp_path):
    port = free_port()
    env = {**os.environ, "MOE_CHAT_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--model", str(tiny_model), "--port",
                             str(port), "--model-name", "tiny"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, "serve did not come up"
                time.sleep(0.3)
        assert [m.id for m in models.data] == ["tiny"]
        reply = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="other", max_retries=0).models.list()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/v1 (API key required)" in err


def test_a_host_other_than_loopback_is_used_only_when_asked_and_warns(demo, monkeypatch, capsys):
    from engine.server import serve as serve_module

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    serve_module.serve(demo, host="0.0.0.0", port=9)
    assert calls[0]["host"] == "0.0.0.0"
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    serve_module.serve(demo)
    assert calls[1]["host"] == "127.0.0.1" and "warning" not in capsys.readouterr().err


def test_server_overhead_bench_generates_the_same_token_count_both_ways(demo):
    from engine.server.overhead import server_overhead

    result = server_overhead(demo, new_tokens=8, rounds=1)
    assert result["new_tokens"] == 8 and result["text_chunks"] >= 1
    assert result["api_tokens_per_s"] > 0 and result["in_process_tokens_per_s"] > 0


def test_a_port_in_use_is_a_clear_error(server):
    from engine.errors import EngineError

    with pytest.raises(EngineError, match="in use"):
        ServerThread(server.engine, port=server.http.port)


def test_a_request_that_continues_the_conversation_reuses_the_kv_cache(server):
    client = server.client()
    first = client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=24, temperature=0)
    follow = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And 4 plus 4?"}]
    client.chat.completions.create(model="demo", messages=follow, max_tokens=8, temperature=0)
    assert server.engine.last_stats["reused_prompt_tokens"] >= first.usage.prompt_tokens
