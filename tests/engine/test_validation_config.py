"""Configs and weights checked before a model loads: each bad value refused by name, in the engine, so the
CLI, the catalog (the app's model picker) and `load_model` all say the same thing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.model.loader as loader
from engine import ModelError, inspect_model, load_model
from engine.model.catalog import list_models
from engine.tools.cli import main


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def reshape_experts(folder, layer: int, experts, shape) -> None:
    """Rewrite the weights with `gate_proj` of the given experts of one layer in another shape."""
    tensors = load_file(folder / "model.safetensors")
    for j in experts:
        tensors[f"model.layers.{layer}.mlp.experts.{j}.gate_proj.weight"] = torch.zeros(shape)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def refused(folder, *words) -> str:
    """inspect_model and load_model both refuse, with the same message holding every word."""
    with pytest.raises(ModelError) as inspected:
        inspect_model(folder)
    with pytest.raises(ModelError) as loaded:
        load_model(folder, device="cpu", profile=None)
    message = str(inspected.value)
    assert str(loaded.value) == message
    for w in words:
        assert w in message, message
    return message


@pytest.mark.parametrize("top_k", [9, 0, -1])
def test_top_k_outside_the_experts_is_refused(model_copy, top_k):
    edit_config(model_copy, num_experts_per_tok=top_k)
    refused(model_copy, "config.json", f"num_experts_per_tok is {top_k}", "8 experts")


def test_top_k_equal_to_the_experts_is_fine(model_copy):
    edit_config(model_copy, num_experts_per_tok=8)
    assert inspect_model(model_copy).top_k == 8


@pytest.mark.parametrize("layers", [0, -1, -40])
def test_layer_count_below_one_is_refused(model_copy, layers):
    edit_config(model_copy, num_hidden_layers=layers)
    refused(model_copy, "config.json", f"num_hidden_layers is {layers}", "at least one layer")


def test_one_expert_tensor_of_the_wrong_shape_is_named(model_copy):
    reshape_experts(model_copy, 1, [3], (32, 48))
    message = refused(model_copy, "model.safetensors", "'model.layers.1.mlp.experts.3.gate_proj.weight'",
                      "(32, 48)", "(32, 64)")
    assert "CONVERSION" not in message


def test_a_whole_layer_of_the_wrong_shape_is_named(model_copy):
    """Every expert of one layer alike (no odd one out within it), unlike the other layers."""
    reshape_experts(model_copy, 1, range(8), (32, 48))
    message = refused(model_copy, "model.safetensors", "'model.layers.1.mlp.experts.0.gate_proj.weight'",
                      "(32, 48)", "(32, 64)", "other layers")
    assert "CONVERSION" not in message


def test_every_layer_of_the_wrong_shape_names_tensor_and_shapes(model_copy, monkeypatch):
    """All layers alike, so the headers agree among themselves: the config's expert sizes show it, before
    loading. Should that check miss a layout, transformers' conversion fails, and its report (hidden by our
    quiet logging) becomes a message with the tensor and both shapes."""
    for layer in range(3):
        reshape_experts(model_copy, layer, range(8), (32, 48))
    refused(model_copy, "'model.layers.0.mlp.experts.0.gate_proj.weight'", "(32, 48)", "(32, 64)")
    monkeypatch.setattr(loader, "_check_expert_sizes", lambda meta, headers: None)
    with pytest.raises(ModelError) as err:
        load_model(model_copy, device="cpu", profile=None)
    message = str(err.value)
    assert "CONVERSION" not in message and "above report" not in message
    for words in ("model.layers.0.mlp.experts.gate_up_proj", "(8, 64, 64)", "gate_proj.weight (32, 48)"):
        assert words in message, message


def resize_intermediate(folder, size: int) -> None:
    """Every expert of every layer saved with another intermediate size than config.json's, all alike."""
    tensors = load_file(folder / "model.safetensors")
    for key, t in list(tensors.items()):
        if ".experts." in key and key.endswith(("gate_proj.weight", "up_proj.weight")):
            tensors[key] = torch.zeros(size, t.shape[1])
        elif ".experts." in key and key.endswith("down_proj.weight"):
            tensors[key] = torch.zeros(t.shape[0], size)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_every_expert_of_another_intermediate_size_is_refused_before_loading(model_copy):
    """The headers agree among themselves, so only the config's sizes show it; inspect_model (the picker's
    check) refuses it, without reading a weight, as load_model does."""
    resize_intermediate(model_copy, 48)
    message = refused(model_copy, "model.safetensors", "'model.layers.0.mlp.experts.0.", "intermediate size 32")
    named = "(64, 48), but config.json implies (64, 32)" if "down_proj" in message else \
        "(48, 64), but config.json implies (32, 64)"
    assert named in message and "CONVERSION" not in message


def test_catalog_lists_bad_configs_as_not_loadable(model_copy, tmp_path):
    negative = tmp_path / "negative-layers"
    shutil.copytree(model_copy, negative)
    edit_config(negative, num_hidden_layers=-1)
    top_k = tmp_path / "top-k"
    shutil.copytree(model_copy, top_k)
    edit_config(top_k, num_experts_per_tok=0)
    resized = tmp_path / "resized-experts"
    shutil.copytree(model_copy, resized)
    resize_intermediate(resized, 48)
    entries = {e["source"]: e for e in list_models([str(model_copy), str(negative), str(top_k), str(resized)])}
    assert entries[str(model_copy)]["error"] is None
    assert "intermediate size 32" in entries[str(resized)]["error"] and "num_moe_layers" not in entries[str(resized)]
    assert "num_hidden_layers is -1" in entries[str(negative)]["error"]
    assert "num_moe_layers" not in entries[str(negative)]  # never shown as "dense / no MoE layers"
    assert "num_experts_per_tok is 0" in entries[str(top_k)]["error"]


def test_catalog_survives_an_unexpected_failure(model_copy, tmp_path, monkeypatch):
    real = loader.inspect_model
    odd = tmp_path / "odd"
    odd.mkdir()

    def inspect(source, **kwargs):
        if str(source) == str(odd):
            raise RuntimeError("something no check foresaw")
        return real(source, **kwargs)

    monkeypatch.setattr(loader, "inspect_model", inspect)
    entries = {e["source"]: e for e in list_models([str(model_copy), str(odd)])}
    assert entries[str(model_copy)]["error"] is None
    assert "something no check foresaw" in entries[str(odd)]["error"] and str(odd) in entries[str(odd)]["error"]


def test_cli_reports_a_bad_config_as_json(model_copy, capsys):
    edit_config(model_copy, num_experts_per_tok=99)
    assert main(["info", "--model", str(model_copy), "--json"]) == 2
    obj = json.loads(capsys.readouterr().out)
    assert "num_experts_per_tok is 99" in obj["error"] and obj["hint"]
