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
import pyarrow.compute as pc
from PIL import Image

from datagen import storage
from datagen.files import write_parquet_atomic
from datagen.identity.pairs import PAIRS_TABLE
from datagen.manifests.tables import SAMPLES_TABLE, read_table
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
    """``({(key, segment_id): (identity, face)} of the crops to store, in rank order, [(key, segment_id,
    identity)] of the targets they serve)``: references in a person segment only, nearest first, one per
    photo before a second of the same photo, ``per_identity`` per identity. The pairs are reduced in
    Arrow (one row per identity and reference segment, its nearest pair) before any Python object."""
    pairs = pairs.filter(pc.is_valid(pairs.column("reference_segment_id")))
    faces = pa.array(list(identity_of), pa.string())
    ids = np.fromiter(identity_of.values(), np.int64, len(identity_of))
    at = pc.index_in(pairs.column("face"), value_set=faces)
    if at.null_count:
        raise ValueError(f"{PAIRS_TABLE} names faces identities.parquet does not hold; re-run `subject-ffhq identities`")
    t = pa.table({"identity": ids[at.to_numpy()], "rkey": pairs.column("reference_key"),
                  "rsid": pairs.column("reference_segment_id"), "distance": pairs.column("distance"),
                  "reference": pairs.column("reference"), "row": np.arange(pairs.num_rows),
                  "key": pairs.column("key"), "sid": pairs.column("segment_id")})
    kept = _ranked_references(t, per_identity)
    rows = list(zip(*(kept.column(c).to_pylist() for c in ("identity", "rkey", "rsid", "reference")), strict=True))
    crops = {(key, int(sid)): (identity, face) for identity, key, sid, face in rows}
    keys_of: dict[int, set[str]] = {}
    for identity, key, _, _ in rows:  # per identity, even where a segment is another identity's crop too
        keys_of.setdefault(identity, set()).add(key)
    wanted = t.filter(pc.is_valid(t.column("sid"))).group_by(["key", "sid"], use_threads=False).aggregate(
        [("identity", "last")])  # a segment holding two identities' faces: its last pair's, as the rows come
    targets = [(key, int(sid), identity) for key, sid, identity in sorted(zip(
        *(wanted.column(c).to_pylist() for c in ("key", "sid", "identity_last")), strict=True))
        if keys_of.get(identity, set()) - {key}]
    return crops, targets


