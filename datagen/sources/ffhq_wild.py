"""Reader of an FFHQ-wild download.

**FFHQ-wild** (:class:`FFHQWildSource`, DESIGN §5): ``root/ffhq-dataset-v2.json`` is a dict keyed
by the image index (``"0"`` … ``"69999"``); each item's ``in_the_wild.file_path`` is resolved
relative to ``root``. ``source_id`` is the index as a decimal string, ``key`` the index zero-padded
to 5 digits (FFHQ's own file name), items are sorted by index. Provenance (licence, author, photo
URL and title, country, face rect, pixel md5, …) is copied from the metadata into ``meta``. A
malformed metadata file raises one :class:`SourceError` that names the file and lists what is
wrong. A listed image that turns out to be missing or broken is *not* a listing error: it stays an
item, and loading it reports the reason (``datagen.sources.images.ImageError``).

Names, duplicates and the held-out split: :mod:`datagen.sources.items`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import msgspec

from datagen import storage
from datagen.sources.items import SourceError, SourceItem, assign_duplicates_and_split
from datagen.sources.names import escape_path

METADATA_FILE = "ffhq-dataset-v2.json"

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_INDEX_RE = re.compile(r"^[0-9]+$")
_MAX_PROBLEMS_SHOWN = 10


class FFHQWildSource:
    """Reader of an FFHQ-wild download: ``ffhq-dataset-v2.json`` + ``in-the-wild-images/``."""

    name = "ffhq-wild"

    def __init__(self, root: str | os.PathLike, test_size: int | None = None):
        self.root = storage.path(root)
        self.root = self.root.resolve() if isinstance(self.root, Path) else self.root
        self.metadata_path = self.root / METADATA_FILE
        self.test_size = test_size
        # a URL's root is its path on the bucket ("bucket/prefix"): items get the scheme back
        self._scheme = "" if isinstance(self.root, Path) else f"{self.root.protocol}://"
        self._root_str = str(self.root) if isinstance(self.root, Path) else self.root.path.rstrip("/")
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
            path=self._scheme + resolved,
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
        handle = where.open("rb")
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
