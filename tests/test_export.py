"""The FastComposer export, read back the way FastComposer's released loader reads it."""

import json
import os
import tarfile

import numpy as np
import pytest
import torch
from torchvision.io import ImageReadMode, read_image

from cli.main import main
from datagen.export.common import ExportError, ExportFilters
from datagen.export.fastcomposer import export_fastcomposer
from tests.run_factory import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-run")
    return make_run(root)


def read_like_fastcomposer(root, split, object_types=("person",)):
    """What FastComposerDataset does (mit-han-lab/fastcomposer, fastcomposer/data.py), minus the models."""
    name = {"all": "image_ids.txt", "train": "image_ids_train.txt", "test": "image_ids_test.txt"}[split]
    with open(os.path.join(root, name)) as f:
        image_ids = f.read().splitlines()
    out = {}
    for image_id in image_ids:
        chunk = image_id[:5]
        image = read_image(os.path.join(root, chunk, image_id + ".jpg"), mode=ImageReadMode.RGB)
        with open(os.path.join(root, chunk, image_id + ".json")) as f:
            info = json.load(f)
        segmap = torch.from_numpy(np.load(os.path.join(root, chunk, image_id + ".npy")))
        segments = info["segments"]
        if object_types is not None:
            segments = [s for s in segments if s["coco_label"] in object_types]
        segments = sorted(segments, key=lambda x: x["end"])  # KeyError for a segment without "end"
        caption = info["caption"]
        for segment in reversed(segments):  # the placeholder insertion of _tokenize_and_mask_noun_phrases_ends
            caption = caption[: segment["end"]] + "<|image|>" + caption[segment["end"] :]
        out[image_id] = (int(image_id), image, info, segmap, segments, caption)
    return image_ids, out


