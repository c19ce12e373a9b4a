"""``subject-ffhq tiny-models DIR``: build the tiny random models the ``tiny`` profile uses."""

from __future__ import annotations

import argparse
from pathlib import Path

from datagen.config import TINY_MODELS_ENV


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fixtures.tiny_models import BUILDERS

    parser.add_argument("dir", type=Path, metavar="DIR", help="folder to build the models in (one subfolder each)")
    parser.add_argument(
        "--only", action="append", choices=list(BUILDERS), metavar="NAME",
        help=f"build only this model (repeatable); one of: {', '.join(BUILDERS)}",
    )
    parser.add_argument("--force", action="store_true", help="rebuild models that are already complete")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    from fixtures.tiny_models import build_all, folder_size

    disable_progress_bars()  # one line per model is progress enough
    hf_logging.disable_progress_bar()
    root = Path(args.dir).expanduser().resolve()
    built = build_all(root, names=args.only, force=args.force)
    print(f"\n{len(built)} tiny model(s) in {root}:")
    for name, folder in built.items():
        print(f"  {name:<18} {folder_size(folder) / 1e6:7.1f} MB  {folder}")
    print(f"\nUse them with the tiny profile:\n  export {TINY_MODELS_ENV}={root}")
    return 0
