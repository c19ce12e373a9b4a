"""How the dataset job runs: the profile's typed ``shards:`` and ``ray:`` sections plus the cluster.

The sections, their keys and defaults are :class:`datagen.config.ShardsSettings` and
:class:`datagen.config.RaySettings` (read and checked once, before Ray starts). What is left here
depends on the cluster: :func:`resolve_settings` turns ``auto`` values into concrete numbers,

* ``ray.stages.<stage>`` ``replicas``/``num_gpus``/``num_cpus``: on a cluster with GPUs, one replica
  of every stage per GPU, sharing it by the stage table's shares (captioner 0.5 + segmenter 0.2 +
  matcher 0.2 + faces 0.05 + identity 0.05); with no GPU, one replica each, ``num_gpus`` 0, and CPU shares that leave
  room for the CPU tasks;
* ``max_shards_in_flight`` (2 x actors) and ``max_chunks_in_flight`` (3 x actors): the bounds that
  keep memory flat whatever the source size;
* ``task_num_cpus``: 1 per load/encode/write task, less on small machines;

and it is pure, so placement can be checked without a cluster. :func:`config_digest` is the
digest of what changes the shards' bytes (the stages' sections and ``shards:``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from datagen import stage_table
from datagen.config import AUTO, Profile

# Keys of those sections that never change a shard's bytes: ``verify_pixel_md5`` only checks the
# source; ``device`` is where a model runs outside Ray (actors use the device Ray gives them).
NOT_CONTENT_KEYS = ("verify_pixel_md5", "device")


class SettingsError(ValueError):
    """The settings do not fit the cluster (e.g. it has no CPUs); the message says why."""


@dataclass(frozen=True)
class StagePlacement:
    stage: str
    replicas: int
    num_gpus: float
    num_cpus: float


@dataclass(frozen=True)
class BuildSettings:
    shard_size: int
    max_side: int
    jpeg_quality: int
    verify_pixel_md5: bool
    stages: dict[str, StagePlacement]
    images_per_call: int
    max_shards_in_flight: int
    max_chunks_in_flight: int
    shard_attempts: int
    task_max_retries: int
    actor_max_restarts: int
    actor_max_task_retries: int
    actor_start_timeout_s: float
    progress_interval_s: float
    task_num_cpus: float
    scheduling_strategy: str

    @property
    def total_actors(self) -> int:
        return sum(p.replicas for p in self.stages.values())


def resolve_settings(profile: Profile, cluster: dict[str, float]) -> BuildSettings:
    """Concrete settings for a profile on a cluster with ``cluster`` resources
    (``ray.cluster_resources()``: at least ``CPU``; ``GPU`` when there are GPUs)."""
    shards, ray_cfg = profile.shards, profile.ray
    total_cpus = float(cluster.get("CPU", 0))
    total_gpus = float(cluster.get("GPU", 0))
    if total_cpus <= 0:
        raise SettingsError(f"the Ray cluster has no CPUs ({cluster}); the job needs CPUs for its tasks")

    gpu_sets = max(1, math.floor(total_gpus)) if total_gpus > 0 else 1
    placed = {}
    for stage in stage_table.stages_for(profile):
        cfg = ray_cfg.stages[stage.name]
        replicas = int(_auto(cfg.replicas, gpu_sets))
        num_gpus = float(_auto(cfg.num_gpus, stage.gpu_share if total_gpus > 0 else 0.0))
        placed[stage.name] = (replicas, num_gpus, cfg.num_cpus)

    n_actors = sum(replicas for replicas, _, _ in placed.values())
    # CPU-only runs: the actors together take at most 3/4 of the CPUs, at most 1 each, so that
    # the load/encode/write tasks always have room; with GPUs an actor takes 1 CPU.
    cpu_share = _floor_step(min(1.0, 0.75 * total_cpus / n_actors))
    stages = {
        name: StagePlacement(name, replicas, num_gpus, float(_auto(num_cpus, 1.0 if num_gpus > 0 else cpu_share)))
        for name, (replicas, num_gpus, num_cpus) in placed.items()
    }

    actor_cpus = sum(s.num_cpus * s.replicas for s in stages.values())
    room = total_cpus - actor_cpus
    task_default = 1.0 if room >= 2 else _floor_step(max(0.05, room / 2))
    total_actors = sum(s.replicas for s in stages.values())
    return BuildSettings(
        shard_size=shards.size,
        max_side=shards.max_side,
        jpeg_quality=shards.jpeg_quality,
        verify_pixel_md5=shards.verify_pixel_md5,
        stages=stages,
        images_per_call=ray_cfg.images_per_call,
        max_shards_in_flight=int(_auto(ray_cfg.max_shards_in_flight, max(2, 2 * total_actors))),
        max_chunks_in_flight=int(_auto(ray_cfg.max_chunks_in_flight, max(3, 3 * total_actors))),
        shard_attempts=ray_cfg.shard_attempts,
        task_max_retries=ray_cfg.task_max_retries,
        actor_max_restarts=ray_cfg.actor_max_restarts,
        actor_max_task_retries=ray_cfg.actor_max_task_retries,
        actor_start_timeout_s=float(ray_cfg.actor_start_timeout_s),
        progress_interval_s=float(ray_cfg.progress_interval_s),
        task_num_cpus=float(_auto(ray_cfg.task_num_cpus, task_default)),
        scheduling_strategy=ray_cfg.scheduling_strategy,
    )


def config_digest(profile: Profile) -> str:
    """sha256 of the content-affecting settings: shards built under another digest differ in bytes."""
    sections = {**stage_table.content_sections(profile), "shards": profile.shards}
    content = {
        name: {k: v for k, v in dataclasses.asdict(section).items() if k not in NOT_CONTENT_KEYS}
        for name, section in sections.items()
    }
    if content.get("segmenter", {}).get("pad_to") == "none":
        # the segmenter before pad_to existed: runs made then keep their digest (and resume)
        del content["segmenter"]["pad_to"]
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _auto(value, default: float):
    return default if value == AUTO else value


def _floor_step(x: float, step: float = 0.05) -> float:
    return round(max(step, math.floor(x / step + 1e-9) * step), 4)
