"""Evaluation on Ray: a pool of actors, each holding the models once, generating and scoring units.

``run_on_ray(settings, units, address)`` joins the cluster at ``address`` (``local`` starts Ray on
this machine), starts ``workers`` actors (default: one per GPU of the cluster, or one on a CPU-only
cluster), each with one GPU when the cluster has GPUs, and yields each finished batch of
``(row, png bytes)`` as it comes back, in completion order; the driver writes the files. The only
module of the evaluation that imports Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from training.evaluation.protocol import Unit
from training.evaluation.worker import Worker, WorkerSettings

FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TORCH_HOME",
                 "TOKENIZERS_PARALLELISM", "SUBJECT_FFHQ_TINY_MODELS")


class RayUnavailableError(ValueError):
    """Ray could not be started or joined at the given address."""


class _EvalActor:
    def __init__(self, settings: WorkerSettings):
        self.worker = Worker(settings)

    def run(self, units: list[Unit]):
        return self.worker.run(units)


def connect(address: str) -> bool:
    """Join ``address`` (``local``: start Ray here). Returns True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    try:
        if address == "local":
            ray.init(include_dashboard=False, runtime_env={"env_vars": env} if env else None)
        else:
            ray.init(address=address)  # the cluster's nodes have their own environment
    except Exception as e:  # Ray raises bare Exception / ConnectionError on start-up failures
        raise RayUnavailableError(f"--ray-address {address}: cannot {'start' if address == 'local' else 'join'} "
                                  f"Ray: {e}") from e
    return True


def run_on_ray(settings: WorkerSettings, units: list[Unit], address: str, workers: int | None = None,
               units_per_task: int = 4) -> Iterator[list[tuple[dict, bytes]]]:
    import ray

    started = connect(address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or max(1, gpus)
        actor_cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(_EvalActor)
        actors = [actor_cls.remote(settings) for _ in range(count)]
        chunks = [units[i:i + units_per_task] for i in range(0, len(units), max(1, units_per_task))]
        pending: dict = {}
        free = list(actors)
        next_chunk = 0
        while next_chunk < len(chunks) or pending:
            while free and next_chunk < len(chunks):
                actor = free.pop()
                pending[actor.run.remote(chunks[next_chunk])] = actor
                next_chunk += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                free.append(pending.pop(ref))
                yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()
