"""MoE Chat's engine: hybrid CPU-GPU inference for transformers Mixture-of-Experts models. No Qt here.

Sub-packages, imports pointing down only:
  tools/  the headless face: cli, bench, seed suite, trace, simulator
  model/  loading a model folder, the catalog of models, chat sessions, sampling
  moe/    one MoE layer's step: experts registration, expert math, scheduler, slots, CPU miss path
  cache/  which experts are cached: bookkeeping shared with the simulator, policies, profiles
  (root)  errors, units, paths

The public API below is imported lazily, so `engine.paths` or `engine.units` cost no torch import.
"""

import os

# numpy's OpenBLAS would thread each one-token product over every core, on top of the engine's own
# split of a step's experts; set before numpy loads (a process that loaded it earlier keeps its setting)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_PUBLIC = {
    "Cancelled": "engine.errors", "EngineError": "engine.errors", "InsufficientMemoryError": "engine.errors",
    "ModelError": "engine.errors",
    "LoadedModel": "engine.model.loader", "ModelInfo": "engine.model.loader",
    "inspect_model": "engine.model.loader", "load_model": "engine.model.loader",
    "GenerationParams": "engine.model.sampling",
    "Session": "engine.model.session", "TokenEvent": "engine.model.session",
    "POLICIES": "engine.cache.policies",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
