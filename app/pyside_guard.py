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
