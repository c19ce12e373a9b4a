"""Cross-image reference pairs: for every embedded face whose identity is in another photo too, its
candidate references, written beside the run as ``pairs.parquet``.

One row per (face, reference): ``face``, ``key``, ``segment_id`` (the target's person segment, null
when none), ``reference`` (a face of the same identity in *another* photo), ``reference_key``,
``reference_segment_id``, ``distance`` (euclidean, between the two embeddings; smaller = more alike),
``reference_size`` (px). At most ``REFERENCES`` per face, the nearest first; an identity's candidate
pool is bounded to its ``POOL`` faces nearest its centre, so a huge (merged) identity costs
``faces x POOL``, never ``faces^2``. A face with no row has no cross-image reference: a trainer
falls back to its own crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datagen import storage
from datagen.files import write_parquet_atomic

REFERENCES = 8  # references kept per face
POOL = 256  # faces of an identity considered as references (the nearest its centre)
PAIRS_TABLE = "pairs.parquet"


PAIRS_SCHEMA = pa.schema([("face", pa.string()), ("key", pa.string()), ("segment_id", pa.int32()),
                          ("reference", pa.string()), ("reference_key", pa.string()),
                          ("reference_segment_id", pa.int32()), ("distance", pa.float32()),
                          ("reference_size", pa.int32())])
BLOCK = 1024  # an identity's faces whose distances to its pool are held at once (BLOCK x POOL floats)


def reference_pairs(identities: pa.Table, embeddings: np.ndarray, block: int = BLOCK) -> pa.Table:
    """The pairs table of a run's faces (``identities``: the ``identities.parquet`` rows, in the
    order of ``embeddings``)."""
    ident = identities.column("identity").to_numpy()
    codes = np.unique(identities.column("key").to_numpy(), return_inverse=True)[1].ravel()  # photo -> int
    dist_c = identities.column("distance").to_numpy()
    multi = identities.column("identity_photos").to_numpy() >= 2
    order = np.argsort(ident, kind="stable")
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (face rows, reference rows, distances)
    for members in np.split(order, np.flatnonzero(np.diff(ident[order])) + 1):
        if len(members) == 0 or not multi[members[0]]:
            continue
        pool = members[np.argsort(dist_c[members], kind="stable")[:POOL]]
        for start in range(0, len(members), block):
            found.append(_nearest_in_pool(members[start:start + block], pool, embeddings, codes))
    face_rows, ref_rows, distance = ((np.concatenate([f[n] for f in found]) if found else np.zeros(0, dtype))
                                     for n, dtype in enumerate((np.int64, np.int64, np.float32)))
    faces, refs = identities.take(pa.array(face_rows)), identities.take(pa.array(ref_rows))
    return pa.table([faces.column("face"), faces.column("key"), faces.column("segment_id"), refs.column("face"),
                     refs.column("key"), refs.column("segment_id"), pa.array(distance, pa.float32()),
                     refs.column("size")], names=PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA)


def _nearest_in_pool(rows: np.ndarray, pool: np.ndarray, embeddings: np.ndarray, codes: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each face of ``rows``: its at most ``REFERENCES`` nearest ``pool`` faces of another photo, nearest
    first, as (face rows, reference rows, distances). Candidates come from ``|a|^2 + |b|^2 - 2ab`` in
    float64 (``len(rows) x len(pool)`` floats at once); the best ``2 x REFERENCES`` of them are then
    measured directly (``|a - b|`` in the embeddings' dtype) and ranked by that, ties in pool order."""
    a, b = embeddings[rows].astype(np.float64), embeddings[pool].astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    d2[codes[rows][:, None] == codes[pool][None, :]] = np.inf  # the same photo: never a reference
    cand = np.argsort(d2, axis=1, kind="stable")[:, :2 * REFERENCES]
    other = np.isfinite(np.take_along_axis(d2, cand, axis=1))
    dist = np.linalg.norm(embeddings[rows][:, None, :] - embeddings[pool[cand]], axis=2)
    dist[~other] = np.inf
    best = np.lexsort((cand, dist), axis=1)[:, :REFERENCES]
    keep = np.take_along_axis(other, best, axis=1)
    refs = pool[np.take_along_axis(cand, best, axis=1)[keep]]
    return np.repeat(rows, keep.sum(1)), refs, np.take_along_axis(dist, best, axis=1)[keep].astype(np.float32)


def write_pairs(run_dir: str | Path, identities: pa.Table, embeddings: np.ndarray) -> tuple[Path, int]:
    """Write ``pairs.parquet``; return its path and how many faces have a reference."""
    table = reference_pairs(identities, embeddings)
    path = write_parquet_atomic(storage.path(run_dir) / PAIRS_TABLE, table)
    return path, len(pc.unique(table.column("face")))
