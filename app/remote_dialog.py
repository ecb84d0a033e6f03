"""Connect to an OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, LM Studio, another MoE Chat).

The model list is asked for on the engine worker, so a slow or dead server never freezes the window.
Keys go to the OS keyring when the `keyring` package is there, else into the settings file, with a
warning that says so.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.engine_worker import EngineClient, parse_remote_source, remote_source  # noqa: F401 - re-exported
from app.settings import Key, Settings

KEYRING_SERVICE = "moe-chat"


def _keyring():
    try:
        import keyring

        keyring.get_keyring()
        return keyring
    except Exception:  # noqa: BLE001 - no package, or no backend on this desktop
        return None


def save_key(settings: Settings, base_url: str, key: str) -> str:
    """Remember the key for `base_url`; returns a warning when it had to go into the settings file."""
    stored = [pair for pair in settings.value(Key.REMOTE_KEYS) if pair[0] != base_url]
    ring = _keyring()
    warning = ""
    if key and ring is not None:
        try:
            ring.set_password(KEYRING_SERVICE, base_url, key)
            key = ""
        except Exception:  # noqa: BLE001 - a locked or broken keyring
            ring = None
    if key:
        stored.append([base_url, key])
        warning = ("No system keyring is available, so the API key is stored in MoE Chat's settings file "
                   "in plain text.")
    settings.set_value(Key.REMOTE_KEYS, stored)
    return warning


def load_key(settings: Settings, base_url: str) -> str:
    for url, key in settings.value(Key.REMOTE_KEYS):
        if url == base_url:
            return key
    ring = _keyring()
    if ring is not None:
        try:
            return ring.get_password(KEYRING_SERVICE, base_url) or ""
        except Exception:  # noqa: BLE001
            return ""
    return ""


class RemoteDialog(QDialog):
    """Base URL, optional key, the server's models; `connect_requested(url, model, key)` on Connect."""

    connect_requested = Signal(str, str, str)

    def __init__(self, client: EngineClient, settings: Settings, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Connect to a server")
        self.client = client
        self.settings = settings
        recent = settings.value(Key.REMOTE_SERVERS)
        self.url = QComboBox()
        self.url.setEditable(True)
        for entry in recent:
            self.url.addItem(entry["url"])
        self.url.setCurrentText(recent[0]["url"] if recent else "http://127.0.0.1:8000/v1")
        self.key = QLineEdit(load_key(settings, self.url.currentText()))
        self.key.setEchoMode(QLineEdit.EchoMode.PasswordEchoOnEdit)
        self.key.setPlaceholderText("optional")
        self.models = QComboBox()
        self.models.setMinimumContentsLength(28)
        self.list_button = QPushButton("List models")
        self.list_button.clicked.connect(self.list_models)
        self.message = QLabel("Any OpenAI-compatible server: vLLM, SGLang, llama.cpp, Ollama, LM Studio.")
        self.message.setObjectName("cardNote")
        self.message.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Base URL", self.url)
        form.addRow("API key", self.key)
        form.addRow(self.list_button)
        form.addRow("Model", self.models)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.connect_button = self.buttons.addButton("Connect", QDialogButtonBox.ButtonRole.AcceptRole)
        self.connect_button.setEnabled(False)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.message)
        layout.addWidget(self.buttons)
        client.remote_models_listed.connect(self._on_models)
        self.url.currentTextChanged.connect(lambda url: self.key.setText(load_key(settings, url.strip())))

    def base_url(self) -> str:
        return self.url.currentText().strip().rstrip("/")

    def list_models(self) -> None:
        self.list_button.setEnabled(False)
        self.message.setText(f"Asking {self.base_url()} for its models…")
        self.client.list_remote_models(self.base_url(), self.key.text().strip())

    def _on_models(self, base_url: str, models: list, error: str) -> None:
        if base_url != self.base_url():
            return
        self.list_button.setEnabled(True)
        self.models.clear()
        self.models.addItems(models)
        self.connect_button.setEnabled(bool(models))
        if error:
            self.message.setText(error)
        else:
            self.message.setText(f"{len(models)} model(s) on {base_url}." if models else
                                 f"{base_url} serves no models.")

    def accept(self) -> None:
        url, model, key = self.base_url(), self.models.currentText(), self.key.text().strip()
        recent = [e for e in self.settings.value(Key.REMOTE_SERVERS) if e["url"] != url]
        self.settings.set_value(Key.REMOTE_SERVERS, [{"url": url, "model": model}] + recent[:9])
        self.warning = save_key(self.settings, url, key)
        self.connect_requested.emit(url, model, key)
        super().accept()
