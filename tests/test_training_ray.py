"""Ray Train end to end: two CPU workers (gloo) train and checkpoint; a second run resumes, loses a
worker on the way and is restarted by Ray Train from the last checkpoint."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fixtures.failure_hooks import KillWorkerOnce
from fixtures.training_shards import build_training_shards
from training.checkpoint import latest_checkpoint, read_state
from training.config import TrainConfig


@pytest.mark.slow
@pytest.mark.scale
def test_two_cpu_workers_train_checkpoint_and_resume(ray_local, sample_source, tiny_model, tmp_path, capsys):
    from ray_jobs.train import run_training

    shards = [str(p) for p in build_training_shards(sample_source, tmp_path / "shards")]
    out = tmp_path / "train"
    cfg = TrainConfig(
        shards=shards, out=str(out), pretrained=str(tiny_model("stable-diffusion")),
        image_encoder=str(tiny_model("clip-vision")), steps=2, checkpoint_every=2, batch_size=1, resolution=64,
        loader_workers=0, shuffle_buffer=1, num_workers=2, max_failures=0,
    )
    run_training(cfg)
    first = capsys.readouterr().out
    assert "Starting a new training run" in first
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "checkpoint-00000002"
    assert read_state(checkpoint)["step"] == 2
    for name in ("unet/config.json", "fusion.safetensors", "image_encoder_blocks.safetensors", "optimizer.pt"):
        assert (checkpoint / name).is_file(), name

    # Second run: on to step 4; the rank-1 worker dies once after step 3 (testing hook), Ray Train
    # restarts the group, which resumes from the step-2 checkpoint again.
    marker = tmp_path / "killed-once"
    run_training(dataclasses.replace(cfg, steps=4, max_failures=1), after_step=KillWorkerOnce(3, 1, str(marker)))
    second = capsys.readouterr().out
    assert f"Resuming from checkpoint {checkpoint} (step 2)" in second

    assert marker.is_file()  # a worker was lost, and the run still finished
    resumed = latest_checkpoint(out)
    assert resumed.name == "checkpoint-00000004" and read_state(resumed)["step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    # run 1: steps 1, 2; run 2 from step 2: step 3 (maybe logged before the crash), then 3 and 4
    assert steps[:2] == [1, 2] and steps[-2:] == [3, 4] and set(steps) == {1, 2, 3, 4}
