"""The dataset job on local Ray under load and under bad input (issue 11: soak, points 1-3).

* soak: 120 generated images in 15 shards of 8, with a transient fault every few shards (a stage
  actor killed after every 4th finished shard, a write task raising, a write task's worker
  killed), one corrupt image per shard and two exact copies; every image ends written, duplicate
  or failed with its own reason, and the tars equal those of a clean run of the same source
  (120, not a few hundred: enough shards to fit three actor kills and five write faults, each
  with shards still in flight after it, while both builds stay well under a minute on a quiet
  2-core machine; marked ``scale``: run by ``make test-scale``);
* a bad-input corpus (odd formats, degenerate sizes, odd names, links, things to pass over);
* an error in the driver still leaves ``run.json`` (status ``failed``, the reason) and no temp file.

Uses the session's shared local Ray and stage actors (``conftest.ray_local``,
``conftest.tiny_stage_pools``; killed actors are restarted by Ray, so the pools stay usable).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen.config import TINY_MODELS_ENV, load_profile
from datagen.shards.reader import read_shard
from datagen.sources.names import unescape_path
from datagen.sources.readers import open_source
from fixtures.failure_hooks import ShardFaults
from ray_jobs.job import BuildRequest, run_build

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
    """The session's tiny stage actors (tests/conftest.py), shared by every build here."""
    return tiny_stage_pools


def build(source: Path, root: Path, profile, pools, hooks=None, on_shard_done=None, name: str = "run"):
    request = BuildRequest(
        source=source, out=root / "out", profile=profile, run_name=name,
        manifests_root=root / "manifests", hooks=hooks or ShardFaults(), pools=pools,
    )
    return run_build(request, on_shard_done=on_shard_done)


def manifest_samples(run_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((run_dir / "shards").glob("*.json")):
        for s in json.loads(p.read_text(encoding="utf-8"))["samples"]:
            assert s["source_id"] not in out, f"{s['source_id']} recorded twice"
            out[s["source_id"]] = s
    return out


def temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if ".tmp-" in p.name]


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
    # shared pools with restarted actors: each stage's counts are this build's, never negative
    for stage, r in run["invocations"][-1]["stage_rates"].items():
        assert 0 < r["images"] <= SOAK_IMAGES and r["busy_seconds"] > 0 and r["images_per_second_per_replica"] > 0, (stage, r)

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


# ------------------------------------------------------------------------- bad-input corpus
def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h pixels (a decompression bomb's header) and holds almost nothing."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def make_corpus(root: Path) -> dict[str, str]:
    """A folder of broken and odd inputs; returns {os name relative to root: what it is}."""
    rng = np.random.default_rng(3)

    def noise(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    what: dict[str, str] = {}

    def add(name: str, kind: str, writer) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path)
        what[name] = kind

    add("good-1.png", "good", lambda p: noise(60, 40).save(p))
    add("good-2.jpg", "good", lambda p: noise(50, 70).save(p, quality=90))
    add("truncated.png", "bad", lambda p: (noise(60, 40).save(p), p.write_bytes(p.read_bytes()[:200])))
    add("zero.png", "bad", lambda p: p.write_bytes(b""))
    add("garbage.jpg", "bad", lambda p: p.write_bytes(b"this is not an image at all"))
    add("cmyk.jpg", "odd", lambda p: noise(48, 48).convert("CMYK").save(p))
    add("gray16.png", "odd", lambda p: Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(p))
    add("palette-alpha.png", "odd", lambda p: noise(40, 40).convert("P").save(p, transparency=3))
    add("rgba.png", "odd", lambda p: noise(40, 40).convert("RGBA").save(p))

    def exif_rotated(p):
        im = noise(64, 32)
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(p, exif=exif)

    add("exif-rotated.jpg", "odd", exif_rotated)
    add("one-pixel.png", "bad", lambda p: noise(1, 1).save(p))
    add("thin-1x4000.png", "bad", lambda p: Image.new("RGB", (1, 4000), (200, 20, 20)).save(p))
    add("flat-4000x3.png", "bad", lambda p: Image.new("RGB", (4000, 3), (20, 200, 20)).save(p))
    add("bomb.png", "bad", lambda p: _png_header_only(p, 30000, 30000))
    add("float.tif", "bad", lambda p: Image.fromarray(rng.random((20, 20)).astype(np.float32), mode="F").save(p))

    def animated_webp(p):
        frames = [noise(40, 40) for _ in range(3)]
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=40)

    add("animated.webp", "odd", animated_webp)
    add("<img src=x onerror=alert(1)>.png", "odd", lambda p: noise(40, 30).save(p))
    add("名前 é.png", "odd", lambda p: noise(30, 40).save(p))
    add(os.fsdecode(b"latin\xe9.png"), "odd", lambda p: noise(44, 33).save(p))
    add("back\\slash.png", "odd", lambda p: noise(33, 44).save(p))
    add("x.png/inside.png", "good", lambda p: noise(40, 40).save(p))
    # the first of a copy group in sorted path order is kept, so the copy's name sorts after good-1.png
    add("zz-copy-of-good-1.png", "duplicate", lambda p: p.write_bytes((root / "good-1.png").read_bytes()))
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    what["dangling.png"] = "bad"
    (root / "self-loop.png").symlink_to(root / "self-loop.png")
    what["self-loop.png"] = "bad"
    # passed over (not items): each must be listed in run.json with its reason
    frames = [noise(16, 16) for _ in range(2)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=40)
    (root / ".hidden.png").write_bytes((root / "good-2.jpg").read_bytes())
    (root / "notes.txt").write_text("not an image")
    (root / "loop-dir").symlink_to(root, target_is_directory=True)
    return what


