"""The per-worker training loop, written out in the style of diffusers' training examples.

Each worker (a Ray Train worker, see :mod:`training.ray_train`) runs :func:`train_loop`:

1. load the models (:class:`~training.model.FastComposerModel`), move them to the worker's device;
   on GPU the frozen parts are stored in bf16 and the forward pass runs under bf16 autocast, on
   CPU everything is fp32; optionally enable gradient checkpointing in the U-Net;
2. AdamW over the trainable parameters (constant learning rate, weight decay 1e-2);
3. resume: if the run has a checkpoint, load its weights, optimizer state and step;
4. wrap the model for distributed data parallel (the context's ``prepare``);
5. stream batches (:mod:`training.loader`; the shard order is re-seeded with the resume step so
   a resumed run does not replay the same data);
6. per step: ``grad_accum`` micro-batches (gradients synchronised on the last one only), clip the
   gradient norm to 1.0, optimizer step; log every term of the loss, samples/s, learning rate,
   and the time spent waiting for data vs computing;
7. every ``checkpoint_every`` steps and at the end: rank 0 writes a checkpoint
   (:mod:`training.checkpoint`) and the context reports it (Ray Train persists it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from training.checkpoint import load_checkpoint, save_checkpoint, unwrap
from training.collate import batch_to
from training.config import TrainConfig
from training.loader import loader_from_config
from training.model import FastComposerModel
from training.preprocess import ExamplePreprocessor

log = logging.getLogger(__name__)
LOSS_TERMS = ("loss", "denoise_loss", "localization_loss", "object_region")
TRAIN_LOG = "train_log.jsonl"


class WorkerContext(Protocol):
    """What the loop needs from the process that runs it (Ray Train provides it)."""

    rank: int
    world_size: int
    device: torch.device

    def resume_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def report(self, metrics: dict, checkpoint_dir: Path | None, step: int) -> None: ...


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU (``auto``/``bf16``), none (fp32) on CPU or with ``fp32``."""
    if cfg.mixed_precision == "fp32" or device.type != "cuda":
        if cfg.mixed_precision == "bf16" and device.type != "cuda":
            log.warning("mixed_precision=bf16 asked for on %s: training in fp32 there", device)
        return None
    return torch.bfloat16


