"""The engine worker on its own QThread, driven through EngineClient on the real engine (tiny model)."""

from __future__ import annotations

import itertools
import time

import pytest

from app.engine_worker import EngineClient

LONG = {"max_new_tokens": 400, "temperature": 0.7, "seed": 0}
CHAT = [{"role": "user", "content": "Hello! How are you today?"}]


@pytest.fixture
def client(qtbot):
    c = EngineClient()
    c.start()
    yield c
    assert c.shutdown(2000)


@pytest.fixture
def loaded(qtbot, client, tiny_model):
    with qtbot.waitSignal(client.model_loaded, timeout=60_000) as blocker:
        client.load(str(tiny_model), 0, "lru")
    info = blocker.args[1]
    assert info["has_runtime"] and info["simulated_cache"] and info["device"] == "cpu"
    assert info["policies"] and "lru" in info["policies"]
    return client


def test_reply_streams_tokens_and_finishes_with_stats(qtbot, loaded):
    tokens = []
    loaded.token.connect(lambda rid, text: tokens.append((rid, text)))
    with qtbot.waitSignal(loaded.reply_finished, timeout=60_000) as blocker:
        rid = loaded.generate(CHAT, {"max_new_tokens": 6, "seed": 1, "not_a_param": 3})
    assert blocker.args[0] == rid
    stats = blocker.args[1]
    assert stats["finish_reason"] in ("length", "eos") and stats["new_tokens"] >= 1
    qtbot.waitUntil(lambda: len(tokens) >= 1)
    assert all(r == rid for r, _ in tokens)
    assert stats["decode_tokens_per_s"] >= 0 and stats["prompt_tokens"] > 0


def test_stop_lands_within_one_token(qtbot, loaded):
    worker = loaded.worker
    seen = []
    loaded.token.connect(lambda rid, text: seen.append(text))
    loaded.generate(CHAT, LONG)
    qtbot.waitUntil(lambda: len(seen) >= 3, timeout=60_000)
    with qtbot.waitSignal(loaded.reply_finished, timeout=5000) as blocker:
        at_stop = worker._tokens
        loaded.stop()
    stats = blocker.args[1]
    assert stats["finish_reason"] == "cancelled"
    assert stats["new_tokens"] <= at_stop + 1 < LONG["max_new_tokens"]


def test_stop_is_safe_before_a_queued_reply_and_when_idle(qtbot, loaded):
    loaded.stop()  # idle: nothing happens
    with qtbot.waitSignal(loaded.reply_finished, timeout=10_000) as blocker:
        loaded.generate(CHAT, LONG)
        loaded.stop()  # the request may still be queued: it must not start at all
    assert blocker.args[1]["finish_reason"] == "cancelled"
    assert blocker.args[1]["new_tokens"] <= 1
    # and the next reply is not affected by the old stop
    with qtbot.waitSignal(loaded.reply_finished, timeout=60_000) as blocker:
        loaded.generate(CHAT, {"max_new_tokens": 3})
    assert blocker.args[1]["finish_reason"] in ("length", "eos")


def test_budget_and_policy_change_live_between_steps(qtbot, loaded):
    runtime = loaded.worker._loaded.runtime
    info = loaded.model_info
    tokens = []
    loaded.token.connect(lambda rid, text: tokens.append(text))
    loaded.generate(CHAT, LONG)
    qtbot.waitUntil(lambda: len(tokens) >= 2, timeout=60_000)
    target = info["max_budget_bytes"] // 2
    with qtbot.waitSignal(loaded.budget_applied, timeout=5000) as blocker:
        loaded.set_budget(target)
    assert blocker.args[0] == target
    assert loaded.state == "generating"  # applied while the reply runs, not after it
    with qtbot.waitSignal(loaded.policy_applied, timeout=5000):
        loaded.set_policy("lfu")
    qtbot.waitUntil(lambda: loaded.last_stats.get("policy") == "lfu"
                    and loaded.last_stats.get("budget_bytes") == target, timeout=3000)
    assert loaded.worker._loaded.runtime is runtime  # no reload
    with qtbot.waitSignal(loaded.budget_refused, timeout=5000) as refused:
        loaded.set_budget(info["max_budget_bytes"] + 10 * 2**20)
    assert "does not fit" in refused.args[0]
    with qtbot.waitSignal(loaded.reply_finished, timeout=5000):
        loaded.stop()


def test_stats_arrive_while_idle_at_most_ten_a_second(qtbot, loaded):
    times = []
    loaded.stats.connect(lambda snap: times.append(time.monotonic()))
    qtbot.waitUntil(lambda: len(times) >= 4, timeout=5000)
    loaded.generate(CHAT, {"max_new_tokens": 20})
    qtbot.waitUntil(lambda: len(times) >= 10, timeout=30_000)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.09  # queued delivery may bunch a little; the worker spaces them 100 ms
    snap = loaded.last_stats
    assert snap["has_runtime"] and "per_layer" in snap and snap["rss_bytes"] > 0
    loaded.stop()
    qtbot.waitUntil(lambda: loaded.state == "idle", timeout=10_000)


def test_bad_folder_fails_clearly_and_keeps_the_model(qtbot, loaded, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    before = loaded.model_info["name"]
    with qtbot.waitSignal(loaded.load_failed, timeout=30_000) as blocker:
        loaded.load(str(broken), 0, "lru")
    _, message, cancelled = blocker.args
    assert not cancelled and "config.json" in message
    assert loaded.model_info["name"] == before
    with qtbot.waitSignal(loaded.reply_finished, timeout=60_000) as done:
        loaded.generate(CHAT, {"max_new_tokens": 2})
    assert done.args[1]["finish_reason"] in ("length", "eos")


def test_cancel_a_load(qtbot, client, tiny_model):
    with qtbot.waitSignal(client.load_failed, timeout=30_000) as blocker:
        client.load(str(tiny_model), 0, "lru")
        client.cancel_load()
    assert blocker.args[2] is True and "cancel" in blocker.args[1].lower()
    assert client.model_info is None


def test_shutdown_during_generation_joins_fast(qtbot, tiny_model):
    c = EngineClient()
    c.start()
    with qtbot.waitSignal(c.model_loaded, timeout=60_000):
        c.load(str(tiny_model), 0, "lru")
    tokens = []
    c.token.connect(lambda rid, text: tokens.append(text))
    c.generate(CHAT, LONG)
    qtbot.waitUntil(lambda: len(tokens) >= 1, timeout=60_000)
    t0 = time.monotonic()
    assert c.shutdown(2000)
    assert time.monotonic() - t0 < 2.0
    assert not c.is_running()
