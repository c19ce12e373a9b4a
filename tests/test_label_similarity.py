"""The label half of the score with the real all-MiniLM-L6-v2: the right COCO label ranks first."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datagen.config import MatcherSettings
from datagen.stages.matcher import Matcher
from datagen.stages.phrases import ChunkedCaption, NounPhrase
from datagen.stages.segmenter import PanopticResult, SegmentInfo

LABELS = ["person", "dog", "bicycle"]
PHRASES = {"a man": "person", "a small dog": "dog", "a red bike": "bicycle"}


@pytest.fixture(scope="module")
def matcher(tiny_model):
    section = MatcherSettings(
        clip_model="local-dir:" + str(tiny_model("open_clip")),
        clip_pretrained=None,
        sbert_model=str(tiny_model("sbert")),
        batch_size=8,
        min_score=0.0,
        dtype="fp32",
    )
    return Matcher(section, device="cpu")


def scene() -> tuple[Image.Image, PanopticResult]:
    seg_map = np.zeros((24, 48), dtype=np.uint16)
    for k in range(3):
        seg_map[4:20, 16 * k + 2:16 * k + 14] = k + 1
    segments = [
        SegmentInfo(id=k + 1, category_id=k, coco_label=label, is_thing=True, bbox=[16 * k + 2, 4, 16 * k + 14, 20],
                    area=16 * 12, score=0.9)
        for k, label in enumerate(LABELS)
    ]
    return Image.new("RGB", (48, 24), (90, 140, 60)), PanopticResult(seg_map, segments)


def caption(texts: list[str]) -> ChunkedCaption:
    text = " and ".join(texts)
    phrases, at = [], 0
    for t in texts:
        at = text.index(t, at)
        phrases.append(NounPhrase(t, at, at + len(t)))
        at += len(t)
    return ChunkedCaption(text, text, phrases)


def test_label_half_ranks_the_right_label_first(matcher):
    image, pan = scene()
    texts = list(PHRASES)
    (result,) = matcher.match([image], [pan], [caption(texts)])
    assert result.sbert.shape == (3, 3)
    for row, text in enumerate(texts):
        sims = dict(zip([s.coco_label for s in pan.segments], result.sbert[row].tolist(), strict=True))
        best = max(sims, key=sims.get)
        assert best == PHRASES[text], (text, sims)
        runner_up = sorted(sims.values())[-2]
        assert sims[best] - runner_up > 0.05, (text, sims)


def test_label_ranking_does_not_depend_on_phrase_order_or_segment_order(matcher):
    image, pan = scene()
    pan.segments.reverse()
    texts = list(reversed(PHRASES))
    (result,) = matcher.match([image], [pan], [caption(texts)])
    labels = [s.coco_label for s in pan.segments]
    for row, text in enumerate(texts):
        assert labels[int(np.argmax(result.sbert[row]))] == PHRASES[text]
