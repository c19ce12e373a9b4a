"""The PanopticSegmenter on the tiny Mask2Former through transformers' panoptic post-processing."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from datagen.config import TINY_MODELS_ENV, ProfileError, SegmenterSettings, load_profile
from datagen.stages.model_loading import ModelNotFoundError
from datagen.stages.segmenter import PanopticResult, PanopticSegmenter, SegmentInfo, is_thing
from fixtures.tiny_models.mask2former import COCO_PANOPTIC_LABELS, COCO_PANOPTIC_STUFF, COCO_PANOPTIC_THINGS


def photos() -> list[Image.Image]:
    """Public-domain photos at sizes of different aspect ratios (portrait, landscape, square, grey)."""
    return [
        Image.fromarray(data.astronaut()).resize((90, 120)),
        Image.fromarray(data.coffee()).resize((150, 100)),
        Image.fromarray(data.chelsea()).resize((64, 64)),
        Image.fromarray(data.camera()).resize((100, 75)),  # mode L
    ]


@pytest.fixture(scope="module")
def m2f_dir(tiny_model):
    return tiny_model("mask2former")


@pytest.fixture(scope="module")
def tiny_section(m2f_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TINY_MODELS_ENV, str(m2f_dir.parent))
        return load_profile("tiny").segmenter


@pytest.fixture(scope="module")
def segmenter(tiny_section):
    return PanopticSegmenter(tiny_section, device="cpu")


@pytest.fixture(scope="module")
def results(segmenter) -> list[PanopticResult]:
    return segmenter.segment(photos())


def check_consistent(result: PanopticResult, image: Image.Image) -> None:
    """The map and the segment list describe the same segments, exactly."""
    seg_map = result.segment_map
    assert seg_map.dtype == np.uint16
    assert seg_map.shape == (image.height, image.width)
    ids = [s.id for s in result.segments]
    assert ids == list(range(1, len(ids) + 1))  # renumbered 1..N in list order
    assert set(np.unique(seg_map).tolist()) - {0} == set(ids)
    for s in result.segments:
        assert isinstance(s, SegmentInfo)
        ys, xs = np.nonzero(seg_map == s.id)
        assert s.area == len(xs) > 0
        assert s.bbox == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        assert 0 <= s.bbox[0] < s.bbox[2] <= image.width and 0 <= s.bbox[1] < s.bbox[3] <= image.height
        assert s.coco_label == COCO_PANOPTIC_LABELS[s.category_id]
        assert s.is_thing == (s.coco_label in COCO_PANOPTIC_THINGS)
        assert 0.0 <= s.score <= 1.0
    stuff = [s.category_id for s in result.segments if not s.is_thing]
    assert len(stuff) == len(set(stuff)), "each stuff class is one fused segment"


def test_tiny_profile_settings_are_used(segmenter, tiny_section, m2f_dir):
    assert segmenter.model_id == str(m2f_dir)
    assert segmenter.resolution == tiny_section.resolution
    assert segmenter.threshold == tiny_section.threshold
    assert segmenter.mask_threshold == tiny_section.mask_threshold
    assert segmenter.overlap_mask_area_threshold == tiny_section.overlap_mask_area_threshold
    assert segmenter.size["shortest_edge"] == tiny_section.resolution
    assert next(segmenter.model.parameters()).dtype is torch.float32


def test_segments_are_consistent_with_the_map(results):
    images = photos()
    assert len(results) == len(images)
    for result, image in zip(results, images, strict=True):
        check_consistent(result, image)
    # the tiny profile's thresholds let the random model produce segments on every photo
    assert all(len(r.segments) >= 2 for r in results)
    labels = {s.coco_label for r in results for s in r.segments}
    assert labels <= set(COCO_PANOPTIC_LABELS)


def test_result_size_follows_the_image_not_the_resolution(tiny_section):
    seg = PanopticSegmenter(replace(tiny_section, resolution=96), device="cpu")
    image = Image.fromarray(data.astronaut()).resize((130, 70))
    (result,) = seg.segment([image])
    check_consistent(result, image)
    assert result.segment_map.shape == (70, 130)


def mixed_aspect_photos() -> list[Image.Image]:
    """Eight photos in eight different aspect ratios (portrait, landscape, square, panorama, grey)."""
    sizes = [(90, 120), (150, 100), (64, 64), (100, 75), (60, 130), (200, 70), (120, 90), (77, 101)]
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.camera(), data.rocket(), data.chelsea(),
               data.coffee(), data.astronaut()]
    return [Image.fromarray(src).resize(size) for src, size in zip(sources, sizes, strict=True)]


def segment_ious(a: PanopticResult, b: PanopticResult) -> list[float]:
    """IoU of each segment of ``a`` with the segment of the same id in ``b``."""
    ious = []
    for s in a.segments:
        x, y = a.segment_map == s.id, b.segment_map == s.id
        ious.append(float((x & y).sum() / max((x | y).sum(), 1)))
    return ious


def assert_same_segments(batched: list[PanopticResult], one_by_one: list[PanopticResult]) -> None:
    for a, b in zip(batched, one_by_one, strict=True):
        assert [(s.category_id, s.is_thing) for s in a.segments] == [(s.category_id, s.is_thing) for s in b.segments]
        assert a.segments, "every photo gets segments with the tiny profile's thresholds"
        assert min(segment_ious(a, b)) >= 0.99  # identical up to float rounding of batched matmuls


def test_mixed_aspect_batch_gives_the_same_segments_as_one_at_a_time(segmenter):
    images = mixed_aspect_photos()
    sizes = {tuple(segmenter.processor(images=[im.convert("RGB")], size=segmenter.size,
                                       return_tensors="pt")["pixel_values"].shape[-2:]) for im in images}
    assert len(sizes) >= 5, "the photos must reach the model at different sizes"
    segmenter.forwards = 0
    batched = segmenter.segment(images)
    assert segmenter.forwards == 2  # 8 images of >= 5 sizes in batches of 4: every forward full
    one_by_one = [segmenter.segment([im])[0] for im in images]
    assert segmenter.forwards == 2 + len(images)
    for result, image in zip(batched, images, strict=True):
        check_consistent(result, image)
    assert_same_segments(batched, one_by_one)


def test_images_per_forward_on_a_mixed_aspect_source(segmenter):
    """Batches of ``batch_size`` images of any aspect ratio: a full forward per batch."""
    images = mixed_aspect_photos() * 2  # 16 images, 8 aspect ratios, shuffled order
    order = np.random.default_rng(0).permutation(len(images))
    segmenter.forwards = 0
    for start in range(0, len(images), segmenter.batch_size):  # as the job's actor calls it
        segmenter.segment([images[i] for i in order[start:start + segmenter.batch_size]])
    assert len(images) / segmenter.forwards >= 0.9 * segmenter.batch_size


def test_batching_does_not_change_results(segmenter, results):
    images = photos()
    segmenter.batch_size = 1
    try:
        one_by_one = segmenter.segment(images)
    finally:
        segmenter.batch_size = 4
    assert_same_segments(results, one_by_one)


def test_crop_to_valid_keeps_the_unpadded_logits():
    from datagen.stages.segmenter import _crop_to_valid

    logits = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    # a 64 x 32 image on a 128 x 128 canvas: logits at 1/16 of the input -> the top-left 4 x 2
    cropped = _crop_to_valid(logits, (64, 32), (128, 128))
    assert cropped.shape == (1, 2, 4, 2) and torch.equal(cropped, logits[:, :, :4, :2])
    assert torch.equal(_crop_to_valid(logits, (128, 128), (128, 128)), logits)


def test_unpadded_mode_batches_only_same_size_images(tiny_section):
    seg = PanopticSegmenter(replace(tiny_section, pad_to="none"), device="cpu")
    images = [mixed_aspect_photos()[i] for i in (0, 1, 2, 4)]  # four different processed sizes
    results = seg.segment(images)
    assert seg.forwards == 4
    for result, image in zip(results, images, strict=True):
        check_consistent(result, image)
    assert_same_segments(results, [seg.segment([im])[0] for im in images])
    with pytest.raises(ProfileError, match="pad_to"):
        SegmenterSettings.from_mapping({"model": tiny_section.model, "pad_to": "batch"})


def test_threshold_filters_segments(tiny_section, results):
    none = PanopticSegmenter(replace(tiny_section, threshold=1.0), device="cpu").segment(photos()[:2])
    for r, image in zip(none, photos()[:2], strict=True):
        assert r.segments == [] and not r.segment_map.any() and r.segment_map.shape == (image.height, image.width)
    strict = PanopticSegmenter(replace(tiny_section, threshold=0.9), device="cpu").segment(photos())
    assert sum(len(r.segments) for r in strict) < sum(len(r.segments) for r in results)
    for r in strict:
        assert all(s.score > 0.9 for s in r.segments)


def test_stuff_is_fused_and_empty_segments_dropped(segmenter):
    """Post-processor output with one stuff class in two masks, a duplicate thing and an empty segment."""
    raw = torch.zeros((4, 6), dtype=torch.int32)
    raw[0, :3] = 1  # sky, first mask
    raw[3, 3:] = 4  # sky, second mask
    raw[1:3, 1] = 2  # person
    raw[1:3, 4] = 3  # person, another one
    sky = COCO_PANOPTIC_LABELS.index("sky-other-merged")
    info = [
        {"id": 1, "label_id": sky, "was_fused": False, "score": 0.7},
        {"id": 2, "label_id": 0, "was_fused": False, "score": 0.9},
        {"id": 3, "label_id": 0, "was_fused": False, "score": 0.8},
        {"id": 4, "label_id": sky, "was_fused": False, "score": 0.95},
        {"id": 5, "label_id": 16, "was_fused": False, "score": 0.99},  # dog with no pixel left
    ]
    result = segmenter._to_result(raw, info, (6, 4))
    assert [(s.id, s.coco_label, s.area, s.score) for s in result.segments] == [
        (1, "sky-other-merged", 6, 0.95), (2, "person", 2, 0.9), (3, "person", 2, 0.8)]
    assert result.segments[0].bbox == [0, 0, 6, 4] and not result.segments[0].is_thing
    assert result.segments[1].bbox == [1, 1, 2, 3] and result.segments[1].is_thing
    expected = np.array([[1, 1, 1, 0, 0, 0], [0, 2, 0, 0, 3, 0], [0, 2, 0, 0, 3, 0], [0, 0, 0, 1, 1, 1]])
    assert np.array_equal(result.segment_map, expected) and result.segment_map.dtype == np.uint16


def test_is_thing_follows_the_coco_panoptic_order():
    assert len(COCO_PANOPTIC_LABELS) == 133
    assert all(is_thing(i) for i in range(80)) and not any(is_thing(i) for i in range(80, 133))
    assert COCO_PANOPTIC_LABELS[0] == "person" and COCO_PANOPTIC_LABELS[80] == COCO_PANOPTIC_STUFF[0] == "banner"


def test_model_label_map_is_the_coco_one(segmenter):
    assert [segmenter.id2label[i] for i in range(133)] == list(COCO_PANOPTIC_LABELS)


def test_non_coco_model_is_refused(m2f_dir, tmp_path):
    from transformers import (
        AutoImageProcessor,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
    )

    config = Mask2FormerConfig.from_pretrained(m2f_dir)
    config.id2label = {i: f"class{i}" for i in range(10)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    Mask2FormerForUniversalSegmentation(config).save_pretrained(tmp_path)
    AutoImageProcessor.from_pretrained(m2f_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="10 classes, not COCO panoptic's 133"):
        PanopticSegmenter(SegmenterSettings(model=str(tmp_path)), device="cpu")


def test_missing_model_fails_at_start_up(tmp_path):
    with pytest.raises(ModelNotFoundError, match="segmenter"):
        PanopticSegmenter(SegmenterSettings(model=str(tmp_path / "no-mask2former")), device="cpu")


def test_reduced_precision_path_runs(tiny_section):
    """The GPU path (bf16 weights and inputs, fp32 post-processing), exercised on CPU."""
    seg = PanopticSegmenter(replace(tiny_section, dtype="bf16"), device="cpu")
    assert next(seg.model.parameters()).dtype is torch.bfloat16
    images = photos()[:2]
    for result, image in zip(seg.segment(images), images, strict=True):
        check_consistent(result, image)
