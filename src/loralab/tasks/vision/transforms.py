"""Augmentation and normalisation of image batches in torch alone (no torchvision, no PIL).

All functions take a batch (N, C, H, W); randomness comes from an explicit ``torch.Generator`` (one draw
per image), so a seeded run is reproducible.

    to_float(u8)                    x = u8 / 255                         (float32 in [0, 1])
    resize(x, size)                 F.interpolate(mode="bilinear", align_corners=False, antialias=True):
                                    output pixel i samples the input at (i + 0.5) * H_in / H_out - 0.5
    pad_crop(x, top, left, size)    pad by ``padding`` zeros on each side, then out[n] = xp[n, :, top[n]:top[n]+h,
                                    left[n]:left[n]+w]; ``random_crop`` draws top, left uniformly in [0, 2p + H - h]
    random_hflip(x, p)              out[n] = x[n].flip(-1) with probability p, else x[n]
    normalize(x, mean, std)         out[:, c] = (x[:, c] - mean[c]) / std[c]

``ImageTransform`` chains them: to_float -> resize -> (train) random crop with padding -> (train) flip ->
normalize. Padding is zeros in pixel space (black), before normalisation, as the usual CIFAR recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # training set, per channel
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # for ImageNet-pretrained weights
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # training set


def _check_batch(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what}: expected a batch (N, C, H, W), got shape {tuple(x.shape)}")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(torch.float32) / 255.0


def channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of a uint8 batch scaled to [0, 1], computed in float64."""
    _check_batch(images, "channel_mean_std")
    x = images.to(torch.float64).div(255.0).transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1, correction=0).tolist())


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    _check_batch(x, "normalize")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"normalize: {x.shape[1]} channels but mean {tuple(mean)} / std {tuple(std)}")
    if min(std) <= 0:
        raise ValueError(f"normalize: std must be > 0, got {tuple(std)}")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a float batch to ``size`` (int: square). Antialiased when shrinking with bilinear/bicubic."""
    _check_batch(x, "resize")
    if not x.is_floating_point():
        raise TypeError(f"resize expects float images (to_float first), got {x.dtype}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    smooth = mode in ("bilinear", "bicubic")
    return F.interpolate(x, size=size, mode=mode, align_corners=False if smooth else None, antialias=smooth)


def pad_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], padding: int) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut one (h, w) window per image at (top[n], left[n]) of the padded image."""
    _check_batch(x, "pad_crop")
    h, w = size
    xp = F.pad(x, (padding,) * 4) if padding else x
    if (top < 0).any() or (left < 0).any() or int(top.max()) + h > xp.shape[-2] or int(left.max()) + w > xp.shape[-1]:
        raise ValueError(f"pad_crop: window {size} at offsets up to ({int(top.max())}, {int(left.max())}) leaves the "
                         f"padded image {tuple(xp.shape[-2:])}")
    rows = (top.view(-1, 1) + torch.arange(h, device=x.device)).view(-1, h, 1)
    cols = (left.view(-1, 1) + torch.arange(w, device=x.device)).view(-1, 1, w)
    n = torch.arange(len(x), device=x.device).view(-1, 1, 1)
    return xp.permute(0, 2, 3, 1)[n, rows, cols].permute(0, 3, 1, 2).contiguous()  # (N, h, w, C) -> (N, C, h, w)


def random_crop(x: torch.Tensor, size: int | tuple[int, int], padding: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random (h, w) window of each zero-padded image (the CIFAR recipe: 32, padding 4)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    H, W = x.shape[-2] + 2 * padding, x.shape[-1] + 2 * padding
    if size[0] > H or size[1] > W:
        raise ValueError(f"random_crop: window {size} is larger than the padded image {(H, W)}")
    top = torch.randint(0, H - size[0] + 1, (len(x),), generator=generator).to(x.device)
    left = torch.randint(0, W - size[1] + 1, (len(x),), generator=generator).to(x.device)
    return pad_crop(x, top, left, size, padding)


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    _check_batch(x, "random_hflip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_hflip: p must be in [0, 1], got {p}")
    flip = (torch.rand(len(x), generator=generator) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


@dataclass(frozen=True)
class ImageTransform:
    """uint8 batch -> normalised float batch; the crop and flip run only with ``train=True``.

    ``size``: resize target (None: keep); ``crop_padding``: random crop back to the (resized) size after
    zero-padding this much (None: no crop); ``hflip``: random horizontal flip with p = 0.5.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None
    crop_padding: int | None = None
    hflip: bool = False

    def __call__(self, images: torch.Tensor, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        x = to_float(images)
        if self.size is not None:
            x = resize(x, self.size)
        if train and self.crop_padding is not None:
            x = random_crop(x, tuple(x.shape[-2:]), self.crop_padding, generator)
        if train and self.hflip:
            x = random_hflip(x, 0.5, generator)
        return normalize(x, self.mean, self.std)
