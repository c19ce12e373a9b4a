"""Faces: MTCNN detection and FaceNet (InceptionResnetV1) embeddings, batched, for any stage that needs them.

    detector = FaceDetector("mtcnn")                 # facenet-pytorch's bundled weights (offline)
    embedder = FaceEmbedder("vggface2")              # FaceNet trained on VGGFace2
    faces = detector.detect(images)                  # one list of Face per image, best score first
    vectors = embedder.embed([f for per_image in faces for f in per_image])   # N x 512, L2-normalised

A :class:`Face` holds its box ``[x0, y0, x1, y1]`` (pixels of the image it was found in), its
detection probability, and its crop: the box cut from the image and resized to a square, standardised
the way facenet-pytorch's ``MTCNN(post_process=True)`` does (``(pixel - 127.5) / 128``). That crop is
what :meth:`FaceEmbedder.embed` takes (resized to the embedder's input size if it differs). The
defaults are the settings FastComposer's evaluation script uses (160 px crops, no margin, minimum face
20 px, thresholds 0.6 / 0.7 / 0.7, pyramid factor 0.709).

**Models** are named like every model of the project:

* detector ``mtcnn``: the P-, R- and O-net weights that the ``facenet-pytorch`` package ships inside
  itself (``facenet_pytorch/data/{pnet,rnet,onet}.pt``; real weights, no download); or a folder
  holding those three files.
* embedder ``vggface2`` / ``casia-webface``: facenet-pytorch's released FaceNet weights, read from
  ``$TORCH_HOME/checkpoints/`` (facenet-pytorch's own cache; downloaded there on first use when the
  network is allowed); a ``.pt`` / ``.safetensors`` file holding such a state dict; a folder with
  ``facenet_config.json`` + ``model.safetensors`` (what ``subject-ffhq tiny-models`` writes for the
  tiny profile: the same architecture with fewer repeated blocks, random weights); or a hub id of such
  a folder. A model that is not available raises :class:`~datagen.stages.model_loading.ModelNotFoundError`
  naming it, where it was looked for and how to get it.

``facenet-pytorch`` declares old torch/numpy pins in its metadata, so it is installed without its
dependencies (``uv pip install --no-deps facenet-pytorch==2.6.0``, done by ``make install``); it needs
nothing beyond torch, torchvision, numpy and Pillow, which the project already has.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

from datagen.stages.model_loading import (
    ModelNotFoundError,
    hub_offline,
    looks_like_path,
    pick_device,
    resolve_model,
)

DETECTOR_WHAT = "face detector (MTCNN)"
EMBEDDER_WHAT = "face embedder (FaceNet InceptionResnetV1)"
FACENET_CONFIG = "facenet_config.json"
FACENET_WEIGHTS = "model.safetensors"
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")
FULL_REPEATS = (5, 10, 5)  # Block35, Block17, Block8 repeats of InceptionResnetV1
INSTALL_HINT = (
    "install it without its dependencies (its metadata pins old torch/numpy): "
    "`uv pip install --no-deps facenet-pytorch==2.6.0` (`make install` does this)"
)
# facenet-pytorch's released weights (facenet_pytorch/models/inception_resnet_v1.py: load_weights)
PRETRAINED_URLS = {
    "vggface2": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
    "casia-webface": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt",
}


class FaceError(ValueError):
    """Bad input to the face stage; the message names the input and what is wrong."""


@dataclass
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the image's pixels
    score: float  # MTCNN's face probability
    crop: torch.Tensor | None  # 3 x S x S float, standardised ((pixel - 127.5) / 128); None: not asked for

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def _facenet_pytorch(what: str):
    try:
        import facenet_pytorch
    except ImportError:
        raise ModelNotFoundError(f"{what}: the package facenet-pytorch is not installed; {INSTALL_HINT}") from None
    return facenet_pytorch


def _facenet_pytorch_folder(what: str) -> Path:
    """The installed facenet-pytorch's folder, found without importing it (importing it imports torch
    and torchvision: seconds that ``build`` should not spend checking models before Ray starts)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"{what}: the package facenet-pytorch is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _no_grad(method):
    """``torch.no_grad()`` around ``method``, importing torch only when it runs."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)

    return wrapper


def _to_pil(image: Any, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise FaceError(f"image {index}: expected a PIL image or an H x W x 3 uint8 array, got "
                        f"{type(image).__name__} {getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}")
    return Image.fromarray(array)


# ------------------------------------------------------------------------------------------ detection
class FaceDetector:
    """MTCNN: ``detect(images)`` -> for each image, its faces (box, score, crop), most probable first."""

    def __init__(self, model: str = "mtcnn", device: str | None = None, *, crop_size: int = 160, margin: int = 0,
                 min_face_size: int = 20, thresholds: Sequence[float] = (0.6, 0.7, 0.7), factor: float = 0.709,
                 min_score: float = 0.0):
        import torch

        fp = _facenet_pytorch(DETECTOR_WHAT)
        folder = self.resolve(model)
        self.model_ref = model
        self.device = torch.device(pick_device(device))
        self.crop_size, self.margin, self.min_score = int(crop_size), int(margin), float(min_score)
        self.mtcnn = fp.MTCNN(image_size=self.crop_size, margin=self.margin, min_face_size=min_face_size,
                              thresholds=list(thresholds), factor=factor, post_process=True, keep_all=True,
                              device=self.device)
        if folder is not None:  # weights from a folder instead of the package's own files
            for name, net in (("pnet", self.mtcnn.pnet), ("rnet", self.mtcnn.rnet), ("onet", self.mtcnn.onet)):
                net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True))
        self.mtcnn.eval()

    @staticmethod
    def resolve(model: str) -> Path | None:
        """``None`` for the package's bundled weights, else the folder holding pnet/rnet/onet.pt."""
        if model == "mtcnn":
            data = _facenet_pytorch_folder(DETECTOR_WHAT) / "data"
            missing = [f for f in MTCNN_FILES if not (data / f).is_file()]
            if missing:
                raise ModelNotFoundError(
                    f"{DETECTOR_WHAT}: model 'mtcnn': the installed facenet-pytorch lacks {missing} in {data}; "
                    f"reinstall it: {INSTALL_HINT}")
            return None
        folder = Path(model).expanduser()
        missing = [f for f in MTCNN_FILES if not (folder / f).is_file()]
        if not folder.is_dir() or missing:
            raise ModelNotFoundError(
                f"{DETECTOR_WHAT}: model {model!r} not found: expected 'mtcnn' (the weights inside facenet-pytorch) "
                f"or a folder holding {', '.join(MTCNN_FILES)}"
                + (f" ({folder.resolve()} lacks {missing})" if folder.is_dir() else f" ({folder.resolve()} does not exist)")
                + f".\nHow to get it: use 'mtcnn' and {INSTALL_HINT}.")
        return folder

    @_no_grad
    def detect(self, images: Sequence[Any], crops: bool = True) -> list[list[Face]]:
        """Faces of each image. Images of the same size go through MTCNN as one batch.
        ``crops=False``: boxes and scores only (``Face.crop`` is ``None``), for callers that embed nothing."""
        fp = _facenet_pytorch(DETECTOR_WHAT)
        pils = [_to_pil(im, i) for i, im in enumerate(images)]
        out: list[list[Face]] = [[] for _ in pils]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(pils):
            if min(im.size) < 12:
                raise FaceError(f"image {i}: {im.width}x{im.height} is too small for MTCNN (12 px at least)")
            by_size.setdefault(im.size, []).append(i)
        for indices in by_size.values():
            batch = np.stack([np.asarray(pils[i]) for i in indices])
            boxes, probs = self.mtcnn.detect(batch)
            for i, image_boxes, image_probs in zip(indices, boxes, probs, strict=True):
                if image_boxes is None:
                    continue
                faces = []
                for box, prob in zip(image_boxes, image_probs, strict=True):
                    if prob is None or float(prob) < self.min_score:
                        continue
                    crop = (fp.fixed_image_standardization(fp.extract_face(pils[i], box, self.crop_size, self.margin))
                            if crops else None)
                    faces.append(Face(tuple(float(v) for v in box), float(prob), crop))
                out[i] = sorted(faces, key=lambda f: -f.score)
        return out


