"""GGUF models are found where LM Studio and GPT4All keep them, one entry per model."""

from __future__ import annotations

from pathlib import Path

from engine.gguf.catalog import app_folders, gguf_models, model_sources


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_lmstudio_and_gpt4all_folders_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    assert app_folders() == []
    lm = tmp_path / ".lmstudio" / "models"
    a = _touch(lm / "Qwen" / "Qwen3-30B-A3B-GGUF" / "Qwen3-30B-A3B-Q4_K_M.gguf")
    _touch(lm / "Qwen" / "Qwen3-30B-A3B-GGUF" / "mmproj-Qwen3-F16.gguf")
    b = _touch(lm / "mistral" / "Mixtral-GGUF" / "mixtral-Q8_0-00001-of-00002.gguf")
    _touch(lm / "mistral" / "Mixtral-GGUF" / "mixtral-Q8_0-00002-of-00002.gguf")
    _touch(lm / "mistral" / "Mixtral-GGUF" / "README.md")
    g = _touch(tmp_path / "share" / "nomic.ai" / "GPT4All" / "olmoe-Q4_0.gguf")
    assert app_folders() == [("lmstudio", lm), ("gpt4all", tmp_path / "share" / "nomic.ai" / "GPT4All")]
    assert gguf_models(lm) == sorted([a, b])
    assert gguf_models(g.parent) == [g]


def test_user_folder_offers_each_gguf_model_or_itself(tmp_path):
    hf = tmp_path / "hf"
    _touch(hf / "config.json")
    assert model_sources(hf) == [str(hf)]
    mixed = tmp_path / "ggufs"
    one, two = _touch(mixed / "a-Q4_0.gguf"), _touch(mixed / "b-Q8_0.gguf")
    assert model_sources(mixed) == [str(one), str(two)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert model_sources(empty) == [str(empty)]  # the loader says why it cannot load it


def test_list_models_shows_lmstudio_gguf_with_its_quant(tmp_path, monkeypatch, tiny_model_factory):
    from test_gguf import Q, write_gguf

    from engine.model.catalog import list_models

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    lm = tmp_path / "home" / ".lmstudio" / "models" / "tiny" / "Tiny-MoE-GGUF"
    lm.mkdir(parents=True)
    file = write_gguf(tiny_model_factory("qwen3_moe"), lm / "tiny-moe-Q4_0.gguf", Q.F32, experts_qtype=Q.Q4_0)
    mine = tmp_path / "mine"
    mine.mkdir()
    other = write_gguf(tiny_model_factory("olmoe"), mine / "olmoe-Q8_0.gguf", Q.F32, experts_qtype=Q.Q8_0)
    entries = {e["source"]: e for e in list_models([str(mine)])}
    lmstudio, folder = entries[str(file)], entries[str(other)]
    assert lmstudio["origin"] == "lmstudio" and lmstudio["error"] is None
    assert lmstudio["quant"] == "Q4_0" and lmstudio["auto_experts"] == "int4" and lmstudio["disk_bytes"] > 0
    assert folder["origin"] == "folder" and folder["quant"] == "Q8_0" and folder["model_type"] == "olmoe"
