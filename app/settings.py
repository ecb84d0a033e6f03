"""A thin typed wrapper over QSettings (buzz-style): one enum of keys, one table of defaults."""

from __future__ import annotations

import enum
import json
from typing import Any

from PySide6.QtCore import QSettings

from app import APP_ID
from app.paths import settings_file


class Key(str, enum.Enum):
    MODEL_SOURCE = "model/source"          # last loaded model ("" = the embedded demo model)
    EXTRA_MODEL_DIRS = "model/extra_dirs"  # folders added with Browse..., remembered
    BUDGET_SHARE = "cache/budget_share"    # share of the model's expert bytes; 0 = the engine's default
    POLICY = "cache/policy"
    TEMPERATURE = "sampling/temperature"
    TOP_P = "sampling/top_p"
    TOP_K = "sampling/top_k"
    MAX_TOKENS = "sampling/max_tokens"
    REPETITION_PENALTY = "sampling/repetition_penalty"
    SEED = "sampling/seed"                 # -1 = a fresh random reply each time
    SYSTEM_PROMPT = "chat/default_system_prompt"
    THEME = "ui/theme"                     # "light" | "dark" | "system"
    GEOMETRY = "ui/geometry"
    SPLITTER = "ui/splitter"
    LAST_CONVERSATION = "chat/last_conversation"
    DEVICE = "engine/device"               # "auto" | "cpu" | "cuda"
    THREADS = "engine/threads"             # CPU threads for the miss path; 0 = the physical cores
    CONTEXT_LENGTH = "engine/context"      # 0 = the model's own context length
    SERVER_ENABLED = "server/enabled"      # the OpenAI-compatible local server, off until asked for
    SERVER_PORT = "server/port"
    SERVER_API_KEY = "server/api_key"      # "" = no key (the server listens on 127.0.0.1 only)
    REMOTE_SERVERS = "remote/servers"      # [{"url", "model"}], the last used first
    REMOTE_KEYS = "remote/keys"            # [[url, key]] only where no system keyring is available


DEFAULTS: dict[Key, Any] = {
    Key.MODEL_SOURCE: "",
    Key.EXTRA_MODEL_DIRS: [],
    Key.BUDGET_SHARE: 0.0,
    Key.POLICY: "auto",
    Key.TEMPERATURE: 0.7,
    Key.TOP_P: 0.9,
    Key.TOP_K: 40,
    Key.MAX_TOKENS: 512,
    Key.REPETITION_PENALTY: 1.1,
    Key.SEED: -1,
    Key.SYSTEM_PROMPT: "You are a helpful assistant.",
    Key.THEME: "system",
    Key.GEOMETRY: b"",
    Key.SPLITTER: b"",
    Key.LAST_CONVERSATION: 0,
    Key.DEVICE: "auto",
    Key.THREADS: 0,
    Key.CONTEXT_LENGTH: 0,
    Key.SERVER_ENABLED: False,
    Key.SERVER_PORT: 8080,
    Key.SERVER_API_KEY: "",
    Key.REMOTE_SERVERS: [],
    Key.REMOTE_KEYS: [],
}

SAMPLING_KEYS = {
    "temperature": Key.TEMPERATURE,
    "top_p": Key.TOP_P,
    "top_k": Key.TOP_K,
    "max_new_tokens": Key.MAX_TOKENS,
    "repetition_penalty": Key.REPETITION_PENALTY,
    "seed": Key.SEED,
}


class Settings:
    """Typed get/set over QSettings; values come back as the type of their default."""

    def __init__(self, qsettings: QSettings | None = None) -> None:
        if qsettings is None:
            path = settings_file()
            qsettings = (
                QSettings(str(path), QSettings.Format.IniFormat)
                if path is not None
                else QSettings(APP_ID, APP_ID)
            )
        self._s = qsettings

    def value(self, key: Key) -> Any:
        default = DEFAULTS[key]
        raw = self._s.value(key.value, None)
        if raw is None:
            return default
        try:
            if isinstance(default, bool):
                return raw in (True, "true", "1", 1)
            if isinstance(default, int):
                return int(raw)
            if isinstance(default, float):
                return float(raw)
            if isinstance(default, list):
                return json.loads(raw) if isinstance(raw, str) else list(raw)
            if isinstance(default, bytes):
                return bytes(raw) if not isinstance(raw, str) else raw.encode("latin-1")
            return str(raw)
        except (TypeError, ValueError):
            return default

    def set_value(self, key: Key, value: Any) -> None:
        if isinstance(DEFAULTS[key], list):
            value = json.dumps(list(value))
        self._s.setValue(key.value, value)

    def reset(self, key: Key) -> None:
        self._s.remove(key.value)

    def sampling(self) -> dict[str, Any]:
        """Sampling settings as GenerationParams keyword arguments."""
        values = {name: self.value(key) for name, key in SAMPLING_KEYS.items()}
        if values["seed"] < 0:
            values["seed"] = None
        return values

    def set_sampling(self, values: dict[str, Any]) -> None:
        for name, key in SAMPLING_KEYS.items():
            if name in values:
                value = values[name]
                self.set_value(key, -1 if value is None else value)

    def sync(self) -> None:
        self._s.sync()
