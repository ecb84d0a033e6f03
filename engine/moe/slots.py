"""The cache's slot tensors on the fast device, and the copies that fill them.

`ExpertCache` decides which (layer, expert) sits in which slot; this store holds the bytes. Under
CUDA, admissions are copied on a side stream and count as cached only once their copy has landed,
so a copy never blocks the token being computed.
"""

from __future__ import annotations

import psutil
import torch

from ..cache.expert_cache import Admission
from .expert_math import ExpertWeights
from .interface import expert_tensors


def max_slot_bytes(device: torch.device, expert_bytes: int, expert_bytes_total: int) -> int:
    """The largest cache, in whole experts' bytes, that the fast device has room for now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room = int(free * 0.85) - 2**30  # keep room for the KV cache and activations
    else:
        room = int(psutil.virtual_memory().available * 0.5)
    return max(0, min(expert_bytes_total, (room // expert_bytes) * expert_bytes))


class SlotStore:
    def __init__(self, modules: list[torch.nn.Module], names: list[str], device: torch.device):
        self.modules = modules
        self.names = names
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}
        self.weights: ExpertWeights | None = None  # the slots, ready for the expert math
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._in_flight: list[tuple[Admission, torch.cuda.Event]] = []

    @property
    def copies_in_background(self) -> bool:
        """True where an admission lands later than it is made (CUDA's side stream)."""
        return self._side_stream is not None

    @property
    def in_flight(self) -> bool:
        return bool(self._in_flight)

    def resize(self, capacity: int, moves: list[tuple[int, int]]) -> None:
        """New slot tensors of `capacity` experts; `moves` (old slot, new slot) keep their contents."""
        old = self.tensors
        source = expert_tensors(self.modules[0])
        self.tensors = {n: self._empty(source[n], capacity) for n in self.names}
        if moves and old:
            src = torch.tensor([a for a, _ in moves], device=self.device)
            dst = torch.tensor([b for _, b in moves], device=self.device)
            for n in self.names:
                self.tensors[n][dst] = old[n][src]
        del old
        self.weights = ExpertWeights(self.modules[0], self.tensors)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _empty(self, weights: torch.Tensor, capacity: int) -> torch.Tensor:
        """Slots laid out like the CPU copy, so that admitting an expert is one contiguous copy."""
        shape = (capacity, *weights.shape[1:])
        if weights.dim() == 3 and weights.stride(-2) == 1:  # column-major matrices
            return torch.empty((shape[0], shape[2], shape[1]), dtype=weights.dtype, device=self.device).transpose(1, 2)
        return torch.empty(shape, dtype=weights.dtype, device=self.device)

    def _copy(self, admissions: list[Admission]) -> None:
        for a in admissions:
            m = expert_tensors(self.modules[a.layer])
            for n in self.names:
                self.tensors[n][a.slot].copy_(m[n][a.expert], non_blocking=self._side_stream is not None)

    def copy_in_stream_order(self, admissions: list[Admission]) -> None:
        """Queue the copies on the compute stream: kernels queued after them see the new weights (the
        host does not wait). For admissions that are used in the same step (prefill fetches, preload)."""
        self._copy(admissions)

    def copy_in_background(self, admissions: list[Admission]) -> None:
        """Copy on the side stream under CUDA (`land` later reports them), else at once."""
        if self._side_stream is None:
            self._copy(admissions)
            return
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # slots being overwritten may still be read
        with torch.cuda.stream(stream):
            for a in admissions:
                self._copy([a])
                event = torch.cuda.Event()
                event.record(stream)
                self._in_flight.append((a, event))

    def land(self, wait: bool) -> list[Admission]:
        """Background copies that have landed (all of them with `wait`), no longer in flight."""
        landed, still = [], []
        for a, event in self._in_flight:
            if wait:
                event.synchronize()
            if event.query():
                landed.append(a)
            else:
                still.append((a, event))
        self._in_flight = still
        return landed

    def close(self) -> None:
        self.tensors = {}
        self.weights = None
