"""``subject-ffhq sample``: generate one image from a checkpoint, a prompt and subject photos.

    subject-ffhq sample --checkpoint out/train --prompt "a man and a woman at the beach" \\
        --subject man=photos/him.jpg --subject woman=photos/her.jpg --out beach.png

``--checkpoint`` is a checkpoint folder or a run folder (its latest checkpoint is used). Each
``--subject WORD=IMAGE`` binds a photo to a word of the prompt. Defaults as the released code
samples: PNDM, 50 steps, guidance 5, empty negative prompt; steps ``i <= int((1 − alpha)·steps)``
use the text alone, the rest the subject-augmented text (delayed subject conditioning). Writes a
PNG (atomically). Exit status: 0 written; 2 bad arguments or setup.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.errors import fail
from datagen.files import atomic_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder, or a training run folder")
    parser.add_argument("--prompt", required=True, help="the caption to render")
    parser.add_argument("--subject", action="append", default=[], metavar="WORD=IMAGE",
                        help="a subject photo and the prompt word it binds to (repeatable)")
    parser.add_argument("--out", required=True, type=Path, help="PNG to write")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--alpha", type=float, default=0.7, help="fraction of steps with subject conditioning (default 0.7)")
    parser.add_argument("--scheduler", choices=("pndm", "ddim"), default="pndm",
                        help="pndm: SD1.5's default, as upstream samples (default); ddim")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--resolution", type=int, help="image size (default: the training resolution)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--pretrained", help="override the base Stable Diffusion folder/id stored in the checkpoint")
    parser.add_argument("--image-encoder", help="override the CLIP vision folder/id stored in the checkpoint")


def parse_subjects(specs: list[str]) -> list[tuple[str, Path]]:
    subjects = []
    for spec in specs:
        word, sep, image = spec.partition("=")
        if not sep or not word.strip() or not image:
            raise ValueError(f"--subject {spec!r}: expected WORD=IMAGE, e.g. man=photos/him.jpg")
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"--subject {spec!r}: image {path} not found")
        subjects.append((word.strip(), path))
    return subjects


def run(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    from datagen.stages.model_loading import ModelNotFoundError
    from training.checkpoint import CheckpointError
    from training.sampler import FastComposerSampler, SamplerError, Subject

    try:
        if args.out.suffix.lower() != ".png":
            raise ValueError(f"--out {args.out}: must end in .png")
        subjects = []
        for word, path in parse_subjects(args.subject):
            try:
                with Image.open(path) as im:
                    subjects.append(Subject(word, im.convert("RGB")))
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"--subject {word}={path}: cannot read the image ({e})") from e
        sampler = FastComposerSampler.from_checkpoint(args.checkpoint, args.device, args.pretrained, args.image_encoder)
        image = sampler.generate(args.prompt, subjects, steps=args.steps, guidance_scale=args.guidance,
                                 alpha=args.alpha, seed=args.seed, resolution=args.resolution,
                                 scheduler=args.scheduler)
    except (ValueError, SamplerError, CheckpointError, ModelNotFoundError) as e:
        return fail("sample", e)
    with atomic_path(args.out) as tmp:
        image.save(tmp, format="PNG")
    print(f"wrote {args.out} ({image.width}x{image.height})")
    return 0
