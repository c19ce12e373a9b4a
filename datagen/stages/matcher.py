"""Match noun phrases to panoptic segments: CLIP × Sentence-BERT scores, greedy assignment (DESIGN §3.4).

For every image, with ``P`` phrases (rows) and ``S`` segments (columns, in the segmenter's order):

* ``clip[p, s]``  = cosine of the OpenCLIP text embedding of phrase ``p`` and the OpenCLIP image
  embedding of segment ``s``'s crop (both L2-normalised);
* ``sbert[p, s]`` = cosine of the Sentence-Transformers embeddings of phrase ``p`` and of segment
  ``s``'s COCO label (e.g. ``"person"``, ``"wall-other-merged"``; the label string as the
  segmenter gives it);
* ``product = clip * sbert`` (elementwise, as the paper defines the score; no clamping — with real
  CLIP both cosines are positive for any plausible pair, a negative SBERT cosine gives a negative
  score that the profile's ``min_score: 0.0`` keeps out; the random tiny CLIP gives cosines of
  either sign, so tiny-profile matches are plumbing, not meaning);
* ``pairs = greedy_match(product, min_score)``, reported as ``(phrase index, segment id)``: a pair
  is taken only if its product is ``>= min_score``; ``min_score: null`` in the profile means no
  threshold (stored as -1.0, the lowest possible product, so records hold a finite number).

**The crop of a segment** is the segment's ``bbox`` ``[x0, y0, x1, y1]`` cut from the image; inside
that box every pixel that is *not* in the segment's mask (``segment_map != id``) is replaced by a
neutral grey, the CLIP normalisation mean (RGB 123, 117, 104 for the OpenAI mean), which
normalises to ~0 and so carries no signal. The box is then padded to a square with the same grey, centred, so the model's
preprocess (resize shortest side + centre crop) never cuts part of the segment away, and goes
through the model's own OpenCLIP ``preprocess`` (resize to the model's input size, normalise).
:func:`datagen.stages.crops.segment_crop` is that function.

**Label embeddings** depend only on the label string and the model, so the :class:`Matcher` keeps
them in a per-instance cache (``label → normalised embedding``) and encodes a label only the first
time it is seen; phrase embeddings are computed once per call for each distinct phrase text.
CLIP image crops of all images of a call are batched together (``batch_size`` per forward).

**Models** are named in the profile's ``matcher`` section and loaded through one path:
OpenCLIP by built-in architecture + ``clip_pretrained`` tag (``ViT-H-14`` + ``laion2b_s32b_b79k``),
by ``hf-hub:org/repo``, by ``local-dir:FOLDER`` or by a plain folder holding
``open_clip_config.json``; Sentence-Transformers by hub id or folder. With the hub switched off
(``HF_HUB_OFFLINE=1``) a model that is not available locally fails at construction with
:class:`~datagen.stages.model_loading.ModelNotFoundError` naming the model, where it was looked for and
how to get it. A built-in OpenCLIP architecture without a ``clip_pretrained`` tag is refused:
random weights are never silently used in place of real ones.

:class:`Matcher` relies only on attributes of its inputs (``segment_map``, ``segments[i].id`` /
``.coco_label`` / ``.bbox``; ``phrases[i].text``); the build's stage, :class:`MatchStep`, also runs
the phrase chunker and reads the segmenter's label set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from datagen.config import MatcherSettings
from datagen.stages.crops import fill_colour, segment_crop
from datagen.stages.greedy import greedy_match
from datagen.stages.model_loading import (
    ModelNotFoundError,
    hub_offline,
    looks_like_path,
    pick_device,
    pick_dtype,
    resolve_model,
)
from datagen.stages.step import Step

CLIP_WHAT = "matcher image-text model (OpenCLIP)"
SBERT_WHAT = "matcher label-text model (Sentence-Transformers)"
OPEN_CLIP_CONFIG = "open_clip_config.json"


class MatchError(ValueError):
    """An input of :meth:`Matcher.match` is malformed. The message names the image and the segment."""


@dataclass
class MatchResult:
    """One image's match. Matrices are ``P x S``: rows = phrases (caption order), columns = ``segment_ids``."""

    segment_ids: list[int]
    clip: np.ndarray
    sbert: np.ndarray
    product: np.ndarray
    pairs: list[tuple[int, int]]  # (phrase index, segment id), in greedy pick order
    min_score: float

    def segment_scores(self, phrase: int, column: int) -> dict[str, float]:
        """The scores a matched segment keeps (record fields), for phrase row and segment column."""
        return {"match_score": self.product[phrase, column], "clip_sim": self.clip[phrase, column],
                "sbert_sim": self.sbert[phrase, column]}


