"""Where source photos come from: an FFHQ-wild download or a plain folder of images.

A source lists its items from metadata alone (nothing is decoded here): each :class:`SourceItem`
carries its path, its sample key, its provenance, its duplicate group and its split.

**FFHQ-wild** (:class:`FFHQWildSource`, DESIGN §5): ``root/ffhq-dataset-v2.json`` is a dict keyed
by the image index (``"0"`` … ``"69999"``); each item's ``in_the_wild.file_path`` is resolved
relative to ``root``. ``source_id`` is the index as a decimal string, ``key`` the index zero-padded
to 5 digits (FFHQ's own file name), items are sorted by index. Provenance (licence, author, photo
URL and title, country, face rect, pixel md5, …) is copied from the metadata into ``meta``. A
malformed metadata file raises one :class:`SourceError` that names the file and lists what is
wrong. A listed image that turns out to be missing or broken is *not* a listing error: it stays an
item, and loading it reports the reason (``datagen.sources.images.ImageError``).

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

**Names** are recorded (``rel_path``, the record's provenance, the manifests) in the escaped form
of :mod:`datagen.sources.names`: unchanged for UTF-8 names, ``\\xNN`` for each byte that is not
UTF-8. ``path`` (what is opened) keeps the name as the OS gave it.

**Duplicates.** FFHQ-wild holds one in-the-wild copy of a photo per face extracted from it. Items
are grouped by ``in_the_wild.pixel_md5`` (falling back to ``file_md5``, then to the index alone
when the metadata has neither); folder items by the md5 of the file's bytes (exact copies only:
re-encoded copies are not detected at listing time; zero-byte and unreadable files each form their
own group so that each fails with its own reason). ``duplicate_of`` is the ``source_id`` of the
group's first item (lowest index) on every other member, ``None`` on the first. A member is a
duplicate only if its own file exists: a member whose file is missing is never recorded
``duplicate`` (it is loaded, and fails "file is missing"), and the group's first member whose file
exists is the one the others are duplicates of.

**Held-out split** (DESIGN §3 step 5). The test set has :func:`held_out_size` images: by default
``min(1000, n // 10)`` for ``n`` items, but at least 1 when ``n >= 2`` (and 0 for a single item),
or an explicit ``test_size`` (capped at ``n``). Whole duplicate groups are drawn, in the order of
``sha256("subject-ffhq/split/v1/" + group)``; a group is taken when it still fits in the remaining
room, so the test set has exactly the target size whenever group sizes allow it and never more.
The split therefore depends only on the set of groups and their sizes — not on listing order, not
on the machine — and duplicates can never straddle train and test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from datagen.sources.names import escape_path

METADATA_FILE = "ffhq-dataset-v2.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_TEST_SIZE = 1000
TEST_FRACTION_DIVISOR = 10  # small sources hold out n // 10 images
SPLIT_SALT = "subject-ffhq/split/v1/"

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_INDEX_RE = re.compile(r"^[0-9]+$")
_MAX_PROBLEMS_SHOWN = 10


class SourceError(ValueError):
    """A source cannot be listed (missing root, malformed metadata, …). One error, naming the
    file and everything found wrong with it."""


@dataclass(frozen=True)
class SourceItem:
    """One source image, known from metadata before decoding."""

    source_id: str  # FFHQ index "0".."69999" / folder: running index in sorted path order
    key: str  # sample key in shards: decimal digits (FFHQ: index zero-padded to 5)
    path: str  # absolute path of the image file
    rel_path: str  # path relative to the source root (POSIX separators)
    group: str  # duplicate group (metadata pixel md5, or file-content md5 for folders)
    split: str  # "train" | "test" (duplicates always share a split)
    duplicate_of: str | None  # source_id of the first item of its group, else None
    # provenance: source ("ffhq-wild" | "folder"), index, license, license_url, author, photo_url,
    # photo_title, face_rect, pixel_md5 (metadata's), file_md5, file_size, ...
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


# --------------------------------------------------------------------------- split and duplicates


def held_out_size(n_items: int, test_size: int | None = None) -> int:
    """How many of ``n_items`` go to the test split (see module doc)."""
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if test_size is not None:
        if test_size < 0:
            raise ValueError(f"test_size must be >= 0, got {test_size}")
        return min(test_size, n_items)
    if n_items < 2:
        return 0
    return min(DEFAULT_TEST_SIZE, max(1, n_items // TEST_FRACTION_DIVISOR))


def split_rank(group: str) -> str:
    """The order in which duplicate groups are drawn into the test split."""
    return hashlib.sha256((SPLIT_SALT + group).encode("utf-8")).hexdigest()


def choose_test_groups(group_sizes: dict[str, int], target: int) -> set[str]:
    """Whole groups, drawn in :func:`split_rank` order, that add up to at most ``target`` images."""
    chosen: set[str] = set()
    room = target
    for group in sorted(group_sizes, key=lambda g: (split_rank(g), g)):
        if room == 0:
            break
        size = group_sizes[group]
        if size <= room:
            chosen.add(group)
            room -= size
    return chosen


def assign_duplicates_and_split(items: list[SourceItem], test_size: int | None = None) -> list[SourceItem]:
    """Fill ``duplicate_of`` and ``split``; return the items in source order (numeric ``source_id``).

    The result does not depend on the order of ``items``: the first of a group is its lowest index.
    """
    items = sorted(items, key=lambda item: int(item.source_id))
    group_sizes: dict[str, int] = defaultdict(int)
    for item in items:
        group_sizes[item.group] += 1
    # Only members of groups with copies are looked at on disk (a stat each): a duplicate is never
    # recorded for a file that is not there, and the first copy that exists stands for the group.
    first_of_group: dict[str, str] = {}
    for item in items:
        if item.group not in first_of_group and (group_sizes[item.group] == 1 or os.path.isfile(item.path)):
            first_of_group[item.group] = item.source_id
    test_groups = choose_test_groups(dict(group_sizes), held_out_size(len(items), test_size))
    out = []
    for item in items:
        first = first_of_group.get(item.group, item.source_id)
        if first != item.source_id and not os.path.isfile(item.path):
            first = item.source_id  # missing: loaded, so it fails with its own reason
        out.append(
            replace(
                item,
                duplicate_of=None if first == item.source_id else first,
                split="test" if item.group in test_groups else "train",
            )
        )
    return out


# --------------------------------------------------------------------------- FFHQ-wild


class FFHQWildSource:
    """Reader of an FFHQ-wild download: ``ffhq-dataset-v2.json`` + ``in-the-wild-images/``."""

    name = "ffhq-wild"

    def __init__(self, root: str | os.PathLike, test_size: int | None = None):
        self.root = Path(root).resolve()
        self.metadata_path = self.root / METADATA_FILE
        self.test_size = test_size
        self._root_str = str(self.root)
        self._root_prefix = os.path.join(self._root_str, "")  # with the trailing separator
        if not self.metadata_path.is_file():
            raise SourceError(f"{self.metadata_path}: FFHQ metadata file not found")
        self._items: list[SourceItem] | None = None

    def items(self) -> list[SourceItem]:
        """All items, sorted by index, with duplicates and split assigned."""
        if self._items is None:
            self._items = assign_duplicates_and_split(self._read(), self.test_size)
        return list(self._items)

    def _read(self) -> list[SourceItem]:
        where = self.metadata_path
        problems: list[str] = []
        items: list[tuple[int, SourceItem]] = []
        seen: dict[int, str] = {}
        for index_str, entry in _metadata_entries(where):
            item = self._item(index_str, entry, problems)
            if item is None:
                continue
            index = item[0]
            if index in seen:
                problems.append(f"keys {seen[index]!r} and {index_str!r} name the same index {index}")
                continue
            seen[index] = index_str
            items.append(item)
        if not items and not problems:
            raise SourceError(f"{where}: the metadata lists no images")
        if problems:
            shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
            more = len(problems) - _MAX_PROBLEMS_SHOWN
            tail = f"; ... and {more} more" if more > 0 else ""
            raise SourceError(f"{where}: malformed FFHQ metadata, {len(problems)} problem(s): {shown}{tail}")
        items.sort(key=lambda pair: pair[0])
        return [item for _, item in items]

    def _item(self, index_str: str, entry: Any, problems: list[str]) -> tuple[int, SourceItem] | None:
        if not isinstance(index_str, str) or not _INDEX_RE.match(index_str):
            problems.append(f"key {index_str!r} is not a decimal image index")
            return None
        label = f"item {index_str!r}"
        if not isinstance(entry, dict):
            problems.append(f"{label} is a JSON {type(entry).__name__}, not an object")
            return None
        wild = entry.get("in_the_wild")
        if not isinstance(wild, dict):
            problems.append(f"{label} has no 'in_the_wild' object")
            return None
        file_path = wild.get("file_path")
        if not isinstance(file_path, str) or not file_path.strip():
            problems.append(f"{label} has no 'in_the_wild.file_path'")
            return None
        # Lexical check (no symlink resolution): in-the-wild-images may be a link to another disk.
        # os.path, not pathlib: this runs 70 000 times while planning.
        resolved = os.path.normpath(os.path.join(self._root_str, file_path))
        if os.path.isabs(file_path) or not resolved.startswith(self._root_prefix):
            problems.append(f"{label}: in_the_wild.file_path {file_path!r} points outside the source root")
            return None
        metadata = entry.get("metadata", {})
        if not isinstance(metadata, dict):
            problems.append(f"{label}: 'metadata' is a JSON {type(metadata).__name__}, not an object")
            return None
        pixel = _md5_field(wild, "pixel_md5", label, problems)
        file_md5 = _md5_field(wild, "file_md5", label, problems)
        face_rect = wild.get("face_rect")
        if face_rect is not None and not _is_box(face_rect):
            problems.append(f"{label}: in_the_wild.face_rect {face_rect!r} is not [x0, y0, x1, y1]")
        index = int(index_str)
        source_id = str(index)
        meta = {
            "source": self.name,
            "index": index,
            "category": entry.get("category"),
            "license": metadata.get("license"),
            "license_url": metadata.get("license_url"),
            "author": metadata.get("author"),
            "photo_url": metadata.get("photo_url"),
            "photo_title": metadata.get("photo_title"),
            "country": metadata.get("country"),
            "date_uploaded": metadata.get("date_uploaded"),
            "face_rect": list(face_rect) if _is_box(face_rect) else None,
            "pixel_md5": pixel,
            "file_md5": file_md5,
            "file_size": wild.get("file_size"),
            "pixel_size": wild.get("pixel_size"),
        }
        group = pixel or (f"file:{file_md5}" if file_md5 else f"index:{index}")
        item = SourceItem(
            source_id=source_id,
            key=f"{index:05d}",
            path=resolved,
            rel_path=escape_path(resolved[len(self._root_prefix):].replace(os.sep, "/")),
            group=group,
            split="train",
            duplicate_of=None,
            meta=meta,
        )
        return index, item


def _metadata_entries(where: Path):
    """``(key, item)`` pairs of the metadata's top-level object. Fast path: msgspec decodes the file
    keeping only the fields planning reads (the landmark arrays, most of the 255 MB, are skipped
    without becoming Python objects). A file that does not fit that shape (an item that is not an
    object, ``in_the_wild`` missing, broken JSON) goes through :func:`_streamed_entries`, which names
    each problem as before; so does one where a key may be repeated (a dict would keep only its last
    item, silently): every item has one ``in_the_wild``, so fewer items than that word's count means
    a repeat, or only the word elsewhere (a false alarm costs speed, never an item)."""
    try:
        data = where.read_bytes()
    except OSError as e:
        raise SourceError(f"{where}: cannot read FFHQ metadata ({e})") from e
    try:
        decoded = msgspec.json.decode(data, type=dict[str, _Entry])
    except (msgspec.DecodeError, msgspec.ValidationError):
        decoded = None
    if decoded is None or len(decoded) != data.count(b'"in_the_wild"'):
        del data, decoded
        yield from _streamed_entries(where)
        return
    del data
    for key, entry in decoded.items():
        yield key, {"category": entry.category, "metadata": entry.metadata,
                    "in_the_wild": msgspec.structs.asdict(entry.in_the_wild)}


class _Wild(msgspec.Struct):
    """The fields of ``in_the_wild`` that planning reads (any JSON type: checked item by item)."""

    file_path: Any = None
    pixel_md5: Any = None
    file_md5: Any = None
    face_rect: Any = None
    file_size: Any = None
    pixel_size: Any = None


class _Entry(msgspec.Struct):
    """The fields of one metadata item that planning reads."""

    in_the_wild: _Wild
    category: Any = None
    metadata: Any = msgspec.field(default_factory=dict)


def _streamed_entries(where: Path):
    """``(key, item)`` pairs of the metadata's top-level object, parsed incrementally with ijson: one
    item at a time is in memory. Anything that is not a JSON object is reported as
    :class:`SourceError` with the standard library's message (line and column)."""
    import ijson

    try:
        handle = open(where, "rb")
    except OSError as e:
        raise SourceError(f"{where}: cannot read FFHQ metadata ({e})") from e
    with handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if not head.startswith(b"{"):
            _raise_whole_file_error(where)  # empty, not JSON, or a JSON value that is not an object
        handle.seek(0)
        try:
            yield from ijson.kvitems(handle, "", use_float=True)
        except (ijson.JSONError, UnicodeDecodeError):
            _raise_whole_file_error(where)  # broken file: find the precise reason (error path only)
            raise


