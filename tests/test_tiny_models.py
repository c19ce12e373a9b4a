"""Tiny models: build bookkeeping, real on-disk formats, determinism, and loading them as hub ids."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from skimage import data

from datagen.config import CaptionerSettings, MatcherSettings, SegmenterSettings
from datagen.stages.model_loading import RANDOM_WEIGHTS_MARKER
from fixtures import tiny_models
from fixtures.tiny_models import BUILDERS, COMPLETE, build_all, build_one, folder_size
from fixtures.tiny_models.mask2former import COCO_PANOPTIC_LABELS

ALL_NAMES = {"blip2", "mask2former", "open_clip", "sbert", "stable-diffusion", "clip-vision", "facenet"}


def astronaut(size=(96, 96)) -> Image.Image:
    return Image.fromarray(data.astronaut()).resize(size)


def test_every_model_the_tiny_profile_names_has_a_builder(tmp_path, monkeypatch):
    from datagen.config import TINY_MODELS_ENV, load_profile

    monkeypatch.setenv(TINY_MODELS_ENV, str(tmp_path))
    profile = load_profile("tiny")
    named = [profile.captioner.model, profile.segmenter.model, profile.matcher.clip_model, profile.matcher.sbert_model,
             profile.trainer.pretrained, profile.trainer.image_encoder, profile.evaluation.face_embedder]
    folders = {str(v).removeprefix("local-dir:").removeprefix(str(tmp_path) + "/") for v in named}
    assert folders <= set(BUILDERS), f"tiny profile names models no builder makes: {folders - set(BUILDERS)}"
    assert ALL_NAMES <= set(BUILDERS)


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("blip2", {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                   "tokenizer_config.json", "generation_config.json", COMPLETE, RANDOM_WEIGHTS_MARKER}),
        ("mask2former", {"config.json", "model.safetensors", "preprocessor_config.json", COMPLETE, RANDOM_WEIGHTS_MARKER}),
    ],
)
def test_folder_is_a_save_pretrained_folder(tiny_model, name, files):
    folder = tiny_model(name)
    assert {p.name for p in folder.iterdir()} == files
    assert folder_size(folder) < 3_000_000  # a few MB at most
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{name}.")], "no temp folder left"


def test_blip2_config_processor_and_tokenizer_agree(tiny_model):
    from transformers import AutoProcessor, Blip2Config

    folder = tiny_model("blip2")
    config = Blip2Config.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    assert type(processor).__name__ == "Blip2Processor"
    assert processor.num_query_tokens == config.num_query_tokens
    assert config.image_token_index == tok.convert_tokens_to_ids("<image>")
    assert config.text_config.model_type == "opt" and config.text_config.vocab_size == len(tok)
    # OPT's special tokens, and a real byte-level BPE: any English text round-trips
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    text = "Two elderly women with a Zebra-striped umbrella, 3 dogs & a café!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned, not bytes only
    assert processor.image_processor.size["height"] == 64


def test_mask2former_has_the_coco_panoptic_label_map(tiny_model):
    config = json.loads((tiny_model("mask2former") / "config.json").read_text())
    id2label = {int(k): v for k, v in config["id2label"].items()}
    assert [id2label[i] for i in range(133)] == list(COCO_PANOPTIC_LABELS)
    assert id2label[0] == "person" and id2label[79] == "toothbrush" and id2label[80] == "banner"
    assert id2label[132] == "rug-merged"
    assert config["backbone_config"]["model_type"] == "swin"


@pytest.mark.parametrize("name", ["blip2", "mask2former"])
def test_builds_are_deterministic(tiny_model, tmp_path, name):
    again = build_one(name, tmp_path)
    first = tiny_model(name)
    for f in sorted(p.name for p in first.iterdir()):
        assert (again / f).read_bytes() == (first / f).read_bytes(), f"{name}/{f} differs between builds"


def test_interrupted_build_leaves_nothing_finished(tmp_path, monkeypatch):
    def crash(dest):
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(tiny_models.BUILDERS, "blip2", crash)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_one("blip2", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unfinished_folder_is_rebuilt_and_finished_one_kept(tmp_path):
    stale = tmp_path / "mask2former"
    stale.mkdir()
    (stale / "config.json").write_text("{half written")
    folder = build_one("mask2former", tmp_path)
    assert folder == stale and (folder / COMPLETE).is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mask2former"
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    build_one("mask2former", tmp_path)  # complete: not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_unknown_name_is_refused(tmp_path):
    with pytest.raises(KeyError, match="no tiny model named 'bert'"):
        build_one("bert", tmp_path)
    with pytest.raises(KeyError, match="'bert'"):
        build_all(tmp_path, names=["blip2", "bert"])


def test_command_builds_and_prints_the_export_hint(tmp_path, capsys):
    from cli.main import main

    root = tmp_path / "tiny"
    assert main(["tiny-models", str(root), "--only", "mask2former"]) == 0
    out = capsys.readouterr().out
    assert (root / "mask2former" / COMPLETE).is_file()
    assert f"export SUBJECT_FFHQ_TINY_MODELS={root.resolve()}" in out
    assert "mask2former" in out and str(root.resolve() / "mask2former") in out
    assert not (root / "blip2").exists()
    assert main(["tiny-models", str(root), "--only", "mask2former"]) == 0
    assert "already built" in capsys.readouterr().out


def test_command_refuses_include_blip2_without_paper_size_with_one_line(tmp_path, capsys):
    from cli.main import main

    assert main(["tiny-models", str(tmp_path / "tiny"), "--include-blip2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "tiny").exists()
    assert captured.err == ("subject-ffhq tiny-models: error: --include-blip2 goes with --paper-size "
                            "(the tiny BLIP-2 is always built)\n")


# ---- one loading path: the tiny folders served as hub ids from the HF cache ------------------------
def as_cached_hub_repo(cache, repo_id: str, folder) -> None:
    """Place ``folder`` in the HF cache layout, as a download of ``repo_id`` would."""
    commit = "f" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(COMPLETE))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model):
    cache = tmp_path / "hf-cache"
    as_cached_hub_repo(cache, "subject-ffhq/tiny-blip2", tiny_model("blip2"))
    as_cached_hub_repo(cache, "subject-ffhq/tiny-mask2former", tiny_model("mask2former"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_tiny_blip2_loads_as_a_hub_id_and_from_its_folder_alike(hub_cache, tiny_model):
    from datagen.stages.captioner import Captioner

    image = astronaut()
    by_id = Captioner(CaptionerSettings(model="subject-ffhq/tiny-blip2", max_new_tokens=8), "cpu").caption([image])
    by_folder = Captioner(CaptionerSettings(model=str(tiny_model("blip2")), max_new_tokens=8), "cpu").caption([image])
    assert by_id == by_folder and isinstance(by_id[0], str)


def test_tiny_mask2former_loads_as_a_hub_id_and_from_its_folder_alike(hub_cache, tiny_model):
    from datagen.stages.segmenter import PanopticSegmenter

    image = astronaut((80, 64))
    settings = {"resolution": 64, "threshold": 0.0, "overlap_mask_area_threshold": 0.0, "device": "cpu"}
    (by_id,) = PanopticSegmenter(SegmenterSettings(model="subject-ffhq/tiny-mask2former", **settings)).segment([image])
    (by_folder,) = PanopticSegmenter(SegmenterSettings(model=str(tiny_model("mask2former")), **settings)).segment([image])
    assert by_id.segment_map.shape == (64, 80) and by_id.segments
    assert np.array_equal(by_id.segment_map, by_folder.segment_map) and by_id.segments == by_folder.segments


@pytest.fixture
def hub_cache_all(tmp_path, monkeypatch, tiny_model):
    cache = tmp_path / "hf-cache"
    for name in ("open_clip", "sbert", "stable-diffusion", "clip-vision"):
        as_cached_hub_repo(cache, f"subject-ffhq/tiny-{name}", tiny_model(name))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_tiny_matcher_models_load_as_hub_ids_and_from_their_folders_alike(hub_cache_all, tiny_model):
    """OpenCLIP (``hf-hub:`` id vs ``local-dir:``) and Sentence-BERT (hub id vs folder) give the same scores."""
    from datagen.stages.matcher import Matcher
    from datagen.stages.phrases import ChunkedCaption, NounPhrase
    from datagen.stages.segmenter import PanopticResult, SegmentInfo

    image = astronaut((64, 64))
    seg_map = np.zeros((64, 64), dtype=np.uint16)
    seg_map[8:40, 10:30] = 1
    panoptic = PanopticResult(seg_map, [SegmentInfo(1, 0, "person", True, [10, 8, 30, 40], 20 * 32, 0.9)])
    chunked = ChunkedCaption("a woman", "a woman", [NounPhrase("a woman", 0, 7)])
    base = {"batch_size": 4, "min_score": None}
    by_id = Matcher(
        MatcherSettings(**base, clip_model="hf-hub:subject-ffhq/tiny-open_clip", sbert_model="subject-ffhq/tiny-sbert"), "cpu"
    ).match([image], [panoptic], [chunked])[0]
    by_folder = Matcher(
        MatcherSettings(**base, clip_model=f"local-dir:{tiny_model('open_clip')}", sbert_model=str(tiny_model("sbert"))), "cpu"
    ).match([image], [panoptic], [chunked])[0]
    assert by_id.pairs == by_folder.pairs == [(0, 1)]
    np.testing.assert_allclose(by_id.product, by_folder.product, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(by_id.product, by_id.clip * by_id.sbert, rtol=1e-6)


def test_tiny_trainer_models_load_as_hub_ids_and_from_their_folders_alike(hub_cache_all, tiny_model):
    """Stable Diffusion (unet/vae/text_encoder/tokenizer/scheduler) and CLIP vision, by hub id and by folder."""
    import torch

    from training.model import FastComposerModel

    by_id = FastComposerModel.from_pretrained("subject-ffhq/tiny-stable-diffusion", "subject-ffhq/tiny-clip-vision")
    by_folder = FastComposerModel.from_pretrained(str(tiny_model("stable-diffusion")), str(tiny_model("clip-vision")))
    assert by_id.subject_size == by_folder.subject_size
    ids = by_id.tokenizer("a woman", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, by_folder.tokenizer("a woman", padding="max_length", max_length=77, return_tensors="pt").input_ids)
    a, b = by_id.model, by_folder.model
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    with torch.no_grad():  # run each component once on one image / one caption
        text = a.text_encoder(ids).last_hidden_state
        latents = a.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        noise = a.unet(latents, torch.tensor([10]), encoder_hidden_states=text).sample
    assert latents.shape == (1, 4, 8, 8) and noise.shape == latents.shape and torch.isfinite(noise).all()
