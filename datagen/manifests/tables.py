"""The run's tables: ``shards.parquet``, ``samples.parquet`` and ``summary.json`` in ``manifests/<run>/``.

Built from the run folder (``run.json`` + the per-shard entries) and the records inside the shards
the entries name; see :mod:`datagen.manifests.shard_entry`.

* ``shards.parquet``: one row per shard with an entry: index, name, status (``done`` / ``failed``),
  error, attempts, tar path (null for a failed shard), sha256, bytes, seconds, samples (source items
  planned into the shard), written / skipped (duplicates) / failed.
* ``samples.parquet``: one row per **source image** of every finished shard, in shard and plan
  order, whatever became of it: ``status`` is ``written``, ``duplicate`` or ``failed`` with its
  ``reason``. Written rows carry the record's caption, split, counts and the match quality of
  :mod:`datagen.record.quality` (scores, weakest score, margin, flags) and the face checks of
  :mod:`datagen.record.face_quality` (faces per person segment, matched face sizes, the segment
  covering the source's face rect, the face flags; null where the record's faces were not checked);
  other rows leave those null.
* ``summary.json``: first a ``note`` (what the numbers are worth) and ``random_weights`` (true
  when the run was made with random weights, see :func:`random_weights`: its captions, segments
  and matches are then meaningless), then counts and distributions (histograms of match scores,
  weakest scores, margins, subjects / person segments / segments / phrases per image, faces per
  person segment, matched face sizes, failures by reason, flag counts; ``flagged`` counts images
  with any match or face flag, ``face_flagged`` those with a face flag), and the same figures per
  object type (``object_types``, ``by_object_type``:
  for each COCO label of the run's ``subjects.object_types``, read from ``run.json``, or of an
  ``object_types`` given: images with such a segment and with such a subject, segments, matched and
  unmatched ones, matched ones per image, and the histogram and quantiles of their match scores).
  ``samples.parquet`` does not depend on the object types (``segment_labels`` and ``matched_labels``
  carry every label), so the figures of other object types come from the same tables
  (:func:`build_summary` with ``object_types``; the report does that for ``--object-types``).

Every row of the tables is checked against the shards: a written sample the tar lacks, or a tar
sample the entry does not list, is an error naming both. Files are written atomically.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datagen import storage
from datagen.config import DEFAULT_OBJECT_TYPES
from datagen.files import atomic_write
from datagen.manifests.run_manifest import RunFolderError, load_run_manifest
from datagen.manifests.shard_entry import SHARD_DONE, check_tar, load_shard_entries
from datagen.record.face_quality import face_quality
from datagen.record.quality import AMBIGUOUS_MARGIN, FLAG_NAMES, match_quality
from datagen.record.schema import FACE_FLAG_NAMES
from datagen.shards.reader import iter_shard_records

SHARDS_TABLE = "shards.parquet"
SAMPLES_TABLE = "samples.parquet"
SUMMARY = "summary.json"
SCORE_BINS = 40
TABLES_VERSION = 5  # bump when the tables' columns or summary.json's fields change: older tables get rebuilt

SHARDS_SCHEMA = pa.schema([
    ("shard", pa.int32()),
    ("name", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("attempts", pa.int32()),
    ("tar", pa.string()),
    ("sha256", pa.string()),
    ("bytes", pa.int64()),
    ("seconds", pa.float64()),
    ("samples", pa.int32()),
    ("written", pa.int32()),
    ("skipped", pa.int32()),
    ("failed", pa.int32()),
])

SAMPLES_SCHEMA = pa.schema([
    ("source_id", pa.string()),
    ("key", pa.string()),
    ("rel_path", pa.string()),
    ("shard", pa.int32()),
    ("shard_name", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("reason_kind", pa.string()),
    ("split", pa.string()),
    ("duplicate_of", pa.string()),
    ("caption", pa.string()),
    ("caption_raw", pa.string()),
    ("caption_flags", pa.list_(pa.string())),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("n_phrases", pa.int32()),
    ("n_segments", pa.int32()),
    ("n_person_segments", pa.int32()),
    ("n_matched", pa.int32()),
    ("n_matched_person", pa.int32()),
    ("n_unmatched_phrases", pa.int32()),
    ("n_unmatched_person_segments", pa.int32()),
    ("segment_labels", pa.list_(pa.string())),  # every segment's COCO label, in segment order
    ("match_scores", pa.list_(pa.float64())),
    ("match_margins", pa.list_(pa.float64())),
    ("matched_words", pa.list_(pa.string())),
    ("matched_labels", pa.list_(pa.string())),
    ("matched_segment_ids", pa.list_(pa.int32())),
    ("min_match_score", pa.float64()),
    ("mean_match_score", pa.float64()),
    ("min_margin", pa.float64()),
    *[(name, pa.bool_()) for name in FLAG_NAMES],
    ("faces_checked", pa.bool_()),
    ("n_faces", pa.int32()),
    ("faces_per_person_segment", pa.list_(pa.int32())),
    ("matched_face_sizes", pa.list_(pa.int32())),
    ("min_matched_face_size", pa.int32()),
    ("primary_face_segment", pa.int32()),
    ("primary_face_label", pa.string()),
    ("primary_face_overlap", pa.float64()),
    *[(name, pa.bool_()) for name in FACE_FLAG_NAMES],
])


@dataclass
class ManifestTables:
    shards: Path
    samples: Path
    summary: Path


def random_weights(run: dict) -> bool:
    """True when ``run.json`` says the run was made with random weights: the ``tiny`` profile, or
    any profile whose config carries ``random_weights: true``."""
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return run.get("profile") == "tiny" or config.get("random_weights") is True


def random_weights_note(run: dict) -> str:
    profile = run.get("profile") if isinstance(run.get("profile"), str) else "?"
    return (f"Made with random weights (profile {profile}): captions, segments and matches are meaningless; "
            "this run shows only the plumbing.")


def run_object_types(run: dict) -> tuple[str, ...]:
    """The object types the run's profile names (``run.json``'s ``config.subjects.object_types``);
    the default (``person``) for runs made before the setting existed."""
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    subjects = config.get("subjects") if isinstance(config.get("subjects"), dict) else {}
    types = subjects.get("object_types")
    if isinstance(types, list | tuple) and types and all(isinstance(t, str) and t for t in types):
        return tuple(types)
    return DEFAULT_OBJECT_TYPES


def reason_kind(reason: str | None) -> str | None:
    """Group failure reasons: the text before the first ':' (e.g. ``ImageError``), digits as '#'."""
    if reason is None:
        return None
    head = reason.strip().splitlines()[0] if reason.strip() else "(empty reason)"
    if ":" in head and len(head.split(":", 1)[0]) <= 60:
        head = head.split(":", 1)[0]
    return re.sub(r"\d+", "#", head)[:80]


def build_tables(
    run_dir: Path,
    shards_dir: str | Path | None = None,
    verify_sha256: bool = False,
    ambiguous_margin: float = AMBIGUOUS_MARGIN,
) -> tuple[pa.Table, pa.Table]:
    """The shard and sample tables of a run, checked against the shards."""
    entries = load_shard_entries(run_dir, shards_dir)
    shard_rows, sample_rows = [], []
    for e in entries:
        check_tar(e, verify_sha256)
        shard_rows.append({
            "shard": e.shard, "name": e.name, "status": e.status, "error": e.error, "attempts": e.attempts,
            "tar": str(e.tar) if e.status == SHARD_DONE else None, "sha256": e.sha256, "bytes": e.bytes,
            "seconds": e.seconds, "samples": len(e.samples), "written": e.written, "skipped": e.skipped,
            "failed": e.failed,
        })
        records = {}
        for rec in iter_shard_records(e.tar) if e.status == SHARD_DONE else ():
            if rec.key in records:
                raise RunFolderError(f"{e.tar.name}: sample key {rec.key} appears twice")
            records[rec.key] = rec
        listed = {s["key"] for s in e.samples if s["status"] == "written"}
        extra = sorted(set(records) - listed)
        if extra:
            raise RunFolderError(f"{e.tar.name} holds sample(s) {extra[:10]} that {e.path.name} does not list as written")
        for s in e.samples:
            row = {
                "source_id": str(s["source_id"]), "key": str(s["key"]), "rel_path": s.get("rel_path"),
                "shard": e.shard, "shard_name": e.name, "status": s["status"], "reason": s["reason"],
                "reason_kind": reason_kind(s["reason"]) if s["status"] == "failed" else None,
            }
            if s["status"] == "written":
                rec = records.get(row["key"])
                if rec is None:
                    raise RunFolderError(f"{e.path.name} lists sample {row['key']} as written, but {e.tar.name} lacks it")
                if rec.provenance.source_id != row["source_id"]:
                    raise RunFolderError(
                        f"{e.tar.name}: sample {row['key']} is source {rec.provenance.source_id!r}, "
                        f"{e.path.name} says {row['source_id']!r}"
                    )
                row.update(_record_columns(rec, ambiguous_margin))
            sample_rows.append(row)
    return (
        pa.Table.from_pylist(shard_rows, schema=SHARDS_SCHEMA),
        pa.Table.from_pylist(sample_rows, schema=SAMPLES_SCHEMA),
    )


def _record_columns(rec, ambiguous_margin: float) -> dict:
    q = match_quality(rec, ambiguous_margin)
    return {
        "split": rec.split, "duplicate_of": rec.provenance.duplicate_of, "caption": rec.caption,
        "caption_raw": rec.caption_raw, "caption_flags": list(rec.caption_flags),
        "width": rec.width, "height": rec.height,
        "n_phrases": q.n_phrases, "n_segments": q.n_segments, "n_person_segments": q.n_person_segments,
        "n_matched": q.n_matched, "n_matched_person": q.n_matched_person,
        "n_unmatched_phrases": q.n_unmatched_phrases, "n_unmatched_person_segments": q.n_unmatched_person_segments,
        "segment_labels": [s.coco_label for s in rec.segments],
        "match_scores": q.match_scores, "match_margins": q.match_margins, "matched_words": q.matched_words,
        "matched_labels": q.matched_labels, "matched_segment_ids": q.matched_segment_ids,
        "min_match_score": q.min_match_score, "mean_match_score": q.mean_match_score, "min_margin": q.min_margin,
        **{name: getattr(q, name) for name in FLAG_NAMES},
        **_face_columns(rec),
    }


def _face_columns(rec) -> dict:
    f = face_quality(rec)
    return {
        "faces_checked": f.checked, "n_faces": f.n_faces,
        "faces_per_person_segment": f.faces_per_person_segment if f.checked else None,
        "matched_face_sizes": f.matched_face_sizes if f.checked else None,
        "min_matched_face_size": f.min_matched_face_size, "primary_face_segment": f.primary_face_segment,
        "primary_face_label": f.primary_face_label, "primary_face_overlap": f.primary_face_overlap,
        **f.flags,
    }


def build_summary(run_dir: Path, shards: pa.Table, samples: pa.Table, ambiguous_margin: float,
                  object_types: tuple[str, ...] | None = None) -> dict:
    """``object_types``: the labels of the per-type figures (default: the run's, see :func:`run_object_types`)."""
    rows = samples.to_pylist()
    written = [r for r in rows if r["status"] == "written"]
    run = load_run_manifest(run_dir)
    object_types = tuple(object_types) if object_types else run_object_types(run)
    all_scores = [v for r in written for v in r["match_scores"]]
    weakest = [r["min_match_score"] for r in written if r["min_match_score"] is not None]
    margins = [r["min_margin"] for r in written if r["min_margin"] is not None]

    face_sizes = [v for r in written for v in (r["matched_face_sizes"] or [])]
    random = random_weights(run)
    return {
        "note": random_weights_note(run) if random else
        f"Counts and distributions of run {storage.path(run_dir).name}, from its manifests and the records in its shards.",
        "random_weights": random,
        "tables_version": TABLES_VERSION,
        "run": storage.path(run_dir).name,
        "run_dir": str(run_dir),
        "has_run_manifest": bool(run),
        "thresholds": {"ambiguous_margin": ambiguous_margin},
        "counts": summary_counts(rows, written, shards),
        "shard_bytes": int(sum(shards.column("bytes").to_pylist())),
        "shard_seconds": float(sum(shards.column("seconds").to_pylist())),
        "histograms": {
            "match_score": histogram(all_scores, SCORE_BINS),
            "min_match_score": histogram(weakest, SCORE_BINS),
            "min_margin": histogram(margins, SCORE_BINS),
            "matched_face_size": histogram(face_sizes, SCORE_BINS),
        },
        "quantiles": {
            "match_score": quantiles(all_scores),
            "min_match_score": quantiles(weakest),
            "min_margin": quantiles(margins),
        },
        "per_image": {
            name: value_counts(r[name] for r in written)
            for name in ("n_matched", "n_matched_person", "n_person_segments", "n_segments", "n_phrases")
        },
        "per_person_segment": {
            "n_faces": value_counts(n for r in written for n in (r["faces_per_person_segment"] or [])),
        },
        "matched_labels": dict(Counter(lbl for r in written for lbl in r["matched_labels"]).most_common(30)),
        "object_types": list(object_types),
        "by_object_type": {t: by_object_type(written, t) for t in object_types},
        "failures_by_reason": failures_by_reason([r for r in rows if r["status"] == "failed"]),
        "grounding": grounding_summary(run, written),
    }


GROUNDING_SCORES = {"panoptic": "CLIP × SBERT score", "sam3": "SAM 3 score"}  # what a match score is


def grounding_summary(run: dict, written: list[dict]) -> dict:
    """Which grounding the run used (``run.json``'s ``config.grounding``; panoptic for runs made before
    the setting) and, per matched label, its vocabulary (COCO panoptic or open) and the quantiles of
    its subjects' match scores (the grounding's own score), the most frequent labels first."""
    from datagen.config import coco_panoptic_labels

    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    method = config.get("grounding") or "panoptic"
    scores: dict[str, list[float]] = {}
    for r in written:
        for v, lbl in zip(r["match_scores"], r["matched_labels"], strict=True):
            scores.setdefault(lbl, []).append(v)
    coco = set(coco_panoptic_labels())
    by_label = {lbl: {"vocabulary": "coco" if lbl in coco else "open", "subjects": len(v), "quantiles": quantiles(v)}
                for lbl, v in sorted(scores.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:30]}
    return {"method": method, "score": GROUNDING_SCORES.get(method, "match score"), "by_label": by_label}


def failures_by_reason(failed: list[dict]) -> dict[str, dict]:
    """The failed rows by kind of reason, the most frequent first: the count and up to 5 examples each."""
    failures: dict[str, dict] = {}
    for r in failed:
        f = failures.setdefault(r["reason_kind"], {"count": 0, "examples": []})
        f["count"] += 1
        if len(f["examples"]) < 5:
            f["examples"].append({"source_id": r["source_id"], "key": r["key"], "reason": r["reason"]})
    return dict(sorted(failures.items(), key=lambda kv: (-kv[1]["count"], kv[0])))


def summary_counts(rows: list[dict], written: list[dict], shards: pa.Table) -> dict[str, int]:
    """The headline counts of a run: shards, samples by status and split, segments, phrases, matches,
    flags and faces (over the written rows)."""
    status = Counter(r["status"] for r in rows)
    shard_status = Counter(shards.column("status").to_pylist())
    return {
        "shards": shards.num_rows,
        "shards_failed": shard_status["failed"],
        "sources": len(rows),
        "written": status["written"],
        "duplicate": status["duplicate"],
        "failed": status["failed"],
        "train": sum(1 for r in written if r["split"] == "train"),
        "test": sum(1 for r in written if r["split"] == "test"),
        "with_match": sum(1 for r in written if r["n_matched"]),
        "with_matched_person": sum(1 for r in written if r["n_matched_person"]),
        "segments": sum(r["n_segments"] for r in written),
        "person_segments": sum(r["n_person_segments"] for r in written),
        "phrases": sum(r["n_phrases"] for r in written),
        "matches": sum(r["n_matched"] for r in written),
        "matched_persons": sum(r["n_matched_person"] for r in written),
        "flagged": sum(1 for r in written if any(r[f] for f in (*FLAG_NAMES, *FACE_FLAG_NAMES))),
        **{f: sum(1 for r in written if r[f]) for f in FLAG_NAMES},
        "faces_checked": sum(1 for r in written if r["faces_checked"]),
        "with_face_rect": sum(1 for r in written if r["primary_face_overlap"] is not None),
        "faces": sum(r["n_faces"] or 0 for r in written),
        "face_flagged": sum(1 for r in written if any(r[f] for f in FACE_FLAG_NAMES)),
        **{f: sum(1 for r in written if r[f]) for f in FACE_FLAG_NAMES},
    }


def by_object_type(written: list[dict], label: str) -> dict:
    """The figures of one object type over the written rows: images with a segment / a subject
    (matched segment) of that COCO label, its segments, matched and unmatched, subjects per image,
    and the histogram and quantiles of its subjects' match scores."""
    segments = [sum(1 for lbl in r["segment_labels"] or [] if lbl == label) for r in written]
    scores_per_row = [[v for v, lbl in zip(r["match_scores"], r["matched_labels"], strict=True) if lbl == label]
                      for r in written]
    scores = [v for row in scores_per_row for v in row]
    return {
        "images_with_segment": sum(1 for n in segments if n),
        "images_with_subject": sum(1 for row in scores_per_row if row),
        "segments": sum(segments),
        "subjects": len(scores),
        "unmatched_segments": sum(segments) - len(scores),
        "subjects_per_image": value_counts(len(row) for row in scores_per_row),
        "match_score": histogram(scores, SCORE_BINS),
        "match_score_quantiles": quantiles(scores),
    }


def histogram(values: list[float], bins: int) -> dict:
    """Equal-width bins over [min, max] of the values: ``{"edges": [...], "counts": [...]}``."""
    if not values:
        return {"edges": [], "counts": []}
    lo, hi = min(values), max(values)
    if hi <= lo:
        lo, hi = lo - 0.005, hi + 0.005
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return {"edges": [round(lo + i * width, 6) for i in range(bins + 1)], "counts": counts}


def quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"min": s[0], "p01": q(0.01), "p05": q(0.05), "p25": q(0.25), "median": q(0.5),
            "p75": q(0.75), "p95": q(0.95), "max": s[-1], "mean": math.fsum(s) / len(s)}


