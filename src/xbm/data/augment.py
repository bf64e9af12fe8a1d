"""Seeded, batched random affine augmentation for pretraining the backbone.

Why pretraining is augmented at all: a mask method can only select among the features the frozen
backbone already computes. A width-16 backbone trained for one epoch on plain Fashion-MNIST
specialises to centred clothing and left XBM 5.7 points behind Piggyback on the demo's new tasks
(mean of three seeds); trained for two epochs on randomly rotated, scaled, shifted and mirrored
Fashion-MNIST, it left XBM 3.6 behind (docs/benchmarks.md, "Pretraining augmentation").
Piggyback's element-wise masks can carve new features out of any backbone, so they gain less.
Mixup on top (``PretrainConfig.mixup``, in the pretraining loop since it mixes labels too)
narrows the gap further, and a third epoch further still.

The whole batch is warped in one ``affine_grid`` / ``grid_sample`` call, on the batch's device;
the random draws come from a CPU generator, so a seed gives the same augmented batches on every
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xbm.data.task import MEAN, STD
from xbm.errors import ConfigError


@dataclass(frozen=True)
class AffineAugment:
    """Uniform random rotation, isotropic scale, shift and (optionally) a horizontal mirror."""

    rotate_deg: float = 15.0
    """Largest rotation either way, in degrees."""
    scale: float = 0.15
    """Largest relative zoom either way: the image is scaled by a factor in [1 - s, 1 + s]."""
    shift_px: float = 3.0
    """Largest shift either way, in pixels of a 28-pixel image (scaled with the image side)."""
    hflip: bool = True
    """Mirror half of the images left-right. Right for clothing; turn it off for a base task
    whose classes are not mirror-symmetric (letters, digits)."""

    def __post_init__(self) -> None:
        if self.rotate_deg < 0 or self.shift_px < 0 or not 0 <= self.scale < 1:
            raise ConfigError(f"augmentation {self}: rotate_deg and shift_px must be >= 0 and "
                              "scale in [0, 1)")

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Warp a normalised batch (B, C, H, W); pixels from outside the image are background
        (raw value 0, i.e. ``-MEAN / STD`` after normalisation)."""
        b = x.shape[0]

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=gen, dtype=torch.float64)

        ang = uniform(-1, 1) * math.radians(self.rotate_deg)
        zoom = 1 + uniform(-1, 1) * self.scale
        # affine_grid's coordinates span [-1, 1] over the image: one pixel is 2 / side.
        tx = uniform(-1, 1) * self.shift_px * 2 / 28
        ty = uniform(-1, 1) * self.shift_px * 2 / 28
        flip = torch.ones(b, dtype=torch.float64)
        if self.hflip:
            flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0).double()
        # torch.cos here, unlike the letters renderer (math.cos since letters-v2): that one
        # took 13,000 angles at once and gave other bytes in 1 of 26 processes; this takes a
        # batch (128), and the default backbone pretrained through it hashed the same
        # (a9dc5ce8710b4eba) in every fresh process on this box type, sessions 23-28. Moving
        # to math.cos would change that backbone's bits and every figure measured on it.
        cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                             torch.stack([sin * flip, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        bg = -MEAN / STD
        return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False) + bg


#: Named pretraining augmentations (``PretrainConfig.augment``; ``xbm pretrain --augment``).
AUGMENTATIONS: dict[str, AffineAugment | None] = {
    "none": None,
    "affine": AffineAugment(hflip=False),
    "affine-flip": AffineAugment(),
}


def get_augment(name: str) -> AffineAugment | None:
    """The augmentation registered as ``name`` (``None`` for ``"none"``)."""
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown augmentation {name!r}; choose one of "
                          f"{', '.join(AUGMENTATIONS)}") from None
