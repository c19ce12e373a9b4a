"""How the dataset job runs: the ``shards:`` and ``ray:`` sections of a profile, with defaults.

Two sections sit next to the stage sections of a profile (``--config FILE`` overrides any key):

``shards:`` — what the output is (changing these changes the shards' bytes):

* ``size``: source images per shard (default 1000: with FFHQ-wild, shard k is exactly the
  folder ``in-the-wild-images/{k*1000:05d}/``); ``--shard-size`` overrides it.
* ``max_side``: long side of the stored image (default 1024); ``jpeg_quality`` (default 95).
* ``verify_pixel_md5`` (default false): recompute each FFHQ-wild image's pixel md5 and fail the
  image when it differs from ``in_the_wild.pixel_md5`` (see :mod:`datagen.sources.images`). Off, the
  metadata's md5 is recorded as is (corrupt files still fail at decode: PNG CRCs + zlib adler32).
  It only checks, never changes a shard's bytes, so it is left out of :func:`config_digest`.

``ray:`` — how the job is placed and paced (never changes the shards' bytes):

* ``stages.<captioner|segmenter|matcher>``: ``replicas`` (actors of that stage), ``num_gpus``
  (GPU fraction per actor: fractions let several stages share one GPU) and ``num_cpus`` per actor.
  ``auto`` values: on a cluster with GPUs, one replica of every stage per GPU, sharing it as
  captioner 0.5 + segmenter 0.25 + matcher 0.25; with no GPU, one replica each, ``num_gpus`` 0,
  and CPU shares that leave room for the CPU tasks.
* ``images_per_call``: images per load task and per actor call (a "chunk"); each stage splits a
  chunk further into its own ``batch_size`` (stage section) batches.
* ``max_shards_in_flight`` (default 2 × actors) and ``max_chunks_in_flight`` (default 3 × actors):
  the bounds that keep memory flat whatever the source size.
* ``shard_attempts``: tries of a shard before it is recorded as failed (default 3);
  ``task_max_retries``, ``actor_max_restarts``, ``actor_max_task_retries``: Ray's own retries of
  tasks and actors lost to crashes or lost nodes.
* ``task_num_cpus``: CPUs per load/encode/write task (``auto``: 1, less on small machines);
  ``scheduling_strategy``: ``DEFAULT`` or ``SPREAD``.

:func:`resolve_settings` turns the sections plus the cluster's resources into concrete numbers;
it is pure, so placement can be checked without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from datagen.config import merge

STAGE_NAMES = ("captioner", "segmenter", "matcher")
# GPU share per actor when stages share GPUs: one replica of each stage fills one GPU.
GPU_SHARES = {"captioner": 0.5, "segmenter": 0.25, "matcher": 0.25}
# The profile sections whose values change the shards' bytes (digested into every shard entry).
CONTENT_SECTIONS = ("captioner", "segmenter", "phrases", "matcher", "shards")

SHARDS_DEFAULTS: dict[str, Any] = {"size": 1000, "max_side": 1024, "jpeg_quality": 95, "verify_pixel_md5": False}
# ``shards:`` keys that check the output without changing its bytes (not in the config digest).
CHECK_ONLY_SHARD_KEYS = ("verify_pixel_md5",)
RAY_DEFAULTS: dict[str, Any] = {
    "stages": {name: {"replicas": "auto", "num_gpus": "auto", "num_cpus": "auto"} for name in STAGE_NAMES},
    "images_per_call": 8,
    "max_shards_in_flight": "auto",
    "max_chunks_in_flight": "auto",
    "shard_attempts": 3,
    "task_max_retries": 3,
    "actor_max_restarts": 3,
    "actor_max_task_retries": 3,
    "actor_start_timeout_s": 900,
    "progress_interval_s": 30,
    "task_num_cpus": "auto",
    "scheduling_strategy": "DEFAULT",
}


class SettingsError(ValueError):
    """A ``shards:``/``ray:`` setting is malformed; the message names the key."""


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


def with_defaults(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile with the ``shards:`` and ``ray:`` defaults filled in under what it sets."""
    return merge({"shards": SHARDS_DEFAULTS, "ray": RAY_DEFAULTS}, profile)


