"""The one entry point that puts a torch model on crossbars (torchao's ``quantize_`` pattern)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from xbm.errors import XbmError, XbmWarning, user_stacklevel
from xbm.hardware.mapping import (
    FilterFn,
    crossbar_modules,
    resolve_head_name,
    unmapped_weight_layers,
)
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


def check_float_dtypes(model: nn.Module) -> None:
    """Refuse float16 and bfloat16 models. Each task's state (scores, heads, BatchNorm
    copies) takes the backbone's dtype, and Adam in it fails: float16 underflows to NaN in a step
    or two, bfloat16 rounds XBM's 5e-3 threshold and the scores' small updates away.

    Raises:
        XbmError: naming the dtypes and the fix (a float32 model, bf16 through autocast).
    """
    low = sorted({str(t.dtype).removeprefix("torch.") for t in
                  [*model.parameters(), *model.buffers()]
                  if t.dtype in (torch.float16, torch.bfloat16)})
    if low:
        raise XbmError(f"the model holds {' and '.join(low)} tensors; convert a float32 model "
                       "(model.float()) and train in bfloat16 through autocast instead "
                       "(train_task(precision='bf16'), xbm adapt --precision bf16)")


def check_model_and_filter(model: object, filter_fn: object) -> None:
    """The two arguments a user passes first, before anything is converted: a model name
    given for the model failed with "'str' object has no attribute 'named_modules'", a
    one-argument filter with a TypeError from deep in the mapping."""
    import inspect

    if not isinstance(model, nn.Module):
        hint = (f"; build it first, e.g. xbm.create_model({model!r}, num_classes=10)"
                if isinstance(model, str) else "")
        raise XbmError(f"the backbone must be a torch nn.Module, got {type(model).__name__} "
                       f"{model!r:.60}{hint}")
    if filter_fn is None:
        return
    if not callable(filter_fn):
        raise XbmError(f"filter_fn must be a function (name, module) -> bool, got "
                       f"{filter_fn!r}")
    try:
        inspect.signature(filter_fn).bind("name", model)
    except TypeError:
        raise XbmError("filter_fn must take two arguments, (name, module), and return whether "
                       "the layer goes on crossbars; e.g. lambda name, module: name != "
                       "'conv1'") from None
    except ValueError:  # a builtin without a signature: called as it is
        pass


def apply(model: nn.Module, spec: CrossbarSpec | str, filter_fn: FilterFn | None = None,
          head_name: str | None = None) -> nn.Module:
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
        head_name: the classifier's module name (an ``nn.Linear`` with Linear's own forward);
            each new task gets its own head there. Default: the model's own ``head_name``
            attribute (every registered model has one), else ``"fc"``.

    Returns:
        The same ``model`` object, converted, with every parameter frozen
        (``requires_grad=False``): they are the programmed cells. Train the model before
        converting it; a task's own state (``MultiTaskModel.add_task``) is what learns after.

    Raises:
        XbmError: the head's class overrides ``nn.Linear.forward`` (that forward would be
            lost), or a norm keeps running statistics but is not one xbm makes per-task
            (``nn.BatchNorm1d``/``2d`` themselves): a BatchNorm subclass, ``SyncBatchNorm`` or a
            tracking ``InstanceNorm`` would have its statistics moved by a task's training.
            Nothing is converted then.
    """
    check_model_and_filter(model, filter_fn)
    head_name = resolve_head_name(model, head_name)
    if isinstance(spec, str):
        from xbm.hardware import get_spec

        spec = get_spec(spec)
    if not isinstance(spec, CrossbarSpec):
        raise XbmError(f"spec must be a CrossbarSpec or a preset name such as 'default', got "
                       f"{type(spec).__name__}; build one with xbm.get_spec('default', rows=64)")
    if any(isinstance(m, TaskAware) for m in model.modules()):
        raise XbmError("model is already converted to crossbar layers; convert a fresh model")
    check_float_dtypes(model)
    modules = dict(model.named_modules())
    head = modules.get(head_name)
    if not isinstance(head, nn.Linear):
        last = next((n for n, m in reversed(list(model.named_modules()))
                     if isinstance(m, nn.Linear)), None)
        what = (f"{head_name!r} is a {type(head).__name__}, not an nn.Linear" if head is not None
                else f"model has no module named {head_name!r}")
        hint = f" (its last Linear is {last!r})" if last is not None else ""
        raise XbmError(f"{what}; pass head_name= the name of the final Linear classifier"
                       f"{hint}")
    if type(head).forward is not nn.Linear.forward:  # every task's head is a plain Linear
        raise XbmError(f"the classifier {head_name!r} is a {type(head).__name__}, a subclass of "
                       "nn.Linear with its own forward, which the conversion would replace by a "
                       "plain "
                       "Linear's (changing the base task); make it an nn.Linear, or wrap the "
                       "model so that the extra computation sits outside the head")
    tracked = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._NormBase) and type(m) not in _NORM_MAP
               and m.track_running_stats and getattr(m, "running_mean", None) is not None]
    if tracked:  # not made per-task, so a task's training forwards would update them
        n, m = tracked[0]
        more = f" (and {len(tracked) - 1} more)" if len(tracked) > 1 else ""
        raise XbmError(f"{n} is a {type(m).__name__}{more}, a norm with running statistics that "
                       "xbm cannot make per-task (only nn.BatchNorm1d, nn.BatchNorm2d and "
                       "nn.LayerNorm themselves): training a task would update the programmed "
                       "backbone's statistics; replace it with the plain nn.BatchNorm1d/2d it "
                       "stands for (a SyncBatchNorm: convert it back), or build it with "
                       "track_running_stats=False if it needs none")
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


