"""Sampling settings, the default system prompt, the theme and the local server, saved with QSettings."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.settings import DEFAULTS, SAMPLING_KEYS, Key, Settings

HELP = {
    "temperature": "Higher is more varied, lower more focused; 0 always picks the likeliest token.",
    "top_p": "Sample only from the smallest set of tokens whose probabilities add up to this.",
    "top_k": "Sample only from this many likeliest tokens (0 = no limit).",
    "max_new_tokens": "The longest reply, in tokens.",
    "repetition_penalty": "Above 1 discourages repeating what is already in the text.",
    "seed": "The same seed and prompt give the same reply; -1 gives a new one each time.",
}


LABELS = {"temperature": "Temperature", "top_p": "Top-p", "top_k": "Top-k", "max_new_tokens": "Max tokens",
          "repetition_penalty": "Repetition penalty", "seed": "Seed"}


def _double(lo: float, hi: float, step: float, decimals: int) -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setDecimals(decimals)
    return w


def _int(lo: int, hi: int) -> QSpinBox:
    w = QSpinBox()
    w.setRange(lo, hi)
    return w


def sampling_fields(form: QFormLayout) -> dict[str, QSpinBox | QDoubleSpinBox]:
    """The sampling settings' spin boxes, added to `form` (the global defaults and a chat's own)."""
    fields = {
        "temperature": _double(0.0, 2.0, 0.05, 2),
        "top_p": _double(0.05, 1.0, 0.05, 2),
        "top_k": _int(0, 1000),
        "max_new_tokens": _int(1, 32768),
        "repetition_penalty": _double(1.0, 2.0, 0.05, 2),
        "seed": _int(-1, 2**31 - 1),
    }
    for name, field in fields.items():
        field.setToolTip(HELP[name])
        form.addRow(LABELS[name], field)
    return fields


def show_sampling(fields: dict, sampling: dict) -> None:
    for name, field in fields.items():
        value = sampling[name]
        field.setValue(-1 if value is None else value)


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.settings = settings
        form = QFormLayout()
        self.fields = sampling_fields(form)
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setFixedHeight(80)
        form.addRow("System prompt for new chats", self.system_prompt)
        self.theme = QComboBox()
        for value, text in (("system", "Follow the system"), ("light", "Light"), ("dark", "Dark")):
            self.theme.addItem(text, value)
        form.addRow("Theme", self.theme)
        engine = self._build_engine_group(settings)
        server = self._build_server_group(settings)
        note = QLabel("Sampling settings apply to the next reply. Each conversation keeps its own system prompt.")
        note.setObjectName("cardNote")
        note.setWordWrap(True)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
            | QDialogButtonBox.StandardButton.RestoreDefaults
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        buttons.button(QDialogButtonBox.StandardButton.RestoreDefaults).clicked.connect(self.restore_defaults)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(engine)
        layout.addWidget(server)
        layout.addWidget(note)
        layout.addWidget(buttons)
        self._show(settings.sampling(), settings.value(Key.SYSTEM_PROMPT), settings.value(Key.THEME))

    def _build_engine_group(self, settings: Settings) -> QGroupBox:
        box = QGroupBox("Engine (applies when a model is loaded next)")
        self.device = QComboBox()
        for value, text in (("auto", "Automatic (a CUDA GPU when there is one)"), ("cpu", "CPU only"),
                            ("cuda", "CUDA GPU")):
            self.device.addItem(text, value)
        self.device.setCurrentIndex(max(0, self.device.findData(settings.value(Key.DEVICE))))
        self.threads = _int(0, 512)
        self.threads.setSpecialValueText("Automatic (physical cores)")
        self.threads.setValue(settings.value(Key.THREADS))
        self.context = _int(0, 1 << 20)
        self.context.setSingleStep(1024)
        self.context.setSpecialValueText("The model's own")
        self.context.setValue(settings.value(Key.CONTEXT_LENGTH))
        self.context.setToolTip("A smaller context holds less key/value memory; longer chats drop old turns sooner.")
        form = QFormLayout(box)
        form.addRow("Device", self.device)
        form.addRow("CPU threads", self.threads)
        form.addRow("Context length (tokens)", self.context)
        return box

    def _build_server_group(self, settings: Settings) -> QGroupBox:
        box = QGroupBox("Local server")
        self.server_enabled = QCheckBox("Serve the loaded model to other programs (OpenAI-compatible API)")
        self.server_enabled.setChecked(settings.value(Key.SERVER_ENABLED))
        self.server_port = _int(1, 65535)
        self.server_port.setValue(settings.value(Key.SERVER_PORT))
        self.server_key = QLineEdit(settings.value(Key.SERVER_API_KEY))
        self.server_key.setEchoMode(QLineEdit.EchoMode.PasswordEchoOnEdit)
        self.server_key.setPlaceholderText("optional: clients then send it as a Bearer token")
        self.base_url = QLabel()
        self.base_url.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        copy = QPushButton("Copy base URL")
        copy.setObjectName("copyBaseUrl")
        copy.clicked.connect(lambda: QApplication.clipboard().setText(self.base_url.text()))
        self.server_port.valueChanged.connect(self._show_base_url)
        self._show_base_url()
        url_row = QHBoxLayout()
        url_row.addWidget(self.base_url, 1)
        url_row.addWidget(copy)
        form = QFormLayout(box)
        form.addRow(self.server_enabled)
        form.addRow("Port", self.server_port)
        form.addRow("API key", self.server_key)
        form.addRow("Base URL", url_row)
        hint = QLabel("Only programs on this computer can connect (127.0.0.1). Chat replies and API requests "
                      "take turns on the one loaded model.")
        hint.setObjectName("cardNote")
        hint.setWordWrap(True)
        form.addRow(hint)
        return box

    def _show_base_url(self) -> None:
        self.base_url.setText(f"http://127.0.0.1:{self.server_port.value()}/v1")

    def _show(self, sampling: dict, system_prompt: str, theme: str) -> None:
        show_sampling(self.fields, sampling)
        self.system_prompt.setPlainText(system_prompt)
        self.theme.setCurrentIndex(max(0, self.theme.findData(theme)))

    def restore_defaults(self) -> None:
        self._show({n: DEFAULTS[k] for n, k in SAMPLING_KEYS.items()}, DEFAULTS[Key.SYSTEM_PROMPT],
                   DEFAULTS[Key.THEME])

    def values(self) -> dict:
        return {name: field.value() for name, field in self.fields.items()}

    def accept(self) -> None:
        self.settings.set_sampling(self.values())
        self.settings.set_value(Key.SYSTEM_PROMPT, self.system_prompt.toPlainText())
        self.settings.set_value(Key.THEME, self.theme.currentData())
        self.settings.set_value(Key.DEVICE, self.device.currentData())
        self.settings.set_value(Key.THREADS, self.threads.value())
        self.settings.set_value(Key.CONTEXT_LENGTH, self.context.value())
        self.settings.set_value(Key.SERVER_ENABLED, self.server_enabled.isChecked())
        self.settings.set_value(Key.SERVER_PORT, self.server_port.value())
        self.settings.set_value(Key.SERVER_API_KEY, self.server_key.text().strip())
        super().accept()


class ChatSettingsDialog(QDialog):
    """One chat's own sampling: what differs from the defaults in Settings is kept with the chat."""

    def __init__(self, settings: Settings, overrides: dict, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("This chat's settings")
        self.defaults = settings.sampling()
        form = QFormLayout()
        self.fields = sampling_fields(form)
        show_sampling(self.fields, {**self.defaults, **overrides})
        note = QLabel("Values equal to the defaults in Settings follow them when those change.")
        note.setObjectName("cardNote")
        note.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
                                   | QDialogButtonBox.StandardButton.RestoreDefaults)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        buttons.button(QDialogButtonBox.StandardButton.RestoreDefaults).clicked.connect(
            lambda: show_sampling(self.fields, self.defaults))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(buttons)

    def overrides(self) -> dict:
        """The fields that differ from the defaults (seed -1 means a fresh one each time, i.e. None)."""
        out = {}
        for name, field in self.fields.items():
            value = field.value()
            if name == "seed" and value < 0:
                value = None
            if value != self.defaults[name]:
                out[name] = value
        return out
