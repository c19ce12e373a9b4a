"""``hf``: a Hugging Face dataset (Parquet + a dataset card), loadable with ``datasets.load_dataset(OUT)``
and uploadable to the Hub as it is (``huggingface_hub.upload_folder(repo_id=..., folder_path=OUT,
repo_type="dataset")``)::

    OUT/data/<split>-subjects-NNNNN.parquet   one file per source shard and split, rows in shard order
    OUT/README.md                             the dataset card: YAML ``configs`` (train and test splits),
                                              what the columns are, the models and licences recorded
    OUT/export_summary.json                   counts, filters and what each filter dropped

Columns (types in the Parquet schema's ``huggingface`` metadata, so ``datasets`` decodes the images):
``key``, ``split``, ``image`` (the shard's JPEG, byte for byte), ``segment_map`` (the shard's 16-bit
PNG, pixel value = segment id, 0 = none), ``caption``, ``caption_raw``, ``segments`` (the record's,
typed as in :func:`datagen.shards.hf_features.segment_feature`: an unmatched segment's ``word`` /
``start`` / ``end`` are None), the match-quality fields of :mod:`datagen.record.quality`
(``n_matched``, ``n_subjects``, ``min_match_score``, ``mean_match_score``, ``min_margin``,
``quality_flags``), the face fields of :mod:`datagen.record.face_quality` (``faces_checked``,
``n_faces``, ``min_matched_face_size``, ``face_flags``), ``provenance`` and ``models``; with the
run's identity index (``export --identities RUN``) ``subject_identities`` (``{segment_id, identity}``
of each subject whose person the index knows) and ``identity_flags`` (the record's
``identity_checks.flags``, e.g. ``merged_identities``), both None without it.

Shards, filters, checks and the summary: :mod:`datagen.export.common`. Each Parquet file is written
atomically when its shard ends (:meth:`end_shard`), the card and the summary last; with ``--overwrite``
every ``data/*.parquet`` this export did not write (an earlier export's) is deleted before the card.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from datagen.config import DEFAULT_OBJECT_TYPES
from datagen.export.common import ExportFilters, SampleOutcome, ShardExport, Tally
from datagen.files import atomic_write
from datagen.record.face_quality import face_quality
from datagen.record.quality import AMBIGUOUS_MARGIN, match_quality, subject_segments
from datagen.record.schema import SPLITS, Record
from datagen.shards.hf_features import provenance_feature, segment_feature
from datagen.shards.reader import TarSample
from datagen.stages.model_loading import has_random_weights

DATA = "data"
CARD = "README.md"
ROW_GROUP = 100  # rows per Parquet row group: small groups keep the Hub's viewer and streaming light


def hf_features():
    """The ``datasets.Features`` of the export's rows."""
    import datasets as d

    f64, i64, text = d.Value("float64"), d.Value("int64"), d.Value("string")
    return d.Features({
        "key": text, "split": text, "image": d.Image(), "segment_map": d.Image(), "caption": text,
        "caption_raw": text, "segments": d.List(segment_feature()),
        "n_matched": i64, "n_subjects": i64, "min_match_score": f64, "mean_match_score": f64, "min_margin": f64,
        "quality_flags": d.List(text), "faces_checked": d.Value("bool"), "n_faces": i64,
        "min_matched_face_size": i64, "face_flags": d.List(text), "provenance": provenance_feature(),
        "models": d.Json(),
        "subject_identities": d.List({"segment_id": i64, "identity": i64}), "identity_flags": d.List(text),
    })


def hf_row(sample: TarSample, record: Record, object_types: tuple[str, ...],
           identity_of: Callable[[str, int], int | None] | None = None) -> dict[str, Any]:
    """One sample as a row of :func:`hf_features` (images as their shard bytes); ``identity_of(key,
    segment id)``: the run's index, when the export joined one."""
    q = match_quality(record, AMBIGUOUS_MARGIN)
    f = face_quality(record)
    subjects, _ = subject_segments(record, object_types)
    d = record.to_dict()
    return {
        "key": sample.key, "split": record.split,
        "image": {"bytes": sample.members["jpg"], "path": f"{sample.key}.jpg"},
        "segment_map": {"bytes": sample.members["seg.png"], "path": f"{sample.key}.seg.png"},
        "caption": record.caption, "caption_raw": record.caption_raw, "segments": d["segments"],
        "n_matched": q.n_matched, "n_subjects": len(subjects), "min_match_score": q.min_match_score,
        "mean_match_score": q.mean_match_score, "min_margin": q.min_margin, "quality_flags": list(q.flags),
        "faces_checked": f.checked, "n_faces": f.n_faces, "min_matched_face_size": f.min_matched_face_size,
        "face_flags": [name for name, on in f.flags.items() if on], "provenance": d["provenance"],
        "models": dict(record.models),
        "subject_identities": None if record.identity_checks is None or identity_of is None else [
            {"segment_id": s.id, "identity": i} for s in subjects if (i := identity_of(record.key, s.id)) is not None],
        "identity_flags": None if record.identity_checks is None else list(record.identity_checks.flags),
    }


