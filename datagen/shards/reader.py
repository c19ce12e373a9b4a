"""The one shard reader: samples, records or raw members of a shard tar, in written order.

A shard holds, per sample, ``<key>.jpg``, ``<key>.seg.png`` and ``<key>.json`` (see
:mod:`datagen.shards.writer`). Everything that reads a shard outside the training stream (tables,
report, inspect, export, tests) reads it through :func:`iter_members`; the trainer streams shards
with webdataset. Either way a sample's members are decoded and checked by :class:`TarSample`
(the one place that knows what a good sample is), and sizes by :func:`check_sizes`, which the
writer also runs before it writes.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datagen import storage
from datagen.record.schema import Record

MEMBERS = ("jpg", "seg.png", "json")


class ShardError(ValueError):
    """A shard or one of its samples is unreadable or inconsistent; the message names it."""


@dataclass
class Sample:
    """One decoded sample of a shard."""

    key: str
    image: Image.Image  # RGB
    segment_map: np.ndarray  # uint16, H x W, same size as image
    record: Record


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_segment_map(data: bytes) -> np.ndarray:
    """The (H, W) uint16 segment ids of a segment-map PNG. A grayscale PNG (the writer's 16-bit, or
    8-bit) is decoded by libspng (``pyspng``, ~5x faster than Pillow on these maps: the training
    loader's hot path); anything else goes through Pillow, which says what is wrong with it."""
    if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[25] == 0 and data[24] in (8, 16):
        import pyspng

        try:
            array = pyspng.load(data)
        except RuntimeError:
            array = None  # Pillow names the problem below
        if array is not None and array.ndim == 2:  # 8-bit gray
            return array.astype(np.uint16)
        if array is not None and array.ndim == 3 and array.shape[2] == 2 and array.dtype == np.uint16:
            return np.ascontiguousarray(array[..., 0])  # 16-bit gray comes out as gray + opaque alpha
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in ("I;16", "I;16B", "I", "L"):
            raise ShardError(f"segment map PNG has mode {im.mode}, expected 16-bit grayscale")
        return np.asarray(im).astype(np.uint16)


def check_sizes(where: str, image_size: tuple[int, int], segment_map_shape: tuple[int, ...],
                record: Record | None = None) -> None:
    """Raise :class:`ShardError` (prefixed ``where``) unless the image (``(w, h)``), its segment map
    (``(h, w)``) and, when given, the record's ``width``/``height`` are the same size."""
    w, h = image_size
    if (h, w) != tuple(segment_map_shape):
        raise ShardError(f"{where}: image is {w}x{h} but its segment map is {segment_map_shape[1]}x{segment_map_shape[0]}")
    if record is not None and (w, h) != (record.width, record.height):
        raise ShardError(f"{where}: record says {record.width}x{record.height}, image is {w}x{h}")


@dataclass(frozen=True)
class TarSample:
    """One sample's raw tar members and the one way to decode and check them: every reader (tables,
    report, inspect, export, the training loader) goes through it, and every problem is a
    :class:`ShardError` naming the shard and the key. Each part decodes on demand, so a caller pays
    only for what it reads (the export filters on the record before it decodes pixels)."""

    shard: str
    key: str
    members: Mapping[str, bytes]

    @classmethod
    def of(cls, shard: str, key: str, members: Mapping[str, bytes], exts: Iterable[str] = MEMBERS) -> TarSample:
        """The sample, after checking that it has every member named by ``exts``."""
        missing = [m for m in exts if m not in members]
        if missing:
            raise ShardError(f"{shard}: sample {key} lacks member(s) {missing}")
        return cls(shard, key, members)

    @property
    def where(self) -> str:
        return f"{self.shard}: sample {self.key}"

    def record(self) -> Record:
        """The validated record, whose key must be the sample's."""
        with self._decoding():  # RecordError, or a value the schema's parsing refused
            record = Record.from_json(self.members["json"])
        if record.key != self.key:
            raise ShardError(f"{self.shard}: member {self.key}.json holds record key {record.key!r}")
        return record

    def segment_map(self) -> np.ndarray:
        """The (H, W) uint16 segment ids (:func:`decode_segment_map`)."""
        with self._decoding():
            return decode_segment_map(self.members["seg.png"])

    def image(self) -> Image.Image:
        """The image, RGB."""
        with self._decoding(), Image.open(io.BytesIO(self.members["jpg"])) as im:
            return im.convert("RGB")

    def image_size(self) -> tuple[int, int]:
        """``(w, h)`` of the image, from its header alone (no pixels decoded)."""
        with self._decoding(), Image.open(io.BytesIO(self.members["jpg"])) as im:
            return im.size

    def checked_segment_map(self, record: Record) -> np.ndarray:
        """The segment map, checked against the image (its header: no pixels decoded) and the record."""
        segment_map = self.segment_map()
        self.check_sizes(self.image_size(), segment_map, record)
        return segment_map

    def check_sizes(self, image_size: tuple[int, int], segment_map: np.ndarray, record: Record | None = None) -> None:
        check_sizes(self.where, image_size, segment_map.shape, record)

    def decode(self) -> Sample:
        """Image, segment map and record, checked against each other."""
        record = self.record()
        image = self.image()
        segment_map = self.segment_map()
        self.check_sizes(image.size, segment_map, record)
        return Sample(key=self.key, image=image, segment_map=segment_map, record=record)

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        try:
            yield
        except (ValueError, OSError) as e:
            raise ShardError(f"{self.where}: {e}") from e


def iter_members(
    tar_path: str | Path, keys: Iterable[str] | None = None, exts: Iterable[str] = MEMBERS
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of the shard, in written order, with the members named
    by ``exts`` (all of them required); only the samples in ``keys`` when given (each must exist)."""
    tar_path = storage.path(tar_path)
    exts = tuple(exts)
    wanted = None if keys is None else set(keys)
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tar_path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key != current:
                    if current is not None and (wanted is None or current in wanted):
                        yield current, TarSample.of(tar_path.name, current, members, exts).members
                        if wanted is not None:
                            wanted.discard(current)
                    current, members = key, {}
                if ext in exts and (wanted is None or key in wanted) and member.isfile():
                    members[ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise ShardError(f"{tar_path}: not a readable tar: {e}") from e
    except FileNotFoundError as e:
        raise ShardError(f"shard not found: {tar_path}") from e
    if current is not None and (wanted is None or current in wanted):
        yield current, TarSample.of(tar_path.name, current, members, exts).members
        if wanted is not None:
            wanted.discard(current)
    if wanted:
        raise ShardError(f"{tar_path.name}: sample(s) {sorted(wanted)} not found")


def read_shard(path: str | Path) -> Iterator[Sample]:
    """Yield the samples of one shard, decoded and validated, in written order."""
    path = storage.path(path)
    for key, members in iter_members(path):
        yield TarSample(path.name, key, members).decode()


def iter_samples(tar_path: str | Path, keys: Iterable[str]) -> Iterator[tuple[str, Sample]]:
    """Yield ``(key, sample)`` for the given keys in shard order, decoding one sample at a time."""
    tar_path = storage.path(tar_path)
    for key, members in iter_members(tar_path, keys):
        yield key, TarSample(tar_path.name, key, members).decode()


def read_samples(tar_path: str | Path, keys: Iterable[str]) -> dict[str, Sample]:
    """Decode only the samples with the given keys from one shard."""
    return dict(iter_samples(tar_path, keys))


def iter_shard_records(tar_path: str | Path) -> Iterator[Record]:
    """The records of one shard (its ``.json`` members only), validated, in written order."""
    tar_path = storage.path(tar_path)
    for key, members in iter_members(tar_path, exts=("json",)):
        yield TarSample(tar_path.name, key, members).record()
