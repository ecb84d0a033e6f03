"""A conversation with a loaded model: chat template, sampling, streaming, stop, KV cache reuse.

`generate` and `chat` are iterators of TokenEvents. They check the cancel event before every model
step, so a stop takes effect within one token; the KV cache is kept so the next turn only has to
prefill what is new.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import EngineError
from .loader import LoadedModel
from .sampling import GenerationParams, choose_token

__all__ = ["GenerationParams", "Session", "TokenEvent"]

log = logging.getLogger(__name__)
PREFILL_CHUNK = 512  # prompt tokens per forward: bounds memory and lets a stop land during a long prefill


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the new text this token completes; never half a UTF-8 character


class _Detokenizer:
    """Incremental decoding that waits while a token ends inside a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class _StopFilter:
    """Holds back text that might be the start of a stop string; cuts the reply at one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.text += piece
        for s in self.stops:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                self.stopped = True
                out, self.sent = self.text[self.sent:i], i
                return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return "" if self.stopped else out


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that turns token ids into logits: the model, or for a wrapper with no forward of its own
    (Qwen3-Omni runs its thinker, then a talker for speech) the first sub-model that has one."""
    if type(model).forward is not torch.nn.Module.forward:
        return model
    for child in model.children():
        if hasattr(child, "generate") and type(child).forward is not torch.nn.Module.forward:
            return child
    raise EngineError(f"{type(model).__name__} has no forward pass that generates text")


