"""Downloads from a Hub: against a local folder served in the Hub's URL layout on loopback (HF_ENDPOINT)."""

from __future__ import annotations

import errno
import hashlib
import shutil
import threading
from collections import namedtuple

import pytest

from engine.model import catalog
from engine.model import download as dl
from hub_emulator import HubEmulator


@pytest.fixture
def hub(tmp_path, monkeypatch, hf_cache, tiny_model):
    """The emulator serving the tiny model as tiny-org/tiny-moe; HF_ENDPOINT points at it."""
    with HubEmulator(tmp_path / "served") as hub:
        hub.add_repo("tiny-org/tiny-moe", tiny_model)
        hub.point_hf_at(monkeypatch)
        yield hub


def test_repo_ids_and_urls():
    assert dl.parse_repo_id(" Qwen/Qwen3-30B-A3B ") == "Qwen/Qwen3-30B-A3B"
    assert dl.parse_repo_id("https://huggingface.co/Qwen/Qwen3-30B-A3B/tree/main") == "Qwen/Qwen3-30B-A3B"
    assert dl.parse_repo_id("huggingface.co/org/m/resolve/main/x.gguf") == "org/m"
    with pytest.raises(dl.DownloadError, match="not a Hugging Face model id"):
        dl.parse_repo_id("just-a-name")


