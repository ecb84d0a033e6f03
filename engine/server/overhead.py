"""What the HTTP server costs per token: the same greedy generation streamed through the API on a
loopback port and run in-process, rounds alternating; the best of each is kept. The client is a
process of its own, as editors and agents are: in this one it would take the GIL from the engine."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

from ..model.loader import LoadedModel
from ..model.sampling import GenerationParams
from ..model.session import Session
from .generation_queue import GenerationQueue
from .serve import ServerThread


def _streamed(port: int, prompt: list[int], new_tokens: int) -> tuple[float, int]:
    """Seconds from sending the request to `[DONE]`, and the text chunks received (client process)."""
    out = subprocess.run([sys.executable, "-m", "engine.server.overhead", str(port), json.dumps(prompt),
                          str(new_tokens)], capture_output=True, text=True, check=True, timeout=600)
    elapsed, chunks = json.loads(out.stdout)
    return elapsed, chunks


def _client(port: int, prompt: list[int], new_tokens: int) -> tuple[float, int]:
    body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    chunks = 0
    for line in response:
        if line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["text"]:
            chunks += 1
    elapsed = time.perf_counter() - t
    conn.close()
    return elapsed, chunks


def _in_process(session: Session, prompt: list[int], new_tokens: int) -> float:
    params = GenerationParams(max_new_tokens=new_tokens, greedy=True, repetition_penalty=1.0)
    t = time.perf_counter()
    for _ in session.generate(prompt, params):
        pass
    return time.perf_counter() - t


def server_overhead(loaded: LoadedModel, new_tokens: int = 64, rounds: int = 3) -> dict:
    direct = Session(loaded)
    engine = GenerationQueue(Session(loaded))
    for session in (direct, engine.session):
        session.eos_ids = set()  # both sides generate exactly `new_tokens`
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode("Tell me about MoE Chat.") if tokenizer is not None else [1, 2, 3, 4]
    server = ServerThread(engine)
    port = server.port
    try:
        _streamed(port, prompt, 4)  # warm up both paths
        _in_process(direct, prompt, 4)
        api_s, direct_s, chunks = float("inf"), float("inf"), 0
        for _ in range(rounds):
            elapsed, chunks = _streamed(port, prompt, new_tokens)
            api_s = min(api_s, elapsed)
            direct_s = min(direct_s, _in_process(direct, prompt, new_tokens))
    finally:
        server.stop()
        engine.close()
    tokens = engine.last_stats.get("new_tokens", new_tokens)
    return {"new_tokens": tokens, "text_chunks": chunks, "api_tokens_per_s": tokens / api_s,
            "in_process_tokens_per_s": tokens / direct_s, "ratio": direct_s / api_s}


if __name__ == "__main__":  # the client side of `_streamed`
    print(json.dumps(_client(int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]))))