def parquet_bytes(rows: list[dict[str, Any]], features) -> bytes:
    """``rows`` as one Parquet file whose schema carries the ``datasets`` features."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([features.encode_example(r) for r in rows], schema=features.arrow_schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP)
    return buf.getvalue()


class HFExport(ShardExport):
    """Parquet files with ``Image`` features and a dataset card (the module docstring)."""

    name = "hf"

    def __init__(self, out: str | Path, filters: ExportFilters | None = None,
                 object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES):
        super().__init__(out, filters, object_types)
        self.rows: dict[str, list[dict[str, Any]]] = {}  # split -> rows of the shard being walked

    def write_sample(self, sample: TarSample, record: Record) -> SampleOutcome:
        sample.checked_segment_map(record)  # the map decodes and fits the image before it is exported
        self.rows.setdefault(record.split, []).append(hf_row(sample, record, self.object_types,
                                                                 self.filters.segment_identity))
        licence = " ".join((record.provenance.license or "unknown").split())  # one line in the card
        counts = {f"licence:{licence}": 1, **{f"model:{k}={v}": 1 for k, v in record.models.items()}}
        return SampleOutcome(sample.key, record.split, counts=counts)

    def end_shard(self, tar_name: str) -> None:
        if not self.rows:
            return
        features = hf_features()
        stem = tar_name.removesuffix(".tar")
        for split, rows in sorted(self.rows.items()):
            atomic_write(self.out / DATA / f"{split}-{stem}.parquet", parquet_bytes(rows, features))
        self.rows = {}

    def finish(self, tally: Tally) -> tuple[dict[str, Any], dict[str, Any]]:
        splits = [s for s in SPLITS if s in set(tally.kept.values())]
        per_split = {s: sum(1 for v in tally.kept.values() if v == s) for s in SPLITS}
        licences = {k.removeprefix("licence:"): n for k, n in sorted(tally.counts.items()) if k.startswith("licence:")}
        models = sorted({k.removeprefix("model:") for k in tally.counts if k.startswith("model:")})
        atomic_write(self.out / CARD, dataset_card(splits, per_split, licences, models, self.object_types))
        remove_stale_parquet(self.out / DATA, written_parquet(tally))
        return {"train": per_split["train"], "test": per_split["test"], "subjects": None}, {"licences": licences}


def written_parquet(tally: Tally) -> set[str]:
    """The names of the Parquet files this export wrote: one per (split, shard) with a kept sample
    (:meth:`HFExport.end_shard` runs in the worker processes; the tally says what they wrote)."""
    return {f"{split}-{tally.shard_of[key].removesuffix('.tar')}.parquet" for key, split in tally.kept.items()}


def remove_stale_parquet(data: Path, written: set[str]) -> None:
    """Delete every ``data/*.parquet`` this export did not write (an earlier export's, left by
    ``--overwrite``): ``load_dataset(OUT)`` reads every file its card's patterns match."""
    if isinstance(data, Path) and not data.is_dir():
        return
    for stale in data.glob("*.parquet"):
        if stale.name not in written:
            stale.unlink()


def dataset_card(splits: list[str], per_split: dict[str, int], licences: dict[str, int], models: list[str],
                 object_types: tuple[str, ...]) -> str:
    """The ``README.md`` the Hub and ``datasets.load_dataset(OUT)`` read: YAML ``configs`` first."""
    meta = {
        "configs": [{"config_name": "default", "data_files": [
            {"split": s, "path": f"{DATA}/{s}-*.parquet"} for s in splits]}],
        "license": "other",
        "task_categories": ["text-to-image"],
        "tags": ["subject-ffhq", "fastcomposer", "webdataset-export"],
    }
    random = [m for m in models if has_random_weights(m.partition("=")[2])]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    if random:
        lines += ["**Made with random weights** (" + ", ".join(random) + "): captions, segments and matches are "
                  "meaningless; this dataset shows only the plumbing.", ""]
    lines += [
        "# subject-ffhq export", "",
        "Subject-augmented images in FastComposer's format, exported by `subject-ffhq export --format hf`: "
        "per image the RGB JPEG (`image`), the 16-bit segment-id map (`segment_map`, 0 = no segment), the "
        "caption, its `segments` (COCO label, box, and for matched ones the phrase `word` and its span "
        "`start`/`end` in the caption), match-quality and face-check fields, and provenance.", "",
        "    import datasets", "    ds = datasets.load_dataset(\"PATH_OR_REPO\")", "",
        "| split | rows |", "|---|---|", *(f"| {s} | {per_split[s]} |" for s in splits), "",
        f"Subjects are the matched segments labelled {', '.join(object_types)}.", "",
        "## Models", "", *(f"- `{m}`" for m in models), "",
        "## Licences", "",
        "Each row's `provenance` names its photo's licence, author and URL; rows per licence:", "",
        *(f"- {name}: {n}" for name, n in licences.items()), "",
    ]
    return "\n".join(lines)
