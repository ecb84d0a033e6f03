"""The hybrid runtime: per MoE layer and step, split routed experts into fast-device hits and CPU misses.

It owns the expert cache (bookkeeping in `cache.py`, slot tensors here), the policy, the cost model
and the telemetry. transformers calls `experts_forward` through the registered experts implementation;
forward hooks on the model mark step boundaries, which is where budget and policy changes are applied.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import numpy as np
import psutil
import torch

from .cache import Admission, ExpertCache
from .cost_model import CostModel, calibrate_cpu, calibrate_cuda, one_row_thread_speedup
from .errors import ModelError
from .cpu_split import SplitRunner, split_linears
from .experts import ExpertWeights, expert_ffn, expert_ffn_combined, expert_tensor_names
from .policies import make_policy
from .telemetry import Telemetry, peak_rss_bytes, rss_bytes
from .units import resolve_budget


class HybridRuntime:
    def __init__(
        self,
        model: torch.nn.Module,
        experts_modules: list[torch.nn.Module],
        device: torch.device,
        *,
        budget: int | float | str = 0.25,
        policy: str = "lru",
        scope: str = "per_layer",
        force_slots: bool = False,
        profile: np.ndarray | None = None,
        admissions_per_layer: int | None = None,
        dense_bytes: int = 0,
    ):
        self.model = model
        self.modules = experts_modules
        self.device = torch.device(device)
        self.logical = self.device.type == "cpu" and not force_slots
        self.names = expert_tensor_names(experts_modules[0])
        shapes = {tuple((n, tuple(getattr(m, n).shape)) for n in self.names) for m in experts_modules}
        if len(shapes) != 1:
            raise ModelError("the MoE layers of this model have experts of different shapes; not supported yet")
        first = experts_modules[0]
        self.num_layers = len(experts_modules)
        self.num_experts = int(getattr(first, self.names[0]).shape[0])
        self.expert_bytes = sum(getattr(first, n)[0].numel() * getattr(first, n).element_size() for n in self.names)
        self.expert_bytes_total = self.expert_bytes * self.num_experts * self.num_layers
        w = getattr(first, self.names[0])[0]
        self._flops_per_token = 2.0 * sum(getattr(first, n)[0].numel() for n in self.names if not n.endswith("_bias"))
        self.dense_bytes = dense_bytes
        self.admissions_per_layer = admissions_per_layer
        self.profile = profile
        self.miss_path = "cpu"  # "copy": offload baseline, misses copied to the device for one step, no cache
        self.recorder = None  # optional callable(layer, ids [tokens, top_k], weights [tokens, top_k]): routing traces

        for i, m in enumerate(experts_modules):
            m._moe_layer = i
            m._moe_runtime = self
        self._own = [ExpertWeights(m, {n: getattr(m, n) for n in self.names}) for m in experts_modules]
        # a decode step's CPU experts spread over the cores, where MKL gives a one-token matmul only one
        # (measured: big matrices on many cores may be better left to MKL's own threads); past about 8
        # cores a desktop's memory bandwidth is spent, so more ways would only add hand-over costs
        self.threads = torch.get_num_threads()
        self.split: SplitRunner | None = None
        if self.threads > 1 and one_row_thread_speedup(w) < 1.3:
            self.split = SplitRunner(workers=min(self.threads, 8) - 1)
        # with everything on the CPU, a decode step's large one-row matmuls split over the cores as well
        self._split_linears = split_linears(model, self.split) if self.split is not None and self.logical else []
        self.cpu_matmul = "torch"
        if self._own[0].numpy_able:
            choice = os.environ.get("MOE_CHAT_CPU_MATMUL", "auto")
            self.set_cpu_matmul(self._faster_cpu_matmul() if choice == "auto" else choice)
        # decode on the CPU with plain float32 experts: the fused path of `expert_ffn_combined`
        self._combined_decode = (self.logical and not first.has_bias and not first.has_post_expert_norm
                                 and getattr(first, self.names[0]).dtype == torch.float32)

        cpu_bw, cpu_flops = calibrate_cpu(w)
        self.cost = CostModel(cpu_bw, cpu_flops, calibrate_cuda(w, self.device) if self.device.type == "cuda" else None)
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pending: list[tuple[Admission, torch.cuda.Event]] = []

        self.telemetry = Telemetry(self.num_layers)
        self.usage = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)  # tokens per expert
        self._step_lock = threading.Lock()  # held for a whole model forward
        self._pending_lock = threading.Lock()  # guards the two pending changes below
        self._pending_budget: int | None = None
        self._pending_policy: str | None = None
        self.step = 0
        self.max_budget_bytes = self._max_budget()
        self.policy_name = policy
        self.policy = make_policy(policy, self.num_layers, self.num_experts, profile)
        self.cache = ExpertCache(self.num_layers, self.num_experts, self.policy, 0, scope)
        self.slots: dict[str, torch.Tensor] = {}
        self._slot_weights: ExpertWeights | None = None
        self.budget_bytes = 0
        self._peak_fast = 0
        self._apply_budget(min(resolve_budget(budget, self.expert_bytes_total), self.max_budget_bytes))
        if profile is not None:
            self._copy_in(self.cache.preload(np.asarray(profile, dtype=np.float64)), sync=True)

        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, always_call=True),
        ]

    # -- public, thread-safe ---------------------------------------------------------------------
    def set_budget(self, budget: int | float | str) -> int:
        """Resize the cache; applied now when idle, else between two steps. Returns the new byte budget."""
        nbytes = resolve_budget(budget, self.expert_bytes_total)
        if nbytes > self.max_budget_bytes:
            raise ValueError(
                f"a cache of {nbytes / 2**20:.0f} MiB does not fit: this device can hold at most "
                f"{self.max_budget_bytes / 2**20:.0f} MiB of experts"
            )
        with self._pending_lock:
            self._pending_budget = nbytes
        self._apply_pending_if_idle()
        return nbytes

    def set_cpu_matmul(self, backend: str) -> None:
        """"numpy" or "torch": which computes the CPU experts (see `ExpertWeights.use_numpy`)."""
        if backend not in ("numpy", "torch"):
            raise ValueError(f"unknown CPU matmul backend {backend!r}; choose numpy or torch")
        for own in self._own:
            own.use_numpy(backend == "numpy")
        self.cpu_matmul = "numpy" if self._own[0].numpy else "torch"

    def _faster_cpu_matmul(self) -> str:
        """Time a decode step's CPU experts with each backend, as decode runs them (split, one intra-op
        thread), over up to 64 MiB of experts so that they come from memory, not cache; pick the faster."""
        top_k = min(4, self.num_experts)
        groups = [(m, own, list(range(e, e + top_k))) for m, own in zip(self.modules, self._own)
                  for e in range(0, self.num_experts - top_k + 1, top_k)]
        groups = groups[:max(1, 64 * 2**20 // (top_k * self.expert_bytes))]
        x = torch.randn(1, self._own[0].mats1[0].shape[0])
        gates = [1.0 / top_k] * top_k

        def one_pass():
            for m, own, experts in groups:
                expert_ffn_combined(m, x, experts, gates, own, self.split)

        threads = torch.get_num_threads()
        if self.split is not None:
            torch.set_num_threads(1)
        best = {"torch": float("inf"), "numpy": float("inf")}
        try:
            for _ in range(3):
                for backend in best:
                    self.set_cpu_matmul(backend)
                    t = time.perf_counter()
                    one_pass()
                    best[backend] = min(best[backend], time.perf_counter() - t)
        finally:
            torch.set_num_threads(threads)
        return "numpy" if best["numpy"] < 0.95 * best["torch"] else "torch"

    def set_policy(self, name: str) -> None:
        make_policy(name, 1, 1)  # validates the name now, in the caller's thread
        with self._pending_lock:
            self._pending_policy = name
        self._apply_pending_if_idle()

    def shrink_after_oom(self) -> int:
        """Halve the cache after the fast device ran out of memory (called between steps)."""
        half = (self.cache.capacity // 2) * self.expert_bytes
        self.max_budget_bytes = min(self.max_budget_bytes, half)
        with self._step_lock:
            self._apply_budget(half)
        return half

    def reset_stats(self) -> None:
        """Counters and the memory peak start again (the peak of a resize, say, is not the next run's)."""
        self.telemetry.reset()
        self.usage[:] = 0
        self._peak_fast = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.memory()

    def snapshot(self) -> dict:
        """Plain data for the GUI, the CLI and tests."""
        t = self.telemetry
        data = {
            "device": str(self.device),
            "logical": self.logical,
            "policy": self.policy_name,
            "scope": self.cache.scope,
            "budget_bytes": self.budget_bytes,
            "max_budget_bytes": self.max_budget_bytes,
            "capacity_experts": self.cache.capacity,
            "cached_experts": self.cache.cached_count(),
            "expert_bytes": self.expert_bytes,
            "expert_bytes_total": self.expert_bytes_total,
            "num_moe_layers": self.num_layers,
            "num_experts": self.num_experts,
            **t.totals(),
            "per_layer": t.per_layer(),
        }
        data.update(self.memory())
        return data

    def memory(self) -> dict:
        cache_bytes = self.cache.capacity * self.expert_bytes
        if self.device.type == "cuda":
            used = torch.cuda.memory_allocated(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
        else:
            used = self.dense_bytes + cache_bytes
            self._peak_fast = peak = max(self._peak_fast, used)
            total = psutil.virtual_memory().total
        rss = rss_bytes()
        return {
            "cache_bytes": cache_bytes,
            "fast_device_bytes": int(used),
            "peak_fast_device_bytes": int(peak),
            "device_total_bytes": int(total),
            "rss_bytes": rss,
            "peak_rss_bytes": max(rss, peak_rss_bytes()),
        }

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for m in self.modules:
            m._moe_runtime = None
        for linear in self._split_linears:
            del linear.forward  # back to nn.Linear.forward
        self._split_linears = []
        if self.split is not None:
            self.split.close()
        self.slots = {}
        self._slot_weights = None

    # -- step boundaries -------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        self._step_lock.acquire()
        try:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            self._apply_pending()
            self._land_copies(wait=False)
        except BaseException:
            self._step_lock.release()
            raise
        self.step += 1
        tokens = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 1
        self.telemetry.begin_step(tokens)
        if self.split is not None and tokens == 1:
            # a decode step's matmuls are one-token and run on one core whatever the thread count, while
            # idle OpenMP workers would spin on the core the split wants: one intra-op thread, split experts
            torch.set_num_threads(1)

    def _post_forward(self, module, args, output):
        try:
            self.telemetry.end_step()
            if self.split is not None:
                torch.set_num_threads(self.threads)
        finally:
            self._step_lock.release()

    def _apply_pending_if_idle(self) -> None:
        if self._step_lock.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self._step_lock.release()

    def _apply_pending(self) -> None:
        with self._pending_lock:
            name, self._pending_policy = self._pending_policy, None
            nbytes, self._pending_budget = self._pending_budget, None
        if name is not None:
            self.policy = make_policy(name, self.num_layers, self.num_experts, self.profile)
            self.policy_name = name
            self.cache.policy = self.policy
        if nbytes is not None:
            self._apply_budget(nbytes)

    def _apply_budget(self, nbytes: int) -> None:
        self._land_copies(wait=True)
        capacity = nbytes // self.expert_bytes if self.expert_bytes else 0
        moves = self.cache.resize(capacity, self.step)
        self.budget_bytes = nbytes
        if self.logical:
            return
        old = self.slots
        self.slots = {n: self._empty_slots(getattr(self.modules[0], n)) for n in self.names}
        if moves and old:
            src = torch.tensor([a for a, _ in moves], device=self.device)
            dst = torch.tensor([b for _, b in moves], device=self.device)
            for n in self.names:
                self.slots[n][dst] = old[n][src]
        del old
        self._slot_weights = ExpertWeights(self.modules[0], self.slots)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.memory()

    def _empty_slots(self, weights: torch.Tensor) -> torch.Tensor:
        """Slots laid out like the CPU copy, so that admitting an expert is one contiguous copy."""
        shape = (self.cache.capacity, *weights.shape[1:])
        if weights.dim() == 3 and weights.stride(-2) == 1:  # column-major matrices
            return torch.empty((shape[0], shape[2], shape[1]), dtype=weights.dtype, device=self.device).transpose(1, 2)
        return torch.empty(shape, dtype=weights.dtype, device=self.device)

    def _max_budget(self) -> int:
        if self.logical:
            return self.expert_bytes_total
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            room = int(free * 0.85) - 2**30  # keep room for the KV cache and activations
        else:
            room = int(psutil.virtual_memory().available * 0.5)
        return max(0, min(self.expert_bytes_total, (room // self.expert_bytes) * self.expert_bytes))

    # -- copies ----------------------------------------------------------------------------------
    def _copy_in(self, admissions: list[Admission], sync: bool) -> None:
        """Copy admitted experts' weights into their slots (async on CUDA unless `sync`)."""
        if self.logical or not admissions:
            return
        if self._side_stream is None or sync:
            for a in admissions:
                m = self.modules[a.layer]
                for n in self.names:
                    self.slots[n][a.slot].copy_(getattr(m, n)[a.expert], non_blocking=self._side_stream is not None)
            return
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # slots being overwritten may still be read
        with torch.cuda.stream(stream):
            for a in admissions:
                m = self.modules[a.layer]
                for n in self.names:
                    self.slots[n][a.slot].copy_(getattr(m, n)[a.expert], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                self._pending.append((a, event))

    def _land_copies(self, wait: bool) -> None:
        still = []
        for a, event in self._pending:
            if wait:
                event.synchronize()
            if event.query():
                self.cache.commit(a.layer, a.expert, a.slot)
            else:
                still.append((a, event))
        self._pending = still

    # -- the experts forward -----------------------------------------------------------------------
    def experts_forward(self, module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        layer = module._moe_layer
        tokens, top_k = top_k_index.shape
        if self._pending:  # prefetches for this layer may have landed since the step began
            self._land_copies(wait=False)
        ids_np = top_k_index.reshape(-1).cpu().numpy()
        if self.recorder is not None:
            self.recorder(layer, ids_np.reshape(tokens, top_k), top_k_weights.detach().float().cpu().numpy())
        if tokens == 1:  # decode: top-k experts are distinct, no need to count them
            experts, inverse, counts = ids_np, self._arange(top_k), self._ones(top_k)
        else:
            experts, inverse, counts = np.unique(ids_np, return_inverse=True, return_counts=True)
        step = self.step
        slots = self.cache.lookup(layer, experts)  # fancy indexing: a copy
        self.policy.record(layer, experts, counts, step)
        self.usage[layer, experts] += counts
        missed = slots < 0
        fetched = None
        if not self.logical and tokens > 1 and missed.any():
            fetched = self._fetch_now(layer, experts, counts, slots, missed, step)
            missed &= ~fetched

        if tokens == 1 and self._combined_decode and hidden_states.dtype == top_k_weights.dtype == torch.float32:
            t0 = time.perf_counter()
            final = expert_ffn_combined(module, hidden_states, ids_np.tolist(), top_k_weights.view(-1).tolist(),
                                        self._own[layer], self.split)
            self.telemetry.times["cpu_time_s"][layer] += time.perf_counter() - t0
        else:
            out = self._compute(module, hidden_states, ids_np, slots[inverse], layer)
            if module.has_post_expert_norm:
                out = module.post_expert_norm(out)
            out = out * top_k_weights.reshape(-1, 1)
            final = out.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

        n_miss = int(np.count_nonzero(missed)) if tokens == 1 else int(counts[missed].sum())
        n_fetch = int(counts[fetched].sum()) if fetched is not None else 0
        tel = self.telemetry.counts
        tel["hits"][layer] += ids_np.size - n_miss - n_fetch
        tel["misses"][layer] += n_miss
        tel["fetches"][layer] += n_fetch
        # demand admissions, then the policy's prefetch for the next layer (or the next token's first)
        limit = self.admissions_per_layer or top_k
        admitted = self.cache.after_access(layer, experts, missed, step, limit, reserve=self._side_stream is not None)
        if admitted:
            self._copy_in(admitted, sync=False)
            self._count_admissions(admitted)
        return final

    @staticmethod
    @functools.cache
    def _arange(n: int) -> np.ndarray:
        a = np.arange(n)
        a.setflags(write=False)  # shared between calls
        return a

    @staticmethod
    @functools.cache
    def _ones(n: int) -> np.ndarray:
        a = np.ones(n, dtype=np.int64)
        a.setflags(write=False)
        return a

    def _fetch_now(self, layer, experts, counts, slots, missed, step) -> np.ndarray:
        """Prefill: copy experts with enough tokens to make a copy cheaper than the CPU, then use them."""
        want = np.array([
            bool(m) and self.cost.should_fetch(self.expert_bytes, int(c), self._flops_per_token)
            for m, c in zip(missed, counts)
        ])
        fetched = np.zeros_like(missed)
        if not want.any():
            return fetched
        admitted = self.cache.admit(layer, experts[want], step, limit=int(want.sum()))
        self._copy_in(admitted, sync=True)
        self._count_admissions(admitted)
        index = {e: i for i, e in enumerate(experts.tolist())}
        for a in admitted:
            slots[index[a.expert]] = a.slot
            fetched[index[a.expert]] = True
        return fetched

    def _count_admissions(self, admitted: list[Admission]) -> None:
        counts = self.telemetry.counts
        for a in admitted:  # a prefetch belongs to the layer it was copied for
            counts["evictions"][a.layer] += a.evicted is not None
            counts["bytes_copied"][a.layer] += self.expert_bytes

    def _rows(self, module, hidden_states, top_k: int, pairs: np.ndarray, groups: np.ndarray,
              weights: ExpertWeights) -> torch.Tensor:
        """Expert outputs of the (token, expert) `pairs`, which are sorted by their `groups`."""
        x = hidden_states[torch.from_numpy(pairs // top_k).to(hidden_states.device)]
        return expert_ffn(module, x, groups, weights, self.split)

    def _compute(self, module, hidden_states, ids_np: np.ndarray, pair_slots: np.ndarray, layer: int) -> torch.Tensor:
        """Per (token, expert) pair outputs, before routing weights, in the original pair order."""
        top_k = ids_np.size // hidden_states.shape[0]
        times = self.telemetry.times
        own = self._own[layer]
        t0 = time.perf_counter()
        if self.logical and hidden_states.shape[0] == 1:  # decode: the top-k experts are distinct, no sorting
            rows = expert_ffn(module, hidden_states, ids_np, own, self.split)
            times["cpu_time_s"][layer] += time.perf_counter() - t0
            return rows
        if self.logical:  # every pair runs from the CPU weights; hits and misses differ only in the counters
            order = np.argsort(ids_np, kind="stable")
            rows = self._rows(module, hidden_states, top_k, order, ids_np[order], own)
            times["cpu_time_s"][layer] += time.perf_counter() - t0
            return rows[torch.from_numpy(np.argsort(order))]

        hit = pair_slots >= 0
        hits = np.nonzero(hit)[0]
        hits = hits[np.argsort(pair_slots[hits], kind="stable")]
        misses = np.nonzero(~hit)[0]
        misses = misses[np.argsort(ids_np[misses], kind="stable")]
        cpu_miss = misses.size and self.miss_path == "cpu"
        if cpu_miss:  # the missed rows come over before the hits are queued: copying after would wait for them
            x_miss = hidden_states[torch.from_numpy(misses // top_k).to(self.device)].to("cpu")
        parts = []
        if hits.size:  # queued first: on CUDA the GPU runs them while the CPU works on the misses
            parts.append(self._rows(module, hidden_states, top_k, hits, pair_slots[hits], self._slot_weights))
        t1 = time.perf_counter()
        times["device_time_s"][layer] += t1 - t0
        if cpu_miss:
            rows = expert_ffn(module, x_miss, ids_np[misses], own, self.split)
            parts.append(rows.to(self.device, non_blocking=True))
            times["cpu_time_s"][layer] += time.perf_counter() - t1
        elif misses.size:
            parts.append(self._offload(module, hidden_states, top_k, misses, ids_np[misses], layer))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        back = torch.from_numpy(np.argsort(np.concatenate([hits, misses]))).to(self.device)
        return out[back]

    def _offload(self, module, hidden_states, top_k: int, pairs: np.ndarray, experts: np.ndarray, layer: int) -> torch.Tensor:
        """The offload baseline of the seed paper: copy each missed expert in, use it once, drop it."""
        t0 = time.perf_counter()
        used = np.unique(experts)
        scratch = ExpertWeights(module, {n: getattr(module, n)[torch.from_numpy(used)].to(self.device) for n in self.names})
        rows = self._rows(module, hidden_states, top_k, pairs, np.searchsorted(used, experts), scratch)
        self.telemetry.counts["bytes_copied"][layer] += len(used) * self.expert_bytes
        self.telemetry.times["device_time_s"][layer] += time.perf_counter() - t0
        return rows
