"""Where GGUF models already are on this machine: LM Studio's and GPT4All's model folders, and folders the
user added; one source (a .gguf file, the first part of a split one) per model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .reader import AUXILIARY, SPLIT_NAME


def app_folders() -> list[tuple[str, Path]]:
    """(origin, folder) of the apps' default model folders that exist here."""
    home = Path.home()
    lmstudio = [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]  # new and old default
    if sys.platform == "darwin":
        gpt4all = [home / "Library" / "Application Support" / "nomic.ai" / "GPT4All"]
    elif sys.platform == "win32":
        gpt4all = [Path(os.environ.get("LOCALAPPDATA", home / "AppData" / "Local")) / "nomic.ai" / "GPT4All"]
    else:
        gpt4all = [Path(os.environ.get("XDG_DATA_HOME", home / ".local" / "share")) / "nomic.ai" / "GPT4All"]
    found = [("lmstudio", p) for p in lmstudio] + [("gpt4all", p) for p in gpt4all]
    return [(origin, p) for origin, p in found if p.is_dir()]


def gguf_models(folder: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """The GGUF models under `folder` (LM Studio nests them as publisher/model/file.gguf), sorted;
    projector and imatrix files and the later parts of split models are left out."""
    root = Path(folder).expanduser()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= max_depth:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            split = SPLIT_NAME.match(name)
            if (name.lower().endswith(".gguf") and not name.lower().startswith(AUXILIARY)
                    and (split is None or split["no"] == "00001")):
                found.append(Path(dirpath) / name)
    return sorted(found)


def model_sources(folder: str | os.PathLike) -> list[str]:
    """What a user-added folder offers: itself when it is a Hugging Face folder (or holds no GGUF),
    else each GGUF model in it."""
    path = Path(folder).expanduser()
    if (path / "config.json").exists():
        return [str(path)]
    models = gguf_models(path, max_depth=1)
    return [str(m) for m in models] or [str(path)]
