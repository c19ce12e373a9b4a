"""``subject-ffhq train``: train FastComposer on shards with Ray Train.

    subject-ffhq train --shards 'out/demo/shards/*.tar' --profile tiny --out out/train --steps 100
                       [--workers N] [--gpu] [--batch-size B] [--grad-accum K] [--lr LR]
                       [--checkpoint-every K] [--resolution R] [--config FILE] ...

Models come from the profile's ``trainer`` section (``pretrained``: Stable Diffusion folder or hub
id; ``image_encoder``: CLIP vision folder or hub id); they are checked before Ray starts, so a
missing model fails at once with a message saying which, where it was looked for and how to get
it. Checkpoints and ``train_log.jsonl`` go to OUT; running again with the same OUT resumes from
the latest checkpoint there (and says so). ``--shards`` and ``--out`` may be bucket URLs
(``s3://bucket/ds/shards/*.tar``, ``s3://bucket/train``): the shards stream from the bucket and Ray
Train keeps its checkpoints there (:mod:`datagen.storage`); a bad URL stops it in seconds, exit 2.

Every option after ``--out`` is a trainer setting, generated from
:data:`training.config.TRAIN_OPTIONS` (help text) and :class:`datagen.config.TrainerSettings` (type,
choices, default); a setting not given comes from the profile / ``--config`` or that default.

Exit status: 0 trained to --steps; 1 training failed (after --max-failures restarts); 2 bad
arguments or setup; 130 interrupted.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

from cli.errors import fail, note

COMMAND = "train"


def config_options():
    """(option name, field, help text, type) of every setting in ``training.config.TRAIN_OPTIONS``."""
    import dataclasses
    import typing

    from training.config import TRAIN_OPTIONS, TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for name, (option, help_text) in TRAIN_OPTIONS.items():
        yield option or name.replace("_", "-"), fields[name], help_text, hints[name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, nargs="+", metavar="GLOB",
                        help="shard tars: one or more globs or paths, e.g. 'out/demo/shards/*.tar' (quote the glob)")
    parser.add_argument("--profile", default="paper", help="model profile: paper, tiny, or a YAML file (default: paper)")
    parser.add_argument("--config", type=Path, help="YAML merged over the profile (e.g. trainer: {resolution: 256})")
    parser.add_argument("--out", required=True,
                        help="run folder or bucket URL (s3://...): checkpoints and logs (re-use it to resume)")
    # The TrainConfig settings marked for the command line; not given = the profile's or the default.
    for option, f, help_text, hint in config_options():
        help_text = help_text.replace("%", "%%")
        if hint is bool:  # a switch that turns the setting on
            parser.add_argument(f"--{option}", dest=f.name, action="store_true", default=None, help=help_text)
            continue
        if isinstance(hint, types.UnionType):  # an optional setting (``str | None``): the option gives a value
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        kind = comma_list if typing.get_origin(hint) is tuple else str if choices else hint
        parser.add_argument(f"--{option}", dest=f.name, type=kind, choices=choices,
                            metavar=None if choices else option.upper().replace("-", "_"),
                            help=f"{help_text} (default {','.join(f.default) if isinstance(f.default, tuple) else f.default})")


def comma_list(text: str) -> tuple[str, ...]:
    """``"person,dog"`` -> ``("person", "dog")`` (TrainConfig checks the names)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def config_from_args(args: argparse.Namespace):
    """The TrainConfig these arguments describe (profile + --config + options); raises on bad input."""
    from datagen import storage
    from datagen.config import load_profile
    from training.config import TrainConfig, expand_shards

    if args.config is not None and not args.config.is_file():
        raise ValueError(f"--config {args.config}: file not found")
    profile = load_profile(args.profile, args.config)
    overrides = {f.name: getattr(args, f.name) for _, f, _, _ in config_options()}
    for pattern in args.shards:
        storage.probe(pattern.split("*")[0], "--shards")  # a bucket URL: reachable, in seconds
    storage.probe(args.out, "--out")
    return TrainConfig.from_profile(profile, shards=expand_shards(args.shards), out=storage.text(storage.path(args.out)),
                                    **overrides)


def check_split_file(cfg) -> None:
    """A ``--split-file`` must be readable now: the loader reads it per sample, in its workers."""
    from datagen.identity.split import read_split

    if cfg.split_file is not None:
        read_split(cfg.split_file)


def check_reference_set(cfg) -> None:
    """With ``--reference cross-image / mixed:P`` the reference set must be there now: the loader
    reads it in its workers, after the models load (a bad one restarted them until training failed).
    Its tables are checked to exist, not read (the set may be a gigabyte)."""
    from datagen.identity import references
    from datagen.training_settings import reference_share

    if reference_share(cfg.reference) <= 0:
        return
    try:
        references.check_reference_set(cfg.reference_set)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--reference-set {e}") from e


def check_models(cfg) -> None:
    """Check now, before Ray starts, that both models load: a folder or a cached snapshot must hold what
    the loader reads (configs, whole weights, the SD parts); one error line names what is missing."""
    from datagen.stages.model_loading import ModelNotFoundError, loadable_problem, resolve_model
    from training.config import SD_PARTS

    for ref, what, parts in ((cfg.pretrained, "trainer base (Stable Diffusion)", SD_PARTS),
                             (cfg.image_encoder, "trainer image encoder (CLIP vision with projection)", ())):
        path = Path(resolve_model(ref, what, parts=parts))
        problem = loadable_problem(path, parts) if path.is_dir() else None
        if problem:
            raise ModelNotFoundError(f"{what} {ref!r} ({path}) cannot be loaded: {problem}")


def run(args: argparse.Namespace) -> int:
    from datagen.config import ProfileError
    from datagen.stages.model_loading import ModelNotFoundError
    from training.config import ConfigError

    try:
        cfg = config_from_args(args)
        check_split_file(cfg)
        check_reference_set(cfg)
        check_models(cfg)
    except (ConfigError, ProfileError, ModelNotFoundError, ValueError, FileNotFoundError) as e:
        return fail(COMMAND, e)

    from ray_jobs.cluster import RayConnectError, forwarded_env, ray_session
    from ray_jobs.train import run_training

    try:
        # with the dashboard: without it Ray Train v2's clean-up actor warns every second
        with ray_session(include_dashboard=True):
            run_training(cfg, worker_env=forwarded_env())
    except KeyboardInterrupt:
        note(COMMAND, "interrupted; run the same command again to resume from the last checkpoint")
        return 130
    except (ConfigError, RayConnectError) as e:
        return fail(COMMAND, e)
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; report them and exit 1
        if type(e).__name__ not in ("TrainingFailedError", "WorkerGroupError", "ControllerError"):
            raise
        return fail(COMMAND, f"training failed: {e}", 1)
    return 0
