"""The quantized experts of a model, saved once in the user's data folder so later loads skip quantizing.

A copy is a folder with `experts.safetensors` (every experts module's codes and scales, keyed by the
module's path) and `manifest.json`, which records the format and each source weight file's size,
modification time and a hash of its safetensors header. A copy whose manifest does not match the
source as it is now, or that cannot be read, is never used: it is deleted and rebuilt. Copies are
written to a temporary folder and renamed into place, so a full disk leaves no half-written copy.
The tensors are memory-mapped when read: experts the RAM cannot hold page in from the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from ..paths import user_data_dir

log = logging.getLogger(__name__)

COPY_VERSION = 1
FILE = "experts.safetensors"


def copy_dir(model_path: str | Path, fmt: str) -> Path:
    path = Path(model_path).resolve()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return user_data_dir() / "quantized" / f"{path.name}-{key}" / fmt


def fingerprint(model_path: str | Path, weight_files: list[str]) -> list[dict]:
    """Size, modification time and header hash of each source weight file: a changed source is detected
    without reading gigabytes."""
    out = []
    for name in weight_files:
        f = Path(model_path) / name
        stat = f.stat()
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(min(n, 100 * 2**20))
        out.append({"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                    "header_sha256": hashlib.sha256(header).hexdigest()})
    return out


def _manifest(fmt: str, model_path: str | Path, weight_files: list[str]) -> dict:
    return {"version": COPY_VERSION, "format": fmt, "source": str(Path(model_path).resolve()),
            "files": fingerprint(model_path, weight_files)}


DTYPES = {"I8": torch.int8, "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


ALIGN = 64  # the int8/int4 kernels load weights with aligned vector loads: every tensor starts on 64 bytes
NAMES = {v: k for k, v in DTYPES.items()}


def _write(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """A safetensors file whose tensors all start on ALIGN bytes (padding tensors fill the gaps, so any
    safetensors reader still reads it)."""
    header, blobs, offset = {}, [], 0
    for i, (key, t) in enumerate(tensors.items()):
        pad = -offset % ALIGN
        if pad:
            header[f"__pad{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            blobs.append(bytes(pad))
            offset += pad
        data = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)
    with file.open("wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for blob in blobs:
            fh.write(blob)


def _mapped(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one memory-mapped storage: pages come from the disk
    when first touched and the OS may drop them again, so the experts need not all fit the RAM. The
    mapping lives as long as any of the tensors."""
    with file.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    storage = torch.UntypedStorage.from_file(str(file), shared=True, nbytes=file.stat().st_size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for key, t in header.items():
        if key == "__metadata__" or key.startswith("__pad"):
            continue
        start, stop = t["data_offsets"]
        out[key] = raw[8 + n + start:8 + n + stop].view(DTYPES[t["dtype"]]).view(t["shape"])
    return out


def load(model_path: str | Path, weight_files: list[str], fmt: str) -> dict[str, torch.Tensor] | None:
    """The saved tensors (memory-mapped), or None when there is no valid copy (a stale or damaged one
    is removed)."""
    folder = copy_dir(model_path, fmt)
    if not folder.exists():
        return None
    try:
        saved = json.loads((folder / "manifest.json").read_text())
        if saved != _manifest(fmt, model_path, weight_files):
            raise ValueError("the source model changed since the copy was made")
        return _mapped(folder / FILE)
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild
        log.warning("the saved %s copy in %s is not usable (%s); quantizing again", fmt, folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def save(modules: dict[str, torch.nn.Module], model_path: str | Path, weight_files: list[str], fmt: str) -> Path | None:
    """Write the experts modules' quantized tensors (`modules`: path -> module). Returns the folder, or
    None when it could not be written (the message is logged; the loaded model is unaffected)."""
    folder = copy_dir(model_path, fmt)
    tmp = folder.with_name(folder.name + ".partial")
    tensors = {f"{path}.{name}": t for path, m in modules.items()
               for name, t in m._moe_tensors.items() if not name.endswith("_bias")}
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write(tensors, tmp / FILE)
        (tmp / "manifest.json").write_text(json.dumps(_manifest(fmt, model_path, weight_files), indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return folder
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not save the %s copy of the experts to %s (%s); the model is loaded, the next "
                    "load will quantize again", fmt, folder.parent, e.strerror or e)
        return None
