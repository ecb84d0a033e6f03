"""Routing traces: the file format round trip, recording from a real (tiny) model, and the promise that
the simulator replays exactly what the engine does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.tools.cli import main
from engine.model.loader import load_model
from engine.model.sampling import GenerationParams
from engine.tools.simulator import replay
from engine.tools.trace import Trace, load_trace, record_trace, save_trace


def test_round_trip_dtypes_and_missing_records(tmp_path):
    e = np.array([[[0, 3], [-1, -1]], [[2, 1], [3, -1]]], dtype=np.int64)
    w = np.random.default_rng(0).random(e.shape)
    hints = np.array([[[-1, -1], [2, 0]], [[-1, -1], [3, 1]]])
    t = Trace(e, 4, prefill_tokens=1, weights=w, model="tiny", prompt_rows=np.array([[0, 1], [1, 1]]),
              expert_bytes=1024, hints=hints)
    path = save_trace(tmp_path / "t.npz", t)
    with np.load(path) as raw:  # what other tools see
        assert raw["experts"].dtype == np.int16 and raw["experts"].shape == (2, 2, 2)
        assert raw["weights"].dtype == np.float32 and int(raw["num_experts"]) == 4
        assert str(raw["model"]) == "tiny" and int(raw["prefill_tokens"]) == 1
    back = load_trace(path)
    assert back.experts.dtype == np.int32 and (back.experts == e).all()
    assert back.num_layers == 2 and back.top_k == 2 and len(back) == 2
    assert back.model == "tiny" and back.expert_bytes == 1024 and back.prompt_rows.tolist() == [[0, 1], [1, 1]]
    assert back.prefill_mask().tolist() == [True, True] and (back.hints == hints).all()
    assert back.usage().tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]  # -1 is no use


def test_minimal_trace_from_another_tool(tmp_path):
    path = tmp_path / "minimal.npz"
    np.savez(path, experts=np.zeros((3, 1, 2), dtype=np.int32), num_experts=2)
    t = load_trace(path)
    assert t.prefill_tokens == 0 and t.weights is None and t.model is None and t.prefill_mask().sum() == 0


@pytest.mark.parametrize("bad, message", [
    ({"experts": np.zeros((2, 2), dtype=np.int32), "num_experts": 2}, "tokens, moe_layers, top_k"),
    ({"experts": np.full((1, 1, 1), 5, dtype=np.int32), "num_experts": 2}, "outside"),
    ({"experts": np.zeros((1, 1, 1), dtype=np.int32), "num_experts": 2, "weights": np.zeros((1, 1, 2))}, "weights"),
    ({"experts": np.zeros((1, 1, 1), dtype=np.int32), "num_experts": 2, "prefill_tokens": 3}, "prefill_tokens"),
    ({"experts": np.zeros((1, 1, 1), dtype=np.int32)}, "not a routing trace"),
    ({"experts": np.zeros((1, 1, 1), dtype=np.int32), "num_experts": 2, "hints": np.full((1, 1, 1), 2)}, "hints"),
])
def test_invalid_traces_are_refused(tmp_path, bad, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **bad)
    with pytest.raises(ValueError, match=message):
        load_trace(path)


def test_trace_cli_records_a_tiny_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "trace.npz"
    assert main(["trace", "--model", str(tiny_model), "--prompt", "Hello there", "--max-new-tokens", "5",
                 "--device", "cpu", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    t = load_trace(out)
    assert r["rows"] == len(t) and r["trace"] == str(out)
    assert t.experts.shape[1:] == (3, 2) and t.num_experts == 8 and t.model == r["model"]
    assert t.prefill_tokens < len(t) <= t.prefill_tokens + 4  # the last sampled token is never fed back
    assert (t.experts >= 0).all() and (t.experts < 8).all()
    assert (np.sort(t.experts, axis=2)[..., 1:] != np.sort(t.experts, axis=2)[..., :-1]).all()  # distinct top-k
    assert t.weights.shape == t.experts.shape and t.weights.dtype == np.float32
    assert t.expert_bytes > 0
    # router hints: none for the first layer, the next layer's router's top-k (distinct) for the others
    assert (t.hints[:, 0] == -1).all() and (t.hints[:, 1:] >= 0).all() and (t.hints[:, 1:, 0] != t.hints[:, 1:, 1]).all()


def test_trace_cli_several_prompts(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nHow are you?\n")
    out = tmp_path / "two.npz"
    assert main(["trace", "--model", str(tiny_model), "--prompts", str(prompts), "--chat",
                 "--max-new-tokens", "3", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompts"] == 2
    t = load_trace(out)
    (s0, p0), (s1, p1) = t.prompt_rows.tolist()
    assert s0 == 0 and p0 == t.prefill_tokens and p0 <= s1 <= p0 + 2 and s1 + p1 <= len(t) <= s1 + p1 + 2
    assert t.prefill_mask().sum() == p0 + p1


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_simulator_replays_what_the_engine_did(tiny_model, policy):
    """One-token prompt: every step is a single token, so replay and engine must agree hit for hit."""
    loaded = load_model(tiny_model, device="cpu", budget=0.4, policy=policy, profile=None)
    rt = loaded.runtime
    trace = record_trace(loaded, [[7]], GenerationParams(max_new_tokens=12, greedy=True))
    snap = rt.snapshot()
    rep = replay(trace, policy, rt.cache.capacity, rt.cache.scope)
    assert rep.accesses.sum() == snap["hits"] + snap["misses"]
    assert rep.hits.sum() == snap["hits"]
    assert rep.hits.sum(axis=0).tolist() == [row["hits"] for row in snap["per_layer"]]
