"""The seg-conditioning and subject-crops exports, read back and checked against the shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from datagen.export.common import ExportError, ExportFilters
from datagen.export.registry import export
from datagen.export.seg_conditioning import coco_palette
from datagen.export.subject_crops import placeholder_caption
from datagen.shards.reader import read_shard
from tests.run_factory import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("views-run"))


@pytest.fixture(scope="module")
def samples(run):
    return {s.key: s for tar in sorted(run["shards_dir"].glob("*.tar")) for s in read_shard(tar)}


def test_palette_is_coco_panoptic():
    palette = coco_palette()
    assert len(palette) == 133 and sum(v["isthing"] for v in palette.values()) == 80
    assert palette["person"]["color"] == [220, 20, 60] and palette["person"]["id"] == 1
    assert palette["wall-other-merged"]["id"] == 199
    assert len({tuple(v["color"]) for v in palette.values()}) == 133  # one colour per class
    assert [0, 0, 0] not in [v["color"] for v in palette.values()]  # black stays "no segment"


def test_placeholder_replaces_exactly_the_phrase():
    assert placeholder_caption("a woman holding a banner", 0, 7, "S*") == "S* holding a banner"
    assert placeholder_caption("a man and a man", 10, 15, "<v>") == "a man and <v>"


def test_seg_conditioning_read_back(run, samples, tmp_path):
    out = tmp_path / "seg"
    summary = export("seg-conditioning", run["shards_dir"], out)
    assert summary.exported == len(samples) and summary.samples_seen == len(samples)
    assert "placeholder" not in json.loads((out / "export_summary.json").read_text())  # subject-crops' alone
    legend = json.loads((out / "legend.json").read_text())
    assert legend["none"] == [0, 0, 0] and legend["classes"]["person"]["color"] == [220, 20, 60]
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert sorted(x["key"] for x in lines) == sorted(samples)
    for line in lines:
        sample = samples[line["key"]]
        rec = sample.record
        assert (out / line["image"]).read_bytes()[:2] == b"\xff\xd8"
        assert (out / "captions" / f"{rec.key}.txt").read_text() == rec.caption + "\n" == line["caption"] + "\n"
        assert line["split"] == rec.split
        semantic = np.asarray(Image.open(out / line["semantic"]))
        assert semantic.shape == (rec.height, rec.width, 3)
        # every pixel: its segment's class colour, or black where there is no segment
        for s in rec.segments:
            colour = legend["classes"].get(s.coco_label, {}).get("color") or legend["extra"][s.coco_label]
            assert (semantic[sample.segment_map == s.id] == colour).all(), (rec.key, s.coco_label)
        assert (semantic[sample.segment_map == 0] == 0).all()


def test_subject_crops_read_back(run, samples, tmp_path):
    out = tmp_path / "crops"
    summary = export("subject-crops", run["shards_dir"], out, placeholder="<sks>")
    persons = {k: [s for s in x.record.segments if s.matched and s.coco_label == "person"] for k, x in samples.items()}
    with_person = {k for k, v in persons.items() if v}
    assert summary.exported == len(with_person) > 0
    assert summary.subjects == sum(len(v) for v in persons.values())
    assert summary.filtered_out == {"no_subject_of_object_types": len(samples) - len(with_person)}
    for key in with_person:
        doc = json.loads((out / key / "subjects.json").read_text())
        rec, segmap = samples[key].record, samples[key].segment_map
        assert doc["caption"] == rec.caption and doc["split"] == rec.split
        assert [e["segment_id"] for e in doc["subjects"]] == [s.id for s in persons[key]]
        for entry, seg in zip(doc["subjects"], persons[key], strict=True):
            assert entry["phrase"] == seg.word and entry["coco_label"] == "person"
            assert entry["prompt"] == rec.caption[: seg.start] + "<sks>" + rec.caption[seg.end :]
            crop = np.asarray(Image.open(out / key / entry["file"]))
            x0, y0, x1, y1 = seg.bbox
            assert crop.shape == (y1 - y0, x1 - x0, 4)
            assert ((crop[..., 3] == 255) == (segmap[y0:y1, x0:x1] == seg.id)).all()
    assert len((out / "metadata.jsonl").read_text().splitlines()) == summary.subjects


def test_subject_crops_other_object_types_and_filters(run, samples, tmp_path):
    summary = export("subject-crops", run["shards_dir"], tmp_path / "x", object_types=("person", "cat", "bench"),
                          filters=ExportFilters(splits=("test",)))
    tests_only = {k for k, s in samples.items() if s.record.split == "test"}
    assert summary.filtered_out.get("split_train", 0) == len(samples) - len(tests_only)
    labels = {json.loads(line)["coco_label"] for line in (tmp_path / "x" / "metadata.jsonl").read_text().splitlines()}
    assert labels <= {"person", "cat", "bench"}


def test_views_refuse_a_non_empty_out_and_the_cli_prints_counts(run, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export("seg-conditioning", run["shards_dir"], out)
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code = main(["export", "--format", "subject-crops", str(run["shards_dir"]), str(tmp_path / "cli"), "--require-person"])
    printed = capsys.readouterr().out
    assert code == 0 and "as subject-crops" in printed and "filtered out:" in printed
