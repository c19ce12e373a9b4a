"""The compact reference set: the masked subject crops of ``pairs.parquet``'s references, small
enough for a trainer to hold in memory (no random access into the shard tars while it streams).

    summary = write_reference_set(run_dir, shards_dir)   # manifests/<run>/references/{crops,targets}.parquet

``references/crops.parquet``, one row per reference crop: ``identity``, ``face`` (the reference
face, ``"<key>/<n>"``), ``key``, ``segment_id`` (its person segment), ``width``, ``height`` (of the
stored crop), ``jpg`` (the segment's bbox cut from the stored image, its longer side scaled to at most
``CROP_SIDE`` px, JPEG quality ``JPEG_QUALITY``) and ``mask`` (the segment inside that box, a 1-bit
PNG of the same size). The crop keeps its aspect (the trainer's zoom-in needs it) and its background
(the trainer fills what lies outside the mask with noise, as for its own crops). At most
``PER_IDENTITY`` crops per identity: its references nearest their targets, one per photo first, so
an identity in two or more photos always keeps crops from two or more photos.

``references/targets.parquet``, one row per subject with a cross-image crop in the set: ``key``,
``segment_id``, ``identity``. A trainer looks a subject up there and picks a crop of its identity
from another ``key``.

Size (README, "Outputs"): ``crops x (JPEG + mask)``, at most ``PER_IDENTITY x`` the identities
spanning two or more photos, and never more than the run's referenced person segments.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datagen import storage
from datagen.files import write_parquet_atomic
from datagen.identity.pairs import PAIRS_TABLE
from datagen.manifests.face_table import FACES_DIR
from datagen.manifests.tables import read_table
from datagen.shards.reader import iter_samples

REFERENCES_DIR = "references"
CROPS_TABLE = "crops.parquet"
TARGETS_TABLE = "targets.parquet"
CROP_SIDE = 256  # the stored crop's longer side at most, px
PER_IDENTITY = 8  # crops kept per identity
JPEG_QUALITY = 90

CROPS_SCHEMA = pa.schema([("identity", pa.int64()), ("face", pa.string()), ("key", pa.string()),
                          ("segment_id", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
                          ("jpg", pa.binary()), ("mask", pa.binary())])
TARGETS_SCHEMA = pa.schema([("key", pa.string()), ("segment_id", pa.int32()), ("identity", pa.int64())])


@dataclass
class ReferenceSetSummary:
    crops: int
    identities: int
    targets: int  # subjects with a cross-image crop in the set
    bytes: int  # both tables on disk
    bytes_per_crop: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_crops(pairs: pa.Table, identity_of: dict[str, int], per_identity: int = PER_IDENTITY
                 ) -> tuple[dict[tuple[str, int], tuple[int, str]], list[tuple[str, int, int]]]:
    """``({(key, segment_id): (identity, face)} of the crops to store, [(key, segment_id, identity)]
    of the targets they serve)``: references in a person segment only, nearest first, one per photo
    before a second of the same photo, ``per_identity`` per identity."""
    best: dict[int, dict[tuple[str, int], tuple[float, str]]] = {}
    wanted_by: dict[tuple[str, int], int] = {}
    for row in pairs.to_pylist():
        if row["reference_segment_id"] is None:
            continue
        identity = identity_of[row["face"]]
        ref = (row["reference_key"], int(row["reference_segment_id"]))
        seen = best.setdefault(identity, {})
        if ref not in seen or row["distance"] < seen[ref][0]:
            seen[ref] = (row["distance"], row["reference"])
        if row["segment_id"] is not None:
            wanted_by[(row["key"], int(row["segment_id"]))] = identity
    crops: dict[tuple[str, int], tuple[int, str]] = {}
    keys_of: dict[int, set[str]] = {}
    for identity in sorted(best):
        ranked = sorted(best[identity].items(), key=lambda kv: (kv[1][0], kv[0]))
        first_per_photo, photos = [], set()
        for ref, _ in ranked:
            if ref[0] not in photos:
                photos.add(ref[0])
                first_per_photo.append(ref)
        order = first_per_photo + [ref for ref, _ in ranked if ref not in set(first_per_photo)]
        for ref in order[:per_identity]:
            crops[ref] = (identity, best[identity][ref][1])
        keys_of[identity] = {ref[0] for ref in order[:per_identity]}
    targets = [(key, sid, identity) for (key, sid), identity in sorted(wanted_by.items())
               if keys_of.get(identity, set()) - {key}]
    return crops, targets


def encode_crop(image: Image.Image, segment_map: np.ndarray, segment_id: int, bbox: list[int],
                side: int = CROP_SIDE) -> tuple[bytes, bytes, int, int]:
    """``(JPEG, mask PNG, width, height)`` of a segment's bbox, its longer side scaled to at most ``side``."""
    x0, y0, x1, y1 = bbox
    crop = image.convert("RGB").crop((x0, y0, x1, y1))
    mask = Image.fromarray((segment_map[y0:y1, x0:x1] == segment_id).astype(np.uint8) * 255, mode="L")
    f = min(1.0, side / max(crop.size))
    if f < 1:
        size = (max(1, round(crop.width * f)), max(1, round(crop.height * f)))
        crop, mask = crop.resize(size, Image.Resampling.BICUBIC), mask.resize(size, Image.Resampling.NEAREST)
    jpg, png = io.BytesIO(), io.BytesIO()
    crop.save(jpg, format="JPEG", quality=JPEG_QUALITY)
    mask.convert("1").save(png, format="PNG", optimize=True)
    return jpg.getvalue(), png.getvalue(), crop.width, crop.height


