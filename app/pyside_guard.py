"""Guard against a reference-counting bug of PySide6 6.12.0 on Python 3.11 and older.

There, every `Signal.emit()` hands back `True` without taking a reference to it, and queued slot
calls drop references to `None`. Python 3.12+ does not care (those objects are immortal), but on
3.11 the counts run down and the process aborts ("deallocating True/None") after a few thousand
signals: a long chat would crash. The fix upstream is a newer or older PySide6 (6.11.2 is fine); until
then this module makes the three singletons immortal the way Python 3.12 does, only when the bug
is actually present.
"""

from __future__ import annotations

import ctypes
import sys

_IMMORTAL = 1 << 40  # far more references than any process could ever drop


def emit_leaks_references() -> bool:
    """True when this PySide6 loses a reference to `True` on each emit."""
    from PySide6.QtCore import QObject, Signal

    class _Probe(QObject):
        ping = Signal()

    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(8):
        probe.ping.emit()
    return sys.getrefcount(True) < before


def protect_singletons() -> bool:
    """Make None/True/False immortal on Python < 3.12 if PySide6 needs it; returns whether it did."""
    if sys.version_info >= (3, 12) or hasattr(sys, "gettotalrefcount") or not emit_leaks_references():
        return False
    for obj in (None, True, False):
        # ob_refcnt is the first field of every object in a release build of CPython 3.11.
        ctypes.c_ssize_t.from_address(id(obj)).value += _IMMORTAL
    return True


PROTECTED = protect_singletons()


# -- the xcb platform plugin's system libraries -----------------------------------------------------
# Qt aborts (SIGABRT, "could not load the Qt platform plugin") when one is missing, so the app checks
# them first and says what to install. The sonames are the NEEDED entries of PySide6's
# plugins/platforms/libqxcb.so and lib/libQt6XcbQpa.so.6 that the wheel does not ship (readelf -d),
# plus libEGL, which libQt6Gui needs; tests/app/test_app_startup_platform.py keeps this list true.
XCB_LIBRARIES: dict[str, tuple[str, str, str]] = {
    # soname: (Debian/Ubuntu apt, Fedora dnf, Arch pacman)
    "libxcb.so.1": ("libxcb1", "libxcb", "libxcb"),
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm", "xcb-util-wm"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image", "xcb-util-image"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms", "xcb-util-keysyms"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb", "libxcb"),
    "libxcb-render.so.0": ("libxcb-render0", "libxcb", "libxcb"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil", "xcb-util-renderutil"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb", "libxcb"),
    "libxcb-shm.so.0": ("libxcb-shm0", "libxcb", "libxcb"),
    "libxcb-sync.so.1": ("libxcb-sync1", "libxcb", "libxcb"),
    "libxcb-util.so.1": ("libxcb-util1", "xcb-util", "xcb-util"),
    "libxcb-xfixes.so.0": ("libxcb-xfixes0", "libxcb", "libxcb"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb", "libxcb"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon", "libxkbcommon"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11", "libxkbcommon-x11"),
    "libX11.so.6": ("libx11-6", "libX11", "libx11"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb", "libx11"),
    "libGL.so.1": ("libgl1", "libglvnd-glx", "libglvnd"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl", "libglvnd"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig", "fontconfig"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2", "glib2"),
    "libgthread-2.0.so.0": ("libglib2.0-0", "glib2", "glib2"),
}
INSTALLERS = (("Debian/Ubuntu", "sudo apt install"), ("Fedora", "sudo dnf install"), ("Arch", "sudo pacman -S"))


def uses_xcb(environ: dict[str, str], platform: str | None = None) -> bool:
    """Whether Qt will pick its X11 (xcb) plugin: asked for by name, or an X display and no Wayland one.

    On a Wayland session Qt 6 tries its Wayland plugin first, so missing xcb libraries do not matter there.
    """
    if not (platform or sys.platform).startswith("linux"):
        return False
    chosen = environ.get("QT_QPA_PLATFORM", "").split(":")[0].split(";")[0].strip()
    if chosen:
        return chosen == "xcb"
    return bool(environ.get("DISPLAY")) and not environ.get("WAYLAND_DISPLAY")


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def missing_xcb_libraries() -> list[str]:
    """The sonames of XCB_LIBRARIES that the dynamic loader cannot load, in table order."""
    return [soname for soname in XCB_LIBRARIES if not _loadable(soname)]


def xcb_help(missing: list[str]) -> str:
    """What to tell a person whose system lacks `missing`: one install command per distro family."""
    lines = [
        "MoE Chat cannot open a window: Qt's X11 (xcb) platform plugin needs system libraries that are "
        f"not installed: {', '.join(missing)}.",
        "Install them, then start MoE Chat again:",
    ]
    for family, (name, command) in enumerate(INSTALLERS):
        packages = list(dict.fromkeys(XCB_LIBRARIES[s][family] for s in missing))
        lines.append(f"  {name}: {command} {' '.join(packages)}")
    return "\n".join(lines)