_PLAIN_OF: dict[type, type] = {v: k for k, v in _CLASS_MAP.items()} | {
    v: k for k, v in _NORM_MAP.items()}


def export_task(model: nn.Module, task: str) -> nn.Module:
    """A plain torch copy of a converted ``model`` that computes ``task`` (``base``: the
    backbone as pretrained): PEFT's ``merge_and_unload`` for crossbar tasks.

    Each crossbar layer becomes the ``nn.Conv2d``/``nn.Linear`` it was, holding the task's
    effective weight and bias (mask times programmed weight, a column's shift level folded in,
    XMA2's re-programmed PEs, finetune's own weights); a norm layer becomes the task's own copy
    (per-task BN) or the backbone's; the head becomes the task's (with a bias where the
    backbone's head has one). No crossbar class is left, so the copy runs, saves and loads as any
    torch model, with the backbone's state-dict keys. It is what the chip computes in ideal
    arithmetic, for inference and deployment elsewhere: the crossbar bookkeeping (mask bits,
    re-programmed cells) stays with the converted model.

    Only what the task computes with is copied (not the other tasks' state, a simulator or the
    methods' training bookkeeping), and no hook is carried over. The copy is returned in eval
    mode; ``model`` itself is not touched. A module used under two names stays one module; a
    Parameter shared by two modules is untied, since each crossbar layer computes with its own
    task weight (a digital module sharing it keeps the programmed one).

    Raises:
        XbmError: ``model`` is not converted, or has no task ``task``.
    """
    import copy

    from xbm.nn.layers import BASE_TASK

    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and callable(getattr(model, "export_task", None)):
        model = inner  # a MultiTaskModel: its converted backbone
    aware = {id(m): (n, m) for n, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, TaskAware)}
    if not aware:
        raise XbmError("export_task takes a model converted by xbm.apply or a MultiTaskModel; "
                       "this one has no crossbar layers")
    known = {t for _, m in aware.values() for t in m.xbm_tasks}
    if task != BASE_TASK and task not in known:
        raise XbmError(f"no task {task!r} to export; the model has "
                       f"{', '.join([BASE_TASK, *sorted(known)])}")
    # a Parameter held by two modules (weight tying across modules): each crossbar layer has
    # its own task weight, so such a tie cannot carry over; the copy gets the programmed tensor
    # once (for any digital holder) and each crossbar layer its own weight afterwards
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    shared: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    # deepcopy's memo, seeded: what must not be copied maps to its replacement beforehand
    memo: dict[int, object] = {}
    with torch.no_grad():
        for _, mod in aware.values():
            memo[id(mod.xbm_tasks)] = nn.ModuleDict()  # every task's state: not copied
            if isinstance(mod, CrossbarLayer):
                memo[id(mod.methods)] = {}
                if mod.simulator is not None:
                    memo[id(mod.simulator)] = None
                w, b = mod.effective_weight_and_bias(task)  # the task's, into the copy
                w = nn.Parameter(w.detach().clone(), requires_grad=False)
                b = None if b is None or mod.bias is None else \
                    nn.Parameter(b.detach().clone(), requires_grad=False)
                if owners[id(mod.weight)] > 1 or (b is not None and owners[id(mod.bias)] > 1):
                    shared[id(mod)] = (w, b)
                    continue
                memo[id(mod.weight)] = w
                if b is not None:
                    memo[id(mod.bias)] = b
        for m in model.modules():  # hooks stay behind (a method's, a logger's)
            for k, v in vars(m).items():
                if k.startswith("_") and "hooks" in k and isinstance(v, dict):
                    memo[id(v)] = type(v)()
        out = copy.deepcopy(model, memo)
        if isinstance(out, TaskAware):
            raise XbmError("export_task: the model itself is a converted layer; wrap it in a "
                           "module")
        done: dict[int, nn.Module] = {}
        for _, mod in aware.values():
            twin = memo[id(mod)]  # the module's copy in `out`
            if id(mod) not in done:
                own = mod.xbm_tasks[task] if task in mod.xbm_tasks else None  # noqa: SIM401
                if not isinstance(mod, CrossbarLayer) and own is not None:
                    done[id(mod)] = copy.deepcopy(own)  # the task's head or norm
                else:  # a crossbar layer (its weights are the task's) or a shared norm
                    done[id(mod)] = _plain_copy(twin)
                    if id(mod) in shared:  # untied: this layer's own task weight and bias
                        w, b = shared[id(mod)]
                        done[id(mod)]._parameters["weight"] = w
                        if b is not None:
                            done[id(mod)]._parameters["bias"] = b
        for name, mod in [(n, m) for n, m in model.named_modules(remove_duplicate=False)
                          if id(m) in aware]:
            _replace(out, name, done[id(mod)])
    return out.eval()


