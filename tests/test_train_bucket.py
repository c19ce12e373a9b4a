"""Training on a bucket, against the local S3 server (tests/local_s3.py): ``--shards`` globs over a bucket
stream the same samples as the local tars, checkpoints and the training log live on the bucket and the
latest one is found there, a bad bucket stops ``train`` in seconds; (scale) ``subject-ffhq train``
streams from the bucket, checkpoints to it and a second run resumes from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen import storage
from datagen.files import append_text, atomic_write
from fixtures.training_shards import build_training_shards
from tests.local_s3 import clear_fs_cache
from training.checkpoint import FORMAT_VERSION, STATE_FILE, latest_checkpoint, read_state
from training.config import expand_shards
from training.loader import decode_training_sample, shard_samples

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def bucket_shards(local_s3, sample_source, tmp_path_factory) -> tuple[list[Path], str]:
    import fsspec

    local = build_training_shards(sample_source, tmp_path_factory.mktemp("train-shards"))
    bucket = local_s3.bucket("train")
    clear_fs_cache()
    for p in local:
        fsspec.filesystem("s3").put_file(str(p), f"s3://{bucket}/ds/shards/{p.name}")
    return local, f"s3://{bucket}/ds/shards"


def raw_samples(urls: list[str]) -> list[dict]:
    return list(shard_samples({"url": u} for u in urls))


def test_shards_on_a_bucket_stream_the_samples_of_the_local_tars(bucket_shards):
    local, prefix = bucket_shards
    urls = expand_shards([f"{prefix}/subjects-*.tar"])
    assert urls == [f"{prefix}/{p.name}" for p in local]
    remote, here = raw_samples(urls), raw_samples([str(p) for p in local])
    assert len(remote) == len(here) > 0
    for a, b in zip(remote, here, strict=True):
        assert a["__key__"] == b["__key__"] and (a["jpg"], a["seg.png"], a["json"]) == (b["jpg"], b["seg.png"], b["json"])
        assert a["__url__"].startswith("s3://")
    image, segment_map, record = decode_training_sample(remote[0])
    assert (image.shape[2], image.shape[1]) == (record.width, record.height) == segment_map.shape[::-1]


def test_checkpoints_and_the_training_log_on_a_bucket(local_s3):
    bucket = local_s3.bucket("ckpt")
    run = f"s3://{bucket}/train/run"
    for step in (2, 10):
        atomic_write(f"{run}/checkpoint-{step:08d}/{STATE_FILE}", json.dumps({"format": FORMAT_VERSION, "step": step}))
        atomic_write(f"{run}/checkpoint-{step:08d}/fusion.safetensors", b"weights")
    atomic_write(f"{run}/checkpoint-00000020/fusion.safetensors", b"no state: an upload a kill cut short")
    latest = latest_checkpoint(f"s3://{bucket}/train")
    assert str(latest) == f"{run}/checkpoint-00000010" and read_state(latest)["step"] == 10
    with storage.local_copy(latest) as folder:
        assert isinstance(folder, Path) and (folder / "fusion.safetensors").read_bytes() == b"weights"
        assert read_state(folder)["step"] == 10
    assert not folder.exists()  # the download is gone after the block
    for step in (1, 2):
        append_text(f"{run}/train_log.jsonl", json.dumps({"step": step}) + "\n")
    assert local_s3.get(bucket, "train/run/train_log.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    filesystem, path = storage.arrow_filesystem(f"s3://{bucket}/train/")
    assert path == f"{bucket}/train" and filesystem.get_file_info(f"{run.removeprefix('s3://')}/train_log.jsonl").size == 24


def test_a_checkpoint_on_a_bucket_resolves_there(local_s3):
    """``evaluate --checkpoint s3://...`` / ``sample``: the URL is not mangled by ``Path``."""
    from training.sampler import SamplerError, resolve_checkpoint

    bucket = local_s3.bucket("eval-ckpt")
    clear_fs_cache()
    run = f"s3://{bucket}/train/run"
    atomic_write(f"{run}/checkpoint-00000003/{STATE_FILE}", json.dumps({"format": FORMAT_VERSION, "step": 3}))
    assert str(resolve_checkpoint(f"s3://{bucket}/train")) == f"{run}/checkpoint-00000003"
    assert str(resolve_checkpoint(f"{run}/checkpoint-00000003")) == f"{run}/checkpoint-00000003"
    with pytest.raises(SamplerError, match=f"s3://{bucket}/nothing: neither a checkpoint"):
        resolve_checkpoint(f"s3://{bucket}/nothing")