def _raise_whole_file_error(where: Path) -> None:
    """Raise the :class:`SourceError` that describes a metadata file which is not a JSON object."""
    try:
        text = where.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{where}: cannot read FFHQ metadata ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, dict):
        raise SourceError(
            f'{where}: expected a JSON object keyed by image index ("0", "1", ...), '
            f"found a JSON {type(data).__name__}"
        )
    raise SourceError(f"{where}: not valid JSON (the streaming parser stopped part-way)")


def _md5_field(wild: dict, name: str, label: str, problems: list[str]) -> str | None:
    value = wild.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not _MD5_RE.match(value.lower()):
        problems.append(f"{label}: in_the_wild.{name} {value!r} is not an md5 hex digest")
        return None
    return value.lower()


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


# --------------------------------------------------------------------------- image folder


class ImageFolderSource:
    """Reader of a plain folder of photos (recursive), for people who bring their own."""

    name = "folder"

    def __init__(self, root: str | os.PathLike, test_size: int | None = None):
        self.root = Path(root).resolve()
        self.test_size = test_size
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: image folder not found")
        self._items: list[SourceItem] | None = None
        self.skipped: list[dict[str, str]] = []  # {"path": escaped rel path, "reason": why}, once listed

    def items(self) -> list[SourceItem]:
        """All image files in sorted relative-path order, with duplicates and split assigned."""
        if self._items is None:
            paths, self.skipped = scan_folder(self.root)
            if not paths:
                passed = f"; passed over {len(self.skipped)}: {describe_skipped(self.skipped)}" if self.skipped else ""
                raise SourceError(
                    f"{self.root}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case, "
                    f"recursively){passed}"
                )
            items = [self._item(i, rel) for i, rel in enumerate(paths)]
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


def describe_skipped(skipped: list[dict[str, str]], limit: int = 5) -> str:
    """One line: the first ``limit`` things passed over and why, and how many more."""
    shown = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:limit])
    more = len(skipped) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def _file_md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


# --------------------------------------------------------------------------- entry point


def open_source(root: str | os.PathLike, test_size: int | None = None) -> FFHQWildSource | ImageFolderSource:
    """An FFHQ-wild source if ``root/ffhq-dataset-v2.json`` exists, else an image folder."""
    root = Path(root)
    if not root.exists():
        raise SourceError(f"{root}: source folder not found")
    if not root.is_dir():
        raise SourceError(f"{root}: source is not a folder")
    if (root / METADATA_FILE).is_file():
        return FFHQWildSource(root, test_size=test_size)
    return ImageFolderSource(root, test_size=test_size)
