"""Build a small finished run for the manifest / report / inspect / export tests.

Real photos (scikit-image's astronaut, camera, coffee, chelsea and rocket, matplotlib's Grace Hopper),
hand-drawn segment maps (ellipses inside given boxes), captions whose phrases are matched greedily
on hand-set score matrices, shards written with :class:`datagen.shards.writer.ShardWriter`, and per-shard
manifest entries in the Ray job's format (shared brief, "Run manifests"), including duplicate and
failed source items. ``expected`` tells a test what each sample must come out as.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.cbook
import numpy as np
from PIL import Image, ImageDraw
from skimage import data as skdata

from datagen.record.schema import MatchScores, Phrase, Provenance, Record, Segment
from datagen.shards.writer import ShardWriter

MODELS = {"captioner": "tiny/blip2", "segmenter": "tiny/mask2former", "clip": "tiny/open_clip", "sbert": "tiny/sbert"}
THING = {"person": 0, "bench": 13, "cup": 41, "cat": 15, "tv": 62, "sky-other-merged": 187, "banner": 92,
         "grass-merged": 193, "dining table": 60, "wall-other-merged": 199, "couch": 57}


@functools.lru_cache(maxsize=32)
def photo(name: str, long_side: int = 160) -> Image.Image:
    if name == "grace_hopper":
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            im = Image.open(f).convert("RGB")
    else:
        arr = getattr(skdata, name)()
        im = Image.fromarray(arr).convert("RGB")
    scale = long_side / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)


@dataclass
class Template:
    image: str
    caption: str
    phrases: list[str]  # in caption order; each found left to right
    segments: list[tuple[str, tuple[float, float, float, float]]]  # (coco label, box as fractions)
    product: list[list[float]]  # phrases x segments
    expect_flags: set[str] = field(default_factory=set)


TEMPLATES = [
    Template("astronaut", "a woman holding a banner", ["a woman", "a banner"],
             [("person", (0.15, 0.05, 0.75, 1.0)), ("banner", (0.75, 0.0, 1.0, 0.5))],
             [[0.31, 0.02], [0.03, 0.22]]),
    Template("camera", "a man with a camera standing on the grass", ["a man", "a camera", "the grass"],
             [("person", (0.2, 0.05, 0.8, 0.95)), ("grass-merged", (0.0, 0.8, 1.0, 1.0))],
             [[0.28, 0.01], [0.12, 0.02], [0.01, 0.19]]),
    Template("grace_hopper", "a woman in a uniform in front of a wall", ["a woman", "a uniform", "a wall"],
             [("person", (0.1, 0.05, 0.9, 1.0)), ("person", (0.0, 0.0, 0.15, 0.4)),
              ("wall-other-merged", (0.8, 0.0, 1.0, 0.3))],
             [[0.262, 0.257, 0.01], [0.1, 0.09, 0.02], [0.01, 0.02, 0.15]],
             {"ambiguous_match", "unmatched_person_segment"}),
    Template("rocket", "a man and a man watching a rocket launch", ["a man", "a man", "a rocket launch"],
             [("person", (0.05, 0.6, 0.2, 1.0)), ("sky-other-merged", (0.0, 0.0, 1.0, 0.5))],
             [[0.24, 0.01], [0.235, 0.012], [0.02, 0.11]],
             {"unmatched_subject_phrase", "ambiguous_match"}),
    Template("coffee", "a cup of coffee on a table", ["a cup", "coffee", "a table"],
             [("cup", (0.25, 0.15, 0.75, 0.85)), ("dining table", (0.0, 0.6, 1.0, 1.0))],
             [[0.3, 0.03], [0.18, 0.02], [0.02, 0.26]],
             {"no_person"}),
    Template("chelsea", "a cat lying on a couch", ["a cat", "a couch"],
             [("cat", (0.1, 0.1, 0.9, 0.95)), ("couch", (0.0, 0.7, 1.0, 1.0))],
             [[0.33, 0.02], [0.01, 0.21]],
             {"no_person"}),
]


MIN_SCORE = 0.1


def greedy(product: np.ndarray, min_score: float = MIN_SCORE) -> list[tuple[int, int]]:
    pairs, rows, cols = [], set(), set()
    order = sorted((-product[i, j], i, j) for i in range(product.shape[0]) for j in range(product.shape[1]))
    for neg, i, j in order:
        if -neg >= min_score and i not in rows and j not in cols:
            pairs.append((i, j))
            rows.add(i)
            cols.add(j)
    return pairs


# make_run(face_checks=True): per template image, the sizes (px) of the faces of each person segment
# (segment order) and which person segment the source's face rect lies in ("background": at the image's
# top-left corner; None: no face rect, as from an image folder). Faces sit side by side in the top third
# of their segment's box.
FACES = {
    "astronaut": ([[40]], 0),  # no face flag
    "camera": ([[20]], 0),  # small_face
    "grace_hopper": ([[36, 36], []], 1),  # merged_persons; face rect in the unmatched second person
    "rocket": ([[]], "background"),  # faceless_person; face rect on the sky: primary_face_unsegmented
}
SMALL_FACE_PX = 32


def face_checks_for(t: Template, segments: list, seg_map: np.ndarray):
    """Hand-made face checks of a sample (see :data:`FACES`), flags as the record builder sets them."""
    from datagen.record.build import face_flags
    from datagen.record.face_fields import FaceChecks, PrimaryFace, SegmentFace

    sizes, primary = FACES.get(t.image, ([], None))
    persons = [s for s in segments if s.coco_label == "person"]
    for s, face_sizes in zip(persons, sizes, strict=True):
        x0, y0, x1, y1 = s.bbox
        s.faces = []
        for k, side in enumerate(face_sizes):
            fx = x0 + (x1 - x0) * (k + 1) / (len(face_sizes) + 1) - side / 2
            fy = y0 + (y1 - y0) / 6
            box = [round(fx, 1), round(fy, 1), round(fx + side, 1), round(fy + side, 1)]
            s.faces.append(SegmentFace(box=box, score=0.99 - 0.01 * k, size=side, inside=1.0))
    checks = FaceChecks(small_face_px=SMALL_FACE_PX, primary_min_overlap=0.5)
    if primary is None:
        checks.flags = face_flags(segments, checks)
        return checks
    if primary == "background":
        rect = [0, 0, 8, 8]
    else:
        x0, y0, x1, y1 = persons[primary].bbox
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        rect = [cx - 5, cy - 5, cx + 5, cy + 5]
    region = seg_map[rect[1]:rect[3], rect[0]:rect[2]]
    counts = np.bincount(region.ravel().astype(np.int64))
    counts[0] = 0
    sid = int(np.argmax(counts)) if counts.max() else None
    cover = next((s for s in segments if s.id == sid), None)
    checks.primary_face = PrimaryFace(
        rect=rect, segment_id=sid, overlap=round(float(counts[sid]) / region.size, 4) if sid else 0.0,
        matched_person=cover is not None and cover.coco_label == "person" and cover.matched)
    checks.flags = face_flags(segments, checks)
    return checks


def make_sample(t: Template, key: str, split: str, rng: np.random.Generator, jitter: float = 0.0,
                long_side: int = 160, face_checks: bool = False):
    image = photo(t.image, long_side)
    w, h = image.size
    canvas = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for n, (_, (fx0, fy0, fx1, fy1)) in enumerate(t.segments, start=1):
        draw.ellipse([fx0 * w, fy0 * h, fx1 * w - 1, fy1 * h - 1], fill=n)
    seg_map = np.asarray(canvas).astype(np.uint16)

    product = np.asarray(t.product, dtype=float) + rng.uniform(-jitter, jitter, size=np.shape(t.product))
    clip = np.clip(product * 1.5 + 0.05, -1, 1)
    sbert = product / clip
    pairs = greedy(product)
    seg_of_phrase = {i: j + 1 for i, j in pairs}

    spans, pos = [], 0
    for text in t.phrases:
        start = t.caption.index(text, pos)
        spans.append((start, start + len(text)))
        pos = start + len(text)
    segments = []
    for n, (label, _) in enumerate(t.segments, start=1):
        ys, xs = np.nonzero(seg_map == n)
        segments.append(Segment(
            id=n, coco_label=label, category_id=THING[label], is_thing=label in ("person", "cup", "cat", "couch", "dining table", "bench", "tv"),
            bbox=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], area=int(len(xs)),
            score=float(rng.uniform(0.6, 0.99)),
        ))
    phrases = []
    for i, (text, (start, end)) in enumerate(zip(t.phrases, spans, strict=True)):
        sid = seg_of_phrase.get(i)
        phrases.append(Phrase(text, start, end, segment_id=sid))
        if sid is not None:
            s = segments[sid - 1]
            s.word, s.start, s.end = text, start, end
            s.match_score = float(product[i, sid - 1])
            s.clip_sim, s.sbert_sim = float(clip[i, sid - 1]), float(sbert[i, sid - 1])
    record = Record(
        key=key, caption=t.caption, caption_raw=t.caption.replace("a man and a man", "two men"), width=w, height=h,
        segments=segments, phrases=phrases,
        scores=MatchScores(segment_ids=[s.id for s in segments], clip=clip.tolist(), sbert=sbert.tolist(),
                           product=product.tolist(), min_score=MIN_SCORE),
        provenance=Provenance(source="ffhq-wild", source_id=str(int(key)), path=f"in-the-wild-images/00000/{key}.png",
                              pixel_md5=hashlib.md5(image.tobytes()).hexdigest(), original_size=[w * 4, h * 4],
                              license="Attribution License", author="someone"),
        split=split, models=dict(MODELS),
        unmatched_phrases=[i for i, p in enumerate(phrases) if p.segment_id is None],
        unmatched_person_segments=[s.id for s in segments if s.coco_label == "person" and not s.matched],
        face_checks=face_checks_for(t, segments, seg_map) if face_checks else None,
    )
    return image, seg_map, record.validate()


def make_run(root: Path, run: str = "test-run", plan: list[list[str]] | None = None, seed: int = 0,
             jitter: float = 0.0, long_side: int = 160, failed_shards: tuple[int, ...] = (),
             face_checks: bool = False) -> dict:
    """Write shards under ``root/out/shards`` and the run folder ``root/manifests/<run>``.

    ``plan``: per shard, one status letter per source item: ``w`` written, ``d`` duplicate,
    ``f`` failed. Written items cycle through :data:`TEMPLATES`; every 4th written item is "test".
    ``failed_shards``: shards that "kept failing": no tar, an entry with ``"status": "failed"``, every
    non-duplicate item failed with the shard's error (the Ray job's ``failed_entry``).
    ``face_checks``: records carry hand-made face checks (:data:`FACES`, :func:`face_checks_for`).
    Returns ``{"run_dir", "shards_dir", "written": {key: (template, record)}, "failed": {...}, ...}``.
    """
    plan = plan or [["w", "w", "f", "w", "w"], ["w", "d", "w", "w", "f", "w"]]
    rng = np.random.default_rng(seed)
    shards_dir = root / "out" / "shards"
    run_dir = root / "manifests" / run
    (run_dir / "shards").mkdir(parents=True, exist_ok=True)
    expected = {"run_dir": run_dir, "shards_dir": shards_dir, "written": {}, "failed": {}, "duplicate": {}}
    source, n_written, last_written = 0, 0, None
    for k, statuses in enumerate(plan):
        name = f"subjects-{k:05d}"
        tar = shards_dir / f"{name}.tar"
        entries = []
        if k in failed_shards:
            error = "RayTaskError: the worker died unexpectedly"
            for st in statuses:
                key = f"{source:05d}"
                entry = {"source_id": str(source), "key": key, "rel_path": f"in-the-wild-images/00000/{key}.png",
                         "status": "failed", "reason": f"shard failed after 3 attempt(s): {error}"}
                if st == "d":
                    entry.update(status="duplicate", reason=f"duplicate of source_id {last_written} (same image)")
                    expected["duplicate"][key] = entry["reason"]
                else:
                    expected["failed"][key] = entry["reason"]
                entries.append(entry)
                source += 1
            manifest = {"shard": k, "name": name, "status": "failed", "tar": str(tar.resolve()), "sha256": None,
                        "bytes": 0, "seconds": 30.0, "written": 0, "skipped": statuses.count("d"),
                        "failed": len(statuses) - statuses.count("d"), "samples": entries, "attempts": 3,
                        "error": error, "config_digest": "abc", "finished_at": "2026-01-01T00:00:00Z"}
            (run_dir / "shards" / f"{name}.json").write_text(json.dumps(manifest, indent=1))
            continue
        with ShardWriter(tar) as writer:
            for st in statuses:
                key = f"{source:05d}"
                entry = {"source_id": str(source), "key": key, "rel_path": f"in-the-wild-images/00000/{key}.png",
                         "status": {"w": "written", "d": "duplicate", "f": "failed"}[st], "reason": None}
                if st == "w":
                    t = TEMPLATES[n_written % len(TEMPLATES)]
                    split = "test" if n_written % 4 == 3 else "train"
                    image, seg_map, record = make_sample(t, key, split, rng, jitter, long_side, face_checks)
                    writer.write(image, seg_map, record)
                    expected["written"][key] = (t, record)
                    n_written += 1
                    last_written = source
                elif st == "d":
                    entry["reason"] = f"duplicate of source_id {last_written} (same image)"
                    expected["duplicate"][key] = entry["reason"]
                else:
                    entry["reason"] = f"image: in-the-wild-images/00000/{key}.png: cannot identify image file"
                    expected["failed"][key] = entry["reason"]
                entries.append(entry)
                source += 1
        body = tar.read_bytes()
        manifest = {
            "shard": k, "name": name, "status": "done", "tar": str(tar.resolve()),
            "sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body), "seconds": 1.5 + k,
            "written": statuses.count("w"), "skipped": statuses.count("d"), "failed": statuses.count("f"),
            "samples": entries, "attempts": 1, "error": None, "config_digest": "abc",
            "finished_at": "2026-01-01T00:00:00Z",
        }
        (run_dir / "shards" / f"{name}.json").write_text(json.dumps(manifest, indent=1))
    (run_dir / "run.json").write_text(json.dumps({
        "run": run, "status": "incomplete" if failed_shards else "complete", "profile": "tiny", "models": MODELS,
        "out": str((root / "out").resolve()), "shards_dir": str(shards_dir.resolve()),
        "plan": {"shard_size": max(len(p) for p in plan), "shards": len(plan)},
        "counts": {"items": source, "pending": 0},
    }, indent=1))
    return expected
