"""The stage actors: long-lived Ray actors that each hold one stage's model(s) from ``datagen``.

Ray's batch-inference pattern: an actor loads its model once in ``__init__`` (on the GPU share
Ray gave it, or the CPU) and then serves calls, one chunk of a shard per call; tasks move the
data between them. Each call splits its chunk into the stage's own ``batch_size`` batches.

* :class:`CaptionerActor` — BLIP-2 captions (and the caption's quality flags);
* :class:`SegmenterActor` — Mask2Former panoptic segmentation;
* :class:`MatcherActor` — spaCy noun phrases (cheap, CPU, so they run here rather than in a
  separate pool) and the CLIP × SBERT greedy match.

Each call runs its stage through :func:`datagen.stages.failures.in_batches`, so one image the
model cannot handle fails alone (see there).

The classes are plain; ``ray_jobs.pool`` makes them Ray actors with their placement.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from datagen.config import CaptionerSettings, MatcherSettings, PhrasesSettings, SegmenterSettings
from datagen.stages.failures import StageFailure, in_batches
from ray_jobs.chunks import LoadedChunk


def actor_device() -> str:
    """``cuda`` when Ray gave this actor a GPU (share), else ``cpu``. Outside Ray (an actor class
    used in-process): the default device."""
    import ray

    if not ray.is_initialized():
        from datagen.stages.model_loading import pick_device

        return pick_device()
    return "cuda" if ray.get_gpu_ids() else "cpu"


def segmenter_labels(segmenter: SegmenterSettings) -> list[str]:
    """Every label the profile's segmenter can emit (its config's ``id2label``), sorted."""
    from transformers import AutoConfig

    from datagen.stages.model_loading import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(segmenter.model, "segmenter (label set)"))
    return sorted({str(v) for v in config.id2label.values()})


class _StageActor:
    stage = ""

    def __init__(self, batch_size: int):
        self.device = actor_device()
        self.batch_size = batch_size  # images per stage call; the stage's section says how many
        self.images = 0
        self.busy_seconds = 0.0

    def ready(self) -> dict[str, Any]:
        """Where this actor runs; answering at all means its model(s) loaded."""
        import ray

        ctx = ray.get_runtime_context()
        return {"stage": self.stage, "node_id": ctx.get_node_id(), "pid": os.getpid(), "device": self.device}

    def stats(self) -> dict[str, Any]:
        """Images processed and seconds spent in calls since start: the stage's own rate."""
        return {"stage": self.stage, "images": self.images, "busy_seconds": self.busy_seconds}

    def _timed(self, n_images: int, run: Callable[[], list]) -> list:
        t = time.perf_counter()
        out = run()
        self.busy_seconds += time.perf_counter() - t
        self.images += n_images
        return out


class CaptionerActor(_StageActor):
    stage = "captioner"

    def __init__(self, section: CaptionerSettings):
        super().__init__(section.batch_size)
        from datagen.stages.captioner import Captioner, caption_flags

        self.captioner = Captioner(section, self.device)
        self.caption_flags = caption_flags

    def caption(self, chunk: LoadedChunk) -> list:
        """``(caption, flags)`` or a :class:`StageFailure` per loaded image of the chunk."""

        def run(images: list) -> list:
            return [(c, list(self.caption_flags(c))) for c in self.captioner.caption(images)]

        return self._timed(len(chunk.loaded), lambda: in_batches(self.stage, run, chunk.images, _labels(chunk), self.batch_size))


class SegmenterActor(_StageActor):
    stage = "segmenter"

    def __init__(self, section: SegmenterSettings):
        super().__init__(section.batch_size)
        from datagen.stages.segmenter import PanopticSegmenter

        self.segmenter = PanopticSegmenter(section, self.device)

    def segment(self, chunk: LoadedChunk) -> list:
        """A ``PanopticResult`` or a :class:`StageFailure` per loaded image of the chunk."""
        return self._timed(
            len(chunk.loaded),
            lambda: in_batches(self.stage, self.segmenter.segment, chunk.images, _labels(chunk), self.batch_size),
        )


class MatcherActor(_StageActor):
    """Runs the phrase chunker and the matcher. At start-up it fills the matcher's label-embedding
    cache with the segmenter's whole label set, so no image pays for a label's first encoding.
    (The matcher encodes each label on its own, so scores never depend on which images an actor
    saw before: a resumed or retried shard is byte-identical to an uninterrupted one.)"""

    stage = "matcher"

    def __init__(self, section: MatcherSettings, phrases: PhrasesSettings, segmenter: SegmenterSettings):
        super().__init__(section.batch_size)
        from datagen.stages.matcher import Matcher
        from datagen.stages.phrases import PhraseChunker

        self.chunker = PhraseChunker(phrases)
        self.matcher = Matcher(section, self.device)
        self.matcher.label_embeddings(segmenter_labels(segmenter))

    def match(self, chunk: LoadedChunk, captions: list, panoptic: list) -> list:
        """``(chunked caption, MatchResult)`` or a :class:`StageFailure` per loaded image.

        An image whose caption or segmentation failed keeps that failure."""
        out: list = [None] * len(chunk.loaded)
        todo, labels = [], []
        for i, (li, cap, pan) in enumerate(zip(chunk.loaded, captions, panoptic, strict=True)):
            failure = cap if isinstance(cap, StageFailure) else pan if isinstance(pan, StageFailure) else None
            if failure is not None:
                out[i] = failure
            else:
                todo.append((i, li.image, cap[0], pan))
                labels.append(li.item.rel_path)

        def run(batch: list) -> list:
            chunked = self.chunker.chunk([caption for _, _, caption, _ in batch])
            matches = self.matcher.match([img for _, img, _, _ in batch], [pan for *_, pan in batch], chunked)
            return list(zip(chunked, matches, strict=True))

        results = self._timed(len(todo), lambda: in_batches("phrases/matcher", run, todo, labels, self.batch_size))
        for (i, *_), result in zip(todo, results, strict=True):
            out[i] = result
        return out


def _labels(chunk: LoadedChunk) -> list[str]:
    return [li.item.rel_path for li in chunk.loaded]
