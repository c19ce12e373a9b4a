"""``subject-ffhq report RUN``: write the run's match-quality report, ``RUN/report.html``.

Builds the run's tables first when they are missing or older than its manifests. The report is one
static, self-contained HTML file (no network, no server): open it in any browser. Its path is
printed last. Its per-type figures are for the run's ``subjects.object_types`` (from ``run.json``:
the profile the run was built with); ``--object-types`` shows others.
"""

from __future__ import annotations

from cli.errors import fail, note
from datagen.config import ProfileError, parse_object_types
from datagen.manifests.run_manifest import DEFAULT_MANIFESTS_ROOT, RunFolderError, resolve_run_dir
from datagen.report.page import GALLERY_BUDGET, GALLERY_MAX, THUMB_SIDE, build_report


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder, or a run name under --manifests-root")
    parser.add_argument("--manifests-root", default=DEFAULT_MANIFESTS_ROOT, help="where run names are looked up")
    parser.add_argument("--shards", default=None,
                        help="folder holding the run's tars, if they moved since the run (default: the paths in its manifests)")
    parser.add_argument("--gallery-max", type=int, default=GALLERY_MAX,
                        help=f"most samples in the gallery (default {GALLERY_MAX})")
    parser.add_argument("--thumb-size", type=int, default=THUMB_SIDE,
                        help=f"long side of gallery thumbnails in pixels (default {THUMB_SIDE})")
    parser.add_argument("--gallery-mib", type=float, default=GALLERY_BUDGET / 2**20,
                        help=f"most MiB of embedded thumbnails (default {GALLERY_BUDGET / 2**20:g}); bounds the file size")
    parser.add_argument("--rebuild-tables", action="store_true", help="rebuild the run's tables even if current")
    parser.add_argument("--object-types", default=None, metavar="LABELS",
                        help="comma-separated labels of the per-type figures, e.g. person,dog,cat (COCO panoptic labels; "
                             "open-vocabulary ones too for a run built with grounding: sam3) "
                             "(default: the run's subjects.object_types)")


def run(args) -> int:
    from datagen.manifests.run_manifest import load_run_manifest

    try:
        run_dir = resolve_run_dir(args.run, args.manifests_root)
    except RunFolderError as e:
        return fail("report", e, code=1)
    try:
        object_types = None
        if args.object_types is not None:  # open-vocabulary labels where the run's grounding makes them (sam3)
            grounding = (load_run_manifest(run_dir).get("config") or {}).get("grounding") or "panoptic"
            object_types = parse_object_types(args.object_types, open_vocabulary=grounding != "panoptic")
    except (ProfileError, ValueError) as e:
        return fail("report", e)
    try:
        path = build_report(
            run_dir, shards_dir=args.shards, gallery_max=args.gallery_max, thumb_side=args.thumb_size,
            gallery_budget=int(args.gallery_mib * 2**20), rebuild_tables=args.rebuild_tables,
            object_types=object_types,
        )
    except (RunFolderError, ValueError, OSError) as e:
        return fail("report", e, code=1)
    note("report", f"{path.stat().st_size / 2**20:.2f} MiB")
    print(path)
    return 0
