"""The engine's headless face: `python -m engine` (cli), bench, seed suite, routing traces, simulator."""
