"""The PyInstaller bundle: what the build keeps of transformers, and the built bundle's own self-test.

`test_bundle_builds_and_passes_its_self_test` builds dist/moe-chat/ and runs it (packaging/smoke_test.py),
which takes several minutes, so it runs only with MOE_CHAT_BUNDLE_TEST=1 (CI sets it, and so does the
command in packaging/README.md). When it runs, a missing PyInstaller or demo model is a failure.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "packaging" / "hooks" / "hook-transformers.models.py"
TESTED_ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "gpt_oss"]
RUN_BUNDLE_TEST = os.environ.get("MOE_CHAT_BUNDLE_TEST") == "1"


def _hook_plan():
    if not RUN_BUNDLE_TEST:
        pytest.importorskip("PyInstaller", reason="PyInstaller is in the `package` extra")
    return runpy.run_path(str(HOOK))


def test_transformers_hook_keeps_causal_lms_whole_and_every_config_and_tokenizer():
    plan = _hook_plan()
    keep, hidden, excluded = plan["_keep"], set(plan["hiddenimports"]), set(plan["excludedimports"])
    assert set(TESTED_ARCHS) <= keep
    assert {"auto", "encoder_decoder", "llama", "qwen2", "mistral"} <= keep  # dense models run as plain models
    assert not any(e.startswith(f"transformers.models.{p}.") for e in excluded for p in keep)
    # Other packages stay importable (a tokenizer lookup imports them), with config and tokenizers, no model code.
    assert {"transformers.models.vit", "transformers.models.vit.configuration_vit",
            "transformers.models.t5.tokenization_t5", "transformers.models.clip.tokenization_clip"} <= hidden
    assert {"transformers.models.vit.modeling_vit", "transformers.models.t5.modeling_t5"} <= excluded
    assert not any(".tokenization_" in e or ".configuration_" in e for e in excluded)
    assert "transformers.models.clvp.number_normalizer" in hidden  # a tokenizer's helper module stays with it


@pytest.mark.skipif(not RUN_BUNDLE_TEST, reason="builds the PyInstaller bundle (minutes): set MOE_CHAT_BUNDLE_TEST=1")
def test_bundle_builds_and_passes_its_self_test():
    env = {k: v for k, v in os.environ.items() if k != "MOE_CHAT_DATA"}
    proc = subprocess.run([sys.executable, str(ROOT / "packaging" / "smoke_test.py"), "--archs"], cwd=ROOT,
                          env=env, check=False, capture_output=True, text=True, timeout=3600)
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"smoke_test.py printed no JSON (exit code {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                    f"{proc.stderr[-4000:]}")
    print(json.dumps(summary, indent=1))
    assert summary["ok"], "\n".join(summary["problems"])
    assert proc.returncode == 0
    assert summary["self_test"]["tokens"] > 0
    assert all(r["ok"] for r in summary["archs"].values())
