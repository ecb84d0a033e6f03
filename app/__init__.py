"""MoE Chat desktop app: a PySide6 window around the hybrid CPU-GPU expert-cache engine.

Only `app.engine_worker` imports the engine; everything else talks to it through that worker's
signals and slots, so the window never waits on a model.
"""

APP_NAME = "MoE Chat"        # shown to people
APP_ID = "moe-chat"          # folder and settings name: the same data folder as engine.paths

from app import pyside_guard  # noqa: E402,F401 - before any signal: see the module docstring
