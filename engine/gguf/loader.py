"""Inspect and load a GGUF model for the hybrid engine, as `engine.model.loader` does a safetensors folder:
the model is built with its parameters on the meta device and filled tensor by tensor from the
memory-mapped file, experts going straight into the engine's format (see `tensors`)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from ..errors import Cancelled, ModelError
from ..model.loader import ModelInfo, meta_sizes
from ..moe.interface import EXPERTS_IMPLEMENTATION, expert_tensor_names, is_experts_module
from ..moe.quantize import FORMATS, meta_like
from . import tensors as gt
from .config import config_dict, make_config
from .reader import GGUFModel, open_model
from .tokenizer import has_tokenizer, load_tokenizer

def model_dtype(gguf: GGUFModel) -> torch.dtype:
    """The dtype weights are dequantized to: the float type of the file's dense matrices when they all
    share one (the experts are held in their own format), else (quantized dense layers) bfloat16."""
    dense = [t.tensor_type for n, t in gguf.tensors.items() if len(t.shape) > 1 and not gt.is_expert_tensor(n)]
    floats = {gt.FLOAT_TYPES.get(t) for t in dense}
    return floats.pop() if len(floats) == 1 and None not in floats else torch.bfloat16


@contextlib.contextmanager
def _meta_parameters():
    """Build a model whose parameters are on the meta device but whose buffers (rotary tables) are real."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _build(gguf: GGUFModel, dtype: torch.dtype):
    from ..model.loader import _model_class

    config = make_config(gguf)
    cls = _model_class(config)
    try:
        with _meta_parameters():
            model = cls._from_config(config, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION)
    except Exception as e:
        raise ModelError(f"{gguf.files[0].name} describes a {config.model_type} model that cannot be built "
                         f"({type(e).__name__}: {e}); the file's metadata is damaged or unusual") from None
    return model, config


def expert_type(gguf: GGUFModel) -> int | None:
    """The GGML type of the experts (the most common one over their tensors), None without experts."""
    types = [t.tensor_type for n, t in gguf.tensors.items() if gt.is_expert_tensor(n) and n.endswith(".weight")]
    return max(set(types), key=types.count) if types else None


@dataclass
class GGUFModelInfo(ModelInfo):
    """A GGUF's `ModelInfo`: the GGML type of its experts, and int4 bytes as `tensors` holds Q4_0 / Q4_K
    experts (groups of 32 with a float32 scale and zero: 0.75 bytes a weight)."""

    quant: str = ""  # the experts' GGML type, e.g. "Q4_K"

    def expert_bytes_in(self, fmt: str) -> int:
        if fmt != "int4" or self.quant not in ("Q4_0", "Q4_K"):
            return super().expert_bytes_in(fmt)
        esize = torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()
        matrices = sum(o * i for o, i in self.expert_matrices)
        return self.expert_bytes - matrices * esize + matrices // 2 + matrices // 32 * 8

    def native_format(self, device: str = "cpu") -> str:
        """The engine format nearest the file's experts (Q4 -> int4, Q5/Q6/Q8 -> int8, floats -> source);
        int8 for int4 on a GPU (the int4 kernel is the CPU's)."""
        fmt = gt.native_format(gt.type_by_name(self.quant)) if self.quant else "source"
        return "int8" if fmt == "int4" and device != "cpu" else fmt

    def auto_format(self, device: str = "cpu") -> str | None:
        """The native format, or a smaller one where it does not fit the free RAM; None if none fits."""
        fits = self.formats(device)
        later = FORMATS[FORMATS.index(self.native_format(device)):]
        return next((fmt for fmt in later if fits[fmt]["fits_ram"]), None)


def inspect_gguf(source, gguf: GGUFModel | None = None) -> GGUFModelInfo:
    """`ModelInfo` of a GGUF model, without reading its tensor data (`gguf`: the model already opened)."""

    gguf = gguf or open_model(source)
    gt.check_types(gguf)
    dtype = model_dtype(gguf)
    meta, config = _build(gguf, dtype)
    names = gt.weight_map(meta, gguf)
    params = dict(meta.named_parameters())
    missing = [n for n in params if n not in names or any(g.format(e=0) not in gguf.tensors for g in names[n])]
    if missing:
        raise ModelError(f"{gguf.files[0].name} lacks {len(missing)} of the model's tensors ({', '.join(missing[:3])}"
                         f"{'…' if len(missing) > 3 else ''}); the file is incomplete or of an unusual variant")
    etype = expert_type(gguf)
    return GGUFModelInfo(
        name=gguf.files[0].name.removesuffix(".gguf"),
        path=str(gguf.files[0]),
        architecture=(getattr(config, "architectures", None) or [type(meta).__name__])[0],
        num_layers=int(config.num_hidden_layers),
        disk_bytes=sum(f.stat().st_size for f in gguf.files),
        has_tokenizer=has_tokenizer(gguf),
        has_chat_template=bool(gguf.metadata.get("tokenizer.chat_template")),
        weight_files=[f.name for f in gguf.files],
        **meta_sizes(meta, config, dtype),
        quant=gt.ggml_type_name(etype) if etype is not None else "",
    )


