"""The memory layout in which the CPU multiplies one token by a weight matrix fastest, per dtype and shape.

A decode step computes x [1, in] @ B [in, out] for every expert and dense matrix. B can be stored
contiguous ("in-out") or with its transpose contiguous ("out-in", as checkpoints ship nn.Linear
weights), and which one streams faster depends on the CPU, the BLAS and the dtype: on this project's
Intel Xeon, bfloat16 "out-in" by matrix-vector product runs 3-4x faster than "in-out", while float32
is about even there and other machines have preferred "in-out" 2:1. So it is measured, once per
machine, dtype and shape of the first expert matrix (remembered by `kernel_choices`), over more bytes
than a large L3 holds; the model's other matrices, dense layers included, follow that choice.
"""

from __future__ import annotations

import os
import time

import torch

from .kernel_choices import bytes_past_cache, remembered

LAYOUTS = ("in-out", "out-in")
LAYOUT_ENV = "MOE_CHAT_CPU_LAYOUT"  # pins one of LAYOUTS, "out-in mv" also the product (tests, diagnostics)


def _seconds(mats: list[torch.Tensor], x: torch.Tensor, op) -> float:
    """Best of three passes of op(x, m) (or op(m, x) for torch.mv) over all the matrices."""
    args = (lambda m: (m, x)) if op is torch.mv else (lambda m: (x, m))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for m in mats:
            op(*args(m))
        best = min(best, time.perf_counter() - t)
    return best


def _measure(dtype: torch.dtype, out_features: int, in_features: int) -> dict:
    """Microseconds per matrix of each layout and product, one intra-op thread as decode runs them.
    One layout's matrices are in memory at a time."""
    esize = torch.empty((), dtype=dtype).element_size()
    count = max(2, min(256, bytes_past_cache(least=160 * 2**20) // max(1, out_features * in_features * esize)))
    x = torch.randn(1, in_features).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {}
    try:
        for layout in LAYOUTS:
            shape = (in_features, out_features) if layout == "in-out" else (out_features, in_features)
            mats = [torch.full(shape, 0.01, dtype=dtype) for _ in range(count)]  # speed does not depend on values
            if layout == "in-out":
                times["in-out mm"] = _seconds(mats, x, torch.mm)
            else:  # B [in, out] with its transpose contiguous: by matmul, or matrix-vector product
                times["out-in mm"] = _seconds([m.T for m in mats], x, torch.mm)
                times["out-in mv"] = _seconds(mats, x[0], torch.mv)
            del mats
    finally:
        torch.set_num_threads(threads)
    return {"us_per_matrix": {k: round(v / count * 1e6, 2) for k, v in times.items()}}


def _pick(times: dict) -> tuple[str, str]:
    """(layout, product) of the fastest; in-out by mm unless another is 5% faster."""
    t, layout, product = min((t, *k.split(" ")) for k, t in times.items())
    return (layout, product) if t < 0.95 * times["in-out mm"] else ("in-out", "mm")


def one_row_layout(dtype: torch.dtype, out_features: int, in_features: int) -> tuple[str, str]:
    """(layout, product): the fastest way to multiply one token by B [in, out] here: its layout
    ("in-out" or "out-in") and product ("mm", or "mv": the experts' `torch-mv` backend, the dense
    layers' `OneRowLinear`)."""
    pinned = os.environ.get(LAYOUT_ENV, "")
    if pinned in LAYOUTS or pinned == "out-in mv":
        layout, _, product = pinned.partition(" ")
        return layout, product or "mm"
    shape = {"dtype": str(dtype).removeprefix("torch."), "matrix": [out_features, in_features]}
    choice, _ = remembered("one-row layout", shape, lambda: _measure(dtype, out_features, in_features))
    return _pick(choice["us_per_matrix"])


def laid_out(t: torch.Tensor, b_transposed: bool, layout: str) -> torch.Tensor:
    """`t` (a matrix or stack of matrices) stored so that the B it is read as has `layout`: B is t
    itself for experts held [in, out], t's transpose for nn.Linear weights and experts held [out, in]
    (`b_transposed`). Returns `t` itself when it already has the layout."""
    b_contiguous = layout == "in-out"
    want_t_contiguous = b_contiguous != b_transposed
    if want_t_contiguous:
        return t if t.is_contiguous() else t.contiguous()
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)
