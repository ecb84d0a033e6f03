"""MoE Chat's engine: hybrid CPU-GPU inference for transformers Mixture-of-Experts models. No Qt here."""

from .errors import Cancelled, EngineError, InsufficientMemoryError, ModelError
from .loader import LoadedModel, ModelInfo, inspect_model, load_model
from .policies import POLICIES
from .sampling import GenerationParams
from .session import Session, TokenEvent

__all__ = [
    "Cancelled", "EngineError", "GenerationParams", "InsufficientMemoryError", "LoadedModel", "ModelError",
    "ModelInfo", "POLICIES", "Session", "TokenEvent", "inspect_model", "load_model",
]
