"""`python -m engine`: every bad value is refused before a model loads, with one JSON error under --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import engine.model.loader as loader
from engine.tools.cli import main

BAD_VALUES = [
    (["--budget", "5"], "no unit", "5GiB"),
    (["--budget", "-1"], "negative", "512MiB"),
    (["--budget", "nonsense"], "not a cache budget", "512MiB"),
    (["--threads", "-3"], "--threads -3", "physical core"),
    (["--threads", "0"], "--threads 0", "physical core"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0", "at least one"),
    (["--max-new-tokens", "-5"], "--max-new-tokens -5", "at least one"),
    (["--temperature", "-1"], "--temperature -1", "0.7"),
    (["--top-p", "5"], "--top-p 5", "(0, 1]"),
    (["--top-p", "0"], "--top-p 0", "(0, 1]"),
    (["--top-k", "-1"], "--top-k -1", "top-k off"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0", "turns the penalty off"),
]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything tries to load or inspect a model: values are checked first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the values were checked")

    monkeypatch.setattr(loader, "load_model", refuse)
    monkeypatch.setattr(loader, "inspect_model", refuse)


@pytest.mark.parametrize("flags,error,hint", BAD_VALUES, ids=[" ".join(f) for f, _, _ in BAD_VALUES])
def test_bad_value_is_one_json_error_and_exit_2(flags, error, hint, tiny_model, capsys, no_loading):
    code = main(["generate", "--model", str(tiny_model), "--prompt", "Hi", "--json", *flags])
    out, err = capsys.readouterr()
    assert code == 2
    obj = json.loads(out)  # exactly one JSON object on stdout
    assert set(obj) == {"error", "hint"} and out.count("\n") == 1
    assert error in obj["error"] + obj["hint"] and hint in obj["error"] + obj["hint"], obj
    assert "Traceback" not in err


@pytest.mark.parametrize("flags,error,hint", BAD_VALUES[:4], ids=[" ".join(f) for f, _, _ in BAD_VALUES[:4]])
def test_bad_value_without_json_is_a_message_on_stderr(flags, error, hint, tiny_model, capsys, no_loading):
    assert main(["generate", "--model", str(tiny_model), "--prompt", "Hi", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and error in err and "hint: " in err


@pytest.mark.parametrize("prompt", [["--prompt", ""], ["--prompt", "   "], ["--prompt-ids", ""],
                                    ["--prompt-ids", "1,x"]])
def test_empty_prompt_is_refused(prompt, tiny_model, capsys, no_loading):
    assert main(["generate", "--model", str(tiny_model), "--json", *prompt]) == 2
    obj = json.loads(capsys.readouterr().out)
    assert "prompt" in obj["error"] and obj["hint"]


@pytest.mark.parametrize("argv,words", [
    (["generate", "--json"], "--prompt"),  # a required argument missing
    (["generate", "--prompt", "Hi", "--threads", "abc", "--json"], "invalid int value"),
    (["frobnicate", "--json"], "invalid choice"),
    (["generate", "--prompt", "Hi", "--no-such-flag", "--json"], "unrecognized arguments"),
])
def test_argparse_errors_are_json_too(argv, words, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert words in obj["error"] and "--help" in obj["hint"]
    assert "error: " in err


def test_argparse_error_without_json_keeps_exit_2_and_no_stdout(capsys):
    assert main(["generate", "--threads", "abc", "--prompt", "x"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "invalid int value" in err


def test_huge_budget_is_clamped_with_a_warning(tiny_model, capsys, caplog):
    assert main(["generate", "--model", str(tiny_model), "--prompt-ids", "1,2", "--max-new-tokens", "1",
                 "--device", "cpu", "--budget", "999TiB", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert 0 < stats["budget_bytes"] < 2**40
    assert any("999TiB" in r.getMessage() and "more than" in r.getMessage() for r in caplog.records)


def test_model_errors_carry_a_hint(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path / "missing"), "--json"]) == 2
    obj = json.loads(capsys.readouterr().out)
    assert "neither a folder" in obj["error"] and "--model" in obj["hint"]


def test_real_process_prints_json_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "engine", "generate", "--prompt", "Hi", "--budget", "5", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "5GiB" in json.loads(proc.stdout)["hint"]
