"""Load, fail, load again, many times: the hunt for a rare SIGSEGV in libshiboken6 (issue 15).

A crash was seen once while loading a model right after a load had failed, and once inside
`QListWidget.clear()`. This loop drives the same paths through the real window and engine: a good
load, a broken folder, the model picker opened and closed (its table is refilled), a new chat (the
sidebar's list is cleared), then the good model again. The normal suite runs a few rounds; for the
hunt run many under the debug allocator, which turns a use-after-free into a crash sooner:

    MOE_CHAT_LOAD_LOOP=200 PYTHONMALLOC=debug QT_QPA_PLATFORM=offscreen \\
        python -X faulthandler -m pytest -q tests/app/test_app_startup_load_loop.py
"""

from __future__ import annotations

import gc
import os
import shutil

from PySide6.QtCore import QCoreApplication, QEvent

ROUNDS = int(os.environ.get("MOE_CHAT_LOAD_LOOP", "5"))
TIMEOUT_MS = 60_000


def _flush_deletes() -> None:
    """Run pending deleteLater()s now, so a dangling wrapper would be touched inside this round."""
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    gc.collect()


def test_load_fail_load_loop(qtbot, make_window, tiny_model, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json", encoding="utf-8")
    window = make_window()
    client = window.client
    for round_no in range(ROUNDS):
        with qtbot.waitSignal(client.load_failed, timeout=TIMEOUT_MS) as failed:
            window.load_model(str(broken))
        assert "config.json" in failed.args[1], f"round {round_no}: {failed.args[1]}"
        assert client.model_info is not None  # the good model keeps running

        with qtbot.waitSignal(client.models_listed, timeout=TIMEOUT_MS):
            picker = window.open_model_picker()
        with qtbot.waitSignal(client.models_listed, timeout=TIMEOUT_MS):
            picker.refresh()
        picker.reject()
        _flush_deletes()
        assert window.picker is None

        window.new_conversation()
        with qtbot.waitSignal(client.model_loaded, timeout=TIMEOUT_MS) as loaded:
            window.load_model(str(tiny_model))
        assert loaded.args[1]["path"] == str(tiny_model)
        _flush_deletes()

        # back to back: the good load is asked for before the broken one has failed
        with qtbot.waitSignal(client.model_loaded, timeout=TIMEOUT_MS):
            window.load_model(str(broken))
            window.load_model(str(tiny_model))
        _flush_deletes()
    assert window.client.model_info is not None and window.isVisible()


def _select(picker, folder) -> None:
    rows = [i for i, m in enumerate(picker.models) if m.get("path") == str(folder) or m.get("source") == str(folder)]
    assert rows, [m.get("path") for m in picker.models]
    picker.table.selectRow(rows[0])


def test_load_fail_load_loop_through_the_picker(qtbot, make_window, tiny_model, tmp_path):
    """The picker's own paths: a folder it refuses (cut weights), a load cancelled at once, then a good load."""
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    window = make_window()
    client = window.client
    cancelled = 0
    for round_no in range(ROUNDS):
        with qtbot.waitSignal(client.models_listed, timeout=TIMEOUT_MS):
            picker = window.open_model_picker()
        for folder in (tiny_model, truncated):  # remembered after the first round: listed at open
            with qtbot.waitSignal(client.models_listed, timeout=TIMEOUT_MS):
                picker.add_folder(str(folder))
        _select(picker, truncated)
        picker.load_selected()  # refused in the dialog: the catalog already found the cut file
        assert picker.isVisible() and picker.error_label.isVisible(), f"round {round_no}"

        _select(picker, tiny_model)
        picker.load_selected()
        picker.cancel_load()  # the load fails as cancelled, unless it was quicker than the cancel
        qtbot.waitUntil(lambda: picker.load_id is None, timeout=TIMEOUT_MS)
        if picker.isVisible():
            cancelled += 1
            _select(picker, tiny_model)
            with qtbot.waitSignal(client.model_loaded, timeout=TIMEOUT_MS):
                picker.load_selected()
        qtbot.waitUntil(lambda: window.picker is None, timeout=TIMEOUT_MS)  # accepted, then deleteLater
        _flush_deletes()
        window.sidebar.refresh()  # QListWidget.clear() right after the dialog went
    assert client.model_info is not None and window.isVisible()
    print(f"{ROUNDS} rounds, {cancelled} loads cancelled in time")
