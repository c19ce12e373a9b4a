"""Files written atomically, their digests, and the temp files a killed writer leaves.

Every file the project writes goes through :func:`atomic_path` (or :func:`atomic_file`,
:func:`atomic_write` / :func:`write_json_atomic` on top of it): the data goes to a temp file ``<name>.tmp-<pid>`` in the
destination folder, which is flushed, fsync'd, made world-readable and renamed over the final name;
an error removes the temp file. A crash (kill -9) can leave a temp file, never a half-written final
one; :func:`remove_stale_temps` clears such leftovers. Temp names always contain :data:`TMP_MARK`.

A URL (:mod:`datagen.storage`) is written the same way, the rename replaced by the upload: the temp
file is local, and the object appears whole (one PUT or a completed multipart upload) or not at
all; :func:`remove_stale_temps` aborts the unfinished uploads a killed writer left under the prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from datagen import storage

TMP_MARK = ".tmp-"


def temp_path_for(path: str | Path) -> Path:
    """The temp file a writer of ``path`` uses: same folder, so the rename is atomic."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path to write ``path``'s content to; on success it replaces ``path``.

    For writers that want a path (``safetensors.save_file``, ``PIL.Image.save``)."""
    if storage.is_url(path):
        with _uploaded_path(storage.path(path)) as tmp:
            yield tmp
        return
    path = storage.path(path)  # a plain path, or file:// stripped
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _uploaded_path(dest) -> Iterator[Path]:
    """A local temp file whose content becomes the object ``dest`` (a URL) once the block ends."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="subject-ffhq-upload-") as folder:
        tmp = Path(folder) / f"{dest.name}{TMP_MARK}{os.getpid()}"
        yield tmp
        storage.upload(tmp, dest)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """:func:`atomic_path` for writers that want an open binary file (``tarfile``): the file is
    closed when the block ends, then renamed into place; an error discards it."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; returns ``path``."""
    path = storage.path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_parquet_atomic(path: str | Path, table: Any) -> Path:
    """A pyarrow ``table`` as Parquet at ``path``, atomically; returns ``path``."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return storage.path(path)


def append_text(path: str | Path, text: str) -> None:
    """Add ``text`` to the end of a log file: appended in place locally; on a bucket (objects cannot
    grow) the object is rewritten whole, atomically, with the text added."""
    if not storage.is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    p = storage.path(path)
    before = p.read_bytes() if p.exists() else b""
    atomic_write(p, before + text.encode("utf-8"))


class LogAppender:
    """Lines added to a log file: locally each is appended at once (:func:`append_text`); on a bucket,
    where every append rewrites the whole object, they are held and written together every
    ``flush_every`` lines or at :meth:`flush` (a kill loses at most the lines not yet flushed)."""

    def __init__(self, path: str | Path, flush_every: int = 100):
        self.path = path
        self.remote = storage.is_url(path)
        self.flush_every = max(1, int(flush_every))
        self.pending: list[str] = []

    def add(self, text: str) -> None:
        if not self.remote:
            append_text(self.path, text)
            return
        self.pending.append(text)
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            append_text(self.path, "".join(self.pending))
            self.pending = []


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented UTF-8 JSON (one trailing newline), atomically. A lone surrogate (what
    Python makes of a file name's non-UTF-8 byte; no UTF-8 file can hold it) is written as the
    JSON escape ``\\udNNN``, so the file is valid UTF-8 JSON and reads back to the same string."""
    text = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    return atomic_write(path, text.encode("utf-8", "backslashreplace"))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (what shard manifests record)."""
    h = hashlib.sha256()
    with storage.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_temps(folder: str | Path, name: str = "*") -> list[Path]:
    """Delete the temp files that killed writers of ``folder/<name>`` left; return what was removed."""
    removed = []
    if storage.is_url(folder):
        prefix = "" if name == "*" else name
        return [storage.path(u) for u in storage.abort_uploads(storage.path(folder), prefix)]
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in sorted(folder.glob(f"{name}{TMP_MARK}*")):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def fsync_dir(folder: str | Path) -> None:
    """Persist a rename in ``folder`` (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
