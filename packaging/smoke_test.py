"""`python packaging/smoke_test.py`: build the bundle, then prove that it starts and chats on its own.

1. Builds dist/moe-chat/ (packaging/build.py; `--no-build` checks the bundle that is there).
2. Checks what is inside: the resources, the MoE architectures' code, and none of what must stay out
   (tests, unused Qt modules, a second Qt binding, CUDA libraries next to a CPU torch), under 1 GiB.
3. Runs `moe-chat --self-test` from an empty temp folder with a bare environment (`env -i`-like: no
   PYTHONPATH, no venv, a fresh HOME), offscreen. The bundle's entry point writes a report
   (MOE_CHAT_BUNDLE_REPORT) that says where every loaded module came from: all must lie inside the
   bundle. It also gives the seconds from process start to the first painted window.
4. With `--archs`, runs the self-test again on a tiny random checkpoint of each MoE architecture the
   tests cover (tests/tiny_models.py), since transformers imports model code by name at run time, each
   naming the tokenizer class its real checkpoints use (also imported by name).

Prints one JSON object (`"ok": true` when everything passed) and exits 0, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build  # packaging/build.py

ROOT = build.ROOT
MAX_BUNDLE_BYTES = 2**30  # with a CPU build of torch; a CUDA build adds the CUDA libraries (several GB)
# The MoE architectures the tests cover, each with the tokenizer class its published checkpoints name (most
# live in packages of dense models, which the bundle keeps only the tokenizer modules of).
ARCHS = {"qwen3_moe": "Qwen2Tokenizer", "qwen2_moe": "Qwen2Tokenizer", "mixtral": "LlamaTokenizer",
         "olmoe": "GPTNeoXTokenizer", "deepseek_v2": "LlamaTokenizerFast", "gpt_oss": "PreTrainedTokenizerFast"}
# Paths (relative to the bundle) that must never ship.
FORBIDDEN = {
    "a second Qt binding": r"(^|/)(PyQt5|PyQt6|PySide2)(/|$)",
    "an unused Qt module": r"Qt6?(WebEngine|Quick|Qml|Designer|Pdf|Multimedia|Network|3D|Charts|Bluetooth)",
    "the repository's tests": r"^(_internal/)?tests/",
    "torch's test programs": r"^(_internal/)?torch/(test/|bin/test_)|torchbind_test|jitbackend_test",
    "a test or benchmark tool": r"^(_internal/)?(pytest|_pytest|pytestqt|matplotlib|setuptools)(/|$)",
}
CUDA = r"(^|/)(lib)?(cudart|cublas|cudnn|cufft|curand|cusolver|cusparse|nccl|nvrtc|nvJitLink)[^/]*\.(so|dll|dylib)"


def bundle_files(bundle: Path) -> list[str]:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*"))


def check_contents(bundle: Path, need_demo_model: bool) -> list[str]:
    """Problems with what the bundle holds (an empty list when it is right)."""
    import torch

    files = bundle_files(bundle)
    internal = "_internal/" if (bundle / "_internal").is_dir() else ""
    problems = []
    rules = dict(FORBIDDEN)
    if torch.version.cuda is None and torch.version.hip is None:
        rules["a CUDA library next to a CPU build of torch"] = CUDA
    for what, pattern in rules.items():
        hits = [f for f in files if re.search(pattern, f)]
        if hits:
            problems.append(f"{what} is in the bundle: {', '.join(hits[:5])}{' ...' if len(hits) > 5 else ''}")
    needed = ["resources/icons/app.svg", "resources/styles/app.qss"]
    needed += [f"transformers/models/{a}/modeling_{a}.py" for a in ARCHS]
    if need_demo_model:
        needed.append("resources/demo-model/config.json")
    problems += [f"{internal}{n} is missing" for n in needed if not (bundle / internal / n).is_file()]
    if os.name == "posix":
        private = [f for f in files if not (bundle / f).is_symlink() and not (bundle / f).stat().st_mode & 0o004]
        if private:
            problems.append(f"files other users cannot read: {', '.join(private[:5])}")
    size, _ = build.size_report(bundle)
    if torch.version.cuda is None and size > MAX_BUNDLE_BYTES:
        problems.append(f"the bundle is {size / 2**20:.0f} MiB, over {MAX_BUNDLE_BYTES / 2**20:.0f} MiB")
    return problems


def bare_env(home: Path, report: Path) -> dict[str, str]:
    """What a double-click gives the app, minus anything from this shell: no PYTHONPATH, no venv."""
    env = {"HOME": str(home), "PATH": os.pathsep.join(["/usr/bin", "/bin"]), "QT_QPA_PLATFORM": "offscreen",
           "MOE_CHAT_BUNDLE_REPORT": str(report), "LANG": "C.UTF-8"}
    if sys.platform == "win32":  # Windows cannot start a process without these
        env["PATH"] = os.environ.get("SystemRoot", r"C:\Windows") + r"\System32"
        env.update({k: os.environ[k] for k in ("SystemRoot", "TEMP", "TMP", "USERPROFILE", "APPDATA", "LOCALAPPDATA")
                    if k in os.environ})
    return env


def report_problems(report: dict, bundle: Path) -> list[str]:
    """What the entry point's report says is wrong: anything loaded from outside the bundle, no window."""
    problems = []
    if not report.get("frozen"):
        problems.append("the process was not frozen")
    if not Path(report.get("bundle", "/")).resolve().is_relative_to(bundle):
        problems.append(f"sys._MEIPASS is {report.get('bundle')}, not inside {bundle}")
    outside = [p for p in report.get("sys_path", []) if not Path(p).resolve().is_relative_to(bundle)]
    if outside:
        problems.append(f"sys.path reaches outside the bundle: {outside}")
    if report.get("modules_outside_bundle"):
        problems.append(f"modules loaded from outside the bundle: {report['modules_outside_bundle'][:10]}")
    if report.get("window_shown_s") is None:
        problems.append("no window was painted")
    return problems