def value_counts(values) -> dict[str, int]:
    """Integer value -> count, every value from 0 to the maximum listed (zeros included)."""
    c = Counter(values)
    if not c:
        return {}
    return {str(v): c.get(v, 0) for v in range(0, max(c) + 1)}


def write_manifest_tables(
    run_dir: str | Path,
    shards_dir: str | Path | None = None,
    verify_sha256: bool = False,
    ambiguous_margin: float = AMBIGUOUS_MARGIN,
) -> ManifestTables:
    """Build and write ``shards.parquet``, ``samples.parquet`` and ``summary.json`` into the run folder."""
    run_dir = storage.path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    shards, samples = build_tables(run_dir, shards_dir, verify_sha256, ambiguous_margin)
    summary = build_summary(run_dir, shards, samples, ambiguous_margin)
    out = ManifestTables(run_dir / SHARDS_TABLE, run_dir / SAMPLES_TABLE, run_dir / SUMMARY)
    atomic_write(out.shards, _parquet_bytes(shards))
    atomic_write(out.samples, _parquet_bytes(samples))
    atomic_write(out.summary, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return out


def read_table(path, columns: list[str] | None = None) -> pa.Table:
    """One of the run's Parquet tables (``columns`` of it, default all), from a path or a URL."""
    with storage.path(path).open("rb") as f:
        return pq.read_table(f, columns=columns)


def tables_are_current(run_dir: Path) -> bool:
    """True when the tables exist, were written by this version, and are newer than every shard
    entry and ``run.json``."""
    run_dir = storage.path(run_dir)
    outs = [run_dir / n for n in (SHARDS_TABLE, SAMPLES_TABLE, SUMMARY)]
    if not all(p.is_file() for p in outs):
        return False
    try:
        if json.loads((run_dir / SUMMARY).read_text(encoding="utf-8")).get("tables_version") != TABLES_VERSION:
            return False
    except (OSError, ValueError, AttributeError):
        return False
    built = min(p.stat().st_mtime for p in outs)
    inputs = list((run_dir / "shards").glob("subjects-*.json")) + [run_dir / "run.json"]
    return all(p.stat().st_mtime <= built for p in inputs if p.is_file())


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def ensure_tables(run_dir: Path, shards_dir: str | Path | None = None, rebuild: bool = False) -> ManifestTables:
    """The run's tables, (re)built first when missing, older than the run's manifests, or asked to
    (``rebuild``, or a ``shards_dir`` override, whose tar paths the tables then record)."""
    run_dir = storage.path(run_dir)
    if rebuild or shards_dir is not None or not tables_are_current(run_dir):
        return write_manifest_tables(run_dir, shards_dir)
    return ManifestTables(run_dir / SHARDS_TABLE, run_dir / SAMPLES_TABLE, run_dir / SUMMARY)


def find_sample(samples: pa.Table, sample_id: str) -> dict:
    """The row of a source image by source id or sample key ("42" finds key "00042" too)."""
    ids = samples.column("source_id").to_pylist()
    keys = samples.column("key").to_pylist()
    want = str(sample_id).strip()
    for i, (sid, key) in enumerate(zip(ids, keys, strict=True)):
        if want in (sid, key) or (want.isdigit() and key.isdigit() and int(want) == int(key)):
            return samples.slice(i, 1).to_pylist()[0]
    raise KeyError(f"no source image with id or key {want!r} in this run ({len(ids)} source images)")
