"""Warm-start profiles: how often each expert of each layer is used on representative prompts.

`python -m engine profile` writes one next to the user's data; `load_model(profile="auto")` finds it
and preloads the experts that fit the budget, and the `static` policy keeps exactly those.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from ..paths import user_data_dir

DEFAULT_PROMPTS = [
    "Hello! Who are you?",
    "Explain in two sentences what a mixture-of-experts model is.",
    "Write a Python function that reverses a string.",
    "What is 17 times 23?",
    "Translate 'good morning' into French and German.",
    "Give me three tips for a good night's sleep.",
    "Summarise the plot of a detective story in one paragraph.",
    "How many minutes are in three and a half hours?",
]


def fingerprint(info) -> str:
    """Changes when the model's config or weights change (cheap: config text + weight file sizes). A GGUF
    file (`info.path` is the file) keeps its config inside, so its name and size stand for both."""
    path = Path(info.path)
    folder = path if path.is_dir() else path.parent
    h = hashlib.sha1((path / "config.json").read_bytes() if path.is_dir() else path.name.encode())
    for name in info.weight_files:
        h.update(f"{name}:{(folder / name).stat().st_size}".encode())
    return h.hexdigest()[:12]


def profile_path(info) -> Path:
    slug = re.sub(r"[^\w.-]+", "_", info.name).strip("_") or "model"
    return user_data_dir() / "profiles" / f"{slug}-{fingerprint(info)}.json"


def save_profile(info, counts: np.ndarray, tokens: int, prompts: int, out: str | os.PathLike | None = None) -> Path:
    path = Path(out) if out else profile_path(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"model": info.name, "fingerprint": fingerprint(info), "tokens": tokens, "prompts": prompts,
            "counts": np.asarray(counts).astype(int).tolist()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


def load_profile(info, profile: str | os.PathLike | None) -> np.ndarray | None:
    """Counts [moe_layers, experts] from a profile file, or from the saved one for `info` when "auto"."""
    if profile is None:
        return None
    path = profile_path(info) if profile == "auto" else Path(profile)
    if not path.exists():
        if profile != "auto":
            raise FileNotFoundError(f"no profile at {path}")
        return None
    counts = np.asarray(json.loads(path.read_text())["counts"], dtype=np.float64)
    if counts.shape != (info.num_moe_layers, info.num_experts):
        raise ValueError(f"{path} was made for another model (shape {counts.shape})")
    return counts
