"""``subject-ffhq export --format FORMAT SHARDS_DIR OUT``: write the shards in another layout.

Reads every ``subjects-*.tar`` in SHARDS_DIR. ``fastcomposer`` writes ``image_ids*.txt`` and
``<id[:5]>/<id>.jpg|.json|.npy`` (see :mod:`datagen.export.fastcomposer`); ``seg-conditioning`` and
``subject-crops`` write the views of :mod:`datagen.export.views`. Quality filters drop whole samples;
how many each filter dropped is printed and kept in ``OUT/export_summary.json``.

The object types (which matched segments are subjects: FastComposer's ``segments``, the crops, and
what ``--require-subject`` / ``--exclude-unmatched-subject`` look at) are the profile's
``subjects.object_types`` (``--profile``, ``--config``), the same setting the trainer and the report
read; ``--object-types`` overrides it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from datagen.config import ProfileError, load_profile, parse_object_types
from datagen.export.fastcomposer import (
    SEGMAP_DTYPES,
    UNREADABLE_SEGMAP_DTYPES,
    ExportError,
    ExportFilters,
    export_fastcomposer,
)

FORMATS = ("fastcomposer", "seg-conditioning", "subject-crops")


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="fastcomposer", help="output layout (default fastcomposer)")
    parser.add_argument("shards_dir", metavar="SHARDS_DIR", type=Path, help="folder with subjects-NNNNN.tar shards")
    parser.add_argument("out", metavar="OUT", type=Path, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--min-match-score", type=float, default=None,
                        help="keep only samples whose weakest match scores at least X (samples without matches pass)")
    parser.add_argument("--min-margin", type=float, default=None,
                        help="keep only samples whose smallest margin to the runner-up assignment is at least X")
    parser.add_argument("--require-subject", "--require-person", dest="require_subject", action="store_true",
                        help="keep only samples with a subject: a matched segment of the object types "
                             "(--require-person: its old name, the same with the default object types)")
    parser.add_argument("--min-subjects", type=int, default=0, help="keep only samples with at least N matched segments")
    parser.add_argument("--max-subjects", type=int, default=None, help="keep only samples with at most N matched segments")
    parser.add_argument("--exclude-unmatched-subject", "--exclude-unmatched-person", dest="exclude_unmatched_subject",
                        action="store_true", help="drop samples with a segment of the object types that no phrase "
                                                  "matched (--exclude-unmatched-person: its old name)")
    parser.add_argument("--drop-merged-persons", action="store_true",
                        help="drop samples with a person segment holding two faces or more (merged people)")
    parser.add_argument("--drop-faceless-persons", action="store_true",
                        help="drop samples with a matched person segment in which no face was found")
    parser.add_argument("--min-face-size", type=int, default=None, metavar="PX",
                        help="drop samples with a matched person whose largest face is smaller than PX pixels")
    parser.add_argument("--require-primary-face", action="store_true",
                        help="drop samples whose source face rect (FFHQ-wild metadata) is not in a matched person "
                             "segment (sources without face rects pass)")
    parser.add_argument("--split", choices=("train", "test", "all"), default="all", help="export only one split")
    # uint16 is accepted here so that export can say why it refuses it
    parser.add_argument("--segmap-dtype", choices=SEGMAP_DTYPES + tuple(UNREADABLE_SEGMAP_DTYPES), default="auto",
                        help="dtype of the .npy maps, one FastComposer's loader reads (auto: uint8 when every id "
                             "fits, else int32; uint16 is refused: upstream cannot read it)")
    parser.add_argument("--workers", type=int, default=1, help="processes exporting shards in parallel (default 1)")
    parser.add_argument("--profile", default="paper",
                        help="profile whose subjects.object_types the export uses: paper, tiny or a YAML file (default paper)")
    parser.add_argument("--config", type=Path, action="append", default=[], metavar="FILE",
                        help="YAML merged over the profile, e.g. 'subjects: {object_types: [person, dog, cat]}' (may be repeated)")
    parser.add_argument("--object-types", default=None, metavar="LABELS",
                        help="comma-separated COCO labels of the subjects, e.g. person,dog,cat "
                             "(default: the profile's subjects.object_types, person unless set)")
    parser.add_argument("--placeholder", default="S*",
                        help="subject-crops: the token that replaces the subject's phrase in its prompt (default S*)")
    parser.add_argument("--overwrite", action="store_true", help="export into a non-empty OUT, replacing an earlier export")


def object_types_from_args(args) -> tuple[str, ...]:
    """``--object-types`` if given, else the profile's (``--profile`` + ``--config``) subjects.object_types."""
    if args.object_types is not None:
        return parse_object_types(args.object_types)
    for config in args.config:
        if not config.is_file():
            raise ProfileError(f"--config {config}: file not found")
    return load_profile(args.profile, *args.config).subjects.object_types


