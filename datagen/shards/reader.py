"""The one shard reader: samples, records or raw members of a shard tar, in written order.

A shard holds, per sample, ``<key>.jpg``, ``<key>.seg.png`` and ``<key>.json`` (see
:mod:`datagen.shards.writer`). Everything that reads a shard outside the training stream (tables,
report, inspect, export, tests) reads it through :func:`iter_members`; the trainer streams shards
with webdataset and decodes members with :func:`decode_segment_map` and :func:`require_members`.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datagen.record.schema import Record, RecordError

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


def require_members(shard_name: str, key: str, members: dict[str, bytes]) -> None:
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise ShardError(f"{shard_name}: sample {key} lacks member(s) {missing}")


def decode_sample(shard_name: str, key: str, members: dict[str, bytes]) -> Sample:
    """Decode one sample from its raw members (``jpg``, ``seg.png``, ``json``) and check them."""
    require_members(shard_name, key, members)
    try:
        record = Record.from_json(members["json"])
        with Image.open(io.BytesIO(members["jpg"])) as im:
            image = im.convert("RGB")
        segment_map = decode_segment_map(members["seg.png"])
    except (ValueError, OSError) as e:
        raise ShardError(f"{shard_name}: sample {key}: {e}") from e
    if image.size != (segment_map.shape[1], segment_map.shape[0]):
        raise ShardError(f"{shard_name}: sample {key}: image and segment map sizes differ")
    return Sample(key=key, image=image, segment_map=segment_map, record=record)


def iter_members(
    tar_path: str | Path, keys: Iterable[str] | None = None, exts: Iterable[str] = MEMBERS
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of the shard, in written order, with the members named
    by ``exts`` (all of them required); only the samples in ``keys`` when given (each must exist)."""
    tar_path = Path(tar_path)
    exts = tuple(exts)
    wanted = None if keys is None else set(keys)
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key != current:
                    if current is not None and (wanted is None or current in wanted):
                        yield current, _complete(tar_path, current, members, exts)
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
        yield current, _complete(tar_path, current, members, exts)
        if wanted is not None:
            wanted.discard(current)
    if wanted:
        raise ShardError(f"{tar_path.name}: sample(s) {sorted(wanted)} not found")


def read_shard(path: str | Path) -> Iterator[Sample]:
    """Yield the samples of one shard, decoded and validated, in written order."""
    path = Path(path)
    for key, members in iter_members(path):
        yield decode_sample(path.name, key, members)


def iter_samples(tar_path: str | Path, keys: Iterable[str]) -> Iterator[tuple[str, Sample]]:
    """Yield ``(key, sample)`` for the given keys in shard order, decoding one sample at a time."""
    tar_path = Path(tar_path)
    for key, members in iter_members(tar_path, keys):
        yield key, decode_sample(tar_path.name, key, members)


def read_samples(tar_path: str | Path, keys: Iterable[str]) -> dict[str, Sample]:
    """Decode only the samples with the given keys from one shard."""
    return dict(iter_samples(tar_path, keys))


def iter_shard_records(tar_path: str | Path) -> Iterator[Record]:
    """The records of one shard (its ``.json`` members only), validated, in written order."""
    tar_path = Path(tar_path)
    for key, members in iter_members(tar_path, exts=("json",)):
        try:
            yield Record.from_json(members["json"])
        except RecordError as e:
            raise ShardError(f"{tar_path.name}: member {key}.json: {e}") from e


def _complete(tar_path: Path, key: str, members: dict[str, bytes], exts: tuple[str, ...]) -> dict[str, bytes]:
    missing = [m for m in exts if m not in members]
    if missing:
        raise ShardError(f"{tar_path.name}: sample {key} lacks member(s) {missing}")
    return members
