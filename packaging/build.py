"""`python packaging/build.py`: build the one-folder bundle dist/moe-chat/ with PyInstaller.

Runs PyInstaller on packaging/moe-chat.spec, shows its stages (the full log goes to
build/pyinstaller.log) with the elapsed time, then prints the bundle's size and what makes it big.
`--clean` also drops PyInstaller's caches (build/pyinstaller/ and its per-user cache).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

PACKAGING = Path(__file__).resolve().parent
ROOT = PACKAGING.parent
SPEC = PACKAGING / "moe-chat.spec"
DIST = ROOT / "dist"
WORK = ROOT / "build" / "pyinstaller"
LOG = ROOT / "build" / "pyinstaller.log"
ICON_SVG = ROOT / "resources" / "icons" / "app.svg"
ICON_PNG = PACKAGING / "icons" / "moe-chat.png"
DEMO_MODEL = ROOT / "resources" / "demo-model"

# PyInstaller log lines worth showing: its stages, our hooks' summaries, and anything that went wrong.
STAGES = re.compile(
    r"Running Analysis|Analyzing .*entry\.py|Processing module hooks|Performing binary vs\. data|Looking for dynamic"
    r"|Building (PYZ|PKG|EXE|COLLECT|BUNDLE)|completed successfully|Build complete|hook-transformers\.models:"
    r"|hook-torch: inferred|ERROR|Traceback"
)


def bundle_dir() -> Path:
    return DIST / "moe-chat"


def executable() -> Path:
    return bundle_dir() / ("moe-chat.exe" if sys.platform == "win32" else "moe-chat")


def render_icon(size: int = 256) -> None:
    """packaging/icons/moe-chat.png from resources/icons/app.svg: the Linux desktop icon, and what PyInstaller
    turns into the Windows .ico and the macOS .icns. Run again (`--render-icon`) when app.svg changes."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication([])  # noqa: F841 (QPainter needs one)
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    QSvgRenderer(str(ICON_SVG)).render(painter)
    painter.end()
    ICON_PNG.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(ICON_PNG)):
        raise SystemExit(f"could not write {ICON_PNG}")
    print(f"rendered {ICON_PNG.relative_to(ROOT)}")


def size_report(folder: Path, top: int = 12) -> tuple[int, list[tuple[str, int]]]:
    """Total bytes, and the biggest parts (two path levels below the bundle's library folder)."""
    parts: Counter[str] = Counter()
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            n = path.stat().st_size
            total += n
            rel = path.relative_to(folder).parts
            if rel[0] == "_internal":
                rel = rel[1:]
            parts["/".join(rel[:2]) if len(rel) > 2 else rel[0]] += n
    return total, parts.most_common(top)


def make_readable(folder: Path) -> None:
    """Let every user read the bundle: PyInstaller keeps the source files' modes, and a file that is
    private to the builder (a model saved with mode 0600, say) would break an install shared by several users."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | (0o555 if path.is_dir() or mode & 0o100 else 0o444))


def build(clean: bool = False, allow_no_demo_model: bool = False, quiet: bool = False) -> float:
    """Run PyInstaller; returns the seconds it took. Raises SystemExit when the build fails."""
    if not (DEMO_MODEL / "config.json").is_file():
        message = f"{DEMO_MODEL} holds no model, so the bundle would start without its demo model"
        if not allow_no_demo_model:
            raise SystemExit(f"error: {message} (pass --allow-no-demo-model to build anyway)")
        print(f"warning: {message}")
    if not ICON_PNG.exists():
        render_icon()
    LOG.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "PyInstaller", str(SPEC), "--noconfirm", "--distpath", str(DIST),
           "--workpath", str(WORK), "--log-level", "INFO"]
    if clean:
        cmd.append("--clean")
        shutil.rmtree(bundle_dir(), ignore_errors=True)
    start = time.monotonic()
    print(f"building {bundle_dir().relative_to(ROOT)}/ (full log: {LOG.relative_to(ROOT)})", flush=True)
    with open(LOG, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if not quiet and STAGES.search(line):
                elapsed = time.monotonic() - start
                message = re.sub(r"^\d+ (INFO|WARNING|ERROR): ", r"\1: ", line.rstrip()).replace("INFO: ", "")
                print(f"[{int(elapsed // 60):2d}:{int(elapsed % 60):02d}] {message}", flush=True)
        code = proc.wait()
    seconds = time.monotonic() - start
    if code != 0 or not executable().is_file():
        tail = LOG.read_text(encoding="utf-8").splitlines()[-25:]
        raise SystemExit("PyInstaller failed (exit code {}); the end of its log:\n{}".format(code, "\n".join(tail)))
    if os.name == "posix":
        make_readable(bundle_dir())
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clean", action="store_true", help="discard PyInstaller's cache and the old bundle first")
    p.add_argument("--allow-no-demo-model", action="store_true",
                   help="build even when resources/demo-model is empty (development only: not a bundle to ship)")
    p.add_argument("--render-icon", action="store_true", help="only render packaging/icons/moe-chat.png again")
    args = p.parse_args(argv)
    if args.render_icon:
        render_icon()
        return 0
    seconds = build(clean=args.clean, allow_no_demo_model=args.allow_no_demo_model)
    total, parts = size_report(bundle_dir())
    print(f"built {executable().relative_to(ROOT)} in {seconds:.0f} s")
    print(f"bundle size: {total / 2**20:.0f} MiB; biggest parts:")
    for name, n in parts:
        print(f"  {n / 2**20:8.1f} MiB  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