# ------------------------------------------------------------------------------------------ embedding
def build_facenet(repeats: Sequence[int] = FULL_REPEATS, device: str | torch.device | None = None) -> torch.nn.Module:
    """An InceptionResnetV1 (embedding output) with ``repeats`` Block35/Block17/Block8 blocks.
    ``device="meta"`` skips the random initialisation (for loading weights with ``assign=True``)."""
    import torch

    fp = _facenet_pytorch(EMBEDDER_WHAT)
    with torch.device(device or "cpu"):
        model = fp.InceptionResnetV1(pretrained=None, classify=False)
    repeats = [int(r) for r in repeats]
    if len(repeats) != 3 or any(not 0 <= r <= full for r, full in zip(repeats, FULL_REPEATS, strict=True)):
        raise FaceError(f"{EMBEDDER_WHAT}: repeats must be three counts within {list(FULL_REPEATS)}, got {repeats}")
    for name, count in zip(("repeat_1", "repeat_2", "repeat_3"), repeats, strict=True):
        setattr(model, name, torch.nn.Sequential(*list(getattr(model, name))[:count]))
    return model


def _torch_home() -> Path:
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))))


def pretrained_cache_file(name: str) -> Path:
    """Where facenet-pytorch keeps the released weights ``name`` (``vggface2``, ``casia-webface``)."""
    return _torch_home() / "checkpoints" / os.path.basename(PRETRAINED_URLS[name])


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise FaceError(f"{EMBEDDER_WHAT}: {path} does not hold a state dict")
    return state


