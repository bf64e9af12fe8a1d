"""Backbones and their registry.

Every model ends in an ``nn.Linear`` named ``fc`` and exposes ``head_name = "fc"`` and
``feature_dim`` (the input size of ``fc``), because the multi-task wrapper swaps the head per task.
Importing this package registers all built-in models.
"""

from xbm.models import cnn, resnet, vit  # noqa: F401  (imported to register the factories)
from xbm.models.checkpoint import load_torchvision_state_dict
from xbm.models.registry import create_model, list_models, model_info, register_model

__all__ = [
    "create_model",
    "list_models",
    "load_torchvision_state_dict",
    "model_info",
    "register_model",
]
