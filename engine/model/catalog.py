"""The models this machine can chat with: the demo model, the local Hugging Face cache, chosen folders."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from ..errors import EngineError
from .loader import inspect_model

log = logging.getLogger(__name__)


def _entry(source: str, origin: str, name: str | None = None) -> dict:
    """ModelInfo.to_dict() plus where it came from; a folder that cannot be used carries its error."""
    try:
        entry = inspect_model(source).to_dict()
        error = None
    except EngineError as e:
        entry, error = {"name": Path(source).name, "path": str(source)}, str(e)
    except Exception as e:  # noqa: BLE001 - one odd folder must not empty the whole list
        log.warning("%s could not be inspected", source, exc_info=True)
        entry = {"name": Path(source).name, "path": str(source)}
        error = f"{source} could not be read ({type(e).__name__}: {e}); MoE Chat cannot load it"
    entry.update(source=str(source), origin=origin, error=error)
    if name:
        entry["name"] = name
    return entry


def hf_cache_models() -> list[tuple[str, str]]:
    """(repo id, snapshot folder) of every model repo in the local Hugging Face cache; never downloads."""
    try:
        from huggingface_hub import constants, scan_cache_dir

        cache = scan_cache_dir(constants.HF_HUB_CACHE)  # read now: the default is frozen at import
    except Exception as e:  # no cache folder yet, or one we cannot read
        log.info("no Hugging Face cache to scan: %s", e)
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        found.append((repo.repo_id, str(newest.snapshot_path)))
    return found


def list_models(extra_dirs: Iterable[str] = ()) -> list[dict]:
    """Demo model first, then the Hugging Face cache (named by repo id), then the user's folders."""
    from ..paths import DEMO_MODEL_DIR

    entries = []
    if (DEMO_MODEL_DIR / "config.json").exists():
        entries.append(_entry(str(DEMO_MODEL_DIR), "demo", "MoE Chat demo model"))
    for repo_id, _snapshot in hf_cache_models():
        entries.append(_entry(repo_id, "hf-cache", repo_id))
    seen = {e.get("path") for e in entries}
    for folder in extra_dirs:
        if str(Path(folder).expanduser()) not in seen:
            entries.append(_entry(str(Path(folder).expanduser()), "folder"))
    return entries
