"""Open a GGUF model (one file, or the parts of a split one) with the `gguf` package's memory-mapping
reader, after the checks that turn a damaged or incomplete download into a message a person can act on."""

from __future__ import annotations

import contextlib
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelError

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
AUXILIARY = ("mmproj", "imatrix")  # GGUF files next to a model that are not a language model


@dataclass
class GGUFModel:
    """A GGUF model's metadata (values, not reader fields) and its tensors by name, over all parts."""

    files: list[Path]
    metadata: dict
    tensors: dict = field(default_factory=dict)  # name -> gguf.ReaderTensor (data memory-mapped)
    maps: list = field(default_factory=list)  # the files' mmap objects

    def release_pages(self) -> None:
        """Drop the pages read so far from this process (they stay in the page cache): without this, a
        load's resident memory would hold the file next to the converted weights."""
        for m in self.maps:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                m.madvise(mmap.MADV_DONTNEED)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default=None):
        """An architecture-specific value (`{arch}.key`), else a general one, else `default`."""
        return self.metadata.get(f"{self.architecture}.{key}", self.metadata.get(key, default))


def local_path(source) -> Path:
    """The path itself, or for a model id the snapshot folder in the local Hugging Face cache (a GGUF
    repository downloaded there; never downloads)."""
    path = Path(source).expanduser()
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True))
    except Exception:  # not in the cache: the safetensors loader says so
        return path


def is_gguf(source) -> bool:
    """A path to a .gguf file, or a folder (or cached model id) holding .gguf files and no config.json."""
    path = local_path(source)
    if path.suffix.lower() == ".gguf":
        return True
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


def model_files(source) -> list[Path]:
    """The file(s) of one GGUF model: all parts of a split one, in order, each checked to be there."""
    path = local_path(source)
    if path.is_dir():
        candidates = sorted(p for p in path.glob("*.gguf") if not p.name.lower().startswith(AUXILIARY))
        firsts = [p for p in candidates if not SPLIT_NAME.match(p.name) or SPLIT_NAME.match(p.name)["no"] == "00001"]
        if not firsts:
            firsts = candidates[:1]  # only later parts: the missing first part is named below
        if len(firsts) > 1:
            raise ModelError(f"{path} holds {len(firsts)} GGUF models ({', '.join(p.name for p in firsts[:4])}); "
                             "choose one of the files")
        if not firsts:
            raise ModelError(f"{path} holds no GGUF model file")
        path = firsts[0]
    m = SPLIT_NAME.match(path.name)
    if not m:
        if not path.exists():
            raise ModelError(f"no GGUF file at {path}")
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise ModelError(f"{path.name} is one of {count} parts and {len(missing)} are missing ({', '.join(missing[:3])}"
                         f"{'…' if len(missing) > 3 else ''}); the download is incomplete, finish it and try again")
    return parts


def _value(f):
    """A reader field as a plain Python value (strings decoded, arrays as lists)."""
    from gguf import GGUFValueType

    if f.types and f.types[0] == GGUFValueType.ARRAY:
        if f.types[-1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types and f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    return f.parts[f.data[0]].tolist()[0] if f.data else None


def _open(file: Path):
    from gguf import GGUFReader

    size = file.stat().st_size
    with open(file, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{file} is not a GGUF file (it does not start with the GGUF magic bytes); "
                         "the file is damaged or of another format")
    try:
        return GGUFReader(file)
    except ValueError as e:
        number = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if number:
            raise ModelError(f"{file.name} holds tensors of GGML type {number[1]}, which the installed gguf package "
                             "does not know; update gguf (pip install -U gguf) or pick another quantization of "
                             "the model") from None
        if "version" in str(e):
            raise ModelError(f"{file.name}: {e}; pick a file made by a recent llama.cpp") from None
        raise ModelError(f"{file} is truncated or damaged ({size} bytes on disk: {e}); download it again") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise ModelError(f"{file} is truncated or damaged ({size} bytes on disk: {type(e).__name__}); "
                         "download it again") from None


def open_model(source) -> GGUFModel:
    """Read the metadata and tensor table of every part (tensor data stays on disk, memory-mapped)."""
    files = model_files(source)
    model = GGUFModel(files=files, metadata={})
    for i, file in enumerate(files):
        reader = _open(file)
        if i == 0:
            model.metadata = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        if getattr(reader.data, "_mmap", None) is not None:
            model.maps.append(reader.data._mmap)
        size = file.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ModelError(f"{file} is truncated: tensor {t.name!r} ends past the end of the file "
                                 f"({size} bytes); the download is incomplete")
            model.tensors[t.name] = t
    if not model.architecture:
        raise ModelError(f"{files[0].name} has no general.architecture; it is not a model file")
    return model


def as_array(t) -> np.ndarray:
    """The raw memory-mapped data of a tensor: values for float/int types, block bytes for quantized ones."""
    return np.asarray(t.data)
