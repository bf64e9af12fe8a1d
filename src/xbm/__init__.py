"""xbm: crossbar-aware multi-task adaption on ReRAM in-memory-computing DNN accelerators."""

from xbm.hardware import CrossbarSpec, get_spec, map_model
from xbm.multitask import MultiTaskModel
from xbm.nn import apply

__version__ = "0.1.0"

__all__ = ["CrossbarSpec", "MultiTaskModel", "__version__", "apply", "get_spec", "map_model"]
