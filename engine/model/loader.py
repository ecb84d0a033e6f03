"""Open a local Hugging Face model folder, check it, estimate its memory, and load it for the hybrid engine.

Dense weights go to the fast device; routed experts stay in CPU memory (pinned when CUDA is present),
and the hybrid runtime decides per step which of them run from fast-device cache slots.
Every failure a person can cause (wrong folder, truncated download, wrong config) becomes a ModelError
that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from ..errors import Cancelled, EngineError, InsufficientMemoryError, ModelError
from . import quantized_copy
from ..moe.cpu_layout import laid_out
from ..moe.interface import EXPERTS_IMPLEMENTATION, expert_tensor_names, is_experts_module, main_experts
from ..moe.quantize import (FORMATS, check_format, dense_linears, int4_group_size, meta_like, quantize_dense, quantize_experts,
                            quantize_stack, quantized_bytes)

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 1,
}
TEXT_HEADS = ("ForCausalLM", "ForConditionalGeneration")  # classes that generate text from text alone
DEFAULT_CONTEXT = 4096  # tokens of KV cache the memory estimate makes room for
RAM_HEADROOM = 0.9  # `auto` picks a format that needs at most this share of the free RAM
AVAILABLE_RAM_ENV = "MOE_CHAT_AVAILABLE_RAM"  # e.g. 6GiB: the free RAM the memory checks count on


def available_ram() -> int:
    """The free RAM the memory checks count on: `$MOE_CHAT_AVAILABLE_RAM` (a size, e.g. 6GiB: to try how
    a model loads on a smaller machine) or else what the OS says is available."""
    if os.environ.get(AVAILABLE_RAM_ENV):
        from ..units import parse_size

        try:
            return parse_size(os.environ[AVAILABLE_RAM_ENV])
        except ValueError as e:
            raise EngineError(f"${AVAILABLE_RAM_ENV}: {e}") from None
    return int(psutil.virtual_memory().available)


@dataclass
class ModelInfo:
    name: str
    path: str
    model_type: str
    architecture: str
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    total_params: int
    expert_bytes: int  # one expert, all its tensors
    expert_bytes_total: int
    dense_bytes: int
    disk_bytes: int
    dtype: str
    has_tokenizer: bool
    has_chat_template: bool
    kv_bytes_per_token: int = 0
    weight_files: list[str] = field(default_factory=list)
    expert_matrices: list[list[int]] = field(default_factory=list)  # [out, in] of each matrix of one expert
    dense_linears: list[list[int]] = field(default_factory=list)  # [out, in] of each layer a dense format applies to
    ships_code: bool = False  # config.json's auto_map names Python files of the folder's own
    runs_own_code: bool = False  # ... and the user allowed them to run (else the built-in implementation runs)
    code_note: str = ""  # what runs, in words, for such a folder
    checkpoint_quantization: str = ""  # "fp8" or "mxfp4": the checkpoint's own format, dequantized as it loads

    def expert_bytes_in(self, fmt: str) -> int:
        """One expert's bytes when held in `fmt` (biases stay at the source precision)."""
        esize = torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        matrices = sum(o * i for o, i in self.expert_matrices) * esize
        held = sum(quantized_bytes(o, i, fmt, esize) for o, i in self.expert_matrices)
        return self.expert_bytes - matrices + held

    def dense_bytes_in(self, fmt: str) -> int:
        esize = torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        linears = sum(o * i for o, i in self.dense_linears) * esize
        return self.dense_bytes - linears + sum(quantized_bytes(o, i, fmt, esize) for o, i in self.dense_linears)

    def memory_estimate(self, device: str = "cpu", context: int = DEFAULT_CONTEXT, experts: str = "source",
                        dense: str = "source", paged: bool = False) -> dict:
        """Bytes needed in RAM and on the fast device, before loading anything. `paged`: the experts page
        in from the saved copy on the disk, and the RAM needs room for one token's experts only."""
        kv = self.kv_bytes_per_token * context
        overhead = 256 * 2**20  # torch, transformers, the tokenizer and activations
        expert_total = self.expert_bytes_in(experts) * self.num_experts * self.num_moe_layers
        one_token = self.expert_bytes_in(experts) * self.top_k * self.num_moe_layers
        in_ram = min(expert_total, one_token) if paged else expert_total
        out = {"expert_ram_bytes": in_ram, "experts_paged": paged,
               "experts_on_disk_bytes": expert_total if paged else 0}
        if device == "cuda":
            return {"ram_bytes": in_ram + overhead, "fast_device_bytes": self.dense_bytes_in(dense) + kv, **out}
        return {"ram_bytes": in_ram + self.dense_bytes_in(dense) + kv + overhead, "fast_device_bytes": 0, **out}

    def can_page(self, fmt: str, device: str = "cpu") -> bool:
        """Whether experts in `fmt` can page in from a saved copy: a quantized format this device's kernels
        take, made from safetensors weights (a GGUF file is not copied)."""
        if fmt not in ("int8", "int4") or not self.num_moe_layers or not self.weight_files:
            return False
        if not all(name.endswith(".safetensors") for name in self.weight_files):
            return False
        return fmt == "int8" or (device == "cpu" and all(int4_group_size(o, i) for o, i in self.expert_matrices))

    def formats(self, device: str = "cpu") -> dict:
        """Per expert format (dense following it on the CPU): bytes, whether it fits the free RAM, and
        for the quantized ones the RAM they need with the experts paged in from the disk instead."""
        available = available_ram()
        out = {}
        for fmt in FORMATS:
            dense = fmt if device == "cpu" else "source"
            ram = self.memory_estimate(device, experts=fmt, dense=dense)["ram_bytes"]
            out[fmt] = {"expert_bytes": self.expert_bytes_in(fmt), "dense": dense,
                        "expert_bytes_total": self.expert_bytes_in(fmt) * self.num_experts * self.num_moe_layers,
                        "ram_needed_bytes": ram, "fits_ram": ram <= available * RAM_HEADROOM,
                        "can_page": self.can_page(fmt, device)}
            if out[fmt]["can_page"]:
                paged = self.memory_estimate(device, experts=fmt, dense=dense, paged=True)["ram_bytes"]
                out[fmt].update(paged_ram_needed_bytes=paged, fits_paged=paged <= available * RAM_HEADROOM)
        return out

    def auto_format(self, device: str = "cpu") -> str | None:
        """The most precise expert format that fits the free RAM with headroom; None if none does."""
        fits = self.formats(device)
        return next((fmt for fmt in FORMATS if fits[fmt]["fits_ram"]), None)

    def auto_choice(self, device: str = "cpu") -> tuple[str, bool] | None:
        """What `--experts auto` loads: (format, paged). The most precise format that fits the free RAM;
        else the smallest one whose experts can page in from the disk with the rest in RAM (paged, each
        byte fewer is a byte less to read from the disk); None if neither."""
        fmt = self.auto_format(device)
        if fmt is not None:
            return fmt, False
        fits = self.formats(device)
        return next(((f, True) for f in reversed(FORMATS) if fits[f].get("fits_paged")), None)

    def to_dict(self) -> dict:
        d = asdict(self)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ram = self.memory_estimate(device)["ram_bytes"]
        choice = self.auto_choice(device) if self.num_moe_layers else ("source", False)
        d.update(ram_needed_bytes=ram, fits_ram=ram <= available_ram(), ram_available_bytes=available_ram(),
                 formats=self.formats(device), auto_experts=choice[0] if choice else None,
                 experts_paged=bool(choice and choice[1]))
        return d


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    info: ModelInfo
    runtime: object | None  # HybridRuntime, or None for a model without MoE layers
    device: torch.device
    experts: str = "source"  # the formats the experts and the dense layers are held in
    dense: str = "source"
    experts_paged: bool = False  # the experts do not fit the RAM: they page in from the saved copy on the disk
    paging: dict = field(default_factory=dict)  # then: the bytes on the disk, the free RAM, the copy's folder


