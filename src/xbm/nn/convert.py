"""The one entry point that puts a torch model on crossbars (torchao's ``quantize_`` pattern)."""

from __future__ import annotations

import warnings

from torch import nn

from xbm.errors import XbmError, XbmWarning, user_stacklevel
from xbm.hardware.mapping import FilterFn, crossbar_modules, unmapped_weight_layers
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


def apply(model: nn.Module, spec: CrossbarSpec | str, filter_fn: FilterFn | None = None,
          head_name: str = "fc") -> nn.Module:
    """Convert ``model`` in place: selected Conv2d/Linear become crossbar layers, norms and the head
    become task-aware. Parameters keep their identity, values and state-dict keys.

    Args:
        model: a torch model whose classifier is the Linear called ``head_name``.
        spec: the crossbars that hold the programmed weights, or a preset name (as
            ``MultiTaskModel`` takes: ``"default"``, ``"isaac"``, ...).
        filter_fn: ``(name, module) -> bool``, asked about every ``nn.Conv2d`` and ``nn.Linear``
            except the head: which of them go on crossbars (default: all). Subclasses of them
            (e.g. MultiheadAttention's ``out_proj``, whose weight its parent reads directly) and
            other convolutions (Conv1d, ConvTranspose2d, ...) stay digital, with a warning.
        head_name: the classifier's module name; each new task gets its own head there.

    Returns:
        The same ``model`` object, converted, with every parameter frozen
        (``requires_grad=False``): they are the programmed cells. Train the model before
        converting it; a task's own state (``MultiTaskModel.add_task``) is what learns after.
    """
    if isinstance(spec, str):
        from xbm.hardware import get_spec

        spec = get_spec(spec)
    if not isinstance(spec, CrossbarSpec):
        raise XbmError(f"spec must be a CrossbarSpec or a preset name such as 'default', got "
                       f"{type(spec).__name__}; build one with xbm.get_spec('default', rows=64)")
    if any(isinstance(m, TaskAware) for m in model.modules()):
        raise XbmError("model is already converted to crossbar layers; convert a fresh model")
    head = dict(model.named_modules()).get(head_name)
    if not isinstance(head, nn.Linear):
        raise XbmError(
            f"model has no Linear classifier named {head_name!r}; pass head_name= the name of its "
            "final Linear layer"
        )
    stats_free = [n for n, m in model.named_modules()
                  if type(m) in _NORM_MAP and getattr(m, "running_mean", 0) is None]
    if stats_free:  # the base task's BN runs on fixed statistics, which these do not keep
        raise XbmError(f"{stats_free[0]} is a BatchNorm without running statistics "
                       "(track_running_stats=False): a programmed backbone normalises with "
                       "fixed statistics; build it with track_running_stats=True and estimate "
                       "them (a few training-mode forwards) before converting")
    skipped = unmapped_weight_layers(model, filter_fn, head_name)
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(
            f"xbm.apply: {len(skipped)} layer(s) with weights stay off the crossbars (digital, "
            f"never masked): {', '.join(skipped[:5])}{more}; only nn.Conv2d and nn.Linear "
            "themselves are mapped", XbmWarning, stacklevel=user_stacklevel())
    for _, mod in list(crossbar_modules(model, filter_fn, head_name)):
        cls = _CLASS_MAP[type(mod)]
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