def test_export_reads_back_like_fastcomposer(run, tmp_path):
    out = tmp_path / "fc"
    summary = export_fastcomposer(run["shards_dir"], out)
    records = {k: r for k, (_, r) in run["written"].items()}
    assert summary.exported == summary.samples_seen == len(records) and summary.filtered_out == {}

    all_ids, everything = read_like_fastcomposer(out, "all", object_types=None)
    train_ids, _ = read_like_fastcomposer(out, "train")
    test_ids, _ = read_like_fastcomposer(out, "test")
    assert not set(train_ids) & set(test_ids)
    assert sorted(train_ids + test_ids, key=int) == all_ids == sorted(records, key=int)
    assert {i for i in all_ids if records[i].split == "test"} == set(test_ids) and test_ids

    n_checked = 0
    for image_id in all_ids:
        record = records[image_id]
        int_id, image, info, segmap, _, _ = everything[image_id]
        assert int_id == int(record.key)
        assert segmap.ndim == 2 and not segmap.dtype.is_floating_point
        assert tuple(image.shape) == (3, record.height, record.width) == (3, *segmap.shape)
        assert info["caption"] == record.caption
        assert all("end" in s for s in info["segments"])
        # segments = the subjects (matched, default object type person); other matches and the unmatched kept apart
        assert [s["id"] for s in info["segments"]] == [s.id for s in record.segments if s.matched and s.coco_label == "person"]
        assert [s["id"] for s in info["other_segments"]] == [s.id for s in record.segments if s.matched and s.coco_label != "person"]
        assert [s["id"] for s in info["unmatched_segments"]] == [s.id for s in record.segments if not s.matched]
        for segment in info["segments"]:
            mask = segmap == segment["id"]
            assert mask.any()
            x0, y0, x1, y1 = segment["bbox"]
            h1, w1, h2, w2 = segment["bbox"]  # FastComposer's SegmentProcessor crop: image[:, w1:w2, h1:h2]
            crop = image[:, w1:w2, h1:h2]
            assert crop.numel() > 0
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert (x0, y0, x1, y1) == (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            assert info["caption"][: segment["end"]].endswith(segment["word"])
            assert info["caption"][segment["start"] : segment["end"]] == segment["word"]
            n_checked += 1
    assert n_checked == sum(1 for r in records.values() for s in r.segments if s.matched and s.coco_label == "person")
    assert summary.segments_exported == summary.subjects_by_type["person"] == n_checked

    # the person subjects get their placeholder right after their phrase
    _, persons = read_like_fastcomposer(out, "all")
    assert persons["00004"][5] == "a man<|image|> and a man watching a rocket launch"


def test_jpeg_bytes_are_the_shard_bytes(run, tmp_path):
    export_fastcomposer(run["shards_dir"], tmp_path / "fc")
    with tarfile.open(run["shards_dir"] / "subjects-00000.tar") as tar:
        shard_jpg = tar.extractfile("00000.jpg").read()
    assert (tmp_path / "fc" / "00000" / "00000.jpg").read_bytes() == shard_jpg


def test_filters_drop_samples_and_count_them(run, tmp_path):
    records = {k: r for k, (_, r) in run["written"].items()}
    summary = export_fastcomposer(
        run["shards_dir"], tmp_path / "fc", ExportFilters(require_subject=True, min_match_score=0.12)
    )
    kept = set((tmp_path / "fc" / "image_ids.txt").read_text().split())
    no_person = {k for k, r in records.items() if not any(s.coco_label == "person" and s.matched for s in r.segments)}
    weak = {k for k, r in records.items() if min(s.match_score for s in r.segments if s.matched) < 0.12} - no_person
    assert kept == set(records) - no_person - weak
    assert summary.filtered_out == {"require_subject": len(no_person), "min_match_score": len(weak)}
    assert summary.exported + sum(summary.filtered_out.values()) == summary.samples_seen
    for k in no_person | weak:
        assert not (tmp_path / "fc" / k[:5]).exists()
    saved = json.loads((tmp_path / "fc" / "export_summary.json").read_text())
    assert saved["filtered_out"] == summary.filtered_out and saved["filters"]["require_subject"] is True


def test_split_and_margin_filters(run, tmp_path):
    summary = export_fastcomposer(run["shards_dir"], tmp_path / "t", ExportFilters(splits=("test",)))
    assert summary.train == 0 and summary.test == summary.exported > 0
    assert (tmp_path / "t" / "image_ids_train.txt").read_text() == ""
    summary = export_fastcomposer(run["shards_dir"], tmp_path / "m", ExportFilters(min_margin=0.01))
    assert summary.filtered_out == {"min_margin": 2}  # Grace Hopper's and the rocket's near ties


def test_refuses_a_non_empty_output_and_overwrite_removes_stale_ids(run, tmp_path):
    out = tmp_path / "fc"
    export_fastcomposer(run["shards_dir"], out)
    with pytest.raises(ExportError, match="not empty"):
        export_fastcomposer(run["shards_dir"], out)
    summary = export_fastcomposer(run["shards_dir"], out, ExportFilters(require_subject=True), overwrite=True)
    kept = (out / "image_ids.txt").read_text().split()
    assert len(kept) == summary.exported
    on_disk = {p.stem for p in out.glob("*/*.json")}
    assert on_disk == set(kept)
    assert summary.removed_stale == 3 * summary.filtered_out["require_subject"]


def test_parallel_export_writes_the_same_files(run, tmp_path):
    export_fastcomposer(run["shards_dir"], tmp_path / "a")
    export_fastcomposer(run["shards_dir"], tmp_path / "b", workers=2)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.name != "export_summary.json":
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_export_command(run, tmp_path, capsys):
    out = tmp_path / "fc"
    rc = main(["export", "--format", "fastcomposer", str(run["shards_dir"]), str(out), "--require-person"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "exported 6 of 8 samples from 2 shard(s)" in printed
    assert 'filtered out: 2 {"require_subject": 2}' in printed
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1
    assert "no shards" in capsys.readouterr().err


def test_object_types_choose_the_subjects_the_filters_and_the_counts(run, tmp_path, capsys):
    records = {k: r for k, (_, r) in run["written"].items()}
    pets = ("person", "cat")
    summary = export_fastcomposer(run["shards_dir"], tmp_path / "fc", ExportFilters(require_subject=True),
                                  object_types=pets)
    with_subject = {k for k, r in records.items() if any(s.matched and s.coco_label in pets for s in r.segments)}
    assert summary.filtered_out == {"require_subject": len(records) - len(with_subject)}  # the coffee cups
    n_cats = sum(1 for k in with_subject for s in records[k].segments if s.matched and s.coco_label == "cat")
    assert n_cats and summary.subjects_by_type["cat"] == n_cats and summary.object_types == list(pets)
    # upstream's loader with its default object_types=None takes exactly our subjects
    _, everything = read_like_fastcomposer(tmp_path / "fc", "all", object_types=None)
    assert {s["coco_label"] for v in everything.values() for s in v[4]} == set(pets)
    assert sum(len(v[4]) for v in everything.values()) == summary.segments_exported

    # the command reads the object types from the profile (+ --config); --object-types overrides them
    overlay = tmp_path / "pets.yaml"
    overlay.write_text("subjects: {object_types: [person, cat]}\n")
    args = ["export", str(run["shards_dir"]), "--require-subject", "--exclude-unmatched-subject"]
    assert main([*args[:2], str(tmp_path / "cli"), *args[2:], "--config", str(overlay)]) == 0
    printed = capsys.readouterr().out
    assert f'subjects (person,cat): {summary.segments_exported - 1} {{"person": {summary.subjects_by_type["person"] - 1}, "cat": {n_cats}}}' in printed
    assert '"unmatched_subject_segment": 1' in printed  # Grace Hopper's second, unmatched person
    assert main([*args[:2], str(tmp_path / "cli2"), "--object-types", "person,dgo"]) == 2
    assert "'dgo', which is not a COCO panoptic label; did you mean 'dog'?" in capsys.readouterr().err
    assert not (tmp_path / "cli2").exists()


def upstream_train_transform(image, segmap, resolution=32):
    """FastComposer's TrainTransformWithSegmap (fastcomposer/transforms.py), flip forced, on the
    exported image and map: the steps that need the map's dtype to combine with uint8."""
    from torchvision import transforms as T

    image = T.Resize(resolution, interpolation=T.InterpolationMode.BILINEAR, antialias=True)(image)
    segmap = T.Resize(resolution, interpolation=T.InterpolationMode.NEAREST)(segmap.unsqueeze(0))
    both = torch.cat([image, segmap], dim=0).flip(-1)
    _, h, w = both.shape
    if h > w:  # CenterCropOrPadSides, portrait: pad, resize bilinearly
        pad = (h - w) // 2
        both = torch.nn.functional.pad(both, (pad, pad, 0, 0), "constant", 0)
        both = T.functional.resize(both, (w, w), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    else:
        pad = (w - h) // 2
        both = both[:, :, pad : pad + h]
    return both[:3].float() / 127.5 - 1, both[3:].squeeze(0)


@pytest.mark.parametrize("dtype", ["auto", "uint8", "int32", "int64"])
def test_every_segment_map_dtype_goes_through_upstreams_transform(run, tmp_path, dtype):
    export_fastcomposer(run["shards_dir"], tmp_path / dtype, segmap_dtype=dtype)
    ids, everything = read_like_fastcomposer(tmp_path / dtype, "all", object_types=None)
    expected = {"auto": np.uint8, "uint8": np.uint8, "int32": np.int32, "int64": np.int64}[dtype]
    for image_id in ids:
        _, image, info, segmap, _, _ = everything[image_id]
        assert segmap.numpy().dtype == expected
        pixels, out_map = upstream_train_transform(image, segmap)
        assert pixels.shape == (3, 32, 32) and out_map.shape == (32, 32)
        for segment in info["segments"]:
            assert (out_map == segment["id"]).any() or segment["area"] < 0.01 * segmap.numel()


def test_segment_map_dtype_auto_widens_to_int32_and_uint16_is_refused(run, tmp_path, capsys):
    from datagen.export.fastcomposer import segmap_array

    record = next(iter(run["written"].values()))[1]
    wide = np.array([[0, 300], [7, 255]], dtype=np.uint16)
    assert segmap_array(wide, "auto", record).dtype == np.int32
    assert segmap_array(wide.clip(0, 255), "auto", record).dtype == np.uint8
    with pytest.raises(ExportError, match="does not fit the segment-map dtype uint8"):
        segmap_array(wide, "uint8", record)
    # upstream would fail on uint16 (torch.cat of its uint8 image with a uint16 map): refused, saying why
    with pytest.raises(RuntimeError, match="uint16"):
        torch.cat([torch.zeros(3, 2, 2, dtype=torch.uint8), torch.from_numpy(wide)[None]])
    out = tmp_path / "u16"
    assert main(["export", str(run["shards_dir"]), str(out), "--segmap-dtype", "uint16"]) == 1
    err = capsys.readouterr().err
    assert "uint16" in err and "torch.cat" in err and "int32" in err
    assert not out.exists()
