"""The SSD tier: quantized experts that do not fit the free RAM page in from the saved copy, memory-mapped,
instead of the model being refused; refused, with the numbers, when even the rest of it does not fit.

The free RAM is what `$MOE_CHAT_AVAILABLE_RAM` says, so a tiny model can be made not to fit."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest

from engine import Session, load_model
from engine.errors import InsufficientMemoryError
from engine.model import quantized_copy
from engine.model.loader import AVAILABLE_RAM_ENV, RAM_HEADROOM, inspect_model
from test_equivalence import engine_tokens

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _free_ram_between(info, fmt: str) -> int:
    """Free RAM in which `fmt` does not fit whole, but does with its experts paged in from the disk."""
    f = info.formats("cpu")[fmt]
    assert f["can_page"] and f["paged_ram_needed_bytes"] < f["ram_needed_bytes"]
    return int((f["paged_ram_needed_bytes"] + f["ram_needed_bytes"]) / 2 / RAM_HEADROOM)


def _expert_tensors(loaded) -> list:
    return [t for m in loaded.runtime.modules for n, t in m._moe_tensors.items() if n.endswith((".q", ".scale"))]


@linux
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_experts_that_do_not_fit_page_in_from_the_copy(tiny_model_factory, monkeypatch, fmt):
    from engine.model import loader
    from engine.tools.cli import _stats

    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", f"{fmt}-bf16")
    path = tiny_model_factory("qwen3_moe")
    ram = load_model(path, device="cpu", profile=None, experts=fmt, save_copy=False)  # held in RAM, no copy
    expected = engine_tokens(Session(ram))
    folder = quantized_copy.copy_dir(path, fmt)
    assert not ram.experts_paged and not folder.exists()
    assert not any(quantized_copy.is_mapped(t, folder.parent) for t in _expert_tensors(ram))

    info = inspect_model(path)
    monkeypatch.setenv(AVAILABLE_RAM_ENV, str(_free_ram_between(info, fmt)))
    calls = []
    real = loader.quantize_stack
    monkeypatch.setattr(loader, "quantize_stack", lambda *a: (calls.append(a[1]), real(*a)))
    for first in (True, False):  # quantized into the copy while reading; then read from the copy
        loaded = load_model(path, device="cpu", profile=None, experts=fmt)
        assert (loaded.experts, loaded.experts_paged) == (fmt, True)
        assert bool(calls) == first and (folder / quantized_copy.MANIFEST).exists()
        calls.clear()
        tensors = _expert_tensors(loaded)
        assert tensors and all(quantized_copy.is_mapped(t, folder) for t in tensors)  # pages of the file on disk
        assert engine_tokens(Session(loaded)) == expected
        snap = loaded.runtime.snapshot()  # what the app's memory panel gets
        assert snap["experts_paged"] and snap["experts_on_disk_bytes"] == info.formats("cpu")[fmt]["expert_bytes_total"]
        assert snap["ram_available_bytes"] == int(os.environ[AVAILABLE_RAM_ENV])
        stats = _stats(loaded, {})  # `generate --json`
        assert stats["experts_paged"] and stats["experts"] == fmt and stats["experts_on_disk_bytes"] > 0


def test_auto_picks_a_format_that_fits_else_pages_the_smallest(tiny_model_factory, monkeypatch):
    path = tiny_model_factory("qwen3_moe")
    info = inspect_model(path)
    d = info.to_dict()
    assert (d["auto_experts"], d["experts_paged"]) == ("source", False)
    formats = info.formats("cpu")
    monkeypatch.setenv(AVAILABLE_RAM_ENV, str(int(formats["int8"]["ram_needed_bytes"] / RAM_HEADROOM) + 1))
    assert info.auto_choice("cpu") == ("int8", False)  # int8 fits whole: not paged
    monkeypatch.setenv(AVAILABLE_RAM_ENV, str(_free_ram_between(info, "int4")))
    d = info.to_dict()
    assert (d["auto_experts"], d["experts_paged"]) == ("int4", True)  # nothing fits whole: the fewest bytes to page
    estimate = info.memory_estimate("cpu", experts="int4", dense="int4", paged=True)
    assert estimate["experts_paged"] and estimate["experts_on_disk_bytes"] == formats["int4"]["expert_bytes_total"]
    assert estimate["expert_ram_bytes"] < estimate["experts_on_disk_bytes"]
    loaded = load_model(path, device="cpu", profile=None)
    assert (loaded.experts, loaded.dense, loaded.experts_paged) == ("int4", "int4", True)
    assert engine_tokens(Session(loaded))


def test_info_json_says_paged(tiny_model_factory, monkeypatch, capsys):
    import json

    from engine.tools.cli import main

    path = tiny_model_factory("qwen3_moe")
    monkeypatch.setenv(AVAILABLE_RAM_ENV, str(_free_ram_between(inspect_model(path), "int4")))
    main(["info", "--model", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["experts_paged"] and out["auto_experts"] == "int4"
    assert out["memory_estimate"]["cpu"]["experts_paged"] and out["formats"]["int4"]["fits_paged"]
    assert not out["formats"]["int4"]["fits_ram"] and not out["formats"]["source"]["can_page"]


def test_refused_with_the_numbers_when_even_paged_it_does_not_fit(tiny_model_factory, monkeypatch):
    path = tiny_model_factory("qwen3_moe")
    info = inspect_model(path)
    paged = info.formats("cpu")["int8"]["paged_ram_needed_bytes"]
    monkeypatch.setenv(AVAILABLE_RAM_ENV, str(paged // 2))  # not even the dense weights and the KV cache
    with pytest.raises(InsufficientMemoryError) as e:
        load_model(path, device="cpu", profile=None, experts="int8")
    message = str(e.value)
    assert "does not fit even with its int8 experts" in message and "paged in from the disk" in message
    assert f"{paged / 2**30:.1f} GiB of RAM" in message and f"only {paged // 2 / 2**30:.1f} GiB is free" in message
    with pytest.raises(InsufficientMemoryError, match=r"GiB with int4 experts paged in from the disk, but only"):
        load_model(path, device="cpu", profile=None)  # auto: every format's numbers
    assert not quantized_copy.copy_dir(path, "int8").exists()


def test_disk_full_while_paging_refuses_and_leaves_nothing(tiny_model_factory, monkeypatch):
    import errno

    def full(tensors, file):
        file.write_bytes(b"\x00" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantized_copy, "_write", full)
    path = tiny_model_factory("qwen3_moe")
    monkeypatch.setenv(AVAILABLE_RAM_ENV, str(_free_ram_between(inspect_model(path), "int8")))
    with pytest.raises(InsufficientMemoryError, match="do not fit the .* free RAM, so they would page in from a "
                                                      "copy on the disk, but it could not be written .*No space left"):
        load_model(path, device="cpu", profile=None, experts="int8")
    folder = quantized_copy.copy_dir(path, "int8")
    assert not folder.exists()


def test_first_load_maps_the_copy_it_writes(tiny_model_factory, monkeypatch):
    """Fitting the RAM or not, a first load writes each quantized parameter to the copy as it reads and
    keeps only its mapped view: the quantized experts are never all in the process's own memory."""
    monkeypatch.setenv("MOE_CHAT_CPU_MATMUL", "int8-bf16")
    path = tiny_model_factory("mixtral")
    loaded = load_model(path, device="cpu", profile=None, experts="int8")
    folder = quantized_copy.copy_dir(path, "int8")
    assert not loaded.experts_paged and (folder / quantized_copy.MANIFEST).exists()
    if sys.platform.startswith("linux"):
        assert all(quantized_copy.is_mapped(t, folder) for t in _expert_tensors(loaded))
    assert "experts_paged" not in loaded.runtime.snapshot()


