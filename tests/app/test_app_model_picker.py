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


def _copy_with_config(src, dst, **changes):
    import json

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_config_is_listed_with_its_reason_not_as_a_dense_model(qtbot, window, tmp_path):
    before = window.client.model_info["source"]
    bad = _copy_with_config(window.client.model_info["path"], tmp_path / "negative_layers", num_hidden_layers=-1)
    picker = open_picker(qtbot, window)
    row = add_folder(qtbot, picker, bad)
    assert row is not None and "num_hidden_layers is -1" in row["error"]
    r = picker.table.currentRow()
    cells = [picker.table.item(r, c).text() for c in range(picker.table.columnCount())]
    assert cells[0].startswith("⚠") and cells[2] == "cannot be loaded" and "dense" not in cells
    assert picker.error_label.isVisible() and "num_hidden_layers is -1" in picker.error_label.text()
    picker.load_selected()
    assert picker.load_id is None and "current model keeps running" in picker.error_label.text()
    picker.reject()
    assert window.client.model_info["source"] == before


def test_remote_code_opt_in_is_per_folder_off_by_default_and_asks_first(qtbot, window, tmp_path, monkeypatch):
    from engine.model import catalog

    folder = _copy_with_config(window.client.model_info["path"], tmp_path / "ships_code_picker",
                               auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "configuration_custom.py").write_text(
        "from transformers import Qwen3MoeConfig\n\n\nclass CustomConfig(Qwen3MoeConfig):\n    pass\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import Qwen3MoeForCausalLM\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(Qwen3MoeForCausalLM):\n    config_class = CustomConfig\n")
    picker = open_picker(qtbot, window)
    row = add_folder(qtbot, picker, folder)
    assert row is not None and not row["error"] and row["ships_code"] and not row["trust_remote_code"]
    assert picker.note_label.isVisible() and "runs the built-in implementation of qwen3_moe" in picker.note_label.text()
    assert "enable remote code only if you trust it" in picker.note_label.text()
    assert picker.remote_code_box.isVisible() and not picker.remote_code_box.isChecked()
    assert picker.remote_code_warning.isVisible() and "trust" in picker.remote_code_warning.text()
    r = picker.table.currentRow()
    assert picker.table.item(r, 2).text().endswith("built-in code")

    monkeypatch.setattr(picker, "confirm_remote_code", lambda m: False)  # the user says no
    picker.remote_code_box.click()
    assert not picker.remote_code_box.isChecked() and not catalog.remote_code_trusted(folder)

    monkeypatch.setattr(picker, "confirm_remote_code", lambda m: True)
    with qtbot.waitSignal(picker.client.models_listed, timeout=30_000):
        picker.remote_code_box.click()
    assert catalog.remote_code_trusted(folder)
    row = picker.selected_model()
    assert row["trust_remote_code"] and picker.remote_code_box.isChecked()
    assert "you allowed it to run" in picker.note_label.text()
    assert picker.table.item(picker.table.currentRow(), 2).text().endswith("its own code")
    with qtbot.waitSignal(window.client.model_loaded, timeout=60_000) as loaded:
        picker.load_selected()
    assert loaded.args[1]["runs_own_code"] is True
    # a plain folder shows no opt-in at all
    again = open_picker(qtbot, window)
    plain = next(m for m in again.models if not m.get("ships_code"))
    again.table.selectRow(again.models.index(plain))
    assert not again.remote_code_box.isVisible() and not again.note_label.isVisible()
    again.reject()


def test_experts_all_of_the_wrong_shape_are_listed_as_not_loadable(qtbot, window, tmp_path):
    """Every expert of every layer alike but not as config.json says: caught from the headers, not at load."""
    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "resized_experts"
    shutil.copytree(window.client.model_info["path"], bad)
    tensors = load_file(bad / "model.safetensors")
    for key, t in list(tensors.items()):
        if ".experts." in key and key.endswith(".weight"):
            tensors[key] = torch.zeros(t.shape[0], 48) if "down_proj" in key else torch.zeros(48, t.shape[1])
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    before = window.client.model_info["source"]
    picker = open_picker(qtbot, window)
    row = add_folder(qtbot, picker, bad)
    assert row is not None and "intermediate size 32" in row["error"] and "experts.0." in row["error"]
    r = picker.table.currentRow()
    assert picker.table.item(r, 2).text() == "cannot be loaded"
    assert picker.error_label.isVisible() and "config.json implies" in picker.error_label.text()
    picker.load_selected()
    assert picker.load_id is None
    picker.reject()
    assert window.client.model_info["source"] == before
