"""The export registry: the command offers exactly the registered formats, a new format is one class
and one entry, and every registered format reads back to what the shard reader reads."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli.main import build_parser, main
from datagen.export.common import SUMMARY, ExportError, SampleOutcome, ShardExport
from datagen.export.registry import FORMATS, export
from datagen.identity.index import identity_lookup
from datagen.shards.reader import iter_members, read_shard
from tests.run_factory import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("registry-run"))


def read_shard_data(shards_dir):
    """key -> (decoded sample, raw JPEG bytes), as the shard reader reads them."""
    tars = sorted(shards_dir.glob("subjects-*.tar"))
    jpgs = {key: members["jpg"] for tar in tars for key, members in iter_members(tar)}
    return {s.key: (s, jpgs[s.key]) for tar in tars for s in read_shard(tar)}


@pytest.fixture(scope="module")
def shard_data(run):
    return read_shard_data(run["shards_dir"])


def _format_action(parser):
    export_parser = parser._subparsers._group_actions[0].choices["export"]
    return next(a for a in export_parser._actions if "--format" in a.option_strings)


def test_the_command_offers_exactly_the_registered_formats():
    action = _format_action(build_parser(load="export"))
    assert tuple(action.choices) == tuple(FORMATS) == (
        "fastcomposer", "seg-conditioning", "subject-crops", "hf", "identity-pairs")
    assert action.default == "fastcomposer"
    for name, fmt in FORMATS.items():
        assert fmt.name == name and issubclass(fmt, ShardExport)


def test_run_inputs_given_as_bucket_urls_stay_urls():
    """``--split-file`` and ``--identities`` may name a run on a bucket: ``Path`` would make s3:// s3:/."""
    args = build_parser(load="export").parse_args(
        ["export", "s3://b/shards", "s3://b/out", "--split-file", "s3://b/run", "--identities", "s3://b/run"])
    assert (args.split_file, args.identities) == ("s3://b/run", "s3://b/run")


