"""The Matcher on the tiny OpenCLIP and the real all-MiniLM-L6-v2, on a hand-made image and segments."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer

from datagen.config import MatcherSettings
from datagen.stages.crops import fill_colour, segment_crop
from datagen.stages.greedy import greedy_match
from datagen.stages.matcher import Matcher, MatchError, MatchResult
from datagen.stages.model_loading import ModelNotFoundError
from datagen.stages.phrases import ChunkedCaption, NounPhrase
from datagen.stages.segmenter import PanopticResult, SegmentInfo
from fixtures.tiny_models.open_clip_model import build_open_clip

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


def chunk(*texts: str) -> ChunkedCaption:
    caption, phrases = "", []
    for t in texts:
        if caption:
            caption += " and "
        phrases.append(NounPhrase(text=t, start=len(caption), end=len(caption) + len(t)))
        caption += t
    return ChunkedCaption(caption_raw=caption, caption=caption, phrases=phrases)


def tight_bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def make_scene(seed: int = 0) -> tuple[Image.Image, PanopticResult]:
    """48x64 noise image; a disc (person), a triangle (dog) and a rectangle (bicycle)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:48, :64]
    seg_map = np.zeros((48, 64), dtype=np.uint16)
    seg_map[(yy - 15) ** 2 + (xx - 14) ** 2 <= 10**2] = 3  # disc: box corners are outside the mask
    seg_map[(yy >= 28) & (xx >= 30) & (xx - 30 <= yy - 28)] = 7  # triangle
    seg_map[2:12, 40:62] = 12  # rectangle, wider than tall
    labels = {3: "person", 7: "dog", 12: "bicycle"}
    segments = [
        SegmentInfo(id=sid, category_id=k, coco_label=labels[sid], is_thing=True,
            bbox=tight_bbox(seg_map == sid), area=int((seg_map == sid).sum()), score=0.9)
        for k, sid in enumerate((3, 7, 12))
    ]
    return Image.fromarray(pixels), PanopticResult(seg_map, segments)


@pytest.fixture(scope="module")
def section(tiny_model):
    return MatcherSettings(
        clip_model="local-dir:" + str(tiny_model("open_clip")),
        clip_pretrained=None,
        sbert_model=str(tiny_model("sbert")),
        batch_size=64,
        min_score=0.0,
        dtype="auto",
    )


@pytest.fixture(scope="module")
def matcher(section):
    return Matcher(section, device="cpu")


def sibling(matcher: Matcher, section: MatcherSettings, **settings) -> Matcher:
    """A second Matcher on the same loaded models (own label cache), with other settings."""
    return Matcher(replace(section, **settings), device="cpu", models=matcher.models)


