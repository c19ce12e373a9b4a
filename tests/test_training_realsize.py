"""The trainer on real machines: a seed makes a run reproducible step for step, checkpoints are staged
under OUT and moved into place after a free-space check, the precision follows what the device supports."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from fixtures.training_shards import build_training_shards
from training.checkpoint import latest_checkpoint
from training.checkpoint_space import (
    STAGING,
    CheckpointSpaceError,
    check_free_space,
    checkpoint_bytes,
    space_needed,
    stage_folder,
    staging_root,
)
from training.config import TrainConfig
from training.loop import LocalContext, precision, train_loop


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models run fastest single-threaded on a shared CPU (tests/conftest.py)."""


@pytest.fixture(scope="module")
def shards(sample_source, tmp_path_factory):
    return [str(p) for p in build_training_shards(sample_source, tmp_path_factory.mktemp("realsize-shards"))]


def config(tiny_model, shards, out: Path, **kwargs) -> TrainConfig:
    values = {"shards": shards, "out": str(out), "pretrained": str(tiny_model("stable-diffusion")),
              "image_encoder": str(tiny_model("clip-vision")), "resolution": 64, "batch_size": 2, "loader_workers": 0,
              "shuffle_buffer": 8, "lr": 1e-3, "steps": 4, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 1}
    return TrainConfig(**{**values, **kwargs})


def losses(out: Path) -> list[dict]:
    keys = ("step", "loss", "denoise_loss", "localization_loss", "object_region", "grad_norm")
    return [{k: json.loads(line)[k] for k in keys} for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_the_same_seed_gives_the_same_losses_step_for_step(tiny_model, shards, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("other", 4)):
        cfg = config(tiny_model, shards, tmp_path / name, seed=seed)
        assert train_loop(cfg, LocalContext(cfg), print_fn=lambda line: None) == 4
        runs[name] = losses(tmp_path / name)
    assert len(runs["a"]) == 4
    assert runs["a"] == runs["b"]  # every term, the object-region coin and the gradient norm, bit for bit
    assert runs["a"] != runs["other"]
    coin = random.Random(3)  # the object-region coin: its own generator, seeded with seed + rank
    assert [row["object_region"] for row in runs["a"]] == [float(coin.random() < 0.5) for _ in range(4)]
    # the checkpoints were staged under OUT, moved into place, and only the last one kept (--keep-checkpoints 1)
    out = tmp_path / "a"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000004"]
    assert latest_checkpoint(out).name == "checkpoint-00000004"
    assert (out / STAGING).is_dir() and not any((out / STAGING).iterdir())


def test_a_checkpoint_that_cannot_fit_stops_before_writing(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CheckpointSpaceError, match=r"^not enough free space for the checkpoint of step 7: it needs "
                                                   r"about [0-9.]+ GB under .*, which has [0-9.]+ GB free; nothing "
                                                   r"was written for this step"):
        stage_folder(tmp_path, 7, needed=2 * free + 10**9)
    assert not any((tmp_path / STAGING).iterdir())  # nothing staged
    check_free_space(tmp_path, 1024, 7)  # a small one fits
    folder = stage_folder(tmp_path, 7, needed=1024)
    assert folder.parent == tmp_path / STAGING and folder.name.startswith("stage-00000007-")


def test_a_bucket_run_stages_in_the_temp_folder_and_needs_no_second_copy(tmp_path):
    """Ray Train copies the staged folder into a local OUT (two copies on that disk) but uploads it to a
    bucket OUT: the space asked for where it is staged differs."""
    assert staging_root("s3://bucket/train") is None and staging_root(tmp_path) == tmp_path / STAGING
    assert staging_root("file://" + str(tmp_path)) == tmp_path / STAGING  # file:// is no bucket
    assert space_needed(tmp_path, 100, copied=True) == 200 and space_needed(tmp_path, 100, copied=False) == 100
    assert space_needed("s3://bucket/train", 100, copied=True) == 100


def test_checkpoint_size_counts_weights_and_adam_moments():
    layer = torch.nn.Linear(10, 10)  # 110 parameters
    optimizer = torch.optim.AdamW(layer.parameters())
    assert checkpoint_bytes(list(layer.parameters()), None) == 440
    assert checkpoint_bytes(list(layer.parameters()), optimizer) == 3 * 440  # estimate before the first step
    layer(torch.ones(1, 10)).sum().backward()
    optimizer.step()
    assert checkpoint_bytes(list(layer.parameters()), optimizer) == 3 * 440 + 2 * 4  # real state: + two step counters


def test_precision_follows_the_setting_and_the_device(tiny_model, shards, tmp_path):
    cpu = torch.device("cpu")
    for asked in ("auto", "bf16", "fp16", "fp32"):
        plan = precision(config(tiny_model, shards, tmp_path, mixed_precision=asked), cpu)
        assert plan.dtype is None and not plan.scaler  # fp32 on a CPU, whatever is asked
    if torch.cuda.is_available():  # (on a GPU machine)
        plan = precision(config(tiny_model, shards, tmp_path), torch.device("cuda"))
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert plan.dtype is expected and plan.scaler == (expected is torch.float16)
