"""A tiny randomly-initialised OpenCLIP model, saved as a ``local-dir:`` folder.

The folder holds what ``open_clip`` reads for ``local-dir:PATH`` (see ``open_clip/factory.py``):
``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and ``open_clip_model.safetensors``.
The architecture is the standard OpenCLIP ``CLIP`` (ViT image tower + causal text transformer), only
very small: 32 px images in 8 px patches, two 64-wide layers per tower, 32-d joint embedding. The
text tower keeps CLIP's vocabulary (49408) and context length (77), so the real CLIP BPE tokenizer
that ships with open_clip (``open_clip.get_tokenizer``) drives it. Weights come from a fixed seed,
so every build writes the same tensors.

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(dest))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(dest))
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SEED = 0
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# OpenAI CLIP normalisation (open_clip's defaults), spelled out so the folder is self-describing.
PREPROCESS_CFG = {
    "size": 32,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


def build_open_clip(dest: Path) -> None:
    """Write the tiny OpenCLIP model into ``dest`` (created if missing; files replaced atomically)."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = CLIP(**MODEL_CFG)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}

    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    _write_atomic(dest / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    _write_atomic(dest / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
