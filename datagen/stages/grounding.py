"""Phrase-prompted grounding (``grounding: sam3``): each noun phrase finds its own segments.

The paper's path segments the image into COCO's 133 panoptic classes and then matches phrases to
segments (CLIP x SBERT). Here the phrases come first: the caption's noun phrases (the same
:class:`~datagen.stages.phrases.PhraseChunker`, numbered plurals expanded) each prompt SAM 3 with
their **head concept** (:func:`datagen.labels.head_concept`), which returns every instance of that
concept with a score (:class:`datagen.stages.sam3.Sam3Grounder`; one prompt per distinct concept of
an image, the image's vision embeddings computed once and reused for all of them). Then, per image:

1. **Assignment** (:func:`assign_instances`): rows are the phrases, columns the instances; a
   phrase's candidates are the instances of its own concept, scored by SAM 3; the paper's greedy
   rule (:func:`datagen.stages.greedy.greedy_match`) takes the best remaining pair until none scores
   ``threshold`` or more, each phrase and each instance at most once over the whole caption. "a man
   and a man" takes the two best ``man`` instances (the first phrase the best); a phrase whose
   concept has no instance at or above the threshold stays unmatched (``unmatched_phrases``).
2. **The segment map** (:func:`paint_instances`): instances may overlap (one concept's instance
   inside another's: a hat on a man), but a pixel has one id. Unassigned instances are painted
   first, then the assigned ones, each group largest first (equal areas: the better score last), so
   a smaller mask stays on top of a larger one and a subject keeps its pixels over an instance no
   phrase took. An instance left
   with no pixel is dropped (an assigned one that is: its phrase becomes unmatched). Ids are 1..N:
   the assigned instances in phrase order, then the others by concept and score.
3. **Labels** (:func:`datagen.labels.label_of`): ``person`` for people nouns, the COCO class for a
   COCO head, else the concept itself; ``label_vocab`` says which.

The record is the panoptic path's (:mod:`datagen.record.build`): a segment's ``score`` and, when
matched, ``match_score`` are its SAM 3 score; ``scores.product`` is the phrases x segments matrix
the assignment used (0 where a segment is not of the phrase's concept); ``scores.clip`` and
``scores.sbert`` are empty. The face stage reads these segments as it reads panoptic ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from datagen.labels import COCO, head_concept, label_of
from datagen.stages.greedy import greedy_match
from datagen.stages.sam3 import Instance
from datagen.stages.segmenter import PanopticResult, SegmentInfo, _tight_boxes
from datagen.stages.step import Step


@dataclass
class GroundedSegment(SegmentInfo):
    """A segment from a phrase prompt: a panoptic segment's fields, plus its concept and vocabulary."""

    concept: str = ""
    label_vocab: str = COCO


@dataclass
class GroundingMatch:
    """The assignment, shaped as the matcher's result for the record: ``product`` is phrases x
    ``segment_ids``, the SAM 3 score of each candidate pair (0 for a segment of another concept)."""

    segment_ids: list[int]
    product: np.ndarray
    pairs: list[tuple[int, int]]  # (phrase index, segment id), in greedy pick order
    min_score: float
    clip: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # none here
    sbert: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def segment_scores(self, phrase: int, column: int) -> dict[str, float]:
        return {"match_score": self.product[phrase, column]}


@dataclass
class GroundingResult(PanopticResult):
    """One image's grounding: its segments (a :class:`PanopticResult`, what the face stage reads),
    the chunked caption and the assignment. ``unmatched`` lists the phrases no instance took."""

    chunked: object = None
    match: GroundingMatch | None = None
    unmatched: list[int] = field(default_factory=list)


def candidate_scores(concepts: Sequence[str], instances: Sequence[Instance]) -> np.ndarray:
    """Phrases x instances: an instance's score where it is of the phrase's concept, else -inf."""
    out = np.full((len(concepts), len(instances)), -np.inf, dtype=np.float64)
    for j, inst in enumerate(instances):
        for i, concept in enumerate(concepts):
            if concept == inst.concept:
                out[i, j] = inst.score
    return out


def assign_instances(concepts: Sequence[str], instances: Sequence[Instance], threshold: float) -> list[tuple[int, int]]:
    """``[(phrase index, instance index)]``: the greedy assignment (module doc, step 1), in pick order."""
    return greedy_match(candidate_scores(concepts, instances), threshold)


def paint_instances(instances: Sequence[Instance], assigned: set[int], shape: tuple[int, int]) -> np.ndarray:
    """The segment map (uint16) with instance ``j`` painted as ``j + 1`` (module doc, step 2)."""
    def area(j: int) -> int:
        return int(instances[j].mask.sum())

    order = sorted(range(len(instances)), key=lambda j: (j in assigned, -area(j), instances[j].score, j))
    seg_map = np.zeros(shape, dtype=np.uint16)
    for j in order:
        seg_map[instances[j].mask] = j + 1
    return seg_map


