"""``subject-ffhq identities RUN``: cluster every face of a finished run into identities.

Reads the run's face tables (``manifests/<run>/faces/``, written by the build's identity stage),
writes ``identities.parquet`` (face -> identity, distance to its centre, the identity's size and
photos), the identity-safe ``split.parquet``, ``pairs.parquet`` and ``identities.json``
(:mod:`datagen.identity.index`), then the trainer's compact reference set ``references/``
(:mod:`datagen.identity.references`, cut from the run's shards: ``--shards-dir``, default the run's
``shards_dir``), and prints the figures. The threshold is the run's ``identity.threshold`` (default per
embedder: dlib 0.5, vggface2 1.0); ``--threshold`` overrides it. The same run gives the same ids.

With ``--ray-address ADDR`` (or ``$RAY_ADDRESS``; ``local`` starts a private Ray here) the whole step
runs as one Ray task on a cluster node that can hold it, next to the data (``ray_jobs/identities.py``):
RUN and ``--shards-dir`` are paths as the node sees them (a shared filesystem) or bucket URLs.
"""

from __future__ import annotations

import json
import os

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
    parser.add_argument("--ray-address", default=None,
                        help="run the step as one task on this Ray cluster ('local': a private Ray here; "
                             "default: $RAY_ADDRESS, else no Ray)")
    parser.add_argument("--ray-cpus", type=float, default=2.0, help="CPUs the Ray task asks for (default 2)")
    parser.add_argument("--ray-resources", default=None, metavar="JSON",
                        help="custom Ray resources the task asks for, to pin it to the node(s) holding the data, "
                             "e.g. '{\"data\": 1}'")
    parser.add_argument("--ray-labels", default=None, metavar="JSON",
                        help="Ray label selector the node must match, e.g. '{\"data-zone\": \"eu\"}' "
                             "(values: v, !v, in(a,b), !in(a,b); every node has ray.io/node-id)")


def run(args) -> int:
    if args.threshold is not None and not args.threshold > 0:
        return fail("identities", f"--threshold must be a positive distance, got {args.threshold}")
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        return _run_on_ray(args, address)
    from datagen.identity.step import run_identity_step
    from datagen.shards.reader import ShardError

    try:
        run_dir = resolve_run_dir(args.run, args.manifests_root)
        result = run_identity_step(run_dir, args.threshold, args.shards_dir, not args.no_references)
    except (RunFolderError, FaceTableError, ShardError, OSError, ValueError) as e:  # OSError: e.g. permission denied
        return fail("identities", e, code=1)
    _print_result(result)
    return 0


def _print_result(result, node=None) -> None:
    from datagen.identity.index import IDENTITIES_TABLE
    from datagen.identity.references import REFERENCES_DIR

    summary, s = result.identities, result.identities.split
    where = f" on node {node}" if node else ""
    note("identities", f"{summary.faces} faces -> {summary.identities} identities ({summary.embedder}, threshold "
                       f"{summary.threshold:g}) in {summary.seconds:.1f}s{where}; photos per identity "
                       f"{summary.photos_per_identity}; split: {s['images_moved']} image(s) of {s['identities_moved']} "
                       f"identity(ies) moved ({s['to_train']} to train, {s['to_test']} to test)")
    r = result.references
    if r is not None:
        note("identities", f"reference set {result.run_dir}/{REFERENCES_DIR}: {r.crops} crop(s) of {r.identities} "
                           f"identity(ies) for {r.targets} subject(s), {r.bytes / 1e6:.2f} MB "
                           f"({r.bytes_per_crop / 1e3:.1f} kB per crop)")
    elif result.no_references:
        note("identities", f"no reference set: {result.no_references}")
    print(f"{result.run_dir}/{IDENTITIES_TABLE}")


def _json_option(option: str, text: str | None, value_type) -> dict:
    """``--ray-resources`` / ``--ray-labels``: a JSON object of ``value_type`` values."""
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option}: not JSON ({e}): {text!r}") from None
    ok = isinstance(obj, dict) and all(
        isinstance(v, value_type) and not isinstance(v, bool) and (value_type is str or v > 0) for v in obj.values())
    if not ok:
        kind = "strings" if value_type is str else "positive numbers"
        raise ValueError(f"{option}: must be a JSON object of {kind}, got {text!r}")
    return obj


def _run_on_ray(args, address: str) -> int:
    from ray_jobs.cluster import RayConnectError
    from ray_jobs.identities import (
        IdentitiesRequest,
        NodeError,
        Placement,
        PlacementError,
        run_identities_on_ray,
    )

    try:
        if not args.ray_cpus > 0:
            raise ValueError(f"--ray-cpus must be positive, got {args.ray_cpus}")
        placement = Placement(args.ray_cpus, _json_option("--ray-resources", args.ray_resources, (int, float)),
                              _json_option("--ray-labels", args.ray_labels, str))
    except ValueError as e:
        return fail("identities", e)
    request = IdentitiesRequest(args.run, args.manifests_root, address, args.threshold, args.shards_dir,
                                not args.no_references, placement)
    note("identities", f"joining Ray at {address}")
    try:
        result = run_identities_on_ray(request, on_event=lambda line: note("identities", line))
    except (RayConnectError, PlacementError) as e:
        return fail("identities", e)
    except (NodeError, RunFolderError, FaceTableError, OSError, ValueError) as e:
        return fail("identities", e, code=1)
    except KeyboardInterrupt:
        note("identities", "interrupted; re-run the same command")
        return 130
    _print_result(result.step, result.node)
    return 0