def write_reference_set(run_dir: str | Path, shards_dir: str | Path, per_identity: int = PER_IDENTITY,
                        side: int = CROP_SIDE) -> ReferenceSetSummary:
    """Write ``references/crops.parquet`` and ``targets.parquet`` from the run's ``pairs.parquet``
    and ``identities.parquet``, reading each needed sample once, shard by shard."""
    from datagen.identity.index import identity_of_faces

    run_dir, shards_dir = storage.path(run_dir), storage.path(shards_dir)
    if not (run_dir / PAIRS_TABLE).is_file():
        raise FileNotFoundError(f"{run_dir}: no {PAIRS_TABLE}; run `subject-ffhq identities RUN` first")
    tars = sorted(shards_dir.glob("subjects-*.tar"), key=lambda p: p.name)
    if not tars:
        raise FileNotFoundError(f"{shards_dir}: no subjects-*.tar shards to cut the reference crops from")
    crops, targets = choose_crops(read_table(run_dir / PAIRS_TABLE), identity_of_faces(run_dir), per_identity)
    segments_of: dict[str, list[int]] = {}
    for key, sid in sorted(crops):
        segments_of.setdefault(key, []).append(sid)
    rows: dict[str, list] = {name: [] for name in CROPS_SCHEMA.names}
    in_shard = _keys_by_shard(run_dir, set(segments_of))
    for tar in tars:
        for key, sample in iter_samples(tar, sorted(in_shard.get(tar.name.removesuffix(".tar"), ()))):
            bboxes = {s.id: s.bbox for s in sample.record.segments}
            for sid in segments_of[key]:
                if sid not in bboxes:
                    raise ValueError(f"{tar.name}: sample {key} has no segment {sid}, which pairs.parquet names")
                jpg, png, w, h = encode_crop(sample.image, sample.segment_map, sid, bboxes[sid], side)
                identity, face = crops[(key, sid)]
                for name, value in zip(CROPS_SCHEMA.names, (identity, face, key, sid, w, h, jpg, png), strict=True):
                    rows[name].append(value)
    folder = run_dir / REFERENCES_DIR
    write_parquet_atomic(folder / CROPS_TABLE, pa.table(rows, schema=CROPS_SCHEMA))
    write_parquet_atomic(folder / TARGETS_TABLE, pa.table(
        {"key": [t[0] for t in targets], "segment_id": [t[1] for t in targets], "identity": [t[2] for t in targets]},
        schema=TARGETS_SCHEMA))
    n = len(rows["face"])
    size = sum((folder / t).stat().st_size for t in (CROPS_TABLE, TARGETS_TABLE))
    crop_bytes = sum(len(b) for b in rows["jpg"]) + sum(len(b) for b in rows["mask"])
    return ReferenceSetSummary(n, len(set(rows["identity"])), len(targets), size, round(crop_bytes / n, 1) if n else 0.0)


def _keys_by_shard(run_dir: Path, keys: set[str]) -> dict[str, set[str]]:
    """``{shard name: the wanted keys it holds}``, from the run's per-shard face tables."""
    out: dict[str, set[str]] = {}
    for path in sorted((run_dir / FACES_DIR).glob("*.parquet"), key=lambda p: p.name):
        held = keys.intersection(read_table(path, columns=["key"]).column("key").to_pylist())
        if held:
            out[path.stem] = held
    return out


def reference_set_path(path: str | Path) -> Path:
    """The reference-set folder a setting names: the folder itself, or a run folder holding ``references/``."""
    path = Path(path)
    return path / REFERENCES_DIR if (path / REFERENCES_DIR / CROPS_TABLE).is_file() else path


def read_reference_set(path: str | Path) -> tuple[pa.Table, pa.Table]:
    """``(crops, targets)`` of a reference set (its folder, or the run folder holding it)."""
    folder = reference_set_path(path)
    if not (folder / CROPS_TABLE).is_file() or not (folder / TARGETS_TABLE).is_file():
        raise FileNotFoundError(f"{path}: no reference set ({REFERENCES_DIR}/{CROPS_TABLE}); "
                                "run `subject-ffhq identities RUN` on the run first")
    return pq.read_table(folder / CROPS_TABLE), pq.read_table(folder / TARGETS_TABLE)