def ground_image(chunked, instances: Sequence[Instance], threshold: float, shape: tuple[int, int]) -> GroundingResult:
    """One image's :class:`GroundingResult` from its chunked caption and SAM 3 instances."""
    concepts = [head_concept(p.text) for p in chunked.phrases]
    pairs = assign_instances(concepts, instances, threshold)
    phrase_of = {j: i for i, j in pairs}
    ordered = sorted(range(len(instances)), key=lambda j: (j not in phrase_of, phrase_of.get(j, 0),
                                                           instances[j].concept, -instances[j].score, j))
    instances = [instances[j] for j in ordered]
    phrase_of = {k: phrase_of[j] for k, j in enumerate(ordered) if j in phrase_of}
    raw = paint_instances(instances, set(phrase_of), shape)
    areas = np.bincount(raw.ravel(), minlength=len(instances) + 1)
    keep = [j for j in range(len(instances)) if areas[j + 1] > 0]
    dense = np.zeros(len(instances) + 1, dtype=np.uint16)
    dense[[j + 1 for j in keep]] = np.arange(1, len(keep) + 1, dtype=np.uint16)
    seg_map = dense[raw]
    boxes = _tight_boxes(seg_map, len(keep))
    segments = []
    for sid, j in enumerate(keep, 1):
        inst = instances[j]
        label, vocab = label_of(inst.concept)
        segments.append(GroundedSegment(
            id=sid, category_id=_coco_id(label, vocab), coco_label=label, is_thing=True, bbox=boxes[sid],
            area=int(areas[j + 1]), score=round(float(inst.score), 6), concept=inst.concept, label_vocab=vocab,
        ))
    sid_of = {j: sid for sid, j in enumerate(keep, 1)}
    matched = sorted(((phrase_of[j], sid_of[j]) for j in phrase_of if j in sid_of), key=lambda p: -instances[keep[p[1] - 1]].score)
    product = np.zeros((len(concepts), len(keep)), dtype=np.float32)
    for i, concept in enumerate(concepts):
        for s in segments:
            if s.concept == concept:
                product[i, s.id - 1] = s.score
    match = GroundingMatch(segment_ids=[s.id for s in segments], product=product, pairs=matched, min_score=float(threshold))
    taken = {i for i, _ in matched}
    return GroundingResult(segment_map=seg_map, segments=segments, chunked=chunked, match=match,
                           unmatched=[i for i in range(len(concepts)) if i not in taken])


def _coco_id(label: str, vocab: str) -> int | None:
    """The COCO panoptic category index of a COCO label (None for an open-vocabulary one)."""
    from datagen.config import coco_panoptic_labels

    return coco_panoptic_labels().index(label) if vocab == COCO else None


class GroundStep(Step):
    """The build's ``sam3`` stage: phrases, SAM 3 instances per head concept, the assignment; a
    :class:`GroundingResult` per image (or a ``StageFailure`` naming ``phrases`` or ``sam3``). It
    stands in for the segmenter (its result is the segments) and the matcher (chunked caption,
    assignment), :meth:`provided`."""

    name = "sam3"

    def __init__(self, profile, device: str):
        super().__init__(profile, device)
        from datagen.stages.phrases import PhraseChunker
        from datagen.stages.sam3 import Sam3Grounder

        self.chunker = PhraseChunker(profile.phrases)
        self.grounder = Sam3Grounder(profile.sam3, device)

    def process(self, loaded: list, captions: list) -> list:
        from datagen.stages.failures import StageFailure, in_batches
        from datagen.stages.phrases import chunk_captions
        from datagen.stages.step import labels_of, probe_image

        labels, section = labels_of(loaded), self.profile.sam3
        out: list = chunk_captions(self.chunker, captions, labels)
        ok = [i for i, c in enumerate(out) if not isinstance(c, StageFailure)]

        def ground(rows: list) -> list:
            found = self.grounder.instances([r[0] for r in rows], [[head_concept(p.text) for p in r[1].phrases] for r in rows])
            return [ground_image(r[1], inst, section.threshold, (r[0].height, r[0].width)) for r, inst in zip(rows, found, strict=True)]

        rows = [(loaded[i].image, out[i]) for i in ok]
        probe = lambda: (probe_image(), self.chunker.chunk(["a person"])[0])  # noqa: E731
        for i, g in zip(ok, in_batches(self.name, ground, rows, [labels[i] for i in ok], section.batch_size, probe), strict=True):
            out[i] = g
        return out

    @classmethod
    def provided(cls, outputs: list, name: str) -> list:
        """As the segmenter's: the results themselves; as the matcher's: ``(chunked caption, match)``."""
        if name != "matcher":
            return outputs
        return [(o.chunked, o.match) if isinstance(o, GroundingResult) else o for o in outputs]

    @classmethod
    def record_fields(cls, output) -> dict:
        return {"grounding": "sam3"}

    @classmethod
    def model_ids(cls, profile) -> dict[str, str]:
        return {"phrases": profile.phrases.spacy_model, "sam3": profile.sam3.model}

    @classmethod
    def check_models(cls, profile) -> None:
        from datagen.stages.model_loading import resolve_model
        from datagen.stages.phrases import check_pipeline
        from datagen.stages.sam3 import WHAT

        check_pipeline(profile.phrases.spacy_model)
        resolve_model(profile.sam3.model, WHAT)
