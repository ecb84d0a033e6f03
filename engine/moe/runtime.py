"""The hybrid runtime: the facade that assembles one model's MoE machinery and owns its public API.

Parts, each in its own module: `LayerScheduler` (one MoE layer's step), `SlotStore` (the cache's
tensors on the fast device), `CpuExperts` (the CPU miss path), `ExpertCache` with its policy (what is
cached), `CostModel` and `Telemetry`. transformers calls `experts_forward` through the registered
experts implementation; forward hooks on the model mark step boundaries, where budget and policy
changes are applied, so a change never lands in the middle of a token.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import psutil
import torch

from ..cache.expert_cache import ExpertCache
from ..cache.policies import AUTO, make_policy
from ..errors import ModelError
from ..units import resolve_budget
from .auto_policy import AutoVerdict
from .cost_model import CostModel, calibrate_cpu, calibrate_cuda
from .cpu_experts import CpuExperts
from .interface import expert_format, expert_tensors
from .miss_paths import CpuMisses, OffloadMisses
from .router_hint import find_routers, router_top_k
from .scheduler import LayerScheduler, Observer
from .slots import SlotStore, max_slot_bytes
from .telemetry import Telemetry, cuda_memory, process_memory

log = logging.getLogger(__name__)


class HybridRuntime:
    """One model's hybrid MoE engine: built by the loader, driven by transformers, steered by the app."""

    def __init__(
        self,
        model: torch.nn.Module,
        experts_modules: list[torch.nn.Module],
        device: torch.device,
        *,
        budget: int | float | str = 0.25,
        policy: str = "auto",
        scope: str = "per_layer",
        force_slots: bool = False,
        profile: np.ndarray | None = None,
        admissions_per_layer: int | None = None,
        dense_bytes: int = 0,
    ):
        self.model = model
        self.modules = experts_modules
        self.device = torch.device(device)
        # without a GPU the cache is simulated: same decisions and counters, every expert computed
        # from the CPU weights, no copies (unless real slots are forced, to exercise the copy path)
        self.simulated_cache = self.device.type == "cpu" and not force_slots
        tensors = expert_tensors(experts_modules[0])
        self.names = list(tensors)
        self._check_same_shapes()
        self.format = expert_format(experts_modules[0])
        self.num_layers = len(experts_modules)
        self.num_experts = int(tensors[self.names[0]].shape[0])
        self.expert_bytes = sum(t[0].nbytes for t in tensors.values())
        self.expert_bytes_total = self.expert_bytes * self.num_experts * self.num_layers
        self.dense_bytes = dense_bytes
        self.profile = profile
        self.cpu = CpuExperts(model, experts_modules, self.simulated_cache)
        w = self.cpu.weights[0].probe_matrix()
        cost = CostModel(*calibrate_cpu(w), calibrate_cuda(w, self.device) if self.device.type == "cuda" else None)
        self.telemetry = Telemetry(self.num_layers)
        self.policy_name = policy
        self.policy = make_policy(policy, self.num_layers, self.num_experts, profile, self.simulated_cache)
        self.cache = ExpertCache(self.num_layers, self.num_experts, self.policy, 0, scope)
        self.slots = None if self.simulated_cache else SlotStore(experts_modules, self.names, self.device)
        self.scheduler = LayerScheduler(self.cache, self.cpu, self.slots, cost, self.telemetry, self.expert_bytes,
                                        self.cpu.weights[0].expert_flops(), admissions_per_layer)
        self.auto = self._auto_verdict()
        self.routers = find_routers(model, experts_modules, self.num_experts)
        self.scheduler.router_hint = self.router_hint

        self._step_lock = threading.Lock()  # held for a whole model forward
        self._pending_lock = threading.Lock()  # guards the two pending changes below
        self._pending_budget: int | None = None
        self._pending_policy: str | None = None
        self.step = 0
        # a simulated cache may hold every expert; real slots what the fast device has room for
        self.max_budget_bytes = (self.expert_bytes_total if self.simulated_cache
                                 else max_slot_bytes(self.device, self.expert_bytes, self.expert_bytes_total))
        self.budget_bytes = 0
        self._peak_fast = 0
        self._apply_budget(min(resolve_budget(budget, self.expert_bytes_total), self.max_budget_bytes))
        if profile is not None:
            preloaded = self.cache.preload(np.asarray(profile, dtype=np.float64))
            if self.slots is not None:
                self.slots.copy_in_stream_order(preloaded)
        self._attach()

    def _attach(self) -> None:
        """Mark the experts modules as ours (the registered forward finds us there) and hook the steps."""
        for i, m in enumerate(self.modules):
            m._moe_layer = i
            m._moe_runtime = self
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.model.register_forward_hook(self._post_forward, always_call=True),
        ]

    def _check_same_shapes(self) -> None:
        shapes = {tuple((n, tuple(t.shape)) for n, t in expert_tensors(m).items()) for m in self.modules}
        if len(shapes) != 1:
            raise ModelError("the MoE layers of this model have experts of different shapes; not supported yet")

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

    def set_policy(self, name: str) -> None:
        make_policy(name, 1, 1)  # validates the name now, in the caller's thread
        with self._pending_lock:
            self._pending_policy = name
        self._apply_pending_if_idle()

    def router_hint(self, layer: int, hidden_states: torch.Tensor, top_k: int) -> np.ndarray | None:
        """The experts MoE layer `layer`'s router picks for `hidden_states` (an earlier layer's MoE input),
        [tokens, top_k]; None where that layer's router was not found (`router_hint.py`)."""
        router = self.routers[layer] if 0 <= layer < self.num_layers else None
        if router is None:
            return None
        try:
            return router_top_k(router, hidden_states, top_k)
        except RuntimeError as e:  # a router that reads another input than the experts do: no hint, ever
            log.info("no router hint for MoE layer %d: %s", layer, e)
            self.routers[layer] = None
            return None

    @property
    def cpu_matmul(self) -> str:
        """The CPU experts' backend, "numpy" or "torch" (measured at load, see `CpuExperts`)."""
        return self.cpu.backend

    @property
    def kernel_choice(self) -> dict:
        """The CPU experts' backend, split and decode threads as measured at load, and whether remembered
        from before."""
        return {**self.cpu.choice, "backend": self.cpu.backend, "split": self.cpu.split is not None,
                "threads": self.cpu.decode_threads_count, "remembered": self.cpu.remembered}

    def set_cpu_matmul(self, backend: str) -> None:
        with self._step_lock:
            self.cpu.use_backend(backend)
            self._match_slot_backend()

    def set_miss_path(self, name: str) -> None:
        """"cpu" (the hybrid engine) or "offload" (the seed paper's baseline: each missed expert copied
        in for one step, no CPU compute). A simulated cache computes every pair on the CPU whatever the
        path; the seed suite then models the offload's copies from the counters."""
        if name == "cpu":
            path = CpuMisses(self.cpu, self.telemetry)
        elif name == "offload":
            path = OffloadMisses(self.device, self.expert_bytes, self.telemetry)
        else:
            raise ValueError(f"unknown miss path {name!r}; choose cpu or offload")
        with self._step_lock:
            self.scheduler.miss_path = path

    @property
    def miss_path(self) -> str:
        return self.scheduler.miss_path.name

    def add_observer(self, observer: Observer) -> None:
        """Call `observer(RoutingEvent)` in every MoE layer's step (routing traces, benchmarks)."""
        self.scheduler.observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self.scheduler.observers.remove(observer)

    @property
    def usage(self) -> np.ndarray:
        """Tokens routed to each [layer, expert] since the last `reset_stats` (profiles)."""
        return self.scheduler.usage

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
            "simulated_cache": self.simulated_cache,
            "experts": self.format,
            "kernel_choice": self.kernel_choice,
            "policy": self.policy_name,
            "active_policy": self.policy.name,  # what `auto` stands for here
            "auto_verdict": dict(self.auto.last, turned_to_lru=self.auto.turned) if self.auto else None,
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
            used, peak, total = cuda_memory(self.device)
        else:
            used = self.dense_bytes + cache_bytes
            self._peak_fast = peak = max(self._peak_fast, used)
            total = psutil.virtual_memory().total
        return {"cache_bytes": cache_bytes, "fast_device_bytes": int(used), "peak_fast_device_bytes": int(peak),
                "device_total_bytes": int(total), **process_memory()}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for m in self.modules:
            m._moe_runtime = None
        self.cpu.close()
        if self.slots is not None:
            self.slots.close()

    # -- the experts forward (called by transformers through the registered implementation) -------
    def experts_forward(self, module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        return self.scheduler.forward(module, hidden_states, top_k_index, top_k_weights, self.step)

    # -- step boundaries -------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        self._step_lock.acquire()
        try:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            self._apply_pending()
            if self.slots is not None:
                self.scheduler.land_copies(wait=False)
        except BaseException:
            self._step_lock.release()
            raise
        self.step += 1
        tokens = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else 1
        self.telemetry.begin_step(tokens)
        self.cpu.begin_step(tokens)

    def _post_forward(self, module, args, output):
        try:
            self.telemetry.end_step()
            self.cpu.end_step()
            self._weigh_auto()
        finally:
            self._step_lock.release()

    def _auto_verdict(self) -> AutoVerdict | None:
        """Whether `auto` has chosen predictive here, so that its cost is weighed against its gain."""
        if not self.policy_name.startswith(AUTO) or self.policy.name.partition("+")[0] != "predictive":
            return None
        cost, flops = self.scheduler.cost, self.scheduler.flops_per_token
        saving = cost.cpu_seconds(self.expert_bytes, 1, flops) - cost.device_seconds(self.expert_bytes, 1, flops)
        return AutoVerdict(max(0.0, saving))

    def _weigh_auto(self) -> None:
        """At a step's end: `auto` turns from predictive to LRU once predictive stops paying for itself."""
        auto, shadow = self.auto, self.cache.shadow
        if auto is None or auto.turned or shadow is None:
            return
        if auto.step(self.cache.hits, shadow.hits, self.scheduler.policy_seconds):
            _, plus, suffix = self.policy.name.partition("+")
            self.policy = make_policy("lru" + plus + suffix, self.num_layers, self.num_experts, self.profile)
            self.policy.last[:] = shadow.last  # the recency the shadow kept: no cold start
            self.cache.policy = self.policy  # (the shadow stays, unused, for the snapshot's comparison)

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
            self.policy = make_policy(name, self.num_layers, self.num_experts, self.profile, self.simulated_cache)
            self.policy_name = name
            self.cache.use_policy(self.policy)
            self.auto = self._auto_verdict()
        if nbytes is not None:
            self._apply_budget(nbytes)

    def _apply_budget(self, nbytes: int) -> None:
        if self.slots is not None:
            self.scheduler.land_copies(wait=True)
        capacity = nbytes // self.expert_bytes if self.expert_bytes else 0
        moves = self.cache.resize(capacity, self.step)
        self.budget_bytes = nbytes
        if self.slots is not None:
            self.slots.resize(self.cache.capacity, moves)
            self._match_slot_backend()
            self.memory()

    def _match_slot_backend(self) -> None:
        """Slots on the CPU (forced) run on the CPU experts' backend, so a hit computes what a miss would."""
        if self.slots is not None and self.slots.weights is not None and self.slots.weights.cpu:
            self.slots.weights.use_backend(self.cpu.backend)
