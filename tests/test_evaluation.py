"""Evaluation (FastComposer §5.1-5.3): real MTCNN on the bundled sample, the identity rules on hand-made
matrices, the protocol files, model errors, and a tiny-checkpoint evaluation end to end (table, summary,
page in headless Chromium, leak check, random-weights notices)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen.stages.model_loading import ModelNotFoundError
from fixtures.bundled_photos import SAMPLE_IMAGES, wild_rel_path
from training.evaluation.protocol import (
    BASELINE,
    BUILTIN_PROMPTS,
    OURS,
    ProtocolError,
    SubjectSpec,
    plan,
    read_prompts,
    read_subjects,
)
from training.evaluation.scoring import identity_from_similarity

# Faces of each sample image: 1 per single portrait, 2 and 3 in the side-by-side composites.
EXPECTED_FACES = {0: 1, 1: 1, 2: 1, 3: 2, 4: 3, 1000: 1, 1001: 1, 1002: 1, 1003: 2, 1004: 2, 2000: 1, 60000: 3}


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models run fastest single-threaded on a shared CPU (tests/conftest.py)."""


@pytest.fixture(scope="session")
def detector():
    from datagen.stages.faces import FaceDetector

    return FaceDetector("mtcnn", "cpu")


# ------------------------------------------------------------------------------------ real MTCNN
def test_mtcnn_weights_ship_inside_the_package_and_load_offline():
    import facenet_pytorch

    data = Path(facenet_pytorch.__file__).parent / "data"
    assert {p.name for p in data.glob("*.pt")} >= {"pnet.pt", "rnet.pt", "onet.pt"}
    from datagen.stages.faces import FaceDetector

    assert FaceDetector.resolve("mtcnn") is None  # the package's own files, no download


def test_real_mtcnn_finds_every_face_of_the_sample_inside_its_person(detector, sample_source):
    assert set(EXPECTED_FACES) == {s.index for s in SAMPLE_IMAGES}
    images = []
    for spec in SAMPLE_IMAGES:
        with Image.open(sample_source / wild_rel_path(spec.index)) as im:
            images.append(im.convert("RGB"))
    found = detector.detect(images)
    for spec, faces in zip(SAMPLE_IMAGES, found, strict=True):
        assert len(faces) == EXPECTED_FACES[spec.index], (spec.index, [f.box for f in faces])
        rects = [rect for _, rect in spec.recipe().faces]  # where each person's face is, left to right
        assert len(rects) == len(faces)
        owners = []
        for face in faces:
            assert face.score > 0.95
            assert face.crop.shape == (3, 160, 160)
            cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
            inside = [k for k, (x0, y0, x1, y1) in enumerate(rects) if x0 <= cx <= x1 and y0 <= cy <= y1]
            assert len(inside) == 1, (spec.index, face.box, rects)
            x0, y0, x1, y1 = rects[inside[0]]
            overlap = max(0, min(x1, face.box[2]) - max(x0, face.box[0])) * max(0, min(y1, face.box[3]) - max(y0, face.box[1]))
            assert overlap >= 0.6 * face.area, (spec.index, face.box, rects[inside[0]])
            owners.append(inside[0])
        assert sorted(owners) == list(range(len(rects)))  # one face per person
        assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)


def test_detector_batches_images_of_different_sizes(detector):
    blank = Image.new("RGB", (64, 48), (128, 128, 128))
    assert detector.detect([blank, blank.resize((80, 80))]) == [[], []]


# ------------------------------------------------------------------------------------ identity rules
def test_multi_subject_matching_is_greedy_and_scores_the_weakest_subject():
    # faces x subjects. Greedy takes (0, 0) = 0.9 first, leaving face 1 for subject 1 at 0.1; the optimal
    # assignment for the minimum would pair (0, 1) and (1, 0) for a minimum of 0.8. The paper's rule is greedy.
    result = identity_from_similarity(np.array([[0.9, 0.8], [0.85, 0.1]]), multi=True)
    assert result.face_of_subject == [0, 1]
    assert result.per_subject == pytest.approx([0.9, 0.1])
    assert result.score == pytest.approx(0.1)
    # the better-matching face wins each subject regardless of face order
    result = identity_from_similarity(np.array([[0.2, 0.7], [0.6, 0.3], [0.1, 0.05]]), multi=True)
    assert result.face_of_subject == [1, 0]
    assert result.score == pytest.approx(0.6)  # min(0.6, 0.7); the third face is left over