# ---- the tiny OpenCLIP folder ----------------------------------------------------------------
def test_tiny_open_clip_loads_with_local_dir_and_real_tokenizer(tiny_model):
    folder = tiny_model("open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(folder))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(folder))
    tokens = tokenizer(["a man riding a red bike"])
    assert tokens.shape == (1, 77)
    assert tokens[0, 0].item() == 49406 and 49407 in tokens[0].tolist()  # CLIP BPE start/end tokens
    image = preprocess(Image.new("RGB", (50, 30), (10, 200, 30))).unsqueeze(0)
    assert image.shape == (1, 3, 32, 32)
    with torch.inference_mode():
        assert model.encode_image(image).shape == (1, 32)
        assert model.encode_text(tokens).shape == (1, 32)


def test_tiny_open_clip_build_is_deterministic(tiny_model, tmp_path):
    build_open_clip(tmp_path / "again")
    first = tiny_model("open_clip") / "open_clip_model.safetensors"
    second = tmp_path / "again" / "open_clip_model.safetensors"
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()


# ---- crops ---------------------------------------------------------------------------------
def test_crop_keeps_mask_pixels_and_greys_the_rest():
    image, pan = make_scene()
    rgb = np.asarray(image)
    fill = fill_colour(OPENAI_MEAN)
    assert fill.tolist() == [123, 117, 104]
    for seg in pan.segments:
        x0, y0, x1, y1 = seg.bbox
        w, h = x1 - x0, y1 - y0
        crop = segment_crop(rgb, pan.segment_map, seg.id, seg.bbox, fill)
        side = max(w, h)
        assert crop.shape == (side, side, 3) and crop.dtype == np.uint8
        top, left = (side - h) // 2, (side - w) // 2
        inner = crop[top:top + h, left:left + w]
        mask = pan.segment_map[y0:y1, x0:x1] == seg.id
        assert np.array_equal(inner[mask], rgb[y0:y1, x0:x1][mask])
        assert (inner[~mask] == fill).all()
        padding = np.ones((side, side), dtype=bool)
        padding[top:top + h, left:left + w] = False
        assert (crop[padding] == fill).all()
    # the disc and the triangle leave part of their box outside the mask; the wide box is padded
    disc = pan.segments[0]
    assert (~(pan.segment_map[disc.bbox[1]:disc.bbox[3], disc.bbox[0]:disc.bbox[2]] == disc.id)).any()


def test_pixels_outside_the_mask_do_not_change_clip_scores(matcher):
    image, pan = make_scene()
    phrases = chunk("a man", "a small dog")
    base = matcher.match([image], [pan], [phrases])[0]

    outside = np.asarray(image).copy()
    outside[pan.segment_map == 0] = 0  # background only: in the boxes, outside every mask
    same = matcher.match([Image.fromarray(outside)], [pan], [phrases])[0]
    np.testing.assert_allclose(same.clip, base.clip, atol=1e-6)

    inside = np.asarray(image).copy()
    inside[pan.segment_map == 3] = 255  # the person's own pixels
    moved = matcher.match([Image.fromarray(inside)], [pan], [phrases])[0]
    assert not np.allclose(moved.clip[:, 0], base.clip[:, 0], atol=1e-6)
    np.testing.assert_allclose(moved.clip[:, 1:], base.clip[:, 1:], atol=1e-6)


# ---- scores and matches --------------------------------------------------------------------
def test_matrices_are_phrases_by_segments_and_product_is_clip_times_sbert(matcher):
    image, pan = make_scene()
    phrases = chunk("a man", "a small dog", "a red bike", "the sky")
    (result,) = matcher.match([image], [pan], [phrases])
    assert isinstance(result, MatchResult)
    assert result.segment_ids == [3, 7, 12]
    for m in (result.clip, result.sbert, result.product):
        assert m.shape == (4, 3) and m.dtype == np.float32
        assert np.isfinite(m).all() and (np.abs(m) <= 1.0 + 1e-5).all()
    assert np.array_equal(result.product, result.clip * result.sbert)
    assert result.min_score == 0.0
    expected = [(p, result.segment_ids[c]) for p, c in greedy_match(result.product, 0.0)]
    assert result.pairs == expected
    assert all(result.product[p, result.segment_ids.index(s)] >= 0.0 for p, s in result.pairs)


def test_scores_equal_the_models_computed_directly(matcher, section):
    image, pan = make_scene()
    texts = ["a man", "a small dog", "a red bike"]
    (result,) = matcher.match([image], [pan], [chunk(*texts)])

    model, _, preprocess = open_clip.create_model_and_transforms(section.clip_model)
    tokenizer = open_clip.get_tokenizer(section.clip_model)
    fill = fill_colour(OPENAI_MEAN)
    crops = [segment_crop(np.asarray(image), pan.segment_map, s.id, s.bbox, fill) for s in pan.segments]
    with torch.inference_mode():
        img = model.encode_image(torch.stack([preprocess(Image.fromarray(c)) for c in crops]), normalize=True)
        txt = model.encode_text(tokenizer(texts), normalize=True)
    np.testing.assert_allclose(result.clip, (txt @ img.T).numpy(), atol=1e-5)

    sbert = SentenceTransformer(section.sbert_model, device="cpu")
    labels = [s.coco_label for s in pan.segments]
    a = sbert.encode(texts, normalize_embeddings=True)
    b = sbert.encode(labels, normalize_embeddings=True)
    np.testing.assert_allclose(result.sbert, a @ b.T, atol=1e-5)


def test_without_threshold_every_phrase_or_segment_is_matched(section):
    m = Matcher(replace(section, min_score=None), device="cpu")
    assert m.min_score == -1.0  # null = no threshold; -1 is the lowest product of two cosines
    image, pan = make_scene()
    (two,) = m.match([image], [pan], [chunk("a man", "a dog")])
    assert len(two.pairs) == 2 and len({s for _, s in two.pairs}) == 2
    (five,) = m.match([image], [pan], [chunk("a man", "a dog", "a bike", "a tree", "a cup")])
    assert sorted(s for _, s in five.pairs) == [3, 7, 12]
    scores = [five.product[p, five.segment_ids.index(s)] for p, s in five.pairs]
    assert scores == sorted(scores, reverse=True)
    assert five.pairs == [(p, five.segment_ids[c]) for p, c in greedy_match(five.product)]


def test_batch_of_images_and_crop_batch_size_do_not_change_results(matcher, section):
    small = sibling(matcher, section, batch_size=2)
    big = sibling(matcher, section, batch_size=64)
    scenes = [make_scene(0), make_scene(1)]
    images = [im for im, _ in scenes]
    pans = [p for _, p in scenes]
    chunks = [chunk("a man", "a dog"), chunk("a red bike", "a man", "a cat")]
    together = big.match(images, pans, chunks)
    in_small_batches = small.match(images, pans, chunks)
    one_by_one = [big.match([i], [p], [c])[0] for i, p, c in zip(images, pans, chunks, strict=True)]
    for a, b, c in zip(together, in_small_batches, one_by_one, strict=True):
        np.testing.assert_allclose(a.clip, b.clip, atol=1e-5)
        np.testing.assert_allclose(a.clip, c.clip, atol=1e-5)
        np.testing.assert_allclose(a.sbert, c.sbert, atol=1e-5)
        assert a.pairs == c.pairs
    assert together[0].product.shape == (2, 3) and together[1].product.shape == (3, 3)
    # different noise in the two images -> different crops -> different CLIP scores for "a man"
    assert not np.allclose(together[0].clip[0], together[1].clip[1])


def test_label_embeddings_are_encoded_once_and_cached(matcher, section):
    m = sibling(matcher, section)
    assert m.labels_encoded == 0 and m.cached_labels == []
    image, pan = make_scene()
    first = m.match([image, image], [pan, pan], [chunk("a man"), chunk("a dog")])
    assert m.labels_encoded == 3  # three distinct labels over two images: encoded once each
    assert m.cached_labels == ["bicycle", "dog", "person"]
    cached = {k: v for k, v in m.label_embeddings(["person", "dog", "bicycle"]).items()}
    assert m.labels_encoded == 3

    second = m.match([image], [pan], [chunk("a man")])
    assert m.labels_encoded == 3  # nothing re-encoded
    for label, emb in m.label_embeddings(["person", "dog", "bicycle"]).items():
        assert emb is cached[label]
    np.testing.assert_array_equal(first[0].sbert, second[0].sbert)

    image2, pan2 = make_scene(3)
    pan2.segments[1].coco_label = "cat"
    m.match([image2], [pan2], [chunk("a cat")])
    assert m.labels_encoded == 4 and m.cached_labels == ["bicycle", "cat", "dog", "person"]


def test_a_label_set_encoded_at_once_depends_only_on_the_set(matcher, section):
    labels = ["person", "dog", "bicycle", "traffic light", "cat", "wall-other-merged"]
    a, b = sibling(matcher, section), sibling(matcher, section)
    a.encode_label_set(labels)
    b.encode_label_set(list(reversed(labels)) + ["dog"])  # another order, a repeat: the same set
    assert a.labels_encoded == b.labels_encoded == 6 and a.cached_labels == sorted(labels)
    one_by_one = sibling(matcher, section)
    for label in labels:
        ea, eb = a.label_embeddings([label])[label], b.label_embeddings([label])[label]
        np.testing.assert_array_equal(ea, eb)
        assert abs(float(np.linalg.norm(ea)) - 1.0) < 1e-5
        # the same embedding as one forward per label, up to batch-shape rounding
        np.testing.assert_allclose(ea, one_by_one.label_embeddings([label])[label], atol=1e-5)
    assert a.labels_encoded == 6  # served from the cache
    with pytest.raises(RuntimeError, match="empty label cache"):
        a.encode_label_set(["tree"])


def test_zero_phrases_or_zero_segments(matcher):
    image, pan = make_scene()
    empty_pan = PanopticResult(np.zeros_like(pan.segment_map), [])
    results = matcher.match(
        [image, image, image, image],
        [pan, empty_pan, empty_pan, pan],
        [chunk(), chunk("a man", "a dog"), chunk(), chunk("a man")],
    )
    shapes = [r.product.shape for r in results]
    assert shapes == [(0, 3), (2, 0), (0, 0), (1, 3)]
    assert [r.pairs for r in results[:3]] == [[], [], []]
    assert results[0].segment_ids == [3, 7, 12] and results[1].segment_ids == []
    for r in results[:3]:
        assert r.clip.shape == r.sbert.shape == r.product.shape
    # the one image with both sides is scored as if alone
    (alone,) = matcher.match([image], [pan], [chunk("a man")])
    np.testing.assert_allclose(results[3].product, alone.product, atol=1e-6)
    assert matcher.match([], [], []) == []


# ---- bad input ------------------------------------------------------------------------------
def test_bad_inputs_are_named(matcher):
    image, pan = make_scene()
    with pytest.raises(MatchError, match="2 images, 1 panoptic"):
        matcher.match([image, image], [pan], [chunk("a man"), chunk("a dog")])
    small_map = PanopticResult(pan.segment_map[:20], pan.segments)
    with pytest.raises(MatchError, match="image 0: segment map is 64x20"):
        matcher.match([image], [small_map], [chunk("a man")])
    wrong_box = PanopticResult(pan.segment_map, [SegmentInfo(7, 1, "dog", True, [0, 0, 5, 5], 10, 0.9)])
    with pytest.raises(MatchError, match="segment 7 has no pixel"):
        matcher.match([image], [wrong_box], [chunk("a dog")])
    outside = PanopticResult(pan.segment_map, [SegmentInfo(7, 1, "dog", True, [30, 28, 70, 48], 10, 0.9)])
    with pytest.raises(MatchError, match=r"segment 7 bbox \[30, 28, 70, 48\]"):
        matcher.match([image], [outside], [chunk("a dog")])


# ---- model loading ----------------------------------------------------------------------------
def test_missing_local_models_fail_at_construction_naming_the_folder(section, tmp_path):
    missing = tmp_path / "nowhere" / "open_clip"
    with pytest.raises(ModelNotFoundError, match="nowhere") as err:
        Matcher(replace(section, clip_model="local-dir:" + str(missing)), device="cpu")
    assert "tiny-models" in str(err.value)
    no_config = tmp_path / "empty"
    no_config.mkdir()
    with pytest.raises(ModelNotFoundError, match="open_clip_config.json"):
        Matcher(replace(section, clip_model="local-dir:" + str(no_config)), device="cpu")
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        Matcher(replace(section, sbert_model=str(tmp_path / "nowhere" / "sbert")), device="cpu")


def test_paper_models_offline_without_cache_fail_naming_model_and_cache(section, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError) as err:
        Matcher(replace(section, clip_model="ViT-H-14", clip_pretrained="laion2b_s32b_b79k"), device="cpu")
    msg = str(err.value)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in msg and "empty-cache" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(ModelNotFoundError) as err:
        Matcher(replace(section, sbert_model="sentence-transformers/all-mpnet-base-v2"), device="cpu")
    assert "sentence-transformers/all-mpnet-base-v2" in str(err.value) and "empty-cache" in str(err.value)


def test_architecture_without_weights_or_unknown_name_is_refused(section):
    with pytest.raises(ValueError, match="clip_pretrained"):
        Matcher(replace(section, clip_model="ViT-H-14", clip_pretrained=None), device="cpu")
    with pytest.raises(ValueError, match="laion2b_s32b_b79k"):
        Matcher(replace(section, clip_model="ViT-H-14", clip_pretrained="no-such-tag"), device="cpu")
    with pytest.raises(ValueError, match="ViT-Q-99"):
        Matcher(replace(section, clip_model="ViT-Q-99", clip_pretrained="x"), device="cpu")
