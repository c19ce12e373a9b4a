"""The face stage with the real MTCNN (its weights ship inside facenet-pytorch) on the bundled sample,
with hand-made person segments: merged people, faceless and matched persons, the metadata's face rect,
and the records these become."""

from __future__ import annotations

import numpy as np
import pytest

from datagen.config import FacesSettings
from datagen.record.build import build_record
from datagen.record.schema import FACE_FLAG_NAMES, Record
from datagen.sources.images import load_image
from datagen.sources.readers import open_source
from datagen.stages.face_checker import FaceChecker, canvas_side, primary_cover, stored_rect
from datagen.stages.matcher import MatchResult
from datagen.stages.phrases import ChunkedCaption, NounPhrase
from datagen.stages.segmenter import PanopticResult, SegmentInfo
from fixtures.bundled_photos import photo

MAX_SIDE = 512  # stored size of the test images: small, and every face of the sample is still >= 20 px


@pytest.fixture(scope="module")
def checker():
    import torch

    torch.set_num_threads(1)  # the sample is small; one thread keeps the timing steady on a shared machine
    return FaceChecker(FacesSettings(), "cpu")


@pytest.fixture(scope="module")
def loaded(sample_source):
    """Every item of the bundled sample (the duplicate 1003 included), stored at MAX_SIDE."""
    return {it.source_id: load_image(it, max_side=MAX_SIDE) for it in open_source(sample_source).items()}


def panel_edges(names: list[str], height: int, long_side: int | None, stored_width: int) -> list[int]:
    """Where the people of a side-by-side composite meet, in pixels of its stored image
    (fixtures.bundled_photos.side_by_side, then fit to ``long_side``)."""
    widths = [round(photo(n).image.width * height / photo(n).image.height) for n in names]
    edges = np.cumsum([0, *widths]).astype(float)
    return [round(e * stored_width / edges[-1]) for e in edges]


def strips(width: int, height: int, cuts: list[tuple[int, int]], label: str = "person") -> PanopticResult:
    """Vertical strips ``[x0, x1)`` over the whole height, one segment each (ids 1, 2, ...)."""
    seg_map = np.zeros((height, width), dtype=np.uint16)
    segments = []
    for sid, (x0, x1) in enumerate(cuts, start=1):
        seg_map[:, x0:x1] = sid
        segments.append(SegmentInfo(id=sid, category_id=0, coco_label=label, is_thing=True, bbox=[x0, 0, x1, height],
                                    area=(x1 - x0) * height, score=1.0))
    return PanopticResult(segment_map=seg_map, segments=segments)


def record_of(li, pan: PanopticResult, check, matched: dict[int, str] | None = None) -> Record:
    """The record of a hand-segmented image whose caption is the ``matched`` phrases (segment id -> phrase)."""
    matched = matched or {}
    caption, phrases, pairs = "", [], []
    for i, (sid, text) in enumerate(matched.items()):
        caption += (" and " if caption else "") + text
        phrases.append(NounPhrase(text, len(caption) - len(text), len(caption)))
        pairs.append((i, sid))
    ids = [s.id for s in pan.segments]
    scores = np.full((len(phrases), len(ids)), 0.1, dtype=np.float32)
    match = MatchResult(segment_ids=ids, clip=scores, sbert=np.ones_like(scores), product=scores, pairs=pairs,
                        min_score=0.0)
    return build_record(li, [], pan, ChunkedCaption(caption, caption, phrases), match, {"face_detector": "mtcnn"}, check)


def rect_of(li):
    return stored_rect(li.item.meta["face_rect"], li.original_size, li.image.size)


def test_merged_persons_fires_on_two_people_in_one_segment_only(checker, loaded):
    # index 4: grace_hopper + camera + astronaut side by side (height 512, fitted to 1200 px)
    li = loaded["4"]
    w, h = li.image.size
    a, b, c, d = panel_edges(["grace_hopper", "camera", "astronaut"], 512, 1200, w)
    separate, merged = strips(w, h, [(a, b), (b, c), (c, d)]), strips(w, h, [(a, c), (c, d)])
    # index 3: astronaut + grace_hopper (height 600), the two-person composite
    li3 = loaded["3"]
    w3, h3 = li3.image.size
    e0, e1, e2 = panel_edges(["astronaut", "grace_hopper"], 600, None, w3)
    two, two_merged = strips(w3, h3, [(e0, e1), (e1, e2)]), strips(w3, h3, [(e0, e2)])
    checks = checker.check([li.image, li.image, li3.image, li3.image], [separate, merged, two, two_merged],
                           [rect_of(li), rect_of(li), rect_of(li3), rect_of(li3)])

    assert {sid: len(f) for sid, f in checks[0].faces.items()} == {1: 1, 2: 1, 3: 1}
    assert {sid: len(f) for sid, f in checks[1].faces.items()} == {1: 2, 2: 1}
    assert {sid: len(f) for sid, f in checks[2].faces.items()} == {1: 1, 2: 1}
    assert {sid: len(f) for sid, f in checks[3].faces.items()} == {1: 2}
    for check, pan in zip(checks, [separate, merged, two, two_merged], strict=True):
        for sid, faces in check.faces.items():
            x0, y0, x1, y1 = pan.segments[sid - 1].bbox
            for f in faces:  # boxes in pixels of the stored image, inside their segment
                assert x0 <= f.box[0] < f.box[2] <= x1 and y0 <= f.box[1] < f.box[3] <= y1
                assert f.score >= 0.9 and f.inside == 1.0
                assert f.size == round(max(f.box[2] - f.box[0], f.box[3] - f.box[1]))

    flags = [record_of(x, pan, check).face_checks.flags
             for x, pan, check in zip([li, li, li3, li3], [separate, merged, two, two_merged], checks, strict=True)]
    assert ["merged_persons" in f for f in flags] == [False, True, False, True]


