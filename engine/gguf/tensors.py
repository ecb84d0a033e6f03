"""GGUF tensors -> the transformers model's parameters, one tensor at a time.

Names come from transformers' GGUF->HF map (`get_gguf_hf_weights_map`, which already maps llama.cpp's
stacked `ffn_{gate,up,down}_exps` onto v5's stacked `experts.gate_up_proj` / `down_proj`). Dense tensors
are dequantized to the model's dtype. Expert matrices are converted row block by row block into the
engine's formats (`engine.moe.quantize`): Q4_0 maps onto int4 (groups of 32, float32 scales) exactly,
Q4_K onto int4 groups of 32 to within float32 rounding of its zero points; every other type is
dequantized and re-quantized (int8 per output channel, or int4), or dequantized for `source`.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..errors import ModelError
from ..moe.quantize import int4_group_size, quantize
from .reader import GGUFModel, as_array

FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML type -> torch dtype
Q4_0, Q4_K = 2, 12
EXPERT_TENSOR = re.compile(r"\.ffn_(gate|up|down)(_exps|\.\d+)\.(weight|bias)$")  # stacked, or one per expert


def is_expert_tensor(name: str) -> bool:
    return EXPERT_TENSOR.search(name) is not None


def tensor(gguf: GGUFModel, name: str, expert: int = 0):
    """A tensor by name; `{e}` in the name stands for the expert (llama.cpp's Mixtral files before
    April 2024 hold one tensor per expert, `blk.N.ffn_gate.E.weight`, not stacked `ffn_gate_exps`)."""
    return gguf.tensors[name.format(e=expert)]


def ggml_type_name(t: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(t).name


def type_by_name(name: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[name])


def check_types(gguf: GGUFModel) -> None:
    """Every tensor is of a type the gguf package can dequantize (else a ModelError naming one)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    for name, t in gguf.tensors.items():
        if t.tensor_type not in FLOAT_TYPES and t.tensor_type not in _type_traits:
            raise ModelError(f"{gguf.files[0].name}: tensor {name!r} is of GGML type "
                             f"{GGMLQuantizationType(t.tensor_type).name}, which the installed gguf package cannot "
                             "dequantize; update gguf (pip install -U gguf) or pick another quantization")


def native_format(ggml_type: int) -> str:
    """The engine format closest to a GGML type: source for floats, int4 for 4 bits and fewer, else int8."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if ggml_type in FLOAT_TYPES:
        return "source"
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return "int4" if size * 8 / block <= 5.0 else "int8"


def weight_map(meta_model, gguf: GGUFModel) -> dict[str, list[str]]:
    """HF parameter name -> the GGUF tensor names it is made of (gate before up for `gate_up_proj`)."""
    from transformers.modeling_gguf_pytorch_utils import Qwen2MoeTensorProcessor, get_gguf_hf_weights_map

    try:
        to_hf = get_gguf_hf_weights_map(meta_model, Qwen2MoeTensorProcessor(), model_type=gguf.architecture)
    except NotImplementedError as e:
        raise ModelError(f"{gguf.files[0].name}: {e}") from None
    out: dict[str, list[str]] = {}
    for g, hf in to_hf.items():
        if not g.endswith((".weight", ".bias")) and "_exps" in g:
            g += ".weight"  # the stacked experts are mapped without their suffix
        if "_exps." in g and g not in gguf.tensors and g.replace("_exps.", ".0.") in gguf.tensors:
            g = g.replace("_exps.", ".{e}.")  # one tensor per expert
        out.setdefault(hf, []).append(g)
    for hf, names in out.items():
        names.sort(key=lambda n: 1 if "_up_exps" in n else 0)  # gate first
    for hf in [n for n, _ in meta_model.named_parameters() if n.endswith("_proj_bias") and ".experts." in n]:
        stem = hf.rsplit(".", 1)[0]
        if hf.endswith("gate_up_proj_bias"):
            out[hf] = [out[stem + ".gate_up_proj"][0].replace(".weight", ".bias"),
                       out[stem + ".gate_up_proj"][1].replace(".weight", ".bias")]
        else:
            out[hf] = [out[stem + ".down_proj"][0].replace(".weight", ".bias")]
    return out


def dequantized(t) -> np.ndarray:
    """float32 values of a tensor, in torch's dimension order."""
    from gguf.quants import dequantize

    w = np.asarray(dequantize(as_array(t), t.tensor_type), dtype=np.float32)
    return w if w.flags.writeable else w.copy()  # F32 data is the read-only memory map itself


