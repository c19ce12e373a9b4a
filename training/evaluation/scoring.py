"""Scores of one generated image: identity preservation and prompt consistency (FastComposer §5.1).

**Identity.** MTCNN finds the faces of the generated image; FaceNet embeds them; ``sim[f, s]`` is the
cosine of face ``f`` and subject ``s``'s reference embedding (the mean of the FaceNet embeddings of
the subject's reference faces, re-normalised).

* Multi-subject (the paper's rule): generated faces are matched to subjects greedily on ``sim``
  (highest remaining pair first, each face and subject used once; the same greedy rule as the
  dataset's matcher, :func:`datagen.stages.greedy.greedy_match`); the image scores the **minimum over
  subjects** of the matched similarity. A subject left without a face (fewer faces than subjects)
  scores 0, so the image does too.
* Single-subject: one face is compared with the subject: by default (``face_choice: largest``) the
  largest one, as FastComposer's released single-subject script does (facenet-pytorch's MTCNN with
  ``select_largest=True`` returns the faces largest first, and the script takes
  ``generated_face[:1]``); ``face_choice: confident`` takes the one MTCNN is most confident about.
* No face in the image: 0. A negative cosine counts as 0, as in the released script
  (``max(similarity, 0)``).

**Prompt consistency.** Cosine of the CLIP image embedding of the generated image and the CLIP text
embedding of the prompt (ViT-L/14 with QuickGELU, OpenAI weights, in the ``paper`` profile: the
activation those weights were trained with, as OpenAI's ``clip`` package that the released script uses
builds it), both L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from datagen.stages.greedy import greedy_match

if TYPE_CHECKING:
    from datagen.config import EvaluationSettings


@dataclass
class IdentityResult:
    score: float
    per_subject: list[float]  # matched similarity per subject (0 when none), clamped at 0
    face_of_subject: list[int]  # index of the face matched to each subject, -1 when none
    similarity: list[list[float]] = field(default_factory=list)  # faces x subjects, raw cosines


FACE_ORDER = {
    "largest": lambda face: -face.area,  # facenet-pytorch's select_largest order, the released script's
    "confident": lambda face: -face.score,
}


def order_faces(faces: list, face_choice: str) -> list:
    """``faces`` (:class:`datagen.stages.faces.Face`) in the order ``face_choice`` ranks them: the
    single-subject score compares the first."""
    if face_choice not in FACE_ORDER:
        raise ValueError(f"face_choice must be one of {sorted(FACE_ORDER)}, got {face_choice!r}")
    return sorted(faces, key=FACE_ORDER[face_choice])


def identity_from_similarity(sim: np.ndarray, multi: bool) -> IdentityResult:
    """The identity score from a faces x subjects cosine matrix, faces in the order :func:`order_faces`
    gives (single-subject: face 0 is the one compared)."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a faces x subjects matrix, got shape {sim.shape}")
    n_faces, n_subjects = sim.shape
    if n_subjects == 0:
        raise ValueError("identity needs at least one subject")
    face_of = [-1] * n_subjects
    per = [0.0] * n_subjects
    if n_faces:
        if multi:
            for f, s in greedy_match(sim):
                face_of[s] = f
        else:
            if n_subjects != 1:
                raise ValueError(f"single-subject identity needs one subject, got {n_subjects}")
            face_of[0] = 0  # the face the rule ranks first (order_faces)
        per = [max(0.0, float(sim[f, s])) if f >= 0 else 0.0 for s, f in enumerate(face_of)]
    return IdentityResult(min(per), per, face_of, sim.tolist())


def reference_embedding(vectors: np.ndarray) -> np.ndarray:
    """Mean of L2-normalised embeddings, re-normalised."""
    mean = np.asarray(vectors, dtype=np.float64).mean(axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


class PromptScorer:
    """CLIP image-text cosine through OpenCLIP (architecture + tag, ``hf-hub:``, or a local folder)."""

    def __init__(self, clip_model: str, clip_pretrained: str | None, device: str):
        from datagen.stages.matcher import load_open_clip

        self.device = device
        self.model, self.preprocess, self.tokenizer = load_open_clip(clip_model, clip_pretrained, device)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return []
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        image = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)
        return (image * text).sum(dim=-1).cpu().tolist()


class IdentityScorer:
    """Faces of generated images against the subjects' reference embeddings."""

    def __init__(self, detector, embedder, references: dict[str, np.ndarray], face_choice: str = "largest"):
        self.detector, self.embedder, self.references = detector, embedder, references
        self.face_choice = face_choice

    def __call__(self, images: list[Image.Image], subjects: list[list[str]], multi: bool) -> list[dict[str, Any]]:
        faces = [order_faces(per, self.face_choice) for per in self.detector.detect(images)]
        flat = [f for per in faces for f in per]
        vectors = self.embedder.embed(flat) if flat else np.zeros((0, 512), np.float32)
        out, start = [], 0
        for per, names in zip(faces, subjects, strict=True):
            face_vectors = vectors[start:start + len(per)]
            start += len(per)
            refs = np.stack([self.references[n] for n in names])
            result = identity_from_similarity(face_vectors @ refs.T if len(per) else np.zeros((0, len(names))), multi)
            out.append({
                "faces_found": len(per),
                "face_boxes": [[round(v, 1) for v in f.box] for f in per],
                "face_scores": [round(f.score, 4) for f in per],
                "similarity": result.similarity,
                "subject_similarity": result.per_subject,
                "face_of_subject": result.face_of_subject,
                "identity": result.score,
            })
        return out


@dataclass
class EvaluationModels:
    """The evaluation's face detector (MTCNN), face embedder (FaceNet) and prompt scorer (CLIP), built
    in one place, :meth:`load`, from the profile's evaluation section: once by the driver (reference
    faces, leak check, in-process generation) and once by each Ray actor."""

    detector: Any  # datagen.stages.faces.FaceDetector
    embedder: Any  # datagen.stages.faces.FaceEmbedder
    prompt: PromptScorer

    @classmethod
    def load(cls, settings: EvaluationSettings, device: str) -> EvaluationModels:
        from datagen.stages.faces import FaceDetector, FaceEmbedder

        if settings.face_embedder == "dlib":  # dlib's descriptor on MTCNN's crops: real weights, offline
            from datagen.stages.identity import DlibCropEmbedder

            embedder = DlibCropEmbedder()
        else:
            embedder = FaceEmbedder(settings.face_embedder, device, settings.batch_size)
        detector = FaceDetector(settings.face_detector, device, crop_size=embedder.image_size,
                                min_face_size=settings.min_face_size, min_score=settings.min_face_score)
        return cls(detector, embedder, PromptScorer(settings.clip_model, settings.clip_pretrained, device))