def score_image(
    phrase_clip: np.ndarray,
    crop_clip: np.ndarray,
    phrase_sbert: np.ndarray,
    label_sbert: np.ndarray,
    segment_ids: Sequence[int],
    min_score: float,
) -> MatchResult:
    """Scores and greedy match of one image from normalised embeddings (no model forward here).

    ``phrase_clip`` P x Dc, ``crop_clip`` S x Dc, ``phrase_sbert`` P x Ds, ``label_sbert`` S x Ds.
    """
    clip = (phrase_clip @ crop_clip.T).astype(np.float32, copy=False)
    sbert = (phrase_sbert @ label_sbert.T).astype(np.float32, copy=False)
    product = clip * sbert
    ids = [int(s) for s in segment_ids]
    pairs = [(p, ids[s]) for p, s in greedy_match(product, min_score)]
    return MatchResult(segment_ids=ids, clip=clip, sbert=sbert, product=product, pairs=pairs, min_score=float(min_score))


def _check_segment(index: int, segment: Any, segment_map: np.ndarray) -> None:
    sid = getattr(segment, "id", None)
    bbox = getattr(segment, "bbox", None)
    height, width = segment_map.shape
    if not isinstance(sid, int | np.integer) or sid <= 0:
        raise MatchError(f"image {index}: segment id {sid!r} is not a positive integer")
    if bbox is None or len(bbox) != 4:
        raise MatchError(f"image {index}: segment {sid} has bbox {bbox!r}, not [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (int(v) for v in bbox)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise MatchError(f"image {index}: segment {sid} bbox {list(bbox)} is not a non-empty box inside the {width}x{height} image")
    if not (segment_map[y0:y1, x0:x1] == sid).any():
        raise MatchError(f"image {index}: segment {sid} has no pixel with its id inside its bbox {list(bbox)}")
    label = getattr(segment, "coco_label", None)
    if not isinstance(label, str) or not label:
        raise MatchError(f"image {index}: segment {sid} has coco_label {label!r}, not a non-empty string")


@dataclass
class MatchInputs:
    """What one :meth:`Matcher.match` call feeds the models, gathered from all its images.

    ``images[i]`` is ``(phrase texts, segment ids, segment labels)``; ``crops`` holds the crops of
    the images that have both phrases and segments, in image then segment order; ``texts`` and
    ``labels`` are the distinct phrase texts and labels of those images (sorted).
    """

    images: list[tuple[list[str], list[int], list[str]]]
    crops: list[np.ndarray]
    texts: list[str]
    labels: list[str]


def prepare_inputs(images: Sequence, panoptic: Sequence, chunked: Sequence, fill: np.ndarray) -> MatchInputs:
    """Check the inputs (raising :class:`MatchError` naming the image and segment) and cut the crops."""
    if not (len(images) == len(panoptic) == len(chunked)):
        raise MatchError(
            f"match needs one panoptic result and one chunked caption per image, got {len(images)} images, "
            f"{len(panoptic)} panoptic results, {len(chunked)} chunked captions"
        )
    crops: list[np.ndarray] = []
    per_image: list[tuple[list[str], list[int], list[str]]] = []
    for i, (image, pan, chunk) in enumerate(zip(images, panoptic, chunked, strict=True)):
        rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        seg_map = np.asarray(pan.segment_map)
        if seg_map.shape != rgb.shape[:2]:
            raise MatchError(
                f"image {i}: segment map is {seg_map.shape[1]}x{seg_map.shape[0]} (w x h), "
                f"image is {rgb.shape[1]}x{rgb.shape[0]}"
            )
        phrases = [p.text for p in chunk.phrases]
        segments = list(pan.segments)
        for s in segments:
            _check_segment(i, s, seg_map)
        ids = [int(s.id) for s in segments]
        if len(set(ids)) != len(ids):
            raise MatchError(f"image {i}: segment ids {ids} are not unique")
        if phrases and segments:  # crops are needed only when there is something to score
            crops.extend(segment_crop(rgb, seg_map, sid, s.bbox, fill) for sid, s in zip(ids, segments, strict=True))
        per_image.append((phrases, ids, [s.coco_label for s in segments]))
    scored = [(ph, labels) for ph, ids, labels in per_image if ph and ids]
    return MatchInputs(
        images=per_image,
        crops=crops,
        texts=sorted({t for ph, _ in scored for t in ph}),
        labels=sorted({label for _, labels in scored for label in labels}),
    )


def assemble_results(
    inputs: MatchInputs,
    phrase_clip: np.ndarray,
    phrase_sbert: np.ndarray,
    crop_clip: np.ndarray,
    label_sbert: dict[str, np.ndarray],
    min_score: float,
) -> list[MatchResult]:
    """Per-image scores and greedy matches from the embeddings of ``inputs.texts``, ``inputs.crops``
    and the labels (rows of ``phrase_*`` follow ``inputs.texts``; ``crop_clip`` follows ``inputs.crops``)."""
    text_row = {t: k for k, t in enumerate(inputs.texts)}
    results = []
    at = 0
    for phrases, ids, labels in inputs.images:
        if not (phrases and ids):
            empty = np.zeros((len(phrases), len(ids)), dtype=np.float32)
            results.append(MatchResult(ids, empty, empty.copy(), empty.copy(), [], float(min_score)))
            continue
        rows = [text_row[t] for t in phrases]
        results.append(
            score_image(
                phrase_clip[rows], crop_clip[at:at + len(ids)], phrase_sbert[rows],
                np.stack([label_sbert[label] for label in labels]), ids, min_score,
            )
        )
        at += len(ids)
    return results


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------
def resolve_open_clip(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """``(model_name, pretrained)`` for ``open_clip.create_model_and_transforms``; checks availability.

    Raises :class:`ModelNotFoundError` (folder missing; weights not cached while offline) or
    ``ValueError`` (unknown architecture or tag; a built-in architecture without a tag).
    """
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"{CLIP_WHAT}: no model given (got {model!r}); set matcher.clip_model in the profile")
    if model.startswith(("local-dir:", "hf-hub:")) or Path(model).expanduser().is_dir() or looks_like_path(model):
        if model.startswith("hf-hub:"):
            resolved = resolve_model(model[len("hf-hub:"):], CLIP_WHAT)  # offline: must be in the HF cache
            # offline, resolve_model hands back the cached snapshot folder: load that, as a local dir
            return (("local-dir:" + resolved) if Path(resolved).is_dir() else model), None
        folder = Path(model[len("local-dir:"):] if model.startswith("local-dir:") else model).expanduser()
        resolve_model("local-dir:" + str(folder), CLIP_WHAT)
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise ModelNotFoundError(
                f"{CLIP_WHAT}: model {model!r} not found: {folder.resolve()} has no {OPEN_CLIP_CONFIG}.\n"
                f"How to get it: for the tiny profile build the tiny models with `subject-ffhq tiny-models DIR` "
                f"and `export SUBJECT_FFHQ_TINY_MODELS=DIR`; otherwise point matcher.clip_model at an OpenCLIP "
                f"folder (open_clip_config.json + weights) or a built-in architecture with clip_pretrained."
            )
        return "local-dir:" + str(folder), None

    import open_clip  # only here: a slow import, not needed to check a folder

    name = model.replace("/", "-")
    if name not in open_clip.list_models():
        raise ValueError(
            f"{CLIP_WHAT}: {model!r} is neither an OpenCLIP architecture, 'hf-hub:org/repo', 'local-dir:FOLDER' "
            f"nor an existing folder"
        )
    if not pretrained:
        raise ValueError(
            f"{CLIP_WHAT}: {model!r} is an architecture without weights; set matcher.clip_pretrained to one of "
            f"{open_clip.list_pretrained_tags_by_model(name)} (random weights are never used silently)"
        )
    if os.path.isfile(pretrained):
        return name, pretrained
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise ValueError(
            f"{CLIP_WHAT}: clip_pretrained {pretrained!r} is neither a weights file nor a tag of {name}; "
            f"tags: {open_clip.list_pretrained_tags_by_model(name)}"
        )
    problem = activation_problem(name, pretrained)
    if problem:
        raise ValueError(f"{CLIP_WHAT}: {problem}")
    if hub_offline():
        if cfg.get("hf_hub"):
            repo_id = cfg["hf_hub"].rstrip("/")
            repo_id = repo_id if repo_id.count("/") == 1 else os.path.dirname(repo_id)
            resolve_model(repo_id, f"{CLIP_WHAT} {name} {pretrained}", weights_only=True)  # open_clip reads weights only
        elif cfg.get("url"):
            cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
            if not cached.is_file():
                raise ModelNotFoundError(
                    f"{CLIP_WHAT}: weights {name} {pretrained} are not downloaded and the hub is switched off "
                    f"(HF_HUB_OFFLINE=1).\nLooked in: {cached}.\nHow to get it: run once with network access "
                    f"(unset HF_HUB_OFFLINE), or download {cfg['url']} to {cached}."
                )
    return name, pretrained


def activation_problem(name: str, pretrained: str) -> str | None:
    """Why the architecture ``name`` cannot run the weights ``pretrained``, or None.

    OpenAI's CLIP weights (and a few others) were trained with QuickGELU; open_clip's plain
    architectures (``ViT-L-14``) build ``nn.GELU`` and only warn ("QuickGELU mismatch"), which shifts
    every embedding. The ``-quickgelu`` architectures build QuickGELU; the tag's config says which
    one its weights need."""
    import open_clip

    builds = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    needs = bool((open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu", False))
    if builds == needs:
        return None
    base = name.removesuffix("-quickgelu")
    fix = f"{base}-quickgelu" if needs else base
    act = {True: "QuickGELU", False: "nn.GELU"}
    return (f"{name} builds {act[builds]} but the {pretrained!r} weights were trained with {act[needs]}; "
            f"use the architecture {fix!r} (same weights, the right activation)")


def load_open_clip(model: str, pretrained: str | None, device: str):
    """``(model, preprocess, tokenizer)``: one loading path for hub names, tags and local folders."""
    import open_clip

    name, tag = resolve_open_clip(model, pretrained)
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device)
    clip.eval()
    return clip, preprocess, open_clip.get_tokenizer(name)


def load_sbert(model: str, device: str):
    """A SentenceTransformer from a hub id or a folder (checked by :func:`resolve_model`)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model(model, SBERT_WHAT), device=device)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
class MatcherModels(NamedTuple):
    """The loaded models a :class:`Matcher` scores with (several matchers may share them)."""

    clip: Any
    preprocess: Any
    tokenizer: Any
    sbert: Any


class Matcher:
    """Scores every (phrase, segment) pair of an image with CLIP × SBERT and matches greedily."""

    def __init__(self, section: MatcherSettings, device: str | None = None, models: MatcherModels | None = None):
        """Match with a profile's ``matcher`` section on ``device`` (else ``section.device``, else CUDA
        when visible), loading the models it names unless already-loaded ``models`` are given."""
        self.device = pick_device(device or section.device)
        self.dtype = pick_dtype(self.device, section.dtype)
        if models is None:
            # Check both models before loading either, so a missing one fails fast.
            resolve_open_clip(section.clip_model, section.clip_pretrained)
            resolve_model(section.sbert_model, SBERT_WHAT)
            models = MatcherModels(*load_open_clip(section.clip_model, section.clip_pretrained, self.device),
                                   load_sbert(section.sbert_model, self.device))
        self.models = models
        self.clip, self.preprocess, self.tokenizer, self.sbert = models
        self.batch_size = section.batch_size
        self.min_score = _min_score(section.min_score)
        mean = getattr(getattr(self.clip, "visual", None), "preprocess_cfg", {}).get("mean")
        self.fill = fill_colour(mean or (0.48145466, 0.4578275, 0.40821073))
        self._label_embeddings: dict[str, np.ndarray] = {}
        self.labels_encoded = 0  # how many label strings went through the SBERT model (cache misses)

    # ---- public --------------------------------------------------------------------------
    def match(self, images: Sequence, panoptic: Sequence, chunked: Sequence) -> list[MatchResult]:
        """One :class:`MatchResult` per image; inputs are parallel lists (PIL image, PanopticResult, ChunkedCaption)."""
        inputs = prepare_inputs(images, panoptic, chunked, self.fill)
        phrase_clip = self.encode_texts_clip(inputs.texts)
        phrase_sbert = self._encode_sbert(inputs.texts)
        crop_clip = self.encode_crops(inputs.crops)
        labels = self.label_embeddings(inputs.labels)
        return assemble_results(inputs, phrase_clip, phrase_sbert, crop_clip, labels, self.min_score)

    def label_embeddings(self, labels) -> dict[str, np.ndarray]:
        """Normalised SBERT embeddings of ``labels``; each label is encoded once per Matcher, then cached."""
        missing = sorted({label for label in labels if label not in self._label_embeddings})
        # One label per forward: an embedding must not depend on which other labels happened to be
        # new in the same call (batch shape shifts SBERT outputs ~1e-7), or a resumed run would not
        # reproduce an uninterrupted one byte for byte. At most 133 COCO labels, once per Matcher.
        for label in missing:
            self._label_embeddings[label] = self._encode_sbert([label])[0]
        self.labels_encoded += len(missing)
        return {label: self._label_embeddings[label] for label in labels}

    def encode_label_set(self, labels) -> None:
        """Fill the empty label cache with a whole label vocabulary (the segmenter's), ``batch_size``
        labels per forward in sorted order: each value then depends only on the set, so every Matcher
        given the same set holds the same embeddings (what byte-identical resumes need), at a fraction
        of the cost of one forward per label."""
        if self._label_embeddings:
            raise RuntimeError("encode_label_set fills an empty label cache; this Matcher has encoded labels already")
        ordered = sorted(set(labels))
        self._label_embeddings = dict(zip(ordered, self._encode_sbert(ordered), strict=True))
        self.labels_encoded += len(ordered)

    @property
    def cached_labels(self) -> list[str]:
        return sorted(self._label_embeddings)

    def encode_texts_clip(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised OpenCLIP text embeddings (N x D float32)."""
        import torch

        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        out = []
        for k in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[k:k + self.batch_size])).to(self.device)
            with torch.inference_mode(), self._autocast():
                out.append(self.clip.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out).numpy()

    def encode_crops(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Normalised OpenCLIP image embeddings of uint8 RGB crops (N x D float32), ``batch_size`` per forward."""
        import torch
        from PIL import Image

        if not crops:
            return np.zeros((0, 0), dtype=np.float32)
        out = []
        for k in range(0, len(crops), self.batch_size):
            batch = torch.stack([self.preprocess(Image.fromarray(c)) for c in crops[k:k + self.batch_size]])
            with torch.inference_mode(), self._autocast():
                out.append(self.clip.encode_image(batch.to(self.device), normalize=True).float().cpu())
        return torch.cat(out).numpy()

    # ---- internals -----------------------------------------------------------------------
    def _encode_sbert(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        emb = self.sbert.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)

    def _autocast(self):
        import contextlib

        import torch

        if str(self.device).startswith("cuda") and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


def _min_score(value: float | None) -> float:
    """``matcher.min_score`` from the profile. ``null`` means no threshold; it becomes -1.0, the lowest
    product two cosines can give, rather than -inf, so the value stays a finite number in records."""
    return -1.0 if value is None else float(value)


class MatchStep(Step):
    """The build's matcher stage: spaCy noun phrases of each caption (cheap, CPU, so they run here
    rather than as a stage of their own) and the CLIP × SBERT greedy match; ``(chunked caption,
    MatchResult)`` per image, or a ``StageFailure`` naming the ``phrases`` or ``matcher`` stage.

    At start-up it fills the matcher's label-embedding cache with the segmenter's whole label set
    (:meth:`Matcher.encode_label_set`), so no image pays for a label's first encoding and scores
    never depend on which images a worker saw before: a resumed or retried shard is byte-identical
    to an uninterrupted one."""

    name = "matcher"

    def __init__(self, profile, device: str):
        super().__init__(profile, device)
        from datagen.stages.phrases import PhraseChunker
        from datagen.stages.segmenter import segmenter_labels

        self.chunker = PhraseChunker(profile.phrases)
        self.matcher = Matcher(profile.matcher, device)
        self.matcher.encode_label_set(segmenter_labels(profile.segmenter))

    def process(self, loaded: list, captions: list, panoptic: list) -> list:
        from datagen.stages.failures import StageFailure, in_batches
        from datagen.stages.phrases import chunk_captions
        from datagen.stages.segmenter import probe_panoptic
        from datagen.stages.step import labels_of, probe_image

        labels, batch = labels_of(loaded), self.profile.matcher.batch_size
        out: list = chunk_captions(self.chunker, captions, labels)
        ok = [i for i, c in enumerate(out) if not isinstance(c, StageFailure)]

        def match(rows: list) -> list:
            matches = self.matcher.match([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            return [(r[2], m) for r, m in zip(rows, matches, strict=True)]

        probe = lambda: (probe_image(), probe_panoptic(), self.chunker.chunk(["a person"])[0])  # noqa: E731
        rows = [(loaded[i].image, panoptic[i], out[i]) for i in ok]
        for i, m in zip(ok, in_batches(self.name, match, rows, [labels[i] for i in ok], batch, probe), strict=True):
            out[i] = m
        return out

    @classmethod
    def model_ids(cls, profile) -> dict[str, str]:
        m = profile.matcher
        return {
            "phrases": profile.phrases.spacy_model,
            "clip": m.clip_model + (f":{m.clip_pretrained}" if m.clip_pretrained else ""),
            "sbert": m.sbert_model,
        }

    @classmethod
    def check_models(cls, profile) -> None:
        from datagen.stages.phrases import check_pipeline

        check_pipeline(profile.phrases.spacy_model)
        try:
            resolve_open_clip(profile.matcher.clip_model, profile.matcher.clip_pretrained)
        except ValueError as e:  # an unknown architecture or tag: as missing as a missing folder
            raise ModelNotFoundError(str(e)) from None
        resolve_model(profile.matcher.sbert_model, SBERT_WHAT)
