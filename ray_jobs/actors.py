"""The stage actors: long-lived Ray actors that each hold one stage's model(s) from ``datagen``.

Ray's batch-inference pattern: an actor loads its model once in ``__init__`` (on the GPU share
Ray gave it, or the CPU) and then serves calls, one chunk of a shard per call; tasks move the
data between them. Each call splits its chunk into the stage's own ``batch_size`` batches.

* :class:`CaptionerActor` — BLIP-2 captions (and the caption's quality flags);
* :class:`SegmenterActor` — Mask2Former panoptic segmentation;
* :class:`MatcherActor` — spaCy noun phrases (cheap, CPU, so they run here rather than in a
  separate pool) and the CLIP × SBERT greedy match;
* :class:`FaceCheckerActor` — MTCNN on every person segment and the face rect's covering segment
  (after the segmenter, next to the matcher).

Each call runs its stage through :func:`datagen.stages.failures.in_batches`, so one image the
model cannot handle fails alone (see there); each actor's ``probe`` is the known-good input that
tells a broken stage from bad images when every image of a batch fails.

The classes are plain; ``ray_jobs.pool`` makes them Ray actors with their placement.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from datagen.config import (
    CaptionerSettings,
    FacesSettings,
    MatcherSettings,
    PhrasesSettings,
    SegmenterSettings,
)
from datagen.stages.failures import StageFailure, in_batches
from ray_jobs.chunks import LoadedChunk

PROBE_SIZE = (64, 48)


def probe_image():
    """A plain grey picture every stage must handle: the known-good input of the probes."""
    from PIL import Image

    return Image.new("RGB", PROBE_SIZE, (128, 128, 128))


def probe_panoptic():
    """A segmentation of :func:`probe_image`: one ``person`` segment over all of it."""
    import numpy as np

    from datagen.stages.segmenter import PanopticResult, SegmentInfo

    w, h = PROBE_SIZE
    return PanopticResult(
        segment_map=np.ones((h, w), dtype=np.uint16),
        segments=[SegmentInfo(id=1, category_id=0, coco_label="person", is_thing=True, bbox=[0, 0, w, h], area=w * h, score=1.0)],
    )


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


def pin_torch_threads() -> int | None:
    """Inside a Ray actor: set torch's intra-op thread count to the actor's whole CPUs (at least 1),
    explicitly. Float sums depend on the thread count, and Ray only sets ``OMP_NUM_THREADS`` when
    the worker process has none, so a worker Ray reuses (a restarted actor) could carry another
    count; an explicit one makes a fresh and a restarted actor write the same bytes. Outside a Ray
    actor (the class used in-process, even with Ray started): leaves torch as it is, returns ``None``."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or 1
    threads = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


class _StageActor:
    stage = ""

    def __init__(self, batch_size: int):
        self.threads = pin_torch_threads()
        self.incarnation = uuid.uuid4().hex  # a restarted actor is a new one, its counts start at zero
        self.device = actor_device()
        self.batch_size = batch_size  # images per stage call; the stage's section says how many
        self.images = 0
        self.busy_seconds = 0.0

    def ready(self) -> dict[str, Any]:
        """Where this actor runs; answering at all means its model(s) loaded."""
        import ray

        ctx = ray.get_runtime_context()
        import torch

        return {
            "stage": self.stage, "node_id": ctx.get_node_id(), "pid": os.getpid(), "device": self.device,
            "torch_threads": torch.get_num_threads(),
        }

    def stats(self) -> dict[str, Any]:
        """Images processed and seconds spent in calls since (re)start: the stage's own rate."""
        return {"stage": self.stage, "incarnation": self.incarnation, "images": self.images, "busy_seconds": self.busy_seconds}

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

        return self._timed(
            len(chunk.loaded),
            lambda: in_batches(self.stage, run, chunk.images, _labels(chunk), self.batch_size, probe_image),
        )


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
            lambda: in_batches(
                self.stage, self.segmenter.segment, chunk.images, _labels(chunk), self.batch_size, probe_image
            ),
        )


