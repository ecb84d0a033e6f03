"""Live side panels (pyqtgraph): per-layer hit rate, memory, throughput.

Each panel takes the worker's stats snapshots (<= 10 a second) through `update_stats`. The engine's
counters are cumulative; the panels turn them into per-interval deltas so the plots show *now*.
"""

from __future__ import annotations

import collections
import math
import time

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from app import theme
from app.engine_worker import format_bytes

HEAT_COLUMNS = 90          # recent intervals shown in the heat map
BAR_WINDOW = 4             # intervals summed for the current per-layer bars
HISTORY_S = 120.0          # seconds of memory and throughput history

pg.setConfigOptions(antialias=True, imageAxisOrder="col-major")


def _unit_for(max_bytes: float) -> tuple[float, str]:
    if max_bytes >= 2**30:
        return 2**30, "GiB"
    if max_bytes >= 2**20:
        return 2**20, "MiB"
    return 2**10, "KiB"


def _layer_lookups(snap: dict) -> np.ndarray | None:
    """[layers, 2] cumulative (hits, lookups) from a snapshot; lookups = hits + misses + fetches."""
    per = snap.get("per_layer") or []
    if not per:
        return None
    return np.array(
        [[p.get("hits", 0), p.get("hits", 0) + p.get("misses", 0) + p.get("fetches", 0)] for p in per],
        dtype=np.float64,
    )


class SecondsAxis(pg.AxisItem):
    """Time ticks as '-60 s' … 'now'."""

    def tickStrings(self, values, scale, spacing):
        return ["now" if abs(v) < 1e-6 else f"{v:.0f} s" for v in values]


class _Canvas(pg.GraphicsLayoutWidget):
    """A plot canvas that asks for little room, so the panels share the column instead of scrolling."""

    def sizeHint(self) -> QSize:
        return QSize(320, 140)


