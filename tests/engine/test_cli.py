"""`python -m engine`: the JSON shapes other tools rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.tools.cli import main


def run_json(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_generate_json_shape(tiny_model, capsys):
    r = run_json(capsys, "generate", "--model", str(tiny_model), "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "5", "--budget", "0.5", "--device", "cpu", "--json")
    assert set(r) == {"token_ids", "text", "stats"}
    assert len(r["token_ids"]) >= 1 and isinstance(r["text"], str)
    s = r["stats"]
    for key in ("hit_rate", "hits", "misses", "per_layer", "prefill_tokens_per_s", "decode_tokens_per_s",
                "peak_fast_device_bytes", "peak_rss_bytes"):
        assert key in s
    assert [row["layer"] for row in s["per_layer"]] == [0, 1, 2]
    assert all({"layer", "hits", "misses"} <= set(row) for row in s["per_layer"])


def test_generate_chat_and_sampling_flags(tiny_model, capsys):
    args = ["generate", "--model", str(tiny_model), "--prompt", "Hello", "--chat", "--max-new-tokens", "4",
            "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3", "--policy", "lfu",
            "--budget", "64KiB", "--json"]
    a = run_json(capsys, *args)
    b = run_json(capsys, *args)
    assert a["token_ids"] == b["token_ids"] and a["stats"]["policy"] == "lfu"


def test_info_json(tiny_model, capsys):
    r = run_json(capsys, "info", "--model", str(tiny_model), "--json")
    assert r["num_moe_layers"] == 3 and r["num_experts"] == 8 and r["top_k"] == 2
    assert {"expert_bytes", "dense_bytes", "memory_estimate"} <= set(r)


def test_bad_model_is_one_json_error_and_exit_2(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path), "--json"]) == 2
    captured = capsys.readouterr()
    assert "empty" in json.loads(captured.out)["error"] and "error:" in captured.err


def test_stdout_is_exactly_one_json_object(tiny_model):
    """Run as a real process: logs and progress must stay on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(tiny_model), "--prompt", "Hi",
         "--max-new-tokens", "3", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    assert proc.stdout.count("\n") == 1


def test_profile_command(tiny_model, capsys, tmp_path):
    out = tmp_path / "p.json"
    r = run_json(capsys, "profile", "--model", str(tiny_model), "--max-new-tokens", "3", "--out", str(out), "--json")
    assert r["profile"] == str(out) and r["prompts"] == 8 and 0.25 <= r["top_quarter_token_share"] <= 1
    counts = json.loads(out.read_text())["counts"]
    assert len(counts) == 3 and sum(map(sum, counts)) > 0


def test_weight_formats_on_the_command_line(tiny_model, capsys):
    r = run_json(capsys, "info", "--model", str(tiny_model), "--json")
    assert set(r["formats"]) == {"source", "int8", "int4"} and r["auto_experts"] == "source"
    assert all({"expert_bytes", "ram_needed_bytes", "fits_ram"} <= set(v) for v in r["formats"].values())
    g = run_json(capsys, "generate", "--model", str(tiny_model), "--prompt-ids", "1,2,3", "--max-new-tokens", "3",
                 "--device", "cpu", "--experts", "int4", "--dense", "int8", "--json")
    assert (g["stats"]["experts"], g["stats"]["dense"]) == ("int4", "int8")
    q = run_json(capsys, "quantize", "--model", str(tiny_model), "--experts", "int8", "--json")
    assert q["experts"] == "int8" and q["copy"] and (Path(q["copy"]) / "manifest.json").exists()
