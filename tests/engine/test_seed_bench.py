"""The seed suite's JSON shape and the cost model behind its modelled rows."""

from __future__ import annotations

import numpy as np
import pytest

from engine.tools.cli import main
from engine.moe.cost_model import DEVICE_PROFILES
from engine.tools.seed_bench import DecodeRun, format_table, model_gpu_token, run_seed_suite, save_chart


def test_seed_suite_rows_and_sweep(tiny_model, tmp_path):
    result = run_seed_suite(str(tiny_model), budget=0.25, policies=("lru", "lfu"), new_tokens=4,
                            prompt_count=2, sweep=(0.0, 0.5, 1.0), log=lambda m: None)
    configs = [(r["config"], r["policy"]) for r in result["rows"]]
    assert configs == [("cpu", "-"), ("offload", "-"), ("cpu-gpu", "-"), ("hybrid", "lru"), ("hybrid", "lfu")]
    assert all(r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 for r in result["rows"])
    assert [r["modelled"] for r in result["rows"]] == [False, True, True, True, True]
    sweep = [r for r in result["sweep"] if r["policy"] == "lru"]
    assert [r["budget_fraction"] for r in sweep] == [0.0, 0.25, 0.5, 1.0]
    assert sweep[0]["hit_rate"] == 0 and sweep[-1]["hit_rate"] > sweep[1]["hit_rate"] > 0
    assert "(modelled)" in format_table(result)
    pytest.importorskip("matplotlib")
    assert save_chart(result, str(tmp_path / "chart.png")) and (tmp_path / "chart.png").stat().st_size > 1000


def test_hybrid_model_sits_between_its_extremes():
    gpu = DEVICE_PROFILES["rtx4090-24gb"]
    expert, dense = 100 * 2**20, 2 * 2**30
    cpu = DecodeRun(0.5, np.zeros(4), np.full(4, 2.0), 0.0, cpu_expert_s=0.005, peak_fast_device_bytes=0)

    def run(hit_share):
        return DecodeRun(0, np.full(4, 2.0 * hit_share), np.full(4, 2.0 * (1 - hit_share)), 0.0, 0.005, 0)

    no_cache = model_gpu_token("cpu-gpu", run(0), cpu, dense, expert, gpu)
    half = model_gpu_token("hybrid", run(0.5), cpu, dense, expert, gpu)
    full = model_gpu_token("hybrid", run(1.0), cpu, dense, expert, gpu)
    assert full < half < no_cache
    assert model_gpu_token("hybrid", run(0), cpu, dense, expert, gpu) == pytest.approx(no_cache)


def test_seed_suite_cli_json(tiny_model, capsys, tmp_path):
    assert main(["bench", "--suite", "seed", "--model", str(tiny_model), "--max-new-tokens", "3",
                 "--chart", str(tmp_path / "c.png"), "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert {"rows", "sweep", "device", "model", "chart"} <= set(out)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_decode_bench_json(tiny_model, capsys, monkeypatch, backend):
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", backend)
    assert main(["bench", "--model", str(tiny_model), "--rounds", "1", "--max-new-tokens", "4", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert set(out["decode_tokens_per_s"]) == {"engine", "transformers[grouped_mm]", "transformers[eager]"}
    assert out["same_tokens"] is True and out["ratio_vs_best_stock"] > 0
    assert 0 < out["miss_path_bandwidth_share"] and out["memory_read_bytes_per_s"] > 0
    assert out["cpu_matmul"] == backend
    o = out["overhead"]
    assert o["calls"] == 23 * 3  # decode steps after the first token x MoE layers of the tiny model
    assert o["experts_forward_us"] > o["expert_math_us"] > o["matmuls_us"] > 0
    assert 0 < o["bookkeeping_us"] < o["overhead_us"]


def test_logit_agreement_tells_rounding_from_a_wrong_expert(tiny_model):
    from engine.model.loader import load_model
    from engine.tools.bench import logit_agreement, stock_model

    engine = load_model(tiny_model, device="cpu", budget="0.5", profile=None)
    stock = stock_model(tiny_model, "eager")
    ids = list(range(5, 29))
    same = logit_agreement(engine, stock, ids, 8)
    assert same["first_divergence"] is None and same["max_logit_diff"] < 1e-3 and same["explained_by_rounding"]
    for name, p in stock.model.named_parameters():  # the wrong experts: every layer's rolled by one
        if "experts" in name and p.dim() == 3:
            p.data = p.data.roll(1, dims=0)
    wrong = logit_agreement(engine, stock, ids, 8)
    assert wrong["max_logit_diff"] > 10 * same["max_logit_diff"] and not wrong["explained_by_rounding"]
