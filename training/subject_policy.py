"""Which subjects of an example condition the model this time (DESIGN §6 sampling policy).

Per example: with ``uncond_prob`` the example is *unconditional* (empty caption, no subjects);
with ``text_only_prob`` it is *text-only* (caption kept, no subjects); otherwise each candidate
subject is kept independently with ``keep_prob`` and, if more than ``max_subjects`` survive, a
random subset of ``max_subjects`` is taken. Candidates are the segments that carry a phrase and
whose COCO label is one of the configured object types (see :func:`subject_candidates`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from datagen.record.schema import Segment

UNCONDITIONAL = "unconditional"
TEXT_ONLY = "text_only"
SUBJECTS = "subjects"
CONDITIONS = (UNCONDITIONAL, TEXT_ONLY, SUBJECTS)

T = TypeVar("T")


def subject_candidates(segments: Iterable[Segment], object_types: Sequence[str]) -> list[Segment]:
    """Matched segments of the wanted object types, one per phrase end, sorted by phrase end.

    Two segments can only share a phrase end if the record is inconsistent (the matcher uses each
    phrase once); the first one is kept so that every subject gets its own token.
    """
    wanted = set(object_types)
    by_end: dict[int, Segment] = {}
    for s in segments:
        if s.end is not None and s.coco_label in wanted and s.end not in by_end:
            by_end[s.end] = s
    return [by_end[e] for e in sorted(by_end)]


@dataclass(frozen=True)
class SubjectDropPolicy:
    uncond_prob: float = 0.1
    text_only_prob: float = 0.1
    keep_prob: float = 0.9
    max_subjects: int = 4

    def draw(self, candidates: Sequence[T], rng: random.Random) -> tuple[str, list[T]]:
        """Return ``(condition, kept)``; ``kept`` preserves the candidates' order."""
        r = rng.random()
        if r < self.uncond_prob:
            return UNCONDITIONAL, []
        if r < self.uncond_prob + self.text_only_prob:
            return TEXT_ONLY, []
        kept_idx = [i for i in range(len(candidates)) if rng.random() < self.keep_prob]
        if len(kept_idx) > self.max_subjects:
            kept_idx = sorted(rng.sample(kept_idx, self.max_subjects))
        return SUBJECTS, [candidates[i] for i in kept_idx]
