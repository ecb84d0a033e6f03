"""A folder's own Python code ("remote code", config.json's auto_map) runs only on an explicit opt-in:
--trust-remote-code / trust_remote_code=True, or the user's saved per-folder choice from the model picker."""

from __future__ import annotations

import json
import logging
import secrets
import shutil

import pytest

from engine import ModelError, inspect_model, load_model
from engine.model import catalog
from engine.model.loader import _without_hub_links
from engine.tools.cli import main

CONFIG_CODE = "from transformers import Qwen3MoeConfig\n\n\nclass CustomConfig(Qwen3MoeConfig):\n    pass\n"
MODEL_CODE = (
    "from pathlib import Path\n"
    "from transformers import Qwen3MoeForCausalLM\n"
    "from .configuration_custom import CustomConfig\n"
    "Path({marker!r}).touch()\n\n\n"
    "class CustomForCausalLM(Qwen3MoeForCausalLM):\n    config_class = CustomConfig\n"
)
AUTO_MAP = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}


def make_code_folder(tiny_model, tmp_path, **config):
    """The tiny model plus code of its own; a fresh folder name each time, since transformers caches a
    folder's modules by name for the life of the process. Returns (folder, marker the code touches)."""
    folder = tmp_path / f"custom_{secrets.token_hex(4)}"
    shutil.copytree(tiny_model, folder)
    marker = tmp_path / f"{folder.name}.ran"
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update({"auto_map": AUTO_MAP, **config})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_custom.py").write_text(CONFIG_CODE)
    (folder / "modeling_custom.py").write_text(MODEL_CODE.format(marker=str(marker)))
    return folder, marker


def test_known_type_runs_the_built_in_code_and_says_so(tiny_model, tmp_path, caplog):
    folder, marker = make_code_folder(tiny_model, tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = load_model(folder, device="cpu", profile=None)
    assert type(loaded.model).__name__ == "Qwen3MoeForCausalLM" and not marker.exists()
    note = (f"{folder.name} ships its own code; MoE Chat runs the built-in implementation of qwen3_moe; "
            "enable remote code only if you trust it")
    assert loaded.info.ships_code and not loaded.info.runs_own_code and loaded.info.code_note == note
    assert note in caplog.text


def test_opting_in_runs_the_folders_code(tiny_model, tmp_path):
    folder, marker = make_code_folder(tiny_model, tmp_path)
    loaded = load_model(folder, device="cpu", profile=None, trust_remote_code=True)
    assert type(loaded.model).__name__ == "CustomForCausalLM" and marker.exists()
    assert loaded.info.runs_own_code and "you allowed it to run" in loaded.info.code_note
    assert loaded.runtime is not None  # still the hybrid engine: the class keeps transformers' experts


def test_the_saved_per_folder_choice_is_off_by_default_and_explicit_false_wins(tiny_model, tmp_path):
    folder, marker = make_code_folder(tiny_model, tmp_path)
    assert not catalog.remote_code_trusted(folder) and not inspect_model(folder).runs_own_code
    catalog.set_remote_code_trusted(folder, True)
    assert catalog.remote_code_trusted(folder)
    assert not inspect_model(folder, trust_remote_code=False).runs_own_code and not marker.exists()
    assert inspect_model(folder).runs_own_code and marker.exists()
    catalog.set_remote_code_trusted(folder, False)
    assert not inspect_model(folder).runs_own_code


def test_a_damaged_trust_file_trusts_nothing(tiny_model, tmp_path):
    folder, marker = make_code_folder(tiny_model, tmp_path)
    catalog.set_remote_code_trusted(folder, True)
    catalog._trust_file().write_text("{ damaged")
    assert not catalog.remote_code_trusted(folder) and not inspect_model(folder).runs_own_code


def test_unknown_type_is_refused_without_opt_in_and_listed_with_the_reason(tiny_model, tmp_path):
    folder, marker = make_code_folder(tiny_model, tmp_path, model_type="custom_moe")
    with pytest.raises(ModelError) as err:
        load_model(folder, device="cpu", profile=None)
    assert "never runs" in str(err.value) and "--trust-remote-code" in str(err.value) and not marker.exists()
    (entry,) = [e for e in catalog.list_models([str(folder)]) if e["origin"] == "folder"]
    assert entry["error"] and entry["ships_code"] and not entry["trust_remote_code"]
    assert "runs only with remote code enabled" in entry["code_note"]


def test_missing_code_file_is_named_without_a_hub_link(tiny_model, tmp_path):
    folder, _ = make_code_folder(tiny_model, tmp_path, model_type="custom_moe")
    (folder / "configuration_custom.py").unlink()
    with pytest.raises(ModelError) as err:
        inspect_model(folder, trust_remote_code=True)
    assert "configuration_custom.py" in str(err.value) and "huggingface.co" not in str(err.value)


def test_code_in_another_repository_is_never_fetched(tiny_model, tmp_path):
    folder, _ = make_code_folder(tiny_model, tmp_path, model_type="custom_moe",
                                 auto_map={"AutoConfig": "acme/other--configuration_custom.CustomConfig"})
    with pytest.raises(ModelError, match="never downloads code"):
        inspect_model(folder, trust_remote_code=True)


def test_hub_links_to_a_local_folder_are_dropped():
    text = ("/tmp/x does not appear to have a file named configuration_x.py. Checkout "
            "'https://huggingface.co//tmp/x/tree/main' for available files.")
    assert _without_hub_links(text) == "/tmp/x does not appear to have a file named configuration_x.py."
    text = ("The repository /tmp/x contains custom code. You can inspect the repository content at "
            "https://hf.co//tmp/x.\nPlease pass the argument `trust_remote_code=True`.")
    assert "hf.co" not in _without_hub_links(text)


def test_cli_flag_is_the_only_opt_in_there(tiny_model, tmp_path, capsys):
    folder, marker = make_code_folder(tiny_model, tmp_path)
    catalog.set_remote_code_trusted(folder, True)  # the app's choice does not carry over to the CLI
    assert main(["info", "--model", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ships_code"] and not info["runs_own_code"] and "built-in implementation" in info["code_note"]
    assert not marker.exists()
    assert main(["info", "--model", str(folder), "--trust-remote-code", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs_own_code"] and marker.exists()
