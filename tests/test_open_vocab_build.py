"""``grounding: sam3`` through a real build (issue 24): the tiny SAM 3 (RANDOM weights) on the bundled
sample through the Ray job, records valid, FastComposer's export read back with an open-vocabulary
object type, and one training step conditioned on that type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli.main import main
from datagen.config import TINY_MODELS_ENV, load_profile
from datagen.shards.reader import read_shard
from ray_jobs.job import BuildRequest, run_build

pytestmark = pytest.mark.slow

SMALL = {"shards": {"size": 6, "max_side": 160}, "ray": {"images_per_call": 6, "progress_interval_s": 30}}
TRAIN = {"trainer": {"resolution": 64, "batch_size": 2, "loader_workers": 0, "shuffle_buffer": 1, "checkpoint_every": 1,
                     "uncond_prob": 0.0, "text_only_prob": 0.0, "subject_keep_prob": 1.0}}


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models run fastest single-threaded on a shared CPU (tests/conftest.py)."""


def test_sam3_grounding_builds_exports_and_trains_an_open_vocabulary_subject(
        ray_local, tiny_models_all, sample_source, tmp_path, monkeypatch, capsys):
    from training.config import TrainConfig
    from training.loop import LocalContext, train_loop

    monkeypatch.setenv(TINY_MODELS_ENV, str(tiny_models_all))
    profile = load_profile("tiny-open-vocab", SMALL)
    request = BuildRequest(source=sample_source, out=tmp_path / "out", profile=profile, run_name="ov",
                           manifests_root=tmp_path / "manifests")
    run_dir = run_build(request).run_dir
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["grounding"] == "sam3" and run["status"] == "complete"

    shards = tmp_path / "out" / "shards"
    samples = {s.key: s for tar in sorted(shards.glob("*.tar")) for s in read_shard(tar)}  # each record validated
    assert len(samples) == 11  # the sample's 12 images, one a duplicate
    records = [s.record for s in samples.values()]
    assert all(r.extra == {"grounding": "sam3"} and set(r.models) == {"captioner", "phrases", "sam3", "face_detector", "identity_embedder"}
               for r in records)
    segments = [seg for r in records for seg in r.segments]
    assert segments and all(seg.label_vocab in ("coco", "open") and 0 < seg.score <= 1 for seg in segments)
    assert all(r.face_checks is not None for r in records)  # the face stage read the SAM 3 segments
    for r in records:  # each matched segment carries its phrase, each instance at most one
        matched = [seg for seg in r.segments if seg.matched]
        assert len({seg.id for seg in matched}) == len(matched) == sum(p.segment_id is not None for p in r.phrases)
        assert all(seg.match_score == seg.score >= profile.sam3.threshold for seg in matched)
    open_train = sorted({seg.coco_label for r in records if r.split == "train" for seg in r.segments
                         if seg.matched and seg.label_vocab == "open"})
    assert open_train, "the tiny captions give open-vocabulary heads"
    label = open_train[0]

    # the report says which grounding, with its scores per label
    assert main(["report", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["grounding"]["method"] == "sam3" and summary["grounding"]["by_label"][label]["vocabulary"] == "open"
    assert "Grounding: sam3" in (run_dir / "report.html").read_text(encoding="utf-8")
    # its per-type figures for the open label too (a panoptic run would refuse it: not a COCO label)
    assert main(["report", str(run_dir), "--object-types", f"person,{label}"]) == 0
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    section = html[html.index("<h2>Subjects by object type</h2>"):]
    assert f"<tr><td>{label}</td>" in section[:section.index("</table>")]

    # FastComposer's layout, with the open label as an object type, read back
    out = tmp_path / "fc"
    assert main(["export", str(shards), str(out), "--profile", "tiny-open-vocab", "--object-types", label]) == 0
    capsys.readouterr()
    ids = (out / "image_ids.txt").read_text().split()
    assert ids
    for key in ids:
        info = json.loads((out / key[:5] / f"{key}.json").read_text())
        assert info["caption"] == samples[key].record.caption
        assert all(s["coco_label"] == label and "end" in s for s in info["segments"])
        np.testing.assert_array_equal(np.load(out / key[:5] / f"{key}.npy"), samples[key].segment_map)
    assert any(json.loads((out / k[:5] / f"{k}.json").read_text())["segments"] for k in ids)

    # one training step whose subjects are that open-vocabulary label
    trained = load_profile("tiny-open-vocab", TRAIN, {"subjects": {"object_types": [label]}})
    cfg = TrainConfig.from_profile(trained, shards=[str(p) for p in sorted(shards.glob("*.tar"))],
                                   out=str(tmp_path / "train"), steps=1)
    assert cfg.object_types == (label,) and cfg.open_vocabulary
    lines: list[str] = []
    torch.manual_seed(0)
    assert train_loop(cfg, LocalContext(cfg), print_fn=lines.append) == 1
    step = next(line for line in lines if line.startswith("step "))
    assert "nan" not in step and (tmp_path / "train" / "checkpoint-00000001").is_dir()
