"""``subject-ffhq export --format FORMAT SHARDS_DIR OUT``: write the shards in another layout.

Reads every ``subjects-*.tar`` in SHARDS_DIR and writes it in one of the layouts of
:data:`datagen.export.registry.FORMATS`: ``fastcomposer`` (``image_ids*.txt`` and
``<id[:5]>/<id>.jpg|.json|.npy``), ``seg-conditioning`` (image, segment map, caption), ``subject-crops``
(one masked crop per subject), ``hf`` (Parquet and a dataset card) and ``identity-pairs`` (each subject
with references of the same person from other photos; ``--references RUN``). Quality filters drop
whole samples; how many each filter dropped is printed and kept in ``OUT/export_summary.json``.
An error while writing (a full disk, a bucket that refuses) is one line, exit 1.

The object types (which matched segments are subjects: FastComposer's ``segments``, the crops, and
what ``--require-subject`` / ``--exclude-unmatched-subject`` look at) are the profile's
``subjects.object_types`` (``--profile``, ``--config``), the same setting the trainer and the report
read; ``--object-types`` overrides it.
"""

from __future__ import annotations

from pathlib import Path

from cli.errors import fail
from datagen import storage
from datagen.config import ProfileError, load_profile, parse_object_types
from datagen.export.common import SUMMARY, ExportError, ExportFilters
from datagen.export.fastcomposer import SEGMAP_DTYPES, UNREADABLE_SEGMAP_DTYPES
from datagen.export.identity_pairs import DEFAULT_MAX_REFERENCES
from datagen.export.registry import DEFAULT_FORMAT, FORMATS, export
from datagen.export.subject_crops import DEFAULT_PLACEHOLDER
from datagen.identity.index import identity_lookup
from datagen.identity.split import read_split, split_file_path


def add_arguments(parser) -> None:
    parser.add_argument("--format", choices=tuple(FORMATS), default=DEFAULT_FORMAT,
                        help=f"output layout (default {DEFAULT_FORMAT})")
    parser.add_argument("shards_dir", metavar="SHARDS_DIR", help="folder or URL with subjects-NNNNN.tar shards")
    parser.add_argument("out", metavar="OUT", help="output folder or URL (created; must be empty unless --overwrite)")
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
    parser.add_argument("--split-file", default=None, metavar="PARQUET",
                        help="a run's identity-safe split (manifests/<run>/split.parquet, or the run folder, "
                             "from `subject-ffhq identities`; local or a bucket URL): its split replaces each record's")
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
                        help="comma-separated labels of the subjects, e.g. person,dog,cat (COCO panoptic labels; with a "
                             "grounding: sam3 profile also open-vocabulary ones, e.g. guitar) "
                             "(default: the profile's subjects.object_types, person unless set)")
    parser.add_argument("--placeholder", default=DEFAULT_PLACEHOLDER,
                        help=f"subject-crops: the token that replaces the subject's phrase in its prompt "
                             f"(default {DEFAULT_PLACEHOLDER})")
    parser.add_argument("--identities", default=None, metavar="RUN",
                        help="a run folder with identities.parquet (`subject-ffhq identities`; local or a bucket URL): exported faces and "
                             "subjects carry their identity id (fastcomposer, subject-crops, hf records)")
    parser.add_argument("--drop-merged-identities", action="store_true",
                        help="drop samples with a person segment holding faces of two identities (two people in "
                             "one mask; needs --identities RUN)")
    parser.add_argument("--references", default=None, metavar="RUN",
                        help="identity-pairs: the run folder (or its references/) that `subject-ffhq identities` "
                             "wrote the reference set to")
    parser.add_argument("--max-references", type=int, default=DEFAULT_MAX_REFERENCES, metavar="N",
                        help=f"identity-pairs: cross-image references per subject at most (default {DEFAULT_MAX_REFERENCES})")
    parser.add_argument("--overwrite", action="store_true", help="export into a non-empty OUT, replacing an earlier export")


def object_types_from_args(args) -> tuple[str, ...]:
    """``--object-types`` if given, else the profile's (``--profile`` + ``--config``) subjects.object_types."""
    for config in args.config:
        if not config.is_file():
            raise ProfileError(f"--config {config}: file not found")
    profile = load_profile(args.profile, *args.config)
    if args.object_types is not None:  # open-vocabulary labels where the profile's grounding makes them
        return parse_object_types(args.object_types, open_vocabulary=profile.grounding != "panoptic")
    return profile.subjects.object_types


def export_filters(args) -> ExportFilters:
    return ExportFilters(
        min_match_score=args.min_match_score, min_margin=args.min_margin, require_subject=args.require_subject,
        min_subjects=args.min_subjects, max_subjects=args.max_subjects,
        exclude_unmatched_subject=args.exclude_unmatched_subject,
        splits=("train", "test") if args.split == "all" else (args.split,),
        drop_merged_persons=args.drop_merged_persons, drop_faceless_persons=args.drop_faceless_persons,
        min_face_size=args.min_face_size, require_primary_face=args.require_primary_face,
        split_file=split_file_path(args.split_file),
        identities_from=str(args.identities) if args.identities is not None else None,
        drop_merged_identities=args.drop_merged_identities,
    )


def run(args) -> int:
    try:
        filters = export_filters(args)
        if filters.split_file is not None:
            read_split(filters.split_file)  # a missing or unreadable file stops the export before it writes
        if filters.identities_from is not None:
            identity_lookup(filters.identities_from)  # likewise a run without identities.parquet
        object_types = object_types_from_args(args)
        storage.probe(args.shards_dir, "SHARDS_DIR", must_exist=True)
        storage.probe(args.out, "OUT")
        fmt = FORMATS[args.format]
        options = {name: getattr(args, name) for name in fmt.options}  # the format's own flags
        fmt.check_options(**options)
    except (ProfileError, storage.StorageError, FileNotFoundError, ExportError) as e:
        return fail("export", e, 2)
    try:
        summary = export(fmt.name, args.shards_dir, args.out, filters, overwrite=args.overwrite, workers=args.workers,
                         object_types=object_types, **options)
    except (ExportError, storage.StorageError, OSError) as e:  # OSError: a write or read failed midway
        return fail("export", e, 1)
    for line in fmt.describe(summary):
        print(line)
    print(storage.path(summary.out) / SUMMARY)
    return 0
