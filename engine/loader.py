"""Open a local Hugging Face model folder, check it, estimate its memory, and load it for the hybrid engine.

Dense weights go to the fast device; routed experts stay in CPU memory (pinned when CUDA is present),
and the hybrid runtime decides per step which of them run from fast-device cache slots.
Every failure a person can cause (wrong folder, truncated download, wrong config) becomes a ModelError
that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
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

from .errors import Cancelled, InsufficientMemoryError, ModelError
from .experts import EXPERTS_IMPLEMENTATION, expert_tensor_names, is_experts_module

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 1,
}
DEFAULT_CONTEXT = 4096  # tokens of KV cache the memory estimate makes room for


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

    def memory_estimate(self, device: str = "cpu", context: int = DEFAULT_CONTEXT) -> dict:
        """Bytes needed in RAM and on the fast device, before loading anything."""
        kv = self.kv_bytes_per_token * context
        overhead = 256 * 2**20  # torch, transformers, the tokenizer and activations
        if device == "cuda":
            return {"ram_bytes": self.expert_bytes_total + overhead, "fast_device_bytes": self.dense_bytes + kv}
        return {"ram_bytes": self.expert_bytes_total + self.dense_bytes + kv + overhead, "fast_device_bytes": 0}

    def to_dict(self) -> dict:
        d = asdict(self)
        ram = self.memory_estimate("cuda" if torch.cuda.is_available() else "cpu")["ram_bytes"]
        d.update(ram_needed_bytes=ram, fits_ram=ram <= psutil.virtual_memory().available)
        return d


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    info: ModelInfo
    runtime: object | None  # HybridRuntime, or None for a model without MoE layers
    device: torch.device


# -- finding and checking files ---------------------------------------------------------------------
def resolve_source(source: str | os.PathLike) -> Path:
    """A folder on disk, or a model id already in the local Hugging Face cache (never downloads)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{path} is a file; choose the model's folder (the one holding config.json)")
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


def _make_config(path: Path, raw: dict, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if raw.get("auto_map") and not trust_remote_code:
            raise ModelError(
                f"{path.name} needs its own Python code to run (trust_remote_code). MoE Chat never runs "
                "model-supplied code unless you opt in (--trust-remote-code), and only for folders you trust"
            )
        if not raw.get("auto_map"):
            import transformers

            raise ModelError(
                f"unknown architecture {model_type!r} in {path / 'config.json'}: transformers "
                f"{transformers.__version__} does not know it (update transformers, or pick another model)"
            )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path / 'config.json'} could not be read: {e}") from None


def _model_class(config):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        arch = (getattr(config, "architectures", None) or [config.model_type])[0]
        raise ModelError(f"{arch} is not a text-generation (causal LM) architecture; MoE Chat cannot chat with it") from None


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
    layers = getattr(text, "num_hidden_layers", 0)
    heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 0)
    head_dim = getattr(text, "head_dim", None) or (
        getattr(text, "hidden_size", 0) // max(1, getattr(text, "num_attention_heads", 1))
    )
    if getattr(text, "kv_lora_rank", None):  # MLA caches full keys and values in transformers
        head_dim = (getattr(text, "qk_nope_head_dim", 0) + getattr(text, "qk_rope_head_dim", 0)
                    + getattr(text, "v_head_dim", 0)) // 2
    return int(2 * layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size())


