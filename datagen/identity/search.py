"""Which of a run's faces lie close to a few query faces: the face tables streamed in batches, exact.

    hits = faces_within(run_dir, queries, groups, threshold)     # FaceHits: every face closer than threshold

``queries`` (``Q x d``, in the run's embedding space: the run's embedder, raw vectors as the build
stores them) belong to ``groups`` (one number per query, ``0 .. G - 1``: e.g. the photos of one
evaluation subject); a face's distance to a group is its euclidean distance to the group's nearest
query, and a face is a hit of a group when that distance is under ``threshold`` (the clustering's
rule: same identity below the threshold).

Every face is compared with every query: ``Q`` is small (tens of reference photos), so one exact
pass costs ``N x Q x d`` multiply-adds, one matrix product per batch of ``rows`` faces read from the
face tables (:func:`datagen.manifests.face_table.iter_faces`). Memory stays at one batch (``rows x d``
floats and ``rows x Q`` distances) whatever ``N``; only the hits are kept. Measured by
``bench/bench_index_leak.py`` (1M synthetic faces x 128 floats, docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from datagen.manifests.face_table import FaceTableError, iter_faces

ROWS = 65_536  # faces per batch: 32 MiB of 128-d float32 embeddings


@dataclass
class FaceHits:
    """The faces closer than the threshold to a group, and each group's nearest face."""

    faces: int  # faces compared
    nearest: np.ndarray  # (G,) float32: each group's smallest distance (inf: the run has no face)
    group: np.ndarray  # (H,) int64: per hit, its group
    face: list[str]  # per hit, the face id ``"<key>/<n>"``
    key: list[str]  # per hit, the sample key
    distance: np.ndarray  # (H,) float32: per hit, the distance to its group


def faces_within(run_dir: str | Path, queries: np.ndarray, groups: np.ndarray, threshold: float,
                 rows: int = ROWS) -> FaceHits:
    """Every face of the run under ``threshold`` from a group's nearest query (module doc)."""
    q = np.ascontiguousarray(queries, np.float32)
    groups = np.asarray(groups, np.int64)
    if q.ndim != 2 or len(q) != len(groups) or not len(q):
        raise ValueError(f"faces_within: {q.shape} queries and {len(groups)} groups; they must pair up")
    count = int(groups.max()) + 1
    order = np.argsort(groups, kind="stable")
    q, ordered = q[order], groups[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    present = ordered[starts]  # the groups that have queries, in order: column j of a batch's per-group distances
    q_norms = np.einsum("ij,ij->i", q, q)
    nearest = np.full(count, np.inf, np.float32)
    parts: list[tuple[np.ndarray, list[str], list[str], np.ndarray]] = []
    faces = 0
    for batch, x in iter_faces(run_dir, rows):
        if not len(x):
            continue
        if x.shape[1] != q.shape[1]:
            raise FaceTableError(f"{run_dir}: its faces are {x.shape[1]}-d, the queries {q.shape[1]}-d; "
                                 "embed the queries with the run's own embedder (run.json's identity.embedder)")
        sq = np.einsum("ij,ij->i", x, x)[:, None] + q_norms[None, :] - 2.0 * (x @ q.T)  # faces x queries
        per_group = np.minimum.reduceat(sq, starts, axis=1)  # faces x groups: the nearest query of each group
        nearest[present] = np.minimum(nearest[present], per_group.min(axis=0))
        r, c = np.nonzero(per_group < threshold * threshold)
        if len(r):
            take = pa.array(r)
            parts.append((present[c], batch.column("face").take(take).to_pylist(),
                          batch.column("key").take(take).to_pylist(), per_group[r, c]))
        faces += len(x)
    distance = np.sqrt(np.maximum(np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.float32), 0))
    finite = np.isfinite(nearest)
    nearest[finite] = np.sqrt(np.maximum(nearest[finite], 0))
    return FaceHits(faces, nearest,
                    np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64),
                    [f for p in parts for f in p[1]], [k for p in parts for k in p[2]], distance.astype(np.float32))