def test_missing_faces_and_negative_cosines_score_zero():
    assert identity_from_similarity(np.zeros((0, 2)), multi=True).score == 0.0  # no face
    one_face = identity_from_similarity(np.array([[0.7, 0.6]]), multi=True)  # two subjects, one face
    assert one_face.face_of_subject == [0, -1] and one_face.per_subject == [0.7, 0.0] and one_face.score == 0.0
    assert identity_from_similarity(np.array([[-0.3]]), multi=False).score == 0.0
    assert identity_from_similarity(np.zeros((0, 1)), multi=False).score == 0.0


def test_single_subject_compares_the_face_ranked_first():
    # faces come in the order the face rule ranks them (scoring.order_faces): face 0 is compared, even though face 1 is more similar
    result = identity_from_similarity(np.array([[0.2], [0.9]]), multi=False)
    assert result.face_of_subject == [0] and result.score == pytest.approx(0.2)


# ------------------------------------------------------------------------------------ protocol
def test_builtin_prompt_lists_cover_the_four_categories():
    single, multi = read_prompts(BUILTIN_PROMPTS["single"]), read_prompts(BUILTIN_PROMPTS["multi"])
    assert len(single) == 30 and len(multi) == 21
    categories = {"recontextualisation", "stylisation", "accessories", "actions"}
    assert {p.category for p in single} == categories == {p.category for p in multi}
    assert {p.slots for p in single} == {1} and {p.slots for p in multi} == {2}
    assert len({p.template for p in single}) == 30 and len({p.template for p in multi}) == 21


def test_multi_subject_plan_is_every_pair_times_every_prompt_with_paired_seeds():
    subjects = [SubjectSpec(f"s{i:02d}", "woman" if i % 2 else "man", (f"/x/{i}.jpg",)) for i in range(15)]
    units = plan(subjects, read_prompts(BUILTIN_PROMPTS["multi"]), multi=True, images_per_prompt=2, seed=10,
                 baseline=True)
    assert len(units) == 105 * 21 * 2 * 2
    ours = [u for u in units if u.method == OURS]
    assert len({tuple(u.subjects) for u in ours}) == 105
    assert {u.seed for u in ours} == {10, 11}
    first = ours[0]
    assert first.text == "a man and a woman sitting on a park bench" and first.subjects == ["s00", "s01"]
    twin = next(u for u in units if u.method == BASELINE and u.subjects == first.subjects
                and u.prompt_index == first.prompt_index and u.image_index == first.image_index)
    assert twin.seed == first.seed and twin.text == first.text and twin.image_path != first.image_path


def test_protocol_errors_name_the_input(tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_text("a {} at the beach\na photo of the sea\n")
    with pytest.raises(ProtocolError, match=r"prompts.txt:2: .*no subject slot"):
        read_prompts(bad)
    bad.write_text("a person next to a {}\n")  # the sampler would bind the subject to the first "person"
    subjects = [SubjectSpec("a", "person", ("/x.jpg",))]
    with pytest.raises(ProtocolError, match="occurs before its subject slot"):
        plan(subjects, read_prompts(bad), multi=False, images_per_prompt=1, seed=0, baseline=False)
    with pytest.raises(ProtocolError, match="--multi needs prompts with two or more"):
        plan(subjects, read_prompts(BUILTIN_PROMPTS["single"]), multi=True, images_per_prompt=1, seed=0, baseline=False)
    (tmp_path / "subjects" / "ann").mkdir(parents=True)
    with pytest.raises(ProtocolError, match="ann: holds no photo"):
        read_subjects(tmp_path / "subjects")


def test_subject_folders_photos_and_class_words(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "bob.jpg")
    (tmp_path / "ann").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ann" / "2.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "ann" / "1.png")
    (tmp_path / "ann" / "word.txt").write_text("woman\n")
    ann, bob = read_subjects(tmp_path)
    assert (ann.name, ann.word, [Path(p).name for p in ann.photos]) == ("ann", "woman", ["1.png", "2.png"])
    assert (bob.name, bob.word) == ("bob", "person")


