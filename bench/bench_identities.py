"""The identity step at scale: :func:`datagen.identity.cluster.cluster_faces` on synthetic embeddings.

    .venv/bin/python bench/bench_identities.py [--sizes 100000,1000000] [--exact-up-to 100000]

Synthetic faces, clustered like real identities (no model, no random weights involved): 128-d like
dlib's descriptor; identity centres drawn at random (typical distance between two people ~0.9, dlib's
scale); each identity has 1 + a Zipf-like number of photos (long tail), 30% of the faces are people
seen once (singletons); a face is its centre plus noise (typical distance between two faces of one
person ~0.3). The threshold is dlib's default (0.5).

For each size it prints the search used (``exact (every pair)`` up to ``EXACT_LIMIT`` faces, else
``cells (k-means, PROBE probed)``: :mod:`datagen.identity.cluster`), the wall time
and CPU time (all threads; the machine is shared, so wall time also shows the others' load) of the
whole clustering (search + graph + components + centre distances), the process's peak resident memory, and the agreement with the synthetic truth: pairwise precision and recall (of all
pairs of faces put in one identity, the share that are one person; of all pairs of one person, the
share put together) and the share of true identities recovered exactly. ``--exact-up-to``: sizes up to
this also run the exact search, side by side, to show where it stops scaling.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.identity import cluster  # noqa: E402
from datagen.identity.cluster import EXACT_LIMIT, centre_distances  # noqa: E402

DIM, THRESHOLD, SINGLETONS = 128, 0.5, 0.3
CENTRE_SPREAD, FACE_SPREAD = 0.65, 0.3  # typical distances: ~0.9 between people, ~0.3 within one


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings, truth)``: ``n`` faces in shuffled order and their true identity numbers."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    clustered = int(n * (1 - SINGLETONS))
    while sum(sizes) < clustered:
        sizes.append(min(1 + int(rng.zipf(1.8)), 200))
    sizes[-1] -= sum(sizes) - clustered
    sizes += [1] * (n - clustered)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(truth)
    centres = rng.standard_normal((len(sizes), DIM), dtype=np.float32) * (CENTRE_SPREAD / np.sqrt(DIM))
    noise = rng.standard_normal((n, DIM), dtype=np.float32) * (FACE_SPREAD / np.sqrt(2 * DIM))
    return centres[truth] + noise, truth


def agreement(labels: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """Pairwise precision, pairwise recall, share of true identities recovered exactly."""
    def pairs(counts: np.ndarray) -> float:
        counts = counts.astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    joint = np.unique(labels.astype(np.int64) * (int(truth.max()) + 1) + truth, return_counts=True)[1]
    together, same = pairs(joint), pairs(np.bincount(truth))
    predicted = pairs(np.bincount(labels))
    precision = together / predicted if predicted else 1.0
    recall = together / same if same else 1.0
    # a true identity is recovered exactly when one predicted identity holds all of it and nothing else
    key = labels.astype(np.int64) * (int(truth.max()) + 1) + truth
    uniq, counts = np.unique(key, return_counts=True)
    lab_of, tru_of = uniq // (int(truth.max()) + 1), uniq % (int(truth.max()) + 1)
    exact = (counts == np.bincount(truth)[tru_of]) & (counts == np.bincount(labels)[lab_of])
    return precision, recall, float(exact.sum()) / len(np.unique(truth))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(n: int, exact: bool) -> tuple[float, np.ndarray]:
    embeddings, truth = synthetic(n)
    t, cpu = time.perf_counter(), time.process_time()
    if exact:  # every pair compared (one cell), side by side with the product's cells
        with patch.object(cluster, "EXACT_LIMIT", n):
            labels = cluster.cluster_faces(embeddings, THRESHOLD)
    else:
        labels = cluster.cluster_faces(embeddings, THRESHOLD)
    centre_distances(embeddings, labels)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    p, r, e = agreement(labels, truth)
    search = "exact (every pair)" if exact else f"cells (k-means, {cluster.PROBE} probed)"
    print(f"| {n:>9,} | {search:<25} | {seconds:8.1f} | {cpu:8.1f} | {peak_mib():8.0f} | {len(np.unique(truth)):>9,} | "
          f"{labels.max() + 1:>9,} | {p:9.4f} | {r:9.4f} | {e:9.4f} |", flush=True)
    return seconds, labels


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--exact-up-to", type=int, default=100_000)
    args = ap.parse_args()
    import faiss

    print(f"identity clustering on synthetic {DIM}-d faces, threshold {THRESHOLD}, {faiss.omp_get_max_threads()} "
          f"faiss threads; the product searches exactly up to {EXACT_LIMIT:,} faces")
    print("| faces     | search                    | wall s   | CPU s    | peak MiB | true ids  | found ids | precision | recall    | exact ids |")
    print("|-----------|---------------------------|----------|----------|----------|-----------|-----------|-----------|-----------|-----------|")
    for n in (int(s) for s in args.sizes.split(",")):
        ivf_seconds, ivf = run(n, exact=False)
        if n <= args.exact_up_to:
            exact_seconds, flat = run(n, exact=True)
            same = agreement(ivf, flat)
            print(f"  at {n:,}: the cells take {ivf_seconds / exact_seconds:.2f}x the exact search's time; "
                  f"pairwise precision/recall against the exact graph's identities: {same[0]:.4f} / {same[1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