def test_an_unknown_format_is_refused(run, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'nope'; one of fastcomposer, seg-conditioning"):
        export("nope", run["shards_dir"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


class CaptionsExport(ShardExport):
    """A format made for this test: one caption file per sample."""

    name = "captions"
    options = ("placeholder",)  # an existing flag, passed through by the command

    def __init__(self, out, filters=None, object_types=("person",), placeholder="S*"):
        super().__init__(out, filters, object_types)
        self.placeholder = placeholder

    def write_sample(self, sample, record):
        (self.out / f"{sample.key}.txt").write_text(f"{self.placeholder} {record.caption}\n")
        return SampleOutcome(sample.key, record.split, counts=Counter(words=len(record.caption.split())))

    def finish(self, tally):
        return {"words": tally.counts["words"]}, {"placeholder": self.placeholder}

    @classmethod
    def headline(cls, summary):
        return [f"wrote {summary.exported} caption(s), {summary.words} word(s)"]


def test_a_new_format_is_one_class_and_one_registry_entry(run, shard_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(FORMATS, CaptionsExport.name, CaptionsExport)
    out = tmp_path / "captions"
    assert main(["export", "--format", "captions", str(run["shards_dir"]), str(out), "--placeholder", "<v>",
                 "--split", "test"]) == 0
    printed = capsys.readouterr().out.splitlines()
    tests = {k for k, (s, _) in shard_data.items() if s.record.split == "test"}
    words = sum(len(shard_data[k][0].record.caption.split()) for k in tests)
    assert printed[0] == f"wrote {len(tests)} caption(s), {words} word(s)"
    assert printed[1] == f'filtered out: {len(shard_data) - len(tests)} {{"split_train": {len(shard_data) - len(tests)}}}'
    for key in tests:
        assert (out / f"{key}.txt").read_text() == f"<v> {shard_data[key][0].record.caption}\n"
    saved = json.loads((out / SUMMARY).read_text())
    assert list(saved)[:8] == ["format", "shards_dir", "out", "shards", "samples_seen", "exported", "words", "filtered_out"]
    assert saved["format"] == "captions" and saved["words"] == words and list(saved)[-1] == "placeholder"


def _read_fastcomposer(out, samples):
    ids = (out / "image_ids.txt").read_text().split()
    for key in ids:
        sample, jpg = samples[key]
        assert (out / key[:5] / f"{key}.jpg").read_bytes() == jpg
        np.testing.assert_array_equal(np.load(out / key[:5] / f"{key}.npy"), sample.segment_map)
        info = json.loads((out / key[:5] / f"{key}.json").read_text())
        assert info["caption"] == sample.record.caption
        all_ids = [s["id"] for part in ("segments", "other_segments", "unmatched_segments") for s in info[part]]
        assert sorted(all_ids) == sorted(s.id for s in sample.record.segments)
    return set(ids)


def _read_seg_conditioning(out, samples):
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    for line in lines:
        sample, jpg = samples[line["key"]]
        assert (out / line["image"]).read_bytes() == jpg
        assert line["caption"] == sample.record.caption and line["split"] == sample.record.split
        semantic = np.asarray(Image.open(out / line["semantic"]))
        assert ((semantic != 0).any(axis=-1) == (sample.segment_map != 0)).all()
    return {line["key"] for line in lines}


def _read_subject_crops(out, samples):
    keys = set()
    for line in (out / "metadata.jsonl").read_text().splitlines():
        entry = json.loads(line)
        sample, _ = samples[entry["key"]]
        segment = next(s for s in sample.record.segments if f"subject-{s.id}.png" == entry["file"].split("/")[1])
        x0, y0, x1, y1 = segment.bbox
        crop = np.asarray(Image.open(out / entry["file"]))
        np.testing.assert_array_equal(crop[..., :3], np.asarray(sample.image)[y0:y1, x0:x1])
        assert ((crop[..., 3] == 255) == (sample.segment_map[y0:y1, x0:x1] == segment.id)).all()
        keys.add(entry["key"])
    return keys


def _read_hf(out, samples):
    """The export loaded by Hugging Face ``datasets`` from the folder alone (its card's configs)."""
    import datasets

    loaded = datasets.load_dataset(str(out), cache_dir=str(out.parent / f"{out.name}-hf-cache"))
    keys = set()
    for split, rows in loaded.items():
        for row in rows:
            sample, jpg = samples[row["key"]]
            assert row["split"] == split == sample.record.split and row["caption"] == sample.record.caption
            assert np.array_equal(np.asarray(row["image"]), np.asarray(sample.image))
            np.testing.assert_array_equal(np.asarray(row["segment_map"]), sample.segment_map)
            assert [s["id"] for s in row["segments"]] == [s.id for s in sample.record.segments]
            assert [s["end"] for s in row["segments"]] == [s.end for s in sample.record.segments]
            keys.add(row["key"])
    return keys


def _read_identity_pairs(out, samples):
    """Each subject's mask is its segment in the target; its references are other photos' crops."""
    keys = set()
    for line in (out / "metadata.jsonl").read_text().splitlines():
        entry = json.loads(line)
        key = entry["key"]
        sample, jpg = samples[key]
        assert (out / entry["target"]).read_bytes() == jpg
        doc = json.loads((out / key / "pairs.json").read_text())
        subject = next(x for x in doc["subjects"] if f"{key}/{x['mask']}" == entry["mask"])
        segment = next(s for s in sample.record.segments if s.id == subject["segment_id"])
        assert sample.record.caption[subject["start"]:subject["end"]] == subject["phrase"] == segment.word
        mask = np.asarray(Image.open(out / entry["mask"]))
        assert ((mask == 255) == (sample.segment_map == segment.id)).all()
        assert subject["references"] and all(ref["key"] != key for ref in subject["references"])
        for ref in subject["references"]:
            crop, crop_mask = Image.open(out / key / ref["image"]), Image.open(out / key / ref["mask"])
            assert crop.size == crop_mask.size and np.asarray(crop_mask).any()
        keys.add(key)
    return keys


READ_BACK = {"fastcomposer": _read_fastcomposer, "seg-conditioning": _read_seg_conditioning,
             "subject-crops": _read_subject_crops, "hf": _read_hf, "identity-pairs": _read_identity_pairs}


def test_every_registered_format_has_a_read_back_check():
    assert set(READ_BACK) == set(FORMATS)  # a new format: add how to read it back above


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_registered_format_reads_back_to_the_shards(run, shard_data, tmp_path, fmt, request):
    out, shards_dir, options = tmp_path / fmt, run["shards_dir"], {}
    if fmt == "identity-pairs":  # needs a run with identities and its reference set
        identity_run = request.getfixturevalue("identity_run")
        shards_dir, options = identity_run["shards_dir"], {"references": identity_run["run"]}
        shard_data = read_shard_data(shards_dir)
    summary = export(fmt, shards_dir, out, **options)
    assert summary.format == fmt and summary.samples_seen == len(shard_data)
    assert summary.exported + sum(summary.filtered_out.values()) == summary.samples_seen
    assert json.loads((out / SUMMARY).read_text()) == json.loads(json.dumps(summary.to_dict()))
    assert len(READ_BACK[fmt](out, shard_data)) == summary.exported > 0
    with pytest.raises(AttributeError, match="has no field 'nope'"):
        _ = summary.nope


def test_identity_pairs_from_the_command_and_without_a_reference_set(identity_run, tmp_path, capsys):
    shards, out = str(identity_run["shards_dir"]), tmp_path / "pairs"
    assert main(["export", "--format", "identity-pairs", shards, str(out)]) == 2
    assert "identity-pairs needs --references RUN" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--format", "identity-pairs", shards, str(out), "--references", str(tmp_path)]) == 2
    assert "no reference set" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--format", "identity-pairs", shards, str(out), "--references", str(identity_run["run"]),
                 "--max-references", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    saved = json.loads((out / SUMMARY).read_text())
    assert saved["max_references"] == 1 and saved["references"] == saved["subjects"] > 0
    assert printed.startswith(f"exported {saved['exported']} of {saved['samples_seen']} samples, "
                              f"{saved['subjects']} subject(s) with {saved['references']} cross-image reference(s)")
    identities = {json.loads(line)["identity"] for line in (out / "metadata.jsonl").read_text().splitlines()}
    assert len(identities) == 3  # the bundled sample's three people


def test_fastcomposer_and_subject_crops_carry_the_identity_with_identities(identity_run, tmp_path, capsys):
    shards, run_dir = str(identity_run["shards_dir"]), str(identity_run["run"])
    fc, crops = tmp_path / "fc", tmp_path / "crops"
    assert main(["export", shards, str(fc), "--identities", run_dir]) == 0
    assert main(["export", "--format", "subject-crops", shards, str(crops), "--identities", run_dir]) == 0
    by_key = {}
    for key in (fc / "image_ids.txt").read_text().split():
        info = json.loads((fc / key[:5] / f"{key}.json").read_text())
        by_key[key] = {s["id"]: s.get("identity") for s in info["segments"]}  # the index's ids, joined in
    for line in (crops / "metadata.jsonl").read_text().splitlines():
        key = json.loads(line)["key"]
        for entry in json.loads((crops / key / "subjects.json").read_text())["subjects"]:
            assert entry.get("identity") == by_key[key][entry["segment_id"]]
    identities = {i for segs in by_key.values() for i in segs.values() if i is not None}
    assert len(identities) == 3  # the bundled sample's three people, each one identity across its photos
    lookup = identity_lookup(run_dir)
    assert all(i == lookup.by_segment.get((k, sid)) for k, segs in by_key.items() for sid, i in segs.items())
    # without --identities nothing changes; a run without an index is refused before anything is written
    assert main(["export", shards, str(tmp_path / "plain")]) == 0
    key = next(iter(by_key))
    plain = json.loads((tmp_path / "plain" / key[:5] / f"{key}.json").read_text())
    assert all("identity" not in s for s in plain["segments"])
    assert main(["export", shards, str(tmp_path / "no"), "--identities", str(tmp_path)]) == 2
    assert "no identities.parquet" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_merged_identities_flag_the_record_and_drop_the_sample_where_asked(identity_run, tmp_path, capsys):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from datagen.report.identities import merged_identities

    shards, run = str(identity_run["shards_dir"]), tmp_path / "run"
    shutil.copytree(identity_run["run"], run)
    table = pq.read_table(run / "identities.parquet")
    assert merged_identities(table) == 0  # every hand-drawn person segment holds one person
    rows = table.to_pylist()
    # a composite whose two people the identity stage linked to one person segment (a merged mask)
    first, second = next((a, b) for a in rows for b in rows if a["key"] == b["key"] and a["identity"] != b["identity"]
                         and None not in (a["segment_id"], b["segment_id"]) and a["segment_id"] != b["segment_id"])
    merged_key, merged_segment = first["key"], first["segment_id"]
    segments = [merged_segment if r["face"] == second["face"] else r["segment_id"] for r in rows]
    table = table.set_column(table.schema.get_field_index("segment_id"), "segment_id", pa.array(segments, pa.int32()))
    pq.write_table(table, run / "identities.parquet")
    assert merged_identities(table) == 1  # the report's figure, from the same rule

    fc = tmp_path / "fc"
    assert main(["export", shards, str(fc), "--identities", str(run)]) == 0
    checks = {key: json.loads((fc / key[:5] / f"{key}.json").read_text())["identity_checks"]
              for key in (fc / "image_ids.txt").read_text().split()}
    assert checks.pop(merged_key) == {"merged_identities": [merged_segment], "flags": ["merged_identities"]}
    assert checks and all(c == {"merged_identities": [], "flags": []} for c in checks.values())

    kept = tmp_path / "kept"
    assert main(["export", shards, str(kept), "--identities", str(run), "--drop-merged-identities"]) == 0
    saved = json.loads((kept / SUMMARY).read_text())
    assert saved["filtered_out"] == {"merged_identities": 1} and saved["exported"] == len(checks)
    assert merged_key not in (kept / "image_ids.txt").read_text().split()

    hf = tmp_path / "hf"
    assert main(["export", "--format", "hf", shards, str(hf), "--identities", str(run)]) == 0
    hf_rows = pq.read_table(hf / "data").select(["key", "identity_flags", "subject_identities"]).to_pylist()
    flagged = {r["key"] for r in hf_rows if r["identity_flags"]}
    assert flagged == {merged_key}
    lookup = identity_lookup(str(run))
    assert all(s["identity"] == lookup.by_segment[(r["key"], s["segment_id"])]
               for r in hf_rows for s in r["subject_identities"])
    capsys.readouterr()
    assert main(["export", shards, str(tmp_path / "no"), "--drop-merged-identities"]) == 2
    assert "needs the run whose identities.parquet" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_identity_pairs_carries_only_the_path_and_reads_the_set_once_per_process(identity_run, tmp_path):
    import pickle

    from datagen.export.identity_pairs import IdentityPairsExport, cached_references

    export_ = IdentityPairsExport(tmp_path / "pairs", references=identity_run["run"])
    assert len(pickle.dumps(export_)) < 4096  # pickled once per shard task with --workers > 1
    lookup = cached_references(str(identity_run["run"]))
    assert cached_references(str(identity_run["run"])) is lookup
    crops = pq.read_table(identity_run["run"] / "references" / "crops.parquet")
    for identity, rows in lookup.rows_of.items():
        assert [r for r, _ in rows] == [n for n, i in enumerate(crops.column("identity").to_pylist()) if i == identity]