# ------------------------------------------------------------------------------------ models
def test_missing_face_models_fail_with_their_name_and_how_to_get_them(tmp_path, monkeypatch):
    from datagen.stages.faces import FaceDetector, FaceEmbedder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"'vggface2'.*switched off(.|\n)*20180402-114759-vggface2.pt"):
        FaceEmbedder("vggface2", "cpu")
    with pytest.raises(ModelNotFoundError, match=r"'\./no/facenet'(.|\n)*tiny-models"):
        FaceEmbedder("./no/facenet", "cpu")
    with pytest.raises(ModelNotFoundError, match=r"'\./no/mtcnn'(.|\n)*pnet.pt"):
        FaceDetector("./no/mtcnn", "cpu")


def test_tiny_facenet_loads_and_tells_photos_apart(tiny_model, detector, sample_source):
    from datagen.stages.faces import FaceEmbedder
    from datagen.stages.model_loading import has_random_weights

    folder = tiny_model("facenet")
    assert has_random_weights(folder) and has_random_weights(f"local-dir:{tiny_model('open_clip')}")
    assert not has_random_weights(tiny_model("sbert")) and not has_random_weights("vggface2")
    embedder = FaceEmbedder(str(folder), "cpu")
    assert embedder.config["repeats"] == [1, 1, 1] and embedder.image_size == 80
    images = [Image.open(sample_source / wild_rel_path(i)).convert("RGB") for i in (0, 1, 2)]
    faces = [f[0] for f in detector.detect(images)]
    vectors = embedder.embed(faces)
    assert vectors.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[np.triu_indices(3, 1)].max() < 0.95  # random weights, but not collapsed onto one direction


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def evaluation(tiny_model, sample_source, identity_run, tmp_path_factory):
    """2 subjects x 2 prompts x 1 image (+ the baseline), tiny models, with the leak check both ways: on
    shards that hold the astronaut's photo (and the cameraman's) but not Grace Hopper's, and through the
    identity index of the sample's run (``identity_run``: every photo of the three people, real dlib)."""
    from cli.main import main
    from datagen.config import TINY_MODELS_ENV
    from datagen.shards.writer import ShardWriter
    from fixtures.training_shards import sample_photo_records
    from training.checkpoint import save_checkpoint
    from training.config import TrainConfig
    from training.model import FastComposerModel

    root = tmp_path_factory.mktemp("evaluation")
    for name in ("stable-diffusion", "clip-vision", "open_clip", "facenet"):
        tiny_model(name)
    sd, enc = str(tiny_model("stable-diffusion")), str(tiny_model("clip-vision"))
    components = FastComposerModel.from_pretrained(sd, enc)
    cfg = TrainConfig(shards=["unused.tar"], out=str(root / "train"), pretrained=sd, image_encoder=enc, resolution=64)
    save_checkpoint(components.model, None, 3, cfg.to_dict(), root / "train" / "checkpoint-00000003")

    subjects = root / "subjects"
    (subjects / "astronaut").mkdir(parents=True)
    shutil.copy(sample_source / wild_rel_path(0), subjects / "astronaut" / "photo.png")
    (subjects / "astronaut" / "word.txt").write_text("woman\n")
    shutil.copy(sample_source / wild_rel_path(2), subjects / "hopper.png")
    prompts = root / "prompts.txt"
    prompts.write_text("# category: places\na {} on the beach\n# category: accessories\na {} wearing a <b>red</b> hat\n")
    shard = root / "shards" / "subjects-00000.tar"
    shard.parent.mkdir()
    with ShardWriter(shard) as writer:
        for image, segment_map, record in sample_photo_records(sample_source):
            if record.key in ("00000", "00001"):  # astronaut, cameraman
                writer.write(image, segment_map, record)

    mp = pytest.MonkeyPatch()
    mp.setenv(TINY_MODELS_ENV, str(tiny_model("facenet").parent))
    out = root / "out"
    try:
        code = main(["evaluate", "--checkpoint", str(root / "train"), "--subjects", str(subjects), "--prompts",
                     str(prompts), "--out", str(out), "--profile", "tiny", "--images-per-prompt", "1", "--steps", "2",
                     "--shards", str(shard), "--identities", str(identity_run["run"]), "--device", "cpu"])
    finally:
        mp.undo()
    assert code == 0
    return out


