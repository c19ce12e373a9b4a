"""Paper-size random-weight models: exact parameter counts from the carried configs, and the three
CPU-sized ones (Mask2Former Swin-L, OpenCLIP ViT-H-14, all-mpnet-base-v2) run through the real stage
classes from their built folders. Each big model is built, used and deleted in turn (memory)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from fixtures.tiny_models import paper_size as ps

# Parameter counts worked out by hand from the configs (published approximations in comments).
# all-mpnet-base-v2 (published 109M): embeddings 30527*768 + 514*768 + LN 2*768 = 23,841,024;
# per layer: q,k,v,o 4*(768*768+768) + LN 1536 + FFN 768*3072+3072 + 3072*768+768 + LN 1536
# = 7,087,872, x12 = 85,054,464; relative-attention bias 32*12 = 384; pooler 768*768+768 = 590,592.
MPNET = 23_841_024 + 12 * 7_087_872 + 384 + 590_592
# OpenCLIP ViT-H-14 (published 986M). Vision: conv 3*14*14*1280, class 1280, positions 257*1280,
# ln_pre + ln_post 2*2560, 32 blocks of (2 LN 5120 + in_proj 3*1280*1280+3840 + out 1280*1280+1280
# + fc 1280*5120+5120 + proj 5120*1280+1280), projection 1280*1024. Text: tokens 49408*1024,
# positions 77*1024, 24 blocks of width 1024 (same shape, 4x MLP), ln_final 2048, projection
# 1024*1024; plus logit_scale.
_VIT_BLOCK = 5120 + (3 * 1280 * 1280 + 3840) + (1280 * 1280 + 1280) + (1280 * 5120 + 5120) + (5120 * 1280 + 1280)
_TXT_BLOCK = 4096 + (3 * 1024 * 1024 + 3072) + (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
VIT_H_14 = (3 * 14 * 14 * 1280 + 1280 + 257 * 1280 + 2 * 2560 + 32 * _VIT_BLOCK + 1280 * 1024
            + 49408 * 1024 + 77 * 1024 + 24 * _TXT_BLOCK + 2048 + 1024 * 1024 + 1)
# Mask2Former Swin-L COCO panoptic: published "216M" (Mask2Former paper, Table 2). The exact count
# of transformers' implementation of the carried config, pinned here (Swin-L backbone 195,204,276).
MASK2FORMER_SWIN_L = 215_538_682
SWIN_L_BACKBONE = 195_204_276
# CLIP ViT-L/14 vision + projection (published 304M): 24 blocks of width 1024 with biases,
# conv 3*14*14*1024, class 1024, positions 257*1024, pre/post LN, projection 1024*768.
_L_BLOCK = 2 * 2048 + 4 * (1024 * 1024 + 1024) + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
CLIP_VIT_L_14 = 3 * 14 * 14 * 1024 + 1024 + 257 * 1024 + 2 * 2048 + 24 * _L_BLOCK + 1024 * 768
# SD1.5 (published: U-Net 860M, VAE 84M, text encoder 123M); diffusers' / transformers' exact counts.
SD15_UNET, SD15_VAE, SD15_TEXT = 859_520_964, 83_653_863, 123_060_480
# BLIP-2 OPT-6.7B COCO (published 7.75B): OPT-6.7B with the 50304-token vocabulary is
# 32 layers x (4*(4096*4096+4096) + 2*4096 LN + 4096*16384+16384 + 16384*4096+4096 + 2*4096 LN)
# + tokens 50304*4096 + positions 2050*4096 + final LN 8192 (lm_head tied).
_OPT_LAYER = 4 * (4096 * 4096 + 4096) + 8192 + (4096 * 16384 + 16384) + (16384 * 4096 + 4096) + 8192
OPT_6_7B = 32 * _OPT_LAYER + 50304 * 4096 + 2050 * 4096 + 8192
BLIP2_OPT_6_7B_COCO = 7_753_460_736


def test_every_spec_says_where_its_numbers_come_from():
    for name in ps.PAPER_BUILDERS:
        spec = ps.load_spec(name)
        assert len(spec["_source"]) > 80, name
    import open_clip

    own = json.loads((Path(open_clip.__file__).parent / "model_configs" / "ViT-H-14.json").read_text())
    assert ps.load_spec("open_clip")["model_cfg"] == own, "ViT-H-14 must be open_clip's own model config"


def test_parameter_counts_match_the_published_architectures():
    """Counted on the meta device: no memory, every model including BLIP-2 6.7B."""
    counts = {
        "mask2former": ps.count_parameters(ps.mask2former_model(ps.load_spec("mask2former"), "meta")),
        "open_clip": ps.count_parameters(ps.open_clip_model(ps.load_spec("open_clip"), "meta")),
        "sbert": ps.count_parameters(ps.mpnet_model(ps.load_spec("sbert"), "meta")),
        "clip-vision": ps.count_parameters(ps.clip_vision_model(ps.load_spec("clip_vision"), "meta")),
    }
    assert counts == {"mask2former": MASK2FORMER_SWIN_L, "open_clip": VIT_H_14, "sbert": MPNET,
                      "clip-vision": CLIP_VIT_L_14}
    assert MPNET == 109_486_464 and VIT_H_14 == 986_109_441 and CLIP_VIT_L_14 == 303_966_208
    assert abs(MASK2FORMER_SWIN_L / 216e6 - 1) < 0.005
    unet, vae, text = ps.stable_diffusion_models(ps.load_spec("stable_diffusion"), "meta")
    assert (ps.count_parameters(unet), ps.count_parameters(vae), ps.count_parameters(text)) == (
        SD15_UNET, SD15_VAE, SD15_TEXT)
    blip2 = ps.blip2_model(ps.load_spec("blip2"), "meta")
    assert ps.count_parameters(blip2.language_model) == OPT_6_7B
    assert ps.count_parameters(blip2) == BLIP2_OPT_6_7B_COCO
    assert abs(BLIP2_OPT_6_7B_COCO / 7.75e9 - 1) < 0.001


def test_random_fill_sets_norms_to_one_biases_to_zero_and_weights_to_std_002():
    import torch

    layer = torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.LayerNorm(300))
    ps.random_fill(layer)
    w = layer[0].weight.detach()
    assert abs(w.std().item() - 0.02) < 0.001 and w.abs().max().item() <= 0.02 * 3 ** 0.5 + 1e-7
    assert torch.all(layer[0].bias == 0) and torch.all(layer[1].weight == 1) and torch.all(layer[1].bias == 0)


def test_paper_shapes_profile_points_at_the_paper_size_folders_with_the_paper_settings(tmp_path, monkeypatch):
    from datagen.config import PAPER_SHAPES_ENV, load_profile

    monkeypatch.setenv(PAPER_SHAPES_ENV, str(tmp_path))
    shapes, paper = load_profile("paper-shapes"), load_profile("paper")
    assert shapes.random_weights is True and paper.random_weights is False
    assert shapes.captioner.model == f"{tmp_path}/blip2"
    assert shapes.matcher.clip_model == f"local-dir:{tmp_path}/open_clip"
    folders = {shapes.captioner.model, shapes.segmenter.model, shapes.matcher.sbert_model,
               shapes.matcher.clip_model.removeprefix("local-dir:"), shapes.trainer.pretrained,
               shapes.trainer.image_encoder, shapes.sam3.model}
    assert {f.removeprefix(f"{tmp_path}/") for f in folders} == set(ps.PAPER_BUILDERS)
    for stage in ("captioner", "segmenter"):
        ours, theirs = dataclasses.asdict(getattr(shapes, stage)), dataclasses.asdict(getattr(paper, stage))
        assert {k: v for k, v in ours.items() if k != "model"} == {k: v for k, v in theirs.items() if k != "model"}


def test_build_all_skips_blip2_unless_asked_and_says_so(tmp_path):
    lines = []
    built = ps.build_paper_all(tmp_path, names=["blip2"], log=lines.append)
    assert built == {} and lines[0] == ps.RANDOM_WEIGHTS_LINE
    assert "skipped" in lines[1] and "--include-blip2" in lines[1] and not (tmp_path / "blip2").exists()


@pytest.fixture
def built(tmp_path):
    """``built(name)`` builds one paper-size model; every folder is deleted after the test."""
    def get(name):
        return ps.build_paper_one(name, tmp_path)

    yield get
    shutil.rmtree(tmp_path, ignore_errors=True)


def astronaut(size=(320, 240)) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize(size)


@pytest.mark.slow
@pytest.mark.scale
def test_mask2former_swin_l_segments_one_image_through_the_segmenter(built, monkeypatch):
    from datagen.config import PAPER_SHAPES_ENV, load_profile
    from datagen.stages.segmenter import PanopticSegmenter

    folder = built("mask2former")
    monkeypatch.setenv(PAPER_SHAPES_ENV, str(folder.parent))
    segmenter = PanopticSegmenter(load_profile("paper-shapes").segmenter, "cpu")
    assert ps.count_parameters(segmenter.model) == MASK2FORMER_SWIN_L
    assert ps.count_parameters(segmenter.model.model.pixel_level_module.encoder) == SWIN_L_BACKBONE
    assert segmenter.model.config.num_queries == 200 and segmenter.canvas == (640, 640)
    assert segmenter.processor.size_divisor == 32
    image = astronaut()
    result = segmenter.segment([image])[0]
    assert result.segment_map.shape == (240, 320) and result.segment_map.dtype == np.uint16
    assert segmenter.forwards == 1
    ids = set(np.unique(result.segment_map).tolist()) - {0}
    assert ids == {s.id for s in result.segments}


@pytest.mark.slow
@pytest.mark.scale
def test_vit_h_14_and_mpnet_match_one_caption_through_the_matcher(built, monkeypatch):
    from datagen.config import PAPER_SHAPES_ENV, load_profile
    from datagen.stages.matcher import Matcher
    from datagen.stages.phrases import ChunkedCaption, NounPhrase
    from datagen.stages.segmenter import PanopticResult, SegmentInfo

    built("sbert")
    folder = built("open_clip")
    monkeypatch.setenv(PAPER_SHAPES_ENV, str(folder.parent))
    matcher = Matcher(load_profile("paper-shapes").matcher, "cpu")
    assert ps.count_parameters(matcher.clip) == VIT_H_14
    assert ps.count_parameters(matcher.sbert) == MPNET
    assert matcher.sbert.max_seq_length == 384 and len(matcher.sbert.tokenizer) == 30527
    # MPNet ids are BERT-uncased ids + 4: "a" is BERT 1037, "man" 2158
    assert matcher.sbert.tokenizer("a man")["input_ids"] == [0, 1041, 2162, 2]

    image = astronaut((160, 120))
    seg = np.zeros((120, 160), np.uint16)
    seg[:, :80], seg[:, 80:] = 1, 2
    panoptic = PanopticResult(seg, [SegmentInfo(1, 0, "person", True, [0, 0, 80, 120], 9600, 0.9),
                                    SegmentInfo(2, 80, "wall-other-merged", False, [80, 0, 160, 120], 9600, 0.9)])
    caption = "a woman in a space suit"
    chunked = ChunkedCaption(caption, caption, [NounPhrase("a woman", 0, 7), NounPhrase("a space suit", 11, 23)])
    result = matcher.match([image], [panoptic], [chunked])[0]
    assert result.segment_ids == [1, 2] and result.clip.shape == (2, 2) and result.sbert.shape == (2, 2)
    assert np.all(np.abs(result.clip) <= 1.0001) and np.all(np.isfinite(result.product))
    np.testing.assert_allclose(result.product, result.clip * result.sbert, rtol=1e-6)
    assert matcher.encode_crops([np.zeros((50, 40, 3), np.uint8)]).shape == (1, 1024)


@pytest.mark.slow
def test_blip2_format_at_real_vocabulary_and_image_geometry_captions_through_the_captioner(tmp_path, monkeypatch):
    """BLIP-2 at full size is GPU-only; its folder format is checked here at depth 1 and a narrow
    OPT, keeping what the loading path depends on: 364 px images, 32 query tokens, the 50304-token
    vocabulary with <image> at 50265 and '\\n' (eos) at 50118, max_new_tokens forced."""
    from datagen.config import CaptionerSettings
    from datagen.stages.captioner import Captioner

    overrides = {"config": {
        "vision_config": {"num_hidden_layers": 1},
        "qformer_config": {"num_hidden_layers": 1},
        "text_config": {"num_hidden_layers": 1, "hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 128,
                        "num_attention_heads": 2},
    }}
    dest = tmp_path / "blip2"
    dest.mkdir()
    ps.build_blip2(dest, device="cpu", overrides=overrides)
    captioner = Captioner(CaptionerSettings(model=str(dest), max_new_tokens=5), device="cpu")
    tok = captioner.processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == captioner.model.config.image_token_index == 50265
    assert tok.convert_tokens_to_ids("\u010a") == captioner.model.config.text_config.eos_token_id == 50118
    assert captioner.processor.num_query_tokens == 32 == captioner.model.config.num_query_tokens
    assert captioner.processor.image_processor.size == {"height": 364, "width": 364}
    assert captioner.model.get_input_embeddings().weight.shape[0] == 50304
    captioner.model.generation_config.min_new_tokens = 5  # as bench_gpu forces the full length
    inputs = captioner.processor(images=[astronaut()], return_tensors="pt")
    lengths = [captioner.model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False).shape[1]
               for k in (3, 5)]
    assert lengths[1] - lengths[0] == 2  # every forced token is generated, EOS or not
    assert isinstance(captioner.caption([astronaut()])[0], str)