def _fill(model, gguf: GGUFModel, config, fmt: str, dtype: torch.dtype, report, cancel) -> None:
    """Every parameter from its GGUF tensors; experts held in `fmt`, each expert converted on its own."""
    names = gt.weight_map(model, gguf)
    cfg = config_dict(gguf)
    items = list(model.named_parameters(remove_duplicate=False))
    for i, (name, p) in enumerate(items):
        if cancel is not None and cancel.is_set():
            raise Cancelled("loading was cancelled")
        if i % max(1, len(items) // 50) == 0:
            report(i / max(1, len(items)), f"reading weights ({i}/{len(items)})")
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        if not p.is_meta:
            continue  # tied to one already read
        if name not in names:
            raise ModelError(f"{gguf.files[0].name} has no tensor for {name}; the file is incomplete")
        if is_experts_module(module) and attr in expert_tensor_names(module):
            _fill_experts(module, attr, names[name], gguf, fmt, dtype)
        else:
            value = gt.dense_tensor(gguf, names[name], tuple(p.shape), dtype, cfg)
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        gguf.release_pages()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()


def _fill_experts(module, attr: str, gguf_names: list[str], gguf: GGUFModel, fmt: str, dtype: torch.dtype) -> None:
    param = getattr(module, attr)
    if attr.endswith("_bias"):  # [E, out]: stays at the source precision
        parts = [torch.from_numpy(gt.dequantized(gguf.tensors[n])) for n in gguf_names]
        if len(parts) == 2:
            bias = torch.stack(parts, dim=-1).flatten(1) if module.is_transposed else torch.cat(parts, dim=1)
        else:
            bias = parts[0]
        bias = bias.reshape(param.shape).to(dtype)
        module._parameters[attr] = torch.nn.Parameter(bias, requires_grad=False)
        if fmt != "source":
            module.__dict__.setdefault("_moe_tensors", {})[attr] = bias
        return
    interleaved = module.is_transposed  # GPT-OSS: gate and up alternate, stored [in, out]
    stacks: list[torch.Tensor] = []  # filled expert by expert: one layer's experts are never held twice
    for e in range(param.shape[0]):
        mat = gt.expert_matrix(*gt.expert_rows(gguf, gguf_names, e, interleaved), fmt, dtype)
        parts = [mat.T if module.is_transposed else mat] if fmt == "source" else list(mat)
        if not stacks:
            stacks = [torch.empty((param.shape[0], *p.shape), dtype=p.dtype) for p in parts]
        for stack, part in zip(stacks, parts):
            stack[e] = part
    if fmt == "source":
        module._parameters[attr] = torch.nn.Parameter(stacks[0].reshape(param.shape), requires_grad=False)
        return
    tensors = module.__dict__.setdefault("_moe_tensors", {})
    tensors[attr + ".q"], tensors[attr + ".scale"] = stacks
    module._moe_format = fmt
    module._parameters[attr] = meta_like(param)


def load_gguf(source, *, device: str = "auto", budget=0.25, policy: str = "auto", scope: str = "per_layer",
              threads: int | None = None, force_slots: bool = False, profile="auto", trust_remote_code=None,
              check_memory: bool = True, progress=None, cancel: threading.Event | None = None,
              experts: str = "auto", dense: str = "auto", save_copy: bool = True):
    """`load_model` for a GGUF file or folder (same arguments; `save_copy` is moot: the GGUF already is
    the compact copy, and GGUF files run no code of their own, so `trust_remote_code` is ignored)."""
    from ..cache.profiles import load_profile
    from ..model.loader import (LoadedModel, _check_memory, _place, choose_formats, default_threads,
                                pick_device)
    from ..moe.quantize import quantize_dense
    from ..moe.runtime import HybridRuntime

    report = progress or (lambda f, m: None)
    report(0.0, "checking files")
    gguf = open_model(source)
    info = inspect_gguf(source, gguf)
    dev = pick_device(device)
    if experts == "auto" and info.num_moe_layers:  # resolved here: `choose_formats` would pick source
        experts = (info.auto_format(dev.type) if check_memory else info.native_format(dev.type)) or "auto"
    experts, dense = choose_formats(info, dev.type, experts, dense, check_memory)
    if check_memory:
        _check_memory(info, dev, experts, dense)
    torch.set_num_threads(threads or default_threads())
    dtype = getattr(torch, info.dtype)
    model, config = _build(gguf, dtype)
    report(0.1, "reading weights")
    _fill(model, gguf, config, experts, dtype, lambda f, m: report(0.1 + 0.75 * f, m), cancel)
    model.eval()
    model.requires_grad_(False)
    modules = [m for m in model.modules() if is_experts_module(m)]
    if dense != "source":
        report(0.85, f"quantizing dense layers to {dense}")
        quantize_dense(model, dense)
    report(0.85, f"placing weights on {dev}")
    _place(model, modules, dev, lambda f: report(0.85 + 0.05 * f, f"placing weights on {dev}"))
    report(0.9, "loading the tokenizer")
    tokenizer = load_tokenizer(gguf)
    runtime = None
    if modules:
        report(0.95, "calibrating the cost model")
        try:
            counts = load_profile(info, profile) if profile else None
        except OSError:  # engine.cache.profiles fingerprints a folder's config.json, which a GGUF lacks
            counts = None
        runtime = HybridRuntime(model, modules, dev, budget=budget, policy=policy, scope=scope,
                                force_slots=force_slots, profile=counts, dense_bytes=info.dense_bytes_in(dense))
    report(1.0, "ready")
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, runtime=runtime, device=dev,
                       experts=experts, dense=dense)
