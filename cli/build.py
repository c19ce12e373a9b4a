"""``subject-ffhq build``: turn a source (FFHQ-wild download, image folder or img2dataset collection) into
shards + manifests.

    subject-ffhq build --source DIR|URL --out DIR|URL --profile paper|tiny [--shard-size N] [--limit N]
                       [--config FILE ...] [--ray-address ADDR] [--run-name NAME] [--manifests DIR]

Shards go to ``OUT/shards/subjects-NNNNN.tar``; the run's manifests to ``MANIFESTS/RUN/`` (default
``manifests/<name of OUT>/``). Each of SOURCE, OUT and MANIFESTS may be a URL (``s3://bucket/prefix``,
``gs://``, ...: :mod:`datagen.storage`); credentials come from the standard places, never the URL. Ray runs locally unless ``--ray-address`` or ``RAY_ADDRESS`` names a
cluster to join. Re-running the same command resumes: finished shards are skipped.

Before Ray starts and before anything is written, the command checks, in this order: the
settings (profile + every ``--config``, typed by :mod:`datagen.config`), the output and manifest
folders (folders or creatable, writable; a URL's bucket there, credentials accepted, the endpoint
answering; ``--run-name`` one plain folder name), and that every
model the profile names is there. Then it connects to Ray, giving up after
``ray.connect_timeout_s`` if nothing answers at the address.

Exit status: 0 every shard done (images that could not be used are recorded, not errors);
1 some shard failed after its retries (re-run to retry); 130 interrupted; 2 bad arguments/setup
(one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cli.errors import fail, note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="FFHQ-wild root (with ffhq-dataset-v2.json) or an image folder; a path or URL")
    parser.add_argument("--out", required=True, help="output folder or URL; shards go to OUT/shards/")
    parser.add_argument("--profile", default="paper", help="model profile: paper, tiny, or a YAML file (default: paper)")
    parser.add_argument(
        "--config", type=Path, action="append", default=[],
        help="YAML merged over the profile (e.g. a ray: or shards: section); may be repeated, later files win",
    )
    parser.add_argument("--shard-size", type=int, help="source images per shard (default: shards.size, 1000)")
    parser.add_argument("--limit", type=int, help="only the first N source images (in source order)")
    parser.add_argument("--run-name", help="run name, a plain folder name (default: the name of the --out folder)")
    parser.add_argument("--manifests", default="manifests", help="where run folders go, a path or URL (default: manifests)")
    parser.add_argument(
        "--ray-address", default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS if set, else a private local Ray started for this run)",
    )


class SetupError(ValueError):
    """An argument or setting that keeps the run from starting."""


def run(args: argparse.Namespace) -> int:
    from datagen.config import ProfileError
    from datagen.stages.model_loading import ModelNotFoundError
    from datagen.storage import StorageError

    try:
        profile, run_name = check_setup(args)
        check_models(profile)
    except (SetupError, ProfileError, ModelNotFoundError, StorageError) as e:
        return fail("build", e)

    # Ray, torch and the job only now that the settings are known to be good
    from datagen.manifests.shard_entry import ManifestError
    from datagen.sources.items import SourceError
    from ray_jobs.cluster import RayConnectError, ray_address, ray_session
    from ray_jobs.job import BuildRequest, run_build
    from ray_jobs.pool import StageStartError
    from ray_jobs.settings import SettingsError

    address = ray_address(args.ray_address)
    if address:
        print(f"[build] joining Ray at {address} (giving up after {profile.ray.connect_timeout_s:g} s)", flush=True)
    try:
        with ray_session(args.ray_address, connect_timeout_s=profile.ray.connect_timeout_s):
            request = BuildRequest(
                source=args.source, out=args.out, profile=profile, run_name=run_name,
                manifests_root=args.manifests, limit=args.limit, command_line=[sys.argv[0], *sys.argv[1:]],
            )
            summary = run_build(request)
    except RayConnectError as e:
        return fail("build", e)
    except KeyboardInterrupt:
        # run_build handles Ctrl-C itself once shards stream; this is Ctrl-C while connecting or starting
        note("build", "interrupted while starting; re-run the same command to resume")
        return 130
    except (SourceError, SettingsError, ManifestError, StageStartError, ValueError, OSError) as e:
        return fail("build", e)
    return summary.exit_code


def check_setup(args: argparse.Namespace):
    """The typed profile and the run name, or :class:`SetupError`/``ProfileError`` for the first
    argument or setting that is wrong. Reads only; creates nothing."""
    from datagen import storage
    from datagen.config import load_profile
    from datagen.manifests.run_manifest import run_name_problem

    if args.limit is not None and args.limit < 1:
        raise SetupError(f"--limit must be >= 1, got {args.limit}")
    if args.shard_size is not None and args.shard_size < 1:
        raise SetupError(f"--shard-size must be >= 1, got {args.shard_size}")
    for config in args.config:
        if not config.is_file():
            raise SetupError(f"--config {config}: file not found" if not config.exists() else f"--config {config}: not a file")
    overrides = {"shards": {"size": args.shard_size}} if args.shard_size is not None else None
    profile = load_profile(args.profile, *args.config, overrides)
    run_name = args.run_name if args.run_name is not None else storage.text(storage.path(args.out)).rstrip("/").rsplit("/", 1)[-1]
    problem = run_name_problem(run_name)
    if problem:
        what = f"--run-name {run_name!r}" if args.run_name is not None else f"the run name taken from --out ({run_name!r})"
        raise SetupError(f"{what} must be one plain folder name ({problem}), so the run stays under --manifests")
    storage.probe(args.source, "--source", must_exist=True)
    for option, where in (("--out", args.out), ("--manifests", args.manifests)):
        if storage.is_url(where):
            storage.probe(where, option)
            continue
        local = storage.path(where)  # file:// stripped, as the job writes it
        folder = local if option == "--out" else local / run_name
        for path in (local, folder, folder / "shards"):
            check_folder(option, path)
    return profile, run_name


def check_folder(option: str, path: Path) -> None:
    """``path`` is a writable folder, or can be made one (its nearest existing ancestor is a
    writable folder); else :class:`SetupError` naming ``option`` and the path."""
    if path.exists():
        if not path.is_dir():
            raise SetupError(f"{option}: {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SetupError(f"{option}: the folder {path} is not writable")
        return
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SetupError(f"{option}: cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SetupError(f"{option}: cannot create {path}: the folder {parent} is not writable")


def check_models(profile) -> None:
    """Every model the profile names is there (folder, HF cache when offline, installed spaCy
    pipeline), or ``ModelNotFoundError`` naming it: checked here, stage by stage of the stage table,
    in about a second, rather than by each actor after Ray started. Loading is still the actors'
    (a corrupt model fails there)."""
    from datagen.stage_table import check_models as check_stage_models

    check_stage_models(profile)
