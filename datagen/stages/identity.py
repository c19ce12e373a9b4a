"""Identity embeddings: every face of an image, linked to the person segment holding it, embedded.

    finder = IdentityFinder(profile.identity, profile.faces.detector)   # MTCNN + the embedder
    per_image = finder.find(images, panoptics)                          # one list of IdentityFace per image

(:class:`IdentityStep` is the build's stage, after the segmenter.)

**Where faces are looked for.** MTCNN runs once on the whole stored image (the face stage's detector,
``faces.detector``, with this section's ``min_face_size`` and ``min_score``), and each face is linked
to the ``person`` segment holding most of its box's pixels when that segment holds at least
``min_inside`` of them (``segment_id``; ``None``: the face is in no person segment). Identities belong
to people, not to segments: a face the segmenter missed still gets its identity. Measured: on the
demo (tiny profile) per-segment detection, what the face stage does, finds 1 face in the 11 written
images, where the whole-image pass finds all 17, because the random segmenter puts almost none inside
a person segment; on this CPU (``bench/bench_identity_embedder.py``, 1 thread, 1024 px) MTCNN costs
0.151 s per image over the whole image and 0.166 s over good person segments only, so per-segment
detection *plus* a pass over the rest of the image would cost more than the whole-image pass alone.

**Embedders** (``identity.embedder``), fed MTCNN's boxes (no second detector):

* ``dlib``: dlib's ResNet face descriptor (128-d) after its 5-point landmark alignment. The model
  files come from the registry package ``face-recognition-models`` (public domain / CC0 files,
  ``shape_predictor_5_face_landmarks.dat`` and ``dlib_face_recognition_resnet_model_v1.dat``), read
  from the installed package's folder (its ``pkg_resources`` import is broken on current setuptools);
  dlib itself is the prebuilt wheel ``dlib-bin``. Real weights, offline: the tiny profile's default.
* ``vggface2``: FaceNet (InceptionResnetV1, VGGFace2), the evaluation's embedder
  (:class:`datagen.stages.faces.FaceEmbedder`, downloaded once where reachable), on MTCNN's 160 px crops.

**Not embedded.** A face whose box is under ``min_embed_px`` (its longer side), or whose grey crop at
64 px has a Laplacian variance under ``min_sharpness`` (blur), is kept with ``embedding = None`` and
the reason; it never fails its image. Faces are listed left to right (box order), so a face's number
in its image (``<key>/<n>``) is stable.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from datagen.config import PERSON_LABEL
from datagen.stages.model_loading import ModelNotFoundError
from datagen.stages.step import Step

if TYPE_CHECKING:
    from datagen.config import IdentitySettings
    from datagen.stages.segmenter import PanopticResult

EMBEDDERS = ("dlib", "vggface2")
DEFAULT_THRESHOLDS = {"dlib": 0.5, "vggface2": 1.0}  # euclidean distances: dlib's raw 128-d, FaceNet's unit 512-d
DIMENSIONS = {"dlib": 128, "vggface2": 512}
DLIB_FILES = {"landmarks": "shape_predictor_5_face_landmarks.dat",
              "descriptor": "dlib_face_recognition_resnet_model_v1.dat"}
DLIB_INSTALL = "install them: `uv pip install dlib-bin face-recognition-models` (`make install` does this)"
SHARPNESS_SIDE = 64  # the grey crop the blur measure looks at
BOX_DIGITS, SCORE_DIGITS, SHARE_DIGITS = 1, 6, 4  # as the face stage rounds


def threshold_of(section: IdentitySettings) -> float:
    """The clustering threshold: the setting, or the embedder's documented default."""
    return float(section.threshold) if section.threshold is not None else DEFAULT_THRESHOLDS[section.embedder]


def embedder_id(embedder: str) -> str:
    """The model id a record names for ``embedder``."""
    return f"dlib:{DLIB_FILES['descriptor']}+{DLIB_FILES['landmarks']}" if embedder == "dlib" else embedder


def dlib_model_files() -> dict[str, Path]:
    """The dlib model files inside the installed ``face-recognition-models`` (found without importing
    it), checked to be there, and dlib importable; else :class:`ModelNotFoundError` naming the package."""
    what = "identity embedder 'dlib'"
    if importlib.util.find_spec("dlib") is None:
        raise ModelNotFoundError(f"{what}: the package dlib-bin (import name dlib) is not installed; {DLIB_INSTALL}")
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"{what}: the package face-recognition-models is not installed; {DLIB_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = {k: folder / name for k, name in DLIB_FILES.items()}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"{what}: {folder} lacks {missing}; reinstall face-recognition-models: {DLIB_INSTALL}")
    return files


def check_embedder(embedder: str) -> None:
    """The embedder's model is there (``vggface2``: in facenet-pytorch's cache, or downloadable)."""
    if embedder == "dlib":
        dlib_model_files()
    else:
        from datagen.stages.faces import resolve_facenet

        resolve_facenet(embedder)


