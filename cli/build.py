"""``subject-ffhq build``: turn a source (FFHQ-wild download or image folder) into shards + manifests.

    subject-ffhq build --source DIR --out DIR --profile paper|tiny [--shard-size N] [--limit N]
                       [--config FILE] [--ray-address ADDR] [--run-name NAME] [--manifests DIR]

Shards go to ``OUT/shards/subjects-NNNNN.tar``; the run's manifests to ``MANIFESTS/RUN/`` (default
``manifests/<name of OUT>/``). Ray runs locally unless ``--ray-address`` or ``RAY_ADDRESS`` names a
cluster to join. Re-running the same command resumes: finished shards are skipped.

Exit status: 0 every shard done (images that could not be used are recorded, not errors);
1 some shard failed after its retries (re-run to retry); 130 interrupted; 2 bad arguments/setup.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, type=Path, help="FFHQ-wild root (with ffhq-dataset-v2.json) or an image folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder; shards go to OUT/shards/")
    parser.add_argument("--profile", default="paper", help="model profile: paper, tiny, or a YAML file (default: paper)")
    parser.add_argument("--config", type=Path, help="YAML merged over the profile (e.g. a ray: or shards: section)")
    parser.add_argument("--shard-size", type=int, help="source images per shard (default: shards.size, 1000)")
    parser.add_argument("--limit", type=int, help="only the first N source images (in source order)")
    parser.add_argument("--run-name", help="run name (default: the name of the --out folder)")
    parser.add_argument("--manifests", type=Path, default=Path("manifests"), help="where run folders go (default: manifests)")
    parser.add_argument(
        "--ray-address", default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS if set, else a local Ray started for this run)",
    )


def run(args: argparse.Namespace) -> int:
    from datagen.config import ProfileError, load_profile, merge
    from datagen.manifests.shard_entry import ManifestError
    from datagen.sources.readers import SourceError
    from ray_jobs.pool import StageStartError
    from ray_jobs.settings import SettingsError

    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit must be >= 1, got {args.limit}")
    if args.shard_size is not None and args.shard_size < 1:
        return _fail(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.config is not None and not args.config.is_file():
        return _fail(f"--config {args.config}: file not found")
    try:
        profile = load_profile(args.profile, args.config)
    except ProfileError as e:
        return _fail(str(e))
    if args.shard_size is not None:
        profile = merge(profile, {"shards": {"size": args.shard_size}})
    run_name = args.run_name or Path(args.out).resolve().name

    from ray_jobs.cluster import ray_session
    from ray_jobs.job import BuildRequest, run_build

    try:
        with ray_session(args.ray_address):
            request = BuildRequest(
                source=args.source, out=args.out, profile=profile, run_name=run_name,
                manifests_root=args.manifests, limit=args.limit, command_line=[sys.argv[0], *sys.argv[1:]],
            )
            summary = run_build(request)
    except (SourceError, SettingsError, ManifestError, StageStartError, ValueError) as e:
        return _fail(str(e))
    return summary.exit_code


def _fail(message: str) -> int:
    print(f"subject-ffhq build: error: {message}", file=sys.stderr)
    return 2
