"""The paper's greedy one-to-one assignment of phrases to segments (DESIGN §3 step 4). Pure."""

from __future__ import annotations

import math

import numpy as np


def greedy_match(scores: np.ndarray, min_score: float = -math.inf) -> list[tuple[int, int]]:
    """Greedy one-to-one assignment on a ``rows x cols`` score matrix.

    Repeatedly takes the highest-scoring remaining ``(row, col)`` pair whose row and column are both
    still free, until no free pair scores ``>= min_score``. Each row and each column is used at most
    once. Ties are broken by the lowest row, then the lowest column (row-major order). Returns the
    pairs in pick order (so scores are non-increasing). Empty sides give ``[]``. This is the
    paper's greedy rule, not the optimal (Hungarian) assignment: it can give a lower total.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"greedy_match: scores must be a 2-D matrix (rows x cols), got shape {scores.shape}")
    n_rows, n_cols = scores.shape
    if n_rows == 0 or n_cols == 0:
        return []
    if np.isnan(scores).any():
        raise ValueError("greedy_match: scores hold NaN; every score must be a number")
    flat = scores.ravel()
    # One stable sort, descending: equal scores keep row-major order -> lowest row, then lowest col.
    order = np.argsort(-flat, kind="stable")
    order = order[flat[order] >= min_score]
    rows, cols = np.divmod(order, n_cols)
    want = min(n_rows, n_cols)
    row_used = [False] * n_rows
    col_used = [False] * n_cols
    pairs: list[tuple[int, int]] = []
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        if row_used[r] or col_used[c]:
            continue
        row_used[r] = col_used[c] = True
        pairs.append((r, c))
        if len(pairs) == want:
            break
    return pairs
