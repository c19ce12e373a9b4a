"""The streaming scheduler: shards through load tasks, the stage actors, encode and write tasks.

Per shard, for each chunk of its items, the stage table (:mod:`datagen.stage_table`) read top to
bottom::

    load_chunk (CPU task) ──► captioner ──┐
                        └──► segmenter ──┴─► matcher (captions, segments) ──┬─► encode_chunk (CPU task)
                                    ├──────► faces (segments) ─────────────┤
                                    └──────► identity (segments) ──────────┘

(``grounding: sam3``: one ``sam3`` row, taking the captions, stands in for segmenter and matcher)
and, once every chunk is encoded, ``write_shard_tar`` (CPU task) writes the tar. The whole graph of
a chunk is submitted at once as object refs (Ray moves the data; nothing passes through the
driver), and two bounds keep memory flat whatever the source size: at most
``max_shards_in_flight`` shards are open, and at most ``max_chunks_in_flight`` chunks are between
loading and encoding (encoded chunks are compact).

A shard whose graph fails is tried again whole, up to ``shard_attempts`` times (a dead actor is
replaced first); :meth:`ShardScheduler.stream` yields each shard once, when it is written or out of
attempts, and the job records it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from datagen.shards.plan import ShardSpec
from datagen.sources.items import SourceItem
from datagen.stage_table import Stage
from ray_jobs import tasks
from ray_jobs.pool import StagePool, root_cause
from ray_jobs.progress import ProgressReporter
from ray_jobs.settings import BuildSettings


@dataclass
class ShardWork:
    spec: ShardSpec
    attempt: int
    chunks: list[list[SourceItem]]
    started: float = field(default_factory=time.monotonic)
    next_chunk: int = 0
    encoded: list = field(default_factory=list)
    write_ref: Any = None


@dataclass
class ShardOutcome:
    """A shard the scheduler is done with: ``written`` (what the write task returned) or ``error``."""

    spec: ShardSpec
    attempt: int
    seconds: float
    written: dict[str, Any] | None = None
    error: str | None = None


class ShardScheduler:
    def __init__(self, settings: BuildSettings, stages: tuple[Stage, ...], pools: dict[str, StagePool],
                 models: dict[str, str], tar_path: Callable[[ShardSpec], Path], write_task: Callable,
                 progress: ProgressReporter):
        s = self.settings = settings
        self.stages, self.pools, self.models, self.tar_path, self.progress = stages, pools, models, tar_path, progress
        opts = dict(num_cpus=s.task_num_cpus, max_retries=s.task_max_retries, scheduling_strategy=s.scheduling_strategy)
        self.load = ray.remote(tasks.load_chunk).options(**opts)
        self.encode = ray.remote(tasks.encode_chunk).options(**opts)
        self.write = ray.remote(write_task).options(**opts)
        self.retries = 0

    def stream(self, todo: list[ShardSpec]) -> Iterator[ShardOutcome]:
        """Run ``todo``; yield each shard's outcome as it ends. Closing the iterator early (an
        interrupt) cancels whatever is still in flight."""
        s = self.settings
        pending: deque[tuple[ShardSpec, int]] = deque((spec, 1) for spec in todo)
        active: list[ShardWork] = []
        chunk_refs: dict[Any, ShardWork] = {}
        write_refs: dict[Any, ShardWork] = {}
        try:
            while pending or active:
                while pending and len(active) < s.max_shards_in_flight:
                    spec, attempt = pending.popleft()
                    active.append(ShardWork(spec, attempt, tasks.split_chunks(spec, s.images_per_call)))
                for work in active:
                    while work.next_chunk < len(work.chunks) and len(chunk_refs) < s.max_chunks_in_flight:
                        chunk_refs[self.submit_chunk(work)] = work
                    if work.next_chunk == len(work.chunks) and work.write_ref is None:
                        work.write_ref = self.write.remote(work.spec, str(self.tar_path(work.spec)), *work.encoded)
                        work.encoded = []  # the write task holds them now
                        write_refs[work.write_ref] = work

                for ref in self.wait([*chunk_refs, *write_refs]):
                    if chunk_refs.pop(ref, None) is not None:
                        continue  # encoded (or failed: the shard's write task will say)
                    work = write_refs.pop(ref)
                    active.remove(work)
                    outcome = self.outcome(work, ref)
                    if outcome is None:
                        pending.appendleft((work.spec, work.attempt + 1))
                    else:
                        yield outcome
                self.progress.heartbeat(len(active), len(chunk_refs))
        finally:
            for ref in [*chunk_refs, *write_refs]:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 -- best effort; the refs are abandoned anyway
                    pass

    def submit_chunk(self, work: ShardWork):
        """The chunk's whole graph, in stage-table order; returns the encoded chunk's ref."""
        s, i = self.settings, work.next_chunk
        loaded = self.load.remote(work.spec.index, i, work.chunks[i], s.max_side, s.verify_pixel_md5)
        outputs: dict[str, Any] = {}
        for stage in self.stages:
            outputs[stage.name] = self.pools[stage.name].call(loaded, *(outputs[name] for name in stage.takes))
        encoded = self.encode.remote(loaded, self.stages, self.models, s.jpeg_quality, *outputs.values())
        work.encoded.append(encoded)
        work.next_chunk += 1
        return encoded

    def wait(self, refs: list) -> list:
        """The refs that are ready, waiting up to one progress interval for the first."""
        ready, _ = ray.wait(refs, num_returns=1, timeout=self.settings.progress_interval_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    def outcome(self, work: ShardWork, ref) -> ShardOutcome | None:
        """What a shard's ended write task says; ``None`` when the shard should be tried again."""
        seconds = time.monotonic() - work.started
        try:
            return ShardOutcome(work.spec, work.attempt, seconds, written=ray.get(ref))
        except ray.exceptions.RayError as e:
            reason = root_cause(e)
            if isinstance(e, ray.exceptions.RayActorError) or "ActorDiedError" in reason:
                for pool in self.pools.values():
                    pool.heal()
            if work.attempt < self.settings.shard_attempts:
                self.retries += 1
                self.progress.retrying(work.spec.name, work.attempt, self.settings.shard_attempts, reason)
                return None
            return ShardOutcome(work.spec, work.attempt, seconds, error=reason)
