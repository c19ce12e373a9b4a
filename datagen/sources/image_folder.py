"""Reader of a plain folder of photos.

**Image folder** (:class:`ImageFolderSource`): every file under ``root`` (recursively) whose
extension is one of :data:`IMAGE_EXTENSIONS` (any case), in sorted order of the relative POSIX
path. ``source_id`` is the running index in that order (``"0"``, ``"1"``, …), ``key`` the same
index zero-padded to at least 5 digits. Adding or removing files renumbers the items after them.
What the folder source passes over is listed in ``ImageFolderSource.skipped`` (escaped path and
why; the job prints it and writes it into ``run.json``): hidden files and folders (names starting
with "."), files with another extension (``.gif`` included: GIFs are mostly animations), folders
whose name looks like an image (``x.png/``), links to folders (not followed, so no link loop is
walked), and anything that is neither a file nor a folder. A link to a file is taken (a dangling
one then fails at load, "file is missing").

The folder may be on a bucket (``s3://bucket/photos``): the same rules over its keys (a bucket has no
links), and each object is read once while listing, to hash it, as a local file is (eight at once).

Names, duplicates and the held-out split: :mod:`datagen.sources.items`.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from datagen import storage
from datagen.sources.items import SourceError, SourceItem, assign_duplicates_and_split
from datagen.sources.names import escape_path

BUCKET_LIST_THREADS = 8  # objects sized and hashed at once when the folder is on a bucket
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageFolderSource:
    """Reader of a plain folder of photos (recursive), for people who bring their own."""

    name = "folder"

    def __init__(self, root: str | os.PathLike, test_size: int | None = None):
        root = storage.path(root)
        self.root = root.resolve() if isinstance(root, Path) else root  # a bucket prefix stays a URL
        self.test_size = test_size
        if not self.root.is_dir():
            raise SourceError(f"{storage.text(self.root)}: image folder not found")
        self._items: list[SourceItem] | None = None
        self.skipped: list[dict[str, str]] = []  # {"path": escaped rel path, "reason": why}, once listed

    def items(self) -> list[SourceItem]:
        """All image files in sorted relative-path order, with duplicates and split assigned."""
        if self._items is None:
            paths, self.skipped = scan_folder(self.root) if isinstance(self.root, Path) else scan_bucket(self.root)
            if not paths:
                passed = f"; passed over {len(self.skipped)}: {describe_skipped(self.skipped)}" if self.skipped else ""
                raise SourceError(
                    f"{storage.text(self.root)}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case, "
                    f"recursively){passed}"
                )
            if isinstance(self.root, Path):
                items = [self._item(i, rel) for i, rel in enumerate(paths)]
            else:  # a bucket: one request per object to size and hash it, so many at once
                with ThreadPoolExecutor(BUCKET_LIST_THREADS) as pool:
                    items = list(pool.map(self._item, range(len(paths)), paths))
            self._items = assign_duplicates_and_split(items, self.test_size)
        return list(self._items)

    def _item(self, index: int, rel: str) -> SourceItem:
        path = self.root / rel
        meta: dict[str, Any] = {
            "source": self.name,
            "index": index,
            "license": None,
            "license_url": None,
            "author": None,
            "photo_url": None,
            "photo_title": escape_path(Path(rel).name),
            "face_rect": None,
            "pixel_md5": None,
            "file_md5": None,
            "file_size": None,
        }
        try:
            size = path.stat().st_size
            meta["file_size"] = size
            if size == 0:
                group = f"empty:{rel}"
            else:
                digest = _file_md5(path)
                meta["file_md5"] = digest
                group = digest
        except OSError as e:
            meta["listing_error"] = f"cannot read file ({e.strerror or e})"
            group = f"unreadable:{rel}"
        return SourceItem(
            source_id=str(index),
            key=f"{index:05d}",
            path=str(path),
            rel_path=escape_path(rel),
            group=group,
            split="train",
            duplicate_of=None,
            meta=meta,
        )


def scan_folder(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(image files, passed over)`` under ``root``: relative POSIX paths of the files taken, sorted
    (as the OS names them), and ``{"path", "reason"}`` for each thing passed over (escaped path)."""
    found: list[str] = []
    skipped: list[dict[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append({"path": escape_path(path.relative_to(root).as_posix()), "reason": reason})

    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            p = here / d
            if d.startswith("."):
                skip(p, "hidden folder, not searched")
            elif p.is_symlink():
                skip(p, "link to a folder, not followed")
            elif d.lower().endswith(IMAGE_EXTENSIONS):
                skip(p, "a folder named like an image (searched as a folder)")
                keep.append(d)
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            p = here / name
            if name.startswith("."):
                skip(p, "hidden file")
            elif not name.lower().endswith(IMAGE_EXTENSIONS):
                ext = Path(name).suffix.lower()
                what = f"extension {ext!r}" if ext else "no extension"
                skip(p, f"not a supported image type ({what}; taken: {', '.join(IMAGE_EXTENSIONS)})")
            elif not p.is_symlink() and p.exists() and not p.is_file():
                skip(p, "not a regular file")
            else:
                found.append(p.relative_to(root).as_posix())
    skipped.sort(key=lambda s: s["path"])
    return sorted(found), skipped


def scan_bucket(root) -> tuple[list[str], list[dict[str, str]]]:
    """:func:`scan_folder` for a folder on a bucket (a prefix): the same rules, where they apply
    (a bucket has no links and no special files); one listing request per thousand objects."""
    fs, rpath = storage.fs_and_path(root)
    base = rpath.rstrip("/") + "/"
    found: list[str] = []
    skipped: dict[str, str] = {}
    for name in sorted(fs.find(base)):
        rel = name[len(base):]
        *folders, file = rel.split("/")
        hidden = next((i for i, part in enumerate(folders) if part.startswith(".")), None)
        if hidden is not None:
            skipped["/".join(folders[: hidden + 1])] = "hidden folder, not searched"
        elif file.startswith("."):
            skipped[rel] = "hidden file"
        elif not file.lower().endswith(IMAGE_EXTENSIONS):
            ext = Path(file).suffix.lower()
            what = f"extension {ext!r}" if ext else "no extension"
            skipped[rel] = f"not a supported image type ({what}; taken: {', '.join(IMAGE_EXTENSIONS)})"
        else:
            found.append(rel)
    return found, [{"path": escape_path(p), "reason": why} for p, why in sorted(skipped.items())]


def describe_skipped(skipped: list[dict[str, str]], limit: int = 5) -> str:
    """One line: the first ``limit`` things passed over and why, and how many more."""
    shown = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:limit])
    more = len(skipped) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def _file_md5(path: Path) -> str:
    with path.open("rb") as f:  # a local file, or an object on a bucket (read once, as a local one is)
        return hashlib.file_digest(f, "md5").hexdigest()