def _ranked_references(t: pa.Table, per_identity: int) -> pa.Table:
    """Per identity, its reference segments' nearest pairs ranked (distance, key, segment), the first of
    each photo before the rest, the first ``per_identity`` kept."""
    t = t.sort_by([("identity", "ascending"), ("rkey", "ascending"), ("rsid", "ascending"),
                   ("distance", "ascending"), ("row", "ascending")])
    ident, rkey, rsid = t.column("identity").to_numpy(), t.column("rkey"), t.column("rsid").to_numpy()
    codes = np.unique(rkey.to_numpy(), return_inverse=True)[1].ravel()
    first = np.ones(len(ident), bool)
    first[1:] = (ident[1:] != ident[:-1]) | (codes[1:] != codes[:-1]) | (rsid[1:] != rsid[:-1])
    t = t.filter(pa.array(first)).sort_by([("identity", "ascending"), ("distance", "ascending"),
                                           ("rkey", "ascending"), ("rsid", "ascending")])
    ident, codes = t.column("identity").to_numpy(), np.unique(t.column("rkey").to_numpy(), return_inverse=True)[1]
    photo = ident.astype(np.int64) * (int(codes.max(initial=0)) + 1) + codes.ravel()
    later = np.ones(len(ident), np.int8)
    later[np.unique(photo, return_index=True)[1]] = 0  # the nearest of each photo
    order = np.lexsort((np.arange(len(ident)), later, ident))
    ident_sorted = ident[order]
    starts = np.searchsorted(ident_sorted, ident_sorted, side="left")
    order = order[np.arange(len(order)) - starts < per_identity]
    return t.take(pa.array(order))


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
    """Write ``references/crops.parquet`` (its crops in :func:`choose_crops`' rank order: per identity,
    nearest first) and ``targets.parquet`` from the run's ``pairs.parquet`` and ``identities.parquet``,
    reading each needed sample once, only from the shards holding one. A shard holding a wanted sample
    that is not in ``shards_dir`` is an error naming it (never a target left without crops)."""
    from datagen.identity.index import identity_of_faces  # read afresh: the step has just rewritten it

    run_dir, shards_dir = storage.path(run_dir), storage.path(shards_dir)
    if not (run_dir / PAIRS_TABLE).is_file():
        raise FileNotFoundError(f"{run_dir}: no {PAIRS_TABLE}; run `subject-ffhq identities RUN` first")
    crops, targets = choose_crops(read_table(run_dir / PAIRS_TABLE), identity_of_faces(run_dir), per_identity)
    segments_of: dict[str, list[int]] = {}
    for key, sid in sorted(crops):
        segments_of.setdefault(key, []).append(sid)
    in_shard = _keys_by_shard(run_dir, set(segments_of))
    missing = sorted(name for name in in_shard if not (shards_dir / f"{name}.tar").is_file())
    if missing:
        raise FileNotFoundError(f"{shards_dir}: no {', '.join(f'{m}.tar' for m in missing[:5])}"
                                f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}, which hold "
                                "reference crops; give the run's shards (--shards-dir)")
    rows: dict[str, list] = {name: [] for name in CROPS_SCHEMA.names}
    for name in sorted(in_shard):
        tar = shards_dir / f"{name}.tar"
        for key, sample in iter_samples(tar, sorted(in_shard[name])):
            bboxes = {s.id: s.bbox for s in sample.record.segments}
            for sid in segments_of[key]:
                if sid not in bboxes:
                    raise ValueError(f"{tar.name}: sample {key} has no segment {sid}, which pairs.parquet names")
                jpg, png, w, h = encode_crop(sample.image, sample.segment_map, sid, bboxes[sid], side)
                identity, face = crops[(key, sid)]
                for column, value in zip(CROPS_SCHEMA.names, (identity, face, key, sid, w, h, jpg, png), strict=True):
                    rows[column].append(value)
    rank = {ref: n for n, ref in enumerate(crops)}
    order = sorted(range(len(rows["face"])), key=lambda i: rank[(rows["key"][i], rows["segment_id"][i])])
    folder = run_dir / REFERENCES_DIR
    write_parquet_atomic(folder / CROPS_TABLE, pa.table(rows, schema=CROPS_SCHEMA).take(pa.array(order, pa.int64())))
    write_parquet_atomic(folder / TARGETS_TABLE, pa.table(
        {"key": [t[0] for t in targets], "segment_id": [t[1] for t in targets], "identity": [t[2] for t in targets]},
        schema=TARGETS_SCHEMA))
    n = len(rows["face"])
    size = sum((folder / t).stat().st_size for t in (CROPS_TABLE, TARGETS_TABLE))
    crop_bytes = sum(len(b) for b in rows["jpg"]) + sum(len(b) for b in rows["mask"])
    return ReferenceSetSummary(n, len(set(rows["identity"])), len(targets), size, round(crop_bytes / n, 1) if n else 0.0)


def _keys_by_shard(run_dir: Path, keys: set[str]) -> dict[str, set[str]]:
    """``{shard name: the wanted keys it holds}``, from the run's ``samples.parquet`` (written samples)."""
    samples = read_table(run_dir / SAMPLES_TABLE, columns=["key", "shard_name", "status"])
    samples = samples.filter(pc.and_(pc.equal(samples.column("status"), "written"),
                                     pc.is_in(samples.column("key"), value_set=pa.array(sorted(keys), pa.string()))))
    out: dict[str, set[str]] = {}
    for key, name in zip(samples.column("key").to_pylist(), samples.column("shard_name").to_pylist(), strict=True):
        out.setdefault(name, set()).add(key)
    unplaced = keys - {k for held in out.values() for k in held}
    if unplaced:
        raise ValueError(f"{run_dir}/{SAMPLES_TABLE} lists no written sample {sorted(unplaced)[0]!r} "
                         f"({len(unplaced)} reference sample(s) in no shard); re-run `subject-ffhq identities`")
    return out


def reference_set_path(path: str | Path) -> Path:
    """The reference-set folder a setting names (a path or a bucket URL): the folder itself, or a run
    folder holding ``references/``."""
    path = storage.path(path)
    return path / REFERENCES_DIR if (path / REFERENCES_DIR / CROPS_TABLE).is_file() else path


def check_reference_set(path: str | Path) -> Path:
    """The reference-set folder ``path`` names, its two tables there (not read), or
    :class:`FileNotFoundError` saying what to run."""
    folder = reference_set_path(path)
    if not (folder / CROPS_TABLE).is_file() or not (folder / TARGETS_TABLE).is_file():
        raise FileNotFoundError(f"{path}: no reference set ({REFERENCES_DIR}/{CROPS_TABLE}); "
                                "run `subject-ffhq identities RUN` on the run first")
    return folder


def read_reference_set(path: str | Path) -> tuple[pa.Table, pa.Table]:
    """``(crops, targets)`` of a reference set (its folder, or the run folder holding it)."""
    folder = check_reference_set(path)
    return read_table(folder / CROPS_TABLE), read_table(folder / TARGETS_TABLE)
