import hashlib
import json
import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from datagen.manifests.run_manifest import RunFolderError, resolve_run_dir
from datagen.manifests.tables import (
    ensure_tables,
    find_sample,
    reason_kind,
    tables_are_current,
    write_manifest_tables,
)
from datagen.record.quality import FLAG_NAMES, match_margins, match_quality, names_a_person
from datagen.shards.reader import read_shard
from tests.run_factory import TEMPLATES, Template, make_run, make_sample


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest-run")
    plan = [["w", "w", "f", "w", "w"], ["w", "d", "w", "w", "f", "w"], ["w", "d", "w"]]
    expected = make_run(root, plan=plan, failed_shards=(2,))  # shard 2 kept failing: no tar
    tables = write_manifest_tables(expected["run_dir"])
    return root, expected, tables


def test_tables_agree_with_the_shards(built):
    _, expected, tables = built
    samples = pq.read_table(tables.samples).to_pylist()
    shards = pq.read_table(tables.shards).to_pylist()

    # one row per source image, in shard and plan order
    entries = [json.loads(p.read_text()) for p in sorted((expected["run_dir"] / "shards").glob("*.json"))]
    assert [r["source_id"] for r in samples] == [s["source_id"] for e in entries for s in e["samples"]]
    assert len(samples) == 14

    by_key = {r["key"]: r for r in samples}
    in_shards = {}
    assert [s["status"] for s in shards] == ["done", "done", "failed"]
    failed_shard = shards.pop()
    assert failed_shard["tar"] is None and failed_shard["sha256"] is None and failed_shard["attempts"] == 3
    assert (failed_shard["written"], failed_shard["skipped"], failed_shard["failed"]) == (0, 1, 2)
    assert "worker died" in failed_shard["error"]
    for s in shards:
        assert hashlib.sha256(open(s["tar"], "rb").read()).hexdigest() == s["sha256"]
        assert os.path.getsize(s["tar"]) == s["bytes"]
        keys = []
        for sample in read_shard(s["tar"]):
            keys.append(sample.key)
            in_shards[sample.key] = sample.record
        assert s["written"] == len(keys)
        assert s["samples"] == s["written"] + s["skipped"] + s["failed"]
    assert set(in_shards) == {k for k, r in by_key.items() if r["status"] == "written"} == set(expected["written"])

    for key, record in in_shards.items():
        row = by_key[key]
        template, _ = expected["written"][key]
        assert row["source_id"] == record.provenance.source_id == str(int(key))
        assert row["caption"] == record.caption and row["split"] == record.split
        assert row["n_segments"] == len(record.segments)
        assert row["n_person_segments"] == sum(s.coco_label == "person" for s in record.segments)
        assert row["n_phrases"] == len(record.phrases)
        seg = {s.id: s for s in record.segments}
        want_scores = [seg[p.segment_id].match_score for p in record.phrases if p.segment_id is not None]
        assert row["match_scores"] == want_scores
        assert row["n_matched"] == len(want_scores)
        assert row["min_match_score"] == min(want_scores)
        assert row["matched_words"] == [p.text for p in record.phrases if p.segment_id is not None]
        assert {f for f in FLAG_NAMES if row[f]} == template.expect_flags, (key, template.image)

    for key, reason in expected["failed"].items():
        assert by_key[key]["status"] == "failed" and by_key[key]["reason"] == reason
        assert by_key[key]["reason_kind"] in ("image", "shard failed after # attempt(s)")
        assert by_key[key]["caption"] is None and by_key[key]["match_scores"] is None
    for key, reason in expected["duplicate"].items():
        assert by_key[key]["status"] == "duplicate" and by_key[key]["reason"] == reason


def test_margin_is_the_gap_to_the_best_alternative_left_when_greedy_picked_the_match(built):
    _, expected, tables = built
    row = find_sample(pq.read_table(tables.samples), "3")  # Grace Hopper: two person segments, near tie
    assert row["min_margin"] == pytest.approx(0.262 - 0.257)
    assert row["ambiguous_match"] and row["unmatched_person_segment"]
    _, record = expected["written"]["00003"]
    margins = match_margins(record)
    assert margins[0] == pytest.approx(0.262 - 0.257)  # "a woman": best other in its row (person 2)
    assert margins[2] == pytest.approx(0.15 - 0.02)  # "a wall": best other in row / column
    assert 1 not in margins  # "a uniform" is unmatched


def test_margin_ignores_alternatives_already_taken_by_earlier_matches():
    t = Template("astronaut", "a woman and a man", ["a woman", "a man"],
                 [("person", (0.0, 0.0, 0.5, 1.0)), ("person", (0.5, 0.0, 1.0, 1.0))],
                 [[0.30, 0.25], [0.28, 0.12]])
    _, _, record = make_sample(t, "00007", "train", np.random.default_rng(0))
    assert [p.segment_id for p in record.phrases] == [1, 2]
    margins = match_margins(record)
    # "a woman" -> 1 was picked first: its alternatives were segment 2 (0.25) and "a man" (0.28)
    assert margins[0] == pytest.approx(0.02)
    # "a man" -> 2 was picked when segment 1 and "a woman" were taken: no alternative left
    assert margins[1] is None
    assert match_quality(record).min_margin == pytest.approx(0.02)