class Card(QFrame):
    """A titled panel with a badge and a note line, holding one pyqtgraph canvas."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("card")
        self.updates = 0
        self.title = QLabel(title)
        self.title.setObjectName("cardTitle")
        self.badge = QLabel()
        self.badge.setObjectName("cardBadge")
        self.badge.setVisible(False)
        self.summary = QLabel()
        self.summary.setObjectName("cardNote")
        self.summary.setWordWrap(True)
        self.summary.setMinimumWidth(10)
        self.legend_label = QLabel()
        self.legend_label.setObjectName("cardNote")
        self.legend_label.setWordWrap(True)
        self.legend_label.setVisible(False)
        self.canvas = _Canvas()
        self.canvas.ci.setContentsMargins(2, 2, 2, 2)
        head = QHBoxLayout()
        head.addWidget(self.title)
        head.addStretch(1)
        head.addWidget(self.badge)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 8, 10, 8)
        layout.setSpacing(4)
        layout.addLayout(head)
        layout.addWidget(self.summary)
        layout.addWidget(self.legend_label)
        layout.addWidget(self.canvas, 1)

    def set_badge(self, text: str, tip: str = "") -> None:
        self.badge.setText(text)
        self.badge.setToolTip(tip)
        self.badge.setVisible(bool(text))

    def set_legend(self, entries: list[tuple[str, str, bool]]) -> None:
        """A one-line legend above the plot: (colour, label, dashed) per series."""
        parts = [f'<span style="color:{color}; font-weight:700">{"┄┄" if dashed else "━━"}</span>&nbsp;{label}'
                 for color, label, dashed in entries]
        self.legend_label.setText("&nbsp;&nbsp;&nbsp;".join(parts))
        self.legend_label.setVisible(True)

    def style_plot(self, plot: pg.PlotItem) -> None:
        fg = theme.color("muted")
        for name in ("left", "bottom"):
            axis = plot.getAxis(name)
            axis.setPen(pg.mkPen(theme.color("border")))
            axis.setTextPen(pg.mkPen(fg))
        plot.showGrid(x=False, y=True, alpha=theme.SERIES[theme.current()]["grid"] / 255)

    def apply_theme(self) -> None:
        self.canvas.setBackground(theme.color("surface"))


class HitRatePanel(Card):
    """Per-layer hit rate: a layers x time heat map and the current per-layer bars."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Expert cache hit rate", parent)
        self.cmap = pg.colormap.get("viridis")
        self.heat_plot = self.canvas.addPlot(row=0, col=0)
        self.heat_plot.setLabel("left", "layer")
        self.heat_plot.setLabel("bottom", "recent steps →")
        self.heat_plot.getAxis("bottom").setStyle(showValues=False)
        self.heat_plot.setMouseEnabled(False, False)
        self.heat_plot.hideButtons()
        self.heat = pg.ImageItem()
        self.heat.setColorMap(self.cmap)
        self.heat.setLevels((0.0, 1.0))
        self.heat_plot.addItem(self.heat)
        self.bar_plot = self.canvas.addPlot(row=0, col=1)
        self.bar_plot.setLabel("bottom", "now")
        self.bar_plot.setYLink(self.heat_plot)
        self.bar_plot.getAxis("left").setStyle(showValues=False)
        self.bar_plot.setXRange(0, 1, padding=0.02)
        self.bar_plot.getAxis("bottom").setTicks([[(0, "0"), (0.5, "50%"), (1, "100%")]])
        self.bar_plot.setMouseEnabled(False, False)
        self.bar_plot.hideButtons()
        self.bars = pg.BarGraphItem(x0=[], y=[], height=0.72, width=[])
        self.bar_plot.addItem(self.bars)
        self.canvas.ci.layout.setColumnStretchFactor(0, 3)
        self.canvas.ci.layout.setColumnStretchFactor(1, 1)
        self.canvas.setMinimumHeight(140)
        self._prev: np.ndarray | None = None
        self._grid = np.full((HEAT_COLUMNS, 0), np.nan)
        self._recent: collections.deque = collections.deque(maxlen=BAR_WINDOW)
        self.current_rates: np.ndarray = np.zeros(0)
        self.summary.setText("Waiting for the model…")
        # before any data: the empty frame of what will come (no "x0.001" SI scaling of an empty range)
        for plot in (self.heat_plot, self.bar_plot):
            for side in ("left", "bottom"):
                plot.getAxis(side).enableAutoSIPrefix(False)
        self.heat_plot.setXRange(0, HEAT_COLUMNS, padding=0)
        self.heat_plot.setYRange(-0.5, 3.5, padding=0)
        self.heat_plot.getAxis("left").setTicks([[]])
        self.apply_theme()

    def apply_theme(self) -> None:
        super().apply_theme()
        self.style_plot(self.heat_plot)
        self.style_plot(self.bar_plot)
        self.heat_plot.showGrid(x=False, y=False)

    def reset(self) -> None:
        self._prev = None
        self._recent.clear()
        self._grid = np.full((HEAT_COLUMNS, 0), np.nan)

    def update_stats(self, snap: dict) -> None:
        self.updates += 1
        if not snap.get("has_runtime"):
            if snap.get("remote"):
                text = f"The expert cache is on the server ({snap['remote']}); its hit rates are not visible here."
            elif snap.get("model_loaded"):
                text = "No expert cache: load a Mixture-of-Experts model to see hit rates."
            else:
                text = "Waiting for the model…"
            self.summary.setText(text)
            self.set_badge("")
            return
        counts = _layer_lookups(snap)
        if counts is None:
            return
        layers = counts.shape[0]
        if self._grid.shape[1] != layers or self._prev is None or self._prev.shape != counts.shape:
            self._grid = np.full((HEAT_COLUMNS, layers), np.nan)
            self._prev = counts
            self._recent.clear()
        delta = counts - self._prev
        self._prev = counts
        if (delta < 0).any():  # the engine reset its counters
            delta = np.zeros_like(delta)
        if delta[:, 1].sum() > 0:
            rate = np.divide(delta[:, 0], delta[:, 1], out=np.full(layers, np.nan), where=delta[:, 1] > 0)
            self._grid = np.roll(self._grid, -1, axis=0)
            self._grid[-1] = rate
            self._recent.append(delta)
        window = np.sum(self._recent, axis=0) if self._recent else np.zeros((layers, 2))
        self.current_rates = np.divide(window[:, 0], window[:, 1], out=np.zeros(layers), where=window[:, 1] > 0)
        self._summarize(snap)
        if self.isVisible():
            self._draw(layers)

    def _summarize(self, snap: dict) -> None:
        cap, total = snap.get("capacity_experts", 0), snap.get("num_moe_layers", 0) * snap.get("num_experts", 0)
        share = f" ({cap / total:.0%})" if total else ""
        live = float(np.mean(self.current_rates)) if self._recent else snap.get("hit_rate", 0.0)
        policy, active = snap.get("policy", "?"), snap.get("active_policy")
        text = (
            f"Now {live:.0%} · since load {snap.get('hit_rate', 0.0):.0%} · "
            f"{cap} of {total} experts cached{share} · {policy}{f' ({active})' if active and active != policy else ''}"
        )
        if snap.get("simulated_cache"):
            text += "\nNo GPU: the cache is simulated on the CPU (the hit rates a GPU would see)."
            self.set_badge("simulated", "No GPU was found: the expert cache is simulated on the CPU.")
        else:
            self.set_badge(str(snap.get("device", "")).upper())
        self.summary.setText(text)

    def _draw(self, layers: int) -> None:
        self.heat.setImage(self._grid, autoLevels=False, levels=(0.0, 1.0))
        self.heat.setRect(QRectF(0, -0.5, HEAT_COLUMNS, layers))
        self.heat_plot.setXRange(0, HEAT_COLUMNS, padding=0)
        self.heat_plot.setYRange(-0.5, layers - 0.5, padding=0)
        ticks = [(i, str(i)) for i in range(0, layers, max(1, math.ceil(layers / 8)))]
        self.heat_plot.getAxis("left").setTicks([ticks])
        brushes = [pg.mkBrush(self.cmap.map(float(r), mode="qcolor")) for r in self.current_rates]
        self.bars.setOpts(x0=np.zeros(layers), y=np.arange(layers), width=self.current_rates, height=0.72,
                          brushes=brushes, pens=[pg.mkPen(None)] * layers)


