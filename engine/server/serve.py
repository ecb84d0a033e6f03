"""Start the server: loopback unless a host is given explicitly, a key from the flag or MOE_CHAT_API_KEY."""

from __future__ import annotations

import logging
import os
import sys

from ..model.loader import LoadedModel
from ..model.session import Session
from .generation_queue import GenerationQueue
from .openai_api import create_app

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def api_key_from(flag: str | None) -> str | None:
    return flag or os.environ.get("MOE_CHAT_API_KEY") or None


def serve(loaded: LoadedModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_id: str | None = None, max_waiting: int = 16) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    model_id = model_id or loaded.info.name
    if host not in LOOPBACK:
        print(f"warning: listening on {host}, not only this machine: anyone who can reach it can use the model"
              + ("" if api_key else " (no API key set; consider --api-key)"), file=sys.stderr)
    engine = GenerationQueue(Session(loaded), max_waiting=max_waiting)
    app = create_app(engine, model_id, api_key)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model_id} at http://{shown}:{port}/v1" + (" (API key required)" if api_key else ""),
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        engine.close()
