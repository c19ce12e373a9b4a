"""The CPU work of a shard, as plain functions the job runs as Ray tasks.

A shard's non-duplicate items are cut, in plan order, into *chunks* of ``images_per_call``:

1. :func:`load_chunk` decodes, validates and downscales a chunk's images (a bad image, or one
   whose stored size is under ``MIN_SIDE``, becomes a recorded failure naming the file, never an
   exception);
2. the stage actors run the stage table's stages over the chunk (``ray_jobs.actors``);
3. :func:`encode_chunk` joins the stage outputs into validated records and encodes each sample's
   members (JPEG, 16-bit PNG, JSON), so only compact bytes wait for the shard to finish (an image
   whose record cannot be built or encoded fails alone, as ``"record: <file>: <error>"``);
4. :func:`write_shard_tar` writes every encoded sample of the shard, in plan order, into one tar
   atomically and returns the shard's sample outcomes (written / duplicate / failed + reason) and
   the rows of the stages' shard tables (``Step.shard_table``; the driver writes them).

Everything here is deterministic: the same items give the same bytes.
"""

from __future__ import annotations

import time
from typing import Any

from datagen import storage
from datagen.files import remove_stale_temps
from datagen.manifests.shard_entry import DUPLICATE, FAILED, WRITTEN
from datagen.shards.plan import ShardSpec
from datagen.shards.writer import ShardWriter, encode_jpeg, encode_segment_map
from datagen.sources.images import ImageError, load_images
from datagen.sources.items import SourceItem
from datagen.stage_table import Stage, outputs_by_stage
from datagen.stages.failures import StageFailure, failure_reason, size_problem
from ray_jobs.chunks import EncodedChunk, EncodedSample, LoadedChunk


def split_chunks(spec: ShardSpec, images_per_call: int) -> list[list[SourceItem]]:
    """The shard's items that need annotating (duplicates excluded), cut into chunks in plan order."""
    todo = [item for item in spec.items if item.duplicate_of is None]
    return [todo[i : i + images_per_call] for i in range(0, len(todo), images_per_call)]


def load_chunk(
    shard: int, chunk: int, items: list[SourceItem], max_side: int, verify_pixel_md5: bool = False
) -> LoadedChunk:
    """``verify_pixel_md5``: the ``shards.verify_pixel_md5`` setting (recompute metadata md5s).

    Every image that cannot be used (any error while loading it, or a stored size under
    :data:`~datagen.stages.failures.MIN_SIDE`) fails alone, as ``"load: <file>: <why>"``."""
    t = time.perf_counter()
    loaded, failed = [], {}
    for item, li in load_images(items, max_side=max_side, verify_md5=verify_pixel_md5):  # from a bucket: prefetched
        if isinstance(li, ImageError):
            failed[item.source_id] = f"load: {item.rel_path}: {li.reason}"
            continue
        if isinstance(li, Exception):  # one image's unexpected error fails that image alone
            failed[item.source_id] = failure_reason("load", item.rel_path, li)
            continue
        problem = size_problem(li.image.size)
        if problem is not None:
            failed[item.source_id] = f"load: {item.rel_path}: {problem} (original {li.original_size[0]}x{li.original_size[1]})"
            continue
        loaded.append(li)
    return LoadedChunk(shard=shard, chunk=chunk, loaded=loaded, failed=failed, seconds=time.perf_counter() - t)


def encode_chunk(
    chunk: LoadedChunk, stages: tuple[Stage, ...], models: dict[str, str], jpeg_quality: int, *outputs: list
) -> EncodedChunk:
    """Records + encoded members for a chunk. ``outputs`` holds one list per stage of ``stages`` (the
    build's stage table rows, in order; separate arguments, so that Ray hands the task their values),
    one item per loaded image, any of which may be a :class:`StageFailure`."""
    from datagen.record.build import record_from_outputs

    t = time.perf_counter()
    outcomes: dict[str, tuple[str, str | None]] = {sid: (FAILED, reason) for sid, reason in chunk.failed.items()}
    samples = []
    by_stage = outputs_by_stage(stages, outputs)
    tabled = [(st, step) for st in stages if (step := st.step_class()).shard_table]  # stages with a shard table
    for i, li in enumerate(chunk.loaded):
        sid = li.item.source_id
        image_outputs = {name: out[i] for name, out in by_stage.items()}
        failure = next((r for r in image_outputs.values() if isinstance(r, StageFailure)), None)
        if failure is not None:
            outcomes[sid] = (FAILED, failure.reason)
            continue
        try:
            record = record_from_outputs(li, image_outputs, models, stages)
            sample = EncodedSample(
                key=record.key,
                jpg=encode_jpeg(li.image, jpeg_quality),
                seg_png=encode_segment_map(image_outputs["segmenter"].segment_map),
                json=record.to_json().encode("utf-8"),
                shard_rows={st.name: step.shard_rows(record.key, image_outputs[st.name]) for st, step in tabled},
            )
        except Exception as e:  # noqa: BLE001 -- one image's record or encoding fails that image alone
            outcomes[sid] = (FAILED, failure_reason("record", li.item.rel_path, e))
            continue
        samples.append(sample)
        outcomes[sid] = (WRITTEN, None)
    return EncodedChunk(samples, outcomes, load_seconds=chunk.seconds, encode_seconds=time.perf_counter() - t)


def write_shard_tar(spec: ShardSpec, tar_path: str, *chunks: EncodedChunk) -> dict[str, Any]:
    """Write the shard's tar atomically; return ``sha256``, ``bytes``, the per-item ``samples``
    and the CPU seconds its chunks spent loading, encoding and writing (``cpu_seconds``).

    ``chunks`` are the shard's encoded chunks (separate arguments, so that Ray hands the task
    their values)."""
    t = time.perf_counter()
    path = storage.path(tar_path)
    remove_stale_temps(path.parent, path.name)  # left by an earlier, killed attempt
    by_id: dict[str, tuple[str, str | None]] = {}
    encoded: dict[str, EncodedSample] = {}
    for c in chunks:
        by_id.update(c.outcomes)
        encoded.update({s.key: s for s in c.samples})

    samples, to_write = [], []
    for item in spec.items:
        if item.duplicate_of is not None:
            status, reason = DUPLICATE, f"duplicate of source_id {item.duplicate_of} (same image)"
        elif item.source_id in by_id:
            status, reason = by_id[item.source_id]
        else:
            raise RuntimeError(f"{spec.name}: no outcome for source_id {item.source_id} ({item.rel_path})")
        if status == WRITTEN:
            to_write.append(encoded[item.key])
        samples.append(
            {"source_id": item.source_id, "key": item.key, "rel_path": item.rel_path, "status": status, "reason": reason}
        )

    with ShardWriter(path) as writer:
        for s in to_write:
            writer.write_encoded(s.key, s.jpg, s.seg_png, s.json)
    timings = {
        "load": round(sum(c.load_seconds for c in chunks), 4),
        "encode": round(sum(c.encode_seconds for c in chunks), 4),
        "write": round(time.perf_counter() - t, 4),
    }
    return {"sha256": writer.sha256, "bytes": writer.bytes, "samples": samples, "cpu_seconds": timings,
            "shard_rows": {name: [row for s in to_write for row in s.shard_rows.get(name, [])]
                           for name in {n for s in to_write for n in s.shard_rows}}}

