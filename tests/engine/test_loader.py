"""Loading real checkpoints, and the clear errors for every bad folder a person can point us at."""

from __future__ import annotations

import json
import shutil
import struct
from collections import namedtuple

import pytest
import torch

from engine import InsufficientMemoryError, ModelError, Session, inspect_model, load_model
from engine.errors import Cancelled
from tiny_models import make_tiny_model


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def test_info_describes_the_model(tiny_model):
    info = inspect_model(tiny_model)
    assert (info.model_type, info.num_layers, info.num_moe_layers, info.num_experts, info.top_k) == ("qwen3_moe", 3, 3, 8, 2)
    assert info.expert_bytes_total == info.expert_bytes * 8 * 3
    assert info.dense_bytes + info.expert_bytes_total == info.total_params * 4
    assert info.has_tokenizer and info.has_chat_template
    d = info.to_dict()
    assert d["fits_ram"] is True and d["ram_needed_bytes"] > info.expert_bytes_total


def test_experts_stay_on_cpu_and_are_tagged(tiny_model):
    loaded = load_model(tiny_model, device="cpu", profile=None)
    layers = [m._moe_layer for m in loaded.runtime.modules]
    assert layers == [0, 1, 2]
    assert loaded.model.config._experts_implementation == "moe_chat_hybrid"


def test_sharded_checkpoint_loads(tmp_path):
    path = make_tiny_model(tmp_path / "sharded", "mixtral", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    info = inspect_model(path)
    assert len(info.weight_files) > 1
    load_model(path, device="cpu", profile=None)


def test_model_id_from_the_local_hf_cache(tiny_model, tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny-moe" / "snapshots" / "abc123"
    shutil.copytree(tiny_model, snap)
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-moe" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    info = inspect_model("acme/tiny-moe")
    assert info.name == "acme/tiny-moe"


def test_folder_without_tokenizer_works_with_token_ids(tiny_model, tmp_path):
    dst = tmp_path / "notok"
    dst.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_model / f).exists():
            shutil.copy(tiny_model / f, dst / f)
    loaded = load_model(dst, device="cpu", profile=None)
    assert loaded.tokenizer is None
    session = Session(loaded)
    from engine import GenerationParams

    assert len(list(session.generate([1, 2, 3], GenerationParams(max_new_tokens=3, greedy=True)))) >= 1
    with pytest.raises(Exception, match="no tokenizer"):
        session.chat([{"role": "user", "content": "hi"}], GenerationParams())


def _expect(path, *words):
    with pytest.raises(ModelError) as err:
        load_model(path, device="cpu", profile=None)
    for w in words:
        assert w in str(err.value), str(err.value)
    return str(err.value)


def test_empty_folder(tmp_path):
    _expect(tmp_path, "is empty")


def test_missing_folder(tmp_path):
    _expect(tmp_path / "nope", "neither a folder nor a model id")


def test_file_instead_of_folder(model_copy):
    _expect(model_copy / "config.json", "is a file")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    _expect(model_copy, "no config.json")


def test_corrupt_config(model_copy):
    (model_copy / "config.json").write_text("{ not json")
    _expect(model_copy, "config.json", "not valid JSON")


def test_no_weights(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    _expect(model_copy, "no *.safetensors", "pytorch_model.bin")


def test_truncated_weights(model_copy):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect(model_copy, "model.safetensors", "truncated")


def test_corrupt_header(model_copy):
    f = model_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + 20] = b"\x00garbage-garbage-gar"
    f.write_bytes(bytes(data))
    _expect(model_copy, "corrupt safetensors header")


def test_missing_shard(tmp_path):
    path = make_tiny_model(tmp_path / "sharded", "qwen3_moe", max_shard_size="100KB")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[-1].unlink()
    _expect(path, "missing 1 of", shards[-1].name, "incomplete")


def test_config_weight_shape_mismatch(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (model_copy / "config.json").write_text(json.dumps(cfg))
    _expect(model_copy, "shape", "different models")


def test_unknown_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "frobnicator_moe"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    _expect(model_copy, "unknown architecture 'frobnicator_moe'")


def test_remote_code_is_never_run_implicitly(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "custom_moe"
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    (model_copy / "configuration_custom.py").write_text("raise SystemExit('model code ran!')\n")
    _expect(model_copy, "trust_remote_code", "never runs")


def test_refuses_when_memory_is_short(tiny_model, monkeypatch):
    import psutil

    vm = namedtuple("vm", "total available")(2**30, 2**20)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm)
    with pytest.raises(InsufficientMemoryError, match="GiB of RAM"):
        load_model(tiny_model, device="cpu", profile=None)


def test_cuda_asked_without_cuda(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="no CUDA"):
        load_model(tiny_model, device="cuda", profile=None)


def test_load_reports_progress_and_can_be_cancelled(tiny_model):
    import threading

    seen = []
    load_model(tiny_model, device="cpu", profile=None, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 5
    cancel = threading.Event()

    def progress(f, m):
        if f > 0.2:
            cancel.set()

    with pytest.raises(Cancelled):
        load_model(tiny_model, device="cpu", profile=None, progress=progress, cancel=cancel)
