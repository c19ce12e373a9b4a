"""The evaluation's leak check through a run's identity index (``evaluate --identities RUN``): the
bundled sample's run (``identity_run``: real MTCNN and dlib weights, identities.parquet, split.parquet),
reference photos embedded with the run's own embedder, hits named by identity and split side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from fixtures.bundled_photos import wild_rel_path
from training.evaluation.leak import RunIndexError, index_leak_check, open_run_index
from training.evaluation.protocol import SubjectSpec
from training.evaluation.runner import EvaluationError, run_reference_faces

ASTRONAUT, HOPPER = "00000", "00002"  # the sample's single portraits (keys = FFHQ indices)


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """MTCNN runs fastest single-threaded on a shared CPU (tests/conftest.py)."""


@pytest.fixture(scope="module")
def subjects(sample_source, tmp_path_factory) -> list[SubjectSpec]:
    """The astronaut from a photo the run does not hold (mirrored, scaled x0.7), Grace Hopper from her
    own portrait (also in the run)."""
    root = tmp_path_factory.mktemp("leak-subjects")
    with Image.open(sample_source / wild_rel_path(0)) as im:
        new = ImageOps.mirror(im.convert("RGB"))
    new = new.resize((int(new.width * 0.7), int(new.height * 0.7)))
    new.save(root / "astronaut.png")
    shutil.copy(sample_source / wild_rel_path(2), root / "hopper.png")
    return [SubjectSpec("astronaut", "woman", (str(root / "astronaut.png"),)),
            SubjectSpec("hopper", "woman", (str(root / "hopper.png"),))]


@pytest.fixture(scope="module")
def references(identity_run, subjects) -> dict[str, np.ndarray]:
    return run_reference_faces(subjects, open_run_index(identity_run["run"]), "cpu")


def identity_of(run: Path, face: str) -> int:
    table = pq.read_table(run / "identities.parquet")
    return table.filter(pc.equal(table.column("face"), face)).column("identity")[0].as_py()


def copy_run(identity_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(identity_run["run"], run, ignore=shutil.ignore_patterns("references"))
    return run


def test_a_subject_in_the_run_is_flagged_with_its_identity(identity_run, references):
    run = identity_run["run"]
    index = open_run_index(run)
    assert (index.section.embedder, index.threshold) == ("dlib", 0.5)  # identities.json's threshold
    assert {n: v.shape for n, v in references.items()} == {"astronaut": (1, 128), "hopper": (1, 128)}  # raw dlib
    leak = index_leak_check(index, references)
    assert (leak["embedder"], leak["metric"], leak["split"]) == ("dlib", "euclidean", "split.parquet")
    assert leak["faces_checked"] == pq.read_metadata(run / "identities.parquet").num_rows == 17
    assert leak["flagged"] == ["astronaut", "hopper"]
    table = pq.read_table(run / "identities.parquet").to_pylist()
    for hit, portrait in zip(leak["subjects"], (ASTRONAUT, HOPPER), strict=True):
        (identity,) = hit["identities"]  # one person, one identity
        assert identity["identity"] == identity_of(run, f"{portrait}/0")
        person = [r for r in table if r["identity"] == identity["identity"]]
        assert (identity["faces"], identity["photos"]) == (person[0]["identity_faces"], person[0]["identity_photos"])
        assert identity["faces_hit"] == identity["train_faces_hit"] == len(person)  # every photo of the person
        assert identity["reserve_faces_hit"] == 0
        closest = identity["closest"]
        assert [m["distance"] for m in closest] == sorted(m["distance"] for m in closest)
        assert {m["face"] for m in closest} <= {r["face"] for r in person} and all(m["split"] == "train" for m in closest)
        assert max(m["distance"] for m in closest) < leak["threshold"]
    astronaut, hopper = leak["subjects"]
    assert 0.0 < astronaut["min_distance"] < 0.3  # a new photo of her: close, not identical
    assert hopper["min_distance"] == pytest.approx(0.0, abs=1e-3)  # her portrait, embedded as the build did
    assert hopper["identities"][0]["closest"][0]["key"] in (HOPPER, "01001")  # 01001 is a crop of the portrait
    assert json.loads(json.dumps(leak)) == leak  # JSON-ready


def test_a_person_not_in_the_run_is_not_flagged(identity_run, references, tmp_path):
    run = copy_run(identity_run, tmp_path)
    hopper = identity_of(run, f"{HOPPER}/0")
    identities = pq.read_table(run / "identities.parquet")
    gone = set(identities.filter(pc.equal(identities.column("identity"), hopper)).column("face").to_pylist())
    for path in sorted((run / "faces").glob("*.parquet")):  # the run without Grace Hopper's faces
        table = pq.read_table(path)
        pq.write_table(table.filter(pc.invert(pc.is_in(table.column("face"), pa_array(gone)))), path)
    pq.write_table(identities.filter(pc.invert(pc.is_in(identities.column("face"), pa_array(gone)))),
                   run / "identities.parquet")
    leak = index_leak_check(open_run_index(run), references)
    assert leak["faces_checked"] == 17 - len(gone)
    assert leak["flagged"] == ["astronaut"] and [s["subject"] for s in leak["subjects"]] == ["astronaut"]
    assert leak["min_distance"]["hopper"] > leak["threshold"]  # the nearest other person is further away
    assert leak["min_distance"]["astronaut"] < leak["threshold"]


def pa_array(values):
    return pa_array_of(sorted(values))


def pa_array_of(values):
    import pyarrow as pa

    return pa.array(list(values), pa.string())


def test_a_subject_whose_identity_is_in_the_reserve_is_reported_not_flagged(identity_run, references, tmp_path):
    run = copy_run(identity_run, tmp_path)
    astronaut = identity_of(run, f"{ASTRONAUT}/0")
    identities = pq.read_table(run / "identities.parquet").to_pylist()
    reserve = {r["key"] for r in identities if r["identity"] == astronaut}
    split = pq.read_table(run / "split.parquet")
    sides = [("test" if k in reserve else "train") for k in split.column("key").to_pylist()]
    pq.write_table(split.set_column(split.schema.get_field_index("split"), "split", pa_array_of(sides)),
                   run / "split.parquet")
    leak = index_leak_check(open_run_index(run), references)
    assert leak["flagged"] == ["hopper"]  # her portraits are on the train side
    hit = next(s for s in leak["subjects"] if s["subject"] == "astronaut")
    assert not hit["flagged"]
    (identity,) = hit["identities"]
    assert identity["identity"] == astronaut and identity["train_faces_hit"] == 0
    assert identity["reserve_faces_hit"] == identity["faces_hit"] == len(reserve)
    assert {m["split"] for m in identity["closest"]} == {"test"}
    hopper = next(s for s in leak["subjects"] if s["subject"] == "hopper")["identities"][0]
    assert hopper["reserve_faces_hit"] > 0 and hopper["train_faces_hit"] > 0  # composites with the astronaut moved too


def test_the_distance_is_in_the_run_metric_and_can_be_overridden(identity_run, references):
    index = open_run_index(identity_run["run"])
    tight = index_leak_check(index, references, threshold=1e-3)
    assert tight["threshold"] == 0.001 and tight["flagged"] == ["hopper"]  # only her identical portrait
    assert tight["min_distance"] == index_leak_check(index, references)["min_distance"]


def test_runs_the_index_check_cannot_use_say_what_to_run(identity_run, tmp_path, monkeypatch):
    run = copy_run(identity_run, tmp_path)
    (run / "identities.parquet").unlink()
    with pytest.raises(RunIndexError, match=r"no identities.parquet; run `subject-ffhq identities .*run` first"):
        open_run_index(run)
    shutil.rmtree(run / "faces")
    from datagen.manifests.face_table import FaceTableError

    with pytest.raises(FaceTableError, match=r"no face embeddings.*Re-run `subject-ffhq build`"):
        open_run_index(run)
    (run / "run.json").write_text(json.dumps({"config": {"faces": {}}}))  # an older build: no identity stage
    with pytest.raises(RunIndexError, match=r"records no identity section.*schema 1.1.*Re-run `subject-ffhq build`"):
        open_run_index(run)
    (run / "run.json").write_text(json.dumps({"config": {"identity": {"embedder": "vggface2"}}}))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datagen.stages.model_loading import ModelNotFoundError

    shutil.copytree(identity_run["run"] / "faces", run / "faces")
    shutil.copy(identity_run["run"] / "identities.parquet", run)
    with pytest.raises(ModelNotFoundError, match=r"vggface2"):
        open_run_index(run)


def test_a_reference_photo_without_a_face_is_named(identity_run, tmp_path):
    Image.new("RGB", (200, 200), (120, 130, 140)).save(tmp_path / "wall.png")
    with pytest.raises(EvaluationError, match=r"subject wall: MTCNN .* finds no face in the reference photo .*wall.png"):
        run_reference_faces([SubjectSpec("wall", "person", (str(tmp_path / "wall.png"),))],
                            open_run_index(identity_run["run"]), "cpu")


def test_evaluate_options_resolve_the_run_and_keep_the_two_thresholds_apart(identity_run, tmp_path):
    from cli.evaluate import request_from_args
    from cli.main import build_parser
    from datagen.manifests.run_manifest import RunFolderError

    def request(*options):
        return request_from_args(build_parser(load="evaluate").parse_args(
            ["evaluate", "--checkpoint", "c", "--subjects", "s", "--out", str(tmp_path / "o"), "--profile", "tiny",
             *options]))

    run = identity_run["run"]
    given = request("--identities", run.name, "--manifests-root", str(run.parent), "--leak-distance", "0.4")
    assert (given.identities, given.leak_distance, given.shards) == (str(run), 0.4, [])
    assert request("--identities", str(run)).leak_distance is None  # the run's own threshold
    with pytest.raises(ValueError, match=r"^--leak-distance applies to the --identities leak check"):
        request("--leak-distance", "0.4")
    with pytest.raises(ValueError, match=r"^--leak-distance must be a positive euclidean distance, got -1"):
        request("--identities", str(run), "--leak-distance", "-1")
    with pytest.raises(RunFolderError, match=r"run 'nope' not found"):
        request("--identities", "nope", "--manifests-root", str(tmp_path))


def test_face_embeddings_of_different_lengths_are_refused_even_when_they_divide_evenly():
    import pyarrow as pa

    from datagen.manifests.face_table import FaceTableError, embedding_matrix

    assert embedding_matrix("run", pa.array([[0.5] * 4] * 3, pa.list_(pa.float32()))).shape == (3, 4)
    mixed = pa.chunked_array([pa.array([[0.0] * 128] * 3 + [[0.0] * 512], pa.list_(pa.float32()))])  # 896 = 4 x 224
    with pytest.raises(FaceTableError, match=r"different lengths \(128, 512\)"):
        embedding_matrix("run", mixed)
    with pytest.raises(FaceTableError, match="without an embedding"):
        embedding_matrix("run", pa.array([[0.5] * 4, None], pa.list_(pa.float32())))


def test_a_run_on_a_bucket_is_read_there(identity_run, references, local_s3):
    """``evaluate --identities s3://...``: the run's URL is not mangled by ``Path`` (it read as no
    identity section)."""
    import fsspec

    from tests.local_s3 import clear_fs_cache

    bucket = local_s3.bucket("leak-run")
    clear_fs_cache()
    fsspec.filesystem("s3").put(f"{identity_run['run']}/", f"s3://{bucket}/run/", recursive=True)
    index = open_run_index(f"s3://{bucket}/run")
    assert (index.section.embedder, index.threshold) == ("dlib", 0.5)
    leak = index_leak_check(index, references)
    assert leak["run"] == f"s3://{bucket}/run"
    assert leak["flagged"] == index_leak_check(open_run_index(identity_run["run"]), references)["flagged"]
