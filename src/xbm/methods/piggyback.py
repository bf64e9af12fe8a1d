"""Piggyback (Mallya et al., ECCV 2018): an element-wise binary mask per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xbm.methods.base import AdaptionMethod, BinarizeSTE, MaskConfig, register_method


@dataclass
class PiggybackConfig(MaskConfig):
    """Piggyback's recipe: scores init 1e-2, threshold 5e-3, identity straight-through gradient."""


@register_method("piggyback")
class Piggyback(AdaptionMethod):
    """One real-valued score per weight, binarised; the effective weight is mask * W.

    On a crossbar the mask cannot be applied without touching cells: every masked-off weight's
    cells are re-programmed to zero conductance, which the cost model counts.
    """

    config_class = PiggybackConfig
    reprograms_cells = True
    description = "element-wise binary mask (1 bit per weight); masked weights re-programmed to 0"

    def create_layer_state(self, layer: nn.Module) -> nn.Module:
        state = nn.Module()
        state.score = nn.Parameter(torch.full_like(layer.weight, self.config.mask_init))
        return state

    def mask(self, state: nn.Module) -> torch.Tensor:
        return BinarizeSTE.apply(state.score, self.config.threshold)

    def effective_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        return layer.weight * self.mask(state)

    def mask_bits(self, layer: nn.Module, state: nn.Module) -> int:
        return state.score.numel()

    def reprogrammed_cells(self, layer: nn.Module, state: nn.Module) -> int:
        off = int((state.score.detach() <= self.config.threshold).sum())
        return off * layer.spec.cells_per_weight
