"""Faces into identities: a graph of faces closer than a threshold, cut into connected components.

    labels = cluster_faces(embeddings, threshold=0.5, neighbours=16)   # one identity number per face

Each face is joined to its nearest faces (euclidean) that lie closer than ``threshold``, at most
``neighbours`` of them; an identity is a connected component of that graph (dlib's own clustering
example uses the same graph). A second pass joins identities whose centres lie closer than
``threshold`` (the parts of one person that the search below kept apart). Identities are numbered by their first face (the order of
``embeddings``, the run's shard order), so the same faces give the same numbers.

**Search** (measured by ``bench/bench_identities.py`` on this 2-core machine, where faiss's own
inverted-file search took 75 s at 100k faces): the faces are cut into ``sqrt(N)`` cells by faiss's
k-means (fixed seed, trained on a fixed stride of the faces; one cell up to ``EXACT_LIMIT`` faces:
the exact search), and each cell's faces are compared with the faces of its ``PROBE`` nearest cells
as one matrix product (BLAS), keeping only the pairs under the threshold. The work grows as
``N^1.5`` (the exact search's as ``N^2``) and memory stays at one block of ``BLOCK`` distances.
"""

from __future__ import annotations

import math

import numpy as np

EXACT_LIMIT = 20_000  # up to this many faces, every pair is compared
PROBE = 3  # cells whose faces each face is compared with (its own and the nearest others)
REPLICAS = 2  # each face is held by its nearest cells, so a face near a border is found from both sides
TRAIN_PER_CELL = 40  # k-means training faces per cell
BLOCK = 1 << 24  # distances computed at once (64 MiB of float32)
SEED = 1234


def cells(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(the REPLICAS nearest cells of each face, the PROBE nearest cells of each cell)``: one cell up
    to EXACT_LIMIT faces."""
    import faiss

    n, d = x.shape
    count = 1 if n <= EXACT_LIMIT else int(math.sqrt(n))
    if count == 1:
        return np.zeros((n, 1), np.int64), np.zeros((1, 1), np.int64)
    kmeans = faiss.Kmeans(d, count, niter=10, seed=SEED, spherical=False)
    kmeans.train(np.ascontiguousarray(x[:: max(1, n // (count * TRAIN_PER_CELL))]))
    _, assign = kmeans.index.search(x, min(REPLICAS, count))
    _, near = kmeans.index.search(kmeans.centroids, min(PROBE, count))
    return assign.astype(np.int64), near.astype(np.int64)


def close_pairs(embeddings: np.ndarray, threshold: float, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)``: the pairs of faces closer than ``threshold`` (each face with at most
    ``neighbours`` of its nearest), found cell by cell (module doc)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    norms = np.einsum("ij,ij->i", x, x)
    assign, near = cells(x)
    members = _members(assign[:, 0], len(near))  # the faces whose nearest cell it is
    held = _members(assign.ravel(), len(near), assign.shape[1])  # the faces with it among their REPLICAS nearest
    rows, cols = [], []
    for c, own in enumerate(members):
        cand = np.unique(np.concatenate([held[o] for o in near[c]]))
        step = max(1, BLOCK // max(1, len(cand)))
        for start in range(0, len(own), step):
            q = own[start:start + step]
            sq = norms[q][:, None] + norms[cand][None, :] - 2.0 * (x[q] @ x[cand].T)
            hit_r, hit_c = np.nonzero(sq < threshold * threshold)
            r, k = _nearest_hits(q[hit_r], cand[hit_c], sq[hit_r, hit_c], neighbours + 1)
            rows.append(r)
            cols.append(k)
    r, k = (np.concatenate(rows), np.concatenate(cols)) if rows else (np.zeros(0, np.int64),) * 2
    keep = r != k
    return r[keep], k[keep]


def _members(cell: np.ndarray, count: int, per_face: int = 1) -> list[np.ndarray]:
    """The faces of each cell, in face order (``cell``: ``per_face`` cells per face, flattened)."""
    order = np.argsort(cell, kind="stable")
    return np.split(order // per_face, np.cumsum(np.bincount(cell, minlength=count))[:-1])


def _nearest_hits(r: np.ndarray, k: np.ndarray, sq: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The hits, at most ``most`` per row (the nearest; ties by index)."""
    if len(r) == 0 or np.bincount(r).max() <= most:
        return r, k
    order = np.lexsort((k, sq, r))
    r, k = r[order], k[order]
    first = np.r_[0, np.flatnonzero(r[1:] != r[:-1]) + 1]
    rank = np.arange(len(r)) - np.repeat(first, np.diff(np.r_[first, len(r)]))
    return r[rank < most], k[rank < most]


def cluster_faces(embeddings: np.ndarray, threshold: float, neighbours: int = 16) -> np.ndarray:
    """One identity number per face (module doc); ``0 .. identities - 1``, numbered by first face."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(embeddings)
    if n == 0:
        return np.zeros(0, np.int64)
    def components(x: np.ndarray) -> np.ndarray:
        rows, cols = close_pairs(x, threshold, neighbours)
        graph = coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(len(x), len(x)))
        return connected_components(graph, directed=True, connection="weak")[1]

    labels = renumber(components(embeddings))
    merged = components(centres(embeddings, labels))  # parts of one person that the cells kept apart
    return renumber(merged[labels])


def renumber(labels: np.ndarray) -> np.ndarray:
    """The same partition, numbered by each part's first member."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse].astype(np.int64)


def centres(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each identity's centre (the mean of its faces), by identity number (``labels``: 0 .. m - 1)."""
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sums = np.add.reduceat(embeddings[order].astype(np.float32), starts, axis=0)  # row i: identity ordered[starts[i]]
    out = np.empty_like(sums)
    out[ordered[starts]] = sums / np.diff(np.r_[starts, len(labels)])[:, None]
    return out


def centre_distances(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each face's euclidean distance to its identity's centre."""
    return np.linalg.norm(embeddings - centres(embeddings, labels)[labels], axis=1)
