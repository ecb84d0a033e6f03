"""The local OpenAI-compatible server: `python -m engine serve`."""