class DlibEmbedder:
    """``embed(rgb, boxes)`` -> ``N x 128`` float32: 5-point landmarks in each box, then the descriptor."""

    dimension = DIMENSIONS["dlib"]

    def __init__(self):
        import dlib

        files = dlib_model_files()
        self.dlib = dlib
        self.landmarks = dlib.shape_predictor(str(files["landmarks"]))
        self.net = dlib.face_recognition_model_v1(str(files["descriptor"]))

    def embed(self, rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        if not boxes:
            return np.zeros((0, self.dimension), np.float32)
        shapes = self.dlib.full_object_detections()
        for x0, y0, x1, y1 in boxes:
            shapes.append(self.landmarks(rgb, self.dlib.rectangle(int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1)))))
        return np.asarray([np.asarray(v) for v in self.net.compute_face_descriptor(rgb, shapes, 0)], np.float32)


class FacenetBoxEmbedder:
    """``embed(rgb, boxes)`` -> ``N x 512``: FaceNet on MTCNN's standardised 160 px crops of the boxes."""

    dimension = DIMENSIONS["vggface2"]

    def __init__(self, model: str, device: str | None):
        from datagen.stages.faces import FaceEmbedder

        self.model = FaceEmbedder(model, device)

    def embed(self, rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        import torch
        from facenet_pytorch import extract_face, fixed_image_standardization

        if not boxes:
            return np.zeros((0, self.dimension), np.float32)
        pil = Image.fromarray(rgb)
        crops = torch.stack([fixed_image_standardization(extract_face(pil, list(b), 160, 0)) for b in boxes])
        return self.model.embed(crops)


class DlibCropEmbedder:
    """dlib on MTCNN's standardised face crops (the evaluation's ``Face`` objects): ``embed(faces)`` ->
    ``N x 128`` L2-normalised (cosine = dot product), the landmarks found inside the whole crop. What
    ``subject-ffhq evaluate --face-embedder dlib`` scores identity with: real weights, offline."""

    image_size = 160  # MTCNN's crop side, as FaceNet's

    def __init__(self):
        self.dlib_embedder = DlibEmbedder()

    def embed(self, faces: Sequence[Any]) -> np.ndarray:
        out = []
        for f in faces:
            rgb = np.ascontiguousarray((f.crop.permute(1, 2, 0).numpy() * 128 + 127.5).clip(0, 255).astype(np.uint8))
            h, w = rgb.shape[:2]
            out.append(self.dlib_embedder.embed(rgb, [(0, 0, w - 1, h - 1)])[0])
        vectors = np.asarray(out, np.float32).reshape(len(out), DIMENSIONS["dlib"])
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def make_embedder(embedder: str, device: str | None = None) -> DlibEmbedder | FacenetBoxEmbedder:
    if embedder == "dlib":
        return DlibEmbedder()
    if embedder == "vggface2":
        return FacenetBoxEmbedder(embedder, device)
    raise ValueError(f"identity.embedder must be one of {EMBEDDERS}, got {embedder!r}")


@dataclass
class IdentityFace:
    """One face of an image: where, how sure, which person segment holds it, and its embedding."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the stored image
    score: float  # MTCNN's face probability
    size: int  # the box's longer side, px
    segment_id: int | None  # the person segment holding it; None: in none
    embedding: np.ndarray | None = None  # None: not embedded (``reason`` says why)
    reason: str | None = None


def sharpness(rgb: np.ndarray, box: Sequence[float]) -> float:
    """Variance of the Laplacian of the box's grey crop at 64 x 64 (low: blurred). Only the box is
    converted (the array sliced, the part outside the image black, as ``Image.crop`` pads it)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    h, w = rgb.shape[:2]
    if x1 <= x0 or y1 <= y0:
        crop = Image.fromarray(rgb).crop((x0, y0, x1, y1))
    else:
        part = np.zeros((y1 - y0, x1 - x0, *rgb.shape[2:]), rgb.dtype)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx1 > cx0 and cy1 > cy0:
            part[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = rgb[cy0:cy1, cx0:cx1]
        crop = Image.fromarray(part)
    grey = crop.convert("L").resize((SHARPNESS_SIDE, SHARPNESS_SIDE))
    g = np.asarray(grey, np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def linked_segment(box: Sequence[float], pan: PanopticResult, min_inside: float) -> int | None:
    """The person segment holding most of the box's pixels, when it holds at least ``min_inside``."""
    persons = [int(s.id) for s in pan.segments if s.coco_label == PERSON_LABEL]
    if not persons:
        return None
    h, w = pan.segment_map.shape
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    region = pan.segment_map[y0:y1, x0:x1]
    if region.size == 0:
        return None
    shares = {sid: float(np.mean(region == sid)) for sid in persons}
    best = min(shares, key=lambda sid: (-shares[sid], sid))
    return best if shares[best] >= min_inside else None


class IdentityFinder:
    """``find(images, panoptics)`` -> one list of :class:`IdentityFace` per image (module doc)."""

    def __init__(self, section: IdentitySettings, detector: str = "mtcnn", device: str | None = None):
        from datagen.stages.faces import FaceDetector

        self.section = section
        self.detector = FaceDetector(detector, device or section.device, min_face_size=section.min_face_size,
                                     min_score=section.min_score)
        self.embedder = make_embedder(section.embedder, device or section.device)

    def find(self, images: Sequence[Any], panoptics: Sequence[PanopticResult | None] | None = None
             ) -> list[list[IdentityFace]]:
        """``panoptics`` ``None``: no segments to link (``segment_id`` ``None``), as for a photo outside
        the run (the evaluation's reference photos, embedded exactly as the build embeds faces)."""
        if panoptics is None:
            panoptics = [None] * len(images)
        if len(images) != len(panoptics):
            raise ValueError(f"identity: {len(images)} images and {len(panoptics)} segmentations; they must pair up")
        rgbs = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        found = self.detector.detect([Image.fromarray(a) for a in rgbs], crops=False)
        return [self._faces(rgb, pan, faces) for rgb, pan, faces in zip(rgbs, panoptics, found, strict=True)]

    def _faces(self, rgb: np.ndarray, pan: PanopticResult | None, detected: list) -> list[IdentityFace]:
        s, (h, w) = self.section, rgb.shape[:2]
        faces = []
        for f in detected:
            x0, y0, x1, y1 = max(0.0, f.box[0]), max(0.0, f.box[1]), min(float(w), f.box[2]), min(float(h), f.box[3])
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            box = tuple(round(v, BOX_DIGITS) for v in (x0, y0, x1, y1))
            faces.append(IdentityFace(box, round(float(f.score), SCORE_DIGITS), int(round(max(x1 - x0, y1 - y0))),
                                      None if pan is None else linked_segment(box, pan, s.min_inside)))
        faces.sort(key=lambda f: (f.box, -f.score))
        todo = []
        for face in faces:
            if face.size < s.min_embed_px:
                face.reason = f"too small to embed ({face.size} px < identity.min_embed_px {s.min_embed_px})"
            elif (sharp := sharpness(rgb, face.box)) < s.min_sharpness:
                face.reason = f"too blurred to embed (sharpness {sharp:.1f} < identity.min_sharpness {s.min_sharpness})"
            else:
                todo.append(face)
        if todo:
            for face, vector in zip(todo, self.embedder.embed(rgb, [f.box for f in todo]), strict=True):
                face.embedding = vector
        return faces


FACES_DIR = "faces"  # the run's face tables: manifests/<run>/faces/<shard>.parquet (datagen.manifests.face_table)


def face_id(key: str, n: int) -> str:
    """The run-wide name of face ``n`` of sample ``key``."""
    return f"{key}/{n}"


def face_table_schema():
    import pyarrow as pa

    return pa.schema([("face", pa.string()), ("key", pa.string()), ("n", pa.int32()), ("segment_id", pa.int32()),
                      ("size", pa.int32()), ("score", pa.float32()), ("embedding", pa.list_(pa.float32()))])


class IdentityStep(Step):
    """The build's identity stage: a list of :class:`IdentityFace` per image (or a ``StageFailure``);
    the embeddings go to the run's face tables, one per shard (:attr:`shard_table`)."""

    name = "identity"
    shard_table = FACES_DIR

    @classmethod
    def shard_schema(cls) -> Any:
        return face_table_schema()

    @classmethod
    def shard_rows(cls, key: str, output: Sequence[Any]) -> list[dict[str, Any]]:
        """The face-table rows of one sample: its embedded faces, numbered as in its record."""
        return [{"face": face_id(key, n), "key": key, "n": n, "segment_id": f.segment_id, "size": int(f.size),
                 "score": float(f.score), "embedding": np.asarray(f.embedding, np.float32).tolist()}
                for n, f in enumerate(output) if f.embedding is not None]

    def __init__(self, profile, device: str):
        super().__init__(profile, device)
        self.finder = IdentityFinder(profile.identity, profile.faces.detector, device)

    def process(self, loaded: list, panoptic: list) -> list:
        from datagen.stages.failures import in_batches
        from datagen.stages.segmenter import probe_panoptic
        from datagen.stages.step import labels_of, probe_image

        def run(batch: list) -> list:
            return self.finder.find(*(list(column) for column in zip(*batch, strict=True)))

        inputs = [(li.image, pan) for li, pan in zip(loaded, panoptic, strict=True)]
        return in_batches(self.name, run, inputs, labels_of(loaded), max(1, len(inputs)),
                          lambda: (probe_image(), probe_panoptic()))

    @classmethod
    def model_ids(cls, profile) -> dict[str, str]:
        return {"identity_embedder": embedder_id(profile.identity.embedder)}

    @classmethod
    def check_models(cls, profile) -> None:
        check_embedder(profile.identity.embedder)
