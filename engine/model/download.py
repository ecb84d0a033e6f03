"""Get a model from the Hugging Face Hub into the standard HF cache: list, plan, check, download.

Only ever called on an explicit user action (the app's "Download…" dialog); nothing else in MoE Chat
touches the network. Torch-free and Qt-free: the app runs `download` on a thread of its own.

Resume: huggingface_hub 2.x writes each download to a process-unique temporary file and deletes it on
failure, so a cancelled file would start over. For files served over plain HTTP we therefore keep our
own partial blob (`blobs/<etag>.incomplete`), continue it with a Range request through the library's
`http_get`, move it into place as `blobs/<etag>`, and let `hf_hub_download` (which finds the blob and
only links it) write the snapshot pointer and `refs/`. Files the server offers through Xet (the
library decides that from the `X-Xet-Hash` header of the HEAD answer) go through `hf_hub_download`
directly when `hf_xet` is installed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from ..errors import Cancelled, EngineError

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".ot")
# Alternative copies of the same weights, skipped when the repo also has safetensors.
OTHER_FORMAT_SUFFIXES = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".ot", ".tflite")
SPLIT_GGUF = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")
CHUNK_BYTES = 256 << 10  # small reads, so a cancel is seen within a second on any usable connection
DISK_MARGIN_BYTES = 64 << 20  # leave a little room for the rest of the system
TOKEN_HINT = ("log in with `hf auth login`, or set HF_TOKEN to a token from huggingface.co/settings/tokens "
              "(and accept the model's terms on its page if it is gated)")
ProgressFn = Callable[["Progress"], None]


class DownloadError(EngineError):
    """A download that cannot start or could not finish, said so a person can act on it."""


class DownloadCancelled(Cancelled):
    """The user cancelled; what was fetched so far stays and the next download continues it."""


@dataclass
class RepoFile:
    name: str
    size: int
    etag: str | None = None  # the blob name in the cache (LFS sha256 or git blob id), when the Hub says


@dataclass
class Variant:
    """One thing a user can choose to download: a GGUF file (or split set), or the whole safetensors set."""
    name: str
    files: list[str]
    weight_bytes: int


@dataclass
class RepoListing:
    repo_id: str
    revision: str         # what the user asked for ("main")
    commit: str | None    # what it pointed to when listed
    files: list[RepoFile]
    variants: list[Variant]

    def file(self, name: str) -> RepoFile:
        return next(f for f in self.files if f.name == name)


@dataclass
class Plan:
    """What a download of one variant would fetch, and whether it fits this machine."""
    repo_id: str
    revision: str
    variant: str
    files: list[RepoFile]
    total_bytes: int          # the variant's size
    have_bytes: int           # already in the cache (whole files, or partial ones a cancel left)
    weight_bytes: int
    free_disk_bytes: int
    ram_total_bytes: int
    cache_dir: str = ""

    @property
    def needed_bytes(self) -> int:
        return max(0, self.total_bytes - self.have_bytes)

    @property
    def fits_disk(self) -> bool:
        return self.needed_bytes + DISK_MARGIN_BYTES <= self.free_disk_bytes

    @property
    def fits_ram(self) -> bool:
        """Roughly: the weights as stored must fit this machine's RAM (MoE Chat can cache fewer experts on
        the GPU, but holds them all in RAM)."""
        return self.weight_bytes <= self.ram_total_bytes


@dataclass
class Progress:
    done_bytes: int
    total_bytes: int
    files_done: int
    files_total: int
    current: str = ""  # the file being fetched


# -- naming ---------------------------------------------------------------------------------------
def parse_repo_id(text: str) -> str:
    """'org/name', or a huggingface.co URL of the repo or of one of its files -> 'org/name'."""
    s = text.strip()
    if "://" in s or s.startswith(("huggingface.co/", "hf.co/")):
        parts = [p for p in urlsplit(s if "://" in s else "https://" + s).path.split("/") if p]
        if parts and parts[0] in ("models", "api"):
            parts = parts[1:] if parts[0] == "models" else parts[2:]
        s = "/".join(parts[:2])
    s = s.strip("/")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        raise DownloadError(f"{text!r} is not a Hugging Face model id",
                            hint="write it as org/name (e.g. Qwen/Qwen3-30B-A3B) or paste the model's huggingface.co URL")
    return s


def endpoint() -> str:
    """HF_ENDPOINT as it is now: huggingface_hub reads it once at import, which tests and mirrors outgrow."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


