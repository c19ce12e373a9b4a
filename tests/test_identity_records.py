"""Schema 1.2 ``identity_faces``, the face tables and the clustering, without models."""

import json

import numpy as np
import pytest

from datagen.identity import cluster
from datagen.manifests.face_table import FaceTableError, face_rows, read_faces, write_face_table
from datagen.record.identity_faces import ImageFace
from datagen.record.schema import Record, RecordError
from datagen.stages.identity import IdentityFace
from tests.record_factory import two_person_sample


def _with_faces():
    record, _ = two_person_sample()
    record.identity_faces = [
        ImageFace(box=[3.0, 5.0, 9.0, 11.0], score=0.99, size=6, segment_id=1, embedded=True),
        ImageFace(box=[52.0, 2.0, 60.0, 9.0], score=0.95, size=8, segment_id=None, embedded=False,
                  reason="too small to embed (8 px < identity.min_embed_px 24)"),
    ]
    return record.validate()


def test_identity_faces_round_trip_and_a_1_1_record_still_reads():
    record = _with_faces()
    text = record.to_json()
    assert Record.from_json(text) == record and Record.from_json(text).to_json() == text
    d = json.loads(text)
    assert d["identity_faces"][1]["segment_id"] is None and d["identity_faces"][0]["identity"] is None
    # a 1.1 record (before identity_faces) reads and writes back as it was
    d["schema_version"] = "1.1"
    del d["identity_faces"]
    old_text = json.dumps(d, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    old = Record.from_json(old_text)
    assert old.identity_faces is None and old.to_json() == old_text
    d["identity_faces"] = json.loads(text)["identity_faces"]
    with pytest.raises(RecordError, match="field 'identity_faces' is a schema 1.2 field"):
        Record.from_dict(d)


@pytest.mark.parametrize("path, value, words", [
    ([0, "segment_id"], 7, "not a person segment"),
    ([0, "box"], [9, 5, 3, 11], "x0 < x1"),
    ([1, "reason"], None, "says why"),
    ([0, "reason"], "blurred", "gives no reason"),
])
def test_bad_identity_faces_name_the_field(path, value, words):
    d = json.loads(_with_faces().to_json())
    d["identity_faces"][path[0]][path[1]] = value
    with pytest.raises(RecordError, match=words) as e:
        Record.from_dict(d)
    assert "identity_faces[" in str(e.value)


def test_face_tables_keep_embedded_faces_in_order(tmp_path):
    faces = [IdentityFace((1, 1, 30, 30), 0.9, 29, 2, np.arange(4, dtype=np.float32)),
             IdentityFace((40, 1, 45, 6), 0.9, 5, None, None, "too small"),
             IdentityFace((50, 1, 80, 30), 0.8, 30, None, np.ones(4, np.float32))]
    write_face_table(tmp_path, "subjects-00001", face_rows("00007", faces))
    write_face_table(tmp_path, "subjects-00000", face_rows("00003", faces[:1]))
    write_face_table(tmp_path, "subjects-00002", [])
    table, matrix = read_faces(tmp_path)
    assert table.column("face").to_pylist() == ["00003/0", "00007/0", "00007/2"]
    assert table.column("segment_id").to_pylist() == [2, 2, None]
    np.testing.assert_array_equal(matrix, [np.arange(4), np.arange(4), np.ones(4)])
    with pytest.raises(FaceTableError, match="built before the identity stage"):
        read_faces(tmp_path / "elsewhere")


def _blobs(seed=0, people=60, per=5, dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, dim)).astype(np.float32)
    truth = np.repeat(np.arange(people), per)
    x = centres[truth] + rng.standard_normal((len(truth), dim)).astype(np.float32) * 0.02
    order = rng.permutation(len(truth))
    return x[order], truth[order]


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_clustering_finds_the_people_deterministically_with_or_without_cells(monkeypatch):
    x, truth = _blobs()
    labels = cluster.cluster_faces(x, threshold=0.5)
    assert _same_partition(labels, truth) and labels[0] == 0 and labels.max() == 59
    np.testing.assert_array_equal(labels, cluster.cluster_faces(x, threshold=0.5))
    monkeypatch.setattr(cluster, "EXACT_LIMIT", 50)  # k-means cells instead of every pair
    celled = cluster.cluster_faces(x, threshold=0.5)
    np.testing.assert_array_equal(celled, labels)
    # a threshold under the noise splits every face; a huge one joins everything
    assert cluster.cluster_faces(x, threshold=1e-4).max() == len(x) - 1
    assert cluster.cluster_faces(x, threshold=100.0, neighbours=4).max() == 0


