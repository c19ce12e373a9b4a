"""Shards for the trainer's tests and benchmark: real photos, hand-drawn person masks, real spans.

:func:`build_training_shards` writes WebDataset shards through :class:`datagen.shard_io.ShardWriter`
from the bundled sample (``datagen.sample_data``): one record per distinct photo, with one
``person`` segment per face the sample's metadata knows (a head ellipse around ``face_rect`` plus
a body trapezoid below it, drawn by hand, not by a model), a matched ``banner`` segment for the
flag behind the astronaut (a non-person subject the object-type filter must skip), and a caption
whose phrases' ``[start, end)`` spans are exact. Two synthetic records complete the set: a
landscape and a portrait image of flat coloured blocks on green, each block a ``person`` whose
phrase names its colour ("a red person", ...) — so tests can check that a mask still covers its
colour after resizing and flipping. The validation-range sample (index 60000) gets split "test".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datagen.record import MatchScores, Phrase, Provenance, Record, Segment
from datagen.shard_io import ShardWriter

MODELS = {"captioner": "hand-written", "segmenter": "hand-drawn", "phrases": "hand-written", "clip": "-", "sbert": "-"}
PERSON_CATEGORY = 1
BANNER_CATEGORY = 92
# noun phrase per sample photo title (the sample's metadata `photo_title`)
PERSON_PHRASES = {
    "Eileen Collins": "a smiling astronaut",
    "Cameraman": "a man with a camera",  # last token of the phrase: "camera"
    "Commodore Grace M. Hopper, USN": "an old woman",
}
BLOCK_COLOURS = {
    "red": (230, 20, 20),
    "blue": (20, 20, 230),
    "yellow": (240, 230, 20),
    "magenta": (230, 20, 230),
    "cyan": (20, 230, 230),
}
GREEN = (20, 160, 20)


def person_mask(size: tuple[int, int], face_rect: list[float]) -> np.ndarray:
    """A hand-drawn person region: head ellipse around the face, body trapezoid down to the bottom."""
    w, h = size
    x0, y0, x1, y1 = face_rect
    fw, fh = x1 - x0, y1 - y0
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse([x0 - 0.2 * fw, y0 - 0.35 * fh, x1 + 0.2 * fw, y1 + 0.1 * fh], fill=1)
    cx = (x0 + x1) / 2
    draw.polygon([(cx - 0.45 * fw, y1), (cx + 0.45 * fw, y1), (cx + 1.3 * fw, h), (cx - 1.3 * fw, h)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _segments_from_map(segment_map: np.ndarray, specs: list[dict]) -> list[Segment]:
    segments = []
    for spec in specs:
        ys, xs = np.nonzero(segment_map == spec["id"])
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        seg = Segment(
            id=spec["id"], coco_label=spec["label"], category_id=spec["category"], is_thing=spec["label"] == "person",
            bbox=bbox, area=int(len(xs)), score=0.99,
        )
        if "phrase" in spec:
            seg.word, seg.start, seg.end = spec["phrase"]
            seg.match_score, seg.clip_sim, seg.sbert_sim = 0.5, 0.7, 0.7
        segments.append(seg)
    return segments


def _caption(parts: list[tuple[str, int | None]], tail: str) -> tuple[str, list[tuple[str, int, int, int | None]]]:
    """Join phrases with " and ", append ``tail``; return caption and (text, start, end, segment id)."""
    caption, spans = "", []
    for i, (text, seg_id) in enumerate(parts):
        if i:
            caption += " and "
        spans.append((text, len(caption), len(caption) + len(text), seg_id))
        caption += text
    caption += tail
    return caption, spans


def make_record(key: str, image: Image.Image, segment_map: np.ndarray, specs: list[dict], caption: str,
                phrases: list[tuple[str, int, int, int | None]], split: str, source_id: str, rel_path: str,
                source: str = "ffhq-wild") -> Record:
    segments = _segments_from_map(segment_map, specs)
    matched = {s.id for s in segments if s.matched}
    record = Record(
        key=key, caption=caption, caption_raw=caption, width=image.width, height=image.height,
        segments=segments,
        phrases=[Phrase(text, start, end, seg if seg in matched else None) for text, start, end, seg in phrases],
        scores=MatchScores(), split=split, models=dict(MODELS),
        unmatched_phrases=[i for i, p in enumerate(phrases) if p[3] not in matched],
        provenance=Provenance(
            source=source, source_id=source_id, path=rel_path,
            pixel_md5=hashlib.md5(np.asarray(image).tobytes()).hexdigest(), original_size=[image.width, image.height],
        ),
    )
    return record.validate()


def sample_photo_records(sample_root: Path) -> list[tuple[Image.Image, np.ndarray, Record]]:
    """One record per distinct photo of the bundled sample (faces of duplicate items merged)."""
    meta = json.loads((Path(sample_root) / "ffhq-dataset-v2.json").read_text())
    photos: dict[str, dict] = {}
    for index in sorted(meta, key=int):
        item = meta[index]
        wild = item["in_the_wild"]
        photo = photos.setdefault(wild["pixel_md5"], {"index": int(index), "item": item, "faces": []})
        titles = [t.strip() for t in item["metadata"]["photo_title"].split(";")]
        photo["faces"].append((wild["face_rect"], titles))
    out = []
    for photo in photos.values():
        index, item = photo["index"], photo["item"]
        rel = item["in_the_wild"]["file_path"]
        with Image.open(Path(sample_root) / rel) as im:
            image = im.convert("RGB")
        w, h = image.size
        faces = sorted({tuple(r) for r, _ in photo["faces"]}, key=lambda r: r[0])
        titles = photo["faces"][0][1]
        # A single-person photo names its person; a composite lists people left to right. Faces the
        # metadata does not give (other people of a composite) stay unsegmented and unmentioned.
        panel_titles = titles if len(titles) == 1 else [_title_for_face(rect, w, titles) for rect in faces]
        segment_map = np.zeros((h, w), dtype=np.uint16)
        specs: list[dict] = []
        parts: list[tuple[str, int | None]] = []
        if titles == ["Eileen Collins"] and len(faces) == 1 and index in (0, 2000):
            # The US flag behind the astronaut (left part of the photo), a matched non-person segment.
            flag = np.zeros((h, w), dtype=bool)
            flag[: int(0.35 * h), : int(0.2 * w)] = True
            segment_map[flag] = 9
        for k, rect in enumerate(faces):
            seg_id = k + 1
            segment_map[person_mask((w, h), list(rect))] = seg_id
            specs.append({"id": seg_id, "label": "person", "category": PERSON_CATEGORY})
            parts.append((PERSON_PHRASES[panel_titles[k]], seg_id))
        tail = " posing for a photo"
        if (segment_map == 9).any():
            parts.append(("a flag", 9))
            specs.append({"id": 9, "label": "banner", "category": BANNER_CATEGORY})
            tail = " in front of the camera"
        caption, spans = _caption(parts, tail)
        for spec in specs:
            text, start, end, _ = next(s for s in spans if s[3] == spec["id"])
            spec["phrase"] = (text, start, end)
        if tail == " posing for a photo":
            spans.append(("a photo", len(caption) - len("a photo"), len(caption), None))
        split = "test" if item["category"] == "validation" else "train"
        key = f"{index:05d}"
        out.append((image, segment_map, make_record(key, image, segment_map, specs, caption, spans, split,
                                                     str(index), rel)))
    return out


def _title_for_face(rect, width: int, titles: list[str]) -> str:
    """Which person of a side-by-side composite a face belongs to (panels of roughly equal width)."""
    centre = (rect[0] + rect[2]) / 2
    return titles[min(len(titles) - 1, int(centre / width * len(titles)))]


def coloured_blocks_record(key: str, size: tuple[int, int], colours: list[str]) -> tuple[Image.Image, np.ndarray, Record]:
    """Flat coloured blocks on green, one ``person`` per block, phrase "a <colour> person"."""
    w, h = size
    image = Image.new("RGB", size, GREEN)
    draw = ImageDraw.Draw(image)
    segment_map = np.zeros((h, w), dtype=np.uint16)
    n = len(colours)
    specs, parts = [], []
    for k, colour in enumerate(colours):
        if w >= h:  # blocks side by side
            box = (int(w * (k + 0.15) / n), int(h * 0.2), int(w * (k + 0.85) / n), int(h * 0.9))
        else:  # blocks stacked
            box = (int(w * 0.2), int(h * (k + 0.15) / n), int(w * 0.9), int(h * (k + 0.85) / n))
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=BLOCK_COLOURS[colour])
        segment_map[box[1] : box[3], box[0] : box[2]] = k + 1
        specs.append({"id": k + 1, "label": "person", "category": PERSON_CATEGORY})
        parts.append((f"a {colour} person", k + 1))
    caption, spans = _caption(parts, " standing on the grass")
    for spec in specs:
        text, start, end, _ = next(s for s in spans if s[3] == spec["id"])
        spec["phrase"] = (text, start, end)
    record = make_record(key, image, segment_map, specs, caption, spans, "train", key, f"synthetic/{key}.png", source="folder")
    return image, segment_map, record


def training_records(sample_root: Path) -> list[tuple[Image.Image, np.ndarray, Record]]:
    records = sample_photo_records(sample_root)
    records.append(coloured_blocks_record("90000", (200, 120), list(BLOCK_COLOURS)))
    records.append(coloured_blocks_record("90001", (96, 176), ["red", "blue"]))
    return records


def build_training_shards(sample_root: Path, out_dir: Path, num_shards: int = 2) -> list[Path]:
    """Write the records into ``num_shards`` shards ``subjects-0000k.tar``; return their paths."""
    records = training_records(sample_root)
    paths = []
    for k in range(num_shards):
        path = Path(out_dir) / f"subjects-{k:05d}.tar"
        with ShardWriter(path) as writer:
            for image, segment_map, record in records[k::num_shards]:
                writer.write(image, segment_map, record)
        paths.append(path)
    return paths
