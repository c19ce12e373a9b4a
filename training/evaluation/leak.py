"""Leak check: does an evaluation subject appear in the training data? Two ways, either or both.

The paper's identity numbers assume the evaluation identities are unseen in training.

* **Shards** (``--shards``, :func:`leak_check`): every face MTCNN finds in the shards' images is
  embedded with the evaluation's face embedder and compared with each reference photo's face of each
  subject; a subject is **flagged** when any training face reaches ``threshold`` (cosine). The report
  lists, per flagged subject, the closest training faces (shard, sample key, box, cosine). Works on
  any shards; re-detects every face.
* **The run's identity index** (``--identities RUN``, :func:`index_leak_check`): no tar is opened.
  Each subject's reference photos are embedded with *the run's own embedder* (``run.json``'s
  ``identity`` section: MTCNN's box of the largest face, then the same box embedder, raw vectors as
  the build stored them) and compared with every face of the run's face tables in the run's metric
  (euclidean; a face is the subject when it lies under the distance the index was clustered at,
  ``identities.json``'s ``threshold``, or ``--leak-distance``). Each hit is named with its identity
  (``identities.parquet``: id, faces, photos) and its side of the identity-safe ``split.parquet``: a
  subject is **flagged** only for hits on the train side; hits in the reserve (val/test) are reported,
  not flagged. Without ``split.parquet`` every hit counts as training data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datagen import storage

if TYPE_CHECKING:
    from datagen.config import IdentitySettings

TOP_MATCHES = 10
CLOSEST_PER_IDENTITY = 5  # faces listed per identity a subject hits
RESERVE = "test"  # split.parquet's side that training never sees (the val/test reserve)


def leak_check(shards: list[str | Path], references: dict[str, np.ndarray], detector, embedder, threshold: float,
               batch_size: int = 16, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """``references``: subject -> (photos x D) normalised face embeddings. Returns the JSON-ready result."""
    from datagen.shards.reader import read_shard

    names = list(references)
    best: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    max_sim = {n: None for n in names}
    images = faces_seen = 0

    def flush(batch: list[tuple[str, str, Any]]) -> None:
        nonlocal faces_seen
        found = detector.detect([im for _, _, im in batch])
        flat = [(shard, key, face) for (shard, key, _), per in zip(batch, found, strict=True) for face in per]
        if not flat:
            return
        faces_seen += len(flat)
        vectors = embedder.embed([f for _, _, f in flat])
        for name in names:
            sims = (vectors @ np.asarray(references[name]).T).max(axis=1)
            top = float(sims.max())
            max_sim[name] = top if max_sim[name] is None else max(max_sim[name], top)
            for i in np.flatnonzero(sims >= threshold):
                shard, key, face = flat[i]
                best[name].append({"shard": shard, "key": key, "box": [round(v, 1) for v in face.box],
                                   "similarity": round(float(sims[i]), 4)})
            best[name] = sorted(best[name], key=lambda m: -m["similarity"])[:TOP_MATCHES]

    batch: list[tuple[str, str, Any]] = []
    for shard in shards:
        for sample in read_shard(shard):
            batch.append((storage.path(shard).name, sample.key, sample.image))
            images += 1
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
                if progress:
                    progress(images)
    if batch:
        flush(batch)
        if progress:
            progress(images)
    flagged = [{"subject": n, "max_similarity": round(max_sim[n], 4), "matches": best[n]} for n in names if best[n]]
    return {
        "threshold": threshold,
        "shards": [str(s) for s in shards],
        "images_checked": images,
        "faces_checked": faces_seen,
        "max_similarity": {n: (None if v is None else round(v, 4)) for n, v in max_sim.items()},
        "flagged": flagged,
    }


class RunIndexError(ValueError):
    """A run whose index the leak check cannot use; the message says which command to run."""


@dataclass(frozen=True)
class RunIndex:
    """What the index leak check needs of a run, checked by :func:`open_run_index`."""

    run_dir: Any  # a Path, or a UPath for a run on a bucket (datagen.storage.path)
    section: IdentitySettings  # the run's identity section (embedder, MTCNN and embedding limits)
    detector: str  # the run's faces.detector
    threshold: float  # the distance its identities were clustered at


def open_run_index(run_dir: str | Path) -> RunIndex:
    """The run's identity settings, face tables and ``identities.parquet``, each checked, and its
    embedder's model (``ModelNotFoundError`` naming the package); cheap, so it runs before any model loads."""
    from datagen import storage
    from datagen.config import FacesSettings, IdentitySettings
    from datagen.identity.index import IDENTITIES_SUMMARY, IDENTITIES_TABLE
    from datagen.manifests.face_table import face_table_paths
    from datagen.manifests.run_manifest import load_run_manifest, read_json_object
    from datagen.stages.identity import check_embedder, threshold_of

    run_dir = storage.path(run_dir)  # a bucket URL stays one
    config = load_run_manifest(run_dir).get("config") or {}
    if not config.get("identity"):
        raise RunIndexError(f"{run_dir}: run.json records no identity section: the run was built before the identity "
                            "stage (schema 1.1 records, no face embeddings). Re-run `subject-ffhq build` with this "
                            f"version (a new --run-name and --out), then `subject-ffhq identities RUN`")
    section = IdentitySettings.from_mapping(config["identity"], "run.json identity")
    face_table_paths(run_dir)  # FaceTableError: what to re-run
    if not (run_dir / IDENTITIES_TABLE).is_file():
        raise RunIndexError(f"{run_dir}: no {IDENTITIES_TABLE}; run `subject-ffhq identities {run_dir}` first")
    summary = run_dir / IDENTITIES_SUMMARY
    clustered = read_json_object(summary).get("threshold") if summary.is_file() else None
    check_embedder(section.embedder)
    return RunIndex(run_dir, section, FacesSettings.from_mapping(config.get("faces") or {}, "run.json faces").detector,
                    float(clustered) if clustered is not None else threshold_of(section))


