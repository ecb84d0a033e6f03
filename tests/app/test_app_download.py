"""The picker's Download… button: list a Hub repo, download with progress, cancel and resume, on a loopback Hub."""

from __future__ import annotations

import time
from collections import namedtuple

import pytest

from app.download_dialog import DownloadDialog
from app.engine_worker import HubDownloads
from hub_emulator import HubEmulator

REPO = "tiny-org/tiny-moe"


@pytest.fixture
def hub(tmp_path, monkeypatch, hf_cache, tiny_model):
    with HubEmulator(tmp_path / "served") as hub:
        hub.add_repo(REPO, tiny_model)
        hub.point_hf_at(monkeypatch)
        yield hub


@pytest.fixture
def dialog(qtbot, hub):
    """A dialog on its own HubDownloads (no model needed); every download thread has ended afterwards."""
    downloads = HubDownloads()
    d = DownloadDialog(downloads)
    qtbot.addWidget(d)
    d.show()
    yield d
    downloads.cancel_all()
    assert downloads.wait(5), "a download thread outlived its test"


def list_files(qtbot, d: DownloadDialog, text: str = REPO) -> None:
    d.repo_edit.setText(text)
    with qtbot.waitSignal(d.downloads.listed, timeout=10_000):
        d.list_button.click()
    assert d.list_button.isEnabled()


def test_picker_download_lists_sizes_downloads_and_selects_the_model(qtbot, window, hub, tiny_model, send):
    with qtbot.waitSignal(window.client.models_listed, timeout=30_000):
        picker = window.open_model_picker()
    assert picker.download_button.text() == "Download…"
    d = picker.open_download()
    assert d.isVisible()
    list_files(qtbot, d, f"https://huggingface.co/{REPO}")
    assert not d.error_label.isVisible()
    total = sum(p.stat().st_size for p in tiny_model.iterdir())
    cells = [d.table.item(0, c).text() for c in range(d.table.columnCount())]
    assert cells[0] == "safetensors (1 file)" and cells[2] == window_format(total) and cells[3] == "yes"
    assert "model.safetensors" in d.files_label.text() and "free in the Hugging Face cache ✓" in d.fit_label.text()

    hub.throttle, hub.hold = (16 * 1024, 0.0), True  # the weights stop flowing after their first piece
    d.download_button.click()
    assert d.progress.isVisible() and d.cancel_button.isVisible() and not d.download_button.isEnabled()
    qtbot.waitUntil(lambda: hub.bytes_served > 0 and hub.requests[-1][1].endswith("model.safetensors"), timeout=10_000)
    assert send(window, "hello")["finish_reason"] in ("length", "eos")  # chatting goes on meanwhile
    assert window.client.downloads.busy() and d.downloaded_repo is None
    hub.throttle, hub.hold = None, False
    with qtbot.waitSignal(picker.client.models_listed, timeout=30_000):
        qtbot.waitUntil(lambda: d.downloaded_repo == REPO, timeout=30_000)
    assert not d.isVisible()
    qtbot.waitUntil(lambda: (picker.selected_model() or {}).get("source") == REPO, timeout=5000)
    assert picker.selected_model()["origin"] == "hf-cache" and not picker.selected_model()["error"]
    assert window.client.downloads.wait(5)
    picker.reject()


def window_format(n: int) -> str:
    from app.engine_worker import format_bytes

    return format_bytes(n)


def test_cancel_answers_within_a_second_and_the_next_download_resumes(qtbot, dialog, hub, tiny_model):
    weights = (tiny_model / "model.safetensors").stat().st_size
    list_files(qtbot, dialog)
    hub.throttle = (16 * 1024, 0.01)
    progress = []
    dialog.downloads.download_progress.connect(lambda job, p: progress.append(p))
    dialog.download_button.click()
    qtbot.waitUntil(lambda: any(p.current == "model.safetensors" and p.done_bytes > 0 for p in progress), timeout=10_000)
    assert dialog.progress.format().endswith("model.safetensors") and " of " in dialog.progress.format()
    t = time.monotonic()
    with qtbot.waitSignal(dialog.downloads.download_failed, timeout=1000) as failed:
        dialog.cancel_button.click()
    assert failed.args[2] is True and time.monotonic() - t < 1.0
    assert dialog.downloads.wait(1.0), "the download thread did not stop within a second"
    assert "cancelled" in dialog.status_label.text() and dialog.download_button.isEnabled()
    plan = dialog.selected_plan()
    assert 0 < plan.have_bytes < plan.total_bytes and "already here" in dialog.fit_label.text()

    hub.throttle = None
    before = hub.bytes_served
    with qtbot.waitSignal(dialog.downloaded, timeout=20_000) as done:
        dialog.download_button.click()
    assert done.args[0] == REPO
    assert hub.bytes_served - before <= plan.needed_bytes + 64 * 1024 < plan.total_bytes + weights // 4


def test_disk_space_refusal_is_shown_and_nothing_is_fetched(qtbot, dialog, hub, monkeypatch):
    from engine.model import download

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    list_files(qtbot, dialog)
    assert dialog.table.item(0, 3).text() == "no disk space" and "not enough disk space" in dialog.fit_label.text()
    dialog.download_button.click()
    assert dialog.error_label.isVisible() and "not enough disk space" in dialog.error_label.text()
    assert dialog.download_job is None and hub.bytes_served == 0


def test_repo_not_found_and_private_repo_messages(qtbot, dialog, hub):
    list_files(qtbot, dialog, "tiny-org/missing")
    assert dialog.error_label.isVisible() and "tiny-org/missing was not found" in dialog.error_label.text()
    assert dialog.table.rowCount() == 0 and not dialog.download_button.isEnabled()
    hub.private.add(REPO)
    list_files(qtbot, dialog)
    assert "needs a token" in dialog.error_label.text() and "HF_TOKEN" in dialog.error_label.text()
    list_files(qtbot, dialog, "not a repo")
    assert "not a Hugging Face model id" in dialog.error_label.text()
