"""Adaption methods, each registered by name with its config dataclass."""

from xbm.methods import finetune, linear_probe, piggyback, xbm, xma, xma2  # noqa: F401  (registration)
from xbm.methods.base import (
    METHODS,
    AdaptionMethod,
    MethodConfig,
    create_method,
    get_method_class,
    list_methods,
    register_method,
)

__all__ = [
    "METHODS",
    "AdaptionMethod",
    "MethodConfig",
    "create_method",
    "get_method_class",
    "list_methods",
    "register_method",
]
