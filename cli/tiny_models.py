"""``subject-ffhq tiny-models DIR``: build the tiny random models the ``tiny`` profile uses.

``subject-ffhq tiny-models --paper-size DIR``: build the ``paper`` models at their exact sizes with
random weights, for the ``paper-shapes`` profile and ``bench/bench_gpu.py`` (BLIP-2 OPT-6.7B only
with ``--include-blip2``: ~15.5 GB in bf16, meant for a GPU machine).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.errors import fail
from datagen.config import PAPER_SHAPES_ENV, TINY_MODELS_ENV


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fixtures.tiny_models import BUILDERS

    parser.add_argument("dir", type=Path, metavar="DIR", help="folder to build the models in (one subfolder each)")
    parser.add_argument(
        "--only", action="append", choices=list(BUILDERS), metavar="NAME",
        help=f"build only this model (repeatable); one of: {', '.join(BUILDERS)}",
    )
    parser.add_argument("--force", action="store_true", help="rebuild models that are already complete")
    parser.add_argument(
        "--paper-size", action="store_true",
        help="build the paper profile's models at their exact sizes with RANDOM weights (several GB each) "
             "for the paper-shapes profile, instead of the tiny ones",
    )
    parser.add_argument(
        "--include-blip2", action="store_true",
        help="with --paper-size: also build BLIP-2 OPT-6.7B (7.75B parameters, ~15.5 GB bf16; on a GPU machine)",
    )


def run(args: argparse.Namespace) -> int:
    if args.include_blip2 and not args.paper_size:
        return fail("tiny-models", "--include-blip2 goes with --paper-size (the tiny BLIP-2 is always built)")
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    from fixtures.tiny_models import build_all, folder_size

    disable_progress_bars()  # one line per model is progress enough
    hf_logging.disable_progress_bar()
    root = Path(args.dir).expanduser().resolve()
    if args.paper_size:
        from fixtures.tiny_models.paper_size import build_paper_all

        built = build_paper_all(root, names=args.only, include_blip2=args.include_blip2, force=args.force)
        print(f"\n{len(built)} paper-size model(s) with RANDOM weights in {root}:")
        for name, folder in built.items():
            print(f"  {name:<18} {folder_size(folder) / 1e9:7.2f} GB  {folder}")
        print(f"\nUse them with the paper-shapes profile (outputs are meaningless):\n  export {PAPER_SHAPES_ENV}={root}")
        return 0
    built = build_all(root, names=args.only, force=args.force)
    print(f"\n{len(built)} tiny model(s) in {root}:")
    for name, folder in built.items():
        print(f"  {name:<18} {folder_size(folder) / 1e6:7.1f} MB  {folder}")
    print(f"\nUse them with the tiny profile:\n  export {TINY_MODELS_ENV}={root}")
    return 0