def test_evaluation_writes_table_summary_page_and_images(evaluation):
    import pyarrow.parquet as pq

    table = pq.read_table(evaluation / "results.parquet")
    rows = table.to_pylist()
    assert len(rows) == 2 * 2 * 1 * 2  # subjects x prompts x images x (ours, baseline)
    assert {r["method"] for r in rows} == {OURS, BASELINE}
    assert {(tuple(r["subjects"]), r["text"]) for r in rows} == {
        (("astronaut",), "a woman on the beach"), (("astronaut",), "a woman wearing a <b>red</b> hat"),
        (("hopper",), "a person on the beach"), (("hopper",), "a person wearing a <b>red</b> hat")}
    assert {r["category"] for r in rows} == {"places", "accessories"} and {r["seed"] for r in rows} == {0}
    for r in rows:
        with Image.open(evaluation / r["image_path"]) as im:
            assert im.size == (64, 64)
        assert r["faces_found"] == len(r["face_boxes"]) == len(r["face_scores"]) == len(r["similarity"])
        assert 0.0 <= r["identity"] <= 1.0 and -1.0 <= r["prompt_consistency"] <= 1.0
        if r["faces_found"] == 0:
            assert r["identity"] == 0.0 and r["face_of_subject"] == [-1]
    summary = json.loads((evaluation / "summary.json").read_text())
    ours = [r for r in rows if r["method"] == OURS]
    assert summary["methods"][OURS]["identity"] == pytest.approx(np.mean([r["identity"] for r in ours]), abs=1e-6)
    assert summary["methods"][BASELINE]["prompt_consistency"] == pytest.approx(
        np.mean([r["prompt_consistency"] for r in rows if r["method"] == BASELINE]), abs=1e-6)
    assert summary["methods"][OURS]["images"] == 4 and summary["step"] == 3 and summary["protocol"] == "single"
    assert summary["subjects"] == ["astronaut", "hopper"] and summary["alpha"] == 0.7
    assert (evaluation / "references" / "astronaut.jpg").is_file() and (evaluation / "references" / "hopper.jpg").is_file()
    page = (evaluation / "evaluation.html").read_text()
    assert page.count('class="card"') == 4
    assert "a woman wearing a &lt;b&gt;red&lt;/b&gt; hat" in page and "<b>red</b>" not in page  # autoescaped


def test_leak_check_flags_the_subject_whose_photo_is_in_the_shards(evaluation):
    summary = json.loads((evaluation / "summary.json").read_text())
    leak = summary["leak_check"]
    assert leak["checked_with"] == ["shards", "identities"]
    assert leak["flagged"] == ["astronaut", "hopper"]  # either way
    shards = leak["shards"]
    assert shards["images_checked"] == 2 and shards["faces_checked"] == 2
    assert [f["subject"] for f in shards["flagged"]] == ["astronaut"]
    match = shards["flagged"][0]["matches"][0]
    assert (match["shard"], match["key"]) == ("subjects-00000.tar", "00000") and match["similarity"] >= 0.95
    assert shards["max_similarity"]["hopper"] < shards["threshold"]
    page = (evaluation / "evaluation.html").read_text()
    section = page.split('id="leak-shards"', 1)[1].split("</div>", 1)[0]
    assert 'class="flagged"><strong>astronaut</strong>' in section and "<strong>hopper</strong>" not in section


