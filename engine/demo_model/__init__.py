"""The embedded demo model: a tiny Qwen3-MoE trained on a synthetic chat corpus, shipped so a fresh install can chat."""

import sys
from pathlib import Path

DEMO_MODEL_DIR = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parents[2])) / "resources" / "demo-model"