# -- errors in words ------------------------------------------------------------------------------
def _explain(exc: BaseException, repo_id: str) -> EngineError:
    """The library's exception -> a message naming the repo and what to do."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, EngineError):
        return exc
    if isinstance(exc, hf_errors.GatedRepoError):
        return DownloadError(f"{repo_id} is gated: the Hub needs a token with access to it", hint=TOKEN_HINT)
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return DownloadError(f"{repo_id} has no such revision: {exc}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:  # the Hub answers 401 for a missing repo too, when no token is sent
        return DownloadError(f"{repo_id} was not found, or it is private or gated and needs a token",
                             hint=TOKEN_HINT if not os.environ.get("HF_TOKEN") else
                             "check the spelling, and that your HF_TOKEN has access to this repo")
    if status == 403:
        return DownloadError(f"{repo_id}: access denied (403); a token with access to it is needed", hint=TOKEN_HINT)
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return DownloadError(f"{repo_id} was not found on {endpoint()}", hint="check the spelling of the model id")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return DownloadError(f"the Hub answered an error for {repo_id}: {str(exc).strip().splitlines()[0]}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DownloadError(f"the disk is full ({cache_dir()}); what was fetched so far is kept",
                             hint="free some space, then press Download again to continue")
    if _is_network_error(exc):
        return DownloadError(f"cannot reach {endpoint()}: the network looks down ({type(exc).__name__})",
                             hint="check your connection; a download continues where it stopped")
    return DownloadError(f"downloading {repo_id} failed: {type(exc).__name__}: {exc}")


def _is_network_error(exc: BaseException) -> bool:
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    try:
        import httpx2  # huggingface_hub 2.x's HTTP client
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, httpx2.TransportError)


# -- listing and planning ---------------------------------------------------------------------------
def _is_weight(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES)


def variants_of(files: list[RepoFile]) -> list[Variant]:
    """Each .gguf file (a split set -0000N-of-0000M counts as one) is a variant of its own; safetensors
    (or, without them, PyTorch weights) with every non-weight file is one more."""
    sizes = {f.name: f.size for f in files}
    variants: list[Variant] = []
    gguf_sets: dict[str, list[str]] = {}
    for f in files:
        if f.name.lower().endswith(".gguf"):
            m = SPLIT_GGUF.match(f.name)
            gguf_sets.setdefault(f"{m['stem']}.gguf" if m else f.name, []).append(f.name)
    for name, parts in sorted(gguf_sets.items()):
        variants.append(Variant(name, sorted(parts), sum(sizes[p] for p in parts)))
    others = [f.name for f in files if not _is_weight(f.name)]
    safetensors = [f.name for f in files if f.name.endswith(".safetensors")]
    if safetensors:
        variants.append(Variant(f"safetensors ({len(safetensors)} file{'s' * (len(safetensors) != 1)})",
                                others + safetensors, sum(sizes[n] for n in safetensors)))
    elif not gguf_sets:
        torch_files = [f.name for f in files if f.name.endswith(OTHER_FORMAT_SUFFIXES)]
        if torch_files:
            variants.append(Variant(f"PyTorch weights ({len(torch_files)} files)", others + torch_files,
                                    sum(sizes[n] for n in torch_files)))
    return variants


def list_repo(repo: str, revision: str = "main", token: str | None = None) -> RepoListing:
    """The repo's files with sizes (one model-info call with files metadata) and the variants to choose."""
    from huggingface_hub import HfApi

    repo_id = parse_repo_id(repo)
    try:
        info = HfApi(endpoint=endpoint()).model_info(repo_id, revision=revision, files_metadata=True, token=token)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        raise _explain(exc, repo_id) from exc
    files = []
    for s in info.siblings or []:
        etag = s.lfs.sha256 if s.lfs else s.blob_id
        files.append(RepoFile(s.rfilename, int(s.size or (s.lfs.size if s.lfs else 0) or 0), etag))
    variants = variants_of(files)
    if not variants:
        raise DownloadError(f"{repo_id} has no model weights (no .safetensors or .gguf files)",
                            hint="choose the repo that holds the weights, not a dataset, space or adapter-only repo")
    return RepoListing(repo_id, revision, info.sha, files, variants)