def run(args) -> int:
    filters = ExportFilters(
        min_match_score=args.min_match_score, min_margin=args.min_margin, require_subject=args.require_subject,
        min_subjects=args.min_subjects, max_subjects=args.max_subjects,
        exclude_unmatched_subject=args.exclude_unmatched_subject,
        splits=("train", "test") if args.split == "all" else (args.split,),
        drop_merged_persons=args.drop_merged_persons, drop_faceless_persons=args.drop_faceless_persons,
        min_face_size=args.min_face_size, require_primary_face=args.require_primary_face,
    )
    try:
        object_types = object_types_from_args(args)
    except ProfileError as e:
        print(f"subject-ffhq export: {e}", file=sys.stderr)
        return 2
    if args.format != "fastcomposer":
        return _export_view(args, filters, object_types)
    try:
        summary = export_fastcomposer(args.shards_dir, args.out, filters, overwrite=args.overwrite,
                                      segmap_dtype=args.segmap_dtype, workers=args.workers, object_types=object_types)
    except ExportError as e:
        print(f"subject-ffhq export: {e}", file=sys.stderr)
        return 1
    print(f"exported {summary.exported} of {summary.samples_seen} samples from {summary.shards} shard(s) "
          f"(train {summary.train}, test {summary.test}) to {summary.out}")
    print(f"subjects ({','.join(summary.object_types)}): {summary.segments_exported} "
          f"{json.dumps(summary.subjects_by_type)}")
    dropped = sum(summary.filtered_out.values())
    print(f"filtered out: {dropped}" + (f" {json.dumps(summary.filtered_out)}" if dropped else ""))
    if any(v not in (None, False, 0, ("train", "test")) for v in asdict(filters).values()):
        print(f"filters: {json.dumps(asdict(filters))}")
    if summary.ignored_old_ids:
        shown = ", ".join(repr(x) for x in summary.ignored_old_ids[:5])
        more = len(summary.ignored_old_ids) - 5
        print(f"ignored {len(summary.ignored_old_ids)} line(s) of the old image_ids.txt that are not ids "
              f"(never used as paths): {shown}" + (f" and {more} more" if more > 0 else ""))
    if summary.not_removed:
        print(f"left {len(summary.not_removed)} stale file group(s) in place (their folder is not a real folder "
              f"inside OUT): {', '.join(summary.not_removed[:5])}")
    print(Path(summary.out) / "export_summary.json")
    return 0


def _export_view(args, filters, object_types) -> int:
    from datagen.export.views import export_view

    try:
        summary = export_view(args.format, args.shards_dir, args.out, filters, overwrite=args.overwrite,
                              object_types=object_types, placeholder=args.placeholder)
    except ExportError as e:
        print(f"subject-ffhq export: {e}", file=sys.stderr)
        return 1
    subjects = f", {summary['subjects']} subject(s)" if summary["subjects"] is not None else ""
    print(f"exported {summary['exported']} of {summary['samples_seen']} samples{subjects} from {summary['shards']} "
          f"shard(s) as {args.format} to {summary['out']}")
    dropped = sum(summary["filtered_out"].values())
    print(f"filtered out: {dropped}" + (f" {json.dumps(summary['filtered_out'])}" if dropped else ""))
    print(Path(summary["out"]) / "export_summary.json")
    return 0