# -- finding and checking files ---------------------------------------------------------------------
def _unreadable_named(fn):
    """A file or folder of the model that we may not read becomes a ModelError naming it, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PermissionError as e:
            raise ModelError(
                f"cannot read {e.filename or 'a file of the model'}: permission denied; give your user read access "
                "(e.g. chmod -R u+rX on the model folder) or copy the model to a folder you own") from None
        except OSError as e:
            if e.filename is None:
                raise
            raise ModelError(f"cannot read {e.filename}: {e.strerror or e}; check the disk and the file") from None

    return wrapper


def _blocked_parent(path: Path) -> Path | None:
    """The nearest existing parent folder we may not enter, when that is why `path` looks missing."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if os.access(parent, os.X_OK) else parent
    return None


def resolve_source(source: str | os.PathLike) -> Path:
    """A folder on disk, or a model id already in the local Hugging Face cache (never downloads)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{path} is a file; choose the model's folder (the one holding config.json)")
    blocked = _blocked_parent(path)
    if blocked is not None:
        raise PermissionError(13, "Permission denied", str(blocked))
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:
            pass
    raise ModelError(
        f"no model at {text!r}: it is neither a folder nor a model id in the local Hugging Face cache "
        "(MoE Chat never downloads; copy the model folder to this machine first)"
    )


# Pre-quantized checkpoints transformers dequantizes on the CPU one tensor at a time, so the engine's
# quantized reading gets them like source-precision weights: FP8 block-scaled (Qwen3 and DeepSeek -FP8
# releases) and GPT-OSS's MXFP4 experts.
CHECKPOINT_QUANTIZATIONS = ("fp8", "mxfp4")


def _checkpoint_quantization(path: Path, raw: dict) -> str:
    """The checkpoint's own quantization ("" for none); one the engine cannot read is refused by name."""
    qc = raw.get("quantization_config")
    if not qc:
        return ""
    method = str(qc.get("quant_method", "unknown")) if isinstance(qc, dict) else "unknown"
    if method not in CHECKPOINT_QUANTIZATIONS:
        raise ModelError(
            f"{path.name} is quantized with {method!r}, which MoE Chat cannot load (it reads FP8 and MXFP4 "
            "checkpoints); use the model's original bf16/fp16 release, which MoE Chat quantizes itself "
            "(int8/int4), or a GGUF file of it")
    return method


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not any(path.iterdir()):
        raise ModelError(f"{path} is empty; a model folder holds config.json and *.safetensors files")
    if not cfg.exists():
        raise ModelError(f"{path} has no config.json, so it is not a Hugging Face model folder")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg} is not valid JSON ({e}); the file is damaged, download it again") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelError(f"{index} is damaged ({e}); download it again") from None
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise ModelError(
                f"{path} is missing {len(missing)} of {len(names)} weight shards ({', '.join(missing[:3])}"
                f"{'…' if len(missing) > 3 else ''}); the download is incomplete, finish it and try again"
            )
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".gguf", ".pth")]
        hint = f" (found {', '.join(other[:3])}: convert them to safetensors)" if other else ""
        raise ModelError(f"{path} has no *.safetensors weights{hint}")
    return files


