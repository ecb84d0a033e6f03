"""Pick a model: the demo model, the local Hugging Face cache, and folders the user added.

Listing and loading run on the engine worker; the dialog shows progress, can cancel, and reports a
bad folder in place while the current model keeps running.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.engine_worker import EngineClient, format_bytes
from app.settings import Key, Settings

ORIGINS = {"demo": "built-in demo", "hf-cache": "Hugging Face cache", "folder": "folder"}
COLUMNS = ("Model", "Source", "Architecture", "Parameters", "Experts × layers", "Top-k", "On disk",
           "Fits RAM", "Budget caches")
FITS_COLUMN = COLUMNS.index("Fits RAM")
DEFAULT_BUDGET_SHARE = 0.25
REMOTE_CODE_WARNING = ("⚠ Only for a folder from a source you trust: its .py files run with your permissions and "
                       "can read, change or send anything your user account can. Off unless you tick it, per folder.")


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def describe_architecture(model: dict) -> str:
    """The architecture cell; a folder that ships its own code says which code runs."""
    if model.get("error"):
        return "cannot be loaded"
    arch = model.get("architecture") or model.get("model_type") or "?"
    if not model.get("ships_code"):
        return arch
    return f"{arch} · its own code" if model.get("trust_remote_code") else f"{arch} · built-in code"


def describe_cached(model: dict, budget_share: float) -> str:
    """How much of this model's experts the current budget (a share of each model's expert bytes, so it
    carries over between models of any size) would cache, in the format `auto` holds them."""
    held = (model.get("formats") or {}).get(model.get("auto_experts")) or model
    total = int(held.get("expert_bytes_total") or 0)
    one = int(held.get("expert_bytes") or 0)
    if not total or not one:
        return "no experts"
    nbytes = int(total * (budget_share if budget_share > 0 else DEFAULT_BUDGET_SHARE))
    experts = min(total, nbytes) // one
    return f"{min(1.0, nbytes / total):.0%} ({experts} experts)"


class ModelPickerDialog(QDialog):
    remote_requested = Signal()  # "Connect to a server…": the window opens that dialog in this one's place

    def __init__(self, client: EngineClient, settings: Settings, budget_share: float = 0.0,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Choose a model")
        self.resize(980, 460)
        self.client = client
        self.settings = settings
        self.budget_share = budget_share
        self.models: list[dict] = []
        self.load_id: int | None = None
        self.loaded_info: dict | None = None
        self._select_source: str | None = None

        intro = QLabel("Models found on this computer. Select one and press Load; the current model keeps "
                       "running until the new one is ready.")
        intro.setWordWrap(True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().setVisible(False)
        self.table.setShowGrid(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        # long names keep their start and end (org, size, quant) in view; the tooltip has all of it
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.table.itemDoubleClicked.connect(lambda _item: self.load_selected())

        self.error_label = QLabel()
        self.error_label.setObjectName("dialogError")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.setVisible(False)
        self.note_label = QLabel()
        self.note_label.setObjectName("cardNote")
        self.note_label.setWordWrap(True)
        self.note_label.setVisible(False)
        self.remote_code_box = QCheckBox("Run this folder's own Python code (remote code)")
        self.remote_code_box.setToolTip(REMOTE_CODE_WARNING)
        self.remote_code_box.setVisible(False)
        self.remote_code_box.clicked.connect(self._on_remote_code_clicked)
        self.remote_code_warning = QLabel(REMOTE_CODE_WARNING)
        self.remote_code_warning.setObjectName("dialogError")
        self.remote_code_warning.setWordWrap(True)
        self.remote_code_warning.setVisible(False)
        self.status_label = QLabel("Looking for models…")
        self.status_label.setObjectName("cardNote")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setVisible(False)

        self.browse_button = QPushButton("Browse…")
        self.browse_button.setToolTip("Add a folder that holds config.json and *.safetensors")
        self.browse_button.clicked.connect(self.browse)
        self.download_button = QPushButton("Download…")
        self.download_button.setToolTip("Download a model from Hugging Face into its cache")
        self.download_button.clicked.connect(self.open_download)
        self.download_dialog = None
        self.remote_button = QPushButton("Connect to a server…")
        self.remote_button.setToolTip("Chat with a model on an OpenAI-compatible server (vLLM, SGLang, llama.cpp, "
                                      "Ollama, LM Studio)")
        self.remote_button.clicked.connect(lambda: (self.reject(), self.remote_requested.emit()))
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        self.cancel_button = QPushButton("Cancel loading")
        self.cancel_button.setVisible(False)
        self.cancel_button.clicked.connect(self.cancel_load)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.reject)
        self.load_button = QPushButton("Load")
        self.load_button.setDefault(True)
        self.load_button.setEnabled(False)
        self.load_button.clicked.connect(self.load_selected)

        buttons = QHBoxLayout()
        buttons.addWidget(self.browse_button)
        buttons.addWidget(self.download_button)
        buttons.addWidget(self.remote_button)
        buttons.addWidget(self.refresh_button)
        buttons.addStretch(1)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.close_button)
        buttons.addWidget(self.load_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 14, 16, 14)
        layout.setSpacing(10)
        layout.addWidget(intro)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.error_label)
        layout.addWidget(self.note_label)
        layout.addWidget(self.remote_code_box)
        layout.addWidget(self.remote_code_warning)
        layout.addWidget(self.status_label)
        layout.addWidget(self.progress)
        layout.addLayout(buttons)

        client.models_listed.connect(self._on_listed)
        client.load_progress.connect(self._on_progress)
        client.model_loaded.connect(self._on_loaded)
        client.load_failed.connect(self._on_failed)
        self.refresh()

    # listing -------------------------------------------------------------------------------
    def refresh(self) -> None:
        self.status_label.setText("Looking for models…")
        self.client.list_models(self.settings.value(Key.EXTRA_MODEL_DIRS))

    def browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder (with config.json)")
        if folder:
            self.add_folder(folder)

    def open_download(self):
        """The Hugging Face download dialog; a finished download is listed and selected here."""
        from app.download_dialog import DownloadDialog

        self.download_dialog = DownloadDialog(self.client.downloads, self)
        self.download_dialog.downloaded.connect(self._on_downloaded)
        self.download_dialog.open()
        return self.download_dialog

    def _on_downloaded(self, repo_id: str, _folder: str) -> None:
        self._select_source = repo_id
        self.refresh()

    def add_folder(self, folder: str) -> None:
        """Remember a folder and list it; its row is selected (and its problem shown) when it arrives."""
        dirs = list(self.settings.value(Key.EXTRA_MODEL_DIRS))
        if folder not in dirs:
            dirs.append(folder)
            self.settings.set_value(Key.EXTRA_MODEL_DIRS, dirs)
        self._select_source = folder
        self.refresh()

    def _on_listed(self, models: list) -> None:
        self.models = models
        self.table.setRowCount(len(models))
        current = (self.client.model_info or {}).get("source")
        select = self._select_source or current
        for row, m in enumerate(models):
            bad = bool(m.get("error"))
            moe = int(m.get("num_moe_layers") or 0)
            cells = (
                m.get("name") or m.get("source", "?"),
                ORIGINS.get(m.get("origin", ""), m.get("origin", "")),
                describe_architecture(m),
                "" if bad else format_count(int(m.get("total_params") or 0)),
                "" if bad else (f"{m.get('num_experts', 0)} × {moe}" if moe else "dense"),
                "" if bad else str(m.get("top_k") or "–"),
                format_bytes(m.get("disk_bytes") or 0) if not bad else "",
                "" if bad else self._fits(m),
                "" if bad else describe_cached(m, self.budget_share),
            )
            for col, text in enumerate(cells):
                item = QTableWidgetItem(str(text))
                tip = m.get("error") or m.get("path") or m.get("source", "")
                if col == 0:
                    tip = f"{m.get('name', '')}\n{tip}"
                if m.get("code_note"):
                    tip = f"{tip}\n{m['code_note']}"
                if col == FITS_COLUMN and not bad and m.get("formats"):
                    tip = "RAM needed with experts held as\n" + "\n".join(
                        f"  {f}: {format_bytes(int(v['ram_needed_bytes']))}" + ("" if v["fits_ram"] else " (does not fit)")
                        for f, v in m["formats"].items())
                item.setToolTip(str(tip))
                if bad and col == 0:
                    item.setText(f"⚠ {text}")
                if bad:
                    item.setForeground(self.palette().placeholderText())
                self.table.setItem(row, col, item)
            if select and self._same(m, select):
                self.table.selectRow(row)
        found = len(models)
        self.status_label.setText(f"{found} model{'s' if found != 1 else ''} found." if found else
                                  "No models found yet: press Browse… to add a folder.")
        self._select_source = None
        self._on_selection()

    @staticmethod
    def _same(model: dict, source: str) -> bool:
        return source in (model.get("source"), model.get("path"))

    @staticmethod
    def _fits(m: dict) -> str:
        """Whether the model fits the free RAM, and in which expert format `auto` would hold it."""
        formats = m.get("formats") or {}
        auto = m.get("auto_experts")
        if auto in formats:
            need = format_bytes(int(formats[auto]["ram_needed_bytes"]))
            return f"yes ({need})" if auto == "source" else f"as {auto} ({need})"
        smallest = formats.get("int4") or {"ram_needed_bytes": m.get("ram_needed_bytes") or 0}
        return f"no: needs {format_bytes(int(smallest['ram_needed_bytes']))}" + (" at int4" if "int4" in formats else "")

    def selected_model(self) -> dict | None:
        rows = self.table.selectionModel().selectedRows()
        return self.models[rows[0].row()] if rows else None

    def _on_selection(self) -> None:
        m = self.selected_model()
        loading = self.load_id is not None
        self.load_button.setEnabled(m is not None and not loading)
        if m is not None and m.get("error"):
            self.show_error(m["error"])
        elif not loading:
            self.error_label.setVisible(False)
        note = (m or {}).get("code_note") or ""
        self.note_label.setText(note)
        self.note_label.setVisible(bool(note))
        ships = bool(m and m.get("ships_code"))
        self.remote_code_box.setVisible(ships)
        self.remote_code_box.setEnabled(ships and not loading)
        self.remote_code_box.setChecked(bool(ships and m.get("trust_remote_code")))
        self.remote_code_warning.setVisible(ships)

    # the per-folder opt-in to the folder's own code ---------------------------------------------
    def confirm_remote_code(self, model: dict) -> bool:
        """A second, explicit yes before a folder's code may run (tests answer it without a dialog)."""
        answer = QMessageBox.warning(
            self, "Run this folder's own code?",
            f"{model.get('name') or model.get('path')} ships Python files that would run inside MoE Chat.\n\n"
            f"{REMOTE_CODE_WARNING}\n\nRun its code?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _on_remote_code_clicked(self, checked: bool) -> None:
        m = self.selected_model()
        if m is None or not m.get("ships_code"):
            return
        if checked and not self.confirm_remote_code(m):
            self.remote_code_box.setChecked(False)
            return
        from engine.errors import EngineError
        from engine.model.catalog import set_remote_code_trusted

        try:
            set_remote_code_trusted(m["path"], checked)
        except EngineError as e:
            self.remote_code_box.setChecked(not checked)
            self.show_error(str(e))
            return
        self._select_source = m["source"]
        self.refresh()  # what runs changes what the folder is: list it again

    # loading -------------------------------------------------------------------------------
    def show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.setVisible(True)

    def load_selected(self) -> None:
        m = self.selected_model()
        if m is None or self.load_id is not None:
            return
        if m.get("error"):
            self.show_error(f"{m['error']}\nThe current model keeps running.")
            return
        self.error_label.setVisible(False)
        budget = self.budget_share or self.settings.value(Key.BUDGET_SHARE)
        self.load_id = self.client.load(m["source"], budget, self.settings.value(Key.POLICY))
        self._loading_source = m["source"]
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.cancel_button.setVisible(True)
        self.cancel_button.setEnabled(True)
        self.status_label.setText(f"Loading {m.get('name', m['source'])}…")
        for b in (self.load_button, self.browse_button, self.refresh_button, self.remote_code_box):
            b.setEnabled(False)

    def cancel_load(self) -> None:
        if self.load_id is not None:
            self.client.cancel_load()
            self.cancel_button.setEnabled(False)
            self.status_label.setText("Cancelling…")

    def _on_progress(self, load_id: int, fraction: float, message: str) -> None:
        if load_id == self.load_id:
            self.progress.setValue(int(fraction * 1000))
            self.progress.setFormat(f"{message} — {fraction:.0%}")

    def _on_loaded(self, load_id: int, info: dict) -> None:
        if load_id != self.load_id:
            return
        self.load_id = None
        self.loaded_info = info
        self.settings.set_value(Key.MODEL_SOURCE, info.get("source", self._loading_source))
        self.accept()

    def _on_failed(self, load_id: int, message: str, cancelled: bool) -> None:
        if load_id != self.load_id:
            return
        self.load_id = None
        self.progress.setVisible(False)
        self.cancel_button.setVisible(False)
        for b in (self.browse_button, self.refresh_button):
            b.setEnabled(True)
        self._on_selection()
        if cancelled:
            self.status_label.setText("Loading cancelled; the current model keeps running.")
        else:
            self.status_label.setText("")
            self.show_error(f"{message}\nThe current model keeps running.")

    def reject(self) -> None:
        self.cancel_load()
        super().reject()

    def done(self, result: int) -> None:
        for sig, slot in ((self.client.models_listed, self._on_listed), (self.client.load_progress, self._on_progress),
                          (self.client.model_loaded, self._on_loaded), (self.client.load_failed, self._on_failed)):
            try:
                sig.disconnect(slot)
            except (RuntimeError, TypeError):
                pass
        super().done(result)
