"""The dataset job end to end on local Ray with the tiny profile: on the bundled sample, the content
of the shards, a no-op re-run, interrupted-then-resumed runs and a source with bad images; a corpus
of broken and odd inputs (issue 11: every image accounted with its own reason); an error in the
driver (``run.json`` says ``failed``, no temp file left); run names that leave the manifests folder.
All share the session's Ray and one set of tiny stage actors (``tests/conftest.py``)."""

from __future__ import annotations

import json
import os
import shutil
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

# Small shards (3 images: the 12-image sample makes 4 shards), small stored images, two images
# per actor call, few retries: enough to exercise every path on 2 CPUs in reasonable time.
TEST_CONFIG = {
    "shards": {"size": 3, "max_side": 256},
    "ray": {"images_per_call": 2, "shard_attempts": 2, "task_max_retries": 1, "progress_interval_s": 10},
}


@pytest.fixture(scope="module")
def profile(tiny_models_all):
    import os

    old = os.environ.get(TINY_MODELS_ENV)
    os.environ[TINY_MODELS_ENV] = str(tiny_models_all)
    try:
        yield load_profile("tiny", TEST_CONFIG)
    finally:
        if old is None:
            os.environ.pop(TINY_MODELS_ENV, None)
        else:
            os.environ[TINY_MODELS_ENV] = old


@pytest.fixture(scope="module")
def small_profile(profile):
    """Shards of 8 images stored at most 64 px: the bad-input corpus and the driver-error tests."""
    import dataclasses

    return dataclasses.replace(profile, shards=dataclasses.replace(profile.shards, size=8, max_side=64))


@pytest.fixture(scope="module")
def pools(tiny_stage_pools):
    """The tiny stage actors (tests/conftest.py), shared by every build of this module."""
    return tiny_stage_pools


def build(source, root: Path, profile, pools=None, name: str = "run", on_shard_done=None, **faults):
    request = BuildRequest(
        source=source, out=root / "out", profile=profile, run_name=name, manifests_root=root / "manifests",
        hooks=ShardFaults(**faults), pools=pools,
    )
    return run_build(request, on_shard_done=on_shard_done)


def entries(run_dir: Path) -> dict[int, dict]:
    return {json.loads(p.read_text())["shard"]: json.loads(p.read_text()) for p in (run_dir / "shards").glob("*.json")}


def tar_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "out" / "shards").iterdir())}