def read_safetensors_header(file: Path) -> dict:
    """The tensor table of a safetensors file, after checking the file is whole."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{file} is truncated ({size} bytes); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise ModelError(f"{file} has a corrupt safetensors header; download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{file} has a corrupt safetensors header; download it again") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file} has a corrupt safetensors header; download it again")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = t["data_offsets"]
            dtype, shape = t["dtype"], t["shape"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{file} has a corrupt entry for tensor {name!r}; download it again") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype in SAFETENSORS_DTYPES and dtype != "F4" and stop - start != numel * SAFETENSORS_DTYPES[dtype]:
            raise ModelError(f"{file}: tensor {name!r} has the wrong byte size; the file is corrupt")
        end = max(end, stop)
    if size < 8 + n + end:
        raise ModelError(
            f"{file} is truncated: {size} bytes on disk, {8 + n + end} expected; the download is incomplete"
        )
    return header


def _without_hub_links(text: str) -> str:
    """transformers' messages point at `https://huggingface.co/<repo>`; for a local folder that link is
    the folder's path glued to the Hub's address, which leads nowhere."""
    text = re.sub(r"\s*Checkout 'https://huggingface\.co/[^']*' for available files\.", "", text)
    return re.sub(r"\s*You can inspect the repository content at https://hf\.co/\S*", "", text)


def ships_code(raw: dict) -> bool:
    """config.json's `auto_map` names Python files of the folder's own (transformers' "remote code")."""
    return isinstance(raw.get("auto_map"), dict) and bool(raw["auto_map"])


def code_note(path: Path, raw: dict, trusted: bool) -> str:
    """What runs for a folder that ships its own code, for the log and the model picker ("" if none)."""
    if not ships_code(raw):
        return ""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if trusted:
        return (f"{path.name} ships its own code and you allowed it to run: MoE Chat runs the folder's Python "
                "files with your permissions")
    if raw.get("model_type") not in CONFIG_MAPPING:
        return (f"{path.name} ships its own code and MoE Chat has no built-in implementation of "
                f"{raw.get('model_type')!r}: it runs only with remote code enabled; enable it only if you trust it")
    return (f"{path.name} ships its own code; MoE Chat runs the built-in implementation of {raw.get('model_type')}; "
            "enable remote code only if you trust it")


def _check_code_files(path: Path, raw: dict) -> None:
    """The files `auto_map` names are in the folder (never fetched from another repository)."""
    refs = []
    for value in raw["auto_map"].values():
        refs.extend(value if isinstance(value, (list, tuple)) else [value])
    refs = [r for r in refs if isinstance(r, str)]
    elsewhere = [r for r in refs if "--" in r]
    if elsewhere:
        raise ModelError(f"{path / 'config.json'}: auto_map points at code in another repository ({elsewhere[0]}); "
                         "MoE Chat never downloads code: copy those files into the folder first")
    missing = sorted({r.split(".")[0] + ".py" for r in refs} - {p.name for p in path.glob("*.py")})
    if missing:
        raise ModelError(f"{path} is missing {', '.join(missing)}, the code its config.json's auto_map names; "
                         "the download is incomplete, copy the whole folder again")


def _make_config(path: Path, raw: dict, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if ships_code(raw) and not trust_remote_code:
            raise ModelError(
                f"{path.name} needs its own Python code to run ({model_type!r} is not built in; trust_remote_code). "
                "MoE Chat never runs model-supplied code unless you opt in (--trust-remote-code, or \"Run this "
                "folder's own code\" in the model picker), and only for folders you trust"
            )
        if not ships_code(raw):
            import transformers

            raise ModelError(
                f"unknown architecture {model_type!r} in {path / 'config.json'}: transformers "
                f"{transformers.__version__} does not know it (update transformers, or pick another model)"
            )
    if ships_code(raw) and trust_remote_code:
        _check_code_files(path, raw)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path / 'config.json'} could not be read: {_without_hub_links(str(e))}") from None


def _trusted(path: Path, trust_remote_code: bool | None) -> bool:
    """An explicit choice wins; None means the user's saved choice for this folder (off unless they opted in)."""
    if trust_remote_code is not None:
        return bool(trust_remote_code)
    from .catalog import remote_code_trusted

    return remote_code_trusted(path)


def _class_for(config, path: Path, raw: dict, trust_remote_code: bool):
    """The folder's own causal-LM class when the user opted in to its code; else the built-in one."""
    ref = raw["auto_map"].get("AutoModelForCausalLM") if ships_code(raw) else None
    if not (trust_remote_code and ref):
        return _model_class(config)
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        return get_class_from_dynamic_module(ref if isinstance(ref, str) else ref[0], path, local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path.name}'s own model code ({ref}) could not be loaded: {type(e).__name__}: "
                         f"{_without_hub_links(str(e))}") from None


def _model_class(config):
    """The causal-LM class for this config; else a transformers class that `architectures` names (a causal
    LM the auto mapping lacks, or a vision-language model's conditional-generation class, run on text)."""
    import transformers
    from transformers import AutoModelForCausalLM

    with contextlib.suppress(KeyError):
        cls = AutoModelForCausalLM._model_mapping[type(config)]
        if isinstance(config, getattr(cls, "config_class", None) or object):  # Qwen3.5-MoE's takes text only
            return cls
    named = getattr(config, "architectures", None) or []
    for name in named:
        cls = getattr(transformers, name, None) if name.endswith(TEXT_HEADS) else None
        if cls is not None and hasattr(cls, "generate"):
            return cls
    arch = (named or [config.model_type])[0]
    raise ModelError(f"{arch} is not a text-generation architecture (no causal-LM or conditional-generation "
                     "class); MoE Chat cannot chat with it")


def _dtype_of(config, headers: list[dict]) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for h in headers:
        for k, t in h.items():
            if k != "__metadata__" and t["dtype"] in names:
                return names[t["dtype"]]
    return torch.float32


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    per_layer = getattr(text, "per_layer_config", None) if hasattr(text, "per_layer_config") else None
    layers = [per_layer[i] for i in range(text.num_hidden_layers)] if per_layer else [text] * getattr(
        text, "num_hidden_layers", 0)
    return sum(_layer_kv_bytes(layer, dtype) for layer in layers)


def _layer_kv_bytes(layer, dtype: torch.dtype) -> int:
    """One layer's keys and values per token (its own config where layers differ)."""
    heads = getattr(layer, "num_key_value_heads", None) or getattr(layer, "num_attention_heads", 0)
    head_dim = getattr(layer, "head_dim", None) or (
        getattr(layer, "hidden_size", 0) // max(1, getattr(layer, "num_attention_heads", 1))
    )
    if getattr(layer, "kv_lora_rank", None):  # MLA caches full keys and values in transformers
        head_dim = (getattr(layer, "qk_nope_head_dim", 0) + getattr(layer, "qk_rope_head_dim", 0)
                    + getattr(layer, "v_head_dim", 0)) // 2
    return int(2 * heads * head_dim * torch.tensor([], dtype=dtype).element_size())


TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token", "moe_topk")
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")  # `...mlp.experts.3.gate_proj.weight`


def _top_k_field(config) -> tuple[str | None, int]:
    """The config field that says how many experts each token is routed to, and its value."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in TOP_K_FIELDS:
        v = getattr(text, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return attr, v
    return None, 0


def _top_k(config) -> int:
    return _top_k_field(config)[1]


def _check_config(path: Path, config) -> None:
    """Values no model can be built with, refused by name before anything is built from them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 1:
        raise ModelError(f"{path / 'config.json'}: num_hidden_layers is {layers}, but a model needs at least one "
                         "layer; the file is damaged or was edited by hand, download it again")


