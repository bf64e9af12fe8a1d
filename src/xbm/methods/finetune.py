"""Fine-tuning: every weight trains; the papers' "individual networks" baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xbm.methods.base import AdaptionMethod, MethodConfig, register_method


@dataclass
class FinetuneConfig(MethodConfig):
    """Fine-tuning keeps a full copy of the weights per task."""

    lr: float = 5e-4
    """Adam learning rate of the weights. Piggyback's baseline script uses SGD 1e-3 over 30
    epochs; Adam 5e-4 converges within the demo's short budget without wrecking the features."""


@register_method("finetune")
class Finetune(AdaptionMethod):
    """All weights train; switching to the task rewrites every changed weight's cells."""

    config_class = FinetuneConfig
    reprograms_cells = True
    trains_backbone_weights = True
    description = "all weights train per task (individual networks); rewrites changed cells"

    def create_layer_state(self, layer: nn.Module) -> nn.Module:
        state = nn.Module()
        state.weight = nn.Parameter(layer.weight.detach().clone())
        if layer.bias is not None:
            state.bias = nn.Parameter(layer.bias.detach().clone())
        return state

    def effective_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        return state.weight

    def effective_bias(self, layer: nn.Module, state: nn.Module) -> torch.Tensor | None:
        return getattr(state, "bias", None)

    def reprogrammed_cells(self, layer: nn.Module, state: nn.Module) -> int:
        changed = int((state.weight.detach() != layer.weight).sum())
        return changed * layer.spec.cells_per_weight
