"""Training steps of the paper-size FastComposer (SD1.5 U-Net + CLIP ViT-L/14), RANDOM weights, through
the real loop (``training.loop.train_loop``: loader, bf16 autocast, AdamW, the staged checkpoint).

    python bench/bench_train_gpu.py --models DIR [--steps 20] [--batch-size 16] [--resolution 512]

``DIR`` holds ``stable-diffusion/`` and ``clip-vision/`` as ``subject-ffhq tiny-models --paper-size``
builds them (random weights). The shards are synthetic (``fixtures.training_shards``: coloured
blocks, one ``person`` per block, 1 to 4 subjects an image). Prints s/step (compute and data wait,
the first step left out as warm-up), images/s and the peak GPU memory; the run folder (with its ~10 GB
final checkpoint) is removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from fixtures.tiny_models.paper_size import RANDOM_WEIGHTS_LINE  # noqa: E402

COLOURS = ["red", "blue", "yellow", "white"]


def synthetic_shards(folder: Path, images: int = 64) -> list[str]:
    from datagen.shards.writer import ShardWriter
    from fixtures.training_shards import BLOCK_COLOURS, coloured_blocks_record

    colours = [c for c in COLOURS if c in BLOCK_COLOURS] or list(BLOCK_COLOURS)
    path = folder / "subjects-00000.tar"
    with ShardWriter(path) as writer:
        for k in range(images):
            size = (640, 480) if k % 2 == 0 else (480, 640)
            writer.write(*coloured_blocks_record(f"{90000 + k}", size, colours[: 1 + k % len(colours)]))
    return [str(path)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, help="paper-size models (default: without a GPU, tiny models built in "
                    "--work, 2 steps of batch 2 at 64 px: plumbing only)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--loader-workers", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "subject-ffhq-train-gpu")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    from training.config import TrainConfig
    from training.loop import LocalContext, train_loop

    print(RANDOM_WEIGHTS_LINE)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    if args.models is None:
        if torch.cuda.is_available():
            ap.error("--models DIR (the paper-size models) is needed on a GPU")
        from fixtures.tiny_models import build_one

        for name in ("stable-diffusion", "clip-vision"):
            build_one(name, args.work / "tiny")
        args.models, args.steps, args.batch_size, args.resolution, args.loader_workers = args.work / "tiny", 2, 2, 64, 0
        print("no GPU: tiny models, 2 steps of batch 2 at 64 px (plumbing, not the paper models' cost)")
    shards = synthetic_shards(args.work)
    out = args.work / "run"
    cfg = TrainConfig(shards=shards, out=str(out), pretrained=str(args.models / "stable-diffusion"),
                      image_encoder=str(args.models / "clip-vision"), resolution=args.resolution,
                      batch_size=args.batch_size, loader_workers=args.loader_workers, steps=args.steps + 1,
                      checkpoint_every=10**9, log_every=1, split=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_loop(cfg, LocalContext(cfg, device), print_fn=print)
    total = time.perf_counter() - start
    entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][1:]
    compute = statistics.mean(e["compute_s"] for e in entries)
    wait = statistics.mean(e["data_s"] for e in entries)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print()
    print("| device | resolution | batch | steps timed | s/step (compute + data wait) | images/s | peak GPU memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {name} | {args.resolution} | {args.batch_size} | {len(entries)} | {compute + wait:.3f} ({compute:.3f} + "
          f"{wait:.3f}) | {args.batch_size / (compute + wait):.1f} | {peak:.1f} GiB |")
    print(f"whole run incl. model loading and the final checkpoint: {total:.0f} s")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
