"""GGUF models (llama.cpp's format, as LM Studio, Ollama and GPT4All download them), read with the `gguf`
package and loaded with their experts kept quantized in the engine's int8/int4 formats."""

from .loader import inspect_gguf, load_gguf
from .reader import is_gguf

__all__ = ["inspect_gguf", "is_gguf", "load_gguf"]
