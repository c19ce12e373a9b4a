"""Evaluation on Ray: a pool of actors, each holding the models once, generating and scoring units.

``run_on_ray(settings, units, address)`` joins the cluster at ``address`` through
:func:`ray_jobs.cluster.ray_session` (``local`` starts a private Ray on this machine), starts ``workers`` actors (default: one per GPU of the cluster, or one on a CPU-only
cluster), each with one GPU when the cluster has GPUs, and yields each finished batch of
``(row, png bytes)`` as it comes back, in completion order; the driver writes the files. The only
module of the evaluation that imports Ray.

More workers than the cluster can place (GPUs, or CPUs on a CPU-only cluster) are refused at once
(:class:`EvaluationPoolError`) instead of waiting forever for actors that never start; an actor
that fails ends the run with the same error, naming it.
"""

from __future__ import annotations

from collections.abc import Iterator

from training.evaluation.protocol import Unit
from training.evaluation.worker import Worker, WorkerSettings


class EvaluationPoolError(RuntimeError):
    """The Ray evaluation pool cannot start or run; the message says why."""


class _EvalActor:
    def __init__(self, settings: WorkerSettings):
        self.worker = Worker(settings)

    def run(self, units: list[Unit]):
        return self.worker.run(units)


def run_on_ray(settings: WorkerSettings, units: list[Unit], address: str, workers: int | None = None,
               units_per_task: int = 4) -> Iterator[list[tuple[dict, bytes]]]:
    import ray

    from ray_jobs.cluster import ray_session

    with ray_session(address):
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = workers or max(1, gpus)
        kind, has = ("GPU", gpus) if gpus else ("CPU", int(resources.get("CPU", 0)))
        if count > has:
            raise EvaluationPoolError(f"--workers {count}: each evaluation actor takes one {kind}, and the Ray cluster "
                                      f"at {address} has {has}")
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
                try:
                    batch = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise EvaluationPoolError(f"an evaluation actor failed: {e}") from None
                yield batch