def _plain_copy(mod: nn.Module) -> nn.Module:
    """``mod`` as the plain torch class it was converted from, with its own parameters, buffers
    and settings, and none of the task bookkeeping or hooks (training-time hooks of a method
    must not follow a deployed copy)."""
    plain = _PLAIN_OF.get(type(mod)) or (nn.Linear if isinstance(mod, TaskHead) else None)
    if plain is None:
        raise XbmError(f"cannot export a {type(mod).__name__}: no plain torch class known")
    new = plain.__new__(plain)
    nn.Module.__init__(new)  # fresh module internals: no hooks, no children
    internal = set(new.__dict__)
    for k, v in mod.__dict__.items():
        if k not in internal and k not in _TASK_ATTRS:  # in_channels, stride, eps, ...
            new.__dict__[k] = v
    new._parameters = dict(mod._parameters)
    new._buffers = dict(mod._buffers)
    new._non_persistent_buffers_set = set(mod._non_persistent_buffers_set)
    new.training = mod.training
    return new


_TASK_ATTRS = frozenset({"active_task", "spec", "methods", "simulator", "matrix_rows",
                         "matrix_cols"})


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if not leaf:
        raise XbmError("export_task: the model itself is a converted layer; wrap it in a module")
    setattr(parent, leaf, new)
