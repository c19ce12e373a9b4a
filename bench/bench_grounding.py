"""Per-image cost of the two groundings, side by side in one run: panoptic (Mask2Former + CLIP x SBERT
matching, the paper's path) vs sam3 (SAM 3 prompted by each phrase's head concept). RANDOM weights.

    python bench/bench_grounding.py                  # tiny models on this CPU, the bundled sample's photos

Both paths start from the same images and the same captions (the bundled sample's photos with
hand-written captions of :data:`CAPTIONS`, chunked by the real spaCy pipeline) and end where the
record is built: panoptic = ``SegmentStep`` + ``MatchStep`` (phrases, CLIP crops, SBERT labels,
greedy match); sam3 = ``GroundStep`` (phrases, SAM 3 vision once per image + one prompt per distinct
head concept, greedy assignment, segment map). Seconds per image are wall time on this machine, the
tiny profiles' settings, the best of ``--repeats`` passes; the ratio is sam3 / panoptic from this run.

FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` over each path's model
forwards (matrix multiplications and convolutions; post-processing, spaCy and crop preparation are
not FLOP-counted). At paper size the same count needs the paper-size models
(``subject-ffhq tiny-models --paper-size``) and a GPU: ``bench/bench_gpu.py`` times the ``sam3`` row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

RANDOM_WEIGHTS_LINE = ("RANDOM WEIGHTS: tiny models with random weights; segments and matches are meaningless, "
                       "only the cost per image is real.")

CAPTIONS = ("a woman and a man with a guitar", "two women on a beach", "a golden retriever puppy on a sofa",
            "a man holding a violin", "a child with a teddy bear", "three young men and a dog")


def sample_images(n: int) -> list:
    from datagen.sources.images import load_image
    from datagen.sources.readers import open_source
    from fixtures.bundled_photos import build_sample

    folder = Path(tempfile.mkdtemp(prefix="grounding-bench-")) / "sample"
    build_sample(folder)
    items = [i for i in open_source(folder).items() if i.duplicate_of is None][:n]
    return [load_image(item, max_side=256) for item in items]


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def tiny_paths(loaded: list, repeats: int) -> dict[str, tuple[float, int]]:
    """``{path: (seconds per image, FLOPs per image)}`` of both groundings on the tiny models."""
    from datagen.config import load_profile
    from datagen.stages.grounding import GroundStep
    from datagen.stages.matcher import MatchStep
    from datagen.stages.segmenter import SegmentStep

    captions = [(CAPTIONS[i % len(CAPTIONS)], []) for i in range(len(loaded))]
    panoptic_profile, sam3_profile = load_profile("tiny"), load_profile("tiny-open-vocab")
    segment, match = SegmentStep(panoptic_profile, "cpu"), MatchStep(panoptic_profile, "cpu")
    ground = GroundStep(sam3_profile, "cpu")

    def panoptic():
        return match.run(loaded, captions, segment.run(loaded))

    def sam3():
        return ground.run(loaded, captions)

    n = len(loaded)
    return {name: (best_seconds(fn, repeats) / n, flops_of(fn) // n) for name, fn in (("panoptic", panoptic), ("sam3", sam3))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", type=Path, default=None, help="tiny models folder (built if missing)")
    args = ap.parse_args()

    from datagen.config import TINY_MODELS_ENV
    from fixtures.tiny_models import build_one

    print(RANDOM_WEIGHTS_LINE)
    root = Path(args.models or os.environ.get(TINY_MODELS_ENV) or tempfile.mkdtemp(prefix="tiny-models-"))
    for name in ("mask2former", "open_clip", "sbert", "sam3"):
        build_one(name, root)
    os.environ[TINY_MODELS_ENV] = str(root.resolve())
    torch.set_num_threads(1)
    loaded = sample_images(args.images)
    print(f"CPU ({os.cpu_count()} cores visible, 1 torch thread); {len(loaded)} bundled-sample photos, long side 256 px; "
          f"tiny profiles; best of {args.repeats}; torch {torch.__version__}")
    rows = tiny_paths(loaded, args.repeats)
    print("\n| grounding | tiny: ms / image (this CPU) | tiny: MFLOP / image |")
    print("|---|---:|---:|")
    for name, (seconds, flops) in rows.items():
        print(f"| {name} | {seconds * 1000:.1f} | {flops / 1e6:.1f} |")
    (ps, pf), (ss, sf) = rows["panoptic"], rows["sam3"]
    print(f"\nsam3 / panoptic, tiny size, this CPU, one run: time x{ss / ps:.2f}, FLOPs x{sf / max(pf, 1):.2f}")


if __name__ == "__main__":
    main()
