"""``subject-ffhq sample-data DIR``: write the bundled sample in FFHQ-wild layout to DIR.

After writing, the sample is read back with the FFHQ-wild reader (so what is printed is what the
pipeline will see): one line per image with its index, file, size, split, duplicate and licence.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.errors import fail
from datagen.sources.ffhq_wild import FFHQWildSource
from fixtures.bundled_photos import METADATA_FILE, SampleExistsError, build_sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", type=Path, metavar="DIR", help="folder to write the sample into (created if missing)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        root = build_sample(args.dir)
    except SampleExistsError as e:
        return fail("sample-data", e, code=1)
    items = FFHQWildSource(root).items()
    print(f"wrote {len(items)} images in FFHQ-wild layout to {root}")
    for item in items:
        size = item.meta.get("pixel_size") or ["?", "?"]
        dup = f"  duplicate of {item.duplicate_of}" if item.duplicate_of is not None else ""
        print(
            f"  {item.source_id:>5}  {item.rel_path}  {size[0]}x{size[1]}  {item.split:<5}  "
            f"{item.meta.get('license')}{dup}"
        )
    n_dup = sum(item.duplicate_of is not None for item in items)
    n_test = sum(item.split == "test" for item in items)
    print(f"metadata: {root / METADATA_FILE}")
    print(f"provenance and licences: {root / 'SOURCES.md'}")
    print(
        f"{len(items) - n_dup} distinct photos, {n_dup} duplicate(s); split: {len(items) - n_test} train, {n_test} test"
    )
    return 0
