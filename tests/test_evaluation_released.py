"""The evaluation as FastComposer's released scripts score it: the CLIP activation the weights were
trained with, the largest generated face, and the ``released`` protocol preset (alpha 0.5, JPEG q75,
4 images per prompt) beside ours."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from datagen.config import RELEASED_PROTOCOL, EvaluationSettings, builtin_profiles, load_profile


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Small models run fastest single-threaded on a shared CPU (tests/conftest.py)."""


# ----------------------------------------------------------------------------- CLIP activation
def open_clip_models_of_every_profile() -> list[tuple[str, str, str, str | None]]:
    """(profile, section, architecture, tag) of every OpenCLIP model a built-in profile names."""
    found = []
    for name in builtin_profiles():
        profile = load_profile(name)
        for section in ("matcher", "evaluation"):
            settings = getattr(profile, section)
            if settings is None:  # grounding: sam3 runs no matcher
                continue
            if settings.clip_model:
                found.append((name, section, settings.clip_model, settings.clip_pretrained))
    return found


def built_activation(architecture: str) -> type:
    """The activation class open_clip builds for ``architecture`` (on the meta device: no memory, no weights)."""
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.create_model(architecture, device="meta")
    visual, text = model.visual.transformer.resblocks[0].mlp.gelu, model.transformer.resblocks[0].mlp.gelu
    assert type(visual) is type(text)
    return type(visual)


def test_every_open_clip_model_of_every_profile_builds_the_activation_its_weights_were_trained_with():
    import open_clip
    from open_clip.transformer import QuickGELU

    from datagen.stages.matcher import activation_problem

    models = open_clip_models_of_every_profile()
    builtin = [(p, s, m, t) for p, s, m, t in models if not m.startswith("local-dir:")]
    # the paper profile's two: the build's matcher (LAION ViT-H-14, GELU) and the evaluation's CLIP
    assert {(s, m, t) for p, s, m, t in builtin if p == "paper"} == {
        ("matcher", "ViT-H-14", "laion2b_s32b_b79k"), ("evaluation", "ViT-L-14-quickgelu", "openai")}
    for profile, section, model, tag in builtin:
        needs_quick = bool(open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False))
        assert activation_problem(model, tag) is None, (profile, section)
        assert built_activation(model) is (QuickGELU if needs_quick else torch_gelu()), (profile, section, model)
    # The evaluation's prompt consistency runs OpenAI's weights: QuickGELU, as OpenAI's clip package builds it.
    assert built_activation(load_profile("paper").evaluation.clip_model) is QuickGELU
    # The local folders (tiny, paper-shapes) carry random weights and their own config: no tag to disagree with.
    assert all(t is None for p, s, m, t in models if m.startswith("local-dir:"))


def torch_gelu() -> type:
    import torch

    return torch.nn.GELU


def test_the_architecture_without_quickgelu_is_refused_for_openai_weights():
    from datagen.stages.matcher import resolve_open_clip

    assert built_activation("ViT-L-14") is torch_gelu()  # what open_clip 3.x builds for plain ViT-L-14
    with pytest.raises(ValueError, match=r"ViT-L-14 builds nn\.GELU but the 'openai' weights were trained with "
                                         r"QuickGELU; use the architecture 'ViT-L-14-quickgelu'"):
        resolve_open_clip("ViT-L-14", "openai")


# ----------------------------------------------------------------------------- the largest face
def two_faces() -> Image.Image:
    """The astronaut's face twice: large but blurred and flat (MTCNN less sure), small and sharp."""
    from skimage import data

    face = Image.fromarray(data.astronaut()).crop((140, 40, 300, 220))
    canvas = Image.new("RGB", (640, 400), (120, 120, 120))
    big = ImageEnhance.Contrast(face.resize((240, 270)).filter(ImageFilter.GaussianBlur(8))).enhance(0.5)
    canvas.paste(big, (20, 60))
    canvas.paste(face.resize((110, 124)), (420, 120))
    return canvas


