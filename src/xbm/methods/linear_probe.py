"""Linear probe: only the task's classifier (and, by default, its own BatchNorm) trains."""

from __future__ import annotations

from dataclasses import dataclass

from xbm.methods.base import AdaptionMethod, MethodConfig, register_method


@dataclass
class LinearProbeConfig(MethodConfig):
    """No per-layer state: the backbone is read as programmed."""

    lr: float = 1e-3
    """Unused: a linear probe has no task state. Its head and per-task BatchNorm learn at
    ``head_lr``."""


@register_method("linear-probe")
class LinearProbe(AdaptionMethod):
    """The frozen-feature baseline ("Classifier Only" in Piggyback's scripts)."""

    config_class = LinearProbeConfig
    description = "new classifier head (+ per-task BN when on); backbone read as programmed"