class _History:
    """Timestamped samples, trimmed to the last HISTORY_S seconds."""

    def __init__(self, *names: str) -> None:
        self.t: collections.deque = collections.deque()
        self.values = {n: collections.deque() for n in names}

    def add(self, now: float, **values: float) -> None:
        self.t.append(now)
        for name, series in self.values.items():
            series.append(values.get(name, math.nan))
        while self.t and now - self.t[0] > HISTORY_S:
            self.t.popleft()
            for series in self.values.values():
                series.popleft()

    def x(self, now: float) -> np.ndarray:
        return np.array(self.t, dtype=np.float64) - now

    def y(self, name: str, scale: float = 1.0) -> np.ndarray:
        return np.array(self.values[name], dtype=np.float64) / scale


class _TimeCard(Card):
    """A card whose plots show a rolling `history` against seconds ago."""

    history: _History

    def redraw(self, now: float) -> None:
        if self.history.t:
            self._plot(self.history.x(now))

    def _plot(self, x: np.ndarray) -> None:
        raise NotImplementedError


def _time_plots(canvas) -> tuple[pg.PlotItem, pg.PlotItem]:
    """Two stacked plots over the last HISTORY_S seconds, sharing the time axis shown under the lower one."""
    top = canvas.addPlot(row=0, col=0)
    bottom = canvas.addPlot(row=1, col=0, axisItems={"bottom": SecondsAxis("bottom")})
    bottom.setXLink(top)
    for p in (top, bottom):
        p.setMouseEnabled(False, False)
        p.hideButtons()
        p.setXRange(-HISTORY_S, 0, padding=0)
        p.setYRange(0, 1, padding=0)  # until data comes: then `_plot` lets the y axis follow it
        p.getAxis("left").enableAutoSIPrefix(False)
    top.getAxis("bottom").setStyle(showValues=False)
    return top, bottom


PAGED_NOTICE = "Experts page in from the SSD: slower"


