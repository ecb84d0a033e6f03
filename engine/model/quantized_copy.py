"""The quantized experts of a model, saved once in the user's data folder so later loads skip quantizing.

A copy is a folder of safetensors files, one per stacked expert parameter (`NAME.q` and `NAME.scale`
of one experts module, keyed by the module's path), and `manifest.json`, which lists those files with
their sizes and records the format and each source weight file's size, modification time and a hash of
its safetensors header. The manifest is written last: a copy without one (a load that was cut short),
whose manifest does not match the source as it is now, or that cannot be read, is never used: it is
deleted and rebuilt.

The tensors are memory-mapped when read: experts the RAM cannot hold page in from the disk, the third
tier under the GPU cache and RAM. A first load writes the copy while it reads the checkpoint (see
`Writer`), each parameter as soon as it is quantized, and maps it straight back, so the quantized
experts are never all in the process's memory at once either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..errors import InsufficientMemoryError
from ..paths import user_data_dir

log = logging.getLogger(__name__)

COPY_VERSION = 2  # 1: one experts.safetensors file, written after the load
MANIFEST = "manifest.json"
PARTS = (".q", ".scale")


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
    safetensors reader still reads it). Each tensor's bytes go straight from its memory to the file."""
    header, offset = {}, 0
    for i, (key, t) in enumerate(tensors.items()):
        pad = -offset % ALIGN
        if pad:
            header[f"__pad{i}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            offset += pad
        header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)
    with file.open("wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for key, entry in header.items():
            start, stop = entry["data_offsets"]
            if key.startswith("__pad"):
                fh.write(bytes(stop - start))
            elif stop > start:
                fh.write(tensors[key].detach().contiguous().reshape(-1).view(torch.uint8).numpy())


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


def is_mapped(t: torch.Tensor, folder: Path) -> bool:
    """Whether `t`'s memory is a mapping of a file in `folder` (Linux: read off /proc/self/maps)."""
    ptr, root = t.data_ptr(), str(Path(folder).resolve()) + os.sep
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            if start <= ptr < stop:
                return len(fields) == 6 and fields[5].strip().startswith(root)
    return False


def load(model_path: str | Path, weight_files: list[str], fmt: str) -> dict[str, torch.Tensor] | None:
    """The saved tensors (memory-mapped), or None when there is no valid copy (a stale, damaged or
    half-written one is removed)."""
    folder = copy_dir(model_path, fmt)
    if not folder.exists():
        return None
    try:
        saved = json.loads((folder / MANIFEST).read_text())
        files = saved.pop("tensor_files")
        if saved != _manifest(fmt, model_path, weight_files):
            raise ValueError("the source model changed since the copy was made")
        out = {}
        for entry in files:
            file = folder / entry["name"]
            if file.stat().st_size != entry["size"]:  # a mapping past the end of a file faults when touched
                raise ValueError(f"{file.name} has {file.stat().st_size} bytes, {entry['size']} expected")
            out.update(_mapped(file))
        return out
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild
        log.warning("the saved %s copy in %s is not usable (%s); quantizing again", fmt, folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None


class Writer:
    """A copy written while the model loads: each stacked expert parameter is written to its own file as
    soon as it is quantized, and its tensors in the module are replaced by views of that file, so the
    RAM the quantized experts took is given back as the load goes (the pages stay in the OS's file cache
    while there is room). `commit` writes the manifest that makes the copy valid.

    When writing fails (a full disk, say), what was written is read back into RAM and removed, the
    message is logged, and the load goes on without a copy: unless the copy is `required` (the experts
    do not fit the RAM and page in from it), then the load is refused, saying why (`required` is the
    reason, e.g. "the int8 experts (40.2 GiB) do not fit the 30.1 GiB of free RAM")."""

    def __init__(self, model_path: str | Path, weight_files: list[str], fmt: str, required: str | None = None):
        self.folder = copy_dir(model_path, fmt)
        self.fmt, self.required = fmt, required
        self.source = _manifest(fmt, model_path, weight_files)
        self.files: list[dict] = []
        self.written: set[str] = set()
        self._mapped: list[tuple[dict, str]] = []  # (a module's tensors, a name) now views of our files
        self.failed: OSError | None = None
        shutil.rmtree(self.folder, ignore_errors=True)  # an old copy: new files, never old ones rewritten
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._fail(e)

    def add(self, module_path: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors[NAME.q]` and `tensors[NAME.scale]` (an experts module's `_moe_tensors`; the
        module's path in the model) and put their mapped views in their place."""
        key = f"{module_path}.{name}"
        if self.failed is not None or key in self.written:
            return
        file = self.folder / f"{len(self.files):05d}.safetensors"
        try:
            _write({key + part: tensors[name + part] for part in PARTS}, file)
            self.files.append({"name": file.name, "size": file.stat().st_size})
        except OSError as e:
            self._fail(e)
            return
        mapped = _mapped(file)
        for part in PARTS:
            tensors[name + part] = mapped[key + part]
        self.written.add(key)
        self._mapped.append((tensors, name))

    def add_module(self, module_path: str, module: torch.nn.Module) -> None:
        """Every quantized parameter of an experts module not written yet (biases are not quantized: they
        stay with the module)."""
        tensors = getattr(module, "_moe_tensors", {})
        for name in [n[:-len(".q")] for n in tensors if n.endswith(".q")]:
            self.add(module_path, name, tensors)

    def commit(self) -> Path | None:
        """Make the copy valid; its folder, or None if it could not be written."""
        if self.failed is None:
            try:
                tmp = self.folder / (MANIFEST + ".partial")
                tmp.write_text(json.dumps({**self.source, "tensor_files": self.files}, indent=1))
                os.replace(tmp, self.folder / MANIFEST)
            except OSError as e:
                self._fail(e)
        return self.folder if self.failed is None else None

    def abort(self) -> None:
        """The load failed: leave no half-written copy behind."""
        self._mapped.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _fail(self, e: OSError) -> None:
        self.failed = e
        reason = e.strerror or str(e)
        if self.required is not None:
            self.abort()
            raise InsufficientMemoryError(
                f"{self.required}, so they would page in from a copy on the disk, but it could not be written to "
                f"{self.folder.parent} ({reason}); free some disk space there (about the experts' size), close "
                "other programs or pick a smaller model") from None
        for tensors, name in self._mapped:  # keep in RAM what is in the files about to be removed
            for part in PARTS:
                tensors[name + part] = tensors[name + part].clone()
        self.abort()
        log.warning("could not save the %s copy of the experts to %s (%s); the model is loaded, the next "
                    "load will quantize again", self.fmt, self.folder.parent, reason)


def save(modules: dict[str, torch.nn.Module], model_path: str | Path, weight_files: list[str], fmt: str) -> Path | None:
    """Write the experts modules' quantized tensors (`modules`: path -> module) as a copy; their tensors
    become views of it. Returns the folder, or None when it could not be written (the message is logged;
    the modules keep their tensors in RAM)."""
    writer = Writer(model_path, weight_files, fmt)
    for path, module in modules.items():
        writer.add_module(path, module)
    return writer.commit()
