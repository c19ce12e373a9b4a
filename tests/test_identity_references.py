"""The compact reference set (``references/``) of a run of the bundled sample, with real dlib weights."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datagen.identity.references import CROP_SIDE, choose_crops, read_reference_set, write_reference_set


def test_the_reference_set_holds_bounded_crops_of_other_photos_of_each_person(identity_run):
    run, records = identity_run["run"], identity_run["records"]
    crops, targets = read_reference_set(run)
    assert crops.num_rows > 0 and targets.num_rows > 0
    titles = {}  # (key, segment) -> the person's phrase, the truth the fixture drew
    for key, (_, _, record) in records.items():
        for s in record.segments:
            if s.coco_label == "person":
                titles[(key, s.id)] = s.word
    by_identity = {}
    for row in crops.to_pylist():
        image, mask = Image.open(io.BytesIO(row["jpg"])), Image.open(io.BytesIO(row["mask"]))
        assert image.size == mask.size == (row["width"], row["height"]) and max(image.size) <= CROP_SIDE
        _, segment_map, record = records[row["key"]]
        segment = next(s for s in record.segments if s.id == row["segment_id"])
        x0, y0, x1, y1 = segment.bbox
        if max(x1 - x0, y1 - y0) <= CROP_SIDE:  # not scaled: the mask is the segment's own pixels
            np.testing.assert_array_equal(np.asarray(mask) > 0, segment_map[y0:y1, x0:x1] == segment.id)
        by_identity.setdefault(row["identity"], set()).add(titles[(row["key"], row["segment_id"])])
    assert all(len(people) == 1 for people in by_identity.values()), by_identity  # one person per identity
    assert len(by_identity) == 3
    crop_keys = {}
    for row in crops.to_pylist():
        crop_keys.setdefault(row["identity"], set()).add(row["key"])
    for t in targets.to_pylist():
        assert crop_keys[t["identity"]] - {t["key"]}  # a crop of another photo
        assert titles[(t["key"], t["segment_id"])] in by_identity[t["identity"]]


def test_the_cap_per_identity_keeps_two_photos_and_bounds_the_set(identity_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(identity_run["run"], run)
    summary = write_reference_set(run, identity_run["shards_dir"], per_identity=2, side=64)
    crops, targets = read_reference_set(run)
    counts = np.bincount(crops.column("identity").to_numpy())
    assert summary.crops == crops.num_rows <= 2 * 3 and counts.max() <= 2
    for identity in set(crops.column("identity").to_pylist()):
        assert len({r["key"] for r in crops.to_pylist() if r["identity"] == identity}) == 2  # two photos, not one
    assert max(max(r["width"], r["height"]) for r in crops.to_pylist()) <= 64
    assert summary.bytes == sum((run / "references" / f).stat().st_size for f in ("crops.parquet", "targets.parquet"))
    assert targets.num_rows == identity_run_targets(identity_run)


def identity_run_targets(identity_run) -> int:
    """Subjects (person segments holding a face) whose identity has a photo other than theirs."""
    pairs = pq.read_table(identity_run["run"] / "pairs.parquet")
    return len({(r["key"], r["segment_id"]) for r in pairs.to_pylist() if r["segment_id"] is not None})


def test_references_without_a_segment_are_not_crops_and_a_run_without_pairs_says_what_to_run(tmp_path):
    import pyarrow as pa

    pairs = pa.table({"face": ["a/0", "a/0", "b/0"], "key": ["a", "a", "b"], "segment_id": [1, 1, None],
                      "reference": ["b/0", "c/0", "a/0"], "reference_key": ["b", "c", "a"],
                      "reference_segment_id": [None, 2, 1], "distance": [0.1, 0.2, 0.1], "reference_size": [30, 30, 30]})
    crops, targets = choose_crops(pairs, {"a/0": 0, "b/0": 0, "c/0": 0})
    assert crops == {("c", 2): (0, "c/0"), ("a", 1): (0, "a/0")} and targets == [("a", 1, 0)]
    with pytest.raises(FileNotFoundError, match="run `subject-ffhq identities RUN` first"):
        write_reference_set(tmp_path, tmp_path)
