"""``subject-ffhq evaluate``: score a checkpoint the way FastComposer's paper does (§5.1-5.3).

    subject-ffhq evaluate --checkpoint out/train --subjects photos/ --out out/eval \\
        [--prompts FILE] [--multi] [--protocol ours|released] [--images-per-prompt 4] [--alpha 0.7] \\
        [--shards 'out/dataset/shards/*.tar'] [--identities RUN [--leak-distance D]] [--profile paper] \
        [--ray-address ADDR]

Generates every (subject(s), prompt, seed) image with the checkpoint and with the text-only Stable
Diffusion baseline of the same base model, scores identity preservation (MTCNN + FaceNet) and prompt
consistency (CLIP), and writes ``OUT/results.parquet``, ``OUT/summary.json``, ``OUT/evaluation.html``,
the images (``OUT/images/``) and reference thumbnails (``OUT/references/``). ``--shards`` adds the leak
check by re-detecting every face of the shards; ``--identities RUN`` adds it through the run's face
tables and identity index (the run's embedder, euclidean, only train-side hits flagged;
``training/evaluation/leak.py``). ``--protocol released`` scores as FastComposer's released evaluation scripts do (alpha 0.5, JPEG
q75 files, the largest face, 4 images per prompt; ``docs/evaluation.md``). Without ``--prompts`` the built-in list of the protocol is used (30 single-subject prompts, or
21 two-subject prompts with ``--multi``). Runs on Ray when ``--ray-address`` or ``RAY_ADDRESS`` is
set (``local`` starts Ray on this machine), in this process otherwise.

Exit status: 0 written; 2 bad arguments, inputs or setup (a missing model says which and how to get it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cli.errors import fail
from datagen.manifests.run_manifest import DEFAULT_MANIFESTS_ROOT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder, or a training run folder (its latest checkpoint); local or a bucket URL "
                             "(downloaded to a temporary folder per worker)")
    parser.add_argument("--subjects", required=True, type=Path,
                        help="folder with one sub-folder of photos (optional word.txt) or one photo per subject")
    parser.add_argument("--prompts", type=Path, help="prompt file, one prompt per line, {} = a subject "
                        "(default: the built-in list of the protocol)")
    parser.add_argument("--multi", action="store_true", help="multi-subject protocol: every combination of subjects")
    parser.add_argument("--protocol", choices=("ours", "released"), help="released: FastComposer's released evaluation "
                        "(alpha 0.5, images scored as JPEG q75, the largest face, 4 images per prompt); ours: the "
                        "profile's evaluation settings (default: the profile's evaluation.protocol, 'ours'); options "
                        "given here win over either")
    parser.add_argument("--images-per-prompt", type=int, help="images per (subjects, prompt), seeds SEED..SEED+N-1 "
                        "(default: the profile's evaluation.images_per_prompt)")
    parser.add_argument("--alpha", type=float, help="fraction of steps with subject conditioning "
                        "(default: the profile's evaluation.alpha)")
    parser.add_argument("--out", required=True, help="output folder or bucket URL (s3://...)")
    parser.add_argument("--profile", default="paper", help="model profile for the face and CLIP models: paper, tiny, or a YAML file")
    parser.add_argument("--config", type=Path, help="YAML merged over the profile (e.g. evaluation: {leak_threshold: 0.5})")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the profile's evaluation.steps)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale "
                        "(default: the profile's evaluation.guidance_scale)")
    parser.add_argument("--seed", type=int, help="first seed (default: the profile's evaluation.seed)")
    parser.add_argument("--resolution", type=int, help="image size (default: the checkpoint's training resolution)")
    parser.add_argument("--subject-word", default=None, help="class word of subjects without word.txt (default person)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the text-only Stable Diffusion baseline")
    parser.add_argument("--shards", nargs="+", metavar="GLOB", help="training shards for the leak check (every face "
                        "re-detected and embedded with the evaluation's face embedder)")
    parser.add_argument("--leak-threshold", type=float, help="--shards leak check: the evaluation embedder's cosine at "
                        "which a training face counts as the subject (default: the profile's evaluation.leak_threshold)")
    parser.add_argument("--identities", metavar="RUN", help="leak check through a build run's face tables and "
                        "identities.parquet (run folder, or a run name under --manifests-root): the reference photos "
                        "embedded with the run's own embedder; only hits on the train side of split.parquet are flagged")
    parser.add_argument("--manifests-root", default=DEFAULT_MANIFESTS_ROOT, help="where --identities run names are "
                        "looked up")
    parser.add_argument("--leak-distance", type=float, help="--identities leak check: the euclidean distance, in the "
                        "run's embedding space, under which a run face counts as the subject (default: the distance "
                        "the run's identities were clustered at; dlib 0.5, vggface2 1.0)")
    parser.add_argument("--face-embedder", help="identity scoring and the leak check: 'dlib' (dlib's descriptor, real "
                        "weights, offline; cosine of the same person ~0.93+) or 'vggface2' / a FaceNet folder "
                        "(default: the profile's evaluation.face_embedder)")
    parser.add_argument("--device", help="cuda or cpu for the local run (default: cuda if available)")
    parser.add_argument("--pretrained", help="override the base Stable Diffusion folder/id stored in the checkpoint")
    parser.add_argument("--image-encoder", help="override the CLIP vision folder/id stored in the checkpoint")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to generate on ('local': start Ray here; "
                        "default: $RAY_ADDRESS, else no Ray)")
    parser.add_argument("--workers", type=int, help="Ray actors (default: one per GPU of the cluster)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process")


# option (its argparse dest) -> the evaluation setting it overrides
OVERRIDES = {"images_per_prompt": "images_per_prompt", "alpha": "alpha", "steps": "steps", "guidance": "guidance_scale",
             "seed": "seed", "leak_threshold": "leak_threshold", "face_embedder": "face_embedder"}


def evaluation_settings(args: argparse.Namespace):
    """The profile's evaluation section (profile + --config) with the options given applied; a bad
    option value is refused naming the option."""
    import dataclasses

    from datagen.config import BadValue, load_profile

    if args.config is not None and not args.config.is_file():
        raise ValueError(f"--config {args.config}: file not found")
    section = load_profile(args.profile, args.config).evaluation
    if getattr(args, "protocol", None):
        section = dataclasses.replace(section, protocol=args.protocol)
    section = section.with_protocol()
    given = {setting: getattr(args, dest) for dest, setting in OVERRIDES.items() if getattr(args, dest) is not None}
    try:
        return dataclasses.replace(section, **given)
    except BadValue as e:
        dest = next(d for d, setting in OVERRIDES.items() if setting == e.key)
        raise ValueError(f"--{dest.replace('_', '-')} {e.problem}") from None


def request_from_args(args: argparse.Namespace):
    from datagen import storage
    from training.config import expand_shards
    from training.evaluation.protocol import DEFAULT_WORD
    from training.evaluation.runner import EvaluationRequest

    storage.probe(args.out, "--out")  # a bucket URL: reachable, in seconds (exit 2 otherwise)
    identities = None
    if args.identities:
        from datagen.manifests.run_manifest import resolve_run_dir

        identities = str(resolve_run_dir(args.identities, args.manifests_root))
    if args.leak_distance is not None and not args.leak_distance > 0:
        raise ValueError(f"--leak-distance must be a positive euclidean distance, got {args.leak_distance}")
    if args.leak_distance is not None and not identities:
        raise ValueError("--leak-distance applies to the --identities leak check; give --identities RUN")
    return EvaluationRequest(
        checkpoint=str(args.checkpoint), subjects=str(args.subjects), out=args.out,
        prompts=str(args.prompts) if args.prompts else None, multi=args.multi, resolution=args.resolution,
        baseline=not args.no_baseline, subject_word=args.subject_word or DEFAULT_WORD,
        evaluation=evaluation_settings(args), shards=expand_shards(args.shards) if args.shards else [],
        identities=identities, leak_distance=args.leak_distance,
        device=args.device, pretrained=args.pretrained, image_encoder=args.image_encoder,
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS") or None, workers=args.workers,
        threads=args.threads,
    )


def run(args: argparse.Namespace) -> int:
    from datagen.config import ProfileError
    from datagen.stages.faces import FaceError
    from datagen.stages.model_loading import ModelNotFoundError
    from ray_jobs.cluster import RayConnectError
    from ray_jobs.evaluation import EvaluationPoolError
    from training.checkpoint import CheckpointError
    from training.evaluation.protocol import BASELINE, OURS
    from training.evaluation.runner import evaluate
    from training.sampler import SamplerError

    try:
        request = request_from_args(args)
        run_on_ray = None
        if request.ray_address:
            from ray_jobs.evaluation import run_on_ray
        summary = evaluate(request, run_on_ray=run_on_ray)
    except (RayConnectError, ValueError, ProfileError, CheckpointError, SamplerError, ModelNotFoundError, FaceError) as e:
        return fail("evaluate", e)
    except (EvaluationPoolError, OSError) as e:  # on the way: an actor that failed, a file that cannot be written
        return fail("evaluate", e, 1)
    if summary["random_weights"]:
        print(summary["notice"])
    for method in (OURS, BASELINE):
        m = summary["methods"].get(method)
        if m:
            print(f"{method:>14}: identity {m['identity']:.4f}  prompt consistency {m['prompt_consistency']:.4f}  "
                  f"({m['images']} images, {m['images_with_a_face']} with a face, {m['seconds_per_image']:.2f} s/image)")
    leak = summary.get("leak_check")
    for way, where in (("shards", "the training shards"), ("identities", "the run's identity index (train side)")):
        if leak and leak[way] is not None:
            flagged = [f["subject"] if isinstance(f, dict) else f for f in leak[way]["flagged"]]
            print(f"leak check ({way}): {len(flagged)} subject(s) found in {where}"
                  + (f": {', '.join(flagged)}" if flagged else ""))
    for name, path in summary["outputs"].items():
        print(f"{name}: {path}")
    return 0
