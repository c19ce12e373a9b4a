"""A small randomly-initialised FaceNet (InceptionResnetV1) in the folder format the face embedder reads.

``datagen.stages.faces.FaceEmbedder`` reads a folder holding ``facenet_config.json`` (the number of
Block35 / Block17 / Block8 repeats and the input size) and ``model.safetensors`` (the state dict).
Here: facenet-pytorch's own ``InceptionResnetV1`` layers with one block of each kind instead of
5 / 10 / 5 (10.6 M parameters instead of 23.5 M, stored as fp16, ~21 MB) and 80 px face crops
instead of 160 (4x less compute; the network ends in adaptive pooling, so any size from 75 px works).

Random weights make every face look alike: with BatchNorm's initial statistics (mean 0, variance 1)
the ReLU features drift to one direction and all cosines come out 1.0. So the builder sets each
BatchNorm's running statistics from a forward pass over smooth random noise (data-independent, fixed
seed). The embedding is then a random projection that still tells photos apart (the same photo
re-encoded > 0.95, different people of the bundled sample about 0.8-0.9): enough for tests of the
plumbing (matching, leak check), meaningless as identity. Fixed seed: every build writes the same tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

SEED = 0
REPEATS = [1, 1, 1]
IMAGE_SIZE = 80
CONFIG_NAME = "facenet_config.json"
WEIGHTS_NAME = "model.safetensors"


def build_facenet(dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from datagen.stages.faces import build_facenet as facenet_architecture
    from datagen.tiny_models.open_clip_model import _write_atomic

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = facenet_architecture(REPEATS)
        _calibrate_batchnorm(model, torch.Generator().manual_seed(SEED))
    state = {k: (v.half() if v.is_floating_point() else v).detach().contiguous().clone()
             for k, v in model.state_dict().items()}
    config = {
        "architecture": "InceptionResnetV1",
        "repeats": REPEATS,
        "image_size": IMAGE_SIZE,
        "embedding_size": 512,
        "random_weights": True,
        "note": "random weights (subject-ffhq tiny-models): embeddings carry no identity",
    }
    _write_atomic(dest / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    _write_atomic(dest / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def _calibrate_batchnorm(model, generator) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            noise = torch.randn(16, 3, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=generator)
            model(torch.nn.functional.interpolate(noise, size=IMAGE_SIZE, mode="bilinear", align_corners=False))
    model.eval()