def build_optimizer(model: FastComposerModel, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.trainable_parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


@dataclass
class StepResult:
    terms: dict[str, float]  # mean over micro-batches (and workers, when distributed)
    grad_norm: float
    subjects_per_example: float


class TrainStep:
    """One optimizer step over ``grad_accum`` micro-batches."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 device: torch.device, world_size: int = 1):
        self.model = model  # possibly DDP-wrapped
        self.optimizer = optimizer
        self.cfg = cfg
        self.device = device
        self.world_size = world_size
        self.amp_dtype = autocast_dtype(cfg, device)
        self.parameters = unwrap(model).trainable_parameters()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def __call__(self, micro_batches: list[dict]) -> StepResult:
        self.model.train()
        totals = torch.zeros(len(LOSS_TERMS), device=self.device)
        subjects = 0.0
        for i, batch in enumerate(micro_batches):
            batch = batch_to(batch, self.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self.autocast():
                    out = self.model(batch)
                (out["loss"] / len(micro_batches)).backward()
            totals += torch.stack([out[k].detach().float() for k in LOSS_TERMS])
            subjects += float(batch["num_subjects"].float().mean())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.cfg.max_grad_norm)
        if torch.isfinite(grad_norm):  # (same on every worker: DDP averaged the gradients)
            self.optimizer.step()
        else:
            log.warning("non-finite gradient norm (%s): optimizer step skipped", float(grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        totals /= len(micro_batches)
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
            totals /= self.world_size
        terms = dict(zip(LOSS_TERMS, totals.tolist(), strict=True))
        return StepResult(terms, float(grad_norm), subjects / len(micro_batches))


def _timed_batches(loader_iter: Iterator[dict], n: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    batches = [next(loader_iter) for _ in range(n)]
    return batches, time.perf_counter() - start


def format_log_line(step: int, total: int, result: StepResult, samples_per_s: float, lr: float,
                    data_s: float, compute_s: float) -> str:
    t = result.terms
    return (
        f"step {step}/{total}  loss {t['loss']:.4f}  mse {t['denoise_loss']:.4f}  "
        f"loc {t['localization_loss']:+.5f}  object-region {t['object_region']:.2f}  "
        f"subjects/ex {result.subjects_per_example:.2f}  grad-norm {result.grad_norm:.3f}  "
        f"{samples_per_s:.2f} samples/s  lr {lr:.2e}  data {data_s:.3f}s  compute {compute_s:.3f}s"
    )


def train_loop(
    cfg: TrainConfig, ctx: WorkerContext, print_fn: Callable[[str], None] = print,
    after_step: Callable[[int, int], None] | None = None,
) -> int:
    """Train until ``cfg.steps``; return the final step."""
    device = ctx.device
    is_main = ctx.rank == 0
    torch.manual_seed(cfg.seed + ctx.rank)

    components = FastComposerModel.from_config(cfg)
    model = components.model
    model.to(device)
    amp = autocast_dtype(cfg, device)
    if amp is not None:
        model.cast_frozen(amp)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    optimizer = build_optimizer(model, cfg)

    start_step = 0
    with ctx.resume_checkpoint() as resume_dir:
        if resume_dir is not None:
            state = load_checkpoint(resume_dir, model, optimizer, map_location=device)
            start_step = state["step"]
            if is_main:
                print_fn(f"Resuming from checkpoint {resume_dir} at step {start_step}")
    if start_step >= cfg.steps:
        if is_main:
            print_fn(f"Already at step {start_step} (steps={cfg.steps}): nothing to train")
        return start_step

    wrapped = ctx.prepare(model)
    step_fn = TrainStep(wrapped, optimizer, cfg, device, ctx.world_size)
    preprocessor = ExamplePreprocessor.from_config(cfg, components.tokenizer, components.subject_size, seed=cfg.seed)
    loader = loader_from_config(cfg, preprocessor, seed=cfg.seed + start_step, pin_memory=device.type == "cuda")
    batches = iter(loader)
    global_batch = cfg.batch_size * cfg.grad_accum * ctx.world_size
    log_path = Path(cfg.out) / TRAIN_LOG
    if is_main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print_fn(
            f"Training {sum(p.numel() for p in model.trainable_parameters()):,} parameters "
            f"(U-Net, fusion MLP, last {model.trainable_vision_blocks} vision blocks) on {ctx.world_size} worker(s), "
            f"{device}, {'bf16 autocast' if amp else 'fp32'}; global batch {global_batch}; "
            f"localization on {len(model.hooked_layers)} cross-attention layers; steps {start_step} -> {cfg.steps}"
        )

    step = start_step
    while step < cfg.steps:
        step_start = time.perf_counter()
        micro, data_s = _timed_batches(batches, cfg.grad_accum)
        compute_start = time.perf_counter()
        result = step_fn(micro)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute_s = time.perf_counter() - compute_start
        step += 1
        if after_step is not None:  # fault drills (fixtures.failure_hooks); None in a real run
            after_step(step, ctx.rank)
        elapsed = time.perf_counter() - step_start
        lr = optimizer.param_groups[0]["lr"]
        if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            samples_per_s = global_batch / elapsed
            print_fn(format_log_line(step, cfg.steps, result, samples_per_s, lr, data_s, compute_s))
            entry = {"step": step, **result.terms, "grad_norm": result.grad_norm, "samples_per_s": samples_per_s,
                     "lr": lr, "data_s": data_s, "compute_s": compute_s, "time": time.time()}
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            metrics = {"step": step, **result.terms}
            with tempfile.TemporaryDirectory(prefix=f"checkpoint-{step:08d}-") as tmp:
                folder = None
                if is_main:
                    folder = save_checkpoint(model, optimizer, step, cfg.to_dict(), tmp, metrics)
                ctx.report(metrics, folder, step)
            if is_main:
                print_fn(f"Saved checkpoint at step {step}")
    return step
