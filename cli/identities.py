"""``subject-ffhq identities RUN``: cluster every face of a finished run into identities.

Reads the run's face tables (``manifests/<run>/faces/``, written by the build's identity stage),
writes ``identities.parquet`` (face -> identity, distance to its centre, the identity's size and
photos), the identity-safe ``split.parquet``, ``pairs.parquet`` and ``identities.json``
(:mod:`datagen.identity.index`), then the trainer's compact reference set ``references/``
(:mod:`datagen.identity.references`, cut from the run's shards: ``--shards-dir``, default the run's
``shards_dir``), and prints the figures. The threshold is the run's ``identity.threshold`` (default per
embedder: dlib 0.5, vggface2 1.0); ``--threshold`` overrides it. The same run gives the same ids.
"""

from __future__ import annotations

from cli.errors import fail, note
from datagen.manifests.face_table import FaceTableError
from datagen.manifests.run_manifest import DEFAULT_MANIFESTS_ROOT, RunFolderError, resolve_run_dir


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder, or a run name under --manifests-root")
    parser.add_argument("--manifests-root", default=DEFAULT_MANIFESTS_ROOT, help="where run names are looked up")
    parser.add_argument("--threshold", type=float, default=None,
                        help="faces closer than this (euclidean) are one person (default: the run's identity.threshold)")
    parser.add_argument("--shards-dir", default=None,
                        help="the run's shards, for the reference crops (default: the shards_dir run.json names)")
    parser.add_argument("--no-references", action="store_true", help="do not write the reference set")


def run(args) -> int:
    from datagen.identity.index import IDENTITIES_TABLE, build_identities

    if args.threshold is not None and not args.threshold > 0:
        return fail("identities", f"--threshold must be a positive distance, got {args.threshold}")
    try:
        run_dir = resolve_run_dir(args.run, args.manifests_root)
        summary = build_identities(run_dir, args.threshold)
    except (RunFolderError, FaceTableError, FileNotFoundError) as e:
        return fail("identities", e, code=1)
    s = summary.split
    note("identities", f"{summary.faces} faces -> {summary.identities} identities ({summary.embedder}, threshold "
                       f"{summary.threshold:g}) in {summary.seconds:.1f}s; photos per identity {summary.photos_per_identity}; "
                       f"split: {s['images_moved']} image(s) of {s['identities_moved']} identity(ies) moved "
                       f"({s['to_train']} to train, {s['to_test']} to test)")
    if not args.no_references:
        code = _references(run_dir, args.shards_dir)
        if code:
            return code
    print(run_dir / IDENTITIES_TABLE)
    return 0


def _references(run_dir, shards_dir) -> int:
    from datagen.identity.references import REFERENCES_DIR, write_reference_set
    from datagen.manifests.run_manifest import load_run_manifest
    from datagen.shards.reader import ShardError

    shards_dir = shards_dir or load_run_manifest(run_dir).get("shards_dir")
    if not shards_dir:
        note("identities", "no reference set: run.json names no shards_dir (give --shards-dir)")
        return 0
    try:
        r = write_reference_set(run_dir, shards_dir)
    except (FileNotFoundError, ShardError, ValueError) as e:
        return fail("identities", e, code=1)
    note("identities", f"reference set {run_dir / REFERENCES_DIR}: {r.crops} crop(s) of {r.identities} identity(ies) "
                       f"for {r.targets} subject(s), {r.bytes / 1e6:.2f} MB ({r.bytes_per_crop / 1e3:.1f} kB per crop)")
    return 0
