"""FastComposer's subject-crop augmentations, for a whole stack of crops at once (DESIGN §6).

Upstream (``fastcomposer/transforms.py: get_object_transforms``) runs, per crop, after the resize to
the crop size: rotation (p 0.75, angle uniform in ±30°, bilinear, black fill), colour jitter
(p 0.5; brightness, contrast, saturation factors uniform in [0.5, 1.5], hue shift uniform in
[−0.5, 0.5], the four in a random order), Gaussian blur (p 0.5, 5 taps, σ uniform in [0.1, 2]),
grayscale (p 0.1), horizontal flip (p 0.5), elastic distortion (p 0.5, α 50, σ 5).
:func:`reference_augmentations` is exactly that list as torchvision v2 transforms, one crop at a
time; it is the reference the tests compare against.

:class:`SubjectAugmenter` draws the same parameters independently for every crop and applies each
operation once to all crops that drew it (one ``grid_sample`` for all rotated crops, one for all
elastic ones, …), with cheaper exact kernels where torchvision's are slow: the hue shift computes
HSV→RGB channel-wise without the gather, and the elastic field's 41-tap Gaussian is a matrix
product with reflection folded into the matrix. Input and output are uint8 ``(…, 3, S, S)``;
the work is done in float32 on the tensors' device, so it runs in a loader worker (one example's
subjects) or after collate on the training GPU (the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

ROTATE_P, DEGREES = 0.75, 30.0
JITTER_P, JITTER = 0.5, 0.5  # brightness, contrast, saturation in [1 − j, 1 + j]; hue in [−j, j]
BLUR_P, BLUR_TAPS, BLUR_SIGMA = 0.5, 5, (0.1, 2.0)
GRAY_P = 0.1
FLIP_P = 0.5
ELASTIC_P, ELASTIC_ALPHA, ELASTIC_SIGMA = 0.5, 50.0, 5.0
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's fn_idx numbering


def reference_augmentations() -> T.Compose:
    """Upstream's object augmentations, one crop at a time (torchvision v2, float images in [0, 1])."""
    return T.Compose([
        T.RandomApply([T.RandomAffine(degrees=DEGREES, interpolation=T.InterpolationMode.BILINEAR)], p=ROTATE_P),
        T.RandomApply([T.ColorJitter(JITTER, JITTER, JITTER, JITTER)], p=JITTER_P),
        T.RandomApply([T.GaussianBlur(BLUR_TAPS, sigma=BLUR_SIGMA)], p=BLUR_P),
        T.RandomGrayscale(p=GRAY_P),
        T.RandomHorizontalFlip(p=FLIP_P),
        T.RandomApply([T.ElasticTransform(alpha=ELASTIC_ALPHA, sigma=ELASTIC_SIGMA)], p=ELASTIC_P),
    ])


@dataclass
class AugmentParams:
    """Per-crop draws for ``m`` crops (CPU tensors)."""

    rotate: torch.Tensor  # bool (m,)
    angle: torch.Tensor  # float (m,) degrees
    jitter: torch.Tensor  # bool (m,)
    jitter_order: torch.Tensor  # long (m, 4): a permutation of BRIGHTNESS..HUE per crop
    jitter_factors: torch.Tensor  # float (m, 4): brightness, contrast, saturation factors; hue shift
    blur: torch.Tensor  # bool (m,)
    blur_sigma: torch.Tensor  # float (m,)
    gray: torch.Tensor  # bool (m,)
    flip: torch.Tensor  # bool (m,)
    elastic: torch.Tensor  # bool (m,)


def draw_params(m: int, generator: torch.Generator | None = None) -> AugmentParams:
    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * (high - low) + low

    def coin(p: float) -> torch.Tensor:
        return torch.rand(m, generator=generator) < p

    factors = uniform(1 - JITTER, 1 + JITTER, m, 4)
    factors[:, HUE] = uniform(-JITTER, JITTER, m)
    return AugmentParams(
        rotate=coin(ROTATE_P), angle=uniform(-DEGREES, DEGREES, m),
        jitter=coin(JITTER_P), jitter_order=torch.rand(m, 4, generator=generator).argsort(dim=1),
        jitter_factors=factors,
        blur=coin(BLUR_P), blur_sigma=uniform(*BLUR_SIGMA, m),
        gray=coin(GRAY_P), flip=coin(FLIP_P), elastic=coin(ELASTIC_P),
    )


