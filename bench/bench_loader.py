"""Trainer input pipeline: loader samples/s per CPU core, and a tiny-model training step's time split
into data wait vs compute.

Loader: the full per-sample path of training (tar read, JPEG + segment-map decode, record
validation, drop policy, joint 512 px resize/flip, background-noised subject crops at the image
processor's size, placeholder tokenization, padding to 4 subjects), measured in one process with
one torch thread (= one core), and as a DataLoader with worker processes. Three ways of running
FastComposer's subject augmentations, measured side by side (interleaved, best of 3):

* ``per crop (before)``: torchvision v2 transforms one crop at a time in the loader (the previous
  loader: separable-conv elastic field);
* ``batched, loader``: :class:`training.subject_augment.SubjectAugmenter` on the example's crops;
* ``on device``: the loader only validates each subject's box and draws its zoom-in; the training
  step cuts (noise fill, pad, resize) and augments the whole batch's crops on its device after
  collate (``augment_subjects_on=device``, the default on GPU). What that costs per crop when the
  device is this CPU is printed separately (on a GPU it is small next to the step).

Target: >= 40 samples/s per core at 512 px with 4 subjects.

Training step: the tiny profile's models, ``train_loop`` with a local context and DataLoader
workers (forward, localization capture, backward, AdamW); time blocked waiting for the next
batch vs time computing, from its ``train_log.jsonl``.

Shards: the bundled sample with hand-drawn person masks (``fixtures/training_shards.py``), or
``--shards GLOB`` (e.g. the demo pipeline's ``out/demo/shards/*.tar``). Models are tiny and
random (their weights do not change any figure here).

    .venv/bin/python bench/bench_loader.py [--shards GLOB] [--samples 120] [--workers 2]
                                            [--train-resolution 256] [--train-batch 4] [--train-steps 8]
                                            [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.config import TrainConfig, expand_shards  # noqa: E402
from training.loader import make_dataset, make_loader  # noqa: E402
from training.preprocess import ExamplePreprocessor  # noqa: E402
from training.subject_policy import SubjectDropPolicy  # noqa: E402


def tiny_models(scratch: Path) -> Path:
    """The tiny models folder ($SUBJECT_FFHQ_TINY_MODELS if it holds them, else built in scratch)."""
    from datagen.config import tiny_models_dir
    from fixtures.tiny_models import build_one

    root = tiny_models_dir()
    if all((root / name / ".complete").exists() for name in ("stable-diffusion", "clip-vision")):
        return root
    root = scratch / "tiny-models"
    for name in ("stable-diffusion", "clip-vision"):
        build_one(name, root)
    return root


def sample_shards(scratch: Path) -> tuple[list[str], list[str]]:
    """The bundled sample's shards, and a shard of 2x2 composites with four people each."""
    import numpy as np
    from PIL import Image

    from datagen.shards.writer import ShardWriter
    from fixtures.bundled_photos import build_sample
    from fixtures.training_shards import build_training_shards, make_record, training_records

    source = build_sample(scratch / "sample")
    shards = [str(p) for p in build_training_shards(source, scratch / "shards", num_shards=2)]
    singles = [r for r in training_records(source) if len(r[2].segments) == 1 and r[2].split == "train"]
    path = scratch / "four-people" / "subjects-00000.tar"
    with ShardWriter(path) as writer:
        for k in range(8):
            picks = [singles[(k + i) % len(singles)] for i in range(4)]
            canvas = Image.new("RGB", (1024, 1024))
            segment_map = np.zeros((1024, 1024), dtype=np.uint16)
            specs, spans, caption = [], [], ""
            for i, (image, seg, record) in enumerate(picks):
                x, y = 512 * (i % 2), 512 * (i // 2)
                canvas.paste(image.resize((512, 512)), (x, y))
                tile = np.asarray(Image.fromarray(seg).resize((512, 512), Image.NEAREST))
                segment_map[y : y + 512, x : x + 512][tile > 0] = i + 1
                word = record.segments[0].word
                caption += (" and " if i else "") + word
                spans.append((word, len(caption) - len(word), len(caption), i + 1))
                specs.append({"id": i + 1, "label": "person", "category": 1, "phrase": spans[-1][:3]})
            caption += " posing for a photo"
            writer.write(canvas, segment_map, make_record(f"{80000 + k:05d}", canvas, segment_map, specs, caption,
                                                          spans, "train", str(80000 + k), f"composite/{k}.png"))
    return shards, [str(path)]


class PerCropBefore:
    """The previous loader's augmentation: torchvision v2, one crop at a time, in float."""

    def __init__(self):
        from torchvision.transforms import v2 as T

        class SeparableElastic(T.ElasticTransform):
            def make_params(self, flat_inputs):
                h, w = T.query_size(flat_inputs)
                field = torch.rand(1, 2, h, w) * 2 - 1
                k = int(8 * self.sigma[0] + 1) | 1
                x = torch.linspace(-(k // 2), k // 2, k)
                kernel = torch.softmax(-(x / self.sigma[0]).pow(2) / 2, 0)
                field = torch.nn.functional.pad(field, [k // 2] * 2 + [0, 0], mode="reflect")
                field = torch.nn.functional.conv2d(field, kernel.view(1, 1, 1, -1).expand(2, 1, 1, -1), groups=2)
                field = torch.nn.functional.pad(field, [0, 0] + [k // 2] * 2, mode="reflect")
                field = torch.nn.functional.conv2d(field, kernel.view(1, 1, -1, 1).expand(2, 1, -1, 1), groups=2)
                d = torch.cat([field[:, :1] * self.alpha[0] / w, field[:, 1:] * self.alpha[1] / h], 1)
                return {"displacement": d.permute(0, 2, 3, 1)}

        from training.subject_augment import reference_augmentations

        self.transforms = reference_augmentations()
        self.transforms.transforms[-1].transforms[0] = SeparableElastic()

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        out = [self.transforms(c.float().div(255)).mul(255).round_().clamp_(0, 255).to(torch.uint8) for c in crops]
        return torch.stack(out)


VARIANTS = ("per crop (before)", "batched, loader", "on device")


def make_preprocessor(variant: str, tokenizer, subject_size, policy, seed: int) -> ExamplePreprocessor:
    pre = ExamplePreprocessor(copy.deepcopy(tokenizer), subject_size, resolution=512, max_subjects=4, policy=policy,
                              augment_subjects="device" if variant == "on device" else True, seed=seed)
    if variant == "per crop (before)":
        pre.augmenter = PerCropBefore()
    return pre


def loader_rates(shards, tokenizer, subject_size, policy, samples: int, workers: int, repeats: int = 3):
    """{variant: (samples/s, mean subjects per sample)}: best of ``repeats`` runs of ``samples``
    examples, the variants interleaved so that they see the same machine load."""
    rates = {v: [] for v in VARIANTS}
    subjects = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for variant in VARIANTS:
            dataset = make_dataset(shards, make_preprocessor(variant, tokenizer, subject_size, policy, r), seed=r,
                                   shuffle_buffer=16)
            if workers == 0:
                stream = iter(dataset)
                next(stream)  # warm-up
                start = time.perf_counter()
                examples = [next(stream) for _ in range(samples)]
                rates[variant].append(samples / (time.perf_counter() - start))
                subjects[variant].append(statistics.mean(int(e["num_subjects"]) for e in examples))
            else:
                loader = iter(make_loader(dataset, batch_size=4, num_workers=workers))
                next(loader)  # start the workers
                batches = max(1, samples // 4)
                start = time.perf_counter()
                got = [next(loader) for _ in range(batches)]
                rates[variant].append(batches * 4 / (time.perf_counter() - start))
                subjects[variant].append(statistics.mean(float(b["num_subjects"].float().mean()) for b in got))
                del loader
    return {v: max(zip(rates[v], subjects[v], strict=True)) for v in VARIANTS}


def device_ms_per_crop(shards, tokenizer, subject_size, device: str = "cpu", batch: int = 16,
                      repeats: int = 3) -> tuple[float, float]:
    """(cut, augment) ms per crop of the on-device path on ``device`` (on CPU: one thread):
    ``cut_on_device`` and ``SubjectAugmenter`` on a collated batch of ``shards``' examples."""
    from training.collate import collate_examples
    from training.subject_augment import SubjectAugmenter
    from training.subject_crops import cut_on_device

    every = SubjectDropPolicy(0.0, 0.0, 1.0, 4)
    stream = iter(make_dataset(shards, make_preprocessor("on device", tokenizer, subject_size, every, 0), seed=0,
                               shuffle_buffer=16))
    b = collate_examples([next(stream) for _ in range(batch)])
    crops_n = int(b["subject_valid"].sum())
    augment = SubjectAugmenter()
    cut_times, augment_times = [], []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(repeats + 1):  # the first is a warm-up
        sync()
        start = time.perf_counter()
        crops = cut_on_device(b["source_image"], b["source_segment_map"], b["subject_boxes"], b["subject_ids"],
                              b["subject_valid"], subject_size, device)
        sync()
        cut_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        augment(crops, b["subject_valid"])
        sync()
        augment_times.append(time.perf_counter() - start)
    return min(cut_times) / crops_n * 1000, min(augment_times) / crops_n * 1000


def train_step_split(shards, models: Path, resolution: int, batch: int, steps: int, workers: int):
    """Mean (data wait, compute) seconds per step of ``train_loop``, first step (warm-up) excluded."""
    import json

    from training.loop import LocalContext, train_loop

    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        cfg = TrainConfig(shards=shards, out=out, pretrained=str(models / "stable-diffusion"),
                          image_encoder=str(models / "clip-vision"), resolution=resolution, batch_size=batch,
                          loader_workers=workers, shuffle_buffer=16, lr=1e-4, steps=steps + 1,
                          checkpoint_every=10**9)
        train_loop(cfg, LocalContext(cfg), print_fn=lambda line: None)
        entries = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()][1:]
    return statistics.mean(e["data_s"] for e in entries), statistics.mean(e["compute_s"] for e in entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", nargs="+", help="shard globs (default: the bundled sample, hand-drawn masks)")
    parser.add_argument("--samples", type=int, default=120, help="examples per loader measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the multi-process rows")
    parser.add_argument("--train-resolution", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="where the on-device part is timed (cpu, cuda)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import CLIPImageProcessor, CLIPTokenizer

    from training.image_encoder import processor_geometry

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        scratch = Path(tmp)
        models = tiny_models(scratch)
        if args.shards:
            shards = expand_shards(args.shards)
            sets = [("given shards", shards)]
        else:
            shards, four = sample_shards(scratch)
            sets = [("sample", shards), ("4-person composites", four)]
        tokenizer = CLIPTokenizer.from_pretrained(models / "stable-diffusion" / "tokenizer")
        subject_size = processor_geometry(CLIPImageProcessor.from_pretrained(models / "clip-vision"))[0]
        torch.set_num_threads(1)

        paper = SubjectDropPolicy(0.1, 0.1, 0.9, 4)  # DESIGN §6
        every = SubjectDropPolicy(0.0, 0.0, 1.0, 4)  # worst case: every subject, up to 4
        rows = []
        for set_name, set_shards in sets:
            for name, policy in (("paper drop policy", paper), ("all subjects kept", every)):
                for variant, (rate, subj) in loader_rates(set_shards, tokenizer, subject_size, policy,
                                                         args.samples, workers=0).items():
                    rows.append((set_name, name, variant, "1 process, 1 thread", 1, rate, subj))
                if args.workers > 0:
                    for variant, (rate, subj) in loader_rates(set_shards, tokenizer, subject_size, policy,
                                                             args.samples, args.workers).items():
                        rows.append((set_name, name, variant, f"DataLoader x{args.workers}", args.workers, rate, subj))

        print("tiny random models (tokenizer and crop size only; no weights are used by the loader)")
        print(f"512 px targets, {subject_size} px subject crops, up to 4 subjects; CPU cores on this machine: "
              f"{os.cpu_count()} (per-core figures of multi-process rows share those cores with the main process)")
        print()
        print(f"| {'shards':<20} | {'policy':<18} | {'augmentation':<18} | {'loader':<19} | {'samples/s':>9} "
              f"| {'per core':>8} | {'subjects/sample':>15} |")
        print(f"|{'-' * 22}|{'-' * 20}|{'-' * 20}|{'-' * 21}|{'-' * 11}|{'-' * 10}|{'-' * 17}|")
        for set_name, name, variant, loader, cores, rate, subj in rows:
            print(f"| {set_name:<20} | {name:<18} | {variant:<18} | {loader:<19} | {rate:>9.1f} | {rate / cores:>8.1f} "
                  f"| {subj:>15.2f} |")
        four = [r for r in rows if r[3] == "1 process, 1 thread" and r[6] >= 3.99]
        print()
        for variant in VARIANTS:
            figures = [r[5] for r in four if r[2] == variant]
            if figures:
                print(f"4 subjects, one core, {variant}: {min(figures):.1f} samples/s "
                      f"({'meets' if min(figures) >= 40 else 'below'} the 40/s target)")
        cut_ms, augment_ms = device_ms_per_crop(sets[-1][1], tokenizer, subject_size, args.device)
        per_crop = cut_ms + augment_ms
        where = "this CPU (1 thread)" if args.device == "cpu" else args.device
        print(f"the on-device part, on {where}: cut {cut_ms:.2f} + augment {augment_ms:.2f} ms per crop "
              f"({1000 / (4 * per_crop):.1f} samples/s of 4 subjects in the training process)")

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        workers = 1
        wait, compute = train_step_split(shards, models, args.train_resolution, args.train_batch,
                                         args.train_steps, workers)
        total = wait + compute
        print()
        print(f"tiny-model training step: {args.train_resolution} px, batch {args.train_batch}, "
              f"{workers} DataLoader worker, {torch.get_num_threads()} compute thread(s), mean of {args.train_steps} steps")
        print(f"| {'part':<12} | {'s/step':>8} | {'share':>6} |")
        print(f"|{'-' * 14}|{'-' * 10}|{'-' * 8}|")
        print(f"| {'data wait':<12} | {wait:>8.3f} | {wait / total:>6.1%} |")
        print(f"| {'compute':<12} | {compute:>8.3f} | {compute / total:>6.1%} |")
        print(f"| {'total':<12} | {total:>8.3f} | {1:>6.0%} |  ({args.train_batch / total:.1f} samples/s)")


if __name__ == "__main__":
    main()
