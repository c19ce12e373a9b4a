"""``subject-ffhq``: one console script, one subcommand per job.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so ``--help`` is fast
and a heavy dependency (Ray, torch) is loaded only by the commands that need it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sample-data": ("cli.sample_data", "write the bundled sample in FFHQ-wild layout to DIR"),
    "tiny-models": ("cli.tiny_models", "build small random models of every model the project loads into DIR"),
    "phrases": ("cli.phrases", "print noun phrases (numbered plurals expanded) of captions as JSON lines"),
    "build": ("cli.build", "run the dataset job: caption, segment, chunk, match, write shards"),
    "identities": ("cli.identities", "cluster every face of a run into identities; the identity-safe split"),
    "report": ("cli.report", "write the match-quality report (report.html) of a run"),
    "inspect": ("cli.inspect", "write a PNG showing one sample of a run"),
    "export": ("cli.export", "export shards to another on-disk layout (FastComposer's by default; --format)"),
    "train": ("cli.train", "train FastComposer on shards with Ray Train"),
    "sample": ("cli.generate", "generate an image from a checkpoint, a prompt and subject photos"),
    "evaluate": ("cli.evaluate", "score a checkpoint: identity preservation and prompt consistency"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subject-ffhq", description="Build the subject-augmented FFHQ-wild dataset and train FastComposer on it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=name if name in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