def assert_same_shards(root: Path, reference: Path) -> None:
    """Byte-identical shard folders; on a difference, name the members that differ."""
    got, want = tar_bytes(root), tar_bytes(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        if got[name] != want[name]:
            a, b = _members(root / "out" / "shards" / name), _members(reference / "out" / "shards" / name)
            differing = [m for m in sorted(set(a) | set(b)) if a.get(m) != b.get(m)]
            detail = {m: _json_diff(json.loads(a[m]), json.loads(b[m])) for m in differing if m.endswith(".json") and m in a and m in b}
            raise AssertionError(f"{name} differs from the reference in members {differing}: {detail}")


def _json_diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _json_diff(a.get(k), b.get(k), f"{path}.{k}")][:5]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _json_diff(x, y, f"{path}[{i}]")][:5]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _members(tar_path: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.fixture(scope="module")
def reference(pools, profile, sample_source, tmp_path_factory):
    """One uninterrupted run over the sample; the other runs are compared with it."""
    root = tmp_path_factory.mktemp("reference")
    summary = build(sample_source, root, profile, pools)
    return root, summary


def check_run(run_dir: Path, source: Path, max_side: int = 256) -> dict[str, dict]:
    """Check a finished run's shards against its manifests and the source; return each source
    item's manifest sample by source_id. Every check a consumer relies on is made here."""
    items = {it.source_id: it for it in open_source(source).items()}
    ents = entries(run_dir)
    seen: list[str] = []
    keys_in_tars: list[str] = []
    phrases = segments = 0
    for k, entry in sorted(ents.items()):
        assert entry["name"] == f"subjects-{k:05d}"
        seen += [s["source_id"] for s in entry["samples"]]
        if entry["status"] != "done":
            continue
        samples = list(read_shard(entry["tar"]))  # decodes and validates every record
        assert [s.key for s in samples] == [x["key"] for x in entry["samples"] if x["status"] == "written"]
        keys_in_tars += [s.key for s in samples]
        for sample in samples:
            rec, seg = sample.record, sample.segment_map
            item = items[rec.provenance.source_id]
            assert rec.key == item.key and rec.split == item.split and rec.provenance.path == item.rel_path
            assert sample.image.size == (rec.width, rec.height) == (seg.shape[1], seg.shape[0])
            assert max(rec.width, rec.height) <= max_side
            assert set(np.unique(seg).tolist()) - {0} == {s.id for s in rec.segments}
            for s in rec.segments:
                ys, xs = np.nonzero(seg == s.id)
                x0, y0, x1, y1 = s.bbox
                assert 0 <= x0 < x1 <= rec.width and 0 <= y0 < y1 <= rec.height
                assert [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] == s.bbox
                assert s.area == len(xs)
                if s.matched:
                    assert rec.caption[s.start : s.end] == s.word
            for p in rec.phrases:
                assert rec.caption[p.start : p.end] == p.text
            # the face stage ran: every person segment lists its faces, and the FFHQ-wild face rect is placed
            fc = rec.face_checks
            assert fc is not None and fc.primary_face is not None and rec.models["face_detector"] == "mtcnn"
            x0, y0, x1, y1 = fc.primary_face.rect
            assert 0 <= x0 < x1 <= rec.width and 0 <= y0 < y1 <= rec.height
            for s in rec.segments:
                assert (s.faces is not None) == (s.coco_label == "person")
                for f in s.faces or []:
                    assert 0 <= f.box[0] < f.box[2] <= rec.width and 0 <= f.box[1] < f.box[3] <= rec.height
            phrases += len(rec.phrases)
            segments += len(rec.segments)
    # every source image accounted for exactly once, every written one in exactly one tar
    assert sorted(seen, key=int) == sorted(items, key=int)
    assert len(keys_in_tars) == len(set(keys_in_tars))
    statuses = {s["source_id"]: s for e in ents.values() for s in e["samples"]}
    assert sorted(keys_in_tars) == sorted(s["key"] for s in statuses.values() if s["status"] == "written")
    assert all(s["reason"] for s in statuses.values() if s["status"] != "written")
    if keys_in_tars:
        assert segments > 0 and phrases > 0  # the checks above ran on real content
    return statuses


def test_every_shard_and_sample_is_consistent(reference, sample_source):
    root, summary = reference
    assert summary.status == "complete" and summary.exit_code == 0
    assert sorted(entries(summary.run_dir)) == [0, 1, 2, 3]
    assert sorted(p.name for p in (root / "out" / "shards").iterdir()) == [f"subjects-{i:05d}.tar" for i in range(4)]
    statuses = check_run(summary.run_dir, sample_source)
    assert statuses["1003"]["status"] == "duplicate" and "source_id 3" in statuses["1003"]["reason"]
    assert all(s["status"] == "written" for sid, s in statuses.items() if sid != "1003")
    assert summary.counts == {
        "items": 12, "written": 11, "duplicate": 1, "failed": 0, "pending": 0,
        "shards": {"planned": 4, "done": 4, "failed": 0, "pending": 0},
    }
    run = json.loads((summary.run_dir / "run.json").read_text())
    assert run["status"] == "complete" and run["counts"] == summary.counts
    assert run["models"]["captioner"].endswith("blip2") and run["packages"]["ray"]
    assert run["config"]["shards"] == {"size": 3, "max_side": 256, "jpeg_quality": 95, "verify_pixel_md5": False}
    assert run["config"]["ray"]["images_per_call"] == 2 and run["config"]["captioner"]["max_new_tokens"] == 12
    assert run["invocations"][-1]["shards_run"] == 4
    assert run["config"]["faces"]["detector"] == "mtcnn" and run["models"]["face_detector"] == "mtcnn"
    assert run["invocations"][-1]["stage_rates"]["faces"]["images"] == 11
    # the identity stage ran: a face table per shard, one row per embedded face of the records, dlib's 128-d
    from datagen.manifests.face_table import read_faces
    from datagen.shards.reader import iter_shard_records

    faces, matrix = read_faces(summary.run_dir)
    assert sorted(p.name for p in (summary.run_dir / "faces").iterdir()) == [f"subjects-{i:05d}.parquet" for i in range(4)]
    records = [r for tar in sorted((root / "out" / "shards").iterdir()) for r in iter_shard_records(tar)]
    assert all(r.schema_version == "1.2" and r.identity_faces is not None for r in records)
    assert sorted(faces.column("face").to_pylist()) == sorted(
        f"{r.key}/{n}" for r in records for n, f in enumerate(r.identity_faces) if f.embedded)
    assert matrix.shape == (len(faces), 128) and run["models"]["identity_embedder"].startswith("dlib:")


def test_second_run_is_a_no_op(reference, pools, profile, sample_source):
    root, first = reference
    before = tar_bytes(root)
    ents_before = entries(first.run_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in [*(root / "out" / "shards").iterdir(), *(first.run_dir / "shards").iterdir()]}
    again = build(sample_source, root, profile, pools)
    assert again.status == "complete"
    assert (again.shards_run, again.shards_skipped) == (0, 4)
    assert tar_bytes(root) == before and entries(first.run_dir) == ents_before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_failed_shards_are_recorded_then_resumed_to_identical_bytes(reference, pools, profile, sample_source, tmp_path):
    ref_root, _ = reference
    first = build(sample_source, tmp_path, profile, pools, fail_shards={1: "raise", 2: "kill"})
    assert first.status == "incomplete" and first.exit_code == 1
    ents = entries(first.run_dir)
    assert [ents[k]["status"] for k in range(4)] == ["done", "failed", "failed", "done"]
    assert "InjectedFailure" in ents[1]["error"] and ents[1]["attempts"] == 2
    assert all(s["status"] == "failed" and "injected failure" in s["reason"] for s in ents[1]["samples"])
    assert ents[2]["samples"][2]["status"] == "duplicate"  # 1003 stays a duplicate in a failed shard
    assert first.counts["failed"] == 5 and first.counts["pending"] == 0
    check_run(first.run_dir, sample_source)
    assert sorted(tar_bytes(tmp_path)) == ["subjects-00000.tar", "subjects-00003.tar"]  # no temp left

    resumed = build(sample_source, tmp_path, profile, pools)
    assert resumed.status == "complete" and (resumed.shards_run, resumed.shards_skipped) == (2, 2)
    assert_same_shards(tmp_path, ref_root)
    run = json.loads((resumed.run_dir / "run.json").read_text())
    assert [i["status"] for i in run["invocations"]] == ["incomplete", "complete"]


def test_interrupted_run_resumes_to_identical_bytes(reference, pools, profile, sample_source, tmp_path, capsys):
    import pyarrow.parquet as pq

    ref_root, ref = reference
    stopped = build(sample_source, tmp_path, profile, pools, stop_after_shards=1)
    assert stopped.status == "interrupted" and stopped.exit_code == 130
    assert stopped.counts["pending"] > 0
    done_before = set(entries(stopped.run_dir))
    assert 1 <= len(done_before) < 4
    # a crash can leave a half-written temp file: plant one, resume must clear it
    shards_dir = tmp_path / "out" / "shards"
    (shards_dir / "subjects-00003.tar.tmp-99999").write_bytes(b"partial")
    # a finished shard whose face table is gone (deleted by hand, a lost upload) is redone, not skipped
    lost = f"subjects-{min(done_before):05d}"
    (stopped.run_dir / "faces" / f"{lost}.parquet").unlink()
    capsys.readouterr()
    resumed = build(sample_source, tmp_path, profile, pools)
    assert resumed.status == "complete"
    assert f"{lost}: redoing (its faces table is missing)" in "".join(capsys.readouterr())
    assert resumed.shards_skipped == len(done_before) - 1 and resumed.shards_run == 4 - len(done_before) + 1
    assert_same_shards(tmp_path, ref_root)
    for k in range(4):  # every face table back, equal to the uninterrupted run's
        name = f"subjects-{k:05d}.parquet"
        assert pq.read_table(resumed.run_dir / "faces" / name).equals(pq.read_table(ref.run_dir / "faces" / name))


def test_a_kill_at_the_first_shard_write_then_a_resume_leaves_no_temp_file(reference, pools, profile, sample_source, tmp_path):
    """What kill -9 leaves when it lands at the first shard write: that shard's tar renamed into
    place but its manifest entry still a temp file, another shard's tar half-written, run.json's
    temp. The resume clears every temp file, redoes every shard, and writes the reference's bytes."""
    ref_root, ref = reference
    shards_dir, entries_dir = tmp_path / "out" / "shards", tmp_path / "manifests" / "run" / "shards"
    shards_dir.mkdir(parents=True)
    entries_dir.mkdir(parents=True)
    shutil.copy(ref_root / "out" / "shards" / "subjects-00000.tar", shards_dir)
    entry = (ref.run_dir / "shards" / "subjects-00000.json").read_bytes()
    (entries_dir / "subjects-00000.json.tmp-99999").write_bytes(entry[: len(entry) // 2])
    (shards_dir / "subjects-00001.tar.tmp-99998").write_bytes(b"partial tar")
    (entries_dir.parent / "run.json.tmp-99999").write_text("{")
    resumed = build(sample_source, tmp_path, profile, pools)
    assert resumed.status == "complete" and resumed.shards_run == 4  # no entry: every shard redone
    assert temp_files(tmp_path / "out", tmp_path / "manifests") == []
    assert_same_shards(tmp_path, ref_root)
    check_run(resumed.run_dir, sample_source)


def test_a_stage_added_through_the_table_alone_runs_in_a_real_build(reference, pools, profile, tiny_models_all,
                                                                   sample_source, tmp_path, monkeypatch):
    """A stage defined in tests/ (tests/plugin_stage.py), registered through the stage table, with its
    own profile section: its actor runs beside the shared tiny actors and its field reaches every
    record; the contract's members are the reference's, byte for byte."""
    from datagen import stage_table
    from datagen.config import TINY_MODELS_ENV, ProfileError
    from tests.plugin_stage import CAPTION_WORDS

    ref_root, ref = reference
    monkeypatch.setenv(TINY_MODELS_ENV, str(tiny_models_all))
    with pytest.raises(ProfileError, match="unknown setting 'caption_words'"):
        load_profile("tiny", TEST_CONFIG, {"caption_words": {"min_length": 2}})  # not registered: refused
    with stage_table.registered(CAPTION_WORDS):
        # the shared actors' placement, so that the build reuses them and starts only the new stage's
        placed = {name: {"num_cpus": pool.placement.num_cpus} for name, pool in pools.pools.items()}
        overlay = {"caption_words": {"min_length": 2}, "ray": {"stages": {**placed, "caption_words": {"num_cpus": 0.05}}}}
        plugged = load_profile("tiny", TEST_CONFIG, overlay)
        assert plugged.section("caption_words").min_length == 2
        assert [st.name for st in stage_table.stages_for(plugged)] == ["captioner", "segmenter", "matcher", "faces", "identity", "caption_words"]
        summary = build(sample_source, tmp_path, plugged, pools)
    assert "caption_words" not in stage_table.stage_names()  # the registration ended with the block
    assert summary.status == "complete" and summary.counts == ref.counts
    run = json.loads((summary.run_dir / "run.json").read_text())
    assert run["models"]["caption_words"] == "whitespace split" and run["config_digest"] != json.loads(
        (ref.run_dir / "run.json").read_text())["config_digest"]
    assert run["invocations"][-1]["stage_rates"]["caption_words"]["images"] == 11
    assert set(run["invocations"][-1]["ray"]["actors"]) == {"captioner", "segmenter", "matcher", "faces", "identity", "caption_words"}
    records = 0
    for name in sorted(tar_bytes(ref_root)):
        ours, theirs = _members(tmp_path / "out" / "shards" / name), _members(ref_root / "out" / "shards" / name)
        assert sorted(ours) == sorted(theirs)
        for member, data in theirs.items():
            if not member.endswith(".json"):
                assert ours[member] == data, member  # image and segment map: the same bytes
                continue
            got, want = json.loads(ours[member]), json.loads(data)
            words = sum(1 for w in want["caption"].split() if len(w) >= 2)
            assert got.pop("caption_words") == words
            assert got["models"].pop("caption_words") == "whitespace split"
            assert got == want
            records += 1
    assert records == 11


def test_corrupt_and_missing_images_are_recorded_and_named(pools, profile, sample_source, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(sample_source, source)
    wild = source / "in-the-wild-images"
    (wild / "00000" / "00001.png").unlink()  # missing
    truncated = wild / "01000" / "01001.png"
    truncated.write_bytes(truncated.read_bytes()[:500])  # truncated PNG
    (wild / "02000" / "02000.png").write_bytes(b"this is not an image")  # garbage
    summary = build(source, tmp_path, profile, pools)
    assert summary.status == "complete"
    statuses = check_run(summary.run_dir, source)
    failed = {sid: s["reason"] for sid, s in statuses.items() if s["status"] == "failed"}
    assert sorted(failed, key=int) == ["1", "1001", "2000"]
    assert "00001.png: file is missing" in failed["1"]
    assert "01001.png" in failed["1001"] and "truncated or corrupt" in failed["1001"]
    assert "02000.png" in failed["2000"] and "not a recognised image format" in failed["2000"]
    assert summary.counts["written"] == 8 and summary.counts["duplicate"] == 1


def manifest_samples(run_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((run_dir / "shards").glob("*.json")):
        for s in json.loads(p.read_text(encoding="utf-8"))["samples"]:
            assert s["source_id"] not in out, f"{s['source_id']} recorded twice"
            out[s["source_id"]] = s
    return out


def temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if ".tmp-" in p.name]


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


def test_bad_input_corpus_every_image_accounted_with_its_own_reason(pools, small_profile, tmp_path, capsys):
    source = tmp_path / "corpus"
    source.mkdir()
    what = make_corpus(source)
    summary = build(source, tmp_path, small_profile, pools)
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
def test_an_error_in_the_driver_leaves_a_failed_run_json_and_no_temp_file(pools, small_profile, sample_source, tmp_path):
    def explode(entry, job):
        # a temp file as a writer killed mid-write would leave it, then a driver error
        (job.request.run_dir / "shards" / f".{entry['name']}.json.tmp-4242").write_text("{")
        raise RuntimeError(f"driver fell over after {entry['name']}")

    summary = build(sample_source, tmp_path, small_profile, pools, on_shard_done=explode)
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
