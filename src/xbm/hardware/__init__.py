"""Crossbar hardware description: spec (geometry, bit widths) and the layer-to-tile mapping."""

from xbm.hardware.mapping import LayerMapping, MappingReport, layer_matrix_shape, map_model
from xbm.hardware.spec import SPEC_PRESETS, CrossbarSpec, get_spec

__all__ = [
    "SPEC_PRESETS",
    "CrossbarSpec",
    "LayerMapping",
    "MappingReport",
    "get_spec",
    "layer_matrix_shape",
    "map_model",
]
