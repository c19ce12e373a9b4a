"""Batched subject-crop augmentations: each kernel is torchvision's operation, the per-crop draws
have upstream's probabilities and ranges, and the augmented crops are distributed like the
reference (torchvision v2, one crop at a time)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

import training.subject_augment as A


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models run fastest single-threaded on a shared CPU (tests/conftest.py)."""


@pytest.fixture(scope="module")
def crops():
    torch.manual_seed(0)
    return torch.rand(3, 3, 32, 32)


def test_each_kernel_is_torchvisions_operation(crops):
    for angle in (17.0, -25.0):
        expected = torch.stack([TF.affine(c, angle=angle, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                                          interpolation=TF.InterpolationMode.BILINEAR, fill=0) for c in crops])
        assert torch.allclose(A.rotate(crops, torch.full((3,), angle)), expected, atol=1e-4)
    factors = torch.tensor([0.6, 1.4, 1.1])
    for op, fn in ((A.BRIGHTNESS, TF.adjust_brightness), (A.CONTRAST, TF.adjust_contrast),
                   (A.SATURATION, TF.adjust_saturation)):
        expected = torch.stack([fn(c, float(f)) for c, f in zip(crops, factors, strict=True)])
        assert torch.allclose(A.color_op(crops, op, factors), expected, atol=1e-5), op
    shifts = torch.tensor([0.3, -0.45, 0.1])
    expected = torch.stack([TF.adjust_hue(c, float(h)) for c, h in zip(crops, shifts, strict=True)])
    assert torch.allclose(A.adjust_hue(crops, shifts), expected, atol=1e-5)
    sigmas = torch.tensor([0.3, 1.2, 2.0])
    expected = torch.stack([TF.gaussian_blur(c, [5, 5], [float(s)] * 2) for c, s in zip(crops, sigmas, strict=True)])
    assert torch.allclose(A.gaussian_blur(crops, sigmas), expected, atol=1e-5)
    assert torch.allclose(A.gray(crops).expand(-1, 3, -1, -1), TF.rgb_to_grayscale(crops, 3), atol=1e-6)
    displacement = torch.randn(1, 32, 32, 2, generator=torch.Generator().manual_seed(1)) * 0.05
    assert torch.allclose(A.elastic(crops[:1], displacement), TF.elastic(crops[:1], displacement, fill=0), atol=1e-6)


def test_elastic_field_is_torchvisions_blur_of_uniform_noise():
    noise = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    size = int(8 * A.ELASTIC_SIGMA + 1) | 1  # 41 taps, as ElasticTransform.make_params
    expected = TF.gaussian_blur(noise, [size, size], [A.ELASTIC_SIGMA] * 2)
    matrix = A.reflect_blur_matrix(40, A.ELASTIC_SIGMA, "cpu")
    assert torch.allclose(matrix.T @ noise[:, 0] @ matrix, expected[:, 0], atol=1e-6)
    # and the field's spread matches torchvision's make_params (std of many draws)
    torch.manual_seed(0)
    ours = A.elastic_displacement(80, 40, 40, torch.device("cpu"))
    theirs = torch.cat([T.ElasticTransform().make_params([torch.zeros(3, 40, 40)])["displacement"] for _ in range(80)])
    assert ours.shape == theirs.shape == (80, 40, 40, 2)
    assert abs(ours.std().item() / theirs.std().item() - 1) < 0.1