def test_the_training_log_on_a_bucket_is_written_in_batches(local_s3, tmp_path):
    """Each append to an object rewrites it whole: the loop's log holds lines on a bucket (flushed every
    N lines and at checkpoints), and appends each at once locally."""
    from datagen.files import LogAppender

    bucket = local_s3.bucket("log")
    clear_fs_cache()
    log = LogAppender(f"s3://{bucket}/run/train_log.jsonl", flush_every=3)
    log.add("1\n")
    log.add("2\n")
    assert local_s3.keys(bucket) == []  # held
    log.add("3\n")
    assert local_s3.get(bucket, "run/train_log.jsonl") == b"1\n2\n3\n"
    log.add("4\n")
    log.flush()
    log.flush()  # nothing more to write
    assert local_s3.get(bucket, "run/train_log.jsonl") == b"1\n2\n3\n4\n"
    here = LogAppender(tmp_path / "train_log.jsonl", flush_every=3)
    here.add("1\n")
    assert (tmp_path / "train_log.jsonl").read_text() == "1\n"


def cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_train_refuses_a_missing_bucket_in_seconds(local_s3, bucket_shards):
    _, prefix = bucket_shards
    for args, words in ((["--shards", "s3://no-such-bucket/shards/*.tar", "--out", "out-never"], "--shards s3://no-such-bucket"),
                        (["--shards", f"{prefix}/*.tar", "--out", "s3://no-such-bucket/train"], "--out s3://no-such-bucket")):
        t = time.monotonic()
        proc = cli("train", *args, "--profile", "tiny", env=local_s3.env, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr and "does not exist" in proc.stderr, proc.stderr
        assert time.monotonic() - t < 30 and "testing" not in proc.stderr
    assert not (ROOT / "out-never").exists()


@pytest.mark.slow
@pytest.mark.scale  # two CLI trainings, each starting its own Ray and Ray Train (~2-3 min on 2 shared CPUs)
def test_train_streams_from_a_bucket_checkpoints_there_and_resumes(local_s3, bucket_shards, tiny_models_all):
    _, prefix = bucket_shards
    out = f"s3://{local_s3.bucket('runs')}/train"
    env = {**local_s3.env, "SUBJECT_FFHQ_TINY_MODELS": str(tiny_models_all)}
    common = ["train", "--shards", f"{prefix}/*.tar", "--profile", "tiny", "--out", out, "--batch-size", "1",
              "--resolution", "64", "--loader-workers", "0", "--checkpoint-every", "1"]
    first = cli(*common, "--steps", "1", env=env, timeout=500)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Starting a new training run" in first.stdout
    keys = local_s3.keys("runs", "train/")
    assert any(k.endswith("checkpoint-00000001/trainer_state.json") for k in keys), keys
    second = cli(*common, "--steps", "2", env=env, timeout=500)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from checkpoint s3://runs/train/" in second.stdout and "(step 1)" in second.stdout
    latest = latest_checkpoint(out)
    assert latest.name == "checkpoint-00000002" and read_state(latest)["step"] == 2
    log = local_s3.get("runs", next(k for k in local_s3.keys("runs", "train/") if k.endswith("train_log.jsonl")))
    assert [json.loads(line)["step"] for line in log.decode().splitlines()] == [1, 2]