def test_single_subject_scores_the_largest_face_as_the_released_script_does(tiny_model):
    from datagen.stages.faces import FaceDetector, FaceEmbedder
    from training.evaluation.scoring import IdentityScorer

    detector = FaceDetector("mtcnn", "cpu")
    image = two_faces()
    faces = detector.detect([image])[0]
    assert len(faces) == 2
    largest, confident = max(faces, key=lambda f: f.area), max(faces, key=lambda f: f.score)
    assert largest is not confident  # the case where the rule matters
    assert largest.box[0] < 320 < confident.box[0]  # the big face on the left, the small one on the right
    # facenet-pytorch's MTCNN(select_largest=True), as the released script builds it, returns the faces
    # largest first and the script scores generated_face[:1]: that is the box scored here.
    upstream_boxes, _ = detector.mtcnn.detect(np.asarray(image))
    np.testing.assert_allclose(np.asarray(upstream_boxes[0], dtype=np.float64), largest.box, atol=1e-3)

    embedder = FaceEmbedder(str(tiny_model("facenet")), "cpu")
    vectors = embedder.embed([largest, confident])
    reference = {"subject": vectors[1]}  # the reference is the small face: scoring it would give 1.0
    rows = {choice: IdentityScorer(detector, embedder, reference, choice)([image], [["subject"]], multi=False)[0]
            for choice in ("largest", "confident")}
    assert rows["largest"]["face_boxes"][0] == [round(v, 1) for v in largest.box]
    assert rows["largest"]["identity"] == pytest.approx(max(0.0, float(vectors[0] @ vectors[1])), abs=1e-5)
    assert rows["confident"]["identity"] == pytest.approx(1.0, abs=1e-5)
    assert rows["largest"]["identity"] < 0.99


# ----------------------------------------------------------------------------- protocol presets
def settings_from(*options: str) -> EvaluationSettings:
    from cli.evaluate import evaluation_settings
    from cli.main import build_parser

    return evaluation_settings(build_parser(load="evaluate").parse_args(
        ["evaluate", "--checkpoint", "c", "--subjects", "s", "--out", "o", "--profile", "paper", *options]))


def test_both_protocol_presets():
    ours = settings_from()
    assert ours.protocol == "ours" == EvaluationSettings().protocol  # the default
    assert (ours.alpha, ours.image_format, ours.face_choice, ours.images_per_prompt) == (0.7, "png", "largest", 4)
    released = settings_from("--protocol", "released")
    assert (released.alpha, released.image_format, released.jpeg_quality, released.face_choice,
            released.images_per_prompt) == (0.5, "jpeg", 75, "largest", 4)
    assert {k: getattr(released, k) for k in RELEASED_PROTOCOL} == RELEASED_PROTOCOL
    # an option given wins over the preset; the preset over the profile
    quick = settings_from("--protocol", "released", "--images-per-prompt", "1", "--steps", "5")
    assert (quick.images_per_prompt, quick.steps, quick.alpha, quick.image_format) == (1, 5, 0.5, "jpeg")
    assert EvaluationSettings(protocol="released", alpha=0.9).with_protocol().alpha == 0.5
    assert EvaluationSettings(alpha=0.9).with_protocol().alpha == 0.9


def test_released_protocol_scores_the_jpeg_file_it_writes():
    from training.evaluation.protocol import Prompt, SubjectSpec, plan
    from training.evaluation.worker import encode_image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    scored, data = encode_image(image, settings_from("--protocol", "released"))
    assert data[:3] == b"\xff\xd8\xff"  # a JPEG file
    reference = io.BytesIO()
    image.save(reference, format="JPEG", quality=75)  # what the released script's save("...jpg") writes
    assert data == reference.getvalue()
    with Image.open(io.BytesIO(data)) as decoded:
        assert np.array_equal(np.asarray(scored), np.asarray(decoded.convert("RGB")))
    assert not np.array_equal(np.asarray(scored), np.asarray(image))  # lossy: the scores see the JPEG
    scored_png, png = encode_image(image, settings_from())
    assert png[:4] == b"\x89PNG" and scored_png is image
    units = plan([SubjectSpec("a", "man", ("/x.jpg",))], [Prompt(0, "a {} at sea", "", 1)], multi=False,
                 images_per_prompt=1, seed=0, baseline=False, image_suffix=".jpg")
    assert units[0].image_path.endswith("p000_i00.jpg")
