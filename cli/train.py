"""``subject-ffhq train``: train FastComposer on shards with Ray Train.

    subject-ffhq train --shards 'out/demo/shards/*.tar' --profile tiny --out out/train --steps 100
                       [--workers N] [--gpu] [--batch-size B] [--grad-accum K] [--lr LR]
                       [--checkpoint-every K] [--resolution R] [--config FILE] ...

Models come from the profile's ``trainer`` section (``pretrained``: Stable Diffusion folder or hub
id; ``image_encoder``: CLIP vision folder or hub id); they are checked before Ray starts, so a
missing model fails at once with a message saying which, where it was looked for and how to get
it. Checkpoints and ``train_log.jsonl`` go to OUT; running again with the same OUT resumes from
the latest checkpoint there (and says so).

Exit status: 0 trained to --steps; 1 training failed (after --max-failures restarts); 2 bad
arguments or setup; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# command-line option -> TrainConfig field (None: not given, profile/default applies)
OPTIONS = {
    "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr",
    "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints", "resolution": "resolution",
    "max_subjects": "max_subjects", "loader_workers": "loader_workers", "seed": "seed",
    "max_failures": "max_failures", "mixed_precision": "mixed_precision", "localization_weight": "localization_weight",
    "run_name": "run_name", "log_every": "log_every", "workers": "num_workers",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, nargs="+", metavar="GLOB",
                        help="shard tars: one or more globs or paths, e.g. 'out/demo/shards/*.tar' (quote the glob)")
    parser.add_argument("--profile", default="paper", help="model profile: paper, tiny, or a YAML file (default: paper)")
    parser.add_argument("--config", type=Path, help="YAML merged over the profile (e.g. trainer: {resolution: 256})")
    parser.add_argument("--out", required=True, type=Path, help="run folder: checkpoints and logs (re-use it to resume)")
    parser.add_argument("--steps", type=int, help="train until this optimizer step (default 150000)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (one per GPU with --gpu; default 1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    parser.add_argument("--batch-size", type=int, help="examples per worker per micro-batch (default 16)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--lr", type=float, help="learning rate, constant (default 1e-5)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 1000)")
    parser.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 3)")
    parser.add_argument("--resolution", type=int, help="training image size in pixels (default 512)")
    parser.add_argument("--max-subjects", type=int, help="subjects per example at most (default 4)")
    parser.add_argument("--loader-workers", type=int, help="DataLoader processes per worker (default 4)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for U-Net memory")
    parser.add_argument("--mixed-precision", choices=("auto", "fp32", "bf16"), help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--localization-weight", type=float, help="weight of the localization loss (default 1e-3)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint (default 3)")
    parser.add_argument("--log-every", type=int, help="steps between log lines (default 1)")
    parser.add_argument("--run-name", help="Ray Train run name under OUT (default fastcomposer)")


def config_from_args(args: argparse.Namespace):
    """The TrainConfig these arguments describe (profile + --config + options); raises on bad input."""
    from datagen.config import load_profile
    from training.config import TrainConfig, expand_shards

    if args.config is not None and not args.config.is_file():
        raise ValueError(f"--config {args.config}: file not found")
    profile = load_profile(args.profile, args.config)
    overrides = {field: getattr(args, opt) for opt, field in OPTIONS.items()}
    if args.gpu:
        overrides["use_gpu"] = True
    if args.gradient_checkpointing:
        overrides["gradient_checkpointing"] = True
    return TrainConfig.from_profile(profile.to_dict(), shards=expand_shards(args.shards), out=str(args.out.resolve()), **overrides)


def check_models(cfg) -> None:
    """Resolve both model references now (clear error if missing) and check the SD folder's parts."""
    from datagen.stages.model_loading import ModelNotFoundError, resolve_model

    sd = resolve_model(cfg.pretrained, "trainer base (Stable Diffusion)")
    resolve_model(cfg.image_encoder, "trainer image encoder (CLIP vision with projection)")
    if Path(sd).is_dir():
        missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (Path(sd) / p).is_dir()]
        if missing:
            raise ModelNotFoundError(
                f"trainer base {cfg.pretrained!r} ({sd}) lacks the subfolder(s) {missing}; a Stable Diffusion folder "
                "has unet/ vae/ text_encoder/ tokenizer/ scheduler/"
            )


def run(args: argparse.Namespace) -> int:
    from datagen.config import ProfileError
    from datagen.stages.model_loading import ModelNotFoundError
    from training.config import ConfigError

    try:
        cfg = config_from_args(args)
        check_models(cfg)
    except (ConfigError, ProfileError, ModelNotFoundError, ValueError) as e:
        return _fail(str(e))

    from ray_jobs.cluster import RayConnectError, forwarded_env, ray_session
    from training.ray_train import run_training

    try:
        # with the dashboard: without it Ray Train v2's clean-up actor warns every second
        with ray_session(include_dashboard=True):
            run_training(cfg, worker_env=forwarded_env())
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (ConfigError, RayConnectError) as e:
        return _fail(str(e))
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; report them and exit 1
        if type(e).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
