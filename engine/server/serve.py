"""Start the server: loopback unless a host is given explicitly, a key from the flag or MOE_CHAT_API_KEY."""

from __future__ import annotations

import os
import sys
import threading
import time

from ..errors import EngineError
from ..model.loader import LoadedModel
from ..model.session import Session
from .generation_queue import GenerationQueue, JobBoard
from .openai_api import create_app

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def api_key_from(flag: str | None) -> str | None:
    return flag or os.environ.get("MOE_CHAT_API_KEY") or None


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK:
        print(f"warning: listening on {host}, not only this machine: anyone who can reach it can use the model"
              + ("" if api_key else " (no API key set; consider --api-key)"), file=sys.stderr)


def base_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve(loaded: LoadedModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_id: str | None = None, max_waiting: int = 16) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    model_id = model_id or loaded.info.name
    warn_if_exposed(host, api_key)
    engine = GenerationQueue(Session(loaded), model_id, max_waiting=max_waiting)
    print(f"serving {model_id} at {base_url(host, port)}" + (" (API key required)" if api_key else ""),
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="warning", access_log=False)
    finally:
        engine.close()


class ServerThread:
    """The server on a thread of this process (the app, benchmarks, tests); port 0 picks a free one."""

    def __init__(self, engine: JobBoard, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None):
        import uvicorn

        warn_if_exposed(host, api_key)
        self.host = host
        config = uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level="warning",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="moe-chat-http", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise EngineError(f"the server could not listen on {host}:{port} (is the port in use?)")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = base_url(host, self.port)

    def _serve(self) -> None:
        try:
            self._server.run()
        except BaseException as e:  # noqa: BLE001 - reported by the constructor as "could not listen"
            self._failed = e

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
