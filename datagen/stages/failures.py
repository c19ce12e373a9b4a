"""One image a stage cannot process fails alone: the rest of its batch goes on.

A batch that raises is re-run one image at a time, so one image the model cannot handle fails
alone (as a :class:`StageFailure` with the reason, recorded in the manifest) while the rest of the
shard goes on. When every image fails on its own as well, the fault is not the images' and the
error is raised, failing the chunk's shard (which the job retries and, at worst, records).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class StageFailure:
    """One image that a stage could not process; ``reason`` names the stage, the file and the error."""

    stage: str
    reason: str


def isolate_failures(stage: str, run: Callable[[list], list], inputs: Sequence, labels: Sequence[str]) -> list:
    """``run(inputs)``; if it raises, ``run([x])`` for each input, turning each error into a
    :class:`StageFailure`. If every input then fails, the original batch error is raised."""
    if not inputs:
        return []
    try:
        return list(run(list(inputs)))
    except Exception as batch_error:  # noqa: BLE001 -- re-raised below unless some inputs succeed
        if len(inputs) == 1:
            raise
        out: list = []
        for x, label in zip(inputs, labels, strict=True):
            try:
                out.extend(run([x]))
            except Exception as e:  # noqa: BLE001 -- recorded as this image's failure
                out.append(StageFailure(stage, f"{stage}: {label}: {type(e).__name__}: {e}"))
        if all(isinstance(r, StageFailure) for r in out):
            raise batch_error
        return out


def in_batches(stage: str, run: Callable[[list], list], inputs: Sequence, labels: Sequence[str], batch_size: int) -> list:
    out: list = []
    for i in range(0, len(inputs), batch_size):
        out.extend(isolate_failures(stage, run, inputs[i : i + batch_size], labels[i : i + batch_size]))
    return out
