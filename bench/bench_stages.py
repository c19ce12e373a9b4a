"""Tiny-profile throughput of the two model stages on this CPU: captioner and segmenter images/s.

The tiny models are random and small, so these figures measure the stages' own plumbing
(pre-processing, batching, generation loop, panoptic post-processing at the stored size), not the
paper models' cost. The phrases stage and the matcher have their own benchmarks
(bench_phrases.py, bench_matcher.py).

Usage: ``.venv/bin/python bench/bench_stages.py [--images 8] [--side 512]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from datagen.config import TINY_MODELS_ENV, load_profile  # noqa: E402
from datagen.stages.captioner import Captioner  # noqa: E402
from datagen.stages.segmenter import PanopticSegmenter  # noqa: E402
from fixtures.tiny_models import build_one  # noqa: E402


def photos(n: int, side: int) -> list[Image.Image]:
    base = [Image.fromarray(data.astronaut()), Image.fromarray(data.camera()).convert("RGB"),
            Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        w, h = im.size
        s = side / max(w, h)
        out.append(im.resize((round(w * s), round(h * s)), Image.LANCZOS))
    return out


def rate(fn, images, repeats: int) -> float:
    fn(images[:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(images)
    return repeats * len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--side", type=int, default=512, help="long side of the stored images")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    tiny = Path(os.environ.get(TINY_MODELS_ENV) or tempfile.mkdtemp(prefix="tiny-models-"))
    for name in ("blip2", "mask2former"):
        build_one(name, tiny)
    os.environ[TINY_MODELS_ENV] = str(tiny)
    profile = load_profile("tiny")
    images = photos(args.images, args.side)

    captioner = Captioner(profile.captioner, "cpu")
    segmenter = PanopticSegmenter(profile.segmenter, "cpu")
    rows = [
        ("captioner (tiny BLIP-2)", f"batch {captioner.batch_size}, {captioner.max_new_tokens} new tokens",
         rate(captioner.caption, images, args.repeats)),
        ("segmenter (tiny Mask2Former)", f"batch {segmenter.batch_size}, resolution {profile.segmenter.resolution}",
         rate(segmenter.segment, images, args.repeats)),
    ]
    print(f"{args.images} images, long side {args.side} px, CPU threads {os.cpu_count()}")
    print(f"| {'stage':30} | {'settings':36} | {'images/s':>9} |")
    print(f"|{'-' * 32}|{'-' * 38}|{'-' * 11}|")
    for name, settings, r in rows:
        print(f"| {name:30} | {settings:36} | {r:9.2f} |")


if __name__ == "__main__":
    main()
