"""Run an evaluation end to end: check inputs and models, references, leak check, generate + score, write.

Order matters for the user: everything that can fail cheaply (subjects, prompts, checkpoint, every
model) fails before the first image is generated. Generation runs in-process (with a tqdm bar) or,
when a Ray address is given, on a pool of Ray actors (``ray_jobs.evaluation``, handed in by the command; the only module of
the evaluation that imports Ray).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.evaluation.protocol import (
    BASELINE,
    BUILTIN_PROMPTS,
    DEFAULT_WORD,
    OURS,
    ProtocolError,
    Unit,
    plan,
    read_prompts,
    read_subjects,
)
from training.evaluation.report import random_notice, write_outputs
from training.evaluation.worker import Worker, WorkerSettings

REFERENCE_SIZE = 256


class EvaluationError(ValueError):
    """A reference photo without a face, or another input the evaluation cannot use."""


@dataclass
class EvaluationRequest:
    checkpoint: str
    subjects: str
    out: str
    prompts: str | None = None  # None: the built-in list for the protocol
    multi: bool = False
    images_per_prompt: int = 4
    alpha: float = 0.7
    steps: int = 50
    guidance_scale: float = 5.0
    seed: int = 0
    resolution: int | None = None
    baseline: bool = True
    subject_word: str = DEFAULT_WORD
    evaluation: dict[str, Any] = field(default_factory=dict)  # the profile's evaluation section
    shards: list[str] = field(default_factory=list)  # training shards for the leak check
    leak_threshold: float | None = None
    device: str | None = None
    pretrained: str | None = None
    image_encoder: str | None = None
    ray_address: str | None = None
    workers: int | None = None
    units_per_task: int = 4
    threads: int | None = None


def write_file(path: Path, data: bytes | str) -> Path:
    from datagen.files import atomic_write

    return atomic_write(path, data)


def model_references(request: EvaluationRequest) -> dict[str, str]:
    """Every model the evaluation loads, by role (checkpoint's base models included)."""
    from training.checkpoint import read_state
    from training.config import TrainConfig
    from training.sampler import resolve_checkpoint

    cfg = TrainConfig.from_dict(read_state(resolve_checkpoint(request.checkpoint))["config"])
    section = request.evaluation
    return {
        "base (Stable Diffusion)": request.pretrained or cfg.pretrained,
        "image encoder": request.image_encoder or cfg.image_encoder,
        "face detector": section.get("face_detector", "mtcnn"),
        "face embedder": section["face_embedder"],
        "clip": section["clip_model"],
        "clip_pretrained": section.get("clip_pretrained"),
    }


def random_models(models: dict[str, str]) -> list[str]:
    from datagen.stages.model_loading import has_random_weights

    return [f"{role}: {ref}" for role, ref in models.items() if ref and has_random_weights(ref)]


def check_section(section: dict[str, Any]) -> None:
    missing = [k for k in ("face_embedder", "clip_model") if not section.get(k)]
    if missing:
        raise ProtocolError(f"the profile's evaluation section lacks {missing} (see datagen/profiles/paper.yaml)")


def reference_faces(subjects, detector, embedder) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Per subject: (photos x D) face embeddings (the largest face of each photo) and notes."""
    embeddings, notes = {}, {}
    for subject in subjects:
        images = []
        for path in subject.photos:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except OSError as e:
                raise EvaluationError(f"subject {subject.name}: cannot read the photo {path} ({e})") from e
        found = detector.detect(images)
        chosen = []
        for path, faces in zip(subject.photos, found, strict=True):
            if not faces:
                raise EvaluationError(f"subject {subject.name}: MTCNN finds no face in the reference photo {path}; "
                                      "use a photo where the face is visible (at least 20 px)")
            if len(faces) > 1:
                notes.setdefault(subject.name, []).append(f"{Path(path).name}: {len(faces)} faces, the largest used")
            chosen.append(max(faces, key=lambda f: f.area))
        embeddings[subject.name] = embedder.embed(chosen)
    return embeddings, notes


def run_local(settings: WorkerSettings, units: list[Unit], chunk: int, detector, embedder,
              prompt_scorer) -> Iterator[list[tuple[dict, bytes]]]:
    worker = Worker(settings, detector=detector, embedder=embedder, prompt_scorer=prompt_scorer)
    for start in range(0, len(units), chunk):
        yield worker.run(units[start:start + chunk])


def evaluate(
    request: EvaluationRequest, log: Callable[[str], None] = print, run_on_ray: Callable | None = None,
) -> dict[str, Any]:
    """Run the evaluation; return the summary (also written to ``OUT/summary.json``)."""
    import torch
    from tqdm import tqdm

    from datagen.stages.faces import FaceDetector, FaceEmbedder
    from datagen.stages.model_loading import pick_device
    from training.checkpoint import read_state
    from training.evaluation.leak import leak_check
    from training.evaluation.scoring import PromptScorer, reference_embedding
    from training.sampler import resolve_checkpoint

    started = time.perf_counter()
    if request.threads:
        torch.set_num_threads(request.threads)
    section = request.evaluation
    check_section(section)
    if not 0.0 <= request.alpha <= 1.0:
        raise ProtocolError(f"--alpha must be in [0, 1], got {request.alpha}")
    subjects = read_subjects(request.subjects, request.subject_word)
    prompts_path = request.prompts or str(BUILTIN_PROMPTS["multi" if request.multi else "single"])
    prompts = read_prompts(prompts_path)
    units = plan(subjects, prompts, multi=request.multi, images_per_prompt=request.images_per_prompt,
                 seed=request.seed, baseline=request.baseline)
    checkpoint = resolve_checkpoint(request.checkpoint)
    state = read_state(checkpoint)
    models = model_references(request)
    randoms = random_models(models)
    notice = random_notice(randoms) if randoms else None
    if notice:
        log(notice)
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)

    # Models of the driver (fail here, before any image, when one is missing).
    device = pick_device(request.device)
    embedder = FaceEmbedder(section["face_embedder"], device, section.get("batch_size", 64))
    detector = FaceDetector.from_section(section, device, crop_size=embedder.image_size)
    prompt_scorer = PromptScorer(section["clip_model"], section.get("clip_pretrained"), device)
    per_photo, notes = reference_faces(subjects, detector, embedder)
    for name, lines in notes.items():
        log(f"subject {name}: " + "; ".join(lines))
    references = {name: reference_embedding(v) for name, v in per_photo.items()}
    ref_paths = {}
    for subject in subjects:
        with Image.open(subject.photos[0]) as im:
            thumb = im.convert("RGB")
        thumb.thumbnail((REFERENCE_SIZE, REFERENCE_SIZE))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=90)
        ref_paths[subject.name] = f"references/{subject.name}.jpg"
        write_file(out / ref_paths[subject.name], buf.getvalue())

    leak = None
    if request.shards:
        threshold = request.leak_threshold if request.leak_threshold is not None else section.get("leak_threshold", 0.6)
        bar = tqdm(desc="leak check (training images)", unit="img", dynamic_ncols=True)
        leak = leak_check(request.shards, per_photo, detector, embedder, float(threshold),
                          progress=lambda n: bar.update(n - bar.n))
        bar.close()
        for flagged in leak["flagged"]:
            log(f"LEAK: subject {flagged['subject']} matches {len(flagged['matches'])} training face(s) "
                f"(max cosine {flagged['max_similarity']} >= {threshold})")

    settings = WorkerSettings(
        checkpoint=str(checkpoint), pretrained=request.pretrained, image_encoder=request.image_encoder,
        photos={s.name: Path(s.photos[0]).read_bytes() for s in subjects},
        references={k: v.tolist() for k, v in references.items()}, multi=request.multi, steps=request.steps,
        guidance_scale=request.guidance_scale, alpha=request.alpha, resolution=request.resolution,
        baseline=request.baseline, evaluation=dict(section), device=request.device, threads=request.threads,
    )
    gen_started = time.perf_counter()
    if request.ray_address:
        if run_on_ray is None:
            raise ProtocolError(f"a Ray address ({request.ray_address}) was given but no Ray runner")
        batches = run_on_ray(settings, units, request.ray_address, request.workers, request.units_per_task)
        where = f"Ray ({request.ray_address})"
    else:
        batches = run_local(settings, units, max(1, request.units_per_task), detector, embedder, prompt_scorer)
        where = f"local ({device})"
    log(f"generating {len(units)} images ({len(subjects)} subjects, {len(prompts)} prompts, "
        f"{request.images_per_prompt} per prompt, methods: {OURS}{', ' + BASELINE if request.baseline else ''}) on {where}")
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(units), desc="generate + score", unit="img", dynamic_ncols=True) as bar:
        for batch in batches:
            for row, png in batch:
                write_file(out / row["image_path"], png)
                rows.append(row)
            bar.update(len(batch))
    gen_seconds = time.perf_counter() - gen_started

    header = {
        "protocol": "multi" if request.multi else "single",
        "checkpoint": str(checkpoint),
        "checkpoint_name": checkpoint.name,
        "step": state["step"],
        "subjects": [s.name for s in subjects],
        "subject_words": {s.name: s.word for s in subjects},
        "reference_notes": notes,
        "prompts_file": str(prompts_path),
        "prompts": len(prompts),
        "images_per_prompt": request.images_per_prompt,
        "seeds": [request.seed + k for k in range(request.images_per_prompt)],
        "alpha": request.alpha,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "resolution": request.resolution or state["config"].get("resolution"),
        "models": models,
        "ran_on": where,
    }
    seconds = {"total": round(time.perf_counter() - started, 3), "generate_and_score": round(gen_seconds, 3),
               "per_image": round(gen_seconds / max(1, len(units)), 4)}
    from training.evaluation.report import build_summary

    summary = build_summary(rows, notice=notice, random_models=randoms, header=header, leak=leak, seconds=seconds)
    paths = write_outputs(out, rows, summary, ref_paths, header, write_file)
    summary["outputs"] = {k: str(v) for k, v in paths.items()}
    return summary