def _storage_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _have_bytes(repo_id: str, commit: str | None, f: RepoFile) -> int:
    """Bytes of this file already in the cache: the whole file, or a partial blob a cancel left."""
    storage = _storage_folder(repo_id)
    if commit and (storage / "snapshots" / commit / f.name).exists():
        return f.size
    if f.etag:
        blob = storage / "blobs" / f.etag
        if blob.exists():
            return f.size
        partial = blob.with_name(blob.name + ".incomplete")
        if partial.exists():
            return min(f.size, partial.stat().st_size)
    return 0


def free_disk_bytes(folder: str | Path) -> int:
    """Free space where the cache is (or would be: the nearest folder that exists)."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def plan_download(listing: RepoListing, variant: str | None = None) -> Plan:
    """What downloading `variant` (default: the first) would fetch, and the fit on disk and in RAM."""
    chosen = next((v for v in listing.variants if v.name == variant), None) if variant else listing.variants[0]
    if chosen is None:
        raise DownloadError(f"{listing.repo_id} has no variant {variant!r}",
                            hint="choose one of: " + ", ".join(v.name for v in listing.variants))
    files = [listing.file(n) for n in chosen.files]
    return Plan(
        repo_id=listing.repo_id, revision=listing.revision, variant=chosen.name, files=files,
        total_bytes=sum(f.size for f in files),
        have_bytes=sum(_have_bytes(listing.repo_id, listing.commit, f) for f in files),
        weight_bytes=chosen.weight_bytes, free_disk_bytes=free_disk_bytes(cache_dir()),
        ram_total_bytes=int(psutil.virtual_memory().total), cache_dir=cache_dir(),
    )


def check_disk_space(plan: Plan) -> None:
    """Refuse before the first byte rather than fail half way with a full disk."""
    from ..units import format_bytes

    plan.free_disk_bytes = free_disk_bytes(plan.cache_dir or cache_dir())
    if not plan.fits_disk:
        raise DownloadError(
            f"not enough disk space for {plan.repo_id} ({plan.variant}): it needs {format_bytes(plan.needed_bytes)} "
            f"more and {plan.cache_dir or cache_dir()} has {format_bytes(plan.free_disk_bytes)} free",
            hint="free some space, or set HF_HUB_CACHE to a folder on a larger disk")


# -- downloading ------------------------------------------------------------------------------------
class _Counter:
    """Adds up bytes across files, reports them, and is where a cancel takes effect (between two reads)."""

    def __init__(self, plan: Plan, progress: ProgressFn | None, cancel: threading.Event | None) -> None:
        self.plan, self.progress, self.cancel = plan, progress, cancel
        self.done = plan.have_bytes
        self.files_done = 0
        self.current = ""

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadCancelled("The download was cancelled; press Download again to continue it.")

    def add(self, n: int) -> None:
        self.done += n
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(Progress(min(self.done, self.plan.total_bytes), self.plan.total_bytes, self.files_done,
                                   len(self.plan.files), self.current))

    def bar_class(self) -> type:
        """A tqdm stand-in for huggingface_hub: it counts, and raises to cancel."""
        counter = self

        class Bar:
            def __init__(self, *args, initial: int = 0, **kwargs) -> None:
                self.n = initial

            def update(self, n: int | float = 1) -> None:
                # the library calls this before it writes the chunk: cancel first, so every byte counted
                # so far is on disk and the partial file is whole for the next try
                counter.check()
                self.n += n
                counter.add(int(n))

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.close()

            def close(self) -> None:
                pass

            def set_description(self, *args, **kwargs) -> None:
                pass

        return Bar


def _fetch_http(repo_id: str, f: RepoFile, meta, token: str | None, counter: _Counter) -> None:
    """One file over plain HTTP into `blobs/<etag>`, continuing a partial blob with a Range request."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    blob = _storage_folder(repo_id) / "blobs" / meta.etag
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and have > meta.size:  # not this file's bytes: start over
        partial.unlink()
        have = 0
    headers = build_hf_headers(token=token)
    if urlsplit(meta.location).netloc != urlsplit(endpoint()).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: no token there, as the library does
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, CHUNK_BYTES)  # read at each call
    with partial.open("ab") as out:
        http_get(meta.location, out, resume_size=have, headers=headers, expected_size=meta.size,
                 displayed_filename=f.name, tqdm_class=counter.bar_class())
    os.replace(partial, blob)


