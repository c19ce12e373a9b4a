"""Shard write task, per-shard manifest entries, resume decisions and the final accounting,
exercised on real encoded samples without a Ray cluster."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from datagen.manifests import shard_entry
from datagen.manifests.run_manifest import write_run_manifest
from datagen.manifests.shard_entry import AccountingError, account
from datagen.shards.plan import plan_shards
from datagen.shards.reader import read_shard
from datagen.shards.writer import encode_jpeg, encode_segment_map
from datagen.sources.items import SourceItem
from fixtures.failure_hooks import InjectedFailure, ShardFaults
from ray_jobs.chunks import EncodedChunk, EncodedSample
from ray_jobs.tasks import load_chunk, split_chunks, write_shard_tar
from tests.record_factory import two_person_sample


def _item(i: int, root, duplicate_of: str | None = None) -> SourceItem:
    rel = f"img/{i:05d}.png"
    return SourceItem(source_id=str(i), key=f"{i:05d}", path=str(root / rel), rel_path=rel, group=f"g{i}",
                      split="train", duplicate_of=duplicate_of)


def _encoded(key: str) -> EncodedSample:
    record, seg_map = two_person_sample(key=key)
    image = Image.fromarray(np.full((record.height, record.width, 3), int(key) % 250, np.uint8))
    return EncodedSample(key, encode_jpeg(image), encode_segment_map(seg_map), record.to_json().encode())


@pytest.fixture
def shard(tmp_path):
    """Shard 0 of items 40..43: 40, 41 written, 42 a duplicate of 40, 43 failed to load."""
    items = [_item(40, tmp_path), _item(41, tmp_path), _item(42, tmp_path, duplicate_of="40"), _item(43, tmp_path)]
    (spec,) = plan_shards(items, shard_size=4)
    chunk = EncodedChunk(
        samples=[_encoded("00040"), _encoded("00041")],
        outcomes={"40": ("written", None), "41": ("written", None), "43": ("failed", "image: 00043.png: file is missing")},
    )
    return spec, chunk


def test_write_shard_tar_writes_plan_order_and_accounts_every_item(tmp_path, shard):
    spec, chunk = shard
    tar = tmp_path / "shards" / f"{spec.name}.tar"
    result = write_shard_tar(spec, str(tar), chunk)
    assert [s.key for s in read_shard(tar)] == ["00040", "00041"]
    assert [(s["source_id"], s["status"]) for s in result["samples"]] == [
        ("40", "written"), ("41", "written"), ("42", "duplicate"), ("43", "failed")
    ]
    assert result["samples"][2]["reason"] == "duplicate of source_id 40 (same image)"
    assert result["samples"][3]["reason"] == "image: 00043.png: file is missing"
    assert result["bytes"] == tar.stat().st_size
    # deterministic: the same samples give byte-identical tars
    again = write_shard_tar(spec, str(tmp_path / "other.tar"), chunk)
    assert again["sha256"] == result["sha256"]
    assert (tmp_path / "other.tar").read_bytes() == tar.read_bytes()


def test_injected_raise_leaves_no_tar(tmp_path, shard):
    spec, chunk = shard
    tar = tmp_path / f"{spec.name}.tar"
    failing = ShardFaults(fail_shards={spec.index: "raise"}).wrap_write_task(write_shard_tar)
    with pytest.raises(InjectedFailure, match=spec.name):
        failing(spec, str(tar), chunk)
    assert list(tmp_path.iterdir()) == []
    # other shards go through the same wrapped task untouched
    other = ShardFaults(fail_shards={spec.index + 1: "raise"}).wrap_write_task(write_shard_tar)
    assert other(spec, str(tar), chunk)["sha256"] == write_shard_tar(spec, str(tmp_path / "b.tar"), chunk)["sha256"]


def test_entry_and_resume(tmp_path, shard):
    spec, chunk = shard
    tar = tmp_path / f"{spec.name}.tar"
    run_dir = tmp_path / "run"
    written = write_shard_tar(spec, str(tar), chunk)
    entry = shard_entry.done_entry(spec, tar, written, 1.5, 1, "digest-a")
    assert (entry["written"], entry["skipped"], entry["failed"]) == (2, 1, 1)
    shard_entry.write_entry(run_dir, spec, entry)
    on_disk = json.loads((run_dir / "shards" / "subjects-00000.json").read_text())
    assert on_disk == entry
    assert [p.name for p in (run_dir / "shards").iterdir()] == ["subjects-00000.json"]  # no temp left

    assert shard_entry.resume_state(on_disk, spec, tar, "digest-a") == (True, "done")
    assert shard_entry.resume_state(None, spec, tar, "digest-a") == (False, "no manifest entry")
    data = bytearray(tar.read_bytes())
    data[-1] ^= 1  # same size, different content
    tar.write_bytes(bytes(data))
    assert shard_entry.resume_state(on_disk, spec, tar, "digest-a") == (False, "tar sha256 differs from the entry")
    tar.unlink()
    assert shard_entry.resume_state(on_disk, spec, tar, "digest-a") == (False, "tar missing")
    with pytest.raises(shard_entry.ManifestError, match="another configuration"):
        shard_entry.resume_state(on_disk, spec, tar, "digest-b")
    other_plan = replace(spec, items=spec.items[:3])
    with pytest.raises(shard_entry.ManifestError, match="--shard-size"):
        shard_entry.resume_state(on_disk, other_plan, tar, "digest-a")


def test_failed_entry_names_every_item_and_is_redone(tmp_path, shard):
    spec, _ = shard
    entry = shard_entry.failed_entry(spec, tmp_path / "x.tar", "WorkerCrashedError: boom", 3.0, 3, "d")
    assert entry["status"] == "failed" and entry["sha256"] is None and entry["bytes"] == 0
    assert [s["status"] for s in entry["samples"]] == ["failed", "failed", "duplicate", "failed"]
    assert all("boom" in s["reason"] for s in entry["samples"] if s["status"] == "failed")
    done, why = shard_entry.resume_state(entry, spec, tmp_path / "x.tar", "d")
    assert not done and "boom" in why


def test_account_checks_exactly_once(tmp_path, shard):
    spec, chunk = shard
    plan = [spec]
    assert account(plan, {})["pending"] == 4
    written = write_shard_tar(spec, str(tmp_path / "a.tar"), chunk)
    entry = shard_entry.done_entry(spec, tmp_path / "a.tar", written, 1.0, 1, "d")
    counts = account(plan, {0: entry})
    assert (counts["written"], counts["duplicate"], counts["failed"], counts["pending"]) == (2, 1, 1, 0)
    doubled = {**entry, "samples": [*entry["samples"], entry["samples"][0]]}
    with pytest.raises(AccountingError, match=r"more than once: \['40'\]"):
        account(plan, {0: doubled})
    dropped = {**entry, "samples": entry["samples"][1:]}
    with pytest.raises(AccountingError, match=r"in no shard entry: \['40'\]"):
        account(plan, {0: dropped})


def test_run_manifest_keeps_every_invocation(tmp_path):
    write_run_manifest(tmp_path, {"run": "r", "status": "interrupted"}, {"seconds": 1})
    write_run_manifest(tmp_path, {"run": "r", "status": "complete"}, {"seconds": 2})
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["status"] == "complete"
    assert [i["seconds"] for i in data["invocations"]] == [1, 2]


def test_load_chunk_records_bad_images_by_name(tmp_path):
    good = tmp_path / "img" / "00001.png"
    good.parent.mkdir()
    Image.new("RGB", (300, 200), (10, 20, 30)).save(good)
    (tmp_path / "img" / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items = [_item(1, tmp_path), _item(2, tmp_path), _item(3, tmp_path)]
    (spec,) = plan_shards(items, 3)
    (chunk_items,) = split_chunks(spec, images_per_call=8)
    chunk = load_chunk(0, 0, chunk_items, max_side=150)
    assert [li.item.source_id for li in chunk.loaded] == ["1"]
    assert chunk.loaded[0].image.size == (150, 100)
    assert set(chunk.failed) == {"2", "3"}
    assert "00002.png" in chunk.failed["2"] and "00003.png: file is missing" in chunk.failed["3"]


def test_split_chunks_skips_duplicates_and_keeps_order(tmp_path):
    items = [_item(i, tmp_path, duplicate_of="0" if i == 3 else None) for i in range(7)]
    (spec,) = plan_shards(items, 7)
    chunks = split_chunks(spec, images_per_call=4)
    assert [[it.source_id for it in c] for c in chunks] == [["0", "1", "2", "4"], ["5", "6"]]
