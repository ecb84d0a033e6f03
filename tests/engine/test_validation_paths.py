"""Files and folders we may not read: a message naming the path, never a traceback.

Tests run as root on CI, where chmod 000 denies nothing; so reads are denied by patching the calls the
engine reads through (open, listdir, scandir). One test uses a real chmod where that means something.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil

import pytest

from engine import ModelError, inspect_model, load_model
from engine.model.catalog import list_models
from engine.tools.cli import main


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


@pytest.fixture
def deny(monkeypatch):
    """deny(path): reading that file, or anything under that folder, raises PermissionError as it would."""
    denied: list[str] = []

    def blocked(p) -> bool:
        if isinstance(p, int):
            return False
        s = os.path.abspath(os.fsdecode(os.fspath(p)))
        return any(s == d or s.startswith(d + os.sep) for d in denied)

    def guard(real):
        def call(p=".", *args, **kwargs):
            if blocked(p):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return real(p, *args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(io, "open", guard(io.open))
    monkeypatch.setattr(os, "listdir", guard(os.listdir))
    monkeypatch.setattr(os, "scandir", guard(os.scandir))
    return lambda path: denied.append(os.path.abspath(path))


def refused(folder, path) -> str:
    with pytest.raises(ModelError) as err:
        inspect_model(folder)
    message = str(err.value)
    assert f"cannot read {path}" in message and "permission denied" in message and "chmod" in message, message
    return message


def test_unreadable_config(model_copy, deny):
    deny(model_copy / "config.json")
    refused(model_copy, model_copy / "config.json")


def test_unreadable_weights(model_copy, deny):
    deny(model_copy / "model.safetensors")
    refused(model_copy, model_copy / "model.safetensors")
    with pytest.raises(ModelError, match="cannot read .*model.safetensors"):
        load_model(model_copy, device="cpu", profile=None)


def test_unreadable_folder(model_copy, deny):
    deny(model_copy)
    refused(model_copy, model_copy)


def test_unreadable_tokenizer_config(model_copy, deny):
    """Read only when the model loads (inspecting finds the chat template in chat_template.jinja)."""
    deny(model_copy / "tokenizer_config.json")
    with pytest.raises(ModelError) as err:
        load_model(model_copy, device="cpu", profile=None)
    assert f"cannot read {model_copy / 'tokenizer_config.json'}: permission denied" in str(err.value)


def test_folder_behind_a_parent_we_may_not_enter(model_copy, monkeypatch):
    """Without the right to enter a parent folder, the model folder merely looks missing: say why."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(model_copy) and real_access(p, mode, **kw))
    with pytest.raises(ModelError, match=f"cannot read {model_copy}: permission denied"):
        inspect_model(model_copy / "inner" / "model")


def test_cli_names_the_unreadable_file_in_json(model_copy, deny, capsys):
    deny(model_copy / "config.json")
    assert main(["info", "--model", str(model_copy), "--json"]) == 2
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert str(model_copy / "config.json") in obj["error"] and obj["hint"] and "Traceback" not in err


def test_catalog_shows_the_unreadable_folder_with_its_reason(model_copy, tiny_model, deny):
    deny(model_copy / "model.safetensors")
    entries = {e["source"]: e for e in list_models([str(tiny_model), str(model_copy)])}
    assert entries[str(tiny_model)]["error"] is None
    assert f"cannot read {model_copy / 'model.safetensors'}" in entries[str(model_copy)]["error"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="running as root: chmod 000 denies root nothing (the tests above simulate it instead)")
def test_real_chmod_000(model_copy):
    weights = model_copy / "model.safetensors"
    weights.chmod(0)
    try:
        refused(model_copy, weights)
    finally:
        weights.chmod(0o644)