def dense_tensor(gguf: GGUFModel, names: list[str], shape: tuple, dtype: torch.dtype, config: dict) -> torch.Tensor:
    """A dense parameter: dequantized, un-permuted where llama.cpp permuted it (llama's Q and K), reshaped."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    (name,) = names
    t = gguf.tensors[name]
    if t.tensor_type in FLOAT_TYPES and gguf.architecture != "llama":
        values = torch.from_numpy(np.array(as_array(t))).view(FLOAT_TYPES[t.tensor_type])
    else:
        w = dequantized(t)
        if gguf.architecture == "llama":
            w = LlamaTensorProcessor(config).process(w, name).weights
        w = np.ascontiguousarray(w)
        values = torch.from_numpy(w if w.flags.writeable else w.copy())
    if values.numel() != int(np.prod(shape)):
        raise ModelError(f"{gguf.files[0].name}: tensor {name!r} has {values.numel()} values but the model "
                         f"expects shape {tuple(shape)}; the metadata and the tensors do not match")
    return values.reshape(shape).to(dtype)


def expert_rows(gguf: GGUFModel, names: list[str], expert: int, interleaved: bool) -> tuple[np.ndarray, int]:
    """One expert's matrix [out, in] as raw GGUF rows (values or quantized blocks) and their GGML type;
    gate and up stacked (or interleaved row by row, GPT-OSS) into one matrix."""
    parts = [tensor(gguf, n, expert) for n in names]
    types = {p.tensor_type for p in parts}
    pick = [(lambda a: a) if "{e}" in n else (lambda a: a[expert]) for n in names]
    if len(types) != 1:  # gate and up quantized differently: meet in float32
        rows = [f(dequantized(p)) for f, p in zip(pick, parts)]
        kind = 0
    else:
        rows = [f(as_array(p)) for f, p in zip(pick, parts)]
        kind = parts[0].tensor_type
    if len(rows) == 1:
        return rows[0], kind
    if interleaved:
        out = np.empty((rows[0].shape[0] * 2, *rows[0].shape[1:]), dtype=rows[0].dtype)
        out[0::2], out[1::2] = rows
        return out, kind
    return np.concatenate(rows, axis=0), kind


def rows_to_float(rows: np.ndarray, ggml_type: int) -> torch.Tensor:
    from gguf.quants import dequantize

    if ggml_type in FLOAT_TYPES:
        return torch.from_numpy(np.array(rows)).view(FLOAT_TYPES[ggml_type]).float()
    return torch.from_numpy(np.asarray(dequantize(rows, ggml_type), dtype=np.float32))


def _int4(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's int4 of w = (code - 8) * scale + zero, groups of 32 along the input channels."""
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes.astype(np.int32)), 1)
    sz = torch.stack([torch.from_numpy(scale), torch.from_numpy(zero)], dim=-1)  # [out, in/32, 2]
    return packed, sz.transpose(0, 1).contiguous()


def q4_0_to_int4(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (w = d * (q - 8), fp16 d per 32) is the engine's int4 with scale d, zero 0: exact with
    float32 scales (bfloat16 would round d)."""
    out = rows.shape[0]
    b = rows.reshape(out, -1, 18)
    d = np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(out, -1)  # low nibbles: the first 16
    return _int4(codes, d, np.zeros_like(d))


def q4_k_to_int4(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K (per 32: w = d*sc * q - dmin*m) is int4 with scale d*sc and zero 8*d*sc - dmin*m."""
    from gguf.quants import Q4_K as K

    out = rows.shape[0]
    b = rows.reshape(-1, 144)
    d = np.ascontiguousarray(b[:, 0:2]).view(np.float16).astype(np.float32)
    dmin = np.ascontiguousarray(b[:, 2:4]).view(np.float16).astype(np.float32)
    sc, m = K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(out, -1)
    scale = (d * sc.astype(np.float32)).reshape(out, -1)
    mins = (dmin * m.astype(np.float32)).reshape(out, -1)
    return _int4(codes, scale, (8 * scale - mins).astype(np.float32))


def expert_matrix(rows: np.ndarray, ggml_type: int, fmt: str, dtype: torch.dtype):
    """One expert matrix [out, in] in `fmt`: a float tensor for source, else (codes, scales)."""
    if fmt == "int4" and int4_group_size(rows.shape[0], 32) is not None:
        if ggml_type == Q4_0:
            return q4_0_to_int4(rows)
        if ggml_type == Q4_K:
            return q4_k_to_int4(rows)
    w = rows_to_float(rows, ggml_type)
    return w.to(dtype) if fmt == "source" else quantize(w, fmt)
