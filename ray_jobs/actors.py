"""The stage actor: a long-lived Ray actor that holds one stage's step (its models) from ``datagen``.

Ray's batch-inference pattern: an actor builds its stage's :class:`~datagen.stages.step.Step` once
in ``__init__`` (on the GPU share Ray gave it, or the CPU) and then serves calls, one chunk of a
shard per call; tasks move the data between actors. Which step, with which earlier outputs, is the
stage table's row (:mod:`datagen.stage_table`); one actor class serves every stage.

The class is plain; ``ray_jobs.pool`` makes it a Ray actor with the stage's placement, and tests use
it in-process.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from datagen.config import Profile
from datagen.stage_table import Stage
from ray_jobs.chunks import LoadedChunk


def actor_device() -> str:
    """``cuda`` when Ray gave this actor a GPU (share), else ``cpu``. Outside Ray (the actor class
    used in-process): the default device."""
    import ray

    if not ray.is_initialized():
        from datagen.stages.model_loading import pick_device

        return pick_device()
    return "cuda" if ray.get_gpu_ids() else "cpu"


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


class StageActor:
    """One stage of the build: ``run(chunk, *earlier outputs)`` -> one result per loaded image."""

    def __init__(self, stage: Stage, profile: Profile):
        self.threads = pin_torch_threads()
        self.incarnation = uuid.uuid4().hex  # a restarted actor is a new one, its counts start at zero
        self.device = actor_device()
        self.stage = stage.name
        self.row = stage
        self.step = stage.step_class()(profile, self.device)
        self.busy_seconds = 0.0

    def run(self, chunk: LoadedChunk, *earlier: list) -> list:
        """The step over the chunk's loaded images; an image an earlier stage failed keeps that failure."""
        t = time.perf_counter()
        earlier = tuple(self.row.inputs(earlier))  # a providing row's outputs in the shape the step takes
        out = self.step.run(chunk.loaded, *earlier)
        self.busy_seconds += time.perf_counter() - t
        return out

    def ready(self) -> dict[str, Any]:
        """Where this actor runs; answering at all means its model(s) loaded."""
        import ray
        import torch

        ctx = ray.get_runtime_context()
        return {
            "stage": self.stage, "node_id": ctx.get_node_id(), "pid": os.getpid(), "device": self.device,
            "torch_threads": torch.get_num_threads(),
        }

    def stats(self) -> dict[str, Any]:
        """Images processed and seconds spent in calls since (re)start: the stage's own rate."""
        return {"stage": self.stage, "incarnation": self.incarnation, "images": self.step.images, "busy_seconds": self.busy_seconds}
