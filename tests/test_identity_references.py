"""The compact reference set (``references/``) of a run of the bundled sample, with real dlib weights."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def _pairs_one_by_one(identities, embeddings):
    """The pairs as first written: every face against its identity's pool, one face at a time."""
    from datagen.identity.pairs import POOL, REFERENCES

    rows = identities.to_pylist()
    ident = np.array([r["identity"] for r in rows])
    out = []
    for identity in sorted(set(ident.tolist())):
        members = np.flatnonzero(ident == identity)
        if rows[members[0]]["identity_photos"] < 2:
            continue
        pool = members[np.argsort([rows[m]["distance"] for m in members], kind="stable")[:POOL]]
        for i in members:
            d = np.linalg.norm(embeddings[pool].astype(np.float64) - embeddings[i], axis=1)
            other = [j for j in range(len(pool)) if rows[pool[j]]["key"] != rows[i]["key"]]
            for j in sorted(other, key=lambda j: d[j])[:REFERENCES]:
                out.append((rows[i]["face"], rows[pool[j]]["face"], float(d[j])))
    return out


def test_pairs_in_blocks_are_the_nearest_of_each_faces_pool_as_one_by_one():
    import pyarrow as pa

    from datagen.identity.pairs import reference_pairs

    rng = np.random.default_rng(0)
    n = 300
    identity = rng.integers(0, 4, n)
    identity[-1] = 9  # an identity in one photo only: no pairs
    keys = [f"{k:05d}" for k in rng.integers(0, 60, n)]
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    photos = {i: len({k for k, j in zip(keys, identity, strict=True) if j == i}) for i in set(identity.tolist())}
    table = pa.table({"face": [f"{k}/{n}" for n, k in enumerate(keys)], "key": keys,
                      "segment_id": pa.array([n % 3 or None for n in range(n)], pa.int32()),
                      "identity": identity.astype(np.int64), "distance": rng.random(n).astype(np.float32),
                      "size": pa.array(rng.integers(20, 90, n), pa.int32()),
                      "identity_photos": [photos[i] for i in identity.tolist()]})
    want = _pairs_one_by_one(table, emb)
    for block in (7, 1024):
        got = reference_pairs(table, emb, block=block)
        assert [(r["face"], r["reference"]) for r in got.to_pylist()] == [(f, r) for f, r, _ in want]
        assert np.allclose(got.column("distance").to_numpy(), [d for *_, d in want], atol=1e-5)
        faces = {r["face"]: r for r in table.to_pylist()}
        for r in got.to_pylist():
            assert r["reference_size"] == faces[r["reference"]]["size"]
            assert r["segment_id"] == faces[r["face"]]["segment_id"]
            assert r["reference_segment_id"] == faces[r["reference"]]["segment_id"]


def test_crops_are_in_rank_order_and_a_missing_shard_is_named(identity_run, tmp_path):
    import shutil

    from datagen.identity.index import identity_of_faces

    run = tmp_path / "run"
    shutil.copytree(identity_run["run"], run)
    crops, _ = read_reference_set(run)
    ranked, _ = choose_crops(pq.read_table(run / "pairs.parquet"), identity_of_faces(run))
    assert list(zip(crops.column("key").to_pylist(), crops.column("segment_id").to_pylist(), strict=True)) == list(ranked)
    shards = shutil.copytree(identity_run["shards_dir"], tmp_path / "shards")
    held = sorted(pq.read_table(run / "samples.parquet").filter(
        pc.is_in(pq.read_table(run / "samples.parquet").column("key"),
                 value_set=pa.array(sorted({k for k, _ in ranked})))).column("shard_name").unique().to_pylist())
    (shards / f"{held[0]}.tar").unlink()
    with pytest.raises(FileNotFoundError, match=f"no {held[0]}.tar.*hold reference crops"):
        write_reference_set(run, shards)


def test_a_reference_set_on_a_bucket_is_read_through_storage(identity_run, local_s3):
    import fsspec

    from tests.local_s3 import clear_fs_cache

    bucket = local_s3.bucket("refs")
    clear_fs_cache()
    fsspec.filesystem("s3").put(f"{identity_run['run'] / 'references'}/", f"s3://{bucket}/run/references/",
                                recursive=True)
    crops, targets = read_reference_set(f"s3://{bucket}/run")
    local_crops, local_targets = read_reference_set(identity_run["run"])
    assert crops.equals(local_crops) and targets.equals(local_targets)