def test_bad_input_corpus_every_image_accounted_with_its_own_reason(pools, profile, tmp_path, capsys):
    source = tmp_path / "corpus"
    source.mkdir()
    what = make_corpus(source)
    summary = build(source, tmp_path, profile, pools)
    printed = capsys.readouterr().out
    assert summary.status == "complete" and summary.exit_code == 0  # no crash

    samples = manifest_samples(summary.run_dir)
    by_name = {unescape_path(s["rel_path"]): s for s in samples.values()}
    assert sorted(by_name) == sorted(what)  # every image accounted, exactly once, names as the OS has them
    tried, naming = len(what), 0
    for name, kind in what.items():
        s = by_name[name]
        expected = {"good": "written", "odd": "written", "duplicate": "duplicate", "bad": "failed"}[kind]
        assert s["status"] == expected, (name, s)
        if s["status"] == "failed":
            assert s["reason"].startswith(f"load: {s['rel_path']}: "), s
            naming += 1
    assert by_name["zz-copy-of-good-1.png"]["reason"] == (
        f"duplicate of source_id {by_name['good-1.png']['source_id']} (same image)")
    assert "image is 1x64 px as stored, under the minimum side of 16 px" in by_name["thin-1x4000.png"]["reason"]
    assert "decompression-bomb guard" in by_name["bomb.png"]["reason"]

    # the non-UTF-8 name, escaped, in the manifest, the record and the tables
    latin = by_name[os.fsdecode(b"latin\xe9.png")]
    assert latin["rel_path"] == "latin\\xe9.png"
    records = {s.record.key: s.record for p in (tmp_path / "out" / "shards").glob("*.tar") for s in read_shard(p)}
    assert records[latin["key"]].provenance.path == "latin\\xe9.png"
    import pyarrow.parquet as pq

    table = pq.read_table(summary.run_dir / "samples.parquet").to_pylist()
    assert "latin\\xe9.png" in {row.get("rel_path") or row.get("path") for row in table}

    run = json.loads((summary.run_dir / "run.json").read_text(encoding="utf-8"))
    skipped = {s["path"]: s["reason"] for s in run["source"]["skipped"]}
    assert set(skipped) == {"animated.gif", ".hidden.png", "notes.txt", "loop-dir", "x.png"}
    assert run["source"]["skipped_count"] == 5
    assert "the source passed over 5 thing(s)" in printed
    assert temp_files(tmp_path / "out", tmp_path / "manifests") == []
    failed = sum(1 for s in samples.values() if s["status"] == "failed")
    print(f"\nbad-input corpus: {tried} images tried, 0 crashes, {len(by_name)} accounted, "
          f"{failed} failed of which {naming} with a reason naming the file; {len(skipped)} passed over, listed")


# ---------------------------------------------------------------------------- driver error
def test_an_error_in_the_driver_leaves_a_failed_run_json_and_no_temp_file(pools, profile, sample_source, tmp_path):
    def explode(entry, job):
        # a temp file as a writer killed mid-write would leave it, then a driver error
        (job.request.run_dir / "shards" / f".{entry['name']}.json.tmp-4242").write_text("{")
        raise RuntimeError(f"driver fell over after {entry['name']}")

    summary = build(sample_source, tmp_path, profile, pools, on_shard_done=explode)
    assert summary.status == "failed" and summary.exit_code == 1
    assert summary.error.startswith("RuntimeError: driver fell over after subjects-0000")
    run = json.loads((summary.run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == summary.error
    assert run["invocations"][-1]["status"] == "failed" and "Traceback" in run["invocations"][-1]["traceback"]
    assert temp_files(tmp_path / "out", tmp_path / "manifests") == []


def test_a_run_name_that_leaves_the_manifests_folder_is_refused(profile, tmp_path):
    for name in ("../x", "a/b", "..", "", "/abs"):
        with pytest.raises(ValueError, match="is not a plain folder name"):
            BuildRequest(source=tmp_path, out=tmp_path / "out", profile=profile, run_name=name,
                         manifests_root=tmp_path / "manifests")
    assert not (tmp_path / "manifests").exists() and not (tmp_path / "x").exists()
