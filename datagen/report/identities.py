"""The report's identities section, from the run's ``identities.parquet`` (``subject-ffhq identities``).

Figures: faces and identities, photos per identity (histogram, log scale so the long tail shows),
the share of embedded faces with a cross-image reference (``identities.json``'s ``faces_with_reference``),
the identities spanning the most photos (one identity over many photos usually means merged people:
the ``LARGE_PHOTOS`` threshold marks them), what the identity-safe split moved, and
``merged_identities``: person segments holding faces of two identities or more (proof, where
``merged_persons`` counts faces). A gallery row per identity (the largest first, ``ROWS`` of them)
shows up to ``PER_ROW`` face thumbnails, each from a different photo. ``None`` before the index exists;
an index without ``identities.json`` gets a note saying to re-run ``subject-ffhq identities``.
"""

from __future__ import annotations

import base64
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from datagen import storage
from datagen.report.charts import Chart, value_counts_chart
from datagen.report.values import percent_of, show
from datagen.shards.reader import iter_samples

ROWS, PER_ROW, THUMB = 6, 8, 72  # gallery: identities, faces per identity, thumbnail side (px)
LARGE_PHOTOS = 50  # an identity over more photos than this is listed as suspicious


@dataclass
class IdentitySection:
    headline: list[tuple[str, str, str]]
    chart: Chart
    largest: list[tuple[str, str, str]]  # identity, faces, photos
    rows: list[tuple[str, list[tuple[str, str]]]]  # identity label, [(face id, base64 JPEG)]
    note: str


def merged_identities(table) -> int:
    """Person segments (key, segment) holding faces of two identities or more (the records'
    ``identity_checks.merged_identities``, :func:`datagen.identity.index.merged_by_key`)."""
    from datagen.identity.index import merged_by_key

    return sum(len(segments) for segments in merged_by_key(table).values())


def identity_section(run_dir: Path, shards: list[dict], samples: list[dict]) -> IdentitySection | None:
    """The section's values (``shards``/``samples``: the run's table rows, to find each face's tar).
    Per-identity figures come from Arrow (one row per identity); only the gallery's ``ROWS`` identities'
    faces become Python rows. An index without ``identities.json`` (a step that stopped half way) is a
    section saying so, not an error."""
    import pyarrow.compute as pc

    from datagen.identity.index import IDENTITIES_SUMMARY, read_identities

    table = read_identities(run_dir)
    if table is None:
        return None
    summary_path = storage.path(run_dir) / IDENTITIES_SUMMARY
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    per = table.group_by("identity", use_threads=False).aggregate(
        [("identity_photos", "max"), ("identity_faces", "max")])
    ids = per.column("identity").to_pylist()
    photos = dict(zip(ids, per.column("identity_photos_max").to_pylist(), strict=True))
    faces = dict(zip(ids, per.column("identity_faces_max").to_pylist(), strict=True))
    multi = sum(1 for p in photos.values() if p >= 2)
    if summary is None:
        note = (f"index incomplete: {IDENTITIES_SUMMARY} is missing (the identities step stopped before its "
                f"end); re-run `subject-ffhq identities {storage.text(run_dir)}`. ")
        summary = {}
    else:
        note = ""
    cross = summary.get("faces_with_reference")
    split = summary.get("split") or {}
    headline = [
        ("identities", show(len(photos)), f"{show(table.num_rows)} embedded faces, {summary.get('embedder')} "
                                           f"threshold {summary.get('threshold')}"),
        ("faces with a cross-image reference", show(cross), percent_of(cross, table.num_rows) if cross is not None
         else "unknown: index incomplete"),
        ("identities in 2+ photos", show(multi), percent_of(multi, len(photos))),
        ("merged_identities", show(merged_identities(table)), "person segments with two identities' faces"),
        ("split: images moved", show(split.get("images_moved")),
         f"{show(split.get('identities_moved'))} identities; {show(split.get('to_train'))} to train, "
         f"{show(split.get('to_test'))} to test"),
    ]
    hist = defaultdict(int)
    for p in photos.values():
        hist[p] += 1
    chart = value_counts_chart({str(k): v for k, v in sorted(hist.items())}, "photos per identity", "photos", log=True)
    order = sorted(photos, key=lambda i: (-photos[i], i))
    largest = [(f"#{i}" + (" (suspicious)" if photos[i] > LARGE_PHOTOS else ""), show(faces[i]), show(photos[i]))
               for i in order[:10]]
    tars = {s["shard"]: s["tar"] for s in shards if isinstance(s.get("tar"), str) and s["tar"]}
    shown = table.filter(pc.is_in(table.column("identity"), value_set=pa.array(order[:ROWS], pa.int64())))
    gallery = _gallery(shown.to_pylist(), order[:ROWS],
                       {r["key"]: storage.path(tars[r["shard"]]) for r in samples if r["shard"] in tars})
    note += (f"identities over more than {LARGE_PHOTOS} photos are marked suspicious (usually merged people); "
             f"each gallery row is one identity, one face per photo")
    return IdentitySection(headline, chart, largest, gallery, note)


def _gallery(rows: list[dict], identities: list[int], tar_of: dict[str, Path]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Up to PER_ROW face thumbnails per identity, each from a different photo."""
    picked: dict[int, list[dict]] = {i: [] for i in identities}
    for r in rows:
        row = picked.get(r["identity"])
        if row is not None and len(row) < PER_ROW and all(x["key"] != r["key"] for x in row):
            row.append(r)
    boxes: dict[str, list] = {}
    by_tar: dict[Path, list[str]] = defaultdict(list)
    for key in sorted({r["key"] for row in picked.values() for r in row if r["key"] in tar_of}):
        by_tar[tar_of[key]].append(key)
    for tar, keys in by_tar.items():
        for key, sample in iter_samples(tar, keys):  # only the wanted samples are decoded
            boxes[key] = [(f.box, sample.image) for f in sample.record.identity_faces or []]
    out = []
    for i in identities:
        thumbs = []
        for r in picked[i]:
            if r["key"] in boxes and r["n"] < len(boxes[r["key"]]):
                box, image = boxes[r["key"]][r["n"]]
                thumbs.append((r["face"], _thumb(image, box)))
        out.append((f"#{i}", thumbs))
    return out


def _thumb(image: Any, box: list[float]) -> str:
    x0, y0, x1, y1 = box
    m = 0.15 * max(x1 - x0, y1 - y0)
    crop = image.crop((int(max(0, x0 - m)), int(max(0, y0 - m)), int(min(image.width, x1 + m)),
                       int(min(image.height, y1 + m))))
    crop.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    crop.convert("RGB").save(buf, format="JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")
