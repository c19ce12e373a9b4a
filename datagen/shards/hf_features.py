"""Our shards as Hugging Face ``datasets`` sees them: the one declaration of their column types.

``datasets.load_dataset("webdataset", data_files=...)`` infers a schema from the first few samples
of the first shard; a record whose ``faces`` list is empty there (or whose ``face_checks`` is null)
infers ``null`` and the first later sample with a face stops the load (``Couldn't cast array of
type struct<...> to null``). Pass the types instead, and every shard loads as it is (no byte of a
shard changes)::

    import datasets
    from datagen.shards.hf_features import shard_features

    ds = datasets.load_dataset("webdataset", data_files={"train": "out/shards/subjects-*.tar"},
                               features=shard_features(), split="train")
    ds[0]["jpg"]            # PIL image (RGB)
    ds[0]["seg.png"]        # PIL image (16-bit grayscale: pixel value = segment id)
    ds[0]["json"]["caption"], ds[0]["json"]["segments"][0]["coco_label"]

In the ``json`` column every field of the record contract (:mod:`datagen.record.schema`) is typed;
a field a record does not have reads ``None`` (an unmatched segment's ``word``/``start``/``end``, a
non-person segment's ``faces``, a schema 1.0 record's ``face_checks``). ``models`` (stage -> model
id) is kept as JSON. Fields that stages outside the contract add (``Record.extra``) are dropped
unless their types are given: ``shard_features(extra={"my_field": datasets.Value("string")})``.

:func:`segment_feature` is also what ``export --format hf`` (:mod:`datagen.export.hf`) stores, so
the two read the same way. ``datasets`` is imported only when these are called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Provenance fields that only some sources fill (img2dataset collections): declared here so that a
# record from any source loads with the same types.
OPTIONAL_PROVENANCE_STRINGS = ("source_tar", "source_key", "alt_text")


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is in the test extra
        raise ImportError("reading shards with Hugging Face datasets needs the package `datasets` "
                          "(pip install datasets)") from e
    return datasets


def segment_feature() -> dict[str, Any]:
    """The type of one item of a record's ``segments`` (unmatched: ``word``/``start``/``end`` None)."""
    d = _datasets()
    f64, i64, text = d.Value("float64"), d.Value("int64"), d.Value("string")
    face = {"box": d.List(f64), "score": f64, "size": i64, "inside": f64}
    return {
        "id": i64, "coco_label": text, "category_id": i64, "is_thing": d.Value("bool"), "bbox": d.List(i64),
        "area": i64, "score": f64, "word": text, "start": i64, "end": i64, "match_score": f64, "clip_sim": f64,
        "sbert_sim": f64, "faces": d.List(face), "label_vocab": text,  # label_vocab: grounding sam3 only
    }


def face_checks_feature() -> dict[str, Any]:
    """The type of a record's ``face_checks`` (None: faces not checked)."""
    d = _datasets()
    primary = {"rect": d.List(d.Value("int64")), "segment_id": d.Value("int64"), "overlap": d.Value("float64"),
               "matched_person": d.Value("bool")}
    return {"small_face_px": d.Value("int64"), "primary_min_overlap": d.Value("float64"), "primary_face": primary,
            "flags": d.List(d.Value("string"))}


def provenance_feature() -> dict[str, Any]:
    """The type of a record's ``provenance`` (every source's fields; a field a source lacks: None)."""
    d = _datasets()
    f64, i64, text = d.Value("float64"), d.Value("int64"), d.Value("string")
    return {
        "source": text, "source_id": text, "path": text, "pixel_md5": text, "original_size": d.List(i64),
        "license": text, "license_url": text, "author": text, "photo_url": text, "photo_title": text,
        "face_rect": d.List(f64), "duplicate_of": text, **dict.fromkeys(OPTIONAL_PROVENANCE_STRINGS, text),
    }


def record_feature(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The type of a record (the shard's ``.json`` member); ``extra``: types of stage-added fields."""
    d = _datasets()
    f64, i64, text = d.Value("float64"), d.Value("int64"), d.Value("string")
    matrix = d.List(d.List(f64))
    return {
        "schema_version": text, "key": text, "caption": text, "caption_raw": text, "width": i64, "height": i64,
        "segments": d.List(segment_feature()),
        "phrases": d.List({"text": text, "start": i64, "end": i64, "segment_id": i64}),
        "scores": {"segment_ids": d.List(i64), "clip": matrix, "sbert": matrix, "product": matrix, "min_score": f64},
        "unmatched_phrases": d.List(i64), "unmatched_person_segments": d.List(i64),
        "caption_flags": d.List(text), "provenance": provenance_feature(), "split": text, "models": d.Json(),
        "face_checks": face_checks_feature(),
        # schema 1.2 (the identity stage): the faces found on the whole image; None in older records
        "identity_faces": d.List({"box": d.List(f64), "score": f64, "size": i64, "segment_id": i64,
                                  "embedded": d.Value("bool"), "reason": text, "identity": text}),
        "grounding": text,  # "sam3" on records of grounding: sam3; None on the panoptic path's
        **dict(extra or {}),
    }


def shard_features(extra: Mapping[str, Any] | None = None):
    """The ``datasets.Features`` of our shards' samples, for ``load_dataset("webdataset", ...,
    features=shard_features())``: ``jpg`` and ``seg.png`` images, the typed ``json`` record, and the
    ``__key__`` / ``__url__`` columns the webdataset builder adds."""
    d = _datasets()
    return d.Features({
        "jpg": d.Image(), "seg.png": d.Image(), "json": record_feature(extra),
        "__key__": d.Value("string"), "__url__": d.Value("string"),
    })
