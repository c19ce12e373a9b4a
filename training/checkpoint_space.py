"""Where a checkpoint is written before it moves into place, and whether it fits.

At paper size a checkpoint is about 10 GB: the fp32 U-Net (860M parameters), fusion MLP and last two
vision blocks, plus AdamW's two moments of each. It is staged under the run folder,
``OUT/.staging/stage-<step>-<random>/`` (the file system of its final place, so moving it there is a
rename; not the system temp folder, which on GPU machines is often a small root disk), and the
free space there is checked **before** a byte is written: a checkpoint that cannot fit stops the run
with one line naming the folder, the size and the free space, instead of a half-written folder.
A run whose OUT is a bucket URL has no local run folder: its checkpoint is staged in the system
temp folder (``TMPDIR``: point it at a disk that holds one), once its size is known to fit there,
and Ray Train uploads it from there (no second local copy).
A run clears stale staging folders (a killed run's) when it starts. ``keep_checkpoints`` (``train
--keep-checkpoints N``) bounds how many finished checkpoints stay.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from datagen import storage

STAGING = ".staging"
STAGE_PREFIX = "stage-"  # not "checkpoint*": a staged folder is never taken for a finished checkpoint
HEADROOM = 1.05  # free space kept beyond the estimate (file-system overhead, the JSON and configs)


class CheckpointSpaceError(RuntimeError):
    """Not enough free space to write a checkpoint; nothing was written for that step."""


def checkpoint_bytes(parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes a checkpoint of these trainable ``parameters`` takes: fp32 weights (as saved) and the
    optimizer's state tensors (before its first step AdamW holds none yet: two fp32 moments each)."""
    weights = sum(p.numel() for p in parameters) * 4
    if optimizer is None:
        return weights
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    return weights + (state if state else 2 * weights)


def staging_root(out: str | Path) -> Path | None:
    """``OUT/.staging`` for a local run folder; None (the system temp folder, ``TMPDIR``) for a bucket URL."""
    return None if storage.is_url(out) else storage.path(out) / STAGING  # file:// stripped


def space_needed(out: str | Path, size: int, copied: bool) -> int:
    """Free bytes a checkpoint of ``size`` needs where it is staged: twice when the context copies the
    staged folder into a local OUT (both copies on that disk meanwhile), once when it is moved there or
    uploaded to a bucket OUT."""
    return size * (2 if copied and not storage.is_url(out) else 1)


def clear_staging(out: str | Path) -> None:
    """Remove what a killed run left staged."""
    root = staging_root(out)
    if root is not None and root.is_dir():
        for stale in root.glob(f"{STAGE_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_free_space(folder: Path, needed: int, step: int) -> None:
    """Raise :class:`CheckpointSpaceError` unless ``folder``'s file system has ``needed`` bytes free (plus headroom)."""
    free = shutil.disk_usage(folder).free
    if free < needed * HEADROOM:
        raise CheckpointSpaceError(
            f"not enough free space for the checkpoint of step {step}: it needs about {_gb(needed)} under "
            f"{folder}, which has {_gb(free)} free; nothing was written for this step (the last finished "
            f"checkpoint is intact). Free some space there, lower --keep-checkpoints, or train with another --out"
        )


def stage_folder(out: str | Path, step: int, needed: int) -> Path:
    """A fresh folder to write the checkpoint of ``step`` into, once ``needed`` bytes are known to fit."""
    root = staging_root(out)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    where = root if root is not None else Path(tempfile.gettempdir())
    check_free_space(where, needed, step)
    return Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{step:08d}-", dir=where))
