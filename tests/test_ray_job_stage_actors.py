"""The stage actor class, used in-process (no Ray): their outputs line up with the chunk, and a
matcher's scores do not depend on which images it saw before (what makes resumed shards
byte-identical)."""

from __future__ import annotations

import numpy as np
import pytest

from datagen.record.schema import Record
from datagen.shards.plan import plan_shards
from datagen.sources.readers import open_source
from datagen.stage_table import stage
from datagen.stages.failures import StageFailure
from datagen.stages.matcher import MatchResult
from datagen.stages.phrases import ChunkedCaption
from ray_jobs.actors import StageActor
from ray_jobs.chunks import LoadedChunk
from ray_jobs.tasks import encode_chunk, load_chunk, split_chunks

pytestmark = pytest.mark.slow
CONTRACT = tuple(stage(name) for name in ("captioner", "segmenter", "matcher"))


def actor(name: str, profile) -> StageActor:
    return StageActor(stage(name), profile)


@pytest.fixture(scope="module")
def chunks(sample_source):
    (spec,) = plan_shards(open_source(sample_source).items()[:6], shard_size=6)
    first, second = split_chunks(spec, images_per_call=3)
    return load_chunk(0, 0, first, max_side=192), load_chunk(0, 1, second, max_side=192)


def test_stage_actors_in_process_history_independent(tiny_profile, chunks):
    first, second = chunks
    captioner = actor("captioner", tiny_profile)
    segmenter = actor("segmenter", tiny_profile)
    caps = [captioner.run(c) for c in chunks]
    pans = [segmenter.run(c) for c in chunks]
    for c, cap, pan in zip(chunks, caps, pans, strict=True):
        assert len(cap) == len(pan) == len(c.loaded) == 3
        assert not any(isinstance(x, StageFailure) for x in [*cap, *pan])
        assert all(isinstance(text, str) and isinstance(flags, list) for text, flags in cap)

    seasoned, fresh = actor("matcher", tiny_profile), actor("matcher", tiny_profile)
    # history: the seasoned matcher first sees the chunk's images one at a time, last first, so
    # it meets their segments' labels in other batches than the fresh one does
    for i in reversed(range(len(second.loaded))):
        seasoned.run(LoadedChunk(0, 9, second.loaded[i : i + 1]), caps[1][i : i + 1], pans[1][i : i + 1])
    a = seasoned.run(second, caps[1], pans[1])
    b = fresh.run(second, caps[1], pans[1])
    for (chunked_a, match_a), (chunked_b, match_b) in zip(a, b, strict=True):
        assert chunked_a == chunked_b
        assert match_a.segment_ids == match_b.segment_ids and match_a.pairs == match_b.pairs
        for name in ("clip", "sbert", "product"):
            assert np.array_equal(getattr(match_a, name), getattr(match_b, name)), name
    assert seasoned.stats()["images"] == 6 and fresh.stats()["images"] == 3

    encoded = encode_chunk(second, CONTRACT, {"captioner": "tiny"}, 90, caps[1], pans[1], b)
    assert [s.key for s in encoded.samples] == [li.item.key for li in second.loaded]
    assert set(encoded.outcomes.values()) == {("written", None)}


def test_a_failed_caption_fails_only_that_image_downstream(tiny_profile, chunks):
    first, _ = chunks
    segmenter = actor("segmenter", tiny_profile)
    pans = segmenter.run(first)
    caps = [(f"a photo of a person number {i}", []) for i in range(3)]
    caps[1] = StageFailure("captioner", "captioner: x.png: RuntimeError: model fell over")
    matcher = actor("matcher", tiny_profile)
    matched = matcher.run(first, caps, pans)
    assert matched[1] is caps[1] and not isinstance(matched[0], StageFailure)
    encoded = encode_chunk(first, CONTRACT, {"captioner": "tiny"}, 90, caps, pans, matched)
    sid = first.loaded[1].item.source_id
    assert encoded.outcomes[sid] == ("failed", "captioner: x.png: RuntimeError: model fell over")
    assert len(encoded.samples) == 2


def test_face_stage_actor_in_process(tiny_profile, chunks):
    first, _ = chunks
    pans = actor("segmenter", tiny_profile).run(first)
    pans[2] = StageFailure("segmenter", "segmenter: y.png: RuntimeError: no")
    faces = actor("faces", tiny_profile)
    checked = faces.run(first, pans)
    assert checked[2] is pans[2]  # a failed segmentation stays that image's failure
    for li, pan, check in zip(first.loaded[:2], pans[:2], checked[:2], strict=True):
        assert sorted(check.faces) == sorted(s.id for s in pan.segments if s.coco_label == "person")
        assert check.primary is not None  # the sample is FFHQ-wild: every item has a face rect
        x0, y0, x1, y1 = check.primary.rect
        assert 0 <= x0 < x1 <= li.image.width and 0 <= y0 < y1 <= li.image.height
    assert faces.stats()["images"] == 2
    # no phrases, so no match (the matcher is not what is tested here): the records carry the face checks
    caps = [("", [])] * 3
    matched = [(ChunkedCaption("", "", []), MatchResult([s.id for s in pan.segments], *[np.zeros((0, len(pan.segments)))] * 3,
                                                        [], 0.0)) for pan in pans[:2]] + [pans[2]]
    encoded = encode_chunk(first, (*CONTRACT, stage("faces")), {"captioner": "tiny"}, 90, caps, pans, matched, checked)
    assert len(encoded.samples) == 2
    records = [Record.from_json(s.json) for s in encoded.samples]
    assert all(r.face_checks is not None and r.face_checks.primary_face is not None for r in records)