class MatcherActor(_StageActor):
    """Runs the phrase chunker and the matcher. At start-up it fills the matcher's label-embedding
    cache with the segmenter's whole label set (:meth:`Matcher.encode_label_set`), so no image pays
    for a label's first encoding and scores never depend on which images an actor saw before: a
    resumed or retried shard is byte-identical to an uninterrupted one."""

    stage = "matcher"

    def __init__(self, section: MatcherSettings, phrases: PhrasesSettings, segmenter: SegmenterSettings):
        super().__init__(section.batch_size)
        from datagen.stages.matcher import Matcher
        from datagen.stages.phrases import PhraseChunker

        self.chunker = PhraseChunker(phrases)
        self.matcher = Matcher(section, self.device)
        self.matcher.encode_label_set(segmenter_labels(segmenter))

    def match(self, chunk: LoadedChunk, captions: list, panoptic: list) -> list:
        """``(chunked caption, MatchResult)`` or a :class:`StageFailure` per loaded image.

        An image whose caption or segmentation failed keeps that failure; one whose noun phrases
        or match failed gets a failure naming the ``phrases`` or ``matcher`` stage."""
        out: list = [None] * len(chunk.loaded)
        todo, labels = [], []
        for i, (li, cap, pan) in enumerate(zip(chunk.loaded, captions, panoptic, strict=True)):
            failure = cap if isinstance(cap, StageFailure) else pan if isinstance(pan, StageFailure) else None
            if failure is not None:
                out[i] = failure
            else:
                todo.append((i, li.image, cap[0], pan))
                labels.append(li.item.rel_path)

        def run() -> list:
            chunked = in_batches(
                "phrases", self.chunker.chunk, [caption for *_, caption, _ in todo], labels, self.batch_size,
                lambda: "a person",
            )
            for (i, *_), c in zip(todo, chunked, strict=True):
                if isinstance(c, StageFailure):
                    out[i] = c
            ok = [(t, c, label) for t, c, label in zip(todo, chunked, labels, strict=True) if not isinstance(c, StageFailure)]

            def match(batch: list) -> list:
                matches = self.matcher.match([t[1] for t, _ in batch], [t[3] for t, _ in batch], [c for _, c in batch])
                return [(c, m) for (_, c), m in zip(batch, matches, strict=True)]

            def probe() -> tuple:
                return ((-1, probe_image(), "a person", probe_panoptic()), self.chunker.chunk(["a person"])[0])

            matched = in_batches(
                self.stage, match, [(t, c) for t, c, _ in ok], [label for *_, label in ok], self.batch_size, probe
            )
            for (t, _, _), m in zip(ok, matched, strict=True):
                out[t[0]] = m
            return out

        return self._timed(len(todo), run)


class FaceCheckerActor(_StageActor):
    """The face checks of :mod:`datagen.stages.face_checker`. The checker batches person-segment crops
    itself (``faces.batch_size`` per MTCNN call), so a chunk is one call; an image fails alone."""

    stage = "faces"

    def __init__(self, section: FacesSettings):
        super().__init__(section.batch_size)
        from datagen.stages.face_checker import FaceChecker

        self.checker = FaceChecker(section, self.device)

    def check(self, chunk: LoadedChunk, panoptic: list) -> list:
        """A ``FaceCheck`` or a :class:`StageFailure` per loaded image; an image whose segmentation
        failed keeps that failure. The face rect (FFHQ-wild metadata) is scaled to the stored image."""
        from datagen.stages.face_checker import stored_rect

        out: list = list(panoptic)
        todo, inputs, labels = [], [], []
        for i, (li, pan) in enumerate(zip(chunk.loaded, panoptic, strict=True)):
            if isinstance(pan, StageFailure):
                continue
            todo.append(i)
            inputs.append((li.image, pan, stored_rect((li.item.meta or {}).get("face_rect"), li.original_size, li.image.size)))
            labels.append(li.item.rel_path)

        def run(batch: list) -> list:
            return self.checker.check(*(list(column) for column in zip(*batch, strict=True)))

        def checked() -> list:
            results = in_batches(self.stage, run, inputs, labels, max(1, len(inputs)),
                                 lambda: (probe_image(), probe_panoptic(), None))
            for i, r in zip(todo, results, strict=True):
                out[i] = r
            return out

        return self._timed(len(todo), checked)


def _labels(chunk: LoadedChunk) -> list[str]:
    return [li.item.rel_path for li in chunk.loaded]
