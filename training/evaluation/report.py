"""The evaluation's outputs: the per-image Parquet table, ``summary.json`` and ``evaluation.html``.

With random weights (any model of the evaluation is a tiny random model) each output says so first:
the table's first column ``random_weights`` and its schema metadata's first key ``notice``, the
summary's first field ``notice``, the page's title and first line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation.protocol import BASELINE, OURS

TABLE = "results.parquet"
SUMMARY = "summary.json"
PAGE = "evaluation.html"


def random_notice(models: list[str]) -> str:
    return ("RANDOM WEIGHTS: this evaluation used randomly initialised models (" + ", ".join(models) + "); "
            "its images and scores are meaningless and show only the plumbing.")


def table_schema():
    import pyarrow as pa

    floats = pa.list_(pa.float64())
    return pa.schema([
        ("random_weights", pa.bool_()), ("id", pa.int64()), ("method", pa.string()),
        ("subjects", pa.list_(pa.string())), ("words", pa.list_(pa.string())), ("prompt_index", pa.int64()),
        ("category", pa.string()), ("template", pa.string()), ("text", pa.string()), ("image_index", pa.int64()),
        ("seed", pa.int64()), ("image_path", pa.string()), ("faces_found", pa.int64()),
        ("face_boxes", pa.list_(floats)), ("face_scores", floats), ("similarity", pa.list_(floats)),
        ("subject_similarity", floats), ("face_of_subject", pa.list_(pa.int64())), ("identity", pa.float64()),
        ("prompt_consistency", pa.float64()), ("seconds_generate", pa.float64()), ("seconds_score", pa.float64()),
    ])


def table_bytes(rows: list[dict[str, Any]], random_weights: bool, notice: str | None, meta: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = table_schema()
    data = [{**r, "random_weights": random_weights} for r in sorted(rows, key=lambda r: r["id"])]
    metadata = {}
    if notice:
        metadata["notice"] = notice
    metadata["random_weights"] = json.dumps(random_weights)
    metadata["evaluation"] = json.dumps(meta, sort_keys=True)
    table = pa.Table.from_pylist(data, schema=schema).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(arr.mean()), 6), "std": round(float(arr.std()), 6)}


def method_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    identity = [r["identity"] for r in rows]
    prompt = [r["prompt_consistency"] for r in rows]
    by_category: dict[str, dict[str, Any]] = {}
    for cat in sorted({r["category"] for r in rows}):
        sub = [r for r in rows if r["category"] == cat]
        by_category[cat or "-"] = {"identity": _stats([r["identity"] for r in sub])["mean"],
                                   "prompt_consistency": _stats([r["prompt_consistency"] for r in sub])["mean"],
                                   "images": len(sub)}
    return {
        "identity": _stats(identity)["mean"],
        "identity_std": _stats(identity)["std"],
        "prompt_consistency": _stats(prompt)["mean"],
        "prompt_consistency_std": _stats(prompt)["std"],
        "images": len(rows),
        "images_with_a_face": sum(r["faces_found"] > 0 for r in rows),
        "images_with_a_face_per_subject": sum(r["faces_found"] >= len(r["subjects"]) for r in rows),
        "seconds_per_image": _stats([r["seconds_generate"] for r in rows])["mean"],
        "by_category": by_category,
    }


def build_summary(rows: list[dict[str, Any]], *, notice: str | None, random_models: list[str], header: dict[str, Any],
                  leak: dict[str, Any] | None, seconds: dict[str, float]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    summary["notice"] = notice or "Models with trained weights (no random model was used)."
    summary["random_weights"] = bool(random_models)
    summary["random_weight_models"] = random_models
    summary.update(header)
    summary["methods"] = {m: method_summary([r for r in rows if r["method"] == m])
                          for m in (OURS, BASELINE) if any(r["method"] == m for r in rows)}
    summary["leak_check"] = leak
    summary["seconds"] = seconds
    return summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def page_html(rows: list[dict[str, Any]], summary: dict[str, Any], references: dict[str, str]) -> str:
    """``references``: subject -> reference image path relative to the page."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("training.evaluation", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["fmt"] = _fmt
    ours = {(tuple(r["subjects"]), r["prompt_index"], r["image_index"]): r for r in rows if r["method"] == OURS}
    base = {(tuple(r["subjects"]), r["prompt_index"], r["image_index"]): r for r in rows if r["method"] == BASELINE}
    cards = []
    for order, key in enumerate(sorted(ours, key=lambda k: ours[k]["id"])):
        r, b = ours[key], base.get(key)
        cards.append({"order": order, "ours": r, "baseline": b,
                      "references": [(name, references.get(name, "")) for name in r["subjects"]],
                      "gain": r["identity"] - b["identity"] if b else 0.0})
    return env.get_template("evaluation.html.j2").render(summary=summary, cards=cards, ours=OURS, baseline=BASELINE)


def write_outputs(out: Path, rows, summary, references, meta, write) -> dict[str, Path]:
    """Write the table, summary and page with ``write(path, data)`` (atomic); return their paths."""
    notice = summary["notice"] if summary["random_weights"] else None
    paths = {"table": out / TABLE, "summary": out / SUMMARY, "page": out / PAGE}
    write(paths["table"], table_bytes(rows, summary["random_weights"], notice, meta))
    write(paths["summary"], json.dumps(summary, indent=2) + "\n")
    write(paths["page"], page_html(rows, summary, references))
    return paths
