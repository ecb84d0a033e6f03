"""Kernel choices: measured at the first load, remembered per machine and shape, measured again when stale."""

from __future__ import annotations

import json

import pytest
import torch

from engine.moe import kernel_choices
from engine.moe.cpu_experts import CpuExperts


@pytest.fixture
def count_measurements(monkeypatch):
    """Runs the real measurement and counts the calls."""
    calls = []
    real = CpuExperts._measure

    def measure(self, choices, ways):
        calls.append(list(choices))
        return real(self, choices, ways)

    monkeypatch.setattr(CpuExperts, "_measure", measure)
    return calls


def _load(path, **kwargs):
    from engine import load_model

    try:
        return load_model(path, device="cpu", threads=2, profile=None, **kwargs)
    finally:
        torch.set_num_threads(1)


def test_first_load_measures_and_later_loads_remember(tiny_model, count_measurements):
    first = _load(tiny_model).runtime
    assert len(count_measurements) == 1 and first.kernel_choice["remembered"] is False
    times = first.kernel_choice["us_per_step"]
    assert set(times) <= {"torch", "torch split", "torch 1 thread"} and times  # all timed unless far behind
    first.close()
    second = _load(tiny_model).runtime
    assert len(count_measurements) == 1 and second.kernel_choice["remembered"] is True
    chosen = ("backend", "split", "threads")
    assert [second.kernel_choice[k] for k in chosen] == [first.kernel_choice[k] for k in chosen]
    second.close()


def test_a_stale_entry_is_measured_again(tiny_model, count_measurements, monkeypatch):
    _load(tiny_model).runtime.close()
    here = kernel_choices.machine()
    monkeypatch.setattr(kernel_choices, "machine", lambda: {**here, "torch": "99.0"})  # torch upgraded
    rt = _load(tiny_model).runtime
    assert len(count_measurements) == 2 and rt.kernel_choice["remembered"] is False
    rt.close()
    saved = json.loads((kernel_choices.user_data_dir() / kernel_choices.FILE_NAME).read_text())
    assert [e["machine"]["torch"] for e in saved.values()] == ["99.0"]  # replaced, not added


def test_remeasure_on_request_and_a_damaged_file_is_replaced(tiny_model, count_measurements, monkeypatch):
    file = kernel_choices.user_data_dir() / kernel_choices.FILE_NAME
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("{not json")
    _load(tiny_model).runtime.close()
    assert len(count_measurements) == 1 and json.loads(file.read_text())
    monkeypatch.setenv(kernel_choices.REMEASURE_ENV, "1")
    _load(tiny_model).runtime.close()
    assert len(count_measurements) == 2


def test_a_read_only_data_folder_still_loads(tiny_model, count_measurements, monkeypatch):
    monkeypatch.setattr(kernel_choices, "_file", lambda: kernel_choices.Path("/proc/no-such-dir/choices.json"))
    rt = _load(tiny_model).runtime
    assert rt.kernel_choice["remembered"] is False
    rt.close()


def test_the_shape_is_part_of_the_key(tiny_model_factory, count_measurements):
    _load(tiny_model_factory("qwen3_moe")).runtime.close()
    _load(tiny_model_factory("qwen3_moe", hidden=96)).runtime.close()
    assert len(count_measurements) == 2


def test_one_thread_and_one_backend_measure_nothing(tiny_model, count_measurements):
    from engine import load_model

    rt = load_model(tiny_model, device="cpu", threads=1, profile=None).runtime  # the suite pins torch
    assert count_measurements == [] and rt.kernel_choice["backend"] == "torch"
    rt.close()


def test_info_reports_what_was_remembered(tiny_model):
    from engine.model.loader import inspect_model
    from engine.tools.cli import remembered_kernel_choices

    info = inspect_model(tiny_model)
    assert remembered_kernel_choices(info) == {}
    _load(tiny_model).runtime.close()
    assert set(remembered_kernel_choices(info)) == {"source, 2 threads"}


def test_dense_activation_is_remembered(tiny_model, monkeypatch):
    from engine.moe import quantize

    monkeypatch.delenv("MOE_CHAT_CPU_MATMUL")
    calls = []
    real = quantize.fastest_activation
    monkeypatch.setattr(quantize, "fastest_activation", lambda *a: calls.append(1) or real(*a))
    for _ in range(2):
        _load(tiny_model, experts="int8", dense="int8").runtime.close()
    assert len(calls) == 1


def test_layout_is_measured_once_and_picked_per_product(monkeypatch):
    from engine.moe import cpu_layout

    monkeypatch.delenv(cpu_layout.LAYOUT_ENV)
    calls = []
    times = {"us_per_matrix": {"in-out mm": 10.0, "out-in mm": 9.8, "out-in mv": 3.0}}
    monkeypatch.setattr(cpu_layout, "_measure", lambda *a: calls.append(a) or times)
    assert cpu_layout.one_row_layout(torch.bfloat16, 64, 32) == ("out-in", "mv")
    assert cpu_layout.one_row_layout(torch.bfloat16, 64, 32) == ("out-in", "mv")
    assert len(calls) == 1
    times["us_per_matrix"] = {"in-out mm": 10.0, "out-in mm": 9.8, "out-in mv": 9.9}  # not 5% off: in-out
    assert cpu_layout.one_row_layout(torch.float16, 64, 32) == ("in-out", "mm")
    monkeypatch.setenv(cpu_layout.LAYOUT_ENV, "out-in")
    assert cpu_layout.one_row_layout(torch.bfloat16, 64, 32) == ("out-in", "mm")


def test_layout_measurement_times_every_product():
    from engine.moe.cpu_layout import _measure

    assert set(_measure(torch.float32, 32, 16)["us_per_matrix"]) == {"in-out mm", "out-in mm", "out-in mv"}


@pytest.mark.parametrize("b_transposed", [True, False], ids=["linear or [out, in] experts", "[in, out] experts"])
def test_laid_out_gives_b_the_layout_asked(b_transposed):
    from engine.moe.cpu_layout import laid_out

    t = torch.randn(3, 6, 4)
    for layout in ("in-out", "out-in"):
        held = laid_out(t, b_transposed, layout)
        b = held.transpose(-1, -2) if b_transposed else held
        assert torch.equal(held, t)
        assert b[0].is_contiguous() is (layout == "in-out") and b[0].T.is_contiguous() is (layout == "out-in")


def test_timings_stream_twice_the_last_level_cache(tmp_path, monkeypatch):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert kernel_choices.last_level_cache_bytes(tmp_path) == 480 * 2**20
    assert kernel_choices.last_level_cache_bytes(tmp_path / "none", default=7) == 7
    monkeypatch.setattr(kernel_choices, "last_level_cache_bytes", lambda: 480 * 2**20)
    assert kernel_choices.bytes_past_cache() == 960 * 2**20
    monkeypatch.setattr(kernel_choices, "last_level_cache_bytes", lambda: 2**20)
    assert kernel_choices.bytes_past_cache() == 64 * 2**20  # at least 64 MiB
    monkeypatch.setattr(kernel_choices, "last_level_cache_bytes", lambda: 2**31)
    assert kernel_choices.bytes_past_cache() == 2**30  # at most 1 GiB

