"""MoE Chat's engine: hybrid CPU-GPU inference for transformers Mixture-of-Experts models. No Qt here."""

import os

# numpy's OpenBLAS would thread each one-token product over every core, on top of the engine's own
# split of a step's experts; set before numpy loads (a process that loaded it earlier keeps its setting)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .errors import Cancelled, EngineError, InsufficientMemoryError, ModelError
from .loader import LoadedModel, ModelInfo, inspect_model, load_model
from .policies import POLICIES
from .sampling import GenerationParams
from .session import Session, TokenEvent

__all__ = [
    "Cancelled", "EngineError", "GenerationParams", "InsufficientMemoryError", "LoadedModel", "ModelError",
    "ModelInfo", "POLICIES", "Session", "TokenEvent", "inspect_model", "load_model",
]