def test_leak_check_through_the_identity_index_names_each_identity(evaluation, identity_run):
    import pyarrow.parquet as pq

    summary = json.loads((evaluation / "summary.json").read_text())
    index = summary["leak_check"]["identities"]
    assert (index["run"], index["embedder"], index["metric"], index["threshold"]) == (
        str(identity_run["run"]), "dlib", "euclidean", 0.5)
    assert index["flagged"] == ["astronaut", "hopper"] and index["faces_checked"] == 17
    faces = {r["face"]: r["identity"] for r in pq.read_table(identity_run["run"] / "identities.parquet").to_pylist()}
    assert [s["identities"][0]["identity"] for s in index["subjects"]] == [faces["00000/0"], faces["00002/0"]]
    assert summary["models"]["leak check embedder (the run's)"] == "dlib"
    page = (evaluation / "evaluation.html").read_text()
    assert "Leak check (shards and identities)" in page
    table = page.split('id="leak-identities"', 1)[1]
    assert f"<td>{faces['00002/0']}</td>" in table and "<code>00002/0</code>" in table
    assert table.count('<tr class="flagged">') == 2


def test_every_output_of_random_weights_says_so_first(evaluation):
    import pyarrow.parquet as pq

    summary_text = (evaluation / "summary.json").read_text()
    summary = json.loads(summary_text)
    assert next(iter(summary)) == "notice" and summary["notice"].startswith("RANDOM WEIGHTS")
    assert summary_text.splitlines()[1].lstrip().startswith('"notice": "RANDOM WEIGHTS')
    assert summary["random_weights"] is True
    assert any(m.startswith("base (Stable Diffusion)") for m in summary["random_weight_models"])
    assert any(m.startswith("face embedder") for m in summary["random_weight_models"])
    assert not any(m.startswith("face detector") for m in summary["random_weight_models"])  # real MTCNN
    table = pq.read_table(evaluation / "results.parquet")
    assert table.schema.names[0] == "random_weights" and all(table.column("random_weights").to_pylist())
    metadata = table.schema.metadata
    assert next(iter(metadata)) == b"notice" and metadata[b"notice"].startswith(b"RANDOM WEIGHTS")
    page = (evaluation / "evaluation.html").read_text()
    assert "<title>RANDOM WEIGHTS" in page
    body = page.split("<body>", 1)[1].lstrip()
    assert body.startswith('<p class="banner" id="random-weights">RANDOM WEIGHTS')


def test_page_without_random_models_has_no_banner():
    from training.evaluation.report import build_summary, page_html

    summary = build_summary([], notice=None, random_models=[], header={"protocol": "single", "checkpoint": "c",
                            "checkpoint_name": "c", "step": 1, "subjects": [], "prompts": 0, "images_per_prompt": 1,
                            "seeds": [0], "alpha": 0.7, "steps": 50, "guidance_scale": 5.0, "models": {"clip": "x"}},
                            leak=None, seconds={})
    assert summary["random_weights"] is False and not summary["notice"].startswith("RANDOM")
    page = page_html([], summary, {})
    assert "RANDOM WEIGHTS" not in page and 'id="random-weights"' not in page


def test_page_names_the_face_embedder_and_the_face_scored():
    from training.evaluation.report import build_summary, page_html

    def page(face_choice: str) -> str:
        header = {"protocol": "single", "checkpoint": "c", "checkpoint_name": "c", "step": 1, "subjects": [],
                  "prompts": 0, "images_per_prompt": 1, "seeds": [0], "alpha": 0.7, "steps": 50,
                  "guidance_scale": 5.0, "face_choice": face_choice, "models": {"clip": "x", "face embedder": "dlib"}}
        return page_html([], build_summary([], notice=None, random_models=[], header=header, leak=None, seconds={}), {})

    largest = page("largest")
    assert "face-embedding cosine (dlib)" in largest and "the largest face" in largest
    assert "most confident" not in largest and "FaceNet cosine" not in largest
    assert "the face MTCNN is most confident about" in page("confident")


