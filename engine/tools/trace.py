"""Routing traces: which experts every token used in every MoE layer, recorded from a real run.

The file format (ARCHITECTURE.md) is a `.npz` with
  experts         int16/int32 [tokens, moe_layers, top_k], -1 where nothing was recorded
  num_experts     int
  prefill_tokens  int, optional: the first rows are the (first) prompt's prefill
  weights         float32 like `experts`, optional: the router's weights
  model           str, optional
and two optional extras written by `record_trace`:
  prompt_rows     int64 [prompts, 2]: (first row, prefill rows) of each prompt, when several prompts
                  were concatenated (`prefill_tokens` then covers the first prompt only)
  expert_bytes    int: bytes of one expert, the simulator's default for its cost model
  hints           like `experts`: the experts each layer's router picks from the layer before's MoE
                  input (`moe/router_hint.py`), -1 where there is none (layer 0, no router found)
Readers must ignore keys they do not know.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Trace:
    experts: np.ndarray  # int32 [tokens, moe_layers, top_k], -1: missing
    num_experts: int
    prefill_tokens: int = 0
    weights: np.ndarray | None = None  # float32, same shape as experts
    model: str | None = None
    prompt_rows: np.ndarray | None = None  # int64 [prompts, 2]: (first row, prefill rows)
    expert_bytes: int | None = None
    hints: np.ndarray | None = None  # int32 like experts: the router hint for each (token, layer), -1: none

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def __len__(self) -> int:
        return int(self.experts.shape[0])

    def prefill_mask(self) -> np.ndarray:
        """True for the rows that belong to a prompt's prefill (every prompt when `prompt_rows` is known)."""
        mask = np.zeros(len(self), dtype=bool)
        segments = self.prompt_rows if self.prompt_rows is not None else [(0, self.prefill_tokens)]
        for start, n in segments:
            mask[int(start):int(start) + int(n)] = True
        return mask

    def usage(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Accesses per [layer, expert] over `rows` (a profile, e.g. for the static policy)."""
        sub = self.experts[rows]
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        layer = np.broadcast_to(np.arange(self.num_layers)[None, :, None], sub.shape)
        ok = sub >= 0
        np.add.at(out, (layer[ok], sub[ok]), 1)
        return out


def validate(trace: Trace) -> Trace:
    """Raise ValueError naming what is wrong; returns the trace with canonical dtypes."""
    e = np.asarray(trace.experts)
    if e.ndim != 3 or not np.issubdtype(e.dtype, np.integer):
        raise ValueError(f"trace 'experts' must be an integer array [tokens, moe_layers, top_k], not {e.dtype} {e.shape}")
    if trace.num_experts <= 0:
        raise ValueError("trace 'num_experts' must be positive")
    if e.size and (e.min() < -1 or e.max() >= trace.num_experts):
        raise ValueError(f"trace 'experts' holds ids outside -1..{trace.num_experts - 1}")
    if not 0 <= trace.prefill_tokens <= e.shape[0]:
        raise ValueError(f"trace 'prefill_tokens' ({trace.prefill_tokens}) is outside 0..{e.shape[0]}")
    if trace.weights is not None and np.shape(trace.weights) != e.shape:
        raise ValueError(f"trace 'weights' has shape {np.shape(trace.weights)}, 'experts' {e.shape}")
    if trace.hints is not None:
        h = np.asarray(trace.hints)
        if h.shape != e.shape or not np.issubdtype(h.dtype, np.integer) or (h.size and (h.min() < -1 or h.max() >= trace.num_experts)):
            raise ValueError(f"trace 'hints' must be expert ids (or -1) shaped like 'experts' {e.shape}")
        trace.hints = h.astype(np.int32, copy=False)
    if trace.prompt_rows is not None:
        pr = np.asarray(trace.prompt_rows)
        if pr.ndim != 2 or pr.shape[1] != 2 or (pr < 0).any() or (pr.sum(axis=1) > e.shape[0]).any():
            raise ValueError("trace 'prompt_rows' must be [prompts, 2] (first row, prefill rows) within the trace")
        trace.prompt_rows = pr.astype(np.int64)
    trace.experts = e.astype(np.int32, copy=False)
    if trace.weights is not None:
        trace.weights = np.asarray(trace.weights, dtype=np.float32)
    return trace


def load_trace(path: str | os.PathLike) -> Trace:
    with np.load(path, allow_pickle=False) as z:
        if "experts" not in z.files or "num_experts" not in z.files:
            raise ValueError(f"{path} is not a routing trace: it needs 'experts' and 'num_experts'")
        get = lambda k: z[k] if k in z.files else None
        model = get("model")
        expert_bytes = get("expert_bytes")
        return validate(Trace(
            experts=z["experts"],
            num_experts=int(z["num_experts"]),
            prefill_tokens=int(z["prefill_tokens"]) if "prefill_tokens" in z.files else 0,
            weights=get("weights"),
            model=None if model is None else str(model),
            prompt_rows=get("prompt_rows"),
            expert_bytes=None if expert_bytes is None else int(expert_bytes),
            hints=get("hints"),
        ))


def save_trace(path: str | os.PathLike, trace: Trace) -> Path:
    trace = validate(trace)
    dtype = np.int16 if trace.num_experts <= np.iinfo(np.int16).max else np.int32
    data: dict = {"experts": trace.experts.astype(dtype), "num_experts": np.int64(trace.num_experts),
                  "prefill_tokens": np.int64(trace.prefill_tokens)}
    if trace.weights is not None:
        data["weights"] = trace.weights
    if trace.hints is not None:
        data["hints"] = trace.hints.astype(dtype)
    if trace.model is not None:
        data["model"] = np.str_(trace.model)
    if trace.prompt_rows is not None:
        data["prompt_rows"] = trace.prompt_rows
    if trace.expert_bytes is not None:
        data["expert_bytes"] = np.int64(trace.expert_bytes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to other names
        np.savez_compressed(f, **data)
    return path


class TraceRecorder:
    """A runtime observer (`add_observer`): keeps each step's per-layer routing and router hints (the
    next layer's router on this layer's input), stacks them into rows."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.num_layers = runtime.num_layers
        self.steps: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self.hints: dict[int, dict[int, np.ndarray]] = {}  # step -> layer -> [tokens, top_k]
        self._lock = threading.Lock()

    def __call__(self, event) -> None:
        ids = event.experts.copy()
        weights = event.top_k_weights.detach().float().cpu().numpy().reshape(ids.shape)
        hint = self.runtime.router_hint(event.layer + 1, event.hidden_states, ids.shape[1])
        with self._lock:
            self.steps.setdefault(event.step, {})[event.layer] = (ids, weights)
            if hint is not None:
                self.hints.setdefault(event.step, {})[event.layer + 1] = hint

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(experts, weights, hints) of every step so far, in order, [tokens, layers, top_k]; clears the
        record."""
        with self._lock:
            steps, self.steps = self.steps, {}
            hints, self.hints = self.hints, {}
        blocks: tuple[list, list, list] = ([], [], [])
        for step in sorted(steps):
            per_layer = steps[step]
            tokens = max(ids.shape[0] for ids, _ in per_layer.values())
            top_k = next(iter(per_layer.values()))[0].shape[1]
            e = np.full((tokens, self.num_layers, top_k), -1, dtype=np.int32)
            w = np.zeros((tokens, self.num_layers, top_k), dtype=np.float32)
            h = np.full((tokens, self.num_layers, top_k), -1, dtype=np.int32)
            for layer, (ids, wts) in per_layer.items():
                e[:ids.shape[0], layer] = ids
                w[:ids.shape[0], layer] = wts
            for layer, ids in hints.get(step, {}).items():
                h[:ids.shape[0], layer, :ids.shape[1]] = ids
            for block, rows in zip(blocks, (e, w, h)):
                block.append(rows)
        if not blocks[0]:
            empty = np.zeros((0, self.num_layers, 0), np.int32)
            return empty, empty.astype(np.float32), empty
        return tuple(np.concatenate(b) for b in blocks)


def record_trace(loaded, prompts: Iterable[str | list[int]], params, chat: bool = False,
                 progress=None) -> Trace:
    """Run each prompt (fresh KV cache each, the expert cache kept) and record its routing.

    Rows are concatenated in prompt order; `prompt_rows` says where each prompt starts and how many
    of its rows are prefill; `prefill_tokens` is the first prompt's.
    """
    from ..errors import EngineError
    from ..model.session import Session

    runtime = loaded.runtime
    if runtime is None:
        raise EngineError(f"{loaded.info.name} has no MoE layers: there is no routing to trace")
    prompts = list(prompts)
    session = Session(loaded)
    recorder = TraceRecorder(runtime)
    runtime.add_observer(recorder)
    experts, weights, hints, segments = [], [], [], []
    rows = 0
    try:
        for i, prompt in enumerate(prompts):
            if progress:
                progress(i / max(1, len(prompts)), f"tracing prompt {i + 1}/{len(prompts)}")
            session.reset()
            if chat:
                events = session.chat([{"role": "user", "content": prompt}], params)
            else:
                events = session.generate(prompt, params)
            for _ in events:
                pass
            e, w, h = recorder.rows()
            stats = session.last_stats
            segments.append((rows, stats["prompt_tokens"] - stats["reused_prompt_tokens"]))
            rows += len(e)
            experts.append(e)
            weights.append(w)
            hints.append(h)
    finally:
        runtime.remove_observer(recorder)
    if progress:
        progress(1.0, "trace done")
    prompt_rows = np.array(segments, dtype=np.int64).reshape(-1, 2)
    hints = np.concatenate(hints)
    return validate(Trace(
        experts=np.concatenate(experts), num_experts=runtime.num_experts,
        prefill_tokens=int(prompt_rows[0, 1]) if len(prompt_rows) else 0,
        weights=np.concatenate(weights), model=loaded.info.name,
        prompt_rows=prompt_rows if len(prompt_rows) > 1 else None,
        expert_bytes=int(runtime.expert_bytes),
        hints=hints if (hints >= 0).any() else None,
    ))
