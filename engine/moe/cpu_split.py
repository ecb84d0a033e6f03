"""Worker threads for the miss path: one token's experts, split across cores.

On some CPUs MKL runs a one-token matmul on a single core whatever torch's thread count (this project's
AMD EPYC: 2 threads gave nothing over 1; its Intel Xeon streams twice as fast on 2), so with several
experts per token the other cores would idle while memory bandwidth is left unused. Splitting the
experts between the caller and these threads uses them: torch and numpy release the GIL inside each
kernel, so the parts really run at once. Whether to split is measured at load (`cpu_experts`).
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")
R = TypeVar("R")


def _serve(jobs: queue.SimpleQueue, done: queue.SimpleQueue) -> None:
    # OpenMP's thread count is per thread: left at its default, each worker's kernels would start a
    # second team of OpenMP threads, more threads than cores, which made one-row products 1.2x slower
    # in the split and the caller's own multithreaded ones 3x slower for as long as the worker lived
    torch.set_num_threads(1)
    while (job := jobs.get()) is not None:
        fn, arg = job
        try:
            done.put((True, fn(arg)))
        except BaseException as exc:  # handed to the caller, who re-raises it
            done.put((False, exc))


def _stop(workers: list[tuple[queue.SimpleQueue, queue.SimpleQueue, threading.Thread]]) -> None:
    for jobs, _, _ in workers:
        jobs.put(None)
    for _, _, thread in workers:
        thread.join(timeout=5)


class SplitRunner:
    """`workers` threads that, with the caller, compute the parts of one step at the same time."""

    def __init__(self, workers: int = 1) -> None:
        self._workers = []
        for i in range(max(1, workers)):
            jobs, done = queue.SimpleQueue(), queue.SimpleQueue()
            thread = threading.Thread(target=_serve, args=(jobs, done), name=f"moe-chat-cpu-experts-{i}", daemon=True)
            thread.start()
            self._workers.append((jobs, done, thread))
        self.ways = len(self._workers) + 1  # parts one call can run at once, the caller's included
        self._finalizer = weakref.finalize(self, _stop, self._workers)  # on close, drop or exit

    def run(self, fn: Callable[[T], R], parts: Sequence[T]) -> list[R]:
        """[fn(p) for p in parts], the first here and each other on a worker, all at once."""
        if len(parts) > self.ways:
            raise ValueError(f"{len(parts)} parts for {self.ways} ways")
        busy = self._workers[:len(parts) - 1]
        for (jobs, _, _), part in zip(busy, parts[1:]):
            jobs.put((fn, part))
        results, error = [], None
        try:
            results.append(fn(parts[0]))
        except BaseException as exc:
            error = exc
        for _, done, _ in busy:  # always collected, so a failure never leaves a stale result
            ok, value = done.get()
            results.append(value)
            if not ok and error is None:
                error = value
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        self._finalizer()


def cuts(n: int, ways: int) -> list[int]:
    """Bounds that cut `n` items into at most `ways` contiguous, nearly equal, non-empty runs."""
    k = max(1, min(ways, n))
    return [n * i // k for i in range(k + 1)]


def chunks(items: list, ways: int) -> list[list]:
    bounds = cuts(len(items), ways)
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


class OneRowLinear:
    """A CPU `nn.Linear`'s forward for a decode step's single row: by matrix-vector product where the
    loader measured that faster (`_moe_one_row_mv`: bfloat16 weights held out-in stream 3-4x faster so
    on this project's Intel machine), and in blocks of outputs, one per core, where `runner` splits.

    Installed as the module's instance `forward` (the class and the modeling code stay untouched);
    anything but one row (a prompt's prefill) goes to the stock `F.linear`, whose GEMM uses all threads.
    """

    def __init__(self, module: torch.nn.Linear, runner: SplitRunner | None):
        self.module = module
        self.runner = runner
        self.mv = getattr(module, "_moe_one_row_mv", False)
        bounds = cuts(module.out_features, runner.ways if runner is not None else 1)
        if self.mv:  # blocks of W [out, in]'s rows: each contiguous in the out-in layout
            self.blocks = [module.weight[a:b] for a, b in zip(bounds, bounds[1:])]
        else:  # blocks of B = W.T [in, out]'s columns: row-major when the loader stored W column-major
            self.blocks = [module.weight.t()[:, a:b] for a, b in zip(bounds, bounds[1:])]

    def _product(self, row: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return torch.mv(block, row[0]).unsqueeze(0) if self.mv else torch.mm(row, block)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.numel() != x.shape[-1]:  # not a decode step's single row
            return F.linear(x, m.weight, m.bias)
        row = x.reshape(1, -1)
        if self.runner is not None and torch.get_num_threads() == 1:  # a split decode step
            y = torch.cat(self.runner.run(lambda w: self._product(row, w), self.blocks), dim=1)
        elif self.mv:
            y = torch.mv(m.weight, row[0]).unsqueeze(0)
        else:
            return F.linear(x, m.weight, m.bias)
        if m.bias is not None:
            y.add_(m.bias)
        return y.view(*x.shape[:-1], m.out_features)


SPLIT_MIN_BYTES = 4 * 2**20  # below a few MiB, handing work to another thread costs more than it saves
# (measured on 1 MiB attention projections)


def one_row_linear(module: torch.nn.Linear, runner: SplitRunner | None,
                   min_bytes: int = SPLIT_MIN_BYTES) -> OneRowLinear:
    """The one-row forward of `module`: split over `runner` if the weight is big enough."""
    big = module.weight.numel() * module.weight.element_size() >= min_bytes
    return OneRowLinear(module, runner if big else None)


def one_row_linears(model: torch.nn.Module, runner: SplitRunner | None,
                    min_bytes: int = SPLIT_MIN_BYTES) -> list[torch.nn.Module]:
    """Give the model's CPU Linear layers a `OneRowLinear` forward where it changes something: those the
    loader marked for matrix-vector products, and with a `runner` the big ones. Not subclasses with a
    forward of their own (Phi-MoE's router is a Linear that returns the routing, not the product)."""
    done = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not (isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward
                and w.device.type == "cpu" and w.dim() == 2):
            continue
        forward = one_row_linear(module, runner, min_bytes)
        if forward.runner is not None or forward.mv:
            module.forward = forward
            done.append(module)
    return done
