"""CPU cost of the face stage per image: :class:`datagen.stages.face_checker.FaceChecker` (the real
MTCNN) on the bundled sample's 11 distinct photos, stored at the job's default long side (1024 px).

    .venv/bin/python bench/bench_faces.py [--threads 1] [--max-side 1024] [--repeats 3]

Two segmentations, since the cost is MTCNN over the person crops (it grows with their pixels):

* ``one person per face``: for every person of the photo (``fixtures.bundled_photos``' face rects),
  a person segment from 1.5 face widths left of the face to 1.5 right, half a face above it to the
  bottom of the image: what a panoptic segmenter gives for the sample's portraits and composites;
* ``whole image``: one person segment over the whole image, every pixel through MTCNN once (the
  most a photo whose people fill it costs).

Prints the median over ``--repeats`` of the seconds per image (median over images) and the faces
found. Runs without Ray, in this process, with ``torch.set_num_threads(--threads)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def person_segments(size, face_rects):
    from datagen.stages.segmenter import PanopticResult, SegmentInfo

    w, h = size
    seg = np.zeros((h, w), dtype=np.uint16)
    infos = []
    for sid, (x0, y0, x1, y1) in enumerate(face_rects, start=1):
        fw, fh = x1 - x0, y1 - y0
        bx0, by0 = max(0, int(x0 - 1.5 * fw)), max(0, int(y0 - 0.5 * fh))
        bx1, by1 = min(w, int(x1 + 1.5 * fw)), h
        seg[by0:by1, bx0:bx1] = sid
    for sid in range(1, len(face_rects) + 1):
        ys, xs = np.nonzero(seg == sid)
        if len(xs):
            infos.append(SegmentInfo(id=sid, category_id=0, coco_label="person", is_thing=True,
                                     bbox=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                                     area=int(len(xs)), score=1.0))
    return PanopticResult(segment_map=seg, segments=infos)


def whole_image(size):
    from datagen.stages.segmenter import PanopticResult, SegmentInfo

    w, h = size
    return PanopticResult(np.ones((h, w), dtype=np.uint16),
                          [SegmentInfo(id=1, category_id=0, coco_label="person", is_thing=True, bbox=[0, 0, w, h],
                                       area=w * h, score=1.0)])


def sample_cases(max_side: int) -> list:
    """``(loaded image, placed face rects, source face rect)`` of each distinct photo of the sample,
    stored at ``max_side`` (face rects in pixels of the stored image)."""
    from datagen.sources.images import load_image
    from datagen.sources.readers import open_source
    from datagen.stages.face_checker import stored_rect
    from fixtures.bundled_photos import SAMPLE_IMAGES, build_sample

    recipes = {str(s.index): s for s in SAMPLE_IMAGES}
    with tempfile.TemporaryDirectory() as tmp:
        build_sample(Path(tmp))
        items = [it for it in open_source(tmp).items() if it.duplicate_of is None]
        loaded = [load_image(it, max_side=max_side) for it in items]
    cases = []
    for it, li in zip(items, loaded, strict=True):
        scene = recipes[it.source_id].recipe()
        rects = [stored_rect(r, scene.image.size, li.image.size) for _, r in scene.faces]
        cases.append((li, rects, stored_rect(it.meta["face_rect"], li.original_size, li.image.size)))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from datagen.config import FacesSettings
    from datagen.stages.face_checker import FaceChecker

    torch.set_num_threads(args.threads)
    checker = FaceChecker(FacesSettings(), "cpu")
    cases = sample_cases(args.max_side)

    print(f"face stage, {len(cases)} images at long side {args.max_side}, {args.threads} torch thread(s), "
          f"median of {args.repeats}")
    print(f"{'segmentation':<22} {'s/image (median)':>17} {'s/image (mean)':>15} {'faces':>6}")
    for name, make in (("one person per face", lambda li, rects: person_segments(li.image.size, rects)),
                       ("whole image", lambda li, rects: whole_image(li.image.size))):
        pans = [make(li, rects) for li, rects, _ in cases]
        runs, faces = [], 0
        for _ in range(args.repeats):
            per_image = []
            for (li, _, rect), pan in zip(cases, pans, strict=True):
                t = time.perf_counter()
                check = checker.check([li.image], [pan], [rect])[0]
                per_image.append(time.perf_counter() - t)
                faces = faces if runs else faces + sum(len(f) for f in check.faces.values())
            runs.append(per_image)
        medians = [statistics.median(r) for r in runs]
        means = [statistics.fmean(r) for r in runs]
        print(f"{name:<22} {statistics.median(medians):>17.3f} {statistics.median(means):>15.3f} {faces:>6}")


if __name__ == "__main__":
    main()