def resolve_settings(profile: dict[str, Any], cluster: dict[str, float]) -> BuildSettings:
    """Concrete settings for a profile (defaults filled in) on a cluster with ``cluster`` resources
    (``ray.cluster_resources()``: at least ``CPU``; ``GPU`` when there are GPUs)."""
    profile = with_defaults(profile)
    shards, ray_cfg = profile["shards"], profile["ray"]
    total_cpus = float(cluster.get("CPU", 0))
    total_gpus = float(cluster.get("GPU", 0))
    if total_cpus <= 0:
        raise SettingsError(f"the Ray cluster has no CPUs ({cluster}); the job needs CPUs for its tasks")

    unknown = sorted(set(ray_cfg["stages"]) - set(STAGE_NAMES))
    if unknown:
        raise SettingsError(f"ray.stages names unknown stage(s) {unknown}; the stages are {list(STAGE_NAMES)}")

    gpu_sets = max(1, math.floor(total_gpus)) if total_gpus > 0 else 1
    placements: dict[str, dict[str, float]] = {}
    for name in STAGE_NAMES:
        cfg = ray_cfg["stages"][name]
        replicas = _auto(cfg.get("replicas", "auto"), gpu_sets, f"ray.stages.{name}.replicas", int, minimum=1)
        num_gpus = _auto(
            cfg.get("num_gpus", "auto"), GPU_SHARES[name] if total_gpus > 0 else 0.0,
            f"ray.stages.{name}.num_gpus", float, minimum=0,
        )
        placements[name] = {"replicas": replicas, "num_gpus": num_gpus, "num_cpus": cfg.get("num_cpus", "auto")}

    n_actors = sum(p["replicas"] for p in placements.values())
    # CPU-only runs: the actors together take at most 3/4 of the CPUs, at most 1 each, so that
    # the load/encode/write tasks always have room; with GPUs an actor takes 1 CPU.
    cpu_share = _floor_step(min(1.0, 0.75 * total_cpus / n_actors))
    stages = {}
    for name, p in placements.items():
        default_cpus = 1.0 if p["num_gpus"] > 0 else cpu_share
        num_cpus = _auto(p["num_cpus"], default_cpus, f"ray.stages.{name}.num_cpus", float, minimum=0)
        stages[name] = StagePlacement(name, int(p["replicas"]), float(p["num_gpus"]), float(num_cpus))

    actor_cpus = sum(s.num_cpus * s.replicas for s in stages.values())
    room = total_cpus - actor_cpus
    task_default = 1.0 if room >= 2 else _floor_step(max(0.05, room / 2))
    task_num_cpus = _auto(ray_cfg["task_num_cpus"], task_default, "ray.task_num_cpus", float, minimum=0.01)

    total_actors = sum(s.replicas for s in stages.values())
    strategy = str(ray_cfg["scheduling_strategy"]).upper()
    if strategy not in ("DEFAULT", "SPREAD"):
        raise SettingsError(f"ray.scheduling_strategy must be DEFAULT or SPREAD, got {ray_cfg['scheduling_strategy']!r}")
    return BuildSettings(
        shard_size=_int(shards["size"], "shards.size", 1),
        max_side=_int(shards["max_side"], "shards.max_side", 1),
        jpeg_quality=_int(shards["jpeg_quality"], "shards.jpeg_quality", 1, 100),
        verify_pixel_md5=_bool(shards["verify_pixel_md5"], "shards.verify_pixel_md5"),
        stages=stages,
        images_per_call=_int(ray_cfg["images_per_call"], "ray.images_per_call", 1),
        max_shards_in_flight=_auto(ray_cfg["max_shards_in_flight"], max(2, 2 * total_actors), "ray.max_shards_in_flight", int, minimum=1),
        max_chunks_in_flight=_auto(ray_cfg["max_chunks_in_flight"], max(3, 3 * total_actors), "ray.max_chunks_in_flight", int, minimum=1),
        shard_attempts=_int(ray_cfg["shard_attempts"], "ray.shard_attempts", 1),
        task_max_retries=_int(ray_cfg["task_max_retries"], "ray.task_max_retries", 0),
        actor_max_restarts=_int(ray_cfg["actor_max_restarts"], "ray.actor_max_restarts", -1),
        actor_max_task_retries=_int(ray_cfg["actor_max_task_retries"], "ray.actor_max_task_retries", -1),
        actor_start_timeout_s=float(ray_cfg["actor_start_timeout_s"]),
        progress_interval_s=float(ray_cfg["progress_interval_s"]),
        task_num_cpus=float(task_num_cpus),
        scheduling_strategy=strategy,
    )


def config_digest(profile: dict[str, Any]) -> str:
    """sha256 of the content-affecting sections: shards built under another digest differ in bytes."""
    profile = with_defaults(profile)
    content = {name: profile.get(name) for name in CONTENT_SECTIONS}
    content["shards"] = {k: v for k, v in content["shards"].items() if k not in CHECK_ONLY_SHARD_KEYS}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _auto(value: Any, default: float, key: str, kind: type, minimum: float) -> Any:
    if value is None or value == "auto":
        return kind(default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"{key} must be a number or 'auto', got {value!r}")
    if value < minimum:
        raise SettingsError(f"{key} must be >= {minimum}, got {value!r}")
    if kind is int and value != int(value):
        raise SettingsError(f"{key} must be a whole number, got {value!r}")
    return kind(value)


def _int(value: Any, key: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{key} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise SettingsError(f"{key} must be {bound}, got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{key} must be true or false, got {value!r}")
    return value


def _floor_step(x: float, step: float = 0.05) -> float:
    return round(max(step, math.floor(x / step + 1e-9) * step), 4)
