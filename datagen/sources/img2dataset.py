"""Reader of an img2dataset collection in its WebDataset output (local or on a bucket).

**Layout** (what ``img2dataset --output_format webdataset`` writes): ``root/NNNNN.tar`` (plus
``NNNNN.parquet`` and ``NNNNN_stats.json``, not read), each tar holding per sample ``<key>.jpg``
(or ``.jpeg``, ``.png``, ``.webp``), ``<key>.json`` (the downloader's metadata: ``url``, ``key``,
sizes, ``sha256``, and any column it was asked to keep, e.g. ``LICENSE``) and, optionally,
``<key>.txt`` (the alt-text). A folder whose top level holds ``*.tar`` files is read as one.

**Plan.** Tars in name order, samples in tar order: ``source_id`` is the running index over that
order, ``key`` the index zero-padded to 5 digits, so shard membership is a pure function of the tars.
An image is read later as one ranged read of its member (``tar_member``: offset and size in the tar),
not by unpacking the tar again.

**Provenance** (record ``provenance``): ``source`` ``img2dataset``, ``source_tar`` (relative to the
root), ``source_key`` (the key inside it), ``path`` (``<tar>/<member>``), ``photo_url`` (the json's
``url``), ``license`` / ``license_url`` (the json's ``license`` or ``LICENSE``, ``license_url``) when
present, ``alt_text`` (the ``.txt``, else the json's ``caption``) beside our own caption.

**Duplicates** by pixel hash: every image is decoded once while its tar is listed (the md5 of its
full-resolution RGB pixels, what :func:`~datagen.sources.images.load_image` computes and then takes
from here). A member that cannot be decoded forms its own group and fails alone at load, with its
reason. **Every sample accounted for**: a key with no image member, a tar that cannot be read to its
end (after the samples read before the damage), a second image member of a key (the first is used)
and a ``.json`` that is not a JSON object (its sample is kept without url, licence and caption) are
listed in ``skipped`` with the reason (the job prints it and writes it into ``run.json``).
"""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from datagen import storage
from datagen.sources.images import pixel_md5_of
from datagen.sources.items import SourceError, SourceItem, assign_duplicates_and_split

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
LIST_THREADS = 8  # tars listed at once (reads and decodes overlap)


def has_tars(root: Any) -> bool:
    """Whether the folder ``root`` holds ``*.tar`` files at its top level (an img2dataset output)."""
    return any(p.name.endswith(".tar") for p in root.iterdir())


class Img2DatasetSource:
    """Reader of img2dataset's WebDataset output (the module docstring)."""

    name = "img2dataset"

    def __init__(self, root: str | os.PathLike, test_size: int | None = None):
        self.root = storage.path(root)
        self.test_size = test_size
        self._items: list[SourceItem] | None = None
        self.skipped: list[dict[str, str]] = []  # {"path", "reason"}, once listed

    def items(self) -> list[SourceItem]:
        if self._items is None:
            tars = sorted((p for p in self.root.iterdir() if p.name.endswith(".tar")), key=lambda p: p.name)
            with ThreadPoolExecutor(LIST_THREADS) as pool:
                listed = list(pool.map(list_tar, tars))
            samples, self.skipped = [], []
            for tar_samples, tar_skipped in listed:
                samples += tar_samples
                self.skipped += tar_skipped
            if not samples:
                raise SourceError(f"{storage.text(self.root)}: no image samples in {len(tars)} tar(s) "
                                  f"(looked for <key>.{'|.'.join(IMAGE_MEMBERS)})")
            items = [self._item(i, tar, s) for i, (tar, s) in enumerate(samples)]
            self._items = assign_duplicates_and_split(items, self.test_size)
        return list(self._items)

    def _item(self, index: int, tar: str, s: dict[str, Any]) -> SourceItem:
        meta = s["json"]
        licence = meta.get("license", meta.get("LICENSE"))
        alt = s.get("txt")
        if alt is None and isinstance(meta.get("caption"), str):
            alt = meta["caption"]
        info = {
            "source": self.name, "index": index, "license": _text(licence), "license_url": _text(meta.get("license_url")),
            "author": _text(meta.get("author")), "photo_url": _text(meta.get("url")), "photo_title": None,
            "face_rect": None, "pixel_md5": s["pixel_md5"], "file_md5": None, "file_size": s["size"],
            "tar_member": [s["offset"], s["size"]], "source_tar": tar, "source_key": s["key"], "alt_text": alt,
        }
        return SourceItem(
            source_id=str(index), key=f"{index:05d}", path=s["tar_path"], rel_path=f"{tar}/{s['member']}",
            group=s["pixel_md5"] or f"unreadable:{tar}/{s['member']}", split="train", duplicate_of=None, meta=info,
        )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def list_tar(tar_path: Any) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, str]]]:
    """``([(tar name, sample)], skipped)`` of one tar, samples in tar order, each with its image
    member's name, offset and size, pixel md5 (None: undecodable), json and alt-text."""
    name, location = tar_path.name, storage.text(tar_path)
    by_key: dict[str, dict[str, Any]] = {}
    skipped: list[dict[str, str]] = []
    try:
        with tar_path.open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = os.path.basename(member.name).partition(".")
                sample = by_key.setdefault(key, {"key": key, "tar_path": location, "json": {}})
                problem = _read_member(tar, member, ext.lower(), sample, f"{location}:{member.name}")
                if problem:
                    skipped.append({"path": f"{name}/{member.name}", "reason": problem})
    except (tarfile.TarError, OSError) as e:
        skipped.append({"path": name, "reason": f"tar unreadable after {len(by_key)} sample(s): {e}"})
    samples = []
    for key, sample in by_key.items():
        if "member" not in sample:
            skipped.append({"path": f"{name}/{key}", "reason": f"no image member ({', '.join(IMAGE_MEMBERS)})"})
        else:
            samples.append((name, sample))
    return samples, skipped


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, sample: dict[str, Any],
                 where: str) -> str | None:
    """Take what one member gives its sample: the image's place and pixel md5, the json, the alt-text.
    Returns why a member was passed over (a second image, an unreadable json), else None."""
    if ext in IMAGE_MEMBERS and "member" in sample:
        return f"a second image of sample {sample['key']!r}; the first, {sample['member']}, is used"
    if ext in IMAGE_MEMBERS:
        data = tar.extractfile(member).read()
        sample.update(member=member.name, offset=member.offset_data, size=member.size)
        try:
            sample["pixel_md5"] = pixel_md5_of(data, where)
        except Exception:  # noqa: BLE001 -- an undecodable image fails alone at load, with its reason
            sample["pixel_md5"] = None
    elif ext == "json":
        try:
            meta = json.loads(tar.extractfile(member).read())
        except ValueError as e:
            meta = e
        if not isinstance(meta, dict):
            return (f"metadata is not a JSON object ({meta}); sample {sample['key']!r} is kept without its url, "
                    "licence and caption")
        sample["json"] = meta
    elif ext == "txt":
        sample["txt"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    return None