def _check_top_k(path: Path, config, num_experts: int) -> None:
    """Each token goes to between 1 and all of a layer's experts; anything else fails mid-generation."""
    name, k = _top_k_field(config)
    if name is not None and not 1 <= k <= num_experts:
        raise ModelError(f"{path / 'config.json'}: {name} is {k}, but each token must be routed to between 1 and "
                         f"the {num_experts} experts a layer has; the file is damaged or was edited by hand, "
                         "download it again")


def _check_expert_shapes(headers: list[tuple[Path, dict]]) -> None:
    """The experts of one layer all have the same shapes. One odd expert tensor would otherwise fail deep
    in transformers' weight conversion, with a message that names no tensor."""
    groups: dict[tuple[str, str], dict[tuple, list[tuple[Path, str]]]] = {}
    for file, header in headers:
        for key, t in header.items():
            m = _EXPERT_KEY.match(key)
            if m and isinstance(t, dict):
                groups.setdefault((m[1], m[3]), {}).setdefault(tuple(t["shape"]), []).append((file, key))
    for (_layer, name), shapes in groups.items():
        # one odd tensor, not groups of experts with their own sizes (Ernie-4.5-VL: text and vision experts)
        if len(shapes) > 1 and min(map(len, shapes.values())) == 1:
            expected = max(shapes, key=lambda s: len(shapes[s]))
            odd = min(shapes, key=lambda s: len(shapes[s]))
            file, key = shapes[odd][0]
            raise ModelError(
                f"{file.name}: tensor {key!r} has shape {odd}, but the layer's other experts have {name} of shape "
                f"{expected}; the file is damaged or mixes two models, download it again"
            )


def _check_expert_layers(meta_model, headers: list[tuple[Path, dict]]) -> None:
    """Where the model's experts have one shape in every layer, so do the checkpoint's: a layer whose
    experts were all saved in another shape is named here, before transformers' conversion trips on it."""
    shapes = {tuple((n, tuple(getattr(m, n).shape)) for n in expert_tensor_names(m))
              for m in meta_model.modules() if is_experts_module(m)}
    if len(shapes) != 1:
        return  # no experts, or layers whose experts differ by design
    by_name: dict[str, dict[tuple, list[tuple[Path, str]]]] = {}
    for file, header in headers:
        for key, t in header.items():
            m = _EXPERT_KEY.match(key)
            if m and isinstance(t, dict):
                by_name.setdefault(m[3], {}).setdefault(tuple(t["shape"]), []).append((file, key))
    for name, found in by_name.items():
        if len(found) > 1:
            expected = max(found, key=lambda s: len(found[s]))
            odd = min(found, key=lambda s: len(found[s]))
            file, key = found[odd][0]
            raise ModelError(
                f"{file.name}: tensor {key!r} has shape {odd}, but {name} has shape {expected} in the other "
                "layers and config.json gives every layer the same experts; the file is damaged or mixes two "
                "models, download it again"
            )


def _check_expert_sizes(meta_model, headers: list[tuple[Path, dict]]) -> None:
    """Per-expert matrices (`experts.3.up_proj.weight`) must have the sizes config.json gives the experts.
    Checkpoint names differ from the model's (transformers converts them on load), so each matrix is compared
    with the shapes an expert of the meta model has, in either orientation: when every expert of every layer
    was saved in one wrong shape, nothing else notices before transformers' conversion fails."""
    floats = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # packed int formats have other shapes
    allowed: list[tuple[int, int]] = []  # gate/up, down, fused gate_up; then the same transposed
    sizes = ""
    for m in meta_model.modules():
        if is_experts_module(m):
            down = tuple(m.down_proj.shape[1:])
            hidden, inter = down[::-1] if m.is_transposed else down
            shapes = [(inter, hidden), (hidden, inter)] + ([(2 * inter, hidden)] if m.has_gate else [])
            allowed += [s for s in shapes + [s[::-1] for s in shapes] if s not in allowed]
            sizes = sizes or f"intermediate size {inter}, hidden size {hidden}"
    if not allowed:
        return
    own = {n for n, _ in meta_model.named_parameters()}  # names the model shares: _check_shapes saw them
    for file, header in headers:
        for key, t in header.items():
            if (not isinstance(t, dict) or key in own or not key.endswith(".weight") or not _EXPERT_KEY.match(key)
                    or t.get("dtype") not in floats or len(t["shape"]) != 2):
                continue
            shape = tuple(t["shape"])
            if shape not in allowed:
                expected = max(allowed, key=lambda s: sum(a == b for a, b in zip(s, shape)))  # the nearest
                raise ModelError(
                    f"{file.name}: tensor {key!r} has shape {shape}, but config.json implies {expected} for it "
                    f"(experts of {sizes}); config.json and the weights belong to different models"
                )


def _check_shapes(meta_model, headers: list[tuple[Path, dict]]) -> None:
    """Tensors whose checkpoint name matches the model's must have the model's shape."""
    expected = {n: tuple(p.shape) for n, p in meta_model.named_parameters()}
    for file, header in headers:
        for name, t in header.items():
            if name in expected and tuple(t["shape"]) != expected[name]:
                raise ModelError(
                    f"{file.name}: tensor {name!r} has shape {tuple(t['shape'])} but config.json implies "
                    f"{expected[name]}; config.json and the weights belong to different models"
                )


