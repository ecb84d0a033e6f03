import shutil

import huggingface_hub.constants as hf_constants

from engine.model.catalog import list_models


def test_lists_cache_models_by_repo_id_and_folders_with_errors(tiny_model, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-moe"
    shutil.copytree(tiny_model, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "blobs").mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    entries = list_models([str(tiny_model), str(broken)])
    by_origin = {}
    for e in entries:
        by_origin.setdefault(e["origin"], []).append(e)
    cached = by_origin["hf-cache"][0]
    assert cached["name"] == "acme/tiny-moe" and cached["source"] == "acme/tiny-moe" and cached["error"] is None
    assert cached["num_experts"] == 8 and cached["fits_ram"] is True
    folders = {e["source"]: e for e in by_origin["folder"]}
    assert folders[str(tiny_model)]["error"] is None
    assert "not valid JSON" in folders[str(broken)]["error"]
