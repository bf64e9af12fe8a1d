"""The one entry point that puts a torch model on crossbars (torchao's ``quantize_`` pattern)."""

from __future__ import annotations

from torch import nn

from xbm.errors import XbmError
from xbm.hardware.mapping import FilterFn, crossbar_modules
from xbm.hardware.spec import CrossbarSpec
from xbm.nn.layers import (
    CrossbarConv2d,
    CrossbarLayer,
    CrossbarLinear,
    TaskAware,
    TaskBatchNorm1d,
    TaskBatchNorm2d,
    TaskHead,
    TaskLayerNorm,
)

_CLASS_MAP: dict[type, type] = {
    nn.Conv2d: CrossbarConv2d,
    nn.Linear: CrossbarLinear,
}
_NORM_MAP: dict[type, type] = {
    nn.BatchNorm2d: TaskBatchNorm2d,
    nn.BatchNorm1d: TaskBatchNorm1d,
    nn.LayerNorm: TaskLayerNorm,
}


def _swap(module: nn.Module, cls: type) -> None:
    module.__class__ = cls


def apply(model: nn.Module, spec: CrossbarSpec, filter_fn: FilterFn | None = None,
          head_name: str = "fc") -> nn.Module:
    """Convert ``model`` in place: selected Conv2d/Linear become crossbar layers, norms and the head
    become task-aware. Parameters keep their identity, values and state-dict keys.

    Args:
        model: a torch model whose classifier is the Linear called ``head_name``.
        spec: the crossbars that hold the programmed weights.
        filter_fn: ``(name, module) -> bool`` picks the layers mapped to crossbars; by default every
            Conv2d and Linear except the head.
        head_name: the classifier's attribute name; each new task gets its own head there.

    Returns:
        The same ``model`` object, converted.
    """
    if any(isinstance(m, TaskAware) for m in model.modules()):
        raise XbmError("model is already converted to crossbar layers; convert a fresh model")
    head = dict(model.named_modules()).get(head_name)
    if not isinstance(head, nn.Linear):
        raise XbmError(
            f"model has no Linear classifier named {head_name!r}; pass head_name= the name of its "
            "final Linear layer"
        )
    for _, mod in list(crossbar_modules(model, filter_fn, head_name)):
        cls = _CLASS_MAP.get(type(mod))
        if cls is None:  # subclasses of Conv2d/Linear we do not know how to compute
            continue
        _swap(mod, cls)
        mod._init_crossbar(spec)  # type: ignore[attr-defined]
    for name, mod in model.named_modules():
        if type(mod) in _NORM_MAP and name != head_name:
            _swap(mod, _NORM_MAP[type(mod)])
            mod._init_task_aware()  # type: ignore[attr-defined]
    _swap(head, TaskHead)
    head._init_task_aware()  # type: ignore[attr-defined]
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def crossbar_layers(model: nn.Module) -> list[tuple[str, CrossbarLayer]]:
    """(name, layer) of every crossbar layer in a converted model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CrossbarLayer)]


def task_aware_modules(model: nn.Module) -> list[tuple[str, TaskAware]]:
    """(name, module) of every task-aware module in a converted model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TaskAware)]
