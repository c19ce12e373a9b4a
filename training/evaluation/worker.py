"""Generate and score a batch of units: what runs in-process, or inside a Ray actor, once per worker.

A :class:`Worker` loads the trained sampler, the text-only baseline sampler (the base Stable
Diffusion of the same checkpoint, no subject conditioning), the face detector and embedder and the
CLIP scorer once, then turns :class:`~training.evaluation.protocol.Unit` s into table rows plus the
PNG bytes of each image. Everything it needs travels in :class:`WorkerSettings` (plain data: photo
bytes and reference embeddings, not paths), so a worker on another machine needs no shared files
besides the models.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from datagen.config import EvaluationSettings
from training.evaluation.protocol import BASELINE, Unit

if TYPE_CHECKING:
    from training.evaluation.scoring import EvaluationModels


@dataclass
class WorkerSettings:
    checkpoint: str
    pretrained: str | None
    image_encoder: str | None
    photos: dict[str, bytes]  # subject -> the conditioning photo, encoded
    references: dict[str, list[float]]  # subject -> reference face embedding
    multi: bool
    resolution: int | None
    baseline: bool
    # the profile's evaluation section, the command's options applied: the models and steps, guidance, alpha
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    device: str | None = None
    threads: int | None = None


def load_baseline_sampler(checkpoint: str, pretrained: str | None, image_encoder: str | None, device: str):
    """The project's sampler on the checkpoint's *base* models: the text-only Stable Diffusion baseline."""
    from training.checkpoint import read_state
    from training.config import TrainConfig
    from training.model import FastComposerModel
    from training.sampler import FastComposerSampler, resolve_checkpoint

    cfg = TrainConfig.from_dict(read_state(resolve_checkpoint(checkpoint))["config"])
    components = FastComposerModel.from_pretrained(pretrained or cfg.pretrained, image_encoder or cfg.image_encoder,
                                                   localization_layers=())
    components.model.to(device)
    return FastComposerSampler(components.model, components.tokenizer, components.subject_size, device,
                               cfg.resolution)


class Worker:
    """``models``: the driver's scoring models, when it runs the worker in-process; else built here."""

    def __init__(self, settings: WorkerSettings, models: EvaluationModels | None = None):
        import torch

        from datagen.stages.model_loading import pick_device
        from training.evaluation.scoring import EvaluationModels, IdentityScorer
        from training.sampler import FastComposerSampler, Subject

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        device = pick_device(settings.device)
        self.sampler = FastComposerSampler.from_checkpoint(settings.checkpoint, device, settings.pretrained,
                                                           settings.image_encoder)
        self.baseline = (load_baseline_sampler(settings.checkpoint, settings.pretrained, settings.image_encoder, device)
                         if settings.baseline else None)
        models = models or EvaluationModels.load(settings.evaluation, device)
        references = {k: np.asarray(v, dtype=np.float32) for k, v in settings.references.items()}
        self.identity = IdentityScorer(models.detector, models.embedder, references, settings.evaluation.face_choice)
        self.prompt = models.prompt
        self.subjects = {}
        for name, data in settings.photos.items():
            with Image.open(io.BytesIO(data)) as im:
                self.subjects[name] = im.convert("RGB")
        self._subject = Subject

    def generate(self, unit: Unit) -> Image.Image:
        s, protocol = self.settings, self.settings.evaluation
        kwargs = {"steps": protocol.steps, "guidance_scale": protocol.guidance_scale, "alpha": protocol.alpha,
                  "seed": unit.seed, "resolution": s.resolution}
        if unit.method == BASELINE:
            return self.baseline.generate(unit.text, [], **kwargs)
        subjects = [self._subject(word, self.subjects[name]) for name, word in zip(unit.subjects, unit.words, strict=True)]
        return self.sampler.generate(unit.text, subjects, **kwargs)

    def run(self, units: list[Unit]) -> list[tuple[dict[str, Any], bytes]]:
        images, files, seconds = [], [], []
        for unit in units:
            start = time.perf_counter()
            image, data = encode_image(self.generate(unit), self.settings.evaluation)
            images.append(image)
            files.append(data)
            seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        identity = self.identity(images, [u.subjects for u in units], self.settings.multi)
        prompt = self.prompt(images, [u.text for u in units])
        score_seconds = (time.perf_counter() - start) / max(1, len(units))
        out = []
        for unit, data, gen_s, ident, consistency in zip(units, files, seconds, identity, prompt, strict=True):
            row = {**unit.to_dict(), **ident, "prompt_consistency": float(consistency),
                   "seconds_generate": round(gen_s, 4), "seconds_score": round(score_seconds, 4)}
            out.append((row, data))
        return out


def encode_image(image: Image.Image, protocol: EvaluationSettings) -> tuple[Image.Image, bytes]:
    """The file a generated image is saved as, and the image the scores are taken on: the same pixels.
    PNG: lossless, the image itself. JPEG (the released protocol: PIL's default quality 75, as the
    released script's ``save(... .jpg)``): the decoded JPEG, as the released script scores the files."""
    buf = io.BytesIO()
    if protocol.image_format == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=protocol.jpeg_quality)
        with Image.open(io.BytesIO(buf.getvalue())) as decoded:
            return decoded.convert("RGB"), buf.getvalue()
    image.save(buf, format="PNG")
    return image, buf.getvalue()
