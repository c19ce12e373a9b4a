"""The Ray Train launcher: run :func:`training.loop.train_loop` on N workers with torch DDP.

It sits in ``ray_jobs/`` because it is Ray's side of training: ``training/`` imports no Ray.

* ``ScalingConfig(num_workers, use_gpu)``; the torch process group uses NCCL on GPUs, gloo on CPUs.
* ``RunConfig(name=run_name, storage_path=OUT)``: checkpoints go to ``OUT/<run_name>/checkpoint-<step>``
  (OUT may be a bucket URL: Ray Train then writes through the same fsspec filesystem as every other
  write, :func:`datagen.storage.arrow_filesystem`, and a resume finds the checkpoints there)
  via ``ray.train.report(checkpoint=...)`` (rank 0 writes it; every worker reports), the last
  ``keep_checkpoints`` are kept.
* ``FailureConfig(max_failures)``: when a worker dies, Ray Train restarts the worker group and each
  worker resumes from the latest reported checkpoint (``ray.train.get_checkpoint()``).
* Running again with the same ``OUT`` resumes from the run's latest checkpoint — Ray Train finds
  the run's snapshot in ``OUT/<run_name>`` — and this module says so on the console before
  starting.

The caller connects Ray first, through :mod:`ray_jobs.cluster` (the one way Ray is started or joined:
the ``train`` command uses :func:`ray_jobs.cluster.ray_session`); for a multi-node cluster ``OUT``
must be on storage every node can reach (a bucket, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from datagen import storage
from training.checkpoint import checkpoint_step, latest_checkpoint
from training.config import ConfigError, TrainConfig


class RayWorkerContext:
    """The loop's view of a Ray Train worker. ``resume_from``: the checkpoint the driver found in
    OUT, used when Ray Train has none to give (e.g. its run snapshot was removed)."""

    copies_checkpoint = True  # ray.train.report copies the staged folder into the run's storage

    def __init__(self, resume_from: str | None = None) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = torch.device(ray.train.torch.get_device())
        self.resume_from = resume_from

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # the latest reported one: after a restart, the newest
        if checkpoint is None:
            if not self.resume_from:
                yield None
                return
            with storage.local_copy(storage.path(self.resume_from)) as folder:  # a bucket's: downloaded
                yield folder
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def report(self, metrics: dict, checkpoint_dir: Path | None, step: int) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{step:08d}")


def train_worker(config: dict) -> None:
    """The function every Ray Train worker runs (module level, so Ray can ship it).
    ``config``: ``{"train": TrainConfig.to_dict(), "resume_from": checkpoint path or None,
    "after_step": callable or None}``."""
    from training.loop import train_loop

    train_loop(
        TrainConfig.from_dict(config["train"]), RayWorkerContext(config.get("resume_from")), print_fn=_console,
        after_step=config.get("after_step"),
    )


def _console(line: str) -> None:
    """Write a line to the worker's stdout, which Ray forwards to the driver's console. (Ray Train
    patches ``print`` into its logger, which on some setups shows every line twice.)"""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_dir(cfg: TrainConfig):
    """``OUT/<run name>``: a local ``Path`` or, for a bucket URL, a ``UPath``."""
    out = storage.path(cfg.out)
    return (out.resolve() if isinstance(out, Path) else out) / cfg.run_name


def announce(cfg: TrainConfig, print_fn=print) -> Path | None:
    """Say on the console whether this run starts fresh or resumes; return the checkpoint it resumes from."""
    latest = latest_checkpoint(run_dir(cfg))
    if latest is None:
        print_fn(f"Starting a new training run in {run_dir(cfg)} (no checkpoint there yet)")
    else:
        print_fn(f"Resuming from checkpoint {latest} (step {checkpoint_step(latest)}); training on to step {cfg.steps}")
    return latest


def check_resources(cfg: TrainConfig) -> None:
    """Fail now, rather than wait forever, when the cluster cannot hold the workers."""
    import ray

    resources = ray.cluster_resources()
    kind, needed = ("GPU", cfg.num_workers) if cfg.use_gpu else ("CPU", cfg.num_workers)
    if resources.get(kind, 0) < needed:
        raise ConfigError(
            f"{cfg.num_workers} training worker(s) need {needed} {kind}(s); the Ray cluster has "
            f"{resources.get(kind, 0):g}" + (" (drop --gpu to train on CPUs)" if cfg.use_gpu else "")
        )


def run_training(cfg: TrainConfig, print_fn=print, worker_env: dict[str, str] | None = None, after_step=None):
    """Train with Ray Train; return Ray's ``Result``. Raises ``ray.train.TrainingFailedError`` when
    the workers fail more than ``max_failures`` times. ``worker_env``: environment variables for
    the workers (model cache, offline switches); ``after_step(step, rank)``: called by every worker
    after each step (fault drills; must pickle)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_resources(cfg)
    filesystem, storage_path = storage.arrow_filesystem(cfg.out)  # a bucket: Ray Train writes through fsspec
    if filesystem is None:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    resume_from = announce(cfg, print_fn)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train": cfg.to_dict(), "resume_from": str(resume_from) if resume_from else None, "after_step": after_step,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": dict(worker_env)} if worker_env else None,
        ),
    )
    result = trainer.fit()
    latest = latest_checkpoint(run_dir(cfg))
    if latest is not None:
        print_fn(f"Latest checkpoint: {latest} (step {checkpoint_step(latest)})")
    return result
