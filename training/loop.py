"""The per-worker training loop, written top to bottom as diffusers' training examples are.

Each worker (a Ray Train worker, see :mod:`ray_jobs.train`, or one local process with
:class:`LocalContext`) runs :func:`train_loop`:

1. load the models (:class:`~training.model.FastComposerModel`), move them to the worker's device;
   on a GPU that supports bf16 the frozen parts are stored in bf16 and the forward pass runs under
   bf16 autocast; on one that does not (pre-Ampere), fp16 autocast with a gradient scaler (or fp32
   with ``mixed_precision: fp32``); on CPU everything is fp32; the first log line says which
   (:func:`precision`); optionally enable gradient checkpointing in the U-Net;
2. AdamW over the trainable parameters (constant learning rate, weight decay 1e-2);
3. resume: if the run has a checkpoint, load its weights, optimizer state, step (and, fp16, the
   gradient scaler's state);
4. wrap the model for distributed data parallel (the context's ``prepare``);
5. stream batches (:mod:`training.loader`; the shard order is re-seeded with the resume step so
   a resumed run does not replay the same data);
6. per step: ``grad_accum`` micro-batches (moved to the device; subject crops cut and augmented
   there when :meth:`TrainConfig.subject_augmentation_place` says so; gradients synchronised on the
   last one only), clip the gradient norm to 1.0, optimizer step; log every term of the loss,
   samples/s, learning rate, and the time spent waiting for data vs computing;
7. every ``checkpoint_every`` steps and at the end: rank 0 checks the free space, writes a checkpoint
   (:mod:`training.checkpoint`) into a staging folder under OUT (:mod:`training.checkpoint_space`)
   and the context moves it into place (Ray Train persists it).

``seed`` makes a run reproducible: the fusion MLP's initialisation, the noise and timesteps, the
object-region coin (:meth:`FastComposerModel.seed_coin`), the shard order, the shuffle buffer and the
example sampling are all seeded from it (and the rank), so two runs with the same seed on the same
device log the same losses step for step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from datagen import storage
from datagen.files import LogAppender
from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.checkpoint_space import checkpoint_bytes, clear_staging, space_needed, stage_folder
from training.collate import batch_to
from training.config import TrainConfig
from training.loader import loader_from_config
from training.model import FastComposerModel
from training.preprocess import ExamplePreprocessor
from training.references import CrossImageReferences
from training.subject_augment import SubjectAugmenter
from training.subject_crops import cut_on_device

log = logging.getLogger(__name__)
LOSS_TERMS = ("loss", "denoise_loss", "localization_loss", "object_region")
TRAIN_LOG = "train_log.jsonl"
LOG_FLUSH_LINES = 100  # on a bucket OUT the log is rewritten whole: every 100 lines and at each checkpoint
AUGMENT_WHERE = {"loader": "in the loader", "device": "on the training device after collate (cut there too)",
                 None: "never"}


class WorkerContext(Protocol):
    """What the loop needs from the process that runs it (Ray Train or :class:`LocalContext`)."""

    rank: int
    world_size: int
    device: torch.device
    copies_checkpoint: bool  # report copies the staged folder (it stays staged meanwhile: twice the space locally)

    def resume_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def report(self, metrics: dict, checkpoint_dir: Path | None, step: int) -> None: ...


class LocalContext:
    """One process, no Ray: resumes from and writes checkpoints to ``cfg.out`` itself."""

    rank, world_size = 0, 1
    copies_checkpoint = False  # report moves the staged folder into place (a rename: same file system)

    def __init__(self, cfg: TrainConfig, device: str | torch.device = "cpu"):
        self.out = Path(cfg.out)
        self.keep = cfg.keep_checkpoints
        self.device = torch.device(device)
        self.model: torch.nn.Module | None = None  # the model being trained, for callers that inspect it

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[Path | None]:
        yield latest_checkpoint(self.out)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        return model

    def report(self, metrics: dict, checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is None:
            return
        final = self.out / f"checkpoint-{step:08d}"
        if final.exists():  # a run that trained this step before, then went back: the new one wins
            shutil.rmtree(final)
        os.replace(checkpoint_dir, final)
        kept = sorted(self.out.glob("checkpoint-*"))
        for old in kept[: max(0, len(kept) - self.keep)]:
            shutil.rmtree(old)


class Precision(NamedTuple):
    dtype: torch.dtype | None  # autocast dtype (and the frozen parts' storage); None: fp32
    scaler: bool  # fp16: scale the loss (torch.amp.GradScaler) so small gradients do not underflow
    text: str  # what the first log line says


def precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """bf16 autocast on a GPU that supports it (``auto``/``bf16``); where it does not, or with ``fp16``,
    fp16 autocast with a gradient scaler; fp32 on CPU or with ``fp32``."""
    asked = cfg.mixed_precision
    if asked == "fp32":
        return Precision(None, False, "fp32")
    if device.type != "cuda":
        if asked in ("bf16", "fp16"):
            log.warning("mixed_precision=%s asked for on %s: training in fp32 there", asked, device)
        return Precision(None, False, f"fp32 (on {device.type})")
    bf16_ok = torch.cuda.is_bf16_supported()
    if asked in ("auto", "bf16") and bf16_ok:
        return Precision(torch.bfloat16, False, "bf16 autocast")
    why = "asked for" if asked == "fp16" else "this GPU does not support bf16"
    return Precision(torch.float16, True, f"fp16 autocast with a gradient scaler ({why})")


def build_optimizer(model: FastComposerModel, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.trainable_parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


def format_log_line(step: int, total: int, terms: dict[str, float], subjects_per_example: float, grad_norm: float,
                    samples_per_s: float, lr: float, data_s: float, compute_s: float) -> str:
    return (
        f"step {step}/{total}  loss {terms['loss']:.4f}  mse {terms['denoise_loss']:.4f}  "
        f"loc {terms['localization_loss']:+.5f}  object-region {terms['object_region']:.2f}  "
        f"subjects/ex {subjects_per_example:.2f}  grad-norm {grad_norm:.3f}  "
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

    # 1. models
    components = FastComposerModel.from_config(cfg)
    model = components.model
    model.seed_coin(cfg.seed + ctx.rank)
    model.to(device)
    mixed = precision(cfg, device)
    amp = mixed.dtype
    scaler = torch.amp.GradScaler(device.type, enabled=mixed.scaler)
    if amp is not None:
        model.cast_frozen(amp)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    parameters = model.trainable_parameters()

    # 2. optimizer
    optimizer = build_optimizer(model, cfg)

    # 3. resume
    start_step = 0
    with ctx.resume_checkpoint() as resume_dir:
        if resume_dir is not None:
            state = load_checkpoint(resume_dir, model, optimizer, map_location=device, scaler=scaler)
            start_step = state["step"]
            if is_main:
                print_fn(f"Resuming from checkpoint {resume_dir} at step {start_step}")
    if start_step >= cfg.steps:
        if is_main:
            print_fn(f"Already at step {start_step} (steps={cfg.steps}): nothing to train")
        return start_step

    # 4. distributed wrapper
    wrapped = ctx.prepare(model)

    # 5. data
    augment_on = cfg.subject_augmentation_place(device.type)
    augment = SubjectAugmenter() if augment_on == "device" else None
    references = CrossImageReferences.from_config(cfg)  # read once, before the loader processes fork
    preprocessor = ExamplePreprocessor.from_config(cfg, components.tokenizer, components.subject_size, seed=cfg.seed,
                                                   device_type=device.type, references=references)
    loader = loader_from_config(cfg, preprocessor, seed=cfg.seed + start_step, pin_memory=device.type == "cuda")
    batches = iter(loader)

    global_batch = cfg.batch_size * cfg.grad_accum * ctx.world_size
    log_path = storage.path(cfg.out) / TRAIN_LOG  # a local folder or a bucket URL
    train_log = LogAppender(log_path, LOG_FLUSH_LINES)
    if is_main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        clear_staging(cfg.out)
        print_fn(
            f"Training {sum(p.numel() for p in parameters):,} parameters "
            f"(U-Net, fusion MLP, last {model.trainable_vision_blocks} vision blocks) on {ctx.world_size} worker(s), "
            f"{device}, {mixed.text}; global batch {global_batch}; "
            f"localization on {len(model.hooked_layers)} cross-attention layers; subject crops augmented "
            f"{AUGMENT_WHERE[augment_on]}; reference crops: {cfg.reference}"
            f"{f' ({len(references.keys)} crops of other photos)' if references is not None else ''}; "
            f"steps {start_step} -> {cfg.steps}"
        )

    # 6. steps
    step = start_step
    wrapped.train()
    while step < cfg.steps:
        step_start = time.perf_counter()
        data_s = 0.0
        totals = torch.zeros(len(LOSS_TERMS), device=device)
        subjects = 0.0
        cross = fallbacks = 0  # subjects given a crop of another photo / asking for one and having none
        for i in range(cfg.grad_accum):
            t = time.perf_counter()
            batch = next(batches)
            data_s += time.perf_counter() - t
            batch = batch_to(batch, device, non_blocking=True)
            if augment is not None:  # cut and augment the subject crops here, on the device
                crops = cut_on_device(batch.pop("source_image"), batch.pop("source_segment_map"), batch["subject_boxes"],
                                      batch["subject_ids"], batch["subject_valid"], components.subject_size, device)
                if "reference_used" in batch:  # cross-image crops, cut in the loader
                    used = batch["reference_used"]
                    crops[used] = batch.pop("reference_pixel_values")[used]
                batch["subject_pixel_values"] = augment(crops, batch["subject_valid"])
            last = i == cfg.grad_accum - 1
            # DDP: synchronise gradients on the last micro-batch only
            sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                    out = wrapped(batch)
                scaler.scale(out["loss"] / cfg.grad_accum).backward()
            totals += torch.stack([out[k].detach().float() for k in LOSS_TERMS])
            subjects += float(batch["num_subjects"].float().mean())
            if "reference_used" in batch:
                cross += int(batch["reference_used"].sum())
                fallbacks += int(batch["reference_fallbacks"].sum())
        scaler.unscale_(optimizer)  # (no-op without fp16) so the clip sees the true gradient norm
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm)
        if mixed.scaler:
            scaler.step(optimizer)  # skips the step on inf/NaN and lowers the scale
            scaler.update()
        elif torch.isfinite(grad_norm):  # (same on every worker: DDP averaged the gradients)
            optimizer.step()
        else:
            log.warning("non-finite gradient norm (%s): optimizer step skipped", float(grad_norm))
        optimizer.zero_grad(set_to_none=True)
        totals /= cfg.grad_accum
        if ctx.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
            totals /= ctx.world_size
        terms = dict(zip(LOSS_TERMS, totals.tolist(), strict=True))  # (.tolist() waits for the device)
        step += 1
        if after_step is not None:  # fault drills (fixtures.failure_hooks); None in a real run
            after_step(step, ctx.rank)

        # logs
        elapsed = time.perf_counter() - step_start
        lr = optimizer.param_groups[0]["lr"]
        if is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            samples_per_s = global_batch / elapsed
            line = format_log_line(step, cfg.steps, terms, subjects / cfg.grad_accum, float(grad_norm),
                                   samples_per_s, lr, data_s, elapsed - data_s)
            entry = {"step": step, **terms, "grad_norm": float(grad_norm), "samples_per_s": samples_per_s,
                     "lr": lr, "data_s": data_s, "compute_s": elapsed - data_s, "time": time.time()}
            if references is not None:
                line += f"  cross-image refs {cross} (own-crop fallbacks {fallbacks})"
                entry.update(cross_image_references=cross, reference_fallbacks=fallbacks)
            print_fn(line)
            train_log.add(json.dumps(entry) + "\n")  # on a bucket: held until a checkpoint or 100 lines

        # 7. checkpoints
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            metrics = {"step": step, **terms}
            folder = None
            if is_main:  # staged under OUT once the free space is known to hold it (checkpoint_space)
                needed = space_needed(cfg.out, checkpoint_bytes(parameters, optimizer), ctx.copies_checkpoint)
                folder = save_checkpoint(model, optimizer, step, cfg.to_dict(), stage_folder(cfg.out, step, needed),
                                         metrics, scaler)
            try:
                ctx.report(metrics, folder, step)
            finally:
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)  # moved into place already, or copied by Ray
            if is_main:
                train_log.flush()  # the bucket's log catches up at every checkpoint (the last step is one)
                print_fn(f"Saved checkpoint at step {step}")
    return step
