"""A run's identity index: every embedded face of a finished run, clustered into identities.

    summary = build_identities(run_dir)          # writes manifests/<run>/identities.parquet and split.parquet

``identities.parquet``, one row per embedded face (in the face tables' order: shard, then sample,
then face): ``face`` (``"<key>/<n>"``), ``key``, ``n``, ``segment_id`` (the person segment holding it,
null when none), ``size`` (px), ``identity`` (``0 .. identities - 1``, numbered by first face, so the
same run gives the same ids), ``distance`` (to the identity's centre), ``identity_faces`` (faces in
the identity) and ``identity_photos`` (distinct photos it spans). The embedder and threshold are the
run's ``identity`` section (``run.json``), the threshold defaulting per embedder
(:data:`datagen.stages.identity.DEFAULT_THRESHOLDS`); ``threshold`` overrides it.

``split.parquet`` is the identity-safe split (:mod:`datagen.identity.split`) and ``pairs.parquet``
the cross-image reference pairs (:mod:`datagen.identity.pairs`), written beside it.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datagen import storage
from datagen.config import IdentitySettings
from datagen.files import write_json_atomic, write_parquet_atomic
from datagen.identity.cluster import centre_distances, cluster_faces
from datagen.manifests.face_table import read_faces
from datagen.manifests.run_manifest import RunFolderError, load_run_manifest
from datagen.manifests.tables import SAMPLES_TABLE

IDENTITIES_TABLE = "identities.parquet"
IDENTITIES_SUMMARY = "identities.json"


@dataclass
class IdentitySummary:
    embedder: str
    threshold: float
    faces: int
    identities: int
    photos_per_identity: dict[str, int]  # photos spanned -> identities spanning that many
    largest_photos: int  # the most photos one identity spans
    faces_with_reference: int  # faces with a cross-image reference in pairs.parquet
    seconds: float
    split: dict[str, Any]  # what the identity-safe split moved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_identity_settings(run_dir: str | Path) -> IdentitySettings:
    """The run's ``identity`` section as ``run.json`` recorded it, its missing keys at their defaults
    (:mod:`datagen.config`); a run whose ``run.json`` has no identity section is refused, naming what to
    re-run."""
    section = (load_run_manifest(storage.path(run_dir)).get("config") or {}).get("identity")
    if not section:
        raise RunFolderError(f"{run_dir}: run.json records no identity section: the run was built before the "
                             "identity stage (schema 1.1 records, no face embeddings). Re-run `subject-ffhq build` "
                             "with this version (a new --run-name and --out), then `subject-ffhq identities RUN`")
    return IdentitySettings.from_mapping(section, "run.json identity")


def cluster_run(run_dir: str | Path, threshold: float | None = None) -> tuple[pa.Table, np.ndarray, str, float]:
    """The run's faces with their identities (the ``identities.parquet`` table), their embeddings,
    the embedder and the threshold."""
    from datagen.stages.identity import threshold_of

    settings = run_identity_settings(run_dir)
    embedder = settings.embedder
    if threshold is None:
        threshold = threshold_of(settings)
    faces, embeddings = read_faces(run_dir)
    labels = cluster_faces(embeddings, float(threshold), settings.neighbours)
    keys = np.asarray(faces.column("key").to_pylist(), dtype=object)
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    photos = np.bincount(np.unique(np.stack([labels, _codes(keys)]), axis=1)[0]) if len(labels) else sizes
    table = faces.select(["face", "key", "n", "segment_id", "size"]).append_column(
        "identity", pa.array(labels, pa.int64())).append_column(
        "distance", pa.array(centre_distances(embeddings, labels) if len(labels) else [], pa.float32())).append_column(
        "identity_faces", pa.array(sizes[labels], pa.int32())).append_column(
        "identity_photos", pa.array(photos[labels], pa.int32()))
    return table, embeddings, embedder, float(threshold)


def _codes(values: np.ndarray) -> np.ndarray:
    return np.unique(values, return_inverse=True)[1].astype(np.int64)


def build_identities(run_dir: str | Path, threshold: float | None = None) -> IdentitySummary:
    """Cluster the run's faces, write ``identities.parquet``, the identity-safe ``split.parquet``,
    ``pairs.parquet`` and ``identities.json`` (this summary)."""
    import time

    from datagen.identity.pairs import write_pairs
    from datagen.identity.split import identity_safe_split

    t = time.perf_counter()
    run_dir = storage.path(run_dir)  # a run folder, or one on a bucket
    run_identity_settings(run_dir)  # preconditions checked before anything is written
    if not (run_dir / SAMPLES_TABLE).is_file():
        raise FileNotFoundError(f"{run_dir}: no {SAMPLES_TABLE}; the build did not finish writing its tables")
    table, embeddings, embedder, threshold = cluster_run(run_dir, threshold)
    if (run_dir / IDENTITIES_SUMMARY).is_file():  # written last again: until then the index reads as incomplete
        (run_dir / IDENTITIES_SUMMARY).unlink()
    write_parquet_atomic(run_dir / IDENTITIES_TABLE, table)
    split = identity_safe_split(run_dir, table)
    _, with_reference = write_pairs(run_dir, table, embeddings)
    per_identity = _per_identity(table)
    hist: dict[str, int] = {}
    for photos in per_identity.values():
        hist[str(photos)] = hist.get(str(photos), 0) + 1
    summary = IdentitySummary(embedder, threshold, len(table), len(per_identity),
                              dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                              max(per_identity.values(), default=0), with_reference,
                              round(time.perf_counter() - t, 3), split)
    write_json_atomic(run_dir / IDENTITIES_SUMMARY, summary.to_dict())
    return summary


def _per_identity(table: pa.Table) -> dict[int, int]:
    ids, photos = table.column("identity").to_pylist(), table.column("identity_photos").to_pylist()
    return dict(zip(ids, photos, strict=True))


def read_identities(run_dir: str | Path, columns: list[str] | None = None) -> pa.Table | None:
    """The run's ``identities.parquet`` (``columns`` of it, default all), or ``None`` before
    ``subject-ffhq identities`` ran."""
    path = storage.path(run_dir) / IDENTITIES_TABLE  # a run folder, or one on a bucket (the report reads it)
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return pq.read_table(f, columns=columns)


@dataclass(frozen=True)
class IdentityLookup:
    """A run's identities by face (``"<key>/<n>"``) and by person segment (``(key, segment id)``: the
    identity of the largest face in it), and per sample the person segments holding faces of two
    identities or more (``merged``: the records' ``identity_checks.merged_identities``)."""

    by_face: dict[str, int]
    by_segment: dict[tuple[str, int], int]
    merged: dict[str, list[int]]


@functools.cache
def identity_lookup(run_dir: str) -> IdentityLookup:
    """The run's :class:`IdentityLookup`, once per process (the exports ask per sample); a run without
    an index is refused, naming the command that writes it."""
    table = read_identities(run_dir)
    if table is None:
        raise FileNotFoundError(f"{run_dir}: no {IDENTITIES_TABLE}; run `subject-ffhq identities {run_dir}` first")
    rows = table.select(["face", "key", "segment_id", "size", "identity"]).to_pylist()
    by_segment: dict[tuple[str, int], int] = {}
    for row in sorted((r for r in rows if r["segment_id"] is not None), key=lambda r: r["size"]):
        by_segment[(row["key"], int(row["segment_id"]))] = int(row["identity"])  # the largest face last
    return IdentityLookup({r["face"]: int(r["identity"]) for r in rows}, by_segment, merged_by_key(table))


def merged_by_key(table: pa.Table) -> dict[str, list[int]]:
    """``{key: person segment ids holding faces of two identities or more}``, the samples with any."""
    from datagen.record.identity_faces import merged_segments

    per_key: dict[str, list[tuple[int | None, int]]] = {}
    for key, sid, identity in zip(*(table.column(c).to_pylist() for c in ("key", "segment_id", "identity")), strict=True):
        per_key.setdefault(key, []).append((sid, identity))
    return {key: merged for key, faces in per_key.items() if (merged := merged_segments(faces))}


def identity_of_faces(run_dir: str | Path) -> dict[str, int]:
    """``{face id: identity}`` of the run (``{}`` before the index exists), read afresh each call (the
    reference set's, just after the step rewrote the index; the exports' per-process cache is
    :func:`identity_lookup`, the evaluation's few faces :func:`identities_of`)."""
    table = read_identities(run_dir, ["face", "identity"])
    if table is None:
        return {}
    return dict(zip(table.column("face").to_pylist(), table.column("identity").to_pylist(), strict=True))


def identities_of(run_dir: str | Path, faces: list[str]) -> dict[str, dict[str, int]]:
    """``{face id: {"identity", "identity_faces", "identity_photos"}}`` for the given faces only (the
    index read with a filter, so a run of a million faces is not loaded whole); a face missing from
    the index (built before the faces were) is left out. ``FileNotFoundError`` before the index exists."""
    path = storage.path(run_dir) / IDENTITIES_TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {IDENTITIES_TABLE}; run `subject-ffhq identities {run_dir}` first")
    if not faces:
        return {}
    columns = ["face", "identity", "identity_faces", "identity_photos"]
    with path.open("rb") as f:
        rows = pq.read_table(f, columns=columns, filters=[("face", "in", sorted(set(faces)))]).to_pylist()
    return {r["face"]: {c: int(r[c]) for c in columns[1:]} for r in rows}
