"""Shared fixtures: tiny checkpoints built once per test session, user data kept in a temp folder."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# user data (remembered kernel choices, profiles) of module- and session-scoped fixtures, which load
# before the per-test folder below is set, never goes to the real home either
os.environ["MOE_CHAT_DATA"] = tempfile.mkdtemp(prefix="moe-chat-tests-")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the engine and the app set it, before numpy loads
# one CPU matmul backend for the whole suite, so results never depend on which one a timing favoured;
# tests that want the other one or the timed choice ask for it
os.environ.setdefault("MOE_CHAT_CPU_MATMUL", "torch")
os.environ.setdefault("MOE_CHAT_CPU_LAYOUT", "in-out")  # likewise the weights' layout (out-in: tested on its own)
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
# Tiny models gain nothing from threads, and idle-spinning threads on a busy 2-core machine cost a lot.
os.environ.setdefault("MOE_CHAT_THREADS", "1")
torch.set_num_threads(1)

from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """make(arch, **kwargs) -> folder; each distinct model is built once."""
    built: dict[tuple, Path] = {}

    def make(arch: str = "qwen3_moe", **kwargs) -> Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch, **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3_moe")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; huggingface_hub froze its path at import, in several modules."""
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._cache_manager as cache_manager  # holds its own copy of the path

    folder = tmp_path / "hf-cache"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(cache_manager, "HF_HUB_CACHE", str(folder))
    return folder


@pytest.fixture(autouse=True)
def _user_data(tmp_path, monkeypatch):
    """Profiles and other user data go to a fresh temp folder, never the real home."""
    monkeypatch.setenv("MOE_CHAT_DATA", str(tmp_path / "user-data"))
