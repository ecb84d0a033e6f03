"""The models this machine can chat with: the demo model, the local Hugging Face cache, chosen folders."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from ..errors import EngineError

log = logging.getLogger(__name__)
TRUST_FILE = "trusted-code.json"  # in the user's data folder: the model folders allowed to run their own code


# -- the per-model opt-in to a folder's own Python code ("remote code") --------------------------------
def _trust_file() -> Path:
    from ..paths import user_data_dir

    return user_data_dir() / TRUST_FILE


def _key(folder: str | Path) -> str:
    return str(Path(folder).expanduser().resolve())


def _trusted_folders() -> list[str]:
    file = _trust_file()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:  # unreadable or damaged: nothing is trusted, which is safe
        log.warning("%s could not be read (%s): no model folder may run its own code", file, e)
        return []
    folders = data.get("folders") if isinstance(data, dict) else None
    return [f for f in folders if isinstance(f, str)] if isinstance(folders, list) else []


def remote_code_trusted(folder: str | Path) -> bool:
    """Whether the user allowed this model folder's own Python code to run (off unless they opted in)."""
    return _key(folder) in _trusted_folders()


def set_remote_code_trusted(folder: str | Path, trusted: bool) -> None:
    """Remember the user's choice for one model folder; a later revision of a cached model is another
    folder, so its code needs a new opt-in."""
    folders = [f for f in _trusted_folders() if f != _key(folder)] + ([_key(folder)] if trusted else [])
    file = _trust_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(json.dumps({"folders": folders}, indent=1), encoding="utf-8")
        tmp.replace(file)
    except OSError as e:
        raise EngineError(f"cannot save the remote-code choice to {file}: {e.strerror or e}",
                          hint="check that the data folder can be written") from None


def _code_info(folder: str | Path) -> dict:
    """Whether a folder ships its own code, whether the user allowed it, and what runs, in words."""
    from .loader import code_note, ships_code

    try:
        raw = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, dict) or not ships_code(raw):
        return {"ships_code": False, "trust_remote_code": False, "code_note": ""}
    trusted = remote_code_trusted(folder)
    return {"ships_code": True, "trust_remote_code": trusted, "code_note": code_note(Path(folder), raw, trusted)}


def _entry(source: str, origin: str, name: str | None = None, folder: str | None = None) -> dict:
    """ModelInfo.to_dict() plus where it came from; a folder that cannot be used carries its error."""
    from . import loader

    folder = folder or source
    try:
        entry = loader.inspect_model(source).to_dict()
        error = None
    except EngineError as e:
        entry, error = {"name": Path(source).name, "path": str(folder)}, str(e)
    except Exception as e:  # noqa: BLE001 - one odd folder must not empty the whole list
        log.warning("%s could not be inspected", source, exc_info=True)
        entry = {"name": Path(source).name, "path": str(folder)}
        error = f"{source} could not be read ({type(e).__name__}: {e}); MoE Chat cannot load it"
    entry.update(_code_info(entry["path"]))
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
    """Demo model first, then the Hugging Face cache (named by repo id), LM Studio's and GPT4All's GGUF
    files, then the user's folders; a folder of GGUF files gives one entry per model."""
    from ..gguf.catalog import app_folders, gguf_models, model_sources
    from ..paths import DEMO_MODEL_DIR

    entries = []
    if (DEMO_MODEL_DIR / "config.json").exists():
        entries.append(_entry(str(DEMO_MODEL_DIR), "demo", "MoE Chat demo model"))
    for repo_id, snapshot in hf_cache_models():
        sources = model_sources(snapshot)
        if sources == [snapshot]:
            entries.append(_entry(repo_id, "hf-cache", repo_id, snapshot))
        else:  # a GGUF repo: each downloaded variant
            entries += [_entry(s, "hf-cache", f"{repo_id}/{Path(s).name}") for s in sources]
    for origin, folder in app_folders():
        entries += [_entry(str(f), origin) for f in gguf_models(folder)]
    seen = {e.get("path") for e in entries}
    for folder in extra_dirs:
        for source in model_sources(folder):
            if source not in seen:
                entries.append(_entry(source, "folder"))
    return entries
