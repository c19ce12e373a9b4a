"""One image a stage cannot process fails alone: the rest of its chunk goes on.

A batch that raises is re-run one image at a time, so one image the model cannot handle fails
alone, as a :class:`StageFailure` whose reason names the stage, the file and the error (recorded in
the shard's manifest), while the others of the chunk are written.

When *every* image of a batch also fails on its own (a batch of one image included), the images
may be at fault, or the stage may be (a GPU gone, a model that no longer runs). The stage's
``probe`` tells which: a known-good input (a plain grey picture) is run through the same function.
If the probe passes, the images are at fault and each fails alone; if the probe fails too, the
stage is broken and the original error is raised, failing the chunk's shard, which the job
retries (on a restarted actor) and, at worst, records as failed. Without a probe, the images are
taken to be at fault.

Sizes no model can use are refused before any model sees them: :func:`size_problem` (the load
step's check, ``MIN_SIDE``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Shortest side, in pixels, of the image the models get (the stored image, after the long side was
# reduced to ``max_side``). Thinner images are refused at load: Mask2Former's processor scales the
# short side down with the long one and a 1x1024 image reaches it as 0 px wide (a ValueError from
# inside the processor), and a segment crop a few pixels wide says nothing to CLIP.
MIN_SIDE = 16


@dataclass
class StageFailure:
    """One image that a stage could not process; ``reason`` names the stage, the file and the error."""

    stage: str
    reason: str


class StageBroken(RuntimeError):
    """Every image of a batch failed and so did the stage's probe: the stage, not the images, is at fault."""


def failure_reason(stage: str, label: str, error: BaseException) -> str:
    """``"<stage>: <file>: <ErrorType>: <message>"``: what the manifest records for one image."""
    return f"{stage}: {label}: {type(error).__name__}: {error}"


def size_problem(size: tuple[int, int], min_side: int = MIN_SIDE) -> str | None:
    """Why an image of ``size`` (w, h, as the models get it) is refused, or ``None`` when usable."""
    w, h = size
    if min(w, h) < min_side:
        return f"image is {w}x{h} px as stored, under the minimum side of {min_side} px (too thin or too small for the models)"
    return None


def isolate_failures(
    stage: str,
    run: Callable[[list], list],
    inputs: Sequence,
    labels: Sequence[str],
    probe: Callable[[], object] | None = None,
) -> list:
    """``run(inputs)``; if it raises, ``run([x])`` for each input, turning each error into a
    :class:`StageFailure`. If every input then fails, ``run([probe()])`` decides (module doc): it
    passes -> the failures stand; it raises -> :class:`StageBroken` (from the batch error)."""
    if not inputs:
        return []
    try:
        out = list(run(list(inputs)))
    except Exception as batch_error:  # noqa: BLE001 -- isolated below, re-raised when the stage is broken
        errors: list[BaseException] = []
        out = []
        if len(inputs) == 1:
            errors.append(batch_error)
            out.append(StageFailure(stage, failure_reason(stage, labels[0], batch_error)))
        else:
            for x, label in zip(inputs, labels, strict=True):
                try:
                    out.extend(run([x]))
                except Exception as e:  # noqa: BLE001 -- recorded as this image's failure
                    errors.append(e)
                    out.append(StageFailure(stage, failure_reason(stage, label, e)))
        if len(errors) == len(inputs) and probe is not None:
            try:
                run([probe()])
            except Exception as probe_error:  # noqa: BLE001 -- the stage itself is broken
                raise StageBroken(
                    f"{stage}: every image of a batch failed ({', '.join(labels)}) and so did a plain test "
                    f"image ({type(probe_error).__name__}: {probe_error}); first error: "
                    f"{type(batch_error).__name__}: {batch_error}"
                ) from batch_error
    if len(out) != len(inputs):
        raise RuntimeError(f"{stage}: returned {len(out)} results for {len(inputs)} images")
    return out


def in_batches(
    stage: str,
    run: Callable[[list], list],
    inputs: Sequence,
    labels: Sequence[str],
    batch_size: int,
    probe: Callable[[], object] | None = None,
) -> list:
    out: list = []
    for i in range(0, len(inputs), batch_size):
        out.extend(isolate_failures(stage, run, inputs[i : i + batch_size], labels[i : i + batch_size], probe))
    return out
