"""``subject-ffhq export --format fastcomposer SHARDS_DIR OUT``: write FastComposer's on-disk layout.

Reads every ``subjects-*.tar`` in SHARDS_DIR; writes ``image_ids*.txt`` and ``<id[:5]>/<id>.jpg|.json|.npy``
under OUT (see :mod:`datagen.export_fastcomposer`). Quality filters drop whole samples; how many
each filter dropped is printed and kept in ``OUT/export_summary.json``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from datagen.export_fastcomposer import (
    SEGMAP_DTYPES,
    UNREADABLE_SEGMAP_DTYPES,
    ExportError,
    ExportFilters,
    export_fastcomposer,
)

FORMATS = ("fastcomposer",)


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="fastcomposer", help="output layout (default fastcomposer)")
    parser.add_argument("shards_dir", metavar="SHARDS_DIR", type=Path, help="folder with subjects-NNNNN.tar shards")
    parser.add_argument("out", metavar="OUT", type=Path, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--min-match-score", type=float, default=None,
                        help="keep only samples whose weakest match scores at least X (samples without matches pass)")
    parser.add_argument("--min-margin", type=float, default=None,
                        help="keep only samples whose smallest margin to the runner-up assignment is at least X")
    parser.add_argument("--require-person", action="store_true", help="keep only samples with a matched person segment")
    parser.add_argument("--min-subjects", type=int, default=0, help="keep only samples with at least N matched segments")
    parser.add_argument("--max-subjects", type=int, default=None, help="keep only samples with at most N matched segments")
    parser.add_argument("--exclude-unmatched-person", action="store_true",
                        help="drop samples with a person segment that no phrase matched")
    parser.add_argument("--split", choices=("train", "test", "all"), default="all", help="export only one split")
    # uint16 is accepted here so that export can say why it refuses it
    parser.add_argument("--segmap-dtype", choices=SEGMAP_DTYPES + tuple(UNREADABLE_SEGMAP_DTYPES), default="auto",
                        help="dtype of the .npy maps, one FastComposer's loader reads (auto: uint8 when every id "
                             "fits, else int32; uint16 is refused: upstream cannot read it)")
    parser.add_argument("--workers", type=int, default=1, help="processes exporting shards in parallel (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="export into a non-empty OUT, replacing an earlier export")


def run(args) -> int:
    filters = ExportFilters(
        min_match_score=args.min_match_score, min_margin=args.min_margin, require_person=args.require_person,
        min_subjects=args.min_subjects, max_subjects=args.max_subjects,
        exclude_unmatched_person=args.exclude_unmatched_person,
        splits=("train", "test") if args.split == "all" else (args.split,),
    )
    try:
        summary = export_fastcomposer(args.shards_dir, args.out, filters, overwrite=args.overwrite,
                                      segmap_dtype=args.segmap_dtype, workers=args.workers)
    except ExportError as e:
        print(f"subject-ffhq export: {e}", file=sys.stderr)
        return 1
    print(f"exported {summary.exported} of {summary.samples_seen} samples from {summary.shards} shard(s) "
          f"(train {summary.train}, test {summary.test}) to {summary.out}")
    dropped = sum(summary.filtered_out.values())
    print(f"filtered out: {dropped}" + (f" {json.dumps(summary.filtered_out)}" if dropped else ""))
    if any(v not in (None, False, 0, ("train", "test")) for v in asdict(filters).values()):
        print(f"filters: {json.dumps(asdict(filters))}")
    print(Path(summary.out) / "export_summary.json")
    return 0
