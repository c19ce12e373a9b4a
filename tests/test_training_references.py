"""``--reference cross-image | mixed:P``: the image encoder's crop comes from another photo of the
subject's identity (the bundled sample's identities, real dlib weights: tests.identity_run)."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from training.config import ConfigError, TrainConfig
from training.loader import loader_from_config
from training.loop import LocalContext, train_loop
from training.preprocess import ExamplePreprocessor
from training.references import REFERENCE_ID, CrossImageReferences
from training.subject_crops import finish_crop
from training.subject_policy import SubjectDropPolicy

RESOLUTION = 64
NO_DROP = SubjectDropPolicy(uncond_prob=0.0, text_only_prob=0.0, keep_prob=1.0, max_subjects=4)


@pytest.fixture(scope="module")
def model_paths(tiny_model):
    return str(tiny_model("stable-diffusion")), str(tiny_model("clip-vision"))


def config(model_paths, identity_run, out, **kwargs) -> TrainConfig:
    values = {"shards": identity_run["shards"], "out": str(out), "pretrained": model_paths[0],
              "image_encoder": model_paths[1], "resolution": RESOLUTION, "batch_size": 2, "loader_workers": 0,
              "shuffle_buffer": 1, "uncond_prob": 0.0, "text_only_prob": 0.0, "subject_keep_prob": 1.0,
              "reference": "cross-image", "reference_set": str(identity_run["run"])}
    return TrainConfig(**{**values, **kwargs})


def _person_of(identity_run):
    return {(key, s.id): s.word for key, (_, _, r) in identity_run["records"].items() for s in r.segments}


def test_cross_image_crops_come_from_another_photo_of_the_same_person(identity_run, tiny_model):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model("stable-diffusion") / "tokenizer")
    refs = CrossImageReferences(str(identity_run["run"]), 1.0)
    pre = ExamplePreprocessor(copy.deepcopy(tokenizer), 32, resolution=RESOLUTION, policy=NO_DROP,
                              augment_subjects=False, seed=0, references=refs)
    person = _person_of(identity_run)
    crop_person = {row: person[(k, s)] for row, (k, s) in enumerate(zip(
        refs.keys, refs.crops.column("segment_id").to_pylist(), strict=True))}
    used = fallbacks = 0
    for key, (image, segment_map, record) in identity_run["records"].items():
        example = pre(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), segment_map, record)
        fallbacks += int(example["reference_fallbacks"])
        for slot in torch.nonzero(example["reference_used"]).flatten().tolist():
            used += 1
            ref_key = example["reference_keys"][slot]
            assert ref_key != key
            segment_id = int(example["subject_ids"][slot])
            rows = [r for r in range(len(refs.keys)) if refs.keys[r] == ref_key and crop_person[r] == person[(key, segment_id)]]
            assert rows, (key, segment_id, ref_key)  # a crop of the same person, from another photo
            source, segment_map_r, _ = refs.source(rows[0])
            inside = finish_crop(torch.from_numpy(segment_map_r == REFERENCE_ID)[None].repeat(3, 1, 1).to(torch.uint8) * 255, 32) > 250
            expected = finish_crop(source, 32)
            got = example["subject_pixel_values"][slot]
            diff = (got.float() - expected.float()).abs()[inside].mean()
            assert diff < 12, (key, slot, float(diff))  # the reference's pixels inside its mask
    assert used >= 10  # every person of a photo whose identity is elsewhere
    assert fallbacks >= 5  # the coloured blocks' "persons": no identity, their own crop


def test_a_training_step_feeds_the_encoder_crops_of_other_photos_and_logs_fallbacks(model_paths, identity_run, tmp_path,
                                                                                   one_torch_thread):
    from training.model import FastComposerModel

    cfg = config(model_paths, identity_run, tmp_path / "out", steps=2, checkpoint_every=2, augment_subjects_on="device")
    components = FastComposerModel.from_config(cfg)
    pre = ExamplePreprocessor.from_config(cfg, components.tokenizer, components.subject_size, seed=0, device_type="cpu",
                                          references=CrossImageReferences.from_config(cfg))
    batch = next(iter(loader_from_config(cfg, pre, seed=0)))
    for key, used, keys in zip(batch["key"], batch["reference_used"], batch["reference_keys"], strict=True):
        assert all(keys[s] and keys[s] != key for s in torch.nonzero(used).flatten().tolist())
    assert int(batch["reference_used"].sum()) > 0 or int(batch["reference_fallbacks"].sum()) > 0
    lines = []
    assert train_loop(cfg, LocalContext(cfg), print_fn=lines.append) == 2
    assert any("reference crops: cross-image" in line for line in lines)
    steps = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert sum(s["cross_image_references"] for s in steps) > 0
    assert all("own-crop fallbacks" in line for line in lines if line.startswith("step "))


@pytest.mark.parametrize("values, words", [
    ({"reference": "other"}, "same-image, cross-image or mixed:P"),
    ({"reference": "mixed:1.5"}, "mixed:P with P in 0..1"),
    ({"reference": "cross-image", "reference_set": None}, "'reference_set' is needed"),
])
def test_bad_reference_settings_name_the_setting(model_paths, identity_run, tmp_path, values, words):
    with pytest.raises(ConfigError, match=words):
        config(model_paths, identity_run, tmp_path, **values)


def test_mixed_draws_the_share_and_same_image_loads_nothing(identity_run, model_paths, tmp_path):
    refs = CrossImageReferences(str(identity_run["run"]), 0.3)
    rng = random.Random(0)
    key, segment_id = next(iter(refs.identity_of))
    drawn = [refs.pick(key, segment_id, rng) for _ in range(2000)]
    share = sum(d is not None and d is not False for d in drawn) / len(drawn)
    assert abs(share - 0.3) < 0.05
    assert CrossImageReferences.from_config(config(model_paths, identity_run, tmp_path, reference="same-image")) is None


def test_the_trainer_trains_on_the_identity_safe_split_file(model_paths, identity_run, tiny_model, tmp_path, capsys):
    """``--split-file``: the run's identity-safe split replaces each record's (the composites tie the
    two photos the records put in test to people in train, so the split moves them to train)."""
    from transformers import CLIPTokenizer

    from cli.main import main
    from datagen.identity.split import read_split

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model("stable-diffusion") / "tokenizer")
    records = {key: r for key, (_, _, r) in identity_run["records"].items()}
    safe = read_split(identity_run["run"])
    moved = {key for key, r in records.items() if safe.get(key, r.split) != r.split}
    assert moved and all(records[k].split == "test" for k in moved)

    def trained_on(**kwargs) -> set[str]:
        cfg = config(model_paths, identity_run, tmp_path, reference="same-image", reference_set=None, **kwargs)
        pre = ExamplePreprocessor.from_config(cfg, copy.deepcopy(tokenizer), 32, seed=0, device_type="cpu")
        batches = iter(loader_from_config(cfg, pre, seed=0))
        return {key for _ in range(2 * len(records)) for key in next(batches)["key"]}  # every shard, twice over

    assert trained_on() == {key for key, r in records.items() if r.split == "train"}
    assert trained_on(split_file=str(identity_run["run"])) == {k for k, r in records.items() if safe.get(k, r.split) == "train"}
    assert moved <= trained_on(split_file=str(identity_run["run"] / "split.parquet"))
    # a split file that is not there stops the command before Ray starts, naming the file
    capsys.readouterr()
    code = main(["train", "--shards", *identity_run["shards"], "--profile", "tiny", "--out", str(tmp_path / "o"),
                 "--split-file", str(tmp_path / "nowhere.parquet")])
    assert code == 2 and "nowhere.parquet: no identity-safe split" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_missing_reference_set_stops_train_before_ray(identity_run, tmp_path, capsys, monkeypatch):
    """``--reference cross-image`` with a set that is not there: exit 2 naming it, before Ray starts
    (found in the workers, it restarted them until ``training failed``)."""
    import ray_jobs.train
    from cli.main import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray_jobs.train, "run_training", no_ray)
    capsys.readouterr()
    missing = tmp_path / "no-such-run"
    code = main(["train", "--shards", *identity_run["shards"], "--profile", "tiny", "--out", str(tmp_path / "o"),
                 "--reference", "cross-image", "--reference-set", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and f"--reference-set {missing}: no reference set" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
