"""Before QApplication on X11: the xcb plugin's system libraries are checked, and a missing one is named
with the package to install, instead of Qt's SIGABRT ("could not load the Qt platform plugin")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import PySide6

from app import pyside_guard
from app.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
QT = Path(PySide6.__file__).parent / "Qt"
SYSTEM = ("libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "libpthread.so", "libdl.so", "ld-linux")


def _needed(library: Path) -> set[str]:
    out = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return {line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line}


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="reads the ELF NEEDED entries of PySide6's Linux plugin")
def test_the_table_names_every_system_library_the_xcb_plugin_needs():
    plugin = QT / "plugins" / "platforms" / "libqxcb.so"
    needed = _needed(plugin) | _needed(QT / "lib" / "libQt6XcbQpa.so.6")
    from_system = {n for n in needed if not n.startswith("libQt6") and not n.startswith(SYSTEM)}
    assert from_system <= set(pyside_guard.XCB_LIBRARIES), from_system - set(pyside_guard.XCB_LIBRARIES)


@pytest.mark.parametrize(("environ", "expected"), [
    ({"DISPLAY": ":0"}, True),
    ({"DISPLAY": ":0", "QT_QPA_PLATFORM": "xcb"}, True),
    ({"QT_QPA_PLATFORM": "xcb:nograb"}, True),
    ({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}, False),
    ({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}, False),  # Qt tries Wayland first
    ({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0", "QT_QPA_PLATFORM": "xcb"}, True),
    ({}, False),
])
def test_when_qt_will_use_xcb(environ, expected):
    assert pyside_guard.uses_xcb(environ, "linux") is expected
    assert pyside_guard.uses_xcb(environ, "win32") is False


def test_missing_libraries_are_named_with_a_package_per_distro(monkeypatch):
    gone = {"libxcb-cursor.so.0", "libxcb-icccm.so.4", "libxcb-randr.so.0"}
    monkeypatch.setattr(pyside_guard, "_loadable", lambda soname: soname not in gone)
    missing = pyside_guard.missing_xcb_libraries()
    assert set(missing) == gone
    text = pyside_guard.xcb_help(missing)
    assert "sudo apt install libxcb-cursor0 libxcb-icccm4 libxcb-randr0" in text
    assert "sudo dnf install xcb-util-cursor xcb-util-wm libxcb" in text
    assert "sudo pacman -S xcb-util-cursor xcb-util-wm libxcb" in text


def test_nothing_missing_means_no_message(monkeypatch):
    monkeypatch.setattr(pyside_guard, "_loadable", lambda soname: True)
    assert pyside_guard.missing_xcb_libraries() == []


def test_main_exits_1_with_the_message_before_creating_the_application(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(pyside_guard, "_loadable", lambda soname: soname != "libxcb-keysyms.so.1")

    def no_log(_path):
        raise AssertionError("start-up went on past the platform check")

    monkeypatch.setattr("app.__main__.start_log", no_log)
    assert main(["--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "libxcb-keysyms.so.1" in err and "sudo apt install libxcb-keysyms1" in err


@pytest.mark.skipif(not sys.platform.startswith("linux") or not pyside_guard.missing_xcb_libraries(),
                    reason="needs a machine that really lacks one of the xcb plugin's libraries")
def test_a_real_machine_without_the_libraries_gets_the_message_not_sigabrt(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env["DISPLAY"] = ":99"
    result = subprocess.run([sys.executable, "-m", "app", "--data-dir", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "sudo apt install" in result.stderr and "could not load the Qt platform plugin" not in result.stderr


def _setup_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]


def _packages_after(text: str, command: str) -> list[str]:
    """The words after `command` inside the backticks that start with it (the README wraps lines)."""
    flat = " ".join(text.split())
    return flat.split(f"`{command} ", 1)[1].split("`", 1)[0].split()


def test_the_readme_names_real_packages_and_keeps_two_set_up_commands():
    section = _setup_section()
    commands = [line for line in section.splitlines() if line.startswith("    ") and line.strip()]
    assert len(commands) == 2, commands
    for family, command in enumerate(("apt install", "dnf install", "pacman -S")):
        listed = _packages_after(section, command)
        known = {row[family] for row in pyside_guard.XCB_LIBRARIES.values()}
        assert listed and set(listed) <= known, (command, set(listed) - known)


def test_ci_installs_the_readme_packages():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    xcb = ci.split('QT_XCB_PACKAGES="', 1)[1].split('"', 1)[0].split()
    offscreen = ci.split('QT_OFFSCREEN_PACKAGES="', 1)[1].split('"', 1)[0].split()
    assert set(_packages_after(_setup_section(), "apt install")) <= set(xcb) | set(offscreen)
