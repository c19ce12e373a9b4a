"""The whole identities step of a finished run, as ``subject-ffhq identities`` runs it here or on a Ray
node (``ray_jobs/identities.py``): the index, split, pairs and ``identities.json``
(:func:`datagen.identity.index.build_identities`), then the reference set
(:func:`datagen.identity.references.write_reference_set`), reading and writing through
:mod:`datagen.storage` (a run folder on a disk or a bucket).

    size = step_size(run_dir)                    # faces (Parquet footers only) and the memory to ask for
    result = run_identity_step(run_dir, threshold, shards_dir, references=True)

The memory the step needs grows with the faces: ``bench/bench_identities.py`` (2-core machine, 128-d
dlib embeddings) peaked at 0.5 GB at 100 000 faces and 3.24 GB at 1 000 000, about 3 kB per face.
:func:`step_memory_bytes` asks for :data:`STEP_BASE_BYTES` plus :data:`STEP_BYTES_PER_FACE` and the
embedding (4 bytes per dimension) per face: 3.85 GB at 1M dlib faces, about a fifth above the measured
peak. Measured end to end (:func:`run_identity_step` without the reference set, on
``bench/bench_index_leak.py``'s synthetic face tables, same machine): peak 0.58 GB at 100 000 faces
(26 s; asked 0.63 GB) and 1.04 GB at 300 000 (36 s; asked 1.34 GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datagen import storage
from datagen.identity.index import IdentitySummary, build_identities, run_identity_settings
from datagen.identity.references import ReferenceSetSummary, write_reference_set
from datagen.manifests.face_table import count_faces
from datagen.manifests.run_manifest import load_run_manifest

STEP_BASE_BYTES = 256 * 2**20  # the process before the faces: Python, numpy, pyarrow, faiss
STEP_BYTES_PER_FACE = 3072  # per face besides its embedding: tables, neighbour graph, pairs


def step_memory_bytes(faces: int, dimension: int) -> int:
    """The memory the identities step asks for, for ``faces`` embeddings of ``dimension`` floats."""
    return STEP_BASE_BYTES + faces * (STEP_BYTES_PER_FACE + 4 * dimension)


@dataclass(frozen=True)
class StepSize:
    faces: int
    dimension: int
    memory_bytes: int


def step_size(run_dir: str | Path) -> StepSize:
    """The run's face count (from the face tables' footers, not their embeddings), the embedder's
    dimension (``run.json``'s ``identity.embedder``) and the memory the step asks for."""
    from datagen.stages.identity import DIMENSIONS

    embedder = run_identity_settings(run_dir).embedder
    faces, dimension = count_faces(run_dir), DIMENSIONS[embedder]
    return StepSize(faces, dimension, step_memory_bytes(faces, dimension))


@dataclass
class IdentityStepResult:
    run_dir: str
    identities: IdentitySummary
    references: ReferenceSetSummary | None  # None: not asked for, or no shards to cut them from
    no_references: str | None  # why no reference set was written when one was asked for


def run_identity_step(run_dir: str | Path, threshold: float | None = None, shards_dir: str | None = None,
                      references: bool = True) -> IdentityStepResult:
    """Index, split, pairs and ``identities.json``, then (``references``) the reference set cut from
    ``shards_dir`` (default: the ``shards_dir`` run.json names)."""
    run_dir = storage.path(run_dir)
    summary = build_identities(run_dir, threshold)
    if not references:
        return IdentityStepResult(storage.text(run_dir), summary, None, None)
    shards_dir = shards_dir or load_run_manifest(run_dir).get("shards_dir")
    if not shards_dir:
        return IdentityStepResult(storage.text(run_dir), summary, None,
                                  "run.json names no shards_dir (give --shards-dir)")
    return IdentityStepResult(storage.text(run_dir), summary, write_reference_set(run_dir, shards_dir), None)
