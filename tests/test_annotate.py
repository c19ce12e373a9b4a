"""The whole-batch path (all four stages → validated records) on tiny models + real spaCy/MiniLM."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from datagen.config import Profile
from datagen.record.build import build_record
from datagen.record.schema import Record
from datagen.sources.images import load_image
from datagen.sources.readers import open_source


@dataclass
class Annotator:
    """Test helper: the four stages held in one process: ``annotate(loaded_images) -> records``."""

    captioner: Any
    segmenter: Any
    chunker: Any
    matcher: Any
    models: dict[str, str]

    @classmethod
    def from_profile(cls, profile: Profile, device: str | None = None) -> Annotator:
        from datagen.stage_table import model_ids
        from datagen.stages.captioner import Captioner
        from datagen.stages.matcher import Matcher
        from datagen.stages.phrases import PhraseChunker
        from datagen.stages.segmenter import PanopticSegmenter

        return cls(
            captioner=Captioner(profile.captioner, device),
            segmenter=PanopticSegmenter(profile.segmenter, device),
            chunker=PhraseChunker(profile.phrases),
            matcher=Matcher(profile.matcher, device),
            # the face and identity stages are not run here, so the records do not name their models
            models={k: v for k, v in model_ids(profile).items() if k not in ("face_detector", "identity_embedder")},
        )

    def annotate(self, loaded: list) -> list[tuple[Record, Any]]:
        """Run all four stages on a batch; returns ``(record, segment_map)`` per image."""
        from datagen.stages.captioner import caption_flags

        images = [li.image for li in loaded]
        captions = self.captioner.caption(images)
        panoptic = self.segmenter.segment(images)
        chunked = self.chunker.chunk(captions)
        matches = self.matcher.match(images, panoptic, chunked)
        out = []
        for li, cap, pan, ch, m in zip(loaded, captions, panoptic, chunked, matches, strict=True):
            out.append((build_record(li, caption_flags(cap), pan, ch, m, self.models), pan.segment_map))
        return out


@pytest.fixture(scope="module")
def loaded_images(sample_source):
    items = [it for it in open_source(sample_source).items() if it.duplicate_of is None][:3]
    return [load_image(it, max_side=128) for it in items]


def test_annotate_batch_gives_valid_consistent_records(tiny_profile, loaded_images):
    annotator = Annotator.from_profile(tiny_profile, device="cpu")
    out = annotator.annotate(loaded_images)
    assert len(out) == len(loaded_images)
    for li, (record, seg_map) in zip(loaded_images, out, strict=True):
        # the record validates and survives JSON unchanged
        assert Record.from_json(record.to_json()) == record
        assert record.key == li.item.key and record.split == li.item.split
        assert (record.width, record.height) == li.image.size
        assert seg_map.shape == (record.height, record.width) and seg_map.dtype == np.uint16
        ids_in_map = set(np.unique(seg_map).tolist()) - {0}
        assert ids_in_map == {s.id for s in record.segments}
        for s in record.segments:
            ys, xs = np.nonzero(seg_map == s.id)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == s.bbox
            assert s.area == len(xs)
        # spans read back and every phrase is accounted for: matched or listed unmatched
        for p in record.phrases:
            assert record.caption[p.start:p.end] == p.text
        matched = [s for s in record.segments if s.matched]
        assert len(matched) == min(len(record.phrases), len(record.segments))  # tiny profile: no threshold
        for s in matched:
            assert record.caption[s.start:s.end] == s.word
            i = next(i for i, p in enumerate(record.phrases) if p.segment_id == s.id)
            j = record.scores.segment_ids.index(s.id)
            assert s.match_score == pytest.approx(record.scores.product[i][j], abs=1e-6)
            assert s.match_score == pytest.approx(s.clip_sim * s.sbert_sim, abs=1e-5)
        assert sorted(record.unmatched_phrases + [i for i, p in enumerate(record.phrases) if p.segment_id]) == list(
            range(len(record.phrases))
        )
        assert record.provenance.pixel_md5 == li.pixel_md5 and record.provenance.source == "ffhq-wild"
        assert set(record.models) == {"captioner", "segmenter", "phrases", "clip", "sbert"}
        d = json.loads(record.to_json())
        assert all(("end" in s) == (s["id"] in {m.id for m in matched}) for s in d["segments"])
