"""``subject-ffhq phrases CAPTION ...``: print the noun phrases of captions as JSON lines.

One JSON object per caption, in input order: ``caption_raw`` (as given), ``caption`` (numbered
plurals expanded) and ``phrases`` (each ``text``, ``start``, ``end``; ``caption[start:end] ==
text``). ``-`` in place of a caption reads captions from standard input, one per line (a blank
line is an empty caption, so output lines stay aligned with input lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from cli.errors import fail
from datagen.config import ProfileError, load_profile
from datagen.stages.phrases import PhraseChunker, PhraseError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("captions", nargs="+", metavar="CAPTION", help="captions; '-' reads one per line from stdin")
    parser.add_argument(
        "--profile", default="paper", help="profile whose 'phrases' section is used (built-in name or YAML path)"
    )
    parser.add_argument("--spacy-model", help="spaCy pipeline (installed package or folder); overrides the profile")
    parser.add_argument("--max-expand", type=int, help="largest count expanded into singular phrases (default 10)")


def read_captions(args_captions: list[str]) -> list[str]:
    captions: list[str] = []
    stdin_lines: list[str] | None = None
    for caption in args_captions:
        if caption == "-":
            if stdin_lines is None:
                stdin_lines = sys.stdin.read().splitlines()
            captions.extend(stdin_lines)
        else:
            captions.append(caption)
    return captions


def run(args: argparse.Namespace) -> int:
    options = {"spacy_model": args.spacy_model, "max_expand": args.max_expand}
    try:
        section = load_profile(args.profile).phrases
        section = dataclasses.replace(section, **{k: v for k, v in options.items() if v is not None})
    except ProfileError as e:
        return fail("phrases", e)
    try:
        chunker = PhraseChunker(section)
        results = chunker.chunk(read_captions(args.captions))
    except PhraseError as e:
        return fail("phrases", e, code=1)
    for r in results:
        obj = {
            "caption_raw": r.caption_raw,
            "caption": r.caption,
            "phrases": [{"text": p.text, "start": p.start, "end": p.end} for p in r.phrases],
        }
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return 0