def index_leak_check(index: RunIndex, references: dict[str, np.ndarray], threshold: float | None = None
                     ) -> dict[str, Any]:
    """``references``: subject -> (photos x d) raw embeddings by the run's embedder. ``threshold``:
    a euclidean distance (default: the index's). Returns the JSON-ready result (module doc)."""
    from datagen.identity.index import identities_of
    from datagen.identity.search import faces_within
    from datagen.identity.split import SPLIT_TABLE, read_split

    started = time.perf_counter()
    threshold = index.threshold if threshold is None else float(threshold)
    names = list(references)
    groups = np.concatenate([np.full(len(references[n]), g, np.int64) for g, n in enumerate(names)])
    hits = faces_within(index.run_dir, np.concatenate([references[n] for n in names]), groups, threshold)
    ids = identities_of(index.run_dir, hits.face)
    has_split = (index.run_dir / SPLIT_TABLE).is_file()
    sides = read_split(index.run_dir, hits.key) if has_split else {}
    subjects = [_subject_hits(name, np.flatnonzero(hits.group == g).tolist(), hits, ids, sides)
                for g, name in enumerate(names) if np.any(hits.group == g)]
    return {
        "run": str(index.run_dir),
        "embedder": index.section.embedder,
        "metric": "euclidean",
        "threshold": round(threshold, 4),
        "split": SPLIT_TABLE if has_split else None,
        "faces_checked": hits.faces,
        "min_distance": {n: (round(float(d), 4) if np.isfinite(d) else None) for n, d in zip(names, hits.nearest, strict=True)},
        "subjects": subjects,
        "flagged": [s["subject"] for s in subjects if s["flagged"]],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _subject_hits(name: str, rows: list[int], hits, ids: dict[str, dict[str, int]], sides: dict[str, str]
                  ) -> dict[str, Any]:
    """One subject's hits, by identity (closest first); flagged when one is not in the reserve."""
    by_identity: dict[int | None, dict[str, Any]] = {}
    for i in sorted(rows, key=lambda i: (float(hits.distance[i]), hits.face[i])):
        face, key = hits.face[i], hits.key[i]
        known = ids.get(face)
        identity = None if known is None else known["identity"]
        side = sides.get(key)
        entry = by_identity.setdefault(identity, {
            "identity": identity, "faces": None if known is None else known["identity_faces"],
            "photos": None if known is None else known["identity_photos"], "faces_hit": 0, "train_faces_hit": 0,
            "reserve_faces_hit": 0, "closest": []})
        entry["faces_hit"] += 1
        entry["reserve_faces_hit" if side == RESERVE else "train_faces_hit"] += 1
        if len(entry["closest"]) < CLOSEST_PER_IDENTITY:
            entry["closest"].append({"face": face, "key": key, "distance": round(float(hits.distance[i]), 4),
                                     "split": side})
    identities = list(by_identity.values())
    return {"subject": name, "flagged": any(e["train_faces_hit"] for e in identities),
            "min_distance": identities[0]["closest"][0]["distance"], "faces_hit": len(rows),
            "identities": identities}
