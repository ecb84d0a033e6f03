"""The cache budget slider and policy selector: resize the expert cache while the model runs.

The slider moves in whole experts and cannot pass what the device can hold; a typed value that
would not fit is refused with a message. Changes are debounced, then sent to the worker, which
applies them between two steps.
"""

from __future__ import annotations

import re

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QComboBox, QFrame, QGridLayout, QHBoxLayout, QLabel, QLineEdit, QSlider, QWidget

from app.engine_worker import format_bytes

DEBOUNCE_MS = 150
_UNITS = {"": 2**20, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_budget(text: str, total_bytes: int) -> int:
    """'512MiB', '2 GiB', '1.5GB', '25%' (of all experts), or a bare number of MiB -> bytes."""
    s = text.strip().lower().replace(",", ".")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[a-z]*)", s)
    if not m or (m.group(2) != "%" and m.group(2) not in _UNITS):
        raise ValueError(f"“{text}” is not a size: write e.g. 512MiB, 2GiB or 25%")
    value = float(m.group(1))
    if m.group(2) == "%":
        return int(round(total_bytes * value / 100))
    return int(value * _UNITS[m.group(2)])


class BudgetBar(QFrame):
    """Slider (in experts), the value in bytes and experts, a typed entry, and the cache policy."""

    budget_requested = Signal(object)  # bytes: an int that may pass 2**31
    policy_requested = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("card")
        self.expert_bytes = 0
        self.total_experts = 0
        self.max_bytes = 0
        self.engine_bytes = 0
        self._quiet = False

        title = QLabel("Cache budget")
        title.setToolTip("Fast-device memory for the expert cache")
        title.setObjectName("cardTitle")
        self.value_label = QLabel("no model")
        self.value_label.setObjectName("budgetValue")
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setToolTip("Fast-device memory for experts. Drag to resize the cache while the model runs.")
        self.slider.valueChanged.connect(self._on_slider)
        self.max_label = QLabel()
        self.max_label.setObjectName("cardNote")
        self.max_label.setWordWrap(True)
        self.edit = QLineEdit()
        self.edit.setObjectName("budgetEdit")
        self.edit.setPlaceholderText("type e.g. 512MiB")
        self.edit.setMaximumWidth(120)
        self.edit.returnPressed.connect(self._on_typed)
        self.policy = QComboBox()
        self.policy.setToolTip("Which experts the cache keeps")
        self.policy.currentIndexChanged.connect(self._on_policy)
        self.message = QLabel()
        self.message.setObjectName("budgetMessage")
        self.message.setWordWrap(True)
        self.message.setVisible(False)
        self._timer = QTimer(self, singleShot=True, interval=DEBOUNCE_MS)
        self._timer.timeout.connect(self._send_slider_value)

        head = QHBoxLayout()
        head.addWidget(title)
        head.addStretch(1)
        head.addWidget(self.value_label)
        grid = QGridLayout(self)
        grid.setContentsMargins(10, 8, 10, 8)
        grid.setVerticalSpacing(6)
        grid.addLayout(head, 0, 0, 1, 3)
        grid.addWidget(self.slider, 1, 0, 1, 3)
        grid.addWidget(self.max_label, 2, 0, 1, 3)
        policy_label = QLabel("Policy")
        policy_label.setObjectName("cardNote")
        grid.addWidget(policy_label, 3, 0)
        grid.addWidget(self.policy, 3, 1)
        grid.addWidget(self.edit, 3, 2)
        grid.setColumnStretch(1, 1)
        grid.addWidget(self.message, 4, 0, 1, 3)
        self.set_model(None)

    # from the engine -----------------------------------------------------------------------
    def set_model(self, info: dict | None) -> None:
        """Size the slider for a newly loaded model (or disable it when there is no cache)."""
        has_cache = bool(info and info.get("has_runtime"))
        for w in (self.slider, self.edit, self.policy):
            w.setEnabled(has_cache)
        self.message.setVisible(False)
        if not has_cache:
            self.expert_bytes = self.total_experts = self.max_bytes = 0
            self.value_label.setText("no expert cache" if info else "no model")
            self.max_label.setText("This model has no MoE layers." if info else "Load a model to size its cache.")
            return
        self.expert_bytes = int(info.get("runtime_expert_bytes") or info["expert_bytes"])
        total = int(info.get("runtime_expert_bytes_total") or info["expert_bytes_total"])
        self.total_experts = total // self.expert_bytes if self.expert_bytes else 0
        self.max_bytes = int(info.get("max_budget_bytes", total))
        self._quiet = True
        self.slider.setRange(0, self.max_bytes // self.expert_bytes if self.expert_bytes else 0)
        self.slider.setPageStep(max(1, self.slider.maximum() // 10))
        self.policy.clear()
        for name, description in (info.get("policies") or {}).items():
            self.policy.addItem(name, name)
            self.policy.setItemData(self.policy.count() - 1, description, Qt.ItemDataRole.ToolTipRole)
        index = self.policy.findData(info.get("policy", "auto"))
        self.policy.setCurrentIndex(max(0, index))
        self._quiet = False
        self.max_label.setText(
            f"At most {format_bytes(self.max_bytes)} ({self.slider.maximum()} of {self.total_experts} experts) "
            f"fits this device · one expert is {format_bytes(self.expert_bytes)}"
        )
        self.set_budget(int(info.get("budget_bytes", 0)))

    def set_budget(self, nbytes: int) -> None:
        """The engine applied a budget: show it without sending it back."""
        self.engine_bytes = nbytes
        self._timer.stop()
        self._quiet = True
        self.slider.setValue(nbytes // self.expert_bytes if self.expert_bytes else 0)
        self._quiet = False
        self._show_value(nbytes)
        self.message.setVisible(False)

    def refuse(self, message: str) -> None:
        """The value was not applied: say why and put the slider back where the engine is."""
        self.set_budget(self.engine_bytes)
        self.message.setText(message)
        self.message.setVisible(True)

    def set_policy(self, name: str) -> None:
        self._quiet = True
        index = self.policy.findData(name)
        if index >= 0:
            self.policy.setCurrentIndex(index)
        self._quiet = False

    # from the user -------------------------------------------------------------------------
    def request_bytes(self, nbytes: int) -> bool:
        """Ask for a budget; refuse here, with a message, what the device cannot hold."""
        if not self.expert_bytes:
            self.refuse("Load a Mixture-of-Experts model first.")
            return False
        if nbytes < 0 or nbytes > self.max_bytes:
            self.refuse(
                f"{format_bytes(nbytes)} does not fit: this device can hold at most "
                f"{format_bytes(self.max_bytes)} of experts ({self.max_bytes // self.expert_bytes} experts)."
            )
            return False
        self.message.setVisible(False)
        self._show_value(nbytes)
        self.budget_requested.emit(int(nbytes))
        return True

    def _on_slider(self, value: int) -> None:
        if self._quiet:
            return
        self._show_value(value * self.expert_bytes)
        self._timer.start()

    def _send_slider_value(self) -> None:
        self.request_bytes(self.slider.value() * self.expert_bytes)

    def _on_typed(self) -> None:
        try:
            nbytes = parse_budget(self.edit.text(), self.total_experts * self.expert_bytes)
        except ValueError as exc:
            self.refuse(str(exc))
            return
        if self.request_bytes(nbytes):
            self.edit.clear()

    def _on_policy(self, _index: int) -> None:
        name = self.policy.currentData()
        if not self._quiet and name:
            self.policy_requested.emit(name)

    def _show_value(self, nbytes: int) -> None:
        experts = nbytes // self.expert_bytes if self.expert_bytes else 0
        share = f" · {experts / self.total_experts:.0%}" if self.total_experts else ""
        self.value_label.setText(f"{format_bytes(nbytes)} · {experts} experts{share}")