def test_page_opens_in_chromium_without_errors_and_sorts_by_score(evaluation):
    from tests.browser import Chromium, require_chromium

    require_chromium()
    browser = Chromium()
    try:
        page = browser.visit((evaluation / "evaluation.html").resolve().as_uri())
        first_line = browser.evaluate("document.body.innerText.split('\\n')[0]")
        images = browser.evaluate(  # a returned promise is awaited
            "Promise.all(Array.from(document.images).map(i => { i.loading = 'eager';"
            " return i.decode().then(() => i.naturalWidth, () => 0); }))")
        order = "Array.from(document.querySelectorAll('.card')).map(c => parseFloat(c.dataset.{}))"
        browser.evaluate("(() => { const s = document.getElementById('sort'); s.value = 'prompt-desc';"
                         " s.dispatchEvent(new Event('change')); return s.value; })()")
        by_prompt = browser.evaluate(order.format("prompt"))
        browser.evaluate("(() => { const s = document.getElementById('sort'); s.value = 'identity-asc';"
                         " s.dispatchEvent(new Event('change')); return s.value; })()")
        by_identity = browser.evaluate(order.format("identity"))
        console = page.console + browser.console()  # while it loaded, and while it was sorted
    finally:
        browser.close()
    # uncaught exceptions, console.error / console.assert and errors the browser logged
    errors = [e for e in console if e["level"] == "SEVERE"]
    assert errors == []
    assert first_line.startswith("RANDOM WEIGHTS")
    assert len(images) == 4 * 3 and min(images) > 0  # per card: reference, ours, baseline
    assert len(by_prompt) == 4 and by_prompt == sorted(by_prompt, reverse=True)
    assert by_identity == sorted(by_identity)


# ------------------------------------------------------------------------------------ settings
def test_the_scoring_models_are_built_in_one_place():
    import re

    repo = Path(__file__).resolve().parents[1]
    sources = [*sorted((repo / "training").rglob("*.py")), *sorted((repo / "ray_jobs").rglob("*.py"))]
    builders = sorted(str(p.relative_to(repo)) for p in sources
                      if re.search(r"\b(FaceDetector|FaceEmbedder|PromptScorer)\(", p.read_text()))
    assert builders == ["training/evaluation/scoring.py"]  # EvaluationModels.load, for the driver and each actor


def test_evaluate_options_override_the_profile_and_a_bad_one_is_named(tmp_path):
    from cli.evaluate import evaluation_settings
    from cli.main import build_parser

    def settings(*options):
        return evaluation_settings(build_parser(load="evaluate").parse_args(
            ["evaluate", "--checkpoint", "c", "--subjects", "s", "--out", "o", "--profile", "tiny", *options]))

    tiny = settings()
    assert (tiny.images_per_prompt, tiny.steps, tiny.alpha, tiny.leak_threshold) == (1, 10, 0.7, 0.95)  # the profile's
    given = settings("--steps", "3", "--guidance", "2.5", "--seed", "4", "--leak-threshold", "0.5")
    assert (given.steps, given.guidance_scale, given.seed, given.leak_threshold, given.images_per_prompt) == (3, 2.5, 4, 0.5, 1)
    with pytest.raises(ValueError, match=r"^--alpha must be in 0\.0\.\.1\.0, got 1\.5$"):
        settings("--alpha", "1.5")
    with pytest.raises(ValueError, match=r"^--images-per-prompt must be >= 1, got 0$"):
        settings("--images-per-prompt", "0")
    over = tmp_path / "over.yaml"
    over.write_text("evaluation: {steps: 7, alpah: 0.5}\n")
    from datagen.config import ProfileError

    with pytest.raises(ProfileError, match=r"unknown setting 'evaluation.alpah' in .*over\.yaml; did you mean 'evaluation.alpha'\?"):
        settings("--config", str(over))