class MemoryPanel(_TimeCard):
    """Fast-device memory (cache and total) against the budget and capacity; process RAM. A notice says
    when the model's experts do not fit the RAM and page in from the saved copy on the disk."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Memory", parent)
        self.notice = QLabel()
        self.notice.setObjectName("cardWarning")
        self.notice.setWordWrap(True)
        self.notice.setMinimumWidth(10)
        self.notice.setVisible(False)
        self.layout().insertWidget(2, self.notice)  # under the summary line
        self.history = _History("cache", "fast", "budget", "max", "capacity", "rss")
        self.dev_plot, self.ram_plot = _time_plots(self.canvas)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._simulated = True
        self.dev_plot.setLabel("left", "GiB")
        self.ram_plot.setLabel("left", "GiB")
        self.canvas.setMinimumHeight(130)
        self.apply_theme()

    def apply_theme(self) -> None:
        super().apply_theme()
        s = theme.SERIES[theme.current()]
        muted = theme.color("muted")
        spec = {
            "cache": (self.dev_plot, "cache", pg.mkPen(s["a"], width=2), 40),
            "fast": (self.dev_plot, "fast device", pg.mkPen(s["c"], width=1.5), 0),
            "budget": (self.dev_plot, "budget", pg.mkPen(s["b"], width=1.5, style=Qt.PenStyle.DashLine), 0),
            "max": (self.dev_plot, "max budget", pg.mkPen(muted, width=1, style=Qt.PenStyle.DotLine), 0),
            "capacity": (self.dev_plot, "GPU capacity", pg.mkPen(theme.color("text"), width=1,
                                                                style=Qt.PenStyle.DashDotLine), 0),
            "rss": (self.ram_plot, "process RAM", pg.mkPen(s["d"], width=2), 40),
        }
        self._spec = spec
        self._show_legend()
        self.notice.setStyleSheet(f"color: {theme.color('text')}; background: {theme.color('warn')}33; "
                                  f"border: 1px solid {theme.color('warn')}; border-radius: 4px; padding: 2px 6px;")
        for name, (plot, label, pen, fill) in spec.items():
            old = self.curves.pop(name, None)
            if old is not None:
                plot.removeItem(old)
            kwargs = {}
            if fill:
                color = pg.mkColor(pen.color())
                color.setAlpha(fill)
                kwargs = dict(fillLevel=0, brush=pg.mkBrush(color))
            self.curves[name] = plot.plot([], [], pen=pen, connect="finite", **kwargs)
        self.style_plot(self.dev_plot)
        self.style_plot(self.ram_plot)
        self.redraw(time.monotonic())

    def _show_legend(self) -> None:
        self.set_legend([(pen.color().name(), label, pen.style() != Qt.PenStyle.SolidLine)
                         for name, (_plot, label, pen, _fill) in self._spec.items()
                         if name != "capacity" or not self._simulated])

    def update_stats(self, snap: dict) -> None:
        self.updates += 1
        now = float(snap.get("time", time.monotonic()))
        has_rt = bool(snap.get("has_runtime"))
        if has_rt and bool(snap.get("simulated_cache")) != self._simulated:
            self._simulated = bool(snap.get("simulated_cache"))
            self._show_legend()
        nan = math.nan
        self.history.add(
            now,
            cache=snap.get("cache_bytes", nan) if has_rt else nan,
            fast=snap.get("fast_device_bytes", nan) if has_rt else nan,
            budget=snap.get("budget_bytes", nan) if has_rt else nan,
            max=snap.get("max_budget_bytes", nan) if has_rt else nan,
            # a real device's capacity is drawn; a simulated cache's "device" is all of RAM, named in text
            capacity=snap.get("device_total_bytes", nan) if has_rt and not snap.get("simulated_cache") else nan,
            rss=snap.get("rss_bytes", nan),
        )
        rss = format_bytes(snap.get("rss_bytes", 0))
        if has_rt:
            device = "CPU" if snap.get("simulated_cache") else str(snap.get("device", "")).upper()
            capacity = snap.get("device_total_bytes", 0)
            self.summary.setText(
                f"Cache {format_bytes(snap.get('cache_bytes', 0))} of {format_bytes(snap.get('budget_bytes', 0))}"
                f" budget · {device} holds {format_bytes(capacity)} · RAM {rss}"
            )
            self.set_badge("simulated" if snap.get("simulated_cache") else "")
            self._show_paging(snap)
        elif snap.get("remote"):
            self.summary.setText(f"The model and its cache are on the server · this app uses RAM {rss}")
        else:
            self.summary.setText(f"Process RAM {rss}")
        if not has_rt:
            self.notice.setVisible(False)
        if self.isVisible():
            self.redraw(now)

    def _show_paging(self, snap: dict) -> None:
        """The notice, with the numbers, while the loaded model's experts page in from the disk."""
        paged = bool(snap.get("experts_paged"))
        if paged:
            on_disk, free = snap.get("experts_on_disk_bytes", 0), snap.get("ram_available_bytes", 0)
            self.notice.setText(f"{PAGED_NOTICE}: the {snap.get('experts', 'quantized')} experts "
                                f"({format_bytes(on_disk)}) exceed the free RAM ({format_bytes(free)}), so they "
                                "are read from the saved copy on the disk as tokens need them")
            self.notice.setToolTip(f"The copy: {snap.get('paged_copy', '')}\nMore free RAM (close other programs) "
                                   "makes replies faster.")
        self.notice.setVisible(paged)

    def _plot(self, x: np.ndarray) -> None:
        dev_max = np.nanmax([np.nanmax(self.history.y(n)) if np.isfinite(self.history.y(n)).any() else 0
                             for n in ("cache", "fast", "budget", "max", "capacity")])
        scale, unit = _unit_for(dev_max or 1)
        for name in ("cache", "fast", "budget", "max", "capacity"):
            self.curves[name].setData(x, self.history.y(name, scale))
        self.dev_plot.setLabel("left", unit)
        rss_scale, rss_unit = _unit_for(np.nanmax(self.history.y("rss")) or 1)
        self.curves["rss"].setData(x, self.history.y("rss", rss_scale))
        self.ram_plot.setLabel("left", rss_unit)
        self.dev_plot.setXRange(-HISTORY_S, 0, padding=0)
        for plot in (self.dev_plot, self.ram_plot):
            plot.enableAutoRange(axis="y")


