"""The model picker on the real engine catalog: list, add a folder, load, cancel, and broken folders."""

from __future__ import annotations

import shutil

from app.settings import Key

def open_picker(qtbot, window):
    with qtbot.waitSignal(window.client.models_listed, timeout=30_000):
        picker = window.open_model_picker()
    assert picker.isVisible()
    return picker


def add_folder(qtbot, picker, folder) -> dict | None:
    with qtbot.waitSignal(picker.client.models_listed, timeout=30_000):
        picker.add_folder(str(folder))
    return picker.selected_model()


def test_picker_lists_a_folder_and_loads_it(qtbot, window, tiny_model_factory, send):
    other = tiny_model_factory("mixtral")
    picker = open_picker(qtbot, window)
    row = add_folder(qtbot, picker, other)
    assert row is not None and row["origin"] == "folder" and not row["error"]
    assert row["num_experts"] == 8 and row["top_k"] == 2 and row["disk_bytes"] > 0
    r = picker.table.currentRow()
    cells = [picker.table.item(r, c).text() for c in range(picker.table.columnCount())]
    assert cells[4] == "8 × 3" and cells[5] == "2" and cells[7].startswith("yes")
    assert cells[8].endswith("experts)")  # what the current budget would cache
    assert window.settings.value(Key.EXTRA_MODEL_DIRS) == [str(other)]
    with qtbot.waitSignal(window.client.model_loaded, timeout=60_000) as loaded:
        picker.load_selected()
        assert picker.progress.isVisible() and picker.cancel_button.isVisible()
    assert loaded.args[1]["source"] == str(other)
    qtbot.waitUntil(lambda: not picker.isVisible(), timeout=3000)
    assert window.settings.value(Key.MODEL_SOURCE) == str(other)
    assert window.model_button.text().startswith(other.name)
    assert window.budget_bar.total_experts == 8 * 3
    assert send(window, "hello")["finish_reason"] in ("length", "eos")
    # the added folder is remembered next time
    again = open_picker(qtbot, window)
    assert any(m["source"] == str(other) for m in again.models)
    again.reject()


def test_hugging_face_cache_models_are_named_by_repo_id(qtbot, window, tiny_model, hf_cache):
    repo = hf_cache / "models--tiny-org--tiny-moe"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    (repo / "blobs").mkdir()
    picker = open_picker(qtbot, window)
    names = {m["name"]: m for m in picker.models}
    assert "tiny-org/tiny-moe" in names, list(names)
    assert names["tiny-org/tiny-moe"]["origin"] == "hf-cache"
    picker.reject()


def test_broken_folder_gives_a_clear_message_and_keeps_the_model(qtbot, window, tmp_path, send):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    before = window.client.model_info["source"]
    picker = open_picker(qtbot, window)
    row = add_folder(qtbot, picker, broken)
    assert row is not None and row["error"]
    assert picker.error_label.isVisible() and "config.json" in picker.error_label.text()
    picker.load_selected()  # refused in the dialog, nothing is sent to the engine
    assert picker.load_id is None and "current model keeps running" in picker.error_label.text()
    assert picker.isVisible()
    # a folder that looks fine until it is loaded fails inside the dialog too
    truncated = tmp_path / "truncated"
    shutil.copytree(window.client.model_info["path"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    row = add_folder(qtbot, picker, truncated)
    if row["error"]:  # caught by the catalog's header check
        picker.load_selected()
    else:
        with qtbot.waitSignal(window.client.load_failed, timeout=30_000):
            picker.load_selected()
    assert picker.error_label.isVisible()
    assert "model.safetensors" in picker.error_label.text()  # names the bad file
    assert "current model keeps running" in picker.error_label.text()
    picker.reject()
    assert window.client.model_info["source"] == before
    assert send(window, "still here?")["finish_reason"] in ("length", "eos")


def test_cancel_loading_in_the_dialog(qtbot, window, tiny_model_factory):
    other = tiny_model_factory("olmoe")
    before = window.client.model_info["source"]
    picker = open_picker(qtbot, window)
    add_folder(qtbot, picker, other)
    with qtbot.waitSignal(window.client.load_failed, timeout=30_000) as failed:
        picker.load_selected()
        picker.cancel_load()
    assert failed.args[2] is True
    assert "cancelled" in picker.status_label.text() and picker.isVisible()
    assert picker.load_button.isEnabled()
    assert window.client.model_info["source"] == before
    picker.reject()
