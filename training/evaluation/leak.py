"""Leak check: does an evaluation subject appear in the training shards?

The paper's identity numbers assume the evaluation identities are unseen in training. Every face
MTCNN finds in the shards' images is embedded with FaceNet and compared with each reference photo's
face of each subject; a subject is **flagged** when any training face reaches ``threshold`` (cosine).
The report lists, per flagged subject, the closest training faces (shard, sample key, box, cosine).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TOP_MATCHES = 10


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
            batch.append((Path(shard).name, sample.key, sample.image))
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
