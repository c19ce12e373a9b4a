"""Captioning stage: BLIP-2 captions for a batch of images (DESIGN §3, step 1).

``Captioner`` takes the profile's typed ``captioner`` section (:class:`datagen.config.CaptionerSettings`:
its keys and defaults), loads the model it names (a hub id such as ``Salesforce/blip2-opt-6.7b-coco``
or a local folder such as the tiny model) through :func:`~datagen.stages.model_loading.resolve_model`,
so both go through one path, and generates ``max_new_tokens`` at most, ``num_beams`` wide (never
sampled), ``batch_size`` images per ``generate`` call (results do not depend on it).

Captions are cleaned (:func:`clean_caption`); an empty or degenerate caption is returned as is and
flagged by :func:`caption_flags`, never raised on, so the record can say what happened.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from PIL import Image

from datagen.config import CaptionerSettings
from datagen.stages.model_loading import load_pretrained, pick_device
from datagen.stages.step import ImageModelStep

WHAT = "captioner (BLIP-2)"
FLAG_EMPTY = "empty"
FLAG_DEGENERATE = "degenerate"

_WS = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")
_REPEATED_PIECE = re.compile(r"([^\W\d_]{1,8}?)\1{3,}")


def clean_caption(text: str, special_tokens: Iterable[str] = ()) -> str:
    """Remove special-token strings, control characters and U+FFFD (bytes that did not decode),
    collapse runs of whitespace to one space, and strip both ends."""
    for token in special_tokens:
        if token:
            text = text.replace(token, " ")
    text = "".join(
        " " if (unicodedata.category(ch) in ("Cc", "Cf") or ch == "\ufffd") else ch for ch in text
    )
    return _WS.sub(" ", text).strip()


def caption_flags(caption: str) -> list[str]:
    """Quality flags of a cleaned caption, for the record's ``caption_flags``.

    * ``"empty"``: nothing is left after cleaning.
    * ``"degenerate"``: a caption no one would write, by any of these rules:
      it has no letter at all (``"1 2 3"``, ``"..."``); the same word appears three or more times
      in a row (``"a table table table"``); one word makes up more than half of a caption of at
      least four words (``"dog a dog the dog dog"``); or a word holds a short piece of letters
      (1–8) four or more times in a row (``"okokokok"``, ``"QQQQ"``, ``"ssesssesssessses"``).
      Words are compared lower-cased with surrounding punctuation removed.

    A caption that is fine gets ``[]``.
    """
    if not caption.strip():
        return [FLAG_EMPTY]
    if not _LETTER.search(caption):
        return [FLAG_DEGENERATE]
    words = [w for w in (w.strip(".,;:!?\"'()[]").lower() for w in caption.split()) if w]
    if not words:
        return [FLAG_DEGENERATE]
    run = 1
    for prev, cur in zip(words, words[1:], strict=False):
        run = run + 1 if cur == prev else 1
        if run >= 3:
            return [FLAG_DEGENERATE]
    if len(words) >= 4 and Counter(words).most_common(1)[0][1] * 2 > len(words):
        return [FLAG_DEGENERATE]
    if any(_REPEATED_PIECE.search(w) for w in words):
        return [FLAG_DEGENERATE]
    return []


class Captioner:
    """BLIP-2 captioning: ``caption(images) -> list[str]`` (one cleaned caption per image)."""

    def __init__(self, section: CaptionerSettings, device: str | None = None):
        """Load the model of a profile's ``captioner`` section on ``device`` (else ``section.device``,
        else CUDA when visible)."""
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        self.model_id = section.model
        self.batch_size = section.batch_size
        self.max_new_tokens = section.max_new_tokens
        self.num_beams = section.num_beams
        self.device = pick_device(device or section.device)
        self.processor, self.model, self.dtype = load_pretrained(
            section.model, WHAT, AutoProcessor, Blip2ForConditionalGeneration, self.device, section.dtype
        )
        tokenizer = self.processor.tokenizer
        self._special = sorted(set(tokenizer.all_special_tokens) | {"<image>"}, key=len, reverse=True)

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One cleaned caption per image, in order, generated ``batch_size`` images at a time."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            captions.extend(self._caption_batch(images[start:start + self.batch_size]))
        return captions

    def _caption_batch(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        inputs = self.processor(images=rgb, return_tensors="pt").to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,
            )
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [clean_caption(t, self._special) for t in texts]


class CaptionStep(ImageModelStep):
    """The build's captioner stage: ``(caption, flags)`` per image (or a ``StageFailure``)."""

    name, what = "captioner", WHAT

    def __init__(self, profile, device: str):
        super().__init__(profile, device)
        self.captioner = Captioner(profile.captioner, device)

    def run_model(self, images: list) -> list:
        return [(c, list(caption_flags(c))) for c in self.captioner.caption(images)]
