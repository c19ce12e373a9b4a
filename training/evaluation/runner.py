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
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from datagen import storage
from datagen.config import EvaluationSettings
from training.evaluation.protocol import (
    BASELINE,
    BUILTIN_PROMPTS,
    DEFAULT_WORD,
    OURS,
    Prompt,
    ProtocolError,
    SubjectSpec,
    Unit,
    plan,
    read_prompts,
    read_subjects,
)
from training.evaluation.report import random_notice, write_outputs
from training.evaluation.worker import Worker, WorkerSettings

if TYPE_CHECKING:
    from training.evaluation.leak import RunIndex
    from training.evaluation.scoring import EvaluationModels

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
    resolution: int | None = None
    baseline: bool = True
    subject_word: str = DEFAULT_WORD
    # the profile's evaluation section, the command's options applied: models, protocol, leak threshold
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    shards: list[str] = field(default_factory=list)  # training shards for the leak check (re-detects faces)
    identities: str | None = None  # a run folder: the leak check through its face tables and identity index
    leak_distance: float | None = None  # the index check's euclidean distance (None: the run's threshold)
    device: str | None = None
    pretrained: str | None = None
    image_encoder: str | None = None
    ray_address: str | None = None
    workers: int | None = None
    units_per_task: int = 4
    threads: int | None = None


@dataclass
class Inputs:
    """What an evaluation generates and scores, read and checked before any model loads."""

    subjects: list[SubjectSpec]
    prompts_path: str
    prompts: list[Prompt]
    units: list[Unit]
    checkpoint: Path
    state: dict[str, Any]
    models: dict[str, str | None]  # every model it loads, by role
    random_models: list[str]  # those of them with random weights
    notice: str | None  # what the outputs say first when a model has random weights
    run_index: RunIndex | None = None  # --identities: the run's index, checked
    photos: dict[str, list[Image.Image]] = field(default_factory=dict)  # subject -> its photos, RGB, decoded once


def write_file(path: Path, data: bytes | str) -> Path:
    from datagen.files import atomic_write

    return atomic_write(path, data)


def model_references(request: EvaluationRequest, state: dict[str, Any]) -> dict[str, str | None]:
    """Every model the evaluation loads, by role (the base models of the checkpoint whose
    ``trainer_state.json`` is ``state`` included)."""
    from training.config import TrainConfig

    cfg = TrainConfig.from_dict(state["config"])
    section = request.evaluation
    return {
        "base (Stable Diffusion)": request.pretrained or cfg.pretrained,
        "image encoder": request.image_encoder or cfg.image_encoder,
        "face detector": section.face_detector,
        "face embedder": section.face_embedder,
        "clip": section.clip_model,
        "clip_pretrained": section.clip_pretrained,
    }


def random_models(models: dict[str, str | None]) -> list[str]:
    from datagen.stages.model_loading import has_random_weights

    return [f"{role}: {ref}" for role, ref in models.items() if ref and has_random_weights(ref)]


def check_section(section: EvaluationSettings) -> None:
    missing = [k for k in ("face_embedder", "clip_model") if not getattr(section, k)]
    if missing:
        raise ProtocolError(f"the profile's evaluation section lacks {missing} (see datagen/profiles/paper.yaml)")


def read_inputs(request: EvaluationRequest) -> Inputs:
    """Subjects, prompts, the plan of images and the checkpoint; fails on the first bad input."""
    from training.checkpoint import read_state
    from training.sampler import resolve_checkpoint

    section = request.evaluation
    check_section(section)
    subjects = read_subjects(request.subjects, request.subject_word)
    prompts_path = request.prompts or str(BUILTIN_PROMPTS["multi" if request.multi else "single"])
    prompts = read_prompts(prompts_path)
    units = plan(subjects, prompts, multi=request.multi, images_per_prompt=section.images_per_prompt,
                 seed=section.seed, baseline=request.baseline,
                 image_suffix=".jpg" if section.image_format == "jpeg" else ".png")
    checkpoint = resolve_checkpoint(request.checkpoint)  # resolved and read once
    state = read_state(checkpoint)
    models = model_references(request, state)
    randoms = random_models(models)
    run_index = None
    if request.identities:
        from training.evaluation.leak import open_run_index

        run_index = open_run_index(request.identities)
        models["leak check embedder (the run's)"] = run_index.section.embedder
    return Inputs(subjects, str(prompts_path), prompts, units, checkpoint, state, models, randoms,
                  random_notice(randoms) if randoms else None, run_index,
                  {s.name: read_photos(s) for s in subjects})  # an unreadable photo fails here, before any model


def read_photos(subject: SubjectSpec) -> list[Image.Image]:
    """The subject's photos, RGB; a photo that cannot be read is refused, naming it."""
    images = []
    for path in subject.photos:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            raise EvaluationError(f"subject {subject.name}: cannot read the photo {path} ({e})") from e
    return images


