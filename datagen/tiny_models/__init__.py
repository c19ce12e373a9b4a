"""Small randomly initialised versions of every model the project loads, in their real formats.

``subject-ffhq tiny-models DIR`` (or :func:`build_all`) writes one folder per model under ``DIR``;
the ``tiny`` profile points at them through ``{tiny}``. Each folder is exactly what the real model's
loader reads (``save_pretrained`` folders, an OpenCLIP ``local-dir:`` folder, a diffusers-style
Stable Diffusion folder), so a hub id and a tiny folder go through one loading path.

=====================  =========================================================================
name                   what
=====================  =========================================================================
``blip2``              BLIP-2 captioner (``Blip2ForConditionalGeneration`` + ``Blip2Processor``)
``mask2former``        COCO-panoptic Mask2Former (133 labels) + ``Mask2FormerImageProcessor``
``open_clip``          OpenCLIP model (``open_clip_config.json`` + weights) for the matcher
``sbert``              Sentence-Transformers all-MiniLM-L6-v2 (real weights, from a package)
``stable-diffusion``   SD1.5-shaped U-Net, VAE, CLIP text encoder, tokenizer and scheduler
``clip-vision``        ``CLIPVisionModelWithProjection`` + image processor (trainer's encoder)
``facenet``            FaceNet InceptionResnetV1 with fewer blocks (evaluation's face embedder)
=====================  =========================================================================

A folder is finished when it holds ``.complete`` (written last). :func:`build_one` builds into a
temporary folder next to the target and renames it into place, so an interrupted build never
leaves a folder that looks finished; an unfinished one is rebuilt. :func:`random_weights` tells
whether a model reference points at one of these folders with random weights (every one but ``sbert``),
so that outputs made with them can say so.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

COMPLETE = ".complete"


def _blip2(dest: Path) -> None:
    from datagen.tiny_models.blip2 import build_blip2

    build_blip2(dest)


def _mask2former(dest: Path) -> None:
    from datagen.tiny_models.mask2former import build_mask2former

    build_mask2former(dest)


def _open_clip(dest: Path) -> None:
    from datagen.tiny_models.open_clip_model import build_open_clip

    build_open_clip(dest)


def _sbert(dest: Path) -> None:
    from datagen.tiny_models.sbert_model import build_sbert

    build_sbert(dest)


def _stable_diffusion(dest: Path) -> None:
    from datagen.tiny_models.stable_diffusion import build_stable_diffusion

    build_stable_diffusion(dest)


def _clip_vision(dest: Path) -> None:
    from datagen.tiny_models.clip_vision import build_clip_vision

    build_clip_vision(dest)


def _facenet(dest: Path) -> None:
    from datagen.tiny_models.facenet import build_facenet

    build_facenet(dest)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "blip2": _blip2,
    "mask2former": _mask2former,
    "open_clip": _open_clip,
    "sbert": _sbert,
    "stable-diffusion": _stable_diffusion,
    "clip-vision": _clip_vision,
    "facenet": _facenet,
}
REAL_WEIGHTS = {"sbert"}  # the real all-MiniLM-L6-v2 that a package ships


def random_weights(ref: str | Path | None) -> bool:
    """True when ``ref`` (a folder, ``local-dir:FOLDER``, or a path inside one) is a tiny model with
    random weights: a finished build whose ``.complete`` names a builder other than ``sbert``."""
    if not ref:
        return False
    text = str(ref)
    text = text[len("local-dir:"):] if text.startswith("local-dir:") else text
    path = Path(text).expanduser()
    for folder in (path, *path.parents[:2]):
        marker = folder / COMPLETE
        if marker.is_file():
            name = marker.read_text().strip()
            return name in BUILDERS and name not in REAL_WEIGHTS
    return False


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def build_one(name: str, root: Path, force: bool = False) -> Path:
    """Build the tiny model ``name`` into ``root/name`` unless it is already complete; return the folder."""
    if name not in BUILDERS:
        raise KeyError(f"no tiny model named {name!r}; known: {', '.join(BUILDERS)}")
    root = Path(root)
    target = root / name
    if is_complete(target) and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".building", dir=root))
    try:
        staged = work / name
        BUILDERS[name](staged)
        if not staged.is_dir() or not any(staged.iterdir()):
            raise RuntimeError(f"tiny model {name!r}: the builder wrote nothing into {staged}")
        if target.exists():
            shutil.rmtree(target)  # an unfinished earlier build (or force)
        staged.rename(target)
        (target / COMPLETE).write_text(f"{name}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def build_all(root: Path, names: list[str] | None = None, force: bool = False, log=print) -> dict[str, Path]:
    """Build every tiny model (or ``names``) under ``root``, printing progress; return name -> folder."""
    names = list(BUILDERS) if names is None else list(names)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise KeyError(f"no tiny model named {', '.join(map(repr, unknown))}; known: {', '.join(BUILDERS)}")
    built: dict[str, Path] = {}
    for i, name in enumerate(names, 1):
        target = Path(root) / name
        if is_complete(target) and not force:
            log(f"[{i}/{len(names)}] {name}: already built at {target}")
        else:
            log(f"[{i}/{len(names)}] {name}: building ...")
            start = time.perf_counter()
            build_one(name, root, force=force)
            log(f"[{i}/{len(names)}] {name}: {folder_size(target) / 1e6:.1f} MB in "
                f"{time.perf_counter() - start:.1f} s -> {target}")
        built[name] = target
    return built
