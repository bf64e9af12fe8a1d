"""xbm: crossbar-aware multi-task adaption on ReRAM in-memory-computing DNN accelerators.

The names here are the Python API of the README's "From Python": convert a backbone
(:class:`MultiTaskModel`, or :func:`apply` alone), add tasks with a registered method
(:func:`list_methods`; each method's config dataclass is in :mod:`xbm.methods`), train and
evaluate them (:func:`train_task`, :func:`evaluate_task`). Every error a user can cause is an
:class:`XbmError`.
"""

from xbm.errors import ConfigError, XbmError, XbmWarning
from xbm.hardware import CrossbarSpec, get_spec, map_model
from xbm.methods import create_method, get_method_class, list_methods
from xbm.models import create_model, list_models, load_torchvision_state_dict
from xbm.multitask import MultiTaskModel
from xbm.nn import apply
from xbm.train.loop import evaluate_task, train_task
from xbm.train.pretrain import import_backbone, load_backbone

__version__ = "0.1.0"

__all__ = ["ConfigError", "CrossbarSpec", "MultiTaskModel", "XbmError", "XbmWarning",
           "__version__", "apply",
           "create_method", "create_model", "evaluate_task", "get_method_class", "get_spec",
           "import_backbone", "list_methods", "list_models", "load_backbone",
           "load_torchvision_state_dict", "map_model", "train_task"]
