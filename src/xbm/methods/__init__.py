"""Adaption methods, each registered by name with its config dataclass."""

from xbm.methods import finetune, linear_probe, piggyback, xbm, xma, xma2  # noqa: F401  (registration)
from xbm.methods.base import (
    METHODS,
    AdaptionMethod,
    MaskConfig,
    MethodConfig,
    create_method,
    get_method_class,
    list_methods,
    register_method,
)
from xbm.methods.finetune import FinetuneConfig
from xbm.methods.linear_probe import LinearProbeConfig
from xbm.methods.piggyback import PiggybackConfig
from xbm.methods.xbm import XBMConfig
from xbm.methods.xma import XMAConfig
from xbm.methods.xma2 import XMA2Config

__all__ = [
    "METHODS",
    "AdaptionMethod",
    "FinetuneConfig",
    "LinearProbeConfig",
    "MaskConfig",
    "MethodConfig",
    "PiggybackConfig",
    "XBMConfig",
    "XMA2Config",
    "XMAConfig",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
]