def _top_k(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_experts_per_tok", "moe_top_k", "top_k", "num_experts_per_token", "moe_topk"):
        v = getattr(text, attr, None)
        if isinstance(v, int):
            return v
    return 0


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


def inspect_model(source: str | os.PathLike, *, trust_remote_code: bool = False) -> ModelInfo:
    """Everything about a model that can be known without loading its weights (fast)."""
    path = resolve_source(source)
    raw = _read_config(path)
    config = _make_config(path, raw, trust_remote_code)
    files = _weight_files(path)
    headers = [(f, read_safetensors_header(f)) for f in files]
    dtype = _dtype_of(config, [h for _, h in headers])
    cls = _model_class(config)
    with torch.device("meta"):
        meta = cls._from_config(config, dtype=dtype)
    _check_shapes(meta, headers)
    experts = [m for m in meta.modules() if is_experts_module(m)]
    esize = torch.tensor([], dtype=dtype).element_size()
    total = sum(p.numel() for p in meta.parameters())
    expert_params = sum(getattr(m, n).numel() for m in experts for n in expert_tensor_names(m))
    num_experts = int(getattr(experts[0], expert_tensor_names(experts[0])[0]).shape[0]) if experts else 0
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
        model_type=config.model_type,
        architecture=(getattr(config, "architectures", None) or [cls.__name__])[0],
        num_layers=int(getattr(config.get_text_config(), "num_hidden_layers", 0)),
        num_moe_layers=len(experts),
        num_experts=num_experts,
        top_k=_top_k(config) if experts else 0,
        total_params=int(total),
        expert_bytes=int(expert_params // max(1, num_experts * len(experts)) * esize),
        expert_bytes_total=int(expert_params * esize),
        dense_bytes=int((total - expert_params) * esize),
        disk_bytes=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        dtype=str(dtype).replace("torch.", ""),
        has_tokenizer=has_tok,
        has_chat_template=chat_template,
        kv_bytes_per_token=_kv_bytes_per_token(config, dtype),
        weight_files=[f.name for f in files],
    )


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

    def __init__(self, progress: Progress | None, cancel: threading.Event | None, lo: float, hi: float):
        self.progress, self.cancel, self.lo, self.hi = progress, cancel, lo, hi

    def __call__(self, iterable=None, *args, **kwargs):
        items = list(iterable) if iterable is not None else []
        for i, item in enumerate(items):
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("loading was cancelled")
            if self.progress and (i % max(1, len(items) // 50) == 0):
                self.progress(self.lo + (self.hi - self.lo) * i / max(1, len(items)),
                              f"reading weights ({i}/{len(items)})")
            yield item


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


def _from_pretrained(cls, path: Path, dtype, experts: bool, trust_remote_code: bool, progress, cancel):
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
    cml.tqdm = _ProgressLoop(progress, cancel, 0.1, 0.85)
    mu.safe_open = _pread_safe_open(original_open)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _return_freed_memory():
            model, info = cls.from_pretrained(path, **kwargs)
    except (Cancelled, ModelError):
        raise
    except MemoryError:
        raise InsufficientMemoryError(f"ran out of memory while loading {path.name}") from None
    except Exception as e:
        raise ModelError(f"{path.name} could not be loaded: {type(e).__name__}: {e}") from None
    finally:
        cml.tqdm = original
        mu.safe_open = original_open
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


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix (or stack of matrices), stored column by column.

    For one token, a CPU matmul then streams the weights contiguously: measured about twice the
    bandwidth of the row-major layout transformers loads (MKL and oneDNN, AMD and Intel alike).
    """
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True)
    return out.copy_(t)


def _place(model: torch.nn.Module, experts: list[torch.nn.Module], device: torch.device,
           progress: Progress | None = None) -> None:
    """Dense weights to the fast device; routed experts stay on the CPU (pinned for fast copies).

    Matrices that the CPU will multiply by single tokens (all experts; dense layers too when the
    fast device is the CPU) are stored column-major. Tied parameters stay tied.
    """
    owner = {id(getattr(m, n)): m for m in experts for n in expert_tensor_names(m)}
    placed: dict[int, torch.nn.Parameter] = {}
    total = sum(p.numel() for p in model.parameters()) or 1
    done = 0
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in placed:
                data = p.data
                expert_module = owner.get(id(p))
                if expert_module is not None:
                    if data.dim() == 3 and not expert_module.is_transposed:
                        data = column_major(data)
                    if device.type == "cuda":
                        data = _pinned(data)
                else:
                    data = data.to(device)
                    if device.type == "cpu" and isinstance(module, torch.nn.Linear) and name == "weight":
                        data = column_major(data)
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
    except Exception as e:
        raise ModelError(f"the tokenizer files in {path} could not be read ({type(e).__name__}: {e})") from None


def load_model(
    source: str | os.PathLike,
    *,
    device: str = "auto",
    budget: int | float | str = 0.25,
    policy: str = "lru",
    scope: str = "per_layer",
    threads: int | None = None,
    force_slots: bool = False,
    profile: str | os.PathLike | None = "auto",
    trust_remote_code: bool = False,
    check_memory: bool = True,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> LoadedModel:
    """Load a model for the hybrid engine. `profile="auto"` warm-starts the cache from a saved profile."""
    from .profiling import load_profile
    from .runtime import HybridRuntime

    report = progress or (lambda f, m: None)
    report(0.0, "checking files")
    info = inspect_model(source, trust_remote_code=trust_remote_code)
    dev = pick_device(device)
    need = info.memory_estimate(dev.type)
    available = psutil.virtual_memory().available
    if check_memory and need["ram_bytes"] > available:
        raise InsufficientMemoryError(
            f"{info.name} needs about {need['ram_bytes'] / 2**30:.1f} GiB of RAM but only "
            f"{available / 2**30:.1f} GiB is free; close other programs or pick a smaller model"
        )
    if check_memory and dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        if need["fast_device_bytes"] > free:
            raise InsufficientMemoryError(
                f"{info.name}'s dense weights and KV cache need about {need['fast_device_bytes'] / 2**30:.1f} GiB "
                f"of GPU memory but only {free / 2**30:.1f} GiB is free; use --device cpu or a smaller model"
            )
    torch.set_num_threads(threads or default_threads())
    path = Path(info.path)
    raw = _read_config(path)
    config = _make_config(path, raw, trust_remote_code)
    cls = _model_class(config)
    dtype = getattr(torch, info.dtype)
    report(0.1, "reading weights")
    model = _from_pretrained(cls, path, dtype, info.num_moe_layers > 0, trust_remote_code, progress, cancel)
    model.eval()
    model.requires_grad_(False)
    if cancel is not None and cancel.is_set():
        raise Cancelled("loading was cancelled")
    experts = [m for m in model.modules() if is_experts_module(m)]
    report(0.85, f"placing weights on {dev}")
    _place(model, experts, dev, lambda f: report(0.85 + 0.05 * f, f"placing weights on {dev}"))
    report(0.9, "loading the tokenizer")
    tokenizer = _load_tokenizer(path, trust_remote_code)
    runtime = None
    if experts:
        report(0.95, "calibrating the cost model")
        counts = load_profile(info, profile) if profile else None
        runtime = HybridRuntime(model, experts, dev, budget=budget, policy=policy, scope=scope,
                                force_slots=force_slots, profile=counts, dense_bytes=info.dense_bytes)
    else:
        log.info("%s has no MoE layers: it runs as a plain model, without an expert cache", info.name)
    report(1.0, "ready")
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, runtime=runtime, device=dev)
