"""A finished run with identities, for the cross-image reference tests: the trainer's shards of the
bundled sample (hand-drawn person segments around every face the metadata knows:
:mod:`fixtures.training_shards`), the real identity stage (MTCNN + dlib's real weights) on each
record's image and segments, the face tables, ``subject-ffhq identities`` (index, split, pairs) and
the reference set it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datagen.config import IdentitySettings
from datagen.manifests.face_table import face_rows, write_face_table
from datagen.stages.identity import IdentityFinder
from datagen.stages.segmenter import PanopticResult, SegmentInfo
from fixtures.training_shards import build_training_shards, training_records


def panoptic_of(segment_map, record) -> PanopticResult:
    """The record's segments as the segmenter would have given them."""
    return PanopticResult(segment_map=segment_map, segments=[
        SegmentInfo(id=s.id, category_id=s.category_id, coco_label=s.coco_label, is_thing=s.is_thing, score=s.score,
                    bbox=list(s.bbox), area=s.area) for s in record.segments])


def make_identity_run(sample_root: Path, root: Path) -> dict:
    """``{"run": run folder, "shards_dir", "shards": [tar paths], "records": {key: (image, map, record)}}``."""
    from cli.main import main

    shards_dir, run = root / "shards", root / "run"
    shards = build_training_shards(sample_root, shards_dir)
    records = training_records(sample_root)
    finder = IdentityFinder(IdentitySettings(embedder="dlib", device="cpu"), "mtcnn", "cpu")
    for k, _ in enumerate(shards):
        part = records[k::len(shards)]
        found = finder.find([image for image, _, _ in part], [panoptic_of(m, r) for _, m, r in part])
        write_face_table(run, f"subjects-{k:05d}",
                         [row for (_, _, r), faces in zip(part, found, strict=True) for row in face_rows(r.key, faces)])
    pq.write_table(pa.table({"key": [r.key for _, _, r in records], "split": [r.split for _, _, r in records],
                             "status": ["written"] * len(records),
                             "shard_name": [f"subjects-{i % len(shards):05d}" for i in range(len(records))]}),
                   run / "samples.parquet")
    (run / "run.json").write_text(json.dumps({"shards_dir": str(shards_dir),
                                              "config": {"identity": {"embedder": "dlib"}}}))
    assert main(["identities", str(run)]) == 0
    return {"run": run, "shards_dir": shards_dir, "shards": [str(p) for p in shards],
            "records": {r.key: (image, m, r) for image, m, r in records}}
