"""Crossbar layers and the conversion entry point."""

from xbm.nn.convert import apply, crossbar_layers, export_task, task_aware_modules
from xbm.nn.layers import (
    BASE_TASK,
    CrossbarConv2d,
    CrossbarLayer,
    CrossbarLinear,
    TaskBatchNorm1d,
    TaskBatchNorm2d,
    TaskHead,
    TaskLayerNorm,
)

__all__ = [
    "BASE_TASK",
    "CrossbarConv2d",
    "CrossbarLayer",
    "CrossbarLinear",
    "TaskBatchNorm1d",
    "TaskBatchNorm2d",
    "TaskHead",
    "TaskLayerNorm",
    "apply",
    "crossbar_layers",
    "export_task",
    "task_aware_modules",
]
