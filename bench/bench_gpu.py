"""GPU benchmark of the three model stages at paper size, RANDOM weights, through the project's stage classes.

    python bench/bench_gpu.py                       # GPU: paper-size models from $SUBJECT_FFHQ_PAPER_SHAPES
    python bench/bench_gpu.py --models DIR --images 64
    python bench/bench_gpu.py --cpu                 # force the scaled-down CPU shape

Per stage (captioner, segmenter, matcher): images/s of one replica at the ``paper-shapes`` profile's
settings (the ``paper`` profile's, bf16), with the stage's own batching, and the peak GPU memory of
that stage alone (``torch.cuda.max_memory_allocated``); then the three stages sharing one GPU as the
job places them by default (captioner 0.5 + segmenter 0.2 + matcher 0.2: all loaded at once, run in
turn on each chunk of ``ray.images_per_call`` images); then the 70 000-image estimate from the
measured shared rate and the measured non-model CPU cost per image.

* Weights are random (``subject-ffhq tiny-models --paper-size DIR --include-blip2`` builds them; the
  benchmark builds missing ones itself). So that random weights cost what real ones would, the
  captioner always generates ``max_new_tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``), and
  the matcher gets fixed inputs of realistic size (:data:`SEGMENTS_PER_IMAGE` segments and
  :data:`PHRASES_PER_CAPTION` phrases per image) instead of the random models' outputs.
* The segmenter's random Mask2Former has confident queries (see the paper-size spec), so its
  post-processing keeps more candidate masks than a real photo gives: an upper bound on that cost.
* ``sam3``: the ``grounding: sam3`` path (SAM 3 prompted by each phrase's head, the ``open-vocab``
  profile's settings) on the same images and :data:`PHRASES_PER_CAPTION` phrases per image, one row
  of its own: it replaces the segmenter and matcher rows, not the shared run.
* Not measured here: the phrase stage (spaCy, CPU; ``bench/bench_phrases.py``), which the job runs
  inside the matcher actor, and the face stage (MTCNN on person segments, GPU share 0.1; its CPU cost
  per image is in ``docs/throughput.md``).
* No GPU: the same code runs the tiny models (built on the fly) at the tiny profile's settings on
  small images, and the GPU rows stay open. Those figures measure plumbing, not the paper models.

Runs without Ray, with only torch, transformers (+ its pyyaml, for the profile), sentence-transformers
(+ its scipy, used by the segmenter's box measurement), open_clip_torch, diffusers, pillow and numpy,
plus this project's ``datagen.stages`` modules (whose module-level imports are only those) and
``fixtures.tiny_models``. The CPU cost per image comes from ``bench/bench_pipeline.py``'s
``cpu_cost`` when its extra packages (scikit-image, pyspng) are installed; otherwise a PNG decode +
resize to 1024 px is measured here and the table says so.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from datagen.stage_table import STAGES  # noqa: E402
from fixtures.tiny_models.paper_size import RANDOM_WEIGHTS_LINE  # noqa: E402

N_IMAGES_70K = 70_000
SEGMENTS_PER_IMAGE = 10
PHRASES_PER_CAPTION = 4
# the stage table's GPU shares of the three model stages timed here (faces: the other 0.1)
GPU_SHARES = {st.name: st.gpu_share for st in STAGES if st.name not in ("faces", "sam3")}
from datagen.config import RaySettings  # noqa: E402

IMAGES_PER_CALL = RaySettings.__dataclass_fields__["images_per_call"].default  # the job's chunk size
PHRASE_WORDS = ("a woman", "a man", "a dog", "a red car", "a table", "a young girl", "an umbrella", "the street")


# --------------------------------------------------------------------------------- inputs
def photos(n: int, long_side: int, seed: int = 0) -> list[Image.Image]:
    """Photo-like RGB images (smooth colour fields + noise), mixed aspect ratios 4:3, 3:4, 1:1, 16:9."""
    rng = np.random.default_rng(seed)
    ratios = [(4, 3), (3, 4), (1, 1), (16, 9)]
    out = []
    for i in range(n):
        rw, rh = ratios[i % len(ratios)]
        w, h = (long_side, round(long_side * rh / rw)) if rw >= rh else (round(long_side * rw / rh), long_side)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(xx / (40 + 10 * c) + c + i) * np.cos(yy / (55 + 7 * c)) for c in range(3)], -1)
        arr = 127 + 100 * base + rng.normal(0, 8, (h, w, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def match_inputs(images: list[Image.Image], seed: int = 0):
    """Per image: a panoptic result of :data:`SEGMENTS_PER_IMAGE` Voronoi cells and a caption of
    :data:`PHRASES_PER_CAPTION` phrases (the matcher's work depends only on these sizes)."""
    from datagen.stages.phrases import ChunkedCaption, NounPhrase
    from datagen.stages.segmenter import PanopticResult, SegmentInfo

    rng = np.random.default_rng(seed)
    panoptic, chunked = [], []
    for i, im in enumerate(images):
        w, h = im.size
        seeds = rng.uniform([0, 0], [w, h], (SEGMENTS_PER_IMAGE, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        d = (xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2
        seg = (np.argmin(d, -1) + 1).astype(np.uint16)
        segments = []
        for sid in range(1, SEGMENTS_PER_IMAGE + 1):
            ys, xs = np.nonzero(seg == sid)
            if len(xs):
                label_id = (sid * 7) % 133
                segments.append(SegmentInfo(sid, label_id, f"label-{label_id}", label_id < 80,
                                            [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                                            len(xs), 0.9))
        words = [PHRASE_WORDS[(i + k) % len(PHRASE_WORDS)] for k in range(PHRASES_PER_CAPTION)]
        caption = " and ".join(words)
        phrases, pos = [], 0
        for word in words:
            start = caption.index(word, pos)
            phrases.append(NounPhrase(word, start, start + len(word)))
            pos = start + len(word)
        panoptic.append(PanopticResult(seg, segments))
        chunked.append(ChunkedCaption(caption, caption, phrases))
    return panoptic, chunked


# --------------------------------------------------------------------------------- stages
def load_stage(name: str, profile, device: str):
    from datagen.stages.captioner import Captioner
    from datagen.stages.matcher import Matcher
    from datagen.stages.segmenter import PanopticSegmenter

    if name == "captioner":
        stage = Captioner(profile.captioner, device)
        # random weights may emit EOS at once: force the full length a real caption may take
        stage.model.generation_config.min_new_tokens = stage.max_new_tokens
        return stage
    if name == "segmenter":
        return PanopticSegmenter(profile.segmenter, device)
    if name == "sam3":
        from datagen.stages.sam3 import Sam3Grounder

        return Sam3Grounder(profile.sam3, device)
    return Matcher(profile.matcher, device)


def run_stage(name: str, stage, images, panoptic, chunked):
    if name == "captioner":
        return stage.caption(images)
    if name == "segmenter":
        return stage.segment(images)
    if name == "sam3":  # grounding: sam3 in place of segmenter + matcher: one prompt per phrase head
        from datagen.labels import head_concept

        return stage.instances(images, [[head_concept(p.text) for p in c.phrases] for c in chunked])
    return stage.match(images, panoptic, chunked)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_rate(fn, n_images: int, device: str, repeats: int) -> float:
    fn()  # warm-up (kernels, caches, cuDNN autotune)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return repeats * n_images / (time.perf_counter() - start)


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_stages(profile, device: str, images, repeats: int) -> dict:
    panoptic, chunked = match_inputs(images)
    rows = {}
    for name in ("captioner", "segmenter", "matcher", "sam3"):
        reset_peak(device)
        t0 = time.perf_counter()
        stage = load_stage(name, profile, device)
        load_s = time.perf_counter() - t0
        rate = timed_rate(lambda s=stage, n=name: run_stage(n, s, images, panoptic, chunked), len(images), device, repeats)
        extra = ""
        if name == "segmenter":
            out = stage.segment(images[:4])
            extra = f"{np.mean([len(r.segments) for r in out]):.1f} segments/img kept"
        rows[name] = {"rate": rate, "peak_mb": peak_mb(device), "load_s": load_s, "extra": extra,
                      "params": sum(p.numel() for p in _params(stage))}
        del stage
    reset_peak(device)
    stages = {name: load_stage(name, profile, device) for name in ("captioner", "segmenter", "matcher")}

    def shared():
        for k in range(0, len(images), IMAGES_PER_CALL):
            sl = slice(k, k + IMAGES_PER_CALL)
            for name, stage in stages.items():
                run_stage(name, stage, images[sl], panoptic[sl], chunked[sl])

    rows["shared"] = {"rate": timed_rate(shared, len(images), device, repeats), "peak_mb": peak_mb(device),
                      "load_s": 0.0, "extra": "", "params": sum(rows[n]["params"] for n in stages)}
    stages.clear()
    reset_peak(device)
    return rows


def _params(stage):
    for attr in ("model", "clip", "sbert"):
        if hasattr(stage, attr):
            yield from getattr(stage, attr).parameters()


# --------------------------------------------------------------------------------- CPU cost
def cpu_cost_per_image(n: int, work: Path) -> tuple[float, str]:
    """(seconds of non-model CPU work per image, how it was measured)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_pipeline

        rows, _ = bench_pipeline.cpu_cost(n, work)
        total = sum(ms for _, ms, counted in rows if counted) / 1000
        return total, (f"bench_pipeline.cpu_cost: all non-model CPU work, 2000x1500 PNG "
                       f"({total * 1000 / rows[0][1] * 100:.0f}% of Pillow's decode of it)")
    except ImportError as e:
        return _decode_resize_cost(n, work), (f"decode + resize only (PIL PNG decode of 2000x1500, torch "
                                              f"resize to 1024): bench_pipeline needs {e.name}")


def _decode_resize_cost(n: int, work: Path) -> float:
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(photos(n, 2000, seed=7)):
        p = work / f"cpu-{i}.png"
        im.save(p)
        paths.append(p)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            arr = np.array(im.convert("RGB"))
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]
        h, w = arr.shape[:2]
        s = 1024 / max(h, w)
        torch.nn.functional.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True)
    return (time.perf_counter() - start) / len(paths)


# --------------------------------------------------------------------------------- main
def prepare_models(gpu: bool, models: Path | None, log=print) -> tuple[dict, str]:
    """(profile, shape description). GPU: paper-shapes (missing paper-size models are built);
    CPU: tiny models built into ``models`` (or a temporary folder)."""
    from datagen.config import PAPER_SHAPES_ENV, TINY_MODELS_ENV, load_profile

    if gpu:
        from fixtures.tiny_models.paper_size import build_paper_one, paper_shapes_dir

        root = Path(models or paper_shapes_dir())
        for name in ("blip2", "mask2former", "open_clip", "sbert", "sam3"):
            if not (root / name / ".complete").exists():
                log(f"building paper-size {name} in {root} ...")
                build_paper_one(name, root)
        os.environ[PAPER_SHAPES_ENV] = str(root)
        return (load_profile("paper-shapes"),
                "paper size (BLIP-2 OPT-6.7B, Mask2Former Swin-L, ViT-H-14 + mpnet, SAM 3)")
    from fixtures.tiny_models import build_one

    root = Path(models or tempfile.mkdtemp(prefix="tiny-models-"))
    for name in ("blip2", "mask2former", "open_clip", "sbert", "sam3"):
        build_one(name, root)
    os.environ[TINY_MODELS_ENV] = str(root)
    return (load_profile("tiny", {"sam3": vars(load_profile("tiny-open-vocab").sam3)}),
            "tiny models, tiny profile settings (scaled-down shape)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None, help="images per timed pass (default 64 on GPU, 8 on CPU)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", type=Path, default=None, help="paper-size models folder (GPU) / tiny models (CPU)")
    ap.add_argument("--cpu", action="store_true", help="run the scaled-down CPU shape even if a GPU is visible")
    ap.add_argument("--cpu-images", type=int, default=2, help="2000x1500 PNGs for the CPU cost per image")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "subject-ffhq-bench")
    args = ap.parse_args()

    gpu = torch.cuda.is_available() and not args.cpu
    print(RANDOM_WEIGHTS_LINE)
    if not gpu:
        print("NO GPU: scaled-down shape (tiny models on CPU, small images); GPU rows are open (no GPU).")
    device = "cuda" if gpu else "cpu"
    n = args.images or (64 if gpu else 8)
    profile, shape = prepare_models(gpu, args.models)
    images = photos(n, 1024 if gpu else 256)
    what = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores visible)"
    print(f"device: {what}; shape: {shape}; {n} mixed-aspect images at long side {images[0].size[0]} px, "
          f"{args.repeats} timed passes; torch {torch.__version__}")
    rows = bench_stages(profile, device, images, args.repeats)
    cpu_s, cpu_how = cpu_cost_per_image(args.cpu_images, args.work)
    print_table(rows, profile, gpu, cpu_s, cpu_how)


def print_table(rows: dict, profile, gpu: bool, cpu_s: float, cpu_how: str) -> None:
    cap, seg, mat = profile.captioner, profile.segmenter, profile.matcher
    settings = {
        "captioner": f"batch {cap.batch_size}, exactly {cap.max_new_tokens} new tokens, beams {cap.num_beams}",
        "segmenter": f"batch {seg.batch_size}, short side {seg.resolution}, square canvas",
        "matcher": f"batch {mat.batch_size}, {SEGMENTS_PER_IMAGE} crops + {PHRASES_PER_CAPTION} phrases/img",
        "shared": "all 3 loaded, in turn per chunk of 8 (0.5/0.2/0.2)",
        "sam3": f"grounding: sam3 (instead of segmenter + matcher): batch {profile.sam3.batch_size} prompts, "
                f"{PHRASES_PER_CAPTION} phrases/img",
    }
    where = "GPU" if gpu else "CPU (tiny)"
    print(f"\n| stage | params | settings | {where} images/s | peak GPU MiB | note |")
    print("|---|---:|---|---:|---:|---|")
    for name in ("captioner", "segmenter", "matcher", "shared", "sam3"):
        r = rows[name]
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a (CPU)"
        note = r["extra"] or (f"load {r['load_s']:.1f} s" if r["load_s"] else "")
        print(f"| {name} | {r['params'] / 1e6:.1f}M | {settings[name]} | {r['rate']:.2f} | {peak} | {note} |")
    if not gpu:
        for name in ("captioner (BLIP-2 OPT-6.7B)", "segmenter (Mask2Former Swin-L)", "matcher (ViT-H-14 + mpnet)",
                     "shared (one GPU)", "sam3 (SAM 3)"):
            print(f"| {name}, paper size | | | open (no GPU) | open (no GPU) | |")
    rate = rows["shared"]["rate"]
    print(f"\nnon-model CPU work per image: {cpu_s * 1000:.0f} ms ({cpu_how})")
    label = "measured GPU rate" if gpu else "CPU tiny-shape rate (NOT a GPU figure)"
    hours = N_IMAGES_70K / rate / 3600
    print(f"70 000 images on 1 {'GPU' if gpu else 'CPU box'} at the {label}: {hours:.2f} h of model time "
          f"({rate:.2f} images/s); CPU work {N_IMAGES_70K * cpu_s / 3600:.1f} CPU-hours, i.e. "
          f"{rate * cpu_s:.1f} CPU cores keep up with one {'GPU' if gpu else 'replica set'}")
    if gpu:
        print(f"target >= 20 images/s per GPU (70k in <= 1 GPU-hour): {'MET' if rate >= 20 else 'NOT MET'}")
    else:
        print("target >= 20 images/s per GPU: open (no GPU)")


if __name__ == "__main__":
    main()
