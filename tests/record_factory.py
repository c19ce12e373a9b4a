"""Build valid records and matching segment maps for tests of the record and shard I/O."""

from __future__ import annotations

import numpy as np

from datagen.record.schema import MatchScores, Phrase, Provenance, Record, Segment


def two_person_sample(key: str = "00042", width: int = 64, height: int = 48):
    """A record with two person segments (one matched, one not) and its segment map."""
    caption = "a woman and a man on a beach"
    seg_map = np.zeros((height, width), dtype=np.uint16)
    seg_map[4:20, 2:10] = 1
    seg_map[10:40, 30:50] = 2
    segments = [
        Segment(id=1, coco_label="person", category_id=0, is_thing=True, bbox=[2, 4, 10, 20], area=16 * 8,
                score=0.9, word="a woman", start=0, end=7, match_score=0.5, clip_sim=0.7, sbert_sim=0.714),
        Segment(id=2, coco_label="person", category_id=0, is_thing=True, bbox=[30, 10, 50, 40], area=30 * 20,
                score=0.8),
    ]
    phrases = [Phrase("a woman", 0, 7, segment_id=1), Phrase("a man", 12, 17), Phrase("a beach", 21, 28)]
    scores = MatchScores(
        segment_ids=[1, 2],
        clip=[[0.7, 0.6], [0.5, 0.4], [0.1, 0.1]],
        sbert=[[0.714, 0.7], [0.6, 0.6], [0.1, 0.1]],
        product=[[0.5, 0.42], [0.3, 0.24], [0.01, 0.01]],
        min_score=0.35,
    )
    record = Record(
        key=key, caption=caption, caption_raw="a woman and a man on a beach", width=width, height=height,
        segments=segments, phrases=phrases, scores=scores,
        provenance=Provenance(source="ffhq-wild", source_id=str(int(key)), path="in-the-wild-images/00000/00042.png",
                              pixel_md5="0" * 32, original_size=[640, 480], license="Public Domain"),
        split="train", models={"captioner": "tiny/blip2"},
        unmatched_phrases=[1, 2], unmatched_person_segments=[2],
    )
    return record.validate(), seg_map