def _fetch(plan: Plan, f: RepoFile, token: str | None, counter: _Counter) -> bool:
    """Bring one file's blob into the cache; True when it is also linked into the snapshot already."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils._runtime import is_xet_available

    meta = get_hf_file_metadata(hf_hub_url(plan.repo_id, f.name, revision=plan.revision, endpoint=endpoint()),
                                token=token, endpoint=endpoint())
    if meta.commit_hash and (_storage_folder(plan.repo_id) / "snapshots" / meta.commit_hash / f.name).exists():
        return True
    if meta.xet_file_data is not None and is_xet_available():  # the library's own Xet transfer
        counter.done -= _have_bytes(plan.repo_id, None, f)  # it starts this file over
        hf_hub_download(plan.repo_id, f.name, revision=plan.revision, cache_dir=plan.cache_dir or cache_dir(),
                        token=token, endpoint=endpoint(), tqdm_class=counter.bar_class())
        return True
    _fetch_http(plan.repo_id, f, meta, token, counter)
    return False


def download(plan: Plan, progress: ProgressFn | None = None, cancel: threading.Event | None = None,
             token: str | None = None) -> Path:
    """Fetch the plan's files one by one into the HF cache; returns the snapshot folder.

    Every blob is fetched first and the snapshot is linked only when all are there, so a cancelled or
    failed download never leaves a half model for the picker to list. Raises DownloadCancelled when
    `cancel` is set (seen at the next read of at most CHUNK_BYTES) and DownloadError with a message for
    everything else. Finished and partial files stay, and the next download continues them. `token=None`
    lets the library use HF_TOKEN or the saved login.
    """
    from huggingface_hub import hf_hub_download

    check_disk_space(plan)
    counter = _Counter(plan, progress, cancel)
    pointer: str | None = None
    try:
        counter.check()
        counter.report()
        for f in plan.files:
            counter.current = f.name
            _fetch(plan, f, token, counter)
            counter.files_done += 1
            counter.report()
            counter.check()
        for f in plan.files:  # every blob is here: the library links them (and writes refs/<revision>)
            path = hf_hub_download(plan.repo_id, f.name, revision=plan.revision, token=token,
                                   cache_dir=plan.cache_dir or cache_dir(), endpoint=endpoint())
            pointer = pointer or str(Path(path).parents[len(Path(f.name).parts) - 1])
    except DownloadCancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a message
        raise _explain(exc, plan.repo_id) from exc
    if pointer is None:  # pragma: no cover - a plan always has files
        raise DownloadError(f"{plan.repo_id}: nothing to download")
    return Path(pointer)