class ThroughputPanel(_TimeCard):
    """Prefill and decode tokens/s over time, and the share of expert work done on the CPU."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Throughput", parent)
        self.history = _History("prefill", "decode", "cpu")
        self.tps_plot, self.cpu_plot = _time_plots(self.canvas)
        self.tps_plot.setLabel("left", "tok/s")
        self.cpu_plot.setLabel("left", "CPU %")
        self.cpu_plot.setYRange(0, 100, padding=0.05)
        self.tps_plot.setYRange(0, 10, padding=0)
        self.canvas.ci.layout.setRowStretchFactor(0, 3)
        self.canvas.ci.layout.setRowStretchFactor(1, 2)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self._prev: np.ndarray | None = None
        self._cpu_share = math.nan
        self.canvas.setMinimumHeight(130)
        self.apply_theme()

    def apply_theme(self) -> None:
        super().apply_theme()
        s = theme.SERIES[theme.current()]
        spec = {
            "prefill": (self.tps_plot, "prefill", pg.mkPen(s["b"], width=2)),
            "decode": (self.tps_plot, "decode", pg.mkPen(s["a"], width=2)),
            "cpu": (self.cpu_plot, "expert work on CPU", pg.mkPen(s["c"], width=2)),
        }
        self.set_legend([(pen.color().name(), label, False) for _plot, label, pen in spec.values()])
        for name, (plot, label, pen) in spec.items():
            old = self.curves.pop(name, None)
            if old is not None:
                plot.removeItem(old)
            self.curves[name] = plot.plot([], [], pen=pen, connect="finite")
        self.style_plot(self.tps_plot)
        self.style_plot(self.cpu_plot)
        self.redraw(time.monotonic())

    def update_stats(self, snap: dict) -> None:
        self.updates += 1
        now = float(snap.get("time", time.monotonic()))
        busy = snap.get("state") in ("generating", "serving")
        counts = _layer_lookups(snap)
        per = snap.get("per_layer") or []
        if counts is not None:
            misses = np.array([p.get("misses", 0) for p in per], dtype=np.float64)
            cur = np.array([misses.sum(), counts[:, 1].sum()])
            if self._prev is not None and self._prev.shape == cur.shape:
                d = cur - self._prev
                if d[1] > 0:
                    self._cpu_share = 100.0 * d[0] / d[1]
            self._prev = cur
        nan = math.nan
        self.history.add(
            now,
            prefill=snap.get("prefill_tokens_per_s", nan) if busy else nan,
            decode=snap.get("decode_tokens_per_s", nan) if busy else nan,
            cpu=self._cpu_share if busy else nan,
        )
        if snap.get("has_runtime"):
            self.summary.setText(
                f"Decode {snap.get('decode_tokens_per_s', 0.0):.1f} tok/s · prefill "
                f"{snap.get('prefill_tokens_per_s', 0.0):.0f} tok/s · CPU share "
                f"{100 * snap.get('cpu_share', 0.0):.0f}% since load"
            )
        elif snap.get("remote"):
            self.summary.setText(f"Decode {snap.get('decode_tokens_per_s', 0.0):.1f} tok/s, as received from "
                                 f"{snap['remote']}")
        if self.isVisible():
            self.redraw(now)

    def _plot(self, x: np.ndarray) -> None:
        for name in ("prefill", "decode", "cpu"):
            self.curves[name].setData(x, self.history.y(name))
        self.tps_plot.setXRange(-HISTORY_S, 0, padding=0)
        self.tps_plot.enableAutoRange(axis="y")


class PanelStack(QWidget):
    """The three live panels, stacked; forwards each stats snapshot to all of them."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.hit_rate = HitRatePanel()
        self.memory = MemoryPanel()
        self.throughput = ThroughputPanel()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(8)
        layout.addWidget(self.hit_rate, 4)
        layout.addWidget(self.memory, 3)
        layout.addWidget(self.throughput, 3)

    @property
    def panels(self) -> tuple[Card, ...]:
        return (self.hit_rate, self.memory, self.throughput)

    @property
    def updates(self) -> int:
        return min(p.updates for p in self.panels)

    def update_stats(self, snap: dict) -> None:
        for p in self.panels:
            p.update_stats(snap)

    def reset(self) -> None:
        self.hit_rate.reset()

    def apply_theme(self) -> None:
        for p in self.panels:
            p.apply_theme()
