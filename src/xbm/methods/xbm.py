"""XBM (Zhang et al., ASP-DAC 2022): one binary mask bit per crossbar column.

A crossbar column is one logical output column inside one row tile: the up-to-R weights that share
a bitline. Masking it gates that column's ADC output, so no cell is rewritten and the mask is
row_tiles x Cout bits per layer, about 1/R of Piggyback's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xbm.hardware.mapping import apply_column_mask
from xbm.methods.base import (
    AdaptionMethod,
    BinarizeSTE,
    MaskConfig,
    register_method,
)


@dataclass
class XBMConfig(MaskConfig):
    """XBM reuses Piggyback's score recipe (init 1e-2, threshold 5e-3, identity STE) at column
    granularity: the most plausible reconstruction (papers.md section 5); the paper's own
    parameterisation is not public."""


@register_method("xbm")
class XBM(AdaptionMethod):
    """Crossbar column-wise binary mask on a frozen backbone."""

    pure_column_scale = True
    config_class = XBMConfig
    description = "crossbar column-wise binary mask (1 bit per row tile x output); no rewrites"

    def create_layer_state(self, layer: nn.Module) -> nn.Module:
        state = nn.Module()
        shape = (layer.row_tiles, layer.matrix_cols)
        state.score = nn.Parameter(
            torch.full(shape, self.config.mask_init, dtype=layer.weight.dtype,
                       device=layer.weight.device)
        )
        return state

    def mask(self, state: nn.Module) -> torch.Tensor:
        """The (row_tiles, Cout) binary column mask."""
        return BinarizeSTE.apply(state.score, self.config.threshold)

    def effective_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        # binarised inside the column mask's own autograd node (bit-identical to
        # apply_column_mask(weight, self.mask(state), R); one Python node per layer fewer)
        return apply_column_mask(layer.weight, state.score, layer.spec.rows,
                                 quantize=self._binarize)

    def _binarize(self, scores: torch.Tensor) -> torch.Tensor:
        """``BinarizeSTE``'s forward at this config's threshold, left boolean: the column mask's
        multiply promotes it in the same kernel (``w * True`` is ``w``, ``w * False`` is
        ``w * 0.0``, bit for bit), which saves a cast kernel per layer and step."""
        return scores > self.config.threshold

    def programmed_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        return layer.weight

    def column_scale(self, layer: nn.Module, state: nn.Module) -> torch.Tensor | None:
        return self.mask(state)

    def mask_bits(self, layer: nn.Module, state: nn.Module) -> int:
        return state.score.numel()

    def masked_off_columns(self, layer: nn.Module, state: nn.Module) -> int:
        return int((~(state.score.detach() > self.config.threshold)).sum())  # NaN: off, as run
