"""Any subject type, end to end: one ``subjects.object_types`` setting (person + cat here) read by the
report, the export and the trainer, on an image-folder source of pets (fixtures.pet_photos):
build → report → export → one training step."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from skimage import data as skimage_data

from cli.main import main
from datagen.config import TINY_MODELS_ENV, load_profile
from datagen.shards.reader import read_shard
from fixtures.pet_photos import build_pet_folder, build_pet_run

pytestmark = pytest.mark.slow

PETS = """\
subjects: {object_types: [person, cat]}
shards: {size: 2, max_side: 256}
trainer: {resolution: 64, batch_size: 2, loader_workers: 0, shuffle_buffer: 1, checkpoint_every: 1, lr: 1.0e-3,
          uncond_prob: 0.0, text_only_prob: 0.0, subject_keep_prob: 1.0}
"""


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models run fastest single-threaded on a shared CPU (tests/conftest.py)."""


def test_pets_go_through_build_report_export_and_a_training_step(tmp_path, tiny_model, tiny_models_root,
                                                                  monkeypatch, capsys):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from cli.train import add_arguments, config_from_args
    from training.image_encoder import processor_geometry
    from training.loop import LocalContext, train_loop
    from training.preprocess import ExamplePreprocessor

    monkeypatch.setenv(TINY_MODELS_ENV, str(tiny_models_root))
    sd, vision = tiny_model("stable-diffusion"), tiny_model("clip-vision")
    overlay = tmp_path / "pets.yaml"
    overlay.write_text(PETS)

    # build: the image folder, listed, planned, loaded and written as the job does (annotations by hand)
    profile = load_profile("tiny", overlay)
    source = build_pet_folder(tmp_path / "pets")
    assert "CC0 by the photographer (Stefan van der Walt)" in skimage_data.chelsea.__doc__  # the cat's licence
    assert "Chelsea the cat" in (source / "SOURCES.md").read_text() and "Eileen Collins" in (source / "SOURCES.md").read_text()
    run_dir = build_pet_run(source, tmp_path / "out", tmp_path / "manifests", profile)
    shards_dir = tmp_path / "out" / "shards"
    samples = {s.key: s for tar in sorted(shards_dir.glob("subjects-*.tar")) for s in read_shard(tar)}
    labels = {k: [(seg.coco_label, seg.matched) for seg in s.record.segments] for k, s in samples.items()}
    assert labels == {"00000": [("cat", False)], "00001": [("cat", True)], "00002": [("person", True), ("cat", True)],
                      "00003": [("person", True), ("banner", True)]}
    assert json.loads((run_dir / "run.json").read_text())["config"]["subjects"] == {"object_types": ["person", "cat"]}

    # report: the run's object types, from run.json
    assert main(["report", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["object_types"] == ["person", "cat"]
    cat = summary["by_object_type"]["cat"]
    assert (cat["images_with_segment"], cat["images_with_subject"], cat["segments"], cat["subjects"],
            cat["unmatched_segments"]) == (3, 2, 3, 2, 1)
    assert cat["subjects_per_image"] == {"0": 2, "1": 2} and cat["match_score_quantiles"]["median"] == 0.28
    assert summary["by_object_type"]["person"]["subjects"] == summary["counts"]["matched_persons"] == 2
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Match scores of cat subjects" in page and "<td>cat</td><td>2</td><td>50.0%</td>" in page

    # export: the profile's object types choose the subjects and drive the filters
    out = tmp_path / "fastcomposer"
    assert main(["export", str(shards_dir), str(out), "--profile", "tiny", "--config", str(overlay),
                 "--exclude-unmatched-subject"]) == 0
    printed = capsys.readouterr().out
    assert 'filtered out: 1 {"unmatched_subject_segment": 1}' in printed  # the close-up: a cat no phrase names
    assert 'subjects (person,cat): 4 {"person": 2, "cat": 2}' in printed
    exported = json.loads((out / "export_summary.json").read_text())
    assert exported["object_types"] == ["person", "cat"] and exported["subjects_by_type"] == {"person": 2, "cat": 2}
    assert (out / "image_ids.txt").read_text().split() == ["00001", "00002", "00003"]
    woman = json.loads((out / "00003" / "00003.json").read_text())
    assert [s["coco_label"] for s in woman["segments"]] == ["person"]
    assert [s["coco_label"] for s in woman["other_segments"]] == ["banner"]  # matched, but not a subject type
    both = json.loads((out / "00002" / "00002.json").read_text())
    assert [(s["coco_label"], s["word"]) for s in both["segments"]] == [("person", "a woman"), ("cat", "a cat")]
    segmap = np.load(out / "00002" / "00002.npy")
    assert {int(v) for v in np.unique(segmap)} == {0, 1, 2}

    # train: the same profile, through the train command's options, gives the trainer its object types
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--shards", str(shards_dir / "subjects-*.tar"), "--profile", "tiny",
                              "--config", str(overlay), "--out", str(tmp_path / "train"), "--steps", "1"])
    cfg = config_from_args(args)
    assert cfg.object_types == ("person", "cat") and cfg.pretrained == str(sd) and cfg.image_encoder == str(vision)
    # ... which subjects its preprocessing conditions on: people and cats, never the flag
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    size = processor_geometry(CLIPImageProcessor.from_pretrained(vision))[0]
    pre = ExamplePreprocessor.from_config(cfg, tokenizer, size, seed=0)
    conditioned = {}
    for key, s in samples.items():
        if s.record.split != cfg.split:
            continue
        image = torch.from_numpy(np.asarray(s.image).copy()).permute(2, 0, 1)
        example = pre(image, s.segment_map, s.record)
        by_id = {seg.id: seg.coco_label for seg in s.record.segments}
        conditioned[key] = [by_id[int(i)] for i in example["subject_ids"][example["subject_valid"]]]
    assert conditioned == {"00001": ["cat"], "00002": ["person", "cat"], "00003": ["person"]}
    # ... and one optimizer step on the pets
    lines: list[str] = []
    assert train_loop(cfg, LocalContext(cfg), print_fn=lines.append) == 1
    step = next(line for line in lines if line.startswith("step "))
    assert "nan" not in step and (tmp_path / "train" / "checkpoint-00000001").is_dir()