@_unreadable_named
def inspect_model(source: str | os.PathLike, *, trust_remote_code: bool | None = None) -> ModelInfo:
    """Everything about a model that can be known without loading its weights (fast).

    `trust_remote_code`: run the folder's own Python code (True), never (False), or as the user chose
    for this folder in the model picker (None; off unless they opted in)."""
    from .. import gguf
    if gguf.is_gguf(source):  # a .gguf file, or a folder of them: engine/gguf reads it
        return gguf.inspect_gguf(source)
    path = resolve_source(source)
    raw = _read_config(path)
    quantization = _checkpoint_quantization(path, raw)
    trust_remote_code = _trusted(path, trust_remote_code)
    config = _make_config(path, raw, trust_remote_code)
    _check_config(path, config)
    files = _weight_files(path)
    headers = [(f, read_safetensors_header(f)) for f in files]
    dtype = _dtype_of(config, [h for _, h in headers])
    cls = _class_for(config, path, raw, trust_remote_code)
    try:
        with torch.device("meta"):
            meta = cls._from_config(config, dtype=dtype)
    except Exception as e:  # a value transformers' own code cannot build a model from
        raise ModelError(f"{path / 'config.json'} describes a {config.model_type} model that cannot be built "
                         f"({type(e).__name__}: {e}); the file is damaged or was edited by hand") from None
    _check_expert_shapes(headers)
    _check_shapes(meta, headers)
    _check_expert_layers(meta, headers)
    _check_expert_sizes(meta, headers)
    sizes = meta_sizes(meta, config, dtype)
    if sizes["num_moe_layers"]:
        _check_top_k(path, config, sizes["num_experts"])
    has_tok = any((path / f).exists() for f in TOKENIZER_FILES)
    chat_template = (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists()
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists():
        try:
            chat_template = chat_template or bool(json.loads(tok_cfg.read_text()).get("chat_template"))
        except json.JSONDecodeError:
            raise ModelError(f"{tok_cfg} is not valid JSON; the file is damaged, download it again") from None
    return ModelInfo(
        name=_display_name(path),
        path=str(path),
        architecture=(getattr(config, "architectures", None) or [cls.__name__])[0],
        num_layers=int(getattr(config.get_text_config(), "num_hidden_layers", 0)),
        disk_bytes=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        has_tokenizer=has_tok,
        has_chat_template=chat_template,
        weight_files=[f.name for f in files],
        **sizes,
        ships_code=ships_code(raw),
        runs_own_code=ships_code(raw) and trust_remote_code,
        code_note=code_note(path, raw, trust_remote_code),
        checkpoint_quantization=quantization,
    )


def _expert_matrices(module: torch.nn.Module) -> list[list[int]]:
    shapes = []
    for name in expert_tensor_names(module):
        if not name.endswith("_bias"):
            _, a, b = getattr(module, name).shape
            shapes.append([b, a] if module.is_transposed else [a, b])
    return shapes


def _display_name(path: Path) -> str:
    """`models--org--name/snapshots/<hash>` -> `org/name`; else the folder name."""
    parts = path.resolve().parts
    for p in parts:
        if p.startswith("models--"):
            return p[len("models--"):].replace("--", "/")
    return path.name


# -- loading ----------------------------------------------------------------------------------------
def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but torch sees no CUDA GPU (CPU-only torch build?)")
    return torch.device(device)


def default_threads() -> int:
    """`$MOE_CHAT_THREADS`, else the number of physical cores (hyper-threads do not help matmuls)."""
    if os.environ.get("MOE_CHAT_THREADS", "").isdigit():
        return max(1, int(os.environ["MOE_CHAT_THREADS"]))
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class _ProgressLoop:
    """Stands in for transformers' tqdm around its weight-loading loop: reports progress, honours cancel."""

    def __init__(self, progress: Progress | None, cancel: threading.Event | None, lo: float, hi: float,
                 reading: _QuantizedReading | None = None):
        self.progress, self.cancel, self.lo, self.hi, self.reading = progress, cancel, lo, hi, reading

    def __call__(self, iterable=None, *args, **kwargs):
        items = list(iterable) if iterable is not None else []
        if self.reading is not None:  # (target name, converter) pairs: the saved copy's are not read
            items = [it for it in items if not (isinstance(it, tuple) and isinstance(it[0], str)
                                                 and self.reading.skip(it[0]))]
        for i, item in enumerate(items):
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("loading was cancelled")
            if self.progress and (i % max(1, len(items) // 50) == 0):
                self.progress(self.lo + (self.hi - self.lo) * i / max(1, len(items)),
                              f"reading weights ({i}/{len(items)})")
            yield item
        if self.reading is not None:
            self.reading.finish()


def _pread_safe_open(safe_open):
    """Read weights with pread instead of mmap: pages of a mapped file would stay in our resident memory
    next to the converted copies, doubling the RAM a load needs."""

    def open_with_pread(file, framework, device="cpu", backend=None, **kwargs):
        if device == "cpu":
            backend = "pread"
        return safe_open(file, framework=framework, device=device, backend=backend, **kwargs)

    return open_with_pread


@contextlib.contextmanager
def _return_freed_memory():
    """While loading, make glibc give freed large blocks straight back to the OS.

    Converting checkpoints (e.g. per-expert tensors into one stacked tensor) frees as much as it
    allocates; glibc's adaptive threshold would keep those blocks in its heap, and the peak resident
    memory of a load would approach twice the model. Afterwards the threshold is set high again, so
    activations of the running model are recycled without system calls.
    """
    try:
        libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:
        libc = None
    m_mmap_threshold = -3
    if libc is not None:
        libc.mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(m_mmap_threshold, 32 << 20)


class _QuantizedReading:
    """Stands in for transformers' `set_param_for_module` while a model loads with quantized experts:
    each stacked expert parameter is quantized as it arrives, so the source-precision experts are never
    all in RAM at once; where the saved copy has it, the loading loop `skip`s it (never read) and
    `finish` takes it from the copy. The parameters themselves are left on the meta device."""

    def __init__(self, set_param, fmt: str, saved: dict[str, torch.Tensor] | None,
                 writer: quantized_copy.Writer | None = None):
        self.set_param, self.fmt, self.saved, self.writer = set_param, fmt, saved, writer
        self.context = None  # (model, loading_info), seen on the first call
        self.skipped: list[str] = []

    def skip(self, target_name: str) -> bool:
        if self.saved is not None and target_name + ".q" in self.saved:
            self.skipped.append(target_name)
            return True
        return False

    def __call__(self, model, target_name, param, loading_info, *args, **kwargs):
        self.context = (model, loading_info)
        module, name = self._expert(model, target_name)
        if module is not None:
            if not self._take_saved(module, name, target_name):
                quantize_stack(module, name, param, self.fmt)
                if self.writer is not None:  # to the copy on the disk, and mapped back from there
                    self.writer.add(target_name.rpartition(".")[0], name, module._moe_tensors)
            param = meta_like(param)
        return self.set_param(model, target_name, param, loading_info, *args, **kwargs)

    def finish(self) -> None:
        for target_name in self.skipped:
            model, loading_info = self.context
            module, name = self._expert(model, target_name)
            self._take_saved(module, name, target_name)
            self.set_param(model, target_name, meta_like(getattr(module, name)), loading_info, None)

    @staticmethod
    def _expert(model, target_name: str) -> tuple[torch.nn.Module | None, str]:
        module_path, _, name = target_name.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        if is_experts_module(module) and name in expert_tensor_names(module) and not name.endswith("_bias"):
            return module, name
        return None, name

    def _take_saved(self, module: torch.nn.Module, name: str, target_name: str) -> bool:
        if self.saved is None or target_name + ".q" not in self.saved:
            return False
        tensors = module.__dict__.setdefault("_moe_tensors", {})
        for part in (".q", ".scale"):
            tensors[name + part] = self.saved[target_name + part]
        return True


def _checkpoint_shapes(path: Path, target: str) -> str:
    """`gate_proj.weight (32, 48), up_proj.weight (32, 64) per expert`: what the checkpoint holds for one
    stacked parameter's module (its first expert), for a message."""
    prefix = target.rpartition(".")[0] + "."
    found = {}
    for file in _weight_files(path):
        for key, t in read_safetensors_header(file).items():
            m = _EXPERT_KEY.match(key)
            if key.startswith(prefix) and m and m[2] == "0":
                found[m[3]] = tuple(t["shape"])
    return ", ".join(f"{n} {shape}" for n, shape in sorted(found.items())) + " per expert" if found else "other shapes"


def _naming_conversion_errors(report, path: Path):
    """Stands in for transformers' load report: a failed weight conversion (which it reports as "look at
    the CONVERSION entries of the above report!", a report our quiet logging hides) becomes a ModelError
    that names the tensor and what went wrong."""

    def log_report(model, pretrained_model_name_or_path, ignore_mismatched_sizes, loading_info, logger=None):
        errors = getattr(loading_info, "conversion_errors", None) or {}
        if errors:
            key, detail = sorted(errors.items())[0]
            lines = [ln.strip() for ln in str(detail).splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(lines) if re.match(r"^\w+(Error|Exception): ", ln)), lines[-1] if lines else "")
            with contextlib.suppress(Exception):
                reason += f"; the model expects {key!r} of shape {tuple(model.get_parameter(key).shape)}"
                reason += f", the checkpoint has {_checkpoint_shapes(path, key)}"
            raise ModelError(
                f"{path.name}: the checkpoint's tensors for {key!r} do not fit together ({reason}); "
                f"config.json and the weights belong to different models, or a file is damaged"
                + (f" ({len(errors)} such tensors)" if len(errors) > 1 else ""))
        return report(model=model, pretrained_model_name_or_path=pretrained_model_name_or_path,
                      ignore_mismatched_sizes=ignore_mismatched_sizes, loading_info=loading_info, logger=logger)

    return log_report


def _from_pretrained(cls, path: Path, dtype, experts: bool, trust_remote_code: bool, progress, cancel,
                     fmt: str = "source", saved: dict[str, torch.Tensor] | None = None,
                     writer: quantized_copy.Writer | None = None):
    import transformers.core_model_loading as cml
    import transformers.modeling_utils as mu
    from transformers.utils import logging as hf_logging

    # Mismatched shapes come back in the loading info (and are refused below) rather than as an opaque error.
    kwargs = dict(dtype=dtype, output_loading_info=True, local_files_only=True, ignore_mismatched_sizes=True,
                  trust_remote_code=trust_remote_code)
    if experts:
        kwargs["experts_implementation"] = EXPERTS_IMPLEMENTATION
    original = getattr(cml, "tqdm", None)
    original_open = mu.safe_open
    original_report = mu.log_state_dict_report
    mu.log_state_dict_report = _naming_conversion_errors(original_report, path)
    reading = _QuantizedReading(cml.set_param_for_module, fmt, saved, writer) if fmt != "source" else None
    cml.tqdm = _ProgressLoop(progress, cancel, 0.1, 0.85, reading)
    mu.safe_open = _pread_safe_open(original_open)
    original_set = cml.set_param_for_module
    async_load = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    if reading is not None:  # one tensor at a time: read, quantize, free
        cml.set_param_for_module = reading
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _return_freed_memory():
            model, info = cls.from_pretrained(path, **kwargs)
    except (Cancelled, ModelError):
        raise
    except OSError as e:
        if e.filename is None:
            raise ModelError(f"{path.name} could not be loaded: {type(e).__name__}: {e}") from None
        raise  # named by _unreadable_named
    except MemoryError:
        raise InsufficientMemoryError(f"ran out of memory while loading {path.name}") from None
    except Exception as e:
        raise ModelError(f"{path.name} could not be loaded: {type(e).__name__}: {_without_hub_links(str(e))}") from None
    finally:
        cml.tqdm = original
        mu.safe_open = original_open
        mu.log_state_dict_report = original_report
        cml.set_param_for_module = original_set
        if async_load is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        hf_logging.set_verbosity(verbosity)
    if info.get("mismatched_keys"):
        name, found, expected = sorted(info["mismatched_keys"])[0]
        raise ModelError(
            f"{path.name}: tensor {name!r} has shape {tuple(found)} in the weights but config.json implies "
            f"{tuple(expected)} ({len(info['mismatched_keys'])} such tensors); config.json and the weights belong "
            "to different models"
        )
    if info.get("missing_keys"):
        keys = sorted(info["missing_keys"])
        raise ModelError(
            f"{path.name}: {len(keys)} weights are missing from the checkpoint ({', '.join(keys[:3])}"
            f"{'…' if len(keys) > 3 else ''}); the download is incomplete or belongs to another model"
        )
    return model


def _cpu_layout(model: torch.nn.Module, experts: list[torch.nn.Module]) -> tuple[str, str]:
    """(layout, product) of one-token products on the CPU (`cpu_layout`), measured on the first
    source-precision expert matrix, else the first linear layer's weight."""
    from ..moe.cpu_layout import one_row_layout

    ref = next((p for m in experts for n in expert_tensor_names(m) if not n.endswith("_bias")
                for p in [getattr(m, n)] if not p.is_meta), None)
    if ref is not None:
        out_features, in_features = (ref.shape[2], ref.shape[1]) if experts[0].is_transposed else ref.shape[1:]
    else:
        ref = next((m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.is_meta), None)
        if ref is None:
            return "in-out", "mm"
        out_features, in_features = ref.shape
    return one_row_layout(ref.dtype, int(out_features), int(in_features))


def _pinned(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True)
    return out.copy_(t)


def _place(model: torch.nn.Module, experts: list[torch.nn.Module], device: torch.device,
           progress: Progress | None = None, pin_experts: bool = True) -> None:
    """Dense weights to the fast device; routed experts stay on the CPU (pinned for fast copies).

    Matrices that the CPU will multiply by single tokens (all experts; dense layers too when the
    fast device is the CPU) are stored in the layout that streams fastest here (`cpu_layout`). Tied parameters stay tied. Quantized experts that
    page in from the disk (`pin_experts=False`) stay mapped: pinning would copy them all into RAM.
    """
    owner = {id(getattr(m, n)): m for m in experts for n in expert_tensor_names(m)}
    layout, product = _cpu_layout(model, experts)
    placed: dict[int, torch.nn.Parameter] = {}
    total = sum(p.numel() for p in model.parameters()) or 1
    done = 0
    for module in model.modules():
        quantized = getattr(module, "_moe_tensors", None)
        if quantized is not None and device.type == "cuda" and pin_experts:
            module._moe_tensors = {n: _pinned(t) for n, t in quantized.items()}
        for name, p in list(module._parameters.items()):
            if p is None or p.is_meta:  # meta: held quantized elsewhere
                continue
            if id(p) not in placed:
                data = p.data
                expert_module = owner.get(id(p))
                if expert_module is not None:
                    if data.dim() == 3:
                        data = laid_out(data, not expert_module.is_transposed, layout)
                    if device.type == "cuda":
                        data = _pinned(data)
                else:
                    data = data.to(device)
                    if device.type == "cpu" and isinstance(module, torch.nn.Linear) and name == "weight":
                        data = laid_out(data, True, layout)
                        module._moe_one_row_mv = product == "mv"  # `OneRowLinear` multiplies a token by mv
                placed[id(p)] = torch.nn.Parameter(data, requires_grad=False)
                step = p.numel() / total
                done += p.numel()
                if progress and (done / total) // 0.02 != (done / total - step) // 0.02:  # every 2%
                    progress(done / total)
            module._parameters[name] = placed[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)


def _load_tokenizer(path: Path, trust_remote_code: bool):
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except PermissionError:
        raise  # named by _unreadable_named
    except Exception as e:
        raise ModelError(f"the tokenizer files in {path} could not be read ({type(e).__name__}: "
                         f"{_without_hub_links(str(e))})") from None


def choose_formats(info: ModelInfo, device: str, experts: str, dense: str, check_memory: bool = True) -> tuple[str, str]:
    """Resolve the `--experts` / `--dense` choices. `auto` experts: the checkpoint's precision when the
    model fits the free RAM with headroom, else int8, else int4; `auto` dense: the experts' format when
    the fast device is the CPU (its bytes are read every token), the source precision on a GPU."""
    try:
        experts, dense = check_format(experts), check_format(dense)
    except ValueError as e:
        raise EngineError(str(e)) from None
    if info.num_moe_layers == 0:
        experts = "source"
    elif experts == "auto":
        choice = info.auto_choice(device) if check_memory else ("source", False)
        if choice is None:
            formats = info.formats(device)
            need = {f: v["ram_needed_bytes"] / 2**30 for f, v in formats.items()}
            paged = {f: v["paged_ram_needed_bytes"] / 2**30 for f, v in formats.items() if v.get("can_page")}
            raise InsufficientMemoryError(
                f"{info.name} needs about " + ", ".join(f"{v:.1f} GiB of RAM with {f} experts" for f, v in need.items())
                + "".join(f", {v:.1f} GiB with {f} experts paged in from the disk" for f, v in paged.items())
                + f", but only {available_ram() / 2**30:.1f} GiB is free; close other programs "
                "or pick a smaller model")
        experts = choice[0]
    if dense == "auto":
        dense = experts if device == "cpu" else "source"
    if device != "cpu" and dense != "source":
        raise EngineError("quantized dense layers run on the CPU only for now; use --dense source with a GPU")
    if device != "cpu" and experts == "int4":
        raise EngineError("int4 experts need the CPU as the fast device for now (their packing is the CPU "
                          "kernel's); use --experts int8 with a GPU")
    if experts == "int4" and any(int4_group_size(o, i) is None for o, i in info.expert_matrices):
        raise EngineError(f"{info.name}'s expert matrices {info.expert_matrices} do not fit the int4 kernel "
                          "(output channels divisible by 16, input channels by 32); use --experts int8")
    return experts, dense


def experts_paged(info: ModelInfo, device: str, experts: str, dense: str) -> bool:
    """Whether the experts page in from the saved copy on the disk: they are in a format that can, and
    the whole model in these formats does not fit the free RAM with headroom."""
    if not info.can_page(experts, device):
        return False
    return info.memory_estimate(device, experts=experts, dense=dense)["ram_bytes"] > available_ram() * RAM_HEADROOM


def _check_memory(info: ModelInfo, dev: torch.device, experts: str, dense: str, paged: bool = False) -> None:
    """Refuse, with the numbers, a model the free RAM (or GPU memory) cannot hold in these formats (with
    `paged` experts: the rest of it and one token's experts)."""
    need = info.memory_estimate(dev.type, experts=experts, dense=dense, paged=paged)
    available = available_ram()
    if paged and need["ram_bytes"] > available:
        raise InsufficientMemoryError(
            f"{info.name} does not fit even with its {experts} experts "
            f"({need['experts_on_disk_bytes'] / 2**30:.1f} GiB) paged in from the disk: the dense weights, the KV cache and one token's experts need about "
            f"{need['ram_bytes'] / 2**30:.1f} GiB of RAM, but only {available / 2**30:.1f} GiB is free; close other "
            "programs or pick a smaller model")
    if need["ram_bytes"] > available:
        raise InsufficientMemoryError(
            f"{info.name} needs about {need['ram_bytes'] / 2**30:.1f} GiB of RAM with {experts} experts but only "
            f"{available / 2**30:.1f} GiB is free; close other programs, try --experts int4, or pick a smaller model"
        )
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        if need["fast_device_bytes"] > free:
            raise InsufficientMemoryError(
                f"{info.name}'s dense weights and KV cache need about {need['fast_device_bytes'] / 2**30:.1f} GiB "
                f"of GPU memory but only {free / 2**30:.1f} GiB is free; use --device cpu or a smaller model"
            )


def meta_sizes(meta: torch.nn.Module, config, dtype: torch.dtype) -> dict:
    """The ModelInfo fields read off a model built on the meta device (safetensors folders and GGUF alike)."""
    experts = [m for m in meta.modules() if is_experts_module(m)]
    esize = torch.tensor([], dtype=dtype).element_size()
    total = sum(p.numel() for p in meta.parameters())
    expert_params = sum(getattr(m, n).numel() for m in experts for n in expert_tensor_names(m))
    num_experts = int(getattr(experts[0], expert_tensor_names(experts[0])[0]).shape[0]) if experts else 0
    return dict(
        model_type=config.model_type,
        num_moe_layers=len(experts),
        num_experts=num_experts,
        top_k=_top_k(config) if experts else 0,
        total_params=int(total),
        expert_bytes=int(expert_params // max(1, num_experts * len(experts)) * esize),
        expert_bytes_total=int(expert_params * esize),
        dense_bytes=int((total - expert_params) * esize),
        dtype=str(dtype).replace("torch.", ""),
        kv_bytes_per_token=_kv_bytes_per_token(config, dtype),
        expert_matrices=_expert_matrices(experts[0]) if experts else [],
        dense_linears=[[m.out_features, m.in_features] for _, _, m in dense_linears(meta)],
    )


@_unreadable_named
def load_model(
    source: str | os.PathLike,
    *,
    device: str = "auto",
    budget: int | float | str = 0.25,
    policy: str = "auto",
    scope: str = "per_layer",
    threads: int | None = None,
    force_slots: bool = False,
    profile: str | os.PathLike | None = "auto",
    trust_remote_code: bool | None = None,
    check_memory: bool = True,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    experts: str = "auto",
    dense: str = "auto",
    save_copy: bool = True,
) -> LoadedModel:
    """Load a model for the hybrid engine. `profile="auto"` warm-starts the cache from a saved profile;
    `experts` and `dense` are weight formats (see `choose_formats`); quantized experts are saved once
    in the user's data folder (`save_copy`) and read from there by later loads."""
    from .. import gguf
    if gguf.is_gguf(source):  # a .gguf file, or a folder of them: engine/gguf loads it
        return gguf.load_gguf(**{k: v for k, v in locals().items() if k != "gguf"})
    from ..cache.profiles import load_profile
    from ..moe.runtime import HybridRuntime

    report = progress or (lambda f, m: None)
    report(0.0, "checking files")
    info = inspect_model(source, trust_remote_code=trust_remote_code)
    trust_remote_code = _trusted(Path(info.path), trust_remote_code)
    if info.code_note:
        log.warning("%s", info.code_note)
    dev = pick_device(device)
    experts, dense = choose_formats(info, dev.type, experts, dense, check_memory)
    paged = check_memory and experts_paged(info, dev.type, experts, dense)
    if check_memory:
        _check_memory(info, dev, experts, dense, paged)
    torch.set_num_threads(threads or default_threads())
    path = Path(info.path)
    raw = _read_config(path)
    config = _make_config(path, raw, trust_remote_code)
    cls = _class_for(config, path, raw, trust_remote_code)
    dtype = getattr(torch, info.dtype)
    report(0.1, "reading weights")
    saved = quantized_copy.load(path, info.weight_files, experts) if experts != "source" else None
    if saved is not None:
        report(0.1, f"reading weights (experts from the saved {experts} copy)")
    paging = {}
    if paged:
        on_disk = info.memory_estimate(dev.type, experts=experts, dense=dense, paged=True)["experts_on_disk_bytes"]
        paging = {"experts_paged": True, "experts_on_disk_bytes": int(on_disk), "ram_available_bytes": available_ram(),
                  "paged_copy": str(quantized_copy.copy_dir(path, experts))}
        log.warning("%s: the %s experts (%.1f GiB) do not fit the %.1f GiB of free RAM; they page in from the "
                    "saved copy on the disk (slower)", info.name, experts, on_disk / 2**30,
                    paging["ram_available_bytes"] / 2**30)
    # a first load writes the copy as it quantizes (and maps it back), so the experts are never all in RAM
    writer = None
    if experts != "source" and saved is None and (save_copy or paged):
        why = (f"the {experts} experts ({paging['experts_on_disk_bytes'] / 2**30:.1f} GiB) do not fit the "
               f"{paging['ram_available_bytes'] / 2**30:.1f} GiB of free RAM") if paged else None
        writer = quantized_copy.Writer(path, info.weight_files, experts, required=why)
    try:
        model = _from_pretrained(cls, path, dtype, info.num_moe_layers > 0, trust_remote_code, progress, cancel,
                                 experts, saved, writer)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    model.eval()
    model.requires_grad_(False)
    if cancel is not None and cancel.is_set():
        raise Cancelled("loading was cancelled")
    from .session import text_model  # Qwen3-Omni chats with its thinker: its experts, its steps

    text = text_model(model)
    inside = {id(m) for m in text.modules()}
    named = main_experts({n: m for n, m in model.named_modules() if is_experts_module(m) and id(m) in inside})
    modules = list(named.values())
    if experts != "source":
        for m in modules:
            quantize_experts(m, experts)
        if writer is not None:
            report(0.85, f"saving the {experts} experts for the next load")
            for module_path, m in named.items():  # those not quantized while reading
                writer.add_module(module_path, m)
            writer.commit()
    if dense != "source":
        report(0.85, f"quantizing dense layers to {dense}")
        quantize_dense(model, dense)
    report(0.85, f"placing weights on {dev}")
    _place(model, modules, dev, lambda f: report(0.85 + 0.05 * f, f"placing weights on {dev}"), pin_experts=not paged)
    report(0.9, "loading the tokenizer")
    tokenizer = _load_tokenizer(path, trust_remote_code)
    runtime = None
    if modules:
        report(0.95, "calibrating the cost model")
        counts = load_profile(info, profile) if profile else None
        runtime = HybridRuntime(text, modules, dev, budget=budget, policy=policy, scope=scope,
                                force_slots=force_slots, profile=counts, dense_bytes=info.dense_bytes_in(dense))
        if paging:  # the stats snapshots say so (the app's memory panel shows it)
            snapshot = runtime.snapshot
            runtime.snapshot = lambda: {**snapshot(), **paging}
    else:
        log.info("%s has no MoE layers: it runs as a plain model, without an expert cache", info.name)
    report(1.0, "ready")
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, runtime=runtime, device=dev,
                       experts=experts, dense=dense, experts_paged=paged, paging=paging)