def run_self_test(exe: Path, model: str | None, timeout_s: float) -> dict:
    """Run the bundle's self-test in a bare environment; returns its JSON, timings and what went wrong."""
    with tempfile.TemporaryDirectory(prefix="moe-chat-smoke-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "home").mkdir()
        report_file, screenshot = tmp_path / "report.json", tmp_path / "window.png"
        cmd = [str(exe), "--self-test", "--timeout", str(timeout_s), "--screenshot", str(screenshot)]
        if model:
            cmd += ["--model", model]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=tmp_path, env=bare_env(tmp_path / "home", report_file), check=False,
                                  capture_output=True, text=True, timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            return {"ok": False, "reason": f"the bundle did not exit within {timeout_s + 60:.0f} s"}
        wall = time.monotonic() - start
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (proc.stdout + proc.stderr)[-3000:]
            return {"ok": False, "reason": f"no JSON report (exit code {proc.returncode}); output ends:\n{tail}"}
        result.update(exit_code=proc.returncode, wall_s=round(wall, 2),
                      screenshot_bytes=screenshot.stat().st_size if screenshot.exists() else 0)
        result.pop("screenshot", None)  # gone with the temp folder
        if not report_file.exists():
            result.update(ok=False, reason="the bundle wrote no module report (was it built from packaging/entry.py?)")
            return result
        report = json.loads(report_file.read_text(encoding="utf-8"))
        result.update({k: report.get(k) for k in ("python_started_s", "window_shown_s", "modules")})
        problems = report_problems(report, exe.parent.resolve())
        if proc.returncode != 0 and result.get("ok"):
            problems.append(f"the self-test passed but the process exited with {proc.returncode}")
        if problems:
            result.update(ok=False, reason="; ".join(([result["reason"]] if result.get("reason") else []) + problems))
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-build", action="store_true", help="check the bundle already in dist/moe-chat/")
    p.add_argument("--clean", action="store_true", help="build from scratch (no PyInstaller cache)")
    p.add_argument("--model", help="self-test on this model folder instead of the embedded demo model")
    p.add_argument("--archs", action="store_true",
                   help=f"also self-test tiny random checkpoints of {', '.join(ARCHS)}")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds each self-test may take")
    args = p.parse_args(argv)

    summary: dict = {"ok": False, "bundle": str(build.bundle_dir().relative_to(ROOT))}
    problems: list[str] = []
    if not args.no_build:
        print("building the bundle ...", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON summary
            seconds = build.build(clean=args.clean, allow_no_demo_model=bool(args.model), quiet=True)
        summary["build_s"] = round(seconds, 1)
    exe = build.executable()
    if not exe.is_file():
        problems.append(f"{exe} does not exist; build it first")
    else:
        size, parts = build.size_report(build.bundle_dir())
        summary["bundle_mib"] = round(size / 2**20, 1)
        summary["biggest_mib"] = {name: round(n / 2**20, 1) for name, n in parts[:6]}
        problems += check_contents(build.bundle_dir(), need_demo_model=not args.model)
        print("self-test on " + (args.model or "the demo model") + " ...", file=sys.stderr, flush=True)
        summary["self_test"] = run_self_test(exe, args.model, args.timeout)
        if not summary["self_test"].get("ok"):
            problems.append(f"self-test: {summary['self_test'].get('reason')}")
        if args.archs:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_models import make_tiny_model

            summary["archs"] = {}
            with tempfile.TemporaryDirectory(prefix="moe-chat-archs-") as tmp:
                for arch, tokenizer in ARCHS.items():
                    print(f"self-test on a tiny {arch} ({tokenizer}) ...", file=sys.stderr, flush=True)
                    with contextlib.redirect_stdout(sys.stderr):
                        model = make_tiny_model(Path(tmp) / arch, arch)
                    config = model / "tokenizer_config.json"
                    config.write_text(json.dumps(json.loads(config.read_text()) | {"tokenizer_class": tokenizer}))
                    r = run_self_test(exe, str(model), args.timeout)
                    summary["archs"][arch] = {k: r.get(k) for k in ("ok", "tokens", "wall_s", "reason") if k in r}
                    summary["archs"][arch]["tokenizer_class"] = tokenizer
                    if not r.get("ok"):
                        problems.append(f"self-test on {arch}: {r.get('reason')}")
    summary["problems"] = problems
    summary["ok"] = not problems
    print(json.dumps(summary, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
