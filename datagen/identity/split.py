"""The identity-safe split: no identity, and no exact duplicate, on both sides of train/test.

The build's split (:mod:`datagen.sources.items`) keeps exact duplicates together; it cannot know
that two different photos show one person. Here photos are joined when they share an identity (of
``identities.parquet``) and each joined group goes whole to the side most of its photos were on
(ties: train, so the reserve never grows by a tie). Duplicates are not written to the shards (their
first copy is), so they cannot straddle either. Written beside the run as ``split.parquet``: ``key``,
``split`` (the identity-safe side), ``build_split`` (the record's), ``moved``, ``group`` (the
smallest key of its joined group). :func:`read_split` is what the exports and the trainer read
(``--split-file``); it overrides the records' ``split``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datagen import storage
from datagen.files import write_parquet_atomic
from datagen.manifests.tables import SAMPLES_TABLE, read_table

SPLIT_TABLE = "split.parquet"


def written_splits(run_dir: Path) -> dict[str, str]:
    """``{key: split}`` of the run's written samples (its ``samples.parquet``)."""
    path = storage.path(run_dir) / SAMPLES_TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {SAMPLES_TABLE}; the build did not finish writing its tables")
    t = read_table(path, columns=["key", "split", "status"])
    return {k: s for k, s, st in zip(*(t.column(c).to_pylist() for c in ("key", "split", "status")), strict=True)
            if st == "written"}


def joined_groups(keys: list[str], faces: pa.Table) -> dict[str, str]:
    """``{key: group}``: photos sharing an identity are one group (named by its smallest key)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = {k: i for i, k in enumerate(sorted(keys))}
    photo = np.array([index.get(k, -1) for k in faces.column("key").to_pylist()], np.int64)
    identity = np.asarray(faces.column("identity").to_numpy(), np.int64)
    keep = photo >= 0
    n, m = len(index), int(identity.max()) + 1 if len(identity) else 0
    graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (photo[keep], n + identity[keep])), shape=(n + m, n + m))
    labels = connected_components(graph, directed=False)[1][:n]
    first: dict[int, str] = {}
    ordered = sorted(index)
    for k in ordered:
        first.setdefault(int(labels[index[k]]), k)
    return {k: first[int(labels[index[k]])] for k in ordered}


def identity_safe_split(run_dir: Path, faces: pa.Table) -> dict[str, Any]:
    """Write ``split.parquet``; return what moved: images and identities, each way."""
    build = written_splits(run_dir)
    group = joined_groups(list(build), faces)
    members: dict[str, list[str]] = {}
    for k, g in group.items():
        members.setdefault(g, []).append(k)
    side = {}
    for g, keys in members.items():
        tests = sum(build[k] == "test" for k in keys)
        side[g] = "test" if tests * 2 > len(keys) else "train"
    keys = sorted(build)
    new = [side[group[k]] for k in keys]
    moved = [build[k] != s for k, s in zip(keys, new, strict=True)]
    table = pa.table({"key": keys, "split": new, "build_split": [build[k] for k in keys], "moved": moved,
                      "group": [group[k] for k in keys]})
    write_parquet_atomic(storage.path(run_dir) / SPLIT_TABLE, table)
    moved_keys = {k for k, m in zip(keys, moved, strict=True) if m}
    face_keys, ids = faces.column("key").to_pylist(), faces.column("identity").to_pylist()
    return {
        "images_moved": len(moved_keys),
        "to_train": sum(1 for k in moved_keys if build[k] == "test"),
        "to_test": sum(1 for k in moved_keys if build[k] == "train"),
        "identities_moved": len({i for k, i in zip(face_keys, ids, strict=True) if k in moved_keys}),
        "test_images": new.count("test"),
        "train_images": new.count("train"),
    }


def split_file_path(path: str | Path | None) -> str | None:
    """The split file a ``--split-file`` names: the file, or a run folder's ``split.parquet``."""
    if path is None:
        return None
    where = storage.path(path)  # a local path, or a bucket URL beside a bucket run
    return str(where / SPLIT_TABLE) if where.is_dir() else str(where)


@functools.cache
def cached_split(path: str) -> dict[str, str]:
    """:func:`read_split`, once per process (the exports' shard walk and the trainer's loader ask per sample)."""
    return read_split(path)


def read_split(path: str | Path, keys: list[str] | None = None) -> dict[str, str]:
    """``{key: split}`` of a ``split.parquet`` (a run folder holding one is accepted too; local or on a
    bucket); ``keys``: only those (read with a filter)."""
    path = storage.path(split_file_path(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no identity-safe split; run `subject-ffhq identities RUN` first")
    if keys is not None and not keys:
        return {}
    filters = None if keys is None else [("key", "in", sorted(set(keys)))]
    with path.open("rb") as f:
        t = pq.read_table(f, columns=["key", "split"], filters=filters)
    return dict(zip(t.column("key").to_pylist(), t.column("split").to_pylist(), strict=True))
