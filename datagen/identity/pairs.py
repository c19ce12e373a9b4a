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

from datagen import storage
from datagen.files import write_parquet_atomic

REFERENCES = 8  # references kept per face
POOL = 256  # faces of an identity considered as references (the nearest its centre)
PAIRS_TABLE = "pairs.parquet"


def reference_pairs(identities: pa.Table, embeddings: np.ndarray) -> pa.Table:
    """The pairs table of a run's faces (``identities``: the ``identities.parquet`` rows, in the
    order of ``embeddings``)."""
    ident = identities.column("identity").to_numpy()
    keys = np.asarray(identities.column("key").to_pylist(), dtype=object)
    faces, segs = identities.column("face").to_pylist(), identities.column("segment_id").to_pylist()
    sizes, dist_c = identities.column("size").to_pylist(), identities.column("distance").to_numpy()
    multi = identities.column("identity_photos").to_numpy() >= 2
    order = np.argsort(ident, kind="stable")
    cols: dict[str, list] = {c: [] for c in ("face", "key", "segment_id", "reference", "reference_key",
                                             "reference_segment_id", "distance", "reference_size")}
    for members in np.split(order, np.flatnonzero(np.diff(ident[order])) + 1):
        if len(members) == 0 or not multi[members[0]]:
            continue
        pool = members[np.argsort(dist_c[members], kind="stable")[:POOL]]
        d = np.linalg.norm(embeddings[members][:, None, :] - embeddings[pool][None, :, :], axis=2)
        for row, i in enumerate(members):
            other = keys[pool] != keys[i]
            for j in np.flatnonzero(other)[np.argsort(d[row, other], kind="stable")][:REFERENCES]:
                r = pool[j]
                for name, value in (("face", faces[i]), ("key", keys[i]), ("segment_id", segs[i]),
                                    ("reference", faces[r]), ("reference_key", keys[r]),
                                    ("reference_segment_id", segs[r]), ("distance", float(d[row, j])),
                                    ("reference_size", sizes[r])):
                    cols[name].append(value)
    schema = pa.schema([("face", pa.string()), ("key", pa.string()), ("segment_id", pa.int32()),
                        ("reference", pa.string()), ("reference_key", pa.string()),
                        ("reference_segment_id", pa.int32()), ("distance", pa.float32()),
                        ("reference_size", pa.int32())])
    return pa.table(cols, schema=schema)


def write_pairs(run_dir: str | Path, identities: pa.Table, embeddings: np.ndarray) -> tuple[Path, int]:
    """Write ``pairs.parquet``; return its path and how many faces have a reference."""
    table = reference_pairs(identities, embeddings)
    path = write_parquet_atomic(storage.path(run_dir) / PAIRS_TABLE, table)
    return path, len(set(table.column("face").to_pylist()))