def resolve_facenet(model: str) -> tuple[Path, str]:
    """``(path, kind)`` with kind ``"file"`` (a full-architecture state dict) or ``"folder"``."""
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"{EMBEDDER_WHAT}: no model given (got {model!r}); set evaluation.face_embedder")
    if model in PRETRAINED_URLS:
        cached = pretrained_cache_file(model)
        if cached.is_file():
            return cached, "file"
        how = (f"How to get it: run once with network access (unset HF_HUB_OFFLINE) so facenet-pytorch downloads "
               f"it, or download {PRETRAINED_URLS[model]} to {cached} (TORCH_HOME moves that folder).")
        if hub_offline():
            raise ModelNotFoundError(f"{EMBEDDER_WHAT}: weights {model!r} are not downloaded and the hub is switched "
                                     f"off (HF_HUB_OFFLINE=1).\nLooked in: {cached}.\n{how}")
        from facenet_pytorch.models.utils.download import download_url_to_file

        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            download_url_to_file(PRETRAINED_URLS[model], str(cached))
        except Exception as e:  # network failures come in many types
            raise ModelNotFoundError(f"{EMBEDDER_WHAT}: could not download {model!r} ({e}).\n{how}") from None
        return cached, "file"
    path = Path(model).expanduser()
    if path.is_file():
        return path, "file"
    if path.is_dir() or looks_like_path(model):
        folder = Path(resolve_model(model, EMBEDDER_WHAT))
    else:
        resolved = resolve_model(model, EMBEDDER_WHAT, weights_only=True)  # a hub id: the cached snapshot offline
        if not Path(resolved).is_dir():
            from huggingface_hub import snapshot_download

            resolved = snapshot_download(resolved)
        folder = Path(resolved)
    if not (folder / FACENET_CONFIG).is_file() or not (folder / FACENET_WEIGHTS).is_file():
        raise ModelNotFoundError(
            f"{EMBEDDER_WHAT}: model {model!r} not found: {folder.resolve()} lacks {FACENET_CONFIG} or "
            f"{FACENET_WEIGHTS}.\nHow to get it: name 'vggface2' (facenet-pytorch's weights), a state-dict file, or "
            f"for the tiny profile build the tiny models (`subject-ffhq tiny-models DIR`, "
            f"`export SUBJECT_FFHQ_TINY_MODELS=DIR`).")
    return folder, "folder"


class FaceEmbedder:
    """FaceNet: ``embed(faces)`` -> ``N x 512`` L2-normalised float32 embeddings (cosine = dot product)."""

    def __init__(self, model: str = "vggface2", device: str | None = None, batch_size: int = 64):
        import torch

        path, kind = resolve_facenet(model)
        self.model_ref = model
        self.device = torch.device(pick_device(device))
        self.batch_size = int(batch_size)
        self.config: dict[str, Any] = {"repeats": list(FULL_REPEATS), "image_size": 160}
        if kind == "folder":
            from safetensors.torch import load_file

            self.config.update(json.loads((path / FACENET_CONFIG).read_text()))
            state = load_file(path / FACENET_WEIGHTS)
        else:
            state = _read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}  # the classifier head is unused
        self.model = build_facenet(self.config["repeats"], device="meta")
        try:
            self.model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise FaceError(f"{EMBEDDER_WHAT}: {path} does not fit InceptionResnetV1 with repeats "
                            f"{self.config['repeats']}: {str(e).splitlines()[0]}") from None
        self.model.float().eval().to(self.device)
        self.image_size = int(self.config["image_size"])

    @_no_grad
    def embed(self, faces: Sequence[Face] | torch.Tensor) -> np.ndarray:
        import torch

        crops = faces if isinstance(faces, torch.Tensor) else [f.crop for f in faces]
        if len(crops) == 0:
            return np.zeros((0, 512), dtype=np.float32)
        batch = crops if isinstance(crops, torch.Tensor) else torch.stack(list(crops))
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise FaceError(f"{EMBEDDER_WHAT}: face crops must be N x 3 x S x S, got {tuple(batch.shape)}")
        if batch.shape[-1] != self.image_size or batch.shape[-2] != self.image_size:
            batch = torch.nn.functional.interpolate(batch, size=(self.image_size, self.image_size), mode="bilinear",
                                                    align_corners=False, antialias=True)
        out = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size].to(self.device, torch.float32)
            out.append(self.model(chunk).float().cpu())
        vectors = torch.cat(out)
        return torch.nn.functional.normalize(vectors, dim=1).numpy()