class Session:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = text_model(loaded.model)
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self._kv = None
        self._kv_ids: list[int] = []  # the tokens whose keys and values are in self._kv
        self.last_stats: dict = {}
        self._dropped = 0  # messages `chat` left out of the last prompt to make it fit
        # transformers renamed `past_key_values` to `cache` during v5; the cache object is updated in place
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # models with a cache of their own (e.g. MiniMax's linear attention) refuse a DynamicCache
        supports = getattr(self.model, "_supports_default_dynamic_cache", None)
        self._own_cache = callable(supports) and not supports()
        text_config = self.model.config.get_text_config()
        self.context_length = int(getattr(text_config, "max_position_embeddings", None) or 1 << 20)
        self._sliding = bool(getattr(text_config, "sliding_window", None)) and any(
            "sliding" in t for t in (getattr(text_config, "layer_types", None) or ["sliding"]))
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = {e for e in eos if e is not None}

    def reset(self) -> None:
        self._kv = None
        self._kv_ids = []

    # -- prompts ---------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise EngineError("this model folder has no tokenizer: chat needs one (use token ids instead)")
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return list(ids)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        return self.tokenizer.encode(text)

    def chat(self, messages: list[dict], params: GenerationParams,
             cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Reply to a conversation; the oldest turns (never the system prompt) are left out when the
        conversation would not leave room in the model's context for the reply."""
        messages = list(messages)
        ids = self.encode_chat(messages)
        room = min(params.max_new_tokens, self.context_length // 4)
        self._dropped = 0
        while len(ids) + room > self.context_length:
            first = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
            if first is None:
                break
            del messages[first]
            self._dropped += 1
            ids = self.encode_chat(messages)
        return self.generate(ids, params, cancel)

    # -- generation ------------------------------------------------------------------------------
    def _reuse_kv(self, prompt: list[int]) -> int:
        """How many prompt tokens the kept KV cache already covers (at least one token is always fed)."""
        n = 0
        limit = min(len(self._kv_ids), len(prompt) - 1)
        while n < limit and self._kv_ids[n] == prompt[n]:
            n += 1
        if self._kv is None or n == 0:
            self.reset()
            return 0
        if n < len(self._kv_ids):
            if not self._croppable():  # a cut-back window or recurrent state would lose what it needs again
                self.reset()
                return 0
            self._kv.crop(n - len(self._kv_ids))  # negative: remove that many tokens from the end
            self._kv_ids = self._kv_ids[:n]
        return n

    def _croppable(self) -> bool:
        """Only plain key/value layers can be cut back to a shorter prefix."""
        if self._sliding or self._own_cache:
            return False
        return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(self._kv, "layers", []))

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """One model step; when the fast device runs out of memory, halve the cache and redo the step
        on a fresh KV cache, so the reply goes on instead of being lost."""
        try:
            return self._step(ids)
        except torch.OutOfMemoryError:
            runtime = self.loaded.runtime
            if runtime is None or runtime.cache.capacity == 0:
                self.reset()
                raise EngineError("the GPU ran out of memory; pick a smaller model or run on the CPU") from None
            history = self._kv_ids + ids
            self.reset()
            freed = runtime.shrink_after_oom()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("the GPU ran out of memory: cache budget lowered to %d MiB, step repeated", freed >> 20)
            logits = None
            for i in range(0, len(history), PREFILL_CHUNK):
                logits = self._step(history[i:i + PREFILL_CHUNK])
            return logits

    @torch.inference_mode()
    def _step(self, ids: list[int]) -> torch.Tensor:
        from transformers import DynamicCache

        if self._kv is None and self._own_cache:
            kwargs = {}  # the model makes its own cache on the first step
        else:
            if self._kv is None:
                self._kv = DynamicCache(config=self.model.config.get_text_config(decoder=True))
            kwargs = {self._cache_kwarg: self._kv}
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **kwargs)
        if self._kv is None:
            self._kv = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
        self._kv_ids.extend(ids)
        return out.logits[0, -1].float().cpu()

    def generate(self, prompt: str | list[int], params: GenerationParams,
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Stream the reply to `prompt` (text or token ids); `self.last_stats` is set when it ends."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError("this model folder has no tokenizer: give token ids instead of text")
            prompt = self.tokenizer.encode(prompt)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise EngineError("the prompt is empty")
        if len(prompt) >= self.context_length:
            raise EngineError(
                f"the conversation ({len(prompt)} tokens) no longer fits the model's context of "
                f"{self.context_length} tokens; start a new chat or shorten the messages"
            )
        return self._generate(prompt, params, cancel or threading.Event())

    def _generate(self, prompt: list[int], params: GenerationParams, cancel: threading.Event):
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        detok = _Detokenizer(self.tokenizer)
        stops = _StopFilter(params.stop)
        stats = {"finish_reason": "length", "prompt_tokens": len(prompt), "new_tokens": 0,
                 "reused_prompt_tokens": 0, "prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0,
                 "time_to_first_token_s": 0.0, "dropped_messages": self._dropped}
        self._dropped = 0
        self.last_stats = stats
        t0 = time.perf_counter()
        reused = self._reuse_kv(prompt)
        stats["reused_prompt_tokens"] = reused
        todo = prompt[reused:]
        logits = None
        for i in range(0, len(todo), PREFILL_CHUNK):
            if cancel.is_set():
                stats["finish_reason"] = "cancelled"
                return
            logits = self._forward(todo[i:i + PREFILL_CHUNK])
        t_prefill = time.perf_counter() - t0
        stats["prefill_tokens_per_s"] = len(todo) / t_prefill if t_prefill > 0 else 0.0
        seen = torch.tensor(prompt, dtype=torch.long)
        new: list[int] = []
        t_decode = time.perf_counter()
        while True:
            token = choose_token(logits, params, seen, generator)
            if not new:
                stats["time_to_first_token_s"] = time.perf_counter() - t0
            new.append(token)
            stats["new_tokens"] = len(new)
            reason = None
            text = ""
            if token in self.eos_ids:
                reason = "eos"
            else:
                text = stops.feed(detok.add(token))
                if stops.stopped:
                    reason = "stop"
                elif len(new) >= params.max_new_tokens or len(prompt) + len(new) >= self.context_length:
                    reason = "length"
                elif cancel.is_set():
                    reason = "cancelled"
            if reason is not None:
                stats["finish_reason"] = reason
                yield TokenEvent(token, text + stops.flush())
                return
            yield TokenEvent(token, text)
            seen = torch.cat([seen, torch.tensor([token])])
            logits = self._forward([token])
            stats["decode_tokens_per_s"] = (len(new)) / (time.perf_counter() - t_decode)
