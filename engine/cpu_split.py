"""A second CPU thread for the miss path: one token's experts, split between two cores.

MKL runs a one-token matmul on a single core whatever torch's thread count (measured on this project's
2-core machine: 2 threads gave nothing over 1), so with several experts per token the other core idles
while memory bandwidth is left unused. Splitting the experts between the caller and this thread uses
it: torch releases the GIL inside each kernel, so the two halves really run at once.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")
R = TypeVar("R")


def _serve(jobs: queue.SimpleQueue, done: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        fn, arg = job
        try:
            done.put((True, fn(arg)))
        except BaseException as exc:  # handed to the caller, who re-raises it
            done.put((False, exc))


def _stop(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    jobs.put(None)
    thread.join(timeout=5)


class SplitRunner:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_serve, args=(self._jobs, self._done),
                                        name="moe-chat-cpu-experts", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self._jobs, self._thread)  # on close, drop or exit

    def run(self, fn: Callable[[T], R], here: T, there: T) -> tuple[R, R]:
        """(fn(here), fn(there)), the second computed on the worker thread at the same time."""
        self._jobs.put((fn, there))
        try:
            mine = fn(here)
        finally:
            ok, theirs = self._done.get()  # always collected, so a failure never leaves a stale result
        if not ok:
            raise theirs
        return mine, theirs

    def close(self) -> None:
        self._finalizer()


class SplitLinear:
    """A CPU `nn.Linear`'s forward that computes a single row's output in two halves, one per core.

    Installed as the module's instance `forward` (the class and the modeling code stay untouched);
    anything but one row (a prompt's prefill) goes to the stock `F.linear`, whose GEMM uses all threads.
    """

    def __init__(self, module: torch.nn.Linear, runner: SplitRunner):
        self.module = module
        self.runner = runner
        half = module.out_features // 2
        wt = module.weight.t()  # [in, out]: row-major when the loader stored the weight column-major
        self.halves = (wt[:, :half], wt[:, half:])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.numel() != x.shape[-1] or torch.get_num_threads() != 1:  # not a decode step's single row
            return F.linear(x, m.weight, m.bias)
        row = x.reshape(1, -1)
        left, right = self.runner.run(lambda w: torch.mm(row, w), *self.halves)
        y = torch.cat([left, right], dim=1)
        if m.bias is not None:
            y.add_(m.bias)
        return y.view(*x.shape[:-1], m.out_features)


def split_linears(model: torch.nn.Module, runner: SplitRunner, min_bytes: int = 4 * 2**20) -> list[torch.nn.Module]:
    """Give the model's big CPU Linear layers a `SplitLinear` forward (below a few MiB, handing half the
    work to the other thread costs more than it saves: measured on 1 MiB attention projections)."""
    done = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and w.device.type == "cpu" and w.dim() == 2
                and w.numel() * w.element_size() >= min_bytes):
            module.forward = SplitLinear(module, runner)
            done.append(module)
    return done
