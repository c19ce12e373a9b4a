"""Hugging Face ``datasets``, the real package: our shards load with ``load_dataset("webdataset")`` given
``shard_features()`` (even where its own inference stops on a record whose ``faces`` is empty first and
a struct later), and ``export --format hf`` writes a folder ``load_dataset(OUT)`` reads, card included."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import yaml

from cli.main import main
from datagen.export.hf import CARD
from datagen.record.face_quality import face_quality
from datagen.record.quality import match_quality
from datagen.shards.hf_features import shard_features
from datagen.shards.reader import read_shard
from datagen.shards.writer import ShardWriter
from tests.run_factory import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Twelve face-checked samples: every template twice (rocket's person has no face, coffee and chelsea
    have no person), in two shards."""
    return make_run(tmp_path_factory.mktemp("hf-run"), plan=[["w"] * 6, ["w"] * 6], face_checks=True)


@pytest.fixture(scope="module")
def faceless_first(run, tmp_path_factory):
    """One shard whose first five samples have no face boxes (empty ``faces`` or none) and a later
    one has: what stops ``datasets``' inference. Written by the shard writer from the run's samples."""
    samples = [s for tar in sorted(run["shards_dir"].glob("*.tar")) for s in read_shard(tar)]

    def has_face(s):
        return any(seg.faces for seg in s.record.segments)

    ordered = sorted(samples, key=has_face)
    assert not any(has_face(s) for s in ordered[:5]) and has_face(ordered[-1])
    tar = tmp_path_factory.mktemp("faceless-first") / "subjects-00000.tar"
    with ShardWriter(tar) as writer:
        for s in ordered:
            writer.write(s.image, s.segment_map, s.record)
    return tar, list(read_shard(tar))


def test_our_shards_load_with_shard_features_where_inference_fails(faceless_first, tmp_path):
    tar, ordered = faceless_first
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as e:  # what a user meets without them
        datasets.load_dataset("webdataset", data_files={"train": [str(tar)]}, split="train",
                              cache_dir=str(tmp_path / "inferred"))
    assert "to null" in str(e.value.__cause__)
    ds = datasets.load_dataset("webdataset", data_files={"train": [str(tar)]}, split="train",
                               features=shard_features(), cache_dir=str(tmp_path / "typed"))
    assert len(ds) == len(ordered)
    for row, sample in zip(ds, ordered, strict=True):
        record = sample.record.to_dict()
        assert row["__key__"] == sample.key and row["json"]["caption"] == record["caption"]
        np.testing.assert_array_equal(np.asarray(row["seg.png"]), sample.segment_map)
        assert np.array_equal(np.asarray(row["jpg"].convert("RGB")), np.asarray(sample.image))
        for got, want in zip(row["json"]["segments"], record["segments"], strict=True):
            assert {k: v for k, v in got.items() if v is not None} == want  # absent keys read None
        assert row["json"]["face_checks"] == json.loads(json.dumps(record["face_checks"]))
        assert row["json"]["models"] == record["models"] and row["json"]["provenance"]["license"] == record["provenance"]["license"]


def test_the_hf_export_loads_with_datasets_with_its_card_quality_and_face_fields(run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--format", "hf", str(run["shards_dir"]), str(out), "--profile", "tiny"]) == 0
    assert "as hf to" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-subjects-00000.parquet", "test-subjects-00001.parquet",
        "train-subjects-00000.parquet", "train-subjects-00001.parquet"]
    card = (out / CARD).read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train-*.parquet"}, {"split": "test", "path": "data/test-*.parquet"}]}]
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    assert isinstance(loaded["train"].features["segment_map"], datasets.Image)
    written = {key: record for key, (_, record) in run["written"].items()}
    assert sorted(r["key"] for split in loaded.values() for r in split) == sorted(written)
    for row in (r for split in loaded.values() for r in split):
        record = written[row["key"]]
        q, f = match_quality(record), face_quality(record)
        assert (row["n_matched"], row["min_match_score"], row["min_margin"]) == (q.n_matched, q.min_match_score, q.min_margin)
        assert row["quality_flags"] == q.flags and row["faces_checked"] is True
        assert row["face_flags"] == record.face_checks.flags and row["n_faces"] == f.n_faces
        assert row["provenance"]["pixel_md5"] == record.provenance.pixel_md5
    summary = json.loads((out / "export_summary.json").read_text())
    assert summary["train"] + summary["test"] == len(written) == summary["exported"]


def test_an_hf_export_of_one_split_lists_only_that_split(run, tmp_path):
    out = tmp_path / "hf-test"
    assert main(["export", "--format", "hf", str(run["shards_dir"]), str(out), "--split", "test"]) == 0
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    tests = sorted(k for k, (_, r) in run["written"].items() if r.split == "test")
    assert list(loaded) == ["test"] and sorted(loaded["test"]["key"]) == tests


def test_an_hf_export_to_a_bucket_is_the_local_one(run, local_s3, tmp_path):
    import fsspec

    from tests.local_s3 import clear_fs_cache

    bucket = local_s3.bucket("hf-export")
    clear_fs_cache()
    local = tmp_path / "local"
    assert main(["export", "--format", "hf", str(run["shards_dir"]), str(local)]) == 0
    assert main(["export", "--format", "hf", str(run["shards_dir"]), f"s3://{bucket}/hf"]) == 0
    fetched = tmp_path / "fetched"
    fsspec.filesystem("s3").get(f"s3://{bucket}/hf/", f"{fetched}/", recursive=True)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file())
    for name in files:
        if name != "export_summary.json":  # it names OUT
            assert (fetched / name).read_bytes() == (local / name).read_bytes(), name
    loaded = datasets.load_dataset(str(fetched), cache_dir=str(tmp_path / "cache"))
    assert sum(len(split) for split in loaded.values()) == len(run["written"])


def test_an_hf_export_over_an_earlier_one_leaves_none_of_its_parquet_files(run, tmp_path):
    """``--overwrite`` with fewer shards, or a filter that empties a split, must not leave the earlier
    export's Parquet files for ``load_dataset(OUT)`` to read."""
    import shutil

    out = tmp_path / "hf"
    assert main(["export", "--format", "hf", str(run["shards_dir"]), str(out)]) == 0
    one = tmp_path / "one-shard"
    one.mkdir()
    shutil.copy(run["shards_dir"] / "subjects-00000.tar", one / "subjects-00000.tar")
    assert main(["export", "--format", "hf", str(one), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-subjects-00000.parquet", "train-subjects-00000.parquet"]
    summary = json.loads((out / "export_summary.json").read_text())
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert (len(loaded["train"]), len(loaded["test"])) == (summary["train"], summary["test"])
    assert main(["export", "--format", "hf", str(run["shards_dir"]), str(out), "--overwrite", "--split", "test"]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-subjects-00000.parquet", "test-subjects-00001.parquet"]
    summary = json.loads((out / "export_summary.json").read_text())
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache2"))
    assert list(loaded) == ["test"] and len(loaded["test"]) == summary["test"] == summary["exported"]