def test_centre_distances_are_to_the_mean():
    x = np.array([[0, 0], [2, 0], [10, 10]], np.float32)
    np.testing.assert_allclose(cluster.centre_distances(x, np.array([0, 0, 1])), [1, 1, 0])


def test_the_identity_safe_split_file_replaces_the_records_split_in_exports(tmp_path, capsys):
    from cli.main import main
    from tests.run_factory import make_run

    run = make_run(tmp_path / "run")
    shards = run["shards_dir"]
    base = tmp_path / "base"
    assert main(["export", str(shards), str(base), "--format", "fastcomposer"]) == 0
    train = (base / "image_ids_train.txt").read_text().split()
    moved = train[0]
    import pyarrow as pa
    import pyarrow.parquet as pq

    split_file = tmp_path / "split.parquet"
    pq.write_table(pa.table({"key": [moved], "split": ["test"]}), split_file)
    out = tmp_path / "safe"
    assert main(["export", str(shards), str(out), "--format", "fastcomposer", "--split-file", str(split_file)]) == 0
    assert moved in (out / "image_ids_test.txt").read_text().split()
    assert moved not in (out / "image_ids_train.txt").read_text().split()
    capsys.readouterr()
    assert main(["export", str(shards), str(tmp_path / "none"), "--split-file", str(tmp_path / "missing")]) == 2
    assert "run `subject-ffhq identities RUN` first" in capsys.readouterr().err


def test_join_identities_fills_the_faces_the_index_knows():
    from datagen.record.identity_faces import ImageFace, join_identities

    faces = [ImageFace(box=[0, 0, 9, 9], score=0.99, size=9, segment_id=None, embedded=True),
             ImageFace(box=[10, 0, 14, 4], score=0.95, size=4, segment_id=None, embedded=False, reason="too small")]
    join_identities("00001", faces, {"00001/0": 7, "00002/1": 3})
    assert [f.identity for f in faces] == ["7", None]
    join_identities("00001", None, {"00001/0": 7})  # a record without identity faces: nothing to fill


def test_merged_identities_are_person_segments_holding_two_identities():
    from datagen.record.identity_faces import IdentityChecks, merged_segments

    # segment 1 holds identities 4 and 5; segment 2 one identity twice; faces in no segment or of no
    # known identity count for nothing
    pairs = [(1, 4), (2, 7), (1, 5), (2, 7), (None, 8), (None, 9), (3, None), (3, 6)]
    assert merged_segments(pairs) == [1]
    assert merged_segments([(2, 1), (1, 3), (2, 0), (1, 2)]) == [1, 2]
    assert IdentityChecks.of([1]) == IdentityChecks([1], ["merged_identities"])
    assert IdentityChecks.of([]) == IdentityChecks([], [])


def test_identity_checks_round_trip_and_are_checked():
    from datagen.record.identity_faces import IdentityChecks

    record = _with_faces()
    assert "identity_checks" not in record.to_dict()  # the tar's record: written before the index
    record.identity_checks = IdentityChecks.of([2])
    d = json.loads(record.to_json())
    assert d["identity_checks"] == {"merged_identities": [2], "flags": ["merged_identities"]}
    assert Record.from_dict(d) == record
    for checks, problem in (({"merged_identities": [7], "flags": ["merged_identities"]}, "must list person segment ids"),
                            ({"merged_identities": [1], "flags": []}, "must be .* exactly when merged_identities lists"),
                            ({"merged_identities": [], "flags": ["merged_identities"]}, "must be .* exactly when"),
                            ({"merged": [1]}, "is malformed")):
        with pytest.raises(RecordError, match=f"field 'identity_checks[^']*' {problem}"):
            Record.from_dict({**d, "identity_checks": checks})
    old = {k: v for k, v in d.items() if k != "identity_faces"} | {"schema_version": "1.1"}
    with pytest.raises(RecordError, match="field 'identity_checks' is a schema 1.2 field"):
        Record.from_dict(old)