def reference_faces(subjects, detector, embedder, photos: dict[str, list[Image.Image]] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Per subject: (photos x D) face embeddings (the largest face of each photo) and notes;
    ``photos``: the subjects' photos already decoded (:class:`Inputs`), else read here."""
    embeddings, notes = {}, {}
    for subject in subjects:
        found = detector.detect(photos[subject.name] if photos else read_photos(subject))
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


def run_reference_faces(subjects: list[SubjectSpec], index: RunIndex, device: str,
                        photos: dict[str, list[Image.Image]] | None = None) -> dict[str, np.ndarray]:
    """Per subject: (photos x d) raw embeddings of the largest face of each photo, made as the run's
    build made its faces (its MTCNN settings, its box embedder): what the index leak check compares.
    ``photos``: as for :func:`reference_faces`."""
    from datagen.stages.identity import IdentityFinder

    finder = IdentityFinder(index.section, index.detector, device)
    embeddings = {}
    for subject in subjects:
        vectors = []
        images = photos[subject.name] if photos else read_photos(subject)
        for path, faces in zip(subject.photos, finder.find(images), strict=True):
            if not faces:
                raise EvaluationError(f"subject {subject.name}: MTCNN (the run's identity settings: min_face_size "
                                      f"{index.section.min_face_size}, min_score {index.section.min_score}) finds no "
                                      f"face in the reference photo {path}")
            face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
            if face.embedding is None:
                raise EvaluationError(f"subject {subject.name}: the largest face of {path} is {face.reason}; "
                                      "use a larger, sharper photo")
            vectors.append(face.embedding)
        embeddings[subject.name] = np.asarray(vectors, np.float32)
    return embeddings


def write_reference_thumbnails(subjects: list[SubjectSpec], out: Path, photos: dict[str, list[Image.Image]]
                               ) -> dict[str, str]:
    """A thumbnail of each subject's first photo (``photos``: decoded already) under ``OUT/references/``;
    subject -> its path in OUT."""
    paths = {}
    for subject in subjects:
        thumb = photos[subject.name][0].copy()  # thumbnail() works in place
        thumb.thumbnail((REFERENCE_SIZE, REFERENCE_SIZE))
        buf = io.BytesIO()
        thumb.save(buf, format="JPEG", quality=90)
        paths[subject.name] = f"references/{subject.name}.jpg"
        write_file(out / paths[subject.name], buf.getvalue())
    return paths


def check_for_leaks(request: EvaluationRequest, inputs: Inputs, per_photo: dict[str, np.ndarray],
                    models: EvaluationModels, device: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The leak check, each way the request asks for (``--shards``, ``--identities``), or ``None``:
    ``checked_with`` (the ways), ``flagged`` (subjects either way flagged), and each way's result."""
    checks: dict[str, Any] = {}
    if request.shards:
        checks["shards"] = shards_leak_check(request, per_photo, models, log)
    if inputs.run_index is not None:
        checks["identities"] = identities_leak_check(request, inputs, device, log)
    if not checks:
        return None
    flagged = set(checks.get("identities", {}).get("flagged", []))
    flagged |= {f["subject"] for f in checks.get("shards", {}).get("flagged", [])}
    return {"checked_with": list(checks), "flagged": [s.name for s in inputs.subjects if s.name in flagged],
            "shards": checks.get("shards"), "identities": checks.get("identities")}


def identities_leak_check(request: EvaluationRequest, inputs: Inputs, device: str,
                          log: Callable[[str], None]) -> dict[str, Any]:
    """The leak check through the run's face tables and identity index (``training.evaluation.leak``)."""
    from training.evaluation.leak import index_leak_check

    index = inputs.run_index
    references = run_reference_faces(inputs.subjects, index, device, inputs.photos)
    leak = index_leak_check(index, references, request.leak_distance)
    for hit in leak["subjects"]:
        ids = ", ".join(f"{e['identity']} ({e['photos']} photos, {e['train_faces_hit']} train / "
                        f"{e['reserve_faces_hit']} reserve faces)" for e in hit["identities"])
        what = "LEAK" if hit["flagged"] else "reserve only (not a leak)"
        log(f"{what}: subject {hit['subject']} is identity {ids} of {index.run_dir.name} "
            f"(distance {hit['min_distance']} < {leak['threshold']}, {leak['embedder']})")
    return leak


def shards_leak_check(request: EvaluationRequest, per_photo: dict[str, np.ndarray], models: EvaluationModels,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """The leak check against the training shards: every face re-detected and embedded."""
    from tqdm import tqdm

    from training.evaluation.leak import leak_check

    threshold = request.evaluation.leak_threshold
    bar = tqdm(desc="leak check (training images)", unit="img", dynamic_ncols=True)
    leak = leak_check(request.shards, per_photo, models.detector, models.embedder, float(threshold),
                      progress=lambda n: bar.update(n - bar.n))
    bar.close()
    for flagged in leak["flagged"]:
        log(f"LEAK: subject {flagged['subject']} matches {len(flagged['matches'])} training face(s) "
            f"(max cosine {flagged['max_similarity']} >= {threshold})")
    return leak


def run_local(settings: WorkerSettings, units: list[Unit], chunk: int,
              models: EvaluationModels) -> Iterator[list[tuple[dict, bytes]]]:
    worker = Worker(settings, models)
    for start in range(0, len(units), chunk):
        yield worker.run(units[start:start + chunk])


def generate_and_score(request: EvaluationRequest, settings: WorkerSettings, inputs: Inputs, models: EvaluationModels,
                       device: str, run_on_ray: Callable | None, log: Callable[[str], None]) -> tuple[list[dict], str]:
    """Every unit generated and scored, in-process or on Ray; the images written under OUT as they come.
    Returns the table rows and where they ran."""
    from tqdm import tqdm

    units, out = inputs.units, storage.path(request.out)
    if request.ray_address:
        if run_on_ray is None:
            raise ProtocolError(f"a Ray address ({request.ray_address}) was given but no Ray runner")
        batches = run_on_ray(settings, units, request.ray_address, request.workers, request.units_per_task)
        where = f"Ray ({request.ray_address})"
    else:
        batches = run_local(settings, units, max(1, request.units_per_task), models)
        where = f"local ({device})"
    log(f"generating {len(units)} images ({len(inputs.subjects)} subjects, {len(inputs.prompts)} prompts, "
        f"{request.evaluation.images_per_prompt} per prompt, methods: {OURS}"
        f"{', ' + BASELINE if request.baseline else ''}) on {where}")
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(units), desc="generate + score", unit="img", dynamic_ncols=True) as bar:
        for batch in batches:
            for row, png in batch:
                write_file(out / row["image_path"], png)
                rows.append(row)
            bar.update(len(batch))
    return rows, where


def summary_header(request: EvaluationRequest, inputs: Inputs, notes: dict[str, list[str]], where: str) -> dict[str, Any]:
    protocol = request.evaluation
    return {
        "protocol": "multi" if request.multi else "single",
        "checkpoint": str(inputs.checkpoint),
        "checkpoint_name": inputs.checkpoint.name,
        "step": inputs.state["step"],
        "subjects": [s.name for s in inputs.subjects],
        "subject_words": {s.name: s.word for s in inputs.subjects},
        "reference_notes": notes,
        "prompts_file": inputs.prompts_path,
        "prompts": len(inputs.prompts),
        "images_per_prompt": protocol.images_per_prompt,
        "seeds": [protocol.seed + k for k in range(protocol.images_per_prompt)],
        "protocol_preset": protocol.protocol,
        "alpha": protocol.alpha,
        "face_choice": protocol.face_choice,
        "image_format": protocol.image_format + (f" q{protocol.jpeg_quality}" if protocol.image_format == "jpeg" else ""),
        "steps": protocol.steps,
        "guidance_scale": protocol.guidance_scale,
        "resolution": request.resolution or inputs.state["config"].get("resolution"),
        "models": inputs.models,
        "ran_on": where,
    }


def evaluate(
    request: EvaluationRequest, log: Callable[[str], None] = print, run_on_ray: Callable | None = None,
) -> dict[str, Any]:
    """Run the evaluation; return the summary (also written to ``OUT/summary.json``)."""
    import torch

    from datagen.stages.model_loading import pick_device
    from training.evaluation.report import build_summary
    from training.evaluation.scoring import EvaluationModels, reference_embedding

    started = time.perf_counter()
    if request.threads:
        torch.set_num_threads(request.threads)
    inputs = read_inputs(request)
    if inputs.notice:
        log(inputs.notice)
    out = storage.path(request.out)  # a folder, or a bucket URL (every file written through datagen.files)
    if isinstance(out, Path):
        out.mkdir(parents=True, exist_ok=True)

    # Models of the driver (fail here, before any image, when one is missing).
    device = pick_device(request.device)
    models = EvaluationModels.load(request.evaluation, device)
    per_photo, notes = reference_faces(inputs.subjects, models.detector, models.embedder, inputs.photos)
    for name, lines in notes.items():
        log(f"subject {name}: " + "; ".join(lines))
    ref_paths = write_reference_thumbnails(inputs.subjects, out, inputs.photos)
    leak = check_for_leaks(request, inputs, per_photo, models, device, log)

    settings = WorkerSettings(
        checkpoint=str(inputs.checkpoint), pretrained=request.pretrained, image_encoder=request.image_encoder,
        photos={s.name: Path(s.photos[0]).read_bytes() for s in inputs.subjects},
        references={name: reference_embedding(v).tolist() for name, v in per_photo.items()}, multi=request.multi,
        resolution=request.resolution, baseline=request.baseline, evaluation=request.evaluation,
        device=request.device, threads=request.threads,
    )
    gen_started = time.perf_counter()
    rows, where = generate_and_score(request, settings, inputs, models, device, run_on_ray, log)
    gen_seconds = time.perf_counter() - gen_started

    seconds = {"total": round(time.perf_counter() - started, 3), "generate_and_score": round(gen_seconds, 3),
               "per_image": round(gen_seconds / max(1, len(inputs.units)), 4)}
    header = summary_header(request, inputs, notes, where)
    summary = build_summary(rows, notice=inputs.notice, random_models=inputs.random_models, header=header, leak=leak,
                            seconds=seconds)
    paths = write_outputs(out, rows, summary, ref_paths, header, write_file)
    summary["outputs"] = {k: str(v) for k, v in paths.items()}
    return summary