# ---- kernels (float images (k, 3, H, W) in [0, 1]) ----------------------------------------------
def grid_sample_black(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_apply_grid_transform`` with fill 0: bilinear sample, times the sampled
    coverage of a ones channel (so border pixels fade to black as they do there)."""
    ones = torch.ones_like(images[:, :1])
    sampled = F.grid_sample(torch.cat([images, ones], 1), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return sampled[:, :-1] * sampled[:, -1:]


def rotate(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """``TF.affine(image, angle=a)`` about the centre, per crop (square crops)."""
    k, _, h, w = images.shape
    if h != w:
        raise ValueError(f"subject crops must be square, got {w}x{h}")
    rad = angles_deg.to(images.device, images.dtype) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)  # inverse map
    grid = F.affine_grid(theta, [k, 3, h, w], align_corners=False)
    return grid_sample_black(images, grid)


def gray(images: torch.Tensor) -> torch.Tensor:
    """(k, 1, H, W) luma, torchvision's weights."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def blend(a: torch.Tensor, b: torch.Tensor | float, ratio: torch.Tensor) -> torch.Tensor:
    ratio = ratio.view(-1, 1, 1, 1)
    return (a * ratio + b * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (RGB→HSV, rotate H, HSV→RGB), per-crop shift. HSV→RGB uses
    f(n) = V − C·clamp(min(k, 4 − k), 0, 1), k = (n + 6H) mod 6, n = 5, 3, 1 for R, G, B."""
    r, g, b = images.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0) * 6.0
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h + n, 6.0)
        out.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1)


def color_op(images: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    if op == BRIGHTNESS:
        return blend(images, 0.0, factor)
    if op == CONTRAST:
        return blend(images, gray(images).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == SATURATION:
        return blend(images, gray(images), factor)
    return adjust_hue(images, factor)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, taps: int = BLUR_TAPS) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (same σ both axes, reflect padding), per-crop σ, as
    shifted sums: ``taps`` multiply-adds per axis."""
    half = taps // 2
    x = torch.linspace(-half, half, taps, device=images.device, dtype=images.dtype)
    pdf = torch.exp(-0.5 * (x / sigma.to(images.device, images.dtype).view(-1, 1)) ** 2)
    kernel = (pdf / pdf.sum(1, keepdim=True)).view(-1, 1, 1, 1, taps)
    h, w = images.shape[-2:]
    padded = F.pad(images, [half, half, 0, 0], mode="reflect")
    images = sum(kernel[..., i] * padded[..., i : i + w] for i in range(taps))
    padded = F.pad(images, [0, 0, half, half], mode="reflect")
    return sum(kernel[..., i] * padded[..., i : i + h, :] for i in range(taps))


@lru_cache(maxsize=8)
def reflect_blur_matrix(n: int, sigma: float, device: str) -> torch.Tensor:
    """(n, n) matrix M with ``x @ M`` = 1-D Gaussian blur of rows of ``x`` with torchvision's
    kernel (size int(8σ + 1), made odd) and reflect padding."""
    size = int(8 * sigma + 1)
    size += 1 - size % 2
    half = size // 2
    x = torch.linspace(-half, half, size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = pdf / pdf.sum()
    matrix = torch.zeros(n, n, dtype=torch.float64)
    out = torch.arange(n)
    for j in range(size):
        src = out + j - half
        src = torch.where(src < 0, -src, src)
        src = torch.where(src >= n, 2 * (n - 1) - src, src)
        matrix.index_put_((src, out), kernel[j].expand(n), accumulate=True)
    return matrix.to(torch.float32).to(device)


def elastic_displacement(k: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """torchvision ``ElasticTransform.make_params`` for ``k`` crops: uniform noise in [−1, 1] per
    axis, Gaussian-blurred (σ 5), scaled by α / size: (k, H, W, 2) in grid units."""
    noise = torch.rand(k, 2, h, w, device=device) * 2 - 1
    dev = str(device)
    field = reflect_blur_matrix(h, ELASTIC_SIGMA, dev).T @ noise @ reflect_blur_matrix(w, ELASTIC_SIGMA, dev)
    scale = torch.tensor([ELASTIC_ALPHA / w, ELASTIC_ALPHA / h], device=device).view(1, 2, 1, 1)
    return (field * scale).permute(0, 2, 3, 1)


def elastic(images: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """torchvision's ``elastic_image``: identity grid (pixel centres) + displacement, black fill."""
    k, _, h, w = images.shape
    ys = torch.linspace((1 - h) / h, (h - 1) / h, h, device=images.device)
    xs = torch.linspace((1 - w) / w, (w - 1) / w, w, device=images.device)
    identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (H, W, 2) as (x, y)
    return grid_sample_black(images, identity + displacement)


# ---- the pipeline ------------------------------------------------------------------------------
class SubjectAugmenter:
    """Upstream's augmentation list on a stack of crops, parameters drawn per crop."""

    def __call__(self, crops: torch.Tensor, valid: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``crops``: uint8 (…, 3, S, S); ``valid``: bool (…) — only these are augmented (padding
        slots stay as they are). Returns uint8 of the same shape."""
        shape = crops.shape
        flat = crops.reshape(-1, *shape[-3:])
        index = torch.arange(flat.shape[0], device=crops.device)
        if valid is not None:
            index = index[valid.reshape(-1).to(crops.device)]
        if index.numel() == 0:
            return crops
        images = flat.index_select(0, index).to(torch.float32).div_(255.0)
        images = self.apply(images, draw_params(images.shape[0], generator))
        out = flat.clone()
        out[index] = images.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return out.reshape(shape)

    @staticmethod
    def apply(images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Float images (m, 3, S, S) in [0, 1] → augmented, in upstream's order."""
        images = images.clone()

        def on(mask: torch.Tensor, fn) -> None:
            idx = mask.nonzero().flatten()
            if idx.numel():
                dev_idx = idx.to(images.device)
                images[dev_idx] = fn(images[dev_idx], idx)

        on(p.rotate, lambda x, i: rotate(x, p.angle[i]))
        for slot in range(4):  # each jittered crop runs its four colour ops in its own order
            for op in range(4):
                on(p.jitter & (p.jitter_order[:, slot] == op),
                   lambda x, i, op=op: color_op(x, op, p.jitter_factors[i, op].to(x.device)))
        on(p.blur, lambda x, i: gaussian_blur(x, p.blur_sigma[i]))
        on(p.gray, lambda x, i: gray(x).expand(-1, 3, -1, -1))
        on(p.flip, lambda x, i: x.flip(-1))
        on(p.elastic, lambda x, i: elastic(x, elastic_displacement(x.shape[0], *x.shape[-2:], x.device)))
        return images
