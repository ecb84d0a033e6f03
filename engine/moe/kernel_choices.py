"""Kernel choices measured on this machine, remembered per machine and shape of the weights.

Which CPU backend computes the experts, whether a decode step's experts are split over the cores, and
which activation dtype the int8/int4 dense layers run in are measured at load: a winner on one CPU
loses on the next. The results are kept in the user's data folder, keyed by the machine (CPU model,
cores, threads, torch and numpy versions) and by the shape of the weights, so that later loads are
instant and make the same choice. An entry measured on another machine or software version is stale:
it is measured anew and replaced.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..paths import user_data_dir

log = logging.getLogger(__name__)

VERSION = 4  # bump when what is measured changes: every entry is then stale
FILE_NAME = "kernel-choices.json"
REMEASURE_ENV = "MOE_CHAT_REMEASURE"  # set to 1: measure again and replace what was remembered


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a measurement depends on besides the weights' shape."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "version": VERSION}


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")  # Linux; elsewhere the default below stands


def last_level_cache_bytes(root: Path = CPU_CACHES, default: int = 32 * 2**20) -> int:
    """The largest CPU cache's size."""
    sizes = []
    for size in root.glob("index*/size"):
        try:
            text = size.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=default)


def bytes_past_cache(least: int = 64 * 2**20, most: int = 2**30) -> int:
    """How many bytes of weights a timing should stream so that they come from memory, not cache:
    twice the last-level cache (480 MiB on one of this project's Xeons), within [least, most]."""
    return max(least, min(most, 2 * last_level_cache_bytes()))


def _file() -> Path:
    return user_data_dir() / FILE_NAME


def _read() -> dict:
    try:
        data = json.loads(_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, unreadable or damaged: measure
        return {}


def _write(data: dict) -> None:
    file = _file()
    tmp = file.with_name(file.name + ".partial")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(file)
    except OSError as e:  # a read-only data folder: the choice holds for this load only
        log.info("kernel choices not saved to %s (%s)", file, e.strerror or e)


def _key(kind: str, shape: dict) -> str:
    return kind + " " + json.dumps(shape, sort_keys=True)


def remembered(kind: str, shape: dict, measure: Callable[[], dict]) -> tuple[dict, bool]:
    """(choice, whether it was remembered) for `kind` of weights of `shape` on this machine: the saved
    choice when one was measured here with the same software, else `measure()`, saved for next time."""
    data = _read()
    key = _key(kind, shape)
    entry = data.get(key)
    if (isinstance(entry, dict) and entry.get("machine") == machine() and isinstance(entry.get("choice"), dict)
            and os.environ.get(REMEASURE_ENV, "") in ("", "0")):
        return entry["choice"], True
    t = time.perf_counter()
    choice = measure()
    data = _read()  # another process may have written meanwhile: keep its entries
    data[key] = {"machine": machine(), "choice": choice, "measured_s": round(time.perf_counter() - t, 3),
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write(data)
    return choice, False


def entries(kind: str) -> list[tuple[dict, dict]]:
    """(shape, choice) of each `kind` choice remembered on this machine at any thread count, the count
    added to the shape (for `info`: measures nothing)."""
    here = {k: v for k, v in machine().items() if k != "threads"}
    out = []
    for key, entry in _read().items():
        name, _, shape = key.partition(" ")
        if name != kind or not isinstance(entry, dict) or not isinstance(entry.get("machine"), dict):
            continue
        threads = entry["machine"].get("threads")
        if {k: v for k, v in entry["machine"].items() if k != "threads"} == here:
            try:
                out.append(({**json.loads(shape), "threads": threads}, entry.get("choice")))
            except ValueError:
                continue
    return out
