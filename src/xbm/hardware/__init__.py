"""Crossbar hardware description: spec (geometry, bit widths), the layer-to-tile mapping, and (on
first use) the crossbar-faithful simulator and fault maps."""

from __future__ import annotations

import importlib
from typing import Any

from xbm.hardware.mapping import LayerMapping, MappingReport, layer_matrix_shape, map_model
from xbm.hardware.spec import SPEC_PRESETS, CrossbarSpec, get_spec, register_spec_preset

# Imported lazily (PEP 562): the simulator pulls in the task-aware layers, which import this
# package, so an eager import here would be circular.
_LAZY = {
    "SimConfig": "xbm.hardware.simulate",
    "faithful": "xbm.hardware.simulate",
    "FaultMap": "xbm.hardware.faults",
    "fault_aware": "xbm.hardware.faults",
}

__all__ = [
    "SPEC_PRESETS",
    "CrossbarSpec",
    "FaultMap",
    "LayerMapping",
    "MappingReport",
    "SimConfig",
    "fault_aware",
    "faithful",
    "get_spec",
    "layer_matrix_shape",
    "map_model",
    "register_spec_preset",
]


#: Submodules reachable as attributes after ``import xbm`` (``xbm.hardware.cost.task_costs``,
#: as the docs write it), imported on first use.
_SUBMODULES = ("cost", "energy", "simulate", "faults", "mapping", "spec")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"xbm.hardware.{name}")
    raise AttributeError(f"module 'xbm.hardware' has no attribute {name!r}")
