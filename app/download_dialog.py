"""Download a model from the Hugging Face Hub into the standard HF cache (the model picker's Download… button).

The user types a repo id or pastes a huggingface.co URL and presses "List files"; the dialog shows the
variants (each GGUF file or split set, or the safetensors set) with their sizes and whether they fit the
disk and this machine's RAM, then downloads one with progress, cancel and resume. Listing and
downloading run on threads of their own (app.engine_worker.HubDownloads): the window never waits on
the network, and chatting goes on meanwhile.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.engine_worker import HubDownloads, format_bytes

COLUMNS = ("Variant", "Files", "Size", "Fits")
MAX_FILES_SHOWN = 12


def describe_fit(plan) -> str:
    """One line on disk and RAM for a plan from engine.model.download.plan_download."""
    have = f" ({format_bytes(plan.have_bytes)} already here)" if plan.have_bytes else ""
    disk = (f"download {format_bytes(plan.needed_bytes)}{have}; {format_bytes(plan.free_disk_bytes)} free in the "
            f"Hugging Face cache" + (" ✓" if plan.fits_disk else " — not enough disk space"))
    ram = (f"RAM: about {format_bytes(plan.weight_bytes)} of weights, this computer has "
           f"{format_bytes(plan.ram_total_bytes)}" + (" ✓" if plan.fits_ram else " — probably too large"))
    return f"{disk}\n{ram}"


class DownloadDialog(QDialog):
    downloaded = Signal(str, str)  # repo id, snapshot folder

    def __init__(self, downloads: HubDownloads, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Download from Hugging Face")
        self.resize(760, 480)
        self.downloads = downloads
        self.listing = None
        self.plans: list = []
        self.list_job: int | None = None
        self.download_job: int | None = None
        self.downloaded_repo: str | None = None

        intro = QLabel("A model id (org/name) or its huggingface.co address. Files go to the standard Hugging "
                       "Face cache; a cancelled download continues where it stopped. Gated or private models "
                       "need a token (HF_TOKEN, or `hf auth login`).")
        intro.setWordWrap(True)
        self.repo_edit = QLineEdit()
        self.repo_edit.setPlaceholderText("e.g. Qwen/Qwen3-30B-A3B or https://huggingface.co/…")
        self.repo_edit.returnPressed.connect(self.list_files)
        self.list_button = QPushButton("List files")
        self.list_button.clicked.connect(self.list_files)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.files_label = QLabel()
        self.files_label.setObjectName("cardNote")
        self.files_label.setWordWrap(True)
        self.fit_label = QLabel()
        self.fit_label.setWordWrap(True)
        self.error_label = QLabel()
        self.error_label.setObjectName("dialogError")
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.setVisible(False)
        self.status_label = QLabel()
        self.status_label.setObjectName("cardNote")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setVisible(False)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.reject)
        self.cancel_button = QPushButton("Cancel download")
        self.cancel_button.setVisible(False)
        self.cancel_button.clicked.connect(self.cancel_download)
        self.download_button = QPushButton("Download")
        self.download_button.setEnabled(False)
        self.download_button.clicked.connect(self.start_download)

        row = QHBoxLayout()
        row.addWidget(self.repo_edit, 1)
        row.addWidget(self.list_button)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.close_button)
        buttons.addWidget(self.download_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 14, 16, 14)
        layout.setSpacing(10)
        layout.addWidget(intro)
        layout.addLayout(row)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.files_label)
        layout.addWidget(self.fit_label)
        layout.addWidget(self.error_label)
        layout.addWidget(self.status_label)
        layout.addWidget(self.progress)
        layout.addLayout(buttons)

        downloads.listed.connect(self._on_listed)
        downloads.download_progress.connect(self._on_progress)
        downloads.download_finished.connect(self._on_finished)
        downloads.download_failed.connect(self._on_failed)

    # listing -------------------------------------------------------------------------------
    def list_files(self) -> None:
        text = self.repo_edit.text().strip()
        if not text or self.download_job is not None:
            return
        self.error_label.setVisible(False)
        self.status_label.setText(f"Asking the Hub about {text}…")
        self.list_button.setEnabled(False)
        self.list_job = self.downloads.list_repo(text)

    def _on_listed(self, job: int, listing, error: str) -> None:
        if job != self.list_job:
            return
        self.list_job = None
        self.list_button.setEnabled(True)
        if error:
            self.listing, self.plans = None, []
            self.table.setRowCount(0)
            self.status_label.setText("")
            self.show_error(error)
            self._on_selection()
            return
        self.listing = listing
        self.status_label.setText(f"{listing.repo_id}: {len(listing.files)} files, "
                                  f"{len(listing.variants)} variant{'s' * (len(listing.variants) != 1)} to choose from.")
        self._fill_table()

    def _fill_table(self) -> None:
        """Plans are made here: they only read the local cache and the free space, no network."""
        from engine.errors import EngineError
        from engine.model.download import plan_download

        current = getattr(self.selected_plan(), "variant", None)
        try:
            self.plans = [plan_download(self.listing, v.name) for v in self.listing.variants]
        except (EngineError, OSError) as e:
            self.plans = []
            self.show_error(str(e))
        self.table.setRowCount(len(self.plans))
        for row, plan in enumerate(self.plans):
            fits = "yes" if plan.fits_disk and plan.fits_ram else ("no disk space" if not plan.fits_disk else "RAM too small")
            if plan.needed_bytes == 0:
                fits += " (already here)"
            for col, text in enumerate((plan.variant, str(len(plan.files)), format_bytes(plan.total_bytes), fits)):
                item = QTableWidgetItem(text)
                item.setToolTip(describe_fit(plan))
                self.table.setItem(row, col, item)
        if self.plans:
            self.table.selectRow(next((r for r, p in enumerate(self.plans) if p.variant == current), 0))
        self._on_selection()

    def selected_plan(self):
        rows = self.table.selectionModel().selectedRows()
        return self.plans[rows[0].row()] if rows and rows[0].row() < len(self.plans) else None

    def select_variant(self, name: str) -> None:
        for row, plan in enumerate(self.plans):
            if plan.variant == name:
                self.table.selectRow(row)

    def _on_selection(self) -> None:
        plan = self.selected_plan()
        self.download_button.setEnabled(plan is not None and self.download_job is None)
        if plan is None:
            self.files_label.setText("")
            self.fit_label.setText("")
            return
        shown = [f"{f.name} ({format_bytes(f.size)})" for f in plan.files[:MAX_FILES_SHOWN]]
        more = len(plan.files) - len(shown)
        self.files_label.setText(" · ".join(shown) + (f" · and {more} more" if more > 0 else ""))
        self.fit_label.setText(describe_fit(plan))

    # downloading ---------------------------------------------------------------------------
    def show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.setVisible(True)

    def start_download(self) -> None:
        plan = self.selected_plan()
        if plan is None or self.download_job is not None:
            return
        from engine.errors import EngineError
        from engine.model.download import check_disk_space

        self.error_label.setVisible(False)
        try:
            check_disk_space(plan)  # also checked on the download thread; here the answer is at once
        except EngineError as e:
            self.show_error(f"{e}\n{e.hint}" if e.hint else str(e))
            return
        self.download_job = self.downloads.download(plan)
        self.progress.setValue(int(1000 * plan.have_bytes / max(1, plan.total_bytes)))
        self.progress.setFormat("starting…")
        self.progress.setVisible(True)
        self.cancel_button.setVisible(True)
        self.cancel_button.setEnabled(True)
        self.status_label.setText(f"Downloading {plan.repo_id} ({plan.variant})…")
        for w in (self.download_button, self.list_button, self.repo_edit, self.table):
            w.setEnabled(False)

    def cancel_download(self) -> None:
        if self.download_job is not None:
            self.downloads.cancel(self.download_job)

    def _on_progress(self, job: int, p) -> None:
        if job != self.download_job:
            return
        self.progress.setValue(int(1000 * p.done_bytes / max(1, p.total_bytes)))
        self.progress.setFormat(f"{format_bytes(p.done_bytes)} of {format_bytes(p.total_bytes)} · "
                                f"file {min(p.files_done + 1, p.files_total)} of {p.files_total} · {p.current}")

    def _on_finished(self, job: int, repo_id: str, folder: str) -> None:
        if job != self.download_job:
            return
        self.download_job = None
        self.downloaded_repo = repo_id
        self.progress.setValue(1000)
        self.status_label.setText(f"{repo_id} is downloaded.")
        self.downloaded.emit(repo_id, folder)
        self.accept()

    def _on_failed(self, job: int, message: str, cancelled: bool) -> None:
        if job != self.download_job:
            return
        self.download_job = None
        self.progress.setVisible(False)
        self.cancel_button.setVisible(False)
        for w in (self.list_button, self.repo_edit, self.table):
            w.setEnabled(True)
        if cancelled:
            self.status_label.setText("Download cancelled; press Download to continue where it stopped.")
        else:
            self.status_label.setText("")
            self.show_error(message)
        if self.listing is not None:
            self._fill_table()  # what is already here changed
        self._on_selection()

    def reject(self) -> None:
        self.cancel_download()
        super().reject()

    def done(self, result: int) -> None:
        d = self.downloads
        for sig, slot in ((d.listed, self._on_listed), (d.download_progress, self._on_progress),
                          (d.download_finished, self._on_finished), (d.download_failed, self._on_failed)):
            try:
                sig.disconnect(slot)
            except (RuntimeError, TypeError):
                pass
        super().done(result)
