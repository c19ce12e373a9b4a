"""The run's face tables: every embedded face of a shard, with its embedding, in one Parquet file.

    manifests/<run>/faces/<shard>.parquet     face, key, n, segment_id, size, score, embedding

Written by the build's driver, atomically, *before* the shard's manifest entry (so a shard whose
entry exists has its face table; resume redoes a shard whose table is missing), from the rows the
write task returns. ``face`` is ``"<key>/<n>"`` (:func:`datagen.record.identity_faces.face_id`),
``n`` the face's place in the record's ``identity_faces``; faces that were not embedded are in the
record (with the reason), not here. :func:`read_faces` loads a whole run's faces in shard order, as
one ``N x d`` float32 matrix: what ``subject-ffhq identities`` clusters, without opening a tar;
:func:`iter_faces` streams them in bounded batches (the evaluation's leak check,
:mod:`datagen.identity.search`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datagen import storage
from datagen.files import write_parquet_atomic
from datagen.manifests.tables import read_table
from datagen.stages.identity import FACES_DIR, IdentityStep, face_table_schema

COLUMNS = ("face", "key", "n", "segment_id", "size", "score")


class FaceTableError(ValueError):
    """A run has no usable face tables; the message says what to re-run."""


def shard_table_path(run_dir: str | Path, folder: str, shard_name: str) -> Path:
    """A shard's table of a stage (``Step.shard_table``; a URL's path object on a bucket)."""
    return storage.path(run_dir) / folder / f"{shard_name}.parquet"


def write_shard_table(run_dir: str | Path, folder: str, shard_name: str, rows: Sequence[dict[str, Any]],
                      schema: pa.Schema) -> Path:
    """One shard's table of a stage's rows, atomically (an empty shard gets an empty table)."""
    table = pa.table({name: [r[name] for r in rows] for name in schema.names}, schema=schema)
    return write_parquet_atomic(shard_table_path(run_dir, folder, shard_name), table)


def face_table_path(run_dir: str | Path, shard_name: str) -> Path:
    return shard_table_path(run_dir, FACES_DIR, shard_name)


def face_rows(key: str, faces: Sequence[Any]) -> list[dict[str, Any]]:
    """The face-table rows of one sample (the identity stage's)."""
    return IdentityStep.shard_rows(key, faces)


def write_face_table(run_dir: str | Path, shard_name: str, rows: Sequence[dict[str, Any]]) -> Path:
    """One shard's face table (what the job writes for the identity stage)."""
    return write_shard_table(run_dir, FACES_DIR, shard_name, rows, face_table_schema())


def face_table_paths(run_dir: str | Path, shard_names: Sequence[str] | None = None) -> list[Path]:
    """The run's face tables (``shard_names``' tables, default all, in name order; local or on a
    bucket); :class:`FaceTableError` saying what to re-run when there are none or some are missing."""
    folder = storage.path(run_dir) / FACES_DIR
    paths = [face_table_path(run_dir, n) for n in shard_names] if shard_names is not None \
        else sorted(folder.glob("*.parquet"), key=lambda p: p.name)
    missing = [p.name for p in paths if not p.is_file()]
    if not paths or missing:
        raise FaceTableError(
            f"{run_dir}: no face embeddings ({'missing: ' + ', '.join(missing[:3]) if missing else 'no ' + str(folder)}); "
            "the run was built before the identity stage (schema 1.1 records) or with it failing. Re-run "
            "`subject-ffhq build` with this version (a new --run-name and --out) so every face is embedded.")
    return paths


def count_faces(run_dir: str | Path) -> int:
    """How many embedded faces the run's face tables hold, from their Parquet footers (the
    embeddings are not read): what sizes the identity step's memory."""
    total = 0
    for path in face_table_paths(run_dir):
        with path.open("rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def embedding_matrix(run_dir: str | Path, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A face table's ``embedding`` column as an ``N x d`` float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if column.null_count:
        raise FaceTableError(f"{run_dir}: {column.null_count} face(s) without an embedding; re-run the build's identity stage")
    lengths = sorted(pc.unique(pc.list_value_length(column)).to_pylist()) if n else [0]
    if len(lengths) > 1:
        raise FaceTableError(f"{run_dir}: face embeddings of different lengths ({', '.join(map(str, lengths))}); "
                             "the face tables mix two embedders")
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return matrix.reshape(n, lengths[0])


def read_faces(run_dir: str | Path, shard_names: Sequence[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """Every face of the run (``shard_names``' tables, default all, in name order): the table without
    its embeddings, and the ``N x d`` float32 embeddings in the same order."""
    table = pa.concat_tables([read_table(p) for p in face_table_paths(run_dir, shard_names)])
    return table.drop_columns(["embedding"]), embedding_matrix(run_dir, table.column("embedding"))


def iter_faces(run_dir: str | Path, rows: int = 65_536, columns: Sequence[str] = ("face", "key")
               ) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """The run's faces in batches of at most ``rows`` (in :func:`read_faces`' order): each batch's
    ``columns`` and its ``rows x d`` embeddings. Memory stays at one batch, whatever the run's size."""
    for path in face_table_paths(run_dir):
        with path.open("rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=[*columns, "embedding"]):
                yield batch.drop_columns(["embedding"]), embedding_matrix(run_dir, batch.column("embedding"))