def test_per_crop_draws_have_upstreams_probabilities_and_ranges():
    n = 40000
    p = A.draw_params(n, torch.Generator().manual_seed(0))
    for name, rate in (("rotate", 0.75), ("jitter", 0.5), ("blur", 0.5), ("gray", 0.1), ("flip", 0.5),
                       ("elastic", 0.5)):
        assert abs(getattr(p, name).float().mean().item() - rate) < 0.01, name
    # uniform ranges: min, max, mean and std (uniform on [a, b]: std (b - a) / sqrt(12))
    for values, low, high in ((p.angle, -30, 30), (p.jitter_factors[:, 0], 0.5, 1.5), (p.jitter_factors[:, 1], 0.5, 1.5),
                              (p.jitter_factors[:, 2], 0.5, 1.5), (p.jitter_factors[:, 3], -0.5, 0.5),
                              (p.blur_sigma, 0.1, 2.0)):
        assert low <= values.min() and values.max() <= high
        assert abs(values.mean().item() - (low + high) / 2) < 0.01 * (high - low)
        assert abs(values.std().item() - (high - low) / math.sqrt(12)) < 0.01 * (high - low)
    # ColorJitter's order: a uniformly random permutation of the four operations
    codes = (p.jitter_order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    perms = counts[counts > 0]
    assert len(perms) == 24 and (perms.float() / n - 1 / 24).abs().max() < 0.006
    assert (p.jitter_order.sort(1).values == torch.arange(4)).all()


def summaries(images: torch.Tensor) -> torch.Tensor:
    """Per-crop statistics that each augmentation moves: mean level, colourfulness, black border,
    left-right balance, sharpness."""
    x = images.float() / 255
    gray = x.mean(1)
    colour = (x - x.mean(1, keepdim=True)).abs().mean((1, 2, 3))
    dark = (x.amax(1) < 0.02).float().mean((1, 2))
    balance = gray[..., :16].mean((1, 2)) - gray[..., 16:].mean((1, 2))
    sharp = (gray[..., 1:] - gray[..., :-1]).abs().mean((1, 2))
    return torch.stack([gray.mean((1, 2)), colour, dark, balance, sharp], 1)


def test_augmented_crops_are_distributed_like_the_reference():
    # a crop with structure in every statistic: a bright, saturated left half, a textured right half
    torch.manual_seed(3)
    crop = torch.zeros(3, 32, 32)
    crop[0, :, :16], crop[1, :, :16] = 0.9, 0.4
    crop[:, :, 16:] = torch.rand(3, 32, 16) * 0.5
    crop_u8 = (crop * 255).round().to(torch.uint8)
    n = 400
    reference = A.reference_augmentations()
    ref = torch.stack([(reference(crop_u8.float() / 255) * 255).round().clamp(0, 255).to(torch.uint8) for _ in range(n)])
    ours = A.SubjectAugmenter()(crop_u8.expand(n, 3, 32, 32).contiguous())
    a, b = summaries(ref), summaries(ours)
    # every statistic: the means agree within 4 standard errors, the spreads within 20%
    se = torch.sqrt(a.var(0) / n + b.var(0) / n)
    assert ((a.mean(0) - b.mean(0)).abs() < 4 * se).all(), (a.mean(0), b.mean(0), se)
    assert ((a.std(0) / b.std(0) - 1).abs() < 0.2).all(), (a.std(0), b.std(0))
    # and the two samples of each statistic come from one distribution (two-sample KS, alpha 0.001)
    for k in range(a.shape[1]):
        x, y = np.sort(a[:, k].numpy()), np.sort(b[:, k].numpy())
        grid = np.concatenate([x, y])
        d = np.abs(np.searchsorted(x, grid, "right") / n - np.searchsorted(y, grid, "right") / n).max()
        assert d < 1.95 * math.sqrt(2 / n), (k, d)


def test_only_valid_crops_are_augmented_and_dtype_is_kept():
    crops = torch.full((2, 4, 3, 16, 16), 100, dtype=torch.uint8)
    valid = torch.tensor([[True, False, False, False], [True, True, False, False]])
    torch.manual_seed(0)
    out = A.SubjectAugmenter()(crops, valid)
    assert out.dtype == torch.uint8 and out.shape == crops.shape
    assert torch.equal(out[~valid], crops[~valid])  # padding slots untouched
    assert torch.equal(A.SubjectAugmenter()(crops, torch.zeros(2, 4, dtype=torch.bool)), crops)