def test_summary_counts_and_distributions(built):
    _, expected, tables = built
    summary = json.loads(tables.summary.read_text())
    c = summary["counts"]
    assert (c["sources"], c["written"], c["duplicate"], c["failed"], c["shards"]) == (14, 8, 2, 4, 3)
    assert c["shards_failed"] == 1
    assert c["train"] + c["test"] == 8 and c["test"] == 2
    records = [r for _, r in expected["written"].values()]
    n_matches = sum(1 for r in records for p in r.phrases if p.segment_id is not None)
    assert c["matches"] == n_matches == sum(summary["histograms"]["match_score"]["counts"])
    assert sum(summary["histograms"]["min_match_score"]["counts"]) == 8
    per = summary["per_image"]["n_matched"]
    assert sum(per.values()) == 8 and sum(int(k) * v for k, v in per.items()) == n_matches
    assert summary["per_image"]["n_person_segments"] == {"0": 2, "1": 5, "2": 1}
    failures = summary["failures_by_reason"]
    assert {k: v["count"] for k, v in failures.items()} == {"image": 2, "shard failed after # attempt(s)": 2}
    assert {x["key"] for v in failures.values() for x in v["examples"]} == set(expected["failed"])
    assert c["no_person"] == 2 and c["ambiguous_match"] == 2 and c["unmatched_subject_phrase"] == 1
    assert summary["quantiles"]["min_match_score"]["min"] == pytest.approx(0.11)


def test_no_temp_files_are_left(built):
    _, expected, _ = built
    assert not [p.name for p in expected["run_dir"].iterdir() if ".tmp-" in p.name]


def test_run_is_found_by_name_or_path(built, monkeypatch):
    root, expected, _ = built
    assert resolve_run_dir(expected["run_dir"]) == expected["run_dir"].resolve()
    monkeypatch.chdir(root)
    assert resolve_run_dir("test-run") == expected["run_dir"].resolve()
    with pytest.raises(RunFolderError, match="run 'nope' not found"):
        resolve_run_dir("nope")


def test_tables_are_rebuilt_when_a_shard_entry_is_newer(tmp_path):
    expected = make_run(tmp_path, plan=[["w", "w"]])
    run_dir = expected["run_dir"]
    assert not tables_are_current(run_dir)
    ensure_tables(run_dir)
    assert tables_are_current(run_dir)
    earlier = time.time() - 100  # as if the tables were built before the shard entry was (re)written
    for name in ("shards.parquet", "samples.parquet", "summary.json"):
        os.utime(run_dir / name, (earlier, earlier))
    assert not tables_are_current(run_dir)
    ensure_tables(run_dir)
    assert tables_are_current(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "tables_version": 0}))  # an older version's
    assert not tables_are_current(run_dir)
    ensure_tables(run_dir)
    assert tables_are_current(run_dir)


def _edit_entry(run_dir, fn):
    path = run_dir / "shards" / "subjects-00000.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_a_written_sample_missing_from_its_tar_is_an_error(tmp_path):
    expected = make_run(tmp_path, plan=[["w", "w", "f"]])
    _edit_entry(expected["run_dir"], lambda d: d["samples"][2].update(status="written", reason=None)
                or d.update(written=3, failed=0))
    with pytest.raises(RunFolderError, match="lists sample 00002 as written, but subjects-00000.tar lacks it"):
        write_manifest_tables(expected["run_dir"])


def test_a_tar_sample_the_entry_does_not_list_is_an_error(tmp_path):
    expected = make_run(tmp_path, plan=[["w", "w"]])
    _edit_entry(expected["run_dir"], lambda d: d["samples"][1].update(status="failed", reason="X: y")
                or d.update(written=1, failed=1))
    with pytest.raises(RunFolderError, match=r"holds sample\(s\) \['00001'\]"):
        write_manifest_tables(expected["run_dir"])


def test_counts_that_disagree_with_the_samples_list_are_an_error(tmp_path):
    expected = make_run(tmp_path, plan=[["w", "f"]])
    _edit_entry(expected["run_dir"], lambda d: d.update(failed=0))
    with pytest.raises(RunFolderError, match="disagree with its samples list"):
        write_manifest_tables(expected["run_dir"])


def test_a_changed_tar_is_caught_by_size_and_by_sha256(tmp_path):
    expected = make_run(tmp_path, plan=[["w"]])
    tar = expected["shards_dir"] / "subjects-00000.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # same size, different content
    tar.write_bytes(bytes(data))
    write_manifest_tables(expected["run_dir"])  # size check alone passes
    with pytest.raises(RunFolderError, match="sha256 of .*subjects-00000.tar is"):
        write_manifest_tables(expected["run_dir"], verify_sha256=True)
    tar.write_bytes(bytes(data) + b"\0" * 512)
    with pytest.raises(RunFolderError, match=rf"is {len(data) + 512} bytes, the entry says {len(data)}"):
        write_manifest_tables(expected["run_dir"])


def test_moved_shards_are_found_with_shards_dir(tmp_path):
    expected = make_run(tmp_path, plan=[["w", "w"]])
    moved = tmp_path / "moved"
    shutil.move(expected["shards_dir"], moved)
    with pytest.raises(RunFolderError, match="does not exist"):
        write_manifest_tables(expected["run_dir"])
    tables = write_manifest_tables(expected["run_dir"], shards_dir=moved)
    assert pq.read_table(tables.shards).column("tar").to_pylist() == [str(moved / "subjects-00000.tar")]


def test_quality_definitions():
    assert names_a_person("a young man") and names_a_person("two Children") and not names_a_person("a banner")
    image, seg, record = make_sample(TEMPLATES[0], "00001", "train", np.random.default_rng(0))
    q = match_quality(record, ambiguous_margin=0.5)
    assert q.min_margin == pytest.approx(0.31 - 0.03) and q.ambiguous_match  # threshold is a parameter
    assert not match_quality(record).ambiguous_match


def test_reason_kind_groups_reasons():
    assert reason_kind("ImageError: a/b.png: truncated") == "ImageError"
    assert reason_kind("shard 12 timed out after 30 s") == "shard # timed out after # s"
    assert reason_kind(None) is None
