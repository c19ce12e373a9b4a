"""greedy_match on given score matrices: the paper's greedy rule, ties, shapes, threshold."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from datagen.stages.greedy import greedy_match


def reference_greedy(scores: np.ndarray, min_score: float = -math.inf) -> list[tuple[int, int]]:
    """The rule spelled out the slow way: scan every free pair, keep the best (ties: first in row-major order)."""
    rows, cols = scores.shape
    free_r, free_c = set(range(rows)), set(range(cols))
    picks = []
    while free_r and free_c:
        best = None
        for r in range(rows):
            for c in range(cols):
                if r in free_r and c in free_c and scores[r, c] >= min_score:
                    if best is None or scores[r, c] > scores[best]:
                        best = (r, c)
        if best is None:
            break
        picks.append(best)
        free_r.discard(best[0])
        free_c.discard(best[1])
    return picks


def test_picks_highest_pair_first_and_each_row_and_column_once():
    scores = np.array([[0.1, 0.9, 0.3], [0.8, 0.95, 0.2], [0.7, 0.6, 0.5]])
    # 0.95 -> (1,1); then row 1 / col 1 are used: 0.7 -> (2,0); then 0.3 -> (0,2)
    assert greedy_match(scores) == [(1, 1), (2, 0), (0, 2)]


def test_pick_order_is_by_descending_score():
    scores = np.array([[0.2, 0.4], [0.9, 0.1]])
    pairs = greedy_match(scores)
    assert pairs == [(1, 0), (0, 1)]
    assert [scores[p] for p in pairs] == sorted((scores[p] for p in pairs), reverse=True)


def test_ties_go_to_lowest_row_then_lowest_column():
    assert greedy_match(np.ones((2, 3))) == [(0, 0), (1, 1)]
    # tie across rows: (0,1) and (1,0) both 0.9 -> row 0 first
    assert greedy_match(np.array([[0.5, 0.9], [0.9, 0.5]])) == [(0, 1), (1, 0)]
    # tie within a row: (0,0) and (0,1) both 0.9 -> column 0 first
    assert greedy_match(np.array([[0.9, 0.9], [0.1, 0.2]])) == [(0, 0), (1, 1)]


def test_more_phrases_than_segments():
    scores = np.array([[0.1, 0.2], [0.9, 0.3], [0.8, 0.7], [0.05, 0.6]])
    assert greedy_match(scores) == [(1, 0), (2, 1)]


def test_more_segments_than_phrases():
    scores = np.array([[0.1, 0.5, 0.9, 0.2], [0.3, 0.8, 0.95, 0.4]])
    assert greedy_match(scores) == [(1, 2), (0, 1)]


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_side_gives_no_pairs(shape):
    assert greedy_match(np.zeros(shape)) == []


def test_threshold_keeps_pairs_at_or_above_min_score_only():
    scores = np.array([[0.9, 0.1], [0.2, 0.5]])
    assert greedy_match(scores, min_score=0.5) == [(0, 0), (1, 1)]  # 0.5 itself is taken
    assert greedy_match(scores, min_score=0.6) == [(0, 0)]
    assert greedy_match(scores, min_score=0.95) == []


def test_threshold_does_not_open_a_worse_pair_for_a_blocked_row():
    # (0,0)=0.9 is taken; row 1's only pair above 0.3 is column 0, already used -> row 1 unmatched
    scores = np.array([[0.9, 0.2], [0.8, 0.25]])
    assert greedy_match(scores, min_score=0.3) == [(0, 0)]


def test_negative_scores_are_taken_without_threshold():
    scores = np.array([[-0.5, -0.1], [-0.2, -0.9]])
    assert greedy_match(scores) == [(0, 1), (1, 0)]
    assert greedy_match(scores, min_score=0.0) == []


def test_greedy_is_not_the_optimal_assignment():
    scores = np.array([[0.9, 0.8], [0.8, 0.1]])
    pairs = greedy_match(scores)
    assert pairs == [(0, 0), (1, 1)]
    greedy_total = sum(scores[p] for p in pairs)
    best_total = max(scores[0, a] + scores[1, b] for a, b in itertools.permutations(range(2)))
    assert greedy_total == pytest.approx(1.0)
    assert best_total == pytest.approx(1.6)  # (0,1) + (1,0): better, but not what greedy picks


def test_agrees_with_the_slow_reference_on_random_matrices_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(200):
        rows, cols = rng.integers(1, 7, size=2)
        scores = rng.integers(0, 4, size=(rows, cols)) / 4.0  # few distinct values: many ties
        threshold = rng.choice([-math.inf, 0.25, 0.5])
        assert greedy_match(scores, threshold) == reference_greedy(scores, threshold), (scores, threshold)


def test_returns_python_ints_and_leaves_input_unchanged():
    scores = np.array([[0.3, 0.6], [0.4, 0.2]], dtype=np.float32)
    before = scores.copy()
    pairs = greedy_match(scores)
    assert pairs == [(0, 1), (1, 0)]
    assert all(type(v) is int for pair in pairs for v in pair)
    assert np.array_equal(scores, before)


def test_rejects_nan_and_non_matrix_input():
    with pytest.raises(ValueError, match="NaN"):
        greedy_match(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        greedy_match(np.array([0.1, 0.2]))
