"""The Captioner on the tiny BLIP-2 through the real transformers generate, plus caption cleaning/flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from datagen.config import TINY_MODELS_ENV, CaptionerSettings, ProfileError, load_profile
from datagen.stages.captioner import Captioner, caption_flags, clean_caption
from datagen.stages.model_loading import ModelNotFoundError


def photos() -> list[Image.Image]:
    """Three public-domain photos of different sizes and modes (one grayscale)."""
    return [
        Image.fromarray(data.astronaut()).resize((96, 96)),
        Image.fromarray(data.camera()).resize((80, 64)),  # mode L: converted to RGB by the stage
        Image.fromarray(data.coffee()).resize((120, 80)),
    ]


@pytest.fixture(scope="module")
def blip2_dir(tiny_model):
    return tiny_model("blip2")


@pytest.fixture(scope="module")
def captioner(blip2_dir):
    return Captioner(CaptionerSettings(model=str(blip2_dir), batch_size=3, max_new_tokens=12, num_beams=1), device="cpu")


def test_from_tiny_profile_uses_the_profile_settings(blip2_dir, monkeypatch):
    monkeypatch.setenv(TINY_MODELS_ENV, str(blip2_dir.parent))
    section = load_profile("tiny").captioner
    cap = Captioner(section, device="cpu")
    assert cap.model_id == str(blip2_dir)
    assert (cap.batch_size, cap.max_new_tokens, cap.num_beams) == (4, 12, 1)  # tiny.yaml's values
    assert cap.dtype is torch.float32 and next(cap.model.parameters()).dtype is torch.float32
    out = cap.caption(photos()[:1])
    assert len(out) == 1 and isinstance(out[0], str)


def test_captions_are_what_transformers_generates_cleaned(captioner, blip2_dir):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    images = photos()
    captions = captioner.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)

    # the same model driven by hand, the way the transformers docs caption with BLIP-2
    processor = AutoProcessor.from_pretrained(blip2_dir)
    model = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    inputs = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, num_beams=1, do_sample=False)
    raw = processor.batch_decode(ids, skip_special_tokens=True)
    assert captions == [clean_caption(r) for r in raw]
    assert any(c for c in captions), "the tiny model should say something for at least one photo"
    for c in captions:
        assert c == c.strip() and "  " not in c
        assert "<image>" not in c and "</s>" not in c and "<pad>" not in c
        assert all(ch.isprintable() for ch in c)


def test_batching_does_not_change_captions(captioner):
    images = photos()
    together = captioner.caption(images)
    captioner.batch_size = 1
    try:
        one_by_one = captioner.caption(images)
    finally:
        captioner.batch_size = 3
    captioner.batch_size = 2
    try:
        in_twos = captioner.caption(images)
    finally:
        captioner.batch_size = 3
    assert one_by_one == together == in_twos


def test_max_new_tokens_bounds_the_caption(blip2_dir):
    images = photos()
    long = Captioner(CaptionerSettings(model=str(blip2_dir), batch_size=3, max_new_tokens=12), "cpu").caption(images)
    short = Captioner(CaptionerSettings(model=str(blip2_dir), batch_size=3, max_new_tokens=2), "cpu").caption(images)
    for s, full in zip(short, long, strict=True):
        assert full.startswith(s)  # greedy decoding: the short caption is a prefix of the long one
    assert sum(map(len, short)) < sum(map(len, long))


def test_beam_search_runs(blip2_dir):
    settings = CaptionerSettings(model=str(blip2_dir), batch_size=2, max_new_tokens=6, num_beams=2)
    out = Captioner(settings, device="cpu").caption(photos())
    assert len(out) == 3 and all(isinstance(c, str) and c == clean_caption(c) for c in out)


def test_no_images_no_captions(captioner):
    assert captioner.caption([]) == []


def test_missing_model_fails_at_start_up(tmp_path):
    with pytest.raises(ModelNotFoundError, match="captioner"):
        Captioner(CaptionerSettings(model=str(tmp_path / "no-blip2")), device="cpu")
    with pytest.raises(ProfileError, match="captioner.model is required"):
        CaptionerSettings.from_mapping({"batch_size": 2}, "captioner")


def test_bad_settings_are_refused(blip2_dir):
    with pytest.raises(ProfileError, match="batch_size must be >= 1, got 0"):
        CaptionerSettings(model=str(blip2_dir), batch_size=0)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a man   riding\na horse \t", "a man riding a horse"),
        ("</s>a dog<pad><pad>", "a dog"),
        ("a cat\x16\x16 on a mat\ufffd", "a cat on a mat"),
        ("\x0b\x0b", ""),
        ("", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw, special_tokens=["</s>", "<pad>"]) == clean


@pytest.mark.parametrize(
    ("caption", "flags"),
    [
        ("a man riding a horse on a beach", []),
        ("a dog and a dog", []),
        ("a 10000 meter race", []),
        ("a bookkeeper in mississippi", []),
        ("", ["empty"]),
        ("   ", ["empty"]),
        ("1 2 3", ["degenerate"]),
        ("... !!", ["degenerate"]),
        ("table table table table", ["degenerate"]),
        ("a man man man", ["degenerate"]),
        ("Dog, dog. dog", ["degenerate"]),
        ("dog a dog the dog dog", ["degenerate"]),
        ("okokokok jack", ["degenerate"]),
        ("QQQQQQQQ", ["degenerate"]),
    ],
)
def test_caption_flags(caption, flags):
    assert caption_flags(caption) == flags


def test_flags_of_tiny_model_captions_are_well_formed(captioner):
    for c in captioner.caption(photos()):
        flags = caption_flags(c)
        assert set(flags) <= {"empty", "degenerate"} and len(flags) <= 1
        assert (flags == ["empty"]) == (c == "")
        assert np.all([ch.isprintable() for ch in c])


def test_reduced_precision_path_runs(blip2_dir):
    """The GPU path (bf16 weights, inputs cast to the model dtype), exercised on CPU."""
    cap = Captioner(CaptionerSettings(model=str(blip2_dir), batch_size=3, max_new_tokens=6, dtype="bf16"), "cpu")
    assert cap.dtype is torch.bfloat16 and next(cap.model.parameters()).dtype is torch.bfloat16
    out = cap.caption(photos())
    assert len(out) == 3 and all(c == clean_caption(c) for c in out)