def test_faceless_small_and_unmatched_primary_face_on_matched_segments(checker, loaded):
    li = loaded["0"]  # the astronaut, her face in the top third
    w, h = li.image.size
    top = h // 2
    seg_map = np.zeros((h, w), dtype=np.uint16)
    seg_map[:top] = 1
    seg_map[top:] = 2
    pan = PanopticResult(seg_map, [
        SegmentInfo(id=1, category_id=0, coco_label="person", is_thing=True, bbox=[0, 0, w, top], area=w * top, score=1.0),
        SegmentInfo(id=2, category_id=0, coco_label="person", is_thing=True, bbox=[0, top, w, h], area=w * (h - top),
                    score=1.0),
    ])
    check = checker.check([li.image], [pan], [rect_of(li)])[0]
    assert len(check.faces[1]) == 1 and check.faces[2] == []
    assert check.primary.segment_id == 1 and check.primary.overlap == 1.0

    # the phrase on the faceless lower half: that person has no face, the face rect's person is unmatched
    rec = record_of(li, pan, check, {2: "a woman"})
    assert rec.face_checks.flags == ["faceless_person", "primary_face_unmatched"]
    assert rec.face_checks.primary_face.matched_person is False
    # the phrase on the face: nothing to flag; with a threshold above her face's size: small_face
    rec = record_of(li, pan, check, {1: "a woman"})
    assert rec.face_checks.flags == [] and rec.face_checks.primary_face.matched_person is True
    check.small_face_px = check.faces[1][0].size + 1
    assert record_of(li, pan, check, {1: "a woman"}).face_checks.flags == ["small_face"]
    # the record keeps the faces on its person segments and reads back unchanged
    assert [len(s.faces) for s in rec.segments] == [1, 0]
    assert Record.from_json(rec.to_json()) == rec


def test_the_metadata_face_rect_is_found_and_covered_on_every_sample_image(checker, loaded):
    """FFHQ-wild's face_rect, scaled to the stored image, lies on a face MTCNN finds (whole image as one
    person segment), and on a background-only segmentation the face is unsegmented."""
    items = sorted(loaded, key=int)
    images = [loaded[k].image for k in items]
    whole = [strips(*im.size, [(0, im.width)]) for im in images]
    checks = checker.check(images, whole, [rect_of(loaded[k]) for k in items])
    for k, check in zip(items, checks, strict=True):
        rect = rect_of(loaded[k])
        best = max(_iou(rect, f.box) for f in check.faces[1])
        assert best >= 0.25, (k, rect, check.faces[1])  # the camera's rect was set by eye: IoU 0.3
        assert check.primary.segment_id == 1 and check.primary.overlap == 1.0
    assert len(checks[items.index("60000")].faces[1]) == 3 and len(checks[items.index("1003")].faces[1]) == 2

    # the same face rect on a wall: not a person segment -> primary_face_unsegmented
    li = loaded["2"]
    wall = strips(*li.image.size, [(0, li.image.width)], label="wall-other-merged")
    check = checker.check([li.image], [wall], [rect_of(li)])[0]
    assert check.faces == {} and check.primary.segment_id == 1
    assert record_of(li, wall, check).face_checks.flags == ["primary_face_unsegmented"]


def test_primary_cover_and_canvas_ladder_are_pure_geometry():
    seg = np.zeros((10, 10), dtype=np.uint16)
    seg[:, :6] = 3
    seg[:, 6:] = 5
    assert primary_cover([2, 2, 8.5, 6], seg).segment_id == 3  # 4 columns of 3, 3 of 5 (the 8.5 is rounded out)
    assert primary_cover([2, 2, 8.5, 6], seg).rect == (2, 2, 9, 6)
    assert primary_cover([20, 20, 30, 30], seg).segment_id is None  # outside the image
    assert stored_rect([100, 50, 200, 150], (1000, 500), (500, 250)) == [50, 25, 100, 75]
    assert stored_rect(None, (1, 1), (1, 1)) is None
    assert [canvas_side(n) for n in (1, 64, 65, 91, 92, 128, 600, 1024)] == [64, 64, 91, 91, 128, 128, 725, 1024]


def test_an_image_folder_source_has_no_primary_face(checker, loaded):
    li = loaded["2"]
    pan = strips(*li.image.size, [(0, li.image.width)])
    check = checker.check([li.image], [pan], [None])[0]
    assert check.primary is None
    rec = record_of(li, pan, check)
    assert rec.face_checks.primary_face is None
    assert not {"primary_face_unsegmented", "primary_face_unmatched"} & set(rec.face_checks.flags)
    assert set(rec.face_checks.flags) <= set(FACE_FLAG_NAMES)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
