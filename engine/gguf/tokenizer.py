"""The tokenizer from a GGUF file's vocabulary, built by transformers' own GGUF tokenizer converters."""

from __future__ import annotations

from ..errors import ModelError
from .reader import GGUFModel

SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}


def has_tokenizer(gguf: GGUFModel) -> bool:
    return bool(gguf.metadata.get("tokenizer.ggml.tokens"))


def load_tokenizer(gguf: GGUFModel):
    """A fast tokenizer with the file's special tokens and chat template; None if the file has no vocabulary."""
    if not has_tokenizer(gguf):
        return None
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    meta = gguf.metadata
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocab, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if vocab.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # as llama.cpp does for sentencepiece vocabularies
    tokens = vocab["tokens"]
    for name, key in SPECIAL.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    try:
        backend, extra = convert_gguf_tokenizer(gguf.architecture, vocab)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
    except Exception as e:
        raise ModelError(f"{gguf.files[0].name}: its tokenizer could not be built ({type(e).__name__}: {e}); "
                         f"tokenizer model {vocab.get('tokenizer_type')!r} may not be supported yet") from None