def test_lists_files_with_sizes_and_gguf_variants(hub, tiny_model):
    listing = dl.list_repo(f"{hub.url}/tiny-org/tiny-moe")
    sizes = {f.name: f.size for f in listing.files}
    assert sizes == {p.name: p.stat().st_size for p in tiny_model.iterdir() if p.is_file()}
    assert [v.name for v in listing.variants] == ["safetensors (1 file)"]
    assert listing.variants[0].weight_bytes == (tiny_model / "model.safetensors").stat().st_size
    plan = dl.plan_download(listing)
    assert plan.total_bytes == sum(sizes.values()) and plan.have_bytes == 0 and plan.fits_disk and plan.fits_ram

    hub.add_repo("gg/model-GGUF", files={"README.md": b"readme", "m-Q4_K_M.gguf": b"q" * 400,
                                          "m-Q8_0-00001-of-00002.gguf": b"a" * 500, "m-Q8_0-00002-of-00002.gguf": b"b" * 300})
    variants = {v.name: v for v in dl.list_repo("gg/model-GGUF").variants}
    assert set(variants) == {"m-Q4_K_M.gguf", "m-Q8_0.gguf"}
    assert variants["m-Q8_0.gguf"].files == ["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]
    assert variants["m-Q8_0.gguf"].weight_bytes == 800
    plan = dl.plan_download(dl.list_repo("gg/model-GGUF"), "m-Q4_K_M.gguf")
    assert [f.name for f in plan.files] == ["m-Q4_K_M.gguf"] and plan.total_bytes == 400


def test_download_then_the_model_lists_and_loads(hub, tiny_model):
    from engine.model import loader

    seen = []
    folder = dl.download(dl.plan_download(dl.list_repo("tiny-org/tiny-moe")), seen.append)
    for p in tiny_model.iterdir():
        assert hashlib.sha256((folder / p.name).read_bytes()).digest() == hashlib.sha256(p.read_bytes()).digest()
    last = seen[-1]
    assert last.done_bytes == last.total_bytes and last.files_done == last.files_total == len(list(tiny_model.iterdir()))
    assert all(a.done_bytes <= b.done_bytes for a, b in zip(seen, seen[1:]))
    entry = next(m for m in catalog.list_models() if m["source"] == "tiny-org/tiny-moe")
    assert entry["origin"] == "hf-cache" and not entry["error"] and entry["num_experts"] == 8
    assert loader.load_model("tiny-org/tiny-moe").info.num_experts == 8
    # over plain HTTP from the endpoint (the server offers no Xet), and a second download fetches nothing
    assert all(path.startswith(("/api/", "/tiny-org/tiny-moe/resolve/")) for _m, path, _r in hub.requests)
    served = hub.bytes_served
    assert dl.plan_download(dl.list_repo("tiny-org/tiny-moe")).needed_bytes == 0
    dl.download(dl.plan_download(dl.list_repo("tiny-org/tiny-moe")))
    assert hub.bytes_served == served


def test_cancel_leaves_no_broken_model_and_the_next_download_resumes(hub, tiny_model, monkeypatch):
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert len(weights) > 4 * 64 * 1024, "the tiny model got too small to cancel half way"
    monkeypatch.setattr(dl, "CHUNK_BYTES", 64 * 1024)
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", constants.DOWNLOAD_CHUNK_SIZE)  # restored after
    hub.throttle = (16 * 1024, 0.005)
    cancel = threading.Event()

    def progress(p: dl.Progress) -> None:
        if p.current == "model.safetensors" and p.done_bytes > len(weights) // 2:
            cancel.set()

    plan = dl.plan_download(dl.list_repo("tiny-org/tiny-moe"))
    with pytest.raises(dl.DownloadCancelled):
        dl.download(plan, progress, cancel)
    assert "tiny-org/tiny-moe" not in [r for r, _ in catalog.hf_cache_models()]  # nothing half-linked
    plan = dl.plan_download(dl.list_repo("tiny-org/tiny-moe"))
    assert len(weights) // 2 < plan.have_bytes < plan.total_bytes
    hub.throttle = None
    before = hub.bytes_served
    folder = dl.download(plan)
    again = hub.bytes_served - before
    assert again <= plan.total_bytes - plan.have_bytes + 64 * 1024  # the rest, not the whole file again
    assert any(r.startswith("bytes=") and r != "bytes=0-" for _m, _p, r in hub.requests)
    assert (folder / "model.safetensors").read_bytes() == weights
    assert [r for r, _ in catalog.hf_cache_models()] == ["tiny-org/tiny-moe"]


def test_not_enough_disk_space_refuses_before_the_first_byte(hub, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    plan = dl.plan_download(dl.list_repo("tiny-org/tiny-moe"))
    assert not plan.fits_disk
    with pytest.raises(dl.DownloadError, match="not enough disk space") as e:
        dl.download(plan)
    assert "HF_HUB_CACHE" in e.value.hint
    assert hub.bytes_served == 0 and not any(m == "GET" and "/resolve/" in p for m, p, _ in hub.requests)


def test_repo_not_found_private_gated_and_no_weights(hub, monkeypatch):
    with pytest.raises(dl.DownloadError, match="tiny-org/nope was not found"):
        dl.list_repo("tiny-org/nope")
    hub.private.add("tiny-org/tiny-moe")
    with pytest.raises(dl.DownloadError, match="private or gated and needs a token") as e:
        dl.list_repo("tiny-org/tiny-moe")
    assert "HF_TOKEN" in e.value.hint
    monkeypatch.setenv("HF_TOKEN", hub.token)  # the library sends it
    assert dl.list_repo("tiny-org/tiny-moe").files
    monkeypatch.delenv("HF_TOKEN")
    hub.add_repo("gated/model", files={"model.safetensors": b"x" * 10})
    hub.gated.add("gated/model")
    with pytest.raises(dl.DownloadError, match="gated"):
        dl.list_repo("gated/model")
    hub.add_repo("docs/only", files={"README.md": b"no weights here"})
    with pytest.raises(dl.DownloadError, match="no model weights"):
        dl.list_repo("docs/only")


def test_network_down_and_disk_full_get_messages(hub, monkeypatch):
    hub.__exit__()  # nothing listens there any more
    with pytest.raises(dl.DownloadError, match="network looks down"):
        dl.list_repo("tiny-org/tiny-moe")
    full = dl._explain(OSError(errno.ENOSPC, "No space left on device"), "a/b")
    assert "disk is full" in str(full) and "continue" in full.hint


def test_a_gguf_variant_downloads_only_its_files(hub):
    hub.add_repo("gg/model-GGUF", files={"README.md": b"readme", "m-Q4_K_M.gguf": b"q" * 400,
                                          "m-Q8_0-00001-of-00002.gguf": b"a" * 500, "m-Q8_0-00002-of-00002.gguf": b"b" * 300})
    plan = dl.plan_download(dl.list_repo("gg/model-GGUF"), "m-Q8_0.gguf")
    folder = dl.download(plan)
    assert sorted(p.name for p in folder.iterdir()) == ["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]
    assert hub.bytes_served == 800
    with pytest.raises(dl.DownloadError, match="no variant"):
        dl.plan_download(dl.list_repo("gg/model-GGUF"), "m-Q2.gguf")