def test_memory_panel_says_the_experts_page_in_from_the_ssd(qtbot):
    from app.panels import PAGED_NOTICE, MemoryPanel

    panel = MemoryPanel()
    qtbot.addWidget(panel)
    panel.show()
    snap = {"has_runtime": True, "simulated_cache": True, "experts": "int4", "rss_bytes": 2**30,
            "cache_bytes": 0, "budget_bytes": 0, "device_total_bytes": 2**34}
    panel.update_stats(snap)
    assert not panel.notice.isVisible()
    panel.update_stats({**snap, "experts_paged": True, "experts_on_disk_bytes": 40 * 2**30,
                        "ram_available_bytes": 12 * 2**30})
    assert panel.notice.isVisible() and PAGED_NOTICE in panel.notice.text()
    assert "slower" in panel.notice.text() and "40.0 GiB" in panel.notice.text() and "12.0 GiB" in panel.notice.text()
    panel.update_stats({"rss_bytes": 2**20})  # the model went away
    assert not panel.notice.isVisible()


def test_load_memory_tool_measures_a_first_load(tiny_model_factory, tmp_path):
    """`python -m engine.tools.load_memory`: the numbers of one first load, in a fresh process (no
    assertion on them: they depend on the machine)."""
    from engine.tools.load_memory import measure, report

    row = measure(tiny_model_factory("qwen3_moe"), "int8", data_dir=tmp_path / "data")
    assert row["experts"] == "int8" and not row["experts_paged"]
    assert row["total_bytes"] == row["dense_bytes"] + row["expert_bytes"] and row["expert_bytes"] > 0
    assert row["peak_rss_bytes"] >= row["rss_before_bytes"] > 0
    assert (tmp_path / "data" / "quantized").is_dir()  # its copy went to the data folder it was given
    assert "(peak - before) / model" in report(row, "first load")
