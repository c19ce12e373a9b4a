"""Every path may be a URL (datagen/storage.py), against a real local S3 server (moto, tests/local_s3.py):
URLs that carry secrets or name no installed filesystem are refused; writes to a bucket are atomic and
a killed writer's unfinished multipart uploads are aborted under the prefix only; bad buckets, missing
credentials and a wrong endpoint stop ``build`` with exit 2 in seconds, one line, nothing written; a
build from a bucket to a bucket, killed with SIGKILL and resumed, gives the tars of a local build,
which report, inspect and export then read from the bucket."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datagen import storage
from datagen.files import atomic_write, file_sha256, remove_stale_temps
from tests.local_s3 import clear_fs_cache

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("url, words", [
    ("s3://KEY:SECRET@bucket/out", "carries credentials"),
    ("s3://bucket/out?X-Amz-Signature=abc&X-Amz-Credential=k", "carries a secret"),
    ("gs://bucket/out", "install gcsfs"),
    ("nosuch://bucket/out", "unknown URL scheme nosuch://"),
])
def test_bad_urls_are_refused_with_the_reason_and_no_secret(url, words):
    with pytest.raises(storage.StorageError) as e:
        storage.path(url)
    assert words in str(e.value)
    assert "SECRET" not in str(e.value) and "abc" not in str(e.value)


def test_plain_paths_stay_pathlib_and_file_urls_become_paths(tmp_path):
    assert storage.path(str(tmp_path)) == tmp_path and isinstance(storage.path(str(tmp_path)), Path)
    assert storage.path(f"file://{tmp_path}") == tmp_path
    assert not storage.is_url(str(tmp_path)) and storage.is_url("s3://b/k")


def test_bucket_writes_are_whole_objects_and_stale_uploads_are_aborted_under_the_prefix_only(local_s3):
    bucket = local_s3.bucket("atomic")
    url = f"s3://{bucket}/run/shards/a.json"
    atomic_write(url, '{"a": 1}\n')
    assert local_s3.get(bucket, "run/shards/a.json") == b'{"a": 1}\n'
    assert file_sha256(url) == file_sha256_bytes(b'{"a": 1}\n')
    # what kill -9 during a multipart upload leaves: an upload never completed (no object)
    client = local_s3.client()
    for key in ("run/shards/subjects-00001.tar", "elsewhere/subjects-00001.tar"):
        client.create_multipart_upload(Bucket=bucket, Key=key)
    assert local_s3.uploads(bucket) == ["elsewhere/subjects-00001.tar", "run/shards/subjects-00001.tar"]
    removed = remove_stale_temps(f"s3://{bucket}/run/shards")
    assert [str(p) for p in removed] == [f"s3://{bucket}/run/shards/subjects-00001.tar"]
    assert local_s3.uploads(bucket) == ["elsewhere/subjects-00001.tar"]  # outside the prefix: untouched
    assert local_s3.keys(bucket) == ["run/shards/a.json"]


def file_sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_a_source_that_must_exist_is_an_object_or_a_folder_not_a_bare_prefix(local_s3):
    bucket = local_s3.bucket("prefixes")
    atomic_write(f"s3://{bucket}/data-old/x.png", b"x")
    for there in ("data-old", "data-old/", "data-old/x.png", ""):
        storage.probe(f"s3://{bucket}/{there}", "--source", must_exist=True)
    for missing in ("data", "data-old/x", "dat"):
        with pytest.raises(storage.StorageError, match=f"--source s3://{bucket}/{missing}: nothing there"):
            storage.probe(f"s3://{bucket}/{missing}", "--source", must_exist=True)


def test_bad_bucket_input_exits_2_in_seconds_with_one_line_and_nothing_written(local_s3, tmp_path):
    bucket = local_s3.bucket("bad-input")
    good = dict(local_s3.env)
    no_credentials = {**good, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                      "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    wrong_endpoint = {**good, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # discard port: nothing answers
    cases = [
        (good, "s3://no-such-bucket/out", "the bucket 'no-such-bucket' does not exist"),
        (no_credentials, f"s3://{bucket}/out", "no credentials found"),
        (wrong_endpoint, f"s3://{bucket}/out", "cannot reach the endpoint"),
        (good, "gs://bucket/out", "install gcsfs"),
    ]
    for env, out, cause in cases:
        t = time.monotonic()
        proc = cli("build", "--source", str(tmp_path), "--out", out, "--profile", "tiny",
                   "--manifests", str(tmp_path / "manifests"), env=env)
        seconds = time.monotonic() - t
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and out.split("/")[2] in lines[0] and cause in lines[0], (out, lines)
        assert "testing" not in proc.stderr + proc.stdout  # the secret never printed
        assert seconds < 30, f"{out}: {seconds:.1f}s"
    assert local_s3.keys(bucket) == [] and not (tmp_path / "manifests").exists()


# ------------------------------------------------------------------- bucket -> bucket, kill -9, resume
# one shard at a time, so that the kill at the first shard entry lands before the last shard is written
BUILD_CONFIG = "shards:\n  size: 4\n  max_side: 128\nray:\n  images_per_call: 2\n  max_shards_in_flight: 1\n"


@pytest.fixture(scope="module")
def bucket_source(local_s3, sample_source) -> str:
    import fsspec

    bucket = local_s3.bucket("source")
    clear_fs_cache()
    fsspec.filesystem("s3").put(f"{sample_source}/", f"s3://{bucket}/ffhq/", recursive=True)
    return f"s3://{bucket}/ffhq"


def build_command(source: str, out: str, manifests: str, config: Path) -> list[str]:
    return ["build", "--source", source, "--out", out, "--manifests", manifests, "--profile", "tiny",
            "--config", str(config), "--run-name", "run"]


@pytest.mark.scale  # three CLI builds, each starting its own Ray (~5 min on 2 shared CPUs): make test-scale
def test_a_bucket_build_killed_and_resumed_gives_the_tars_of_a_local_build(local_s3, bucket_source, sample_source,
                                                                           tiny_models_all, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text(BUILD_CONFIG)
    env = {**local_s3.env, "SUBJECT_FFHQ_TINY_MODELS": str(tiny_models_all)}
    local = cli(*build_command(str(sample_source), str(tmp_path / "local"), str(tmp_path / "manifests"), config),
                env=env, timeout=400)
    assert local.returncode == 0, local.stderr[-2000:]
    want = {p.name: p.read_bytes() for p in sorted((tmp_path / "local" / "shards").glob("*.tar"))}
    assert len(want) == 3

    bucket = local_s3.bucket("out")
    command = build_command(bucket_source, f"s3://{bucket}/ds", f"s3://{bucket}/manifests", config)
    full = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "killed-build.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", *command], cwd=ROOT, env=full, start_new_session=True,
                                stdout=stderr, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    try:
        while not local_s3.keys(bucket, "manifests/run/shards/") and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"the build ended before the kill: {log.read_text()[-2000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: kill -9
        proc.wait(timeout=30)
    entries = local_s3.keys(bucket, "manifests/run/shards/")
    assert 1 <= len(entries) < 3, entries  # killed mid-run
    # an upload the kill interrupted, under the shards prefix, and someone else's, outside it
    client = local_s3.client()
    client.create_multipart_upload(Bucket=bucket, Key="ds/shards/subjects-00002.tar")
    client.create_multipart_upload(Bucket=bucket, Key="not-ours/big.bin")

    resumed = cli(*command, env=env, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "unfinished" in resumed.stdout or "removed 1" in resumed.stdout
    got = {k.rsplit("/", 1)[1]: local_s3.get(bucket, k) for k in local_s3.keys(bucket, "ds/shards/")}
    assert sorted(got) == sorted(want)
    assert all(got[name] == want[name] for name in want), "bucket tars differ from the local build's"
    assert local_s3.uploads(bucket) == ["not-ours/big.bin"]
    assert set(local_s3.keys(bucket)) >= {"manifests/run/run.json", "manifests/run/samples.parquet"}
    assert all(k.startswith(("ds/", "manifests/", "exports/")) for k in local_s3.keys(bucket))

    # the run's tools read it from the bucket; the export writes to the bucket
    report = cli("report", f"s3://{bucket}/manifests/run", env=env)
    assert report.returncode == 0 and report.stdout.strip() == f"s3://{bucket}/manifests/run/report.html", report.stderr
    exported = cli("export", f"s3://{bucket}/ds/shards", f"s3://{bucket}/exports/seg", "--format", "seg-conditioning",
                   "--profile", "tiny", env=env)
    assert exported.returncode == 0, exported.stderr
    assert "exports/seg/export_summary.json" in local_s3.keys(bucket, "exports/seg/")
    assert len(local_s3.keys(bucket, "exports/seg/images/")) == 11
    assert b"testing" not in local_s3.get(bucket, "manifests/run/run.json")  # no credential recorded
