"""The dataset job on local Ray under load (issue 11: soak; its bad-input corpus and driver-error
tests are in ``test_ray_job_end_to_end.py``).

* soak: 120 generated images in 15 shards of 8, with a transient fault every few shards (a stage
  actor killed after every 4th finished shard, a write task raising, a write task's worker
  killed), one corrupt image per shard and two exact copies; every image ends written, duplicate
  or failed with its own reason, and the tars equal those of a clean run of the same source
  (120, not a few hundred: enough shards to fit three actor kills and five write faults, each
  with shards still in flight after it, while both builds stay well under a minute on a quiet
  2-core machine; marked ``scale``: run by ``make test-scale``).

Uses the session's shared local Ray and one set of stage actors (``conftest.ray_local``,
``conftest.tiny_stage_pools``; killed actors are restarted by Ray, so the pools stay usable).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen.config import TINY_MODELS_ENV, load_profile
from datagen.shards.reader import read_shard
from datagen.sources.readers import open_source
from fixtures.failure_hooks import ShardFaults
from ray_jobs.job import BuildRequest, run_build
from tests.test_ray_job_end_to_end import manifest_samples, temp_files

pytestmark = pytest.mark.slow

SOAK_IMAGES = 120
SHARD = 8
SOAK_SHARDS = SOAK_IMAGES // SHARD  # one corrupt image in each
SOAK_COPIES = 2  # slot 6 of shards 6 and 13
CONFIG = {
    "shards": {"size": SHARD, "max_side": 64},
    "ray": {"images_per_call": SHARD, "shard_attempts": 3, "task_max_retries": 2, "progress_interval_s": 30},
}


@pytest.fixture(scope="module")
def profile(tiny_models_all):
    old = os.environ.get(TINY_MODELS_ENV)
    os.environ[TINY_MODELS_ENV] = str(tiny_models_all)
    try:
        yield load_profile("tiny", CONFIG)
    finally:
        if old is None:
            os.environ.pop(TINY_MODELS_ENV, None)
        else:
            os.environ[TINY_MODELS_ENV] = old


@pytest.fixture(scope="module")
def pools(tiny_stage_pools):
    """The tiny stage actors (tests/conftest.py), shared by every build of this module."""
    return tiny_stage_pools


def build(source: Path, root: Path, profile, pools, hooks=None, on_shard_done=None, name: str = "run"):
    request = BuildRequest(
        source=source, out=root / "out", profile=profile, run_name=name,
        manifests_root=root / "manifests", hooks=hooks or ShardFaults(), pools=pools,
    )
    return run_build(request, on_shard_done=on_shard_done)


def tars(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "out" / "shards").iterdir())}


# ------------------------------------------------------------------------------------- soak
@pytest.fixture(scope="module")
def soak_source(tmp_path_factory) -> Path:
    """SOAK_IMAGES small images in folder order; in every shard of 8 one is corrupt, and every
    seventh shard holds an exact copy of an earlier image (a duplicate)."""
    root = tmp_path_factory.mktemp("soak-source")
    rng = np.random.default_rng(11)
    for i in range(SOAK_IMAGES):
        path = root / f"img-{i:04d}.png"
        shard, slot = divmod(i, SHARD)
        if slot == (shard * 3) % SHARD:
            good = root / "tmp.png"
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(good)
            path.write_bytes(good.read_bytes()[:300])  # truncated PNG
            good.unlink()
        elif slot == 6 and shard % 7 == 6:
            path.write_bytes((root / f"img-{i - 50:04d}.png").read_bytes())  # an exact copy
        else:
            w, h = int(rng.integers(32, 80)), int(rng.integers(32, 80))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def clean(pools, profile, soak_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("soak-clean")
    return root, build(soak_source, root, profile, pools)


@pytest.mark.scale
def test_soak_every_image_accounted_and_tars_equal_a_clean_run(pools, profile, soak_source, clean, tmp_path):
    import ray

    clean_root, clean_summary = clean
    assert clean_summary.status == "complete"
    killed: list[str] = []

    def kill_an_actor(entry, job):
        # after every 4th shard, kill one stage actor (Ray restarts it and replays its calls)
        done = len(job.entries)
        if done % 4 == 0 and done < SOAK_SHARDS:
            stage = ("captioner", "segmenter", "matcher")[len(killed) % 3]
            ray.kill(job.pools[stage].actors[0], no_restart=False)
            killed.append(stage)

    faults = ShardFaults(fail_shards={2: "raise", 5: "kill", 8: "raise", 11: "kill", 14: "raise"},
                         once_dir=str(tmp_path / "faults-once"))
    summary = build(soak_source, tmp_path, profile, pools, hooks=faults, on_shard_done=kill_an_actor)

    assert summary.status == "complete", summary
    assert len(killed) >= 3 and len(list((tmp_path / "faults-once").iterdir())) == 5  # the faults happened
    run = json.loads((summary.run_dir / "run.json").read_text())
    assert run["invocations"][-1]["shard_retries"] >= 3  # the "raise" faults and, maybe, the kills
    # shared pools with restarted actors: each stage's counts are this build's, never negative, and
    # at most every image once plus the images of the retried shards (a retry runs them again)
    most = SOAK_IMAGES + run["invocations"][-1]["shard_retries"] * SHARD
    assert set(run["invocations"][-1]["stage_rates"]) == {"captioner", "segmenter", "matcher", "faces", "identity"}
    for stage, r in run["invocations"][-1]["stage_rates"].items():
        assert 0 < r["images"] <= most and r["busy_seconds"] > 0 and r["images_per_second_per_replica"] > 0, (stage, r)

    items = {it.source_id: it for it in open_source(soak_source).items()}
    samples = manifest_samples(summary.run_dir)
    assert sorted(samples, key=int) == sorted(items, key=int)
    statuses = {"written": 0, "duplicate": 0, "failed": 0}
    for sid, s in samples.items():
        statuses[s["status"]] += 1
        if s["status"] == "failed":
            assert s["reason"].startswith(f"load: {items[sid].rel_path}: truncated or corrupt image data"), s
        elif s["status"] == "duplicate":
            assert s["reason"] == f"duplicate of source_id {items[sid].duplicate_of} (same image)"
    assert statuses == {"written": SOAK_IMAGES - SOAK_SHARDS - SOAK_COPIES, "duplicate": SOAK_COPIES, "failed": SOAK_SHARDS}
    assert summary.counts["written"] == statuses["written"] and summary.counts["pending"] == 0

    assert tars(tmp_path) == tars(clean_root)  # byte for byte
    written = [s.key for p in sorted((tmp_path / "out" / "shards").glob("*.tar")) for s in read_shard(p)]
    assert sorted(written) == sorted(s["key"] for s in samples.values() if s["status"] == "written")
    assert temp_files(tmp_path / "out", tmp_path / "manifests") == []
