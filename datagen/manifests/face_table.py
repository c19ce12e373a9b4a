"""The run's face tables: every embedded face of a shard, with its embedding, in one Parquet file.

    manifests/<run>/faces/<shard>.parquet     face, key, n, segment_id, size, score, embedding

Written by the build's driver, atomically, *before* the shard's manifest entry (so a shard whose
entry exists has its face table; resume redoes a shard whose table is missing), from the rows the
write task returns. ``face`` is ``"<key>/<n>"`` (:func:`datagen.record.identity_faces.face_id`),
``n`` the face's place in the record's ``identity_faces``; faces that were not embedded are in the
record (with the reason), not here. :func:`read_faces` loads a whole run's faces in shard order, as
one ``N x d`` float32 matrix: what ``subject-ffhq identities`` clusters, without opening a tar.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datagen import storage
from datagen.files import write_parquet_atomic
from datagen.record.identity_faces import face_id

FACES_DIR = "faces"
COLUMNS = ("face", "key", "n", "segment_id", "size", "score")


class FaceTableError(ValueError):
    """A run has no usable face tables; the message says what to re-run."""


def face_table_path(run_dir: str | Path, shard_name: str) -> Path:
    """A shard's face table (a path, or a URL's path object on a bucket)."""
    return storage.path(run_dir) / FACES_DIR / f"{shard_name}.parquet"


def face_rows(key: str, faces: Sequence[Any]) -> list[dict[str, Any]]:
    """The face-table rows of one sample: its embedded faces (``IdentityFace``), numbered as in its record."""
    return [{"face": face_id(key, n), "key": key, "n": n, "segment_id": f.segment_id, "size": int(f.size),
             "score": float(f.score), "embedding": np.asarray(f.embedding, np.float32)}
            for n, f in enumerate(faces) if f.embedding is not None]


def write_face_table(run_dir: str | Path, shard_name: str, rows: Sequence[dict[str, Any]]) -> Path:
    """One shard's face table, atomically (an empty shard gets an empty table)."""
    columns: dict[str, Any] = {c: [r[c] for r in rows] for c in COLUMNS}
    schema = pa.schema([("face", pa.string()), ("key", pa.string()), ("n", pa.int32()), ("segment_id", pa.int32()),
                        ("size", pa.int32()), ("score", pa.float32()), ("embedding", pa.list_(pa.float32()))])
    columns["embedding"] = [r["embedding"].tolist() for r in rows]
    return write_parquet_atomic(face_table_path(run_dir, shard_name), pa.table(columns, schema=schema))


def read_faces(run_dir: str | Path, shard_names: Sequence[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """Every face of the run (``shard_names``' tables, default all, in name order): the table without
    its embeddings, and the ``N x d`` float32 embeddings in the same order."""
    folder = Path(run_dir) / FACES_DIR
    paths = [face_table_path(run_dir, n) for n in shard_names] if shard_names is not None \
        else sorted(folder.glob("*.parquet"))
    missing = [p.name for p in paths if not p.is_file()]
    if not paths or missing:
        raise FaceTableError(
            f"{run_dir}: no face embeddings ({'missing: ' + ', '.join(missing[:3]) if missing else 'no ' + str(folder)}); "
            "the run was built before the identity stage (schema 1.1 records) or with it failing. Re-run "
            "`subject-ffhq build` with this version (a new --run-name and --out) so every face is embedded.")
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    embeddings = table.column("embedding").combine_chunks()
    n = len(table)
    matrix = embeddings.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    dim = matrix.size // n if n else 0
    if n and matrix.size != n * dim:
        raise FaceTableError(f"{run_dir}: face embeddings of different lengths; the face tables mix two embedders")
    return table.drop_columns(["embedding"]), matrix.reshape(n, dim)
