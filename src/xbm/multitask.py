"""The model users hold: one programmed backbone, many tasks.

A :class:`MultiTaskModel` converts a pretrained backbone onto crossbars once, then adds tasks, each
learned by a registered method. Selecting a task only changes which per-task state the layers read;
the programmed backbone is shared and, for methods that claim so, never changes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import operator
import os
import re
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xbm.errors import BundleError, XbmError, XbmWarning, user_stacklevel
from xbm.hardware.mapping import FilterFn, MappingReport, map_model, resolve_head_name
from xbm.hardware.spec import CrossbarSpec
from xbm.io import (
    check_metadata_hash,
    load_safetensors,
    metadata_hash,
    save_safetensors,
    tensors_hash,
)
from xbm.methods import AdaptionMethod, MethodConfig, create_method
from xbm.nn import BASE_TASK, CrossbarLayer, TaskHead, apply, task_aware_modules
from xbm.nn.convert import check_float_dtypes, check_model_and_filter
from xbm.nn.layers import TASK_KEY
from xbm.nn.modes import eval_mode

BUNDLE_FORMAT = "xbm-task-bundle/1"
_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}")
_TASK_NAME_LOADED = re.compile(r"[A-Za-z0-9_\-]{1,64}")  # the rule before session 28


@dataclass
class TaskInfo:
    """What a task is: its method, config, classes and where its data came from."""

    name: str
    method: str
    config: dict[str, Any]
    num_classes: int
    dataset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_bundle_meta(path: str | Path) -> tuple[dict[str, Any], CrossbarSpec, list[TaskInfo]]:
    """A task bundle's metadata, crossbar spec and task records, checked without a backbone.

    Cheap (the tensors are read only to check the content hash), so commands call it before
    any pretraining: a corrupt bundle then fails in a second, not after minutes of work.

    Raises:
        BundleError: unreadable file, not a bundle, or metadata that does not parse (spec,
            task records, an unknown method or an invalid method config).
    """
    _, meta, spec, tasks = _read_checked_bundle(path)
    return meta, spec, tasks


def _read_checked_bundle(path: str | Path, head_name: str | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any], CrossbarSpec,
                                    list[TaskInfo]]:
    """A bundle's tensors, metadata, spec and task records, after every check that needs no
    model: the header's and the tensors' hashes, the metadata's fields, the heads' sizes (of
    ``head_name``'s heads; default: the head the bundle records)."""
    tensors, meta = load_safetensors(path)
    _check_meta_hash(path, meta)
    spec, tasks = _check_bundle_meta(path, meta)
    _check_bundle_hash(path, tensors, meta)
    _check_head_shapes(path, tensors, head_name or meta.get("head_name", "fc"), tasks)
    return tensors, meta, spec, tasks


def _check_head_shapes(path: str | Path, tensors: dict[str, torch.Tensor], head_name: str,
                       tasks: list[TaskInfo]) -> None:
    """A task's recorded class count against its head tensor, before ``add_task`` builds a
    head that size (an edited 2^33 tried to allocate half a terabyte)."""
    for ti in tasks:
        hk = f"{head_name}.{TASK_KEY}.{ti.name}.weight"
        if hk in tensors and tensors[hk].shape[:1] != (ti.num_classes,):
            raise BundleError(f"{path}: task {ti.name!r} records {ti.num_classes} classes but "
                              f"its head {hk} has shape {tuple(tensors[hk].shape)}; the file is "
                              "corrupt, re-create it with xbm adapt")


#: Why a bundle's task tensors may not match this model's layers although the backbone hash
#: and spec do: the hash covers the weights, not which layers the conversion put on crossbars.
_LAYER_SET_HINT = ("; a bundle learned with other layers on the crossbars loads onto a model "
                   "built with the filter_fn (and head_name) it was made with")


def _check_bundle_hash(path: str | Path, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> None:
    """Bundles record a content hash of their tensors (as backbones do): flipped bytes in a
    score or weight would otherwise load silently and change results. Bundles written before
    the hash was recorded have none and are not checked."""
    want = meta.get("content_hash")
    if want is not None and tensors_hash(tensors) != want:
        raise BundleError(f"{path}: content hash mismatch; the bundle is corrupt, re-create it "
                          "with xbm adapt")


def _check_meta_hash(path: str | Path, meta: dict[str, Any]) -> None:
    """Bundles record a hash of their metadata too: a flipped byte in a task record (its image
    size, classes, method config) or in the spec still parses, and changed results silently.
    Bundles written before session 26 have none and are not checked."""
    check_metadata_hash(path, meta, "bundle", "re-create it with xbm adapt",
                        holds="its task records, spec or architecture")


def _check_bundle_meta(path: str | Path, meta: dict[str, Any]
                       ) -> tuple[CrossbarSpec, list[TaskInfo]]:
    from xbm.methods import get_method_class

    if meta.get("format") != BUNDLE_FORMAT:
        if str(meta.get("format", "")).startswith("xbm-backbone"):
            raise BundleError(f"{path}: this is a backbone, not a task bundle; pass it as "
                              "--backbone, and as --bundle a file `xbm adapt` wrote")
        fmt = meta.get("format")
        what = f"format {fmt!r}" if fmt is not None else "no xbm format field"
        raise BundleError(f"{path}: not an xbm task bundle ({what}); pass a file `xbm adapt` "
                          "wrote")
    if not isinstance(meta.get("spec"), dict):
        raise BundleError(f"{path}: bundle's crossbar spec is a "
                          f"{type(meta.get('spec')).__name__}, not a mapping; the file is "
                          "corrupt, re-create it with xbm adapt")
    try:
        spec = CrossbarSpec.from_dict(meta["spec"])
    except (XbmError, TypeError, KeyError, AttributeError, ValueError) as exc:
        raise BundleError(f"{path}: bundle has an unreadable crossbar spec ({exc})") from None
    if not isinstance(meta.get("head_name", "fc"), str):
        raise BundleError(f"{path}: bundle's head_name is {meta.get('head_name')!r}, not a "
                          "layer name; the file is corrupt, re-create it with xbm adapt")
    records = meta.get("tasks", [])
    if not isinstance(records, list):
        raise BundleError(f"{path}: bundle's task list is a {type(records).__name__}, not a "
                          "list; the file is corrupt, re-create it with xbm adapt")
    from xbm.methods import METHODS

    tasks: list[TaskInfo] = []
    for i, info in enumerate(records):
        method = info.get("method") if isinstance(info, dict) else None
        if isinstance(method, str) and method not in METHODS:  # a user's method, not imported
            raise BundleError(f"{path}: task {info.get('name')!r} was learned by method "
                              f"{method!r}, which is not registered in this process; pass "
                              "--plugin MODULE to xbm (or import, from Python) the module "
                              f"that registers it (@register_method({method!r})) before "
                              "loading the bundle")
        try:
            ti = TaskInfo(**info)
            if not isinstance(ti.name, str) or not isinstance(ti.config, dict) \
                    or isinstance(ti.num_classes, bool) or not isinstance(ti.num_classes, int) \
                    or ti.num_classes < 1:
                raise TypeError("name, config or num_classes has the wrong type")
            get_method_class(ti.method).config_class.from_dict(dict(ti.config))
            _check_task_extra(ti)
        except (XbmError, TypeError, AttributeError, ValueError) as exc:
            raise BundleError(f"{path}: task record {i} is unreadable ({exc}); the file is "
                              "corrupt or from another xbm version") from None
        if any(t.name == ti.name for t in tasks):
            raise BundleError(f"{path}: task record {i} repeats the task name {ti.name!r}; the "
                              "file is corrupt, re-create it with xbm adapt")
        tasks.append(ti)
    return spec, tasks


#: The ``extra`` fields xbm writes into a task record, and the type each must have: eval, cost
#: and simulate read them back (a string where a list belongs crashed them with a traceback).
_EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "classes": (list,), "image_size": (int,), "seed": (int,), "batch_size": (int,),
    "processes": (int,), "train_steps": (int,), "data_root": (str,),
    "test_fingerprint": (str,),
}


def _check_task_extra(ti: TaskInfo) -> None:
    if ti.dataset is not None and not isinstance(ti.dataset, str):
        raise TypeError(f"dataset is a {type(ti.dataset).__name__}, not a name")
    if not isinstance(ti.extra, dict):
        raise TypeError(f"extra is a {type(ti.extra).__name__}, not a mapping")
    for key, types in _EXTRA_TYPES.items():
        v = ti.extra.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, types):
            raise TypeError(f"extra.{key} is {v!r}, not a {types[0].__name__}")
        if key == "classes" and not all(isinstance(c, str) for c in v):
            raise TypeError("extra.classes holds a name that is not a string")
        if types == (int,) and key != "seed" and v < 1:
            raise TypeError(f"extra.{key} is {v!r}, not a positive integer")


def check_task_name(name: object, flag: str | None = None, *, loading: bool = False) -> None:
    """Task names key tensors in bundles: 1-64 ASCII letters, digits, ``-`` or ``_``, not led
    by ``-`` (``--task -x`` reads as a flag; only ``--task=-x`` names it). A bundle written
    before session 28 may hold such a name: ``loading`` accepts it, so the bundle still loads.

    Raises:
        XbmError: naming ``flag`` when given.
    """
    what = f"{flag} {name!r}" if flag else f"task name {name!r}"
    rule = _TASK_NAME_LOADED if loading else _TASK_NAME
    if not isinstance(name, str) or not rule.fullmatch(name):
        lead = isinstance(name, str) and name.startswith("-")
        raise XbmError(f"{what} is invalid: use 1-64 letters, digits, '-' or '_'" +
                       (", not starting with '-' (a command line would read it as a flag)"
                        if lead else ""))
    if reserved_task_name(name):
        raise XbmError(f"{what} is taken by torch's module API (nn.ModuleDict.{name}); pick "
                       f"another, e.g. {name.strip('_') + '-task'!r}")


def reserved_task_name(name: str) -> bool:
    """A name torch's module API owns (``train``, ``eval``, ``to``, ...): a task's state lives
    in ``nn.ModuleDict``s under its name, which cannot hold one."""
    return hasattr(nn.ModuleDict(), name)


def _as_spec(spec: CrossbarSpec | str) -> CrossbarSpec:
    """A spec or a preset name (``xbm.get_spec``); anything else is refused here, before the
    conversion, rather than failing later inside a layer."""
    if isinstance(spec, CrossbarSpec):
        return spec
    if isinstance(spec, str):
        from xbm.hardware import get_spec

        return get_spec(spec)
    raise XbmError(f"spec must be a CrossbarSpec or a preset name such as 'default', got "
                   f"{type(spec).__name__}; build one with xbm.get_spec('default', rows=64)")


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The programmed backbone's tensors: every state-dict entry that is not task state."""
    marker = f"{TASK_KEY}."
    return {k: v for k, v in model.state_dict().items()
            if not (k.startswith(marker) or f".{marker}" in k)}


# which MultiTaskModel holds each converted model: tasks live in the wrapper, so a second
# wrapper on the same layers would add tasks the first cannot see (and overwrite its state)
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def _owner(model: nn.Module) -> Any:
    ref = _OWNERS.get(model)
    if ref is not None and ref() is not None:
        gc.collect()  # a wrapper dropped by the user but still in a reference cycle
    return ref() if ref is not None else None


def _storages(tensors: Iterable[torch.Tensor]) -> set[tuple[str, int]]:
    """(device, address) of each tensor's memory; meta and empty tensors have none (every
    meta tensor reports address 0)."""
    return {(str(t.device), t.untyped_storage().data_ptr()) for t in tensors
            if t.numel() and not t.is_meta and t.untyped_storage().data_ptr()}


def _adopt(model: nn.Module, spec: CrossbarSpec, filter_fn: FilterFn | None,
           head_name: str) -> nn.Module:
    """A model ``xbm.apply`` already converted, taken as it is: on the same crossbars, with no
    task of its own yet (the bookkeeping of tasks lives in the MultiTaskModel), and with its
    layers chosen by ``apply``'s own ``filter_fn``."""
    if filter_fn is not None:
        raise XbmError("model is already converted to crossbar layers (xbm.apply), whose "
                       "filter_fn chose them; leave filter_fn out here, or pass the unconverted "
                       "model with filter_fn=")
    held = sorted({t for _, m in task_aware_modules(model) for t in m.xbm_tasks})
    if held:
        raise XbmError(f"model already holds task(s) {', '.join(held)} (it belongs to another "
                       "MultiTaskModel); use that one, or a fresh model and load_bundle")
    if _owner(model) is not None:
        raise XbmError("model already belongs to another MultiTaskModel (its .model): tasks "
                       "added through two wrappers would overwrite each other's state on the "
                       "shared layers; use that one, or give this one a backbone of its own")
    head = dict(model.named_modules()).get(head_name)
    if not isinstance(head, TaskHead):
        raise XbmError(f"model is already converted, but its head is not {head_name!r}; pass "
                       "head_name= the name it was converted with")
    for name, m in model.named_modules():
        if isinstance(m, CrossbarLayer) and m.spec.geometry_dict() != spec.geometry_dict():
            diff = sorted(k for k, v in spec.geometry_dict().items()
                          if m.spec.geometry_dict().get(k) != v)
            raise XbmError(f"model is already converted to other crossbars ({name}: "
                           f"{', '.join(f'{k}={getattr(m.spec, k)}' for k in diff)}; here "
                           f"{', '.join(f'{k}={getattr(spec, k)}' for k in diff)}); pass the "
                           "spec it was converted with, or convert a fresh model")
    return model


def _refuse_meta(tensors: Any) -> None:
    """A weightless (meta-device) model has no values to hash or save."""
    if any(t.is_meta for t in tensors):
        raise XbmError("this model's backbone is on the meta device (shapes only): it has no "
                       "content hash, and its tasks cannot be saved; build it with real "
                       "weights (or load them with load_state_dict(..., assign=True))")


def _check_bundle_target(path: str | os.PathLike) -> None:
    """Refuse to write a bundle over an existing file that is not one (``save_bundle``)."""
    from xbm.io import xbm_file_kind

    p = Path(path)  # as the write takes it: "~" is not expanded there either
    if p.is_dir():
        raise XbmError(f"save_bundle: {p} is a folder; name a file, e.g. {p / 'tasks.safetensors'}")
    if not p.exists() or p.stat().st_size == 0:
        return
    kind = xbm_file_kind(p)
    if kind == "task bundle":
        return
    what = f"an xbm {kind}" if kind else "not an xbm task bundle"
    raise XbmError(f"save_bundle: {p} exists and is {what}; a bundle replaces only a bundle: "
                   "save to another path, or remove the file first")


class MultiTaskModel(nn.Module):
    """A backbone on crossbars plus per-task state, keyed by task name.

    The backbone is converted **in place** (``self.model is backbone``): its parameters keep
    their identity, values and state-dict keys, so the programmed weights are exactly the
    tensors that were loaded, before or after the conversion. A backbone can be converted once;
    build a new one for a second model. A model that :func:`xbm.apply` converted (on the same
    spec, without ``filter_fn`` here) is taken as it is.

    Args:
        backbone: the pretrained torch model; its classifier is the Linear named ``head_name``.
        spec: the crossbars (a :class:`CrossbarSpec` or a preset name for
            :func:`xbm.get_spec`).
        filter_fn: ``(name, module) -> bool``, asked for every ``nn.Conv2d`` and ``nn.Linear``
            other than the head: which layers go on crossbars (default: all of them).
        head_name: the classifier's module name (``"fc"`` in torchvision's ResNets); every
            task gets its own head there. Default: the backbone's own ``head_name`` attribute
            (every registered model has one), else ``"fc"``.
        arch: what the backbone is (``name``, ``in_channels``, ``width``, ...; a backbone
            file's metadata ``arch``). Saved with bundles, and the cost model builds a
            weightless copy from it to count output positions.
        backbone_recipe: the backbone's pretraining config (its metadata's ``config``), saved
            with bundles so that a missing backbone can be named by the command that rebuilds
            it.
        backbone_file: the file the backbone was loaded from, saved (as an absolute path) with
            bundles: a backbone kept outside the cache (``xbm pretrain --out``) is found there
            again, if its content hash still matches.

    ``arch``, ``backbone_recipe`` and ``backbone_file`` default to what the file records for a
    backbone that :func:`xbm.load_backbone` returned.
    """

    #: True while :meth:`load_bundle` adds a bundle's tasks (their names keep the old rule).
    _loading_bundle = False
    #: defaults for a model pickled before these attributes existed (see ``__init__``)
    _from_source: set[str] = frozenset()  # type: ignore[assignment]
    _source_hash: str | None = None

    def __init__(self, backbone: nn.Module, spec: CrossbarSpec | str,
                 filter_fn: FilterFn | None = None, head_name: str | None = None,
                 arch: dict[str, Any] | None = None,
                 backbone_recipe: dict[str, Any] | None = None,
                 backbone_file: str | os.PathLike | None = None) -> None:
        super().__init__()
        check_model_and_filter(backbone, filter_fn)
        source = getattr(backbone, "_xbm_source", None)
        #: which of arch/backbone_recipe/backbone_file came from load_backbone's file rather
        #: than the caller; they describe that file's weights (its hash below), so a bundle of
        #: other weights does not record them (save_bundle)
        self._from_source: set[str] = set()
        self._source_hash = source.get("hash") if isinstance(source, dict) else None
        if isinstance(source, dict):  # xbm.load_backbone's model: what its file records
            given = {"arch": arch, "backbone_recipe": backbone_recipe,
                     "backbone_file": backbone_file}
            found = {"arch": source.get("arch"), "backbone_recipe": source.get("recipe"),
                     "backbone_file": source.get("file")}
            self._from_source = {k for k, v in found.items() if given[k] is None and v}
            arch, backbone_recipe, backbone_file = (
                found[k] if given[k] is None else given[k]
                for k in ("arch", "backbone_recipe", "backbone_file"))
        head_name = resolve_head_name(backbone, head_name)
        self.spec = _as_spec(spec)
        self.arch = dict(arch or {})
        for what, v in (("arch", self.arch), ("backbone_recipe", backbone_recipe)):
            try:  # recorded in bundles as JSON: fail here, not in save_bundle after training
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise XbmError(f"{what} must hold JSON values (names, numbers, lists), since "
                               f"bundles record it: {exc}") from None
        self.backbone_recipe = dict(backbone_recipe) if backbone_recipe else None
        self.backbone_file = os.path.abspath(os.path.expanduser(backbone_file)) \
            if backbone_file else None
        self.head_name = head_name
        if any(True for _ in task_aware_modules(backbone)):
            check_float_dtypes(backbone)  # apply checks a fresh model; a converted one here
            self.model = _adopt(backbone, self.spec, filter_fn, head_name)
        else:
            self.model = apply(backbone, self.spec, filter_fn, head_name)
        _OWNERS[self.model] = weakref.ref(self)
        # the wrapper's flag is the backbone's (nn.Module starts every module in training
        # mode): `mtm.training` then says what a plain forward does, and helpers that
        # restore it do not turn an eval-mode backbone back to training
        self.training = backbone.training
        self.tasks: dict[str, TaskInfo] = {}
        self.methods: dict[str, AdaptionMethod] = {}
        self._active = BASE_TASK

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy and unpickling rebuild a wrapper around a new backbone: it owns that
        # one, and its methods serve it; a shallow copy.copy shares the original's backbone,
        # which stays the original's
        super().__setstate__(state)
        if "model" in self._modules and _owner(self.model) is None:
            _OWNERS[self.model] = weakref.ref(self)
            for name, m in self.__dict__.get("methods", {}).items():
                m._xbm_serves = (weakref.ref(self), name)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, after a check that every task the state dict holds
        exists here: a task's tensors need the task (its method, its state shapes) in place,
        and torch would copy the backbone's tensors before failing on them in strict mode (or
        drop them with ``strict=False``). Tasks travel as bundles (:meth:`save_bundle`,
        :meth:`load_bundle`); a whole-model state dict round-trips once the same tasks are
        added with the same methods and configs.

        Raises:
            XbmError: before anything is copied: the state dict holds tasks this model lacks
                (strict mode; a warning otherwise), lacks tasks this model has (strict mode),
                or holds other backbone weights while tasks of this model, learned on its
                backbone, would stay (either mode: they would silently compute with weights
                they were not learned on). Every backbone tensor counts, BatchNorm's
                ``num_batches_tracked`` too, as in the backbone hash bundles check.
        """
        found = {m.group(1) for k in state_dict
                 if (m := re.search(rf"(?:^|\.){TASK_KEY}\.([^.]+)\.", str(k)))}
        missing = sorted(found - set(self.tasks))
        if missing:
            msg = (f"the state dict holds task(s) {', '.join(missing)} that this model lacks; "
                   "add_task them first with the same methods and configs, or move tasks as "
                   "bundles (save_bundle / load_bundle)")
            if strict:
                raise XbmError(msg)
            warnings.warn(f"{msg}: their tensors are not loaded", XbmWarning,
                          stacklevel=user_stacklevel())
        kept = [t for t in self.tasks if t not in found]
        if kept and strict:  # torch would fail on their keys after copying the rest
            raise XbmError(f"the state dict lacks task(s) {', '.join(kept)} that this model "
                           "has; remove_task them first, or move tasks as bundles (save_bundle "
                           "/ load_bundle)")
        if kept:
            own = {f"model.{k}": v for k, v in backbone_state(self.model).items()}
            changed = sorted(  # a weightless (meta) side has no values to compare
                k for k, v in own.items() if isinstance(state_dict.get(k), torch.Tensor)
                and not v.is_meta and not state_dict[k].is_meta and (
                    tuple(state_dict[k].shape) != tuple(v.shape)
                    or not torch.equal(state_dict[k].to(v.device, v.dtype), v)))
            if changed:
                raise XbmError(
                    f"the state dict holds other backbone weights ({changed[0]}"
                    f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}) while "
                    f"task(s) {', '.join(kept)}, learned on this backbone, would stay; "
                    "remove_task them first, or load the weights into a fresh model")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def backbone_hash(self) -> str:
        """Content hash of the programmed backbone's tensors, as they are now: computed on
        every call, so that weights loaded after the conversion are the ones a bundle records
        (and checks on loading). The hash covers dtypes: a backbone cast to float64 holds
        other values, and its bundles load only onto a float64 copy (float16 and bfloat16
        models are refused: ``xbm.nn.convert.check_float_dtypes``).

        Raises:
            XbmError: the model is weightless (on the meta device): it has no values to hash.
        """
        state = backbone_state(self.model)
        _refuse_meta(state.values())
        return tensors_hash(state)

    # -- tasks ------------------------------------------------------------------------------
    @property
    def active_task(self) -> str:
        return self._active

    def task_names(self, include_base: bool = False) -> list[str]:
        """The learned tasks in the order they were added (``base`` first if asked for)."""
        return ([BASE_TASK] if include_base else []) + list(self.tasks)

    def add_task(self, name: str, num_classes: int, method: str | AdaptionMethod = "xbm",
                 config: MethodConfig | dict[str, Any] | None = None,
                 dataset: str | None = None) -> AdaptionMethod:
        """Add a task learned by ``method`` and make it active.

        Args:
            name: 1-64 letters, digits, ``-`` or ``_``; not ``base`` (the backbone's own task).
            num_classes: the size of the task's new classifier head.
            method: a registered method name (``xbm.methods.list_methods()``) or a method
                object (then ``config`` must be left out: the object has its own).
            config: the method's config: its dataclass (``get_method_class(name).config_class``)
                or a dict of its fields.
            dataset: where the task's data came from, recorded in bundles.

        The new task's parameters are the only ones left trainable (``requires_grad``); every
        other task's are frozen, as PEFT does for the active adapter, so a hand-written loop over
        ``filter(lambda p: p.requires_grad, model.parameters())`` trains just this task. If
        anything fails, the model is left as it was.
        """
        check_float_dtypes(self.model)  # a model cast to float16/bfloat16 after conversion
        check_task_name(name, loading=self._loading_bundle)
        if name == BASE_TASK:
            raise XbmError(f"task name {name!r} is reserved for the pretrained backbone's own "
                           "task; pick another name")
        if name in self.tasks:
            raise XbmError(f"task {name!r} already exists; give the new task another name "
                           "(xbm adapt: --task NAME), or remove_task it first")
        n = None  # any integer type (numpy's too), not a float, a string or a bool
        if not isinstance(num_classes, bool):
            with contextlib.suppress(TypeError):
                n = operator.index(num_classes)
        if n is None or n < 1:
            raise XbmError(f"task {name!r}: num_classes must be a positive integer, got "
                           f"{num_classes!r}")
        if n == 1:  # the cross-entropy of one logit is 0: no gradient, nothing is learned
            raise XbmError(f"task {name!r}: num_classes must be at least 2 (with one class "
                           "every prediction is right and the training loss is always 0)")
        num_classes = n
        if dataset is not None:
            if isinstance(dataset, os.PathLike):
                dataset = os.fspath(dataset)
            if not isinstance(dataset, str):
                raise XbmError(f"task {name!r}: dataset must be a name or a path (recorded in "
                               f"bundles), got {type(dataset).__name__}")
        if isinstance(method, AdaptionMethod):
            if config is not None:
                raise XbmError(f"task {name!r}: pass either a method object (which has its own "
                               "config) or a method name with config=, not both")
            serves = getattr(method, "_xbm_serves", None)
            if serves is not None and serves[0]() is not None:
                # its per-task bookkeeping (XMA2's PE selection) is one task's, for good: a
                # removed task's object is not taken again either
                raise XbmError(f"task {name!r}: this {method.name} method object already serves "
                               f"task {serves[1]!r} (of a model still alive); give each task "
                               f"its own, e.g. add_task({name!r}, NUM_CLASSES, "
                               f"{method.name!r}, config=...)")
            m = method
            # its model is gone, or it is a copy (deepcopy, pickle) of one that served a task:
            # what it kept of those layers is not this model's
            m._forget_layers()
        else:
            m = create_method(method, config)
        ref = next(self.model.parameters())
        backbone_storage = _storages(backbone_state(self.model).values())
        try:
            for _, mod in task_aware_modules(self.model):
                if isinstance(mod, CrossbarLayer):
                    mod.add_task_state(name, m)
                elif isinstance(mod, TaskHead):
                    mod.add_task_head(name, num_classes)
                elif m.config.per_task_bn:
                    mod.add_task_bn(name)  # type: ignore[attr-defined]
                else:
                    continue
                # the new state follows the module it sits in (device, floating dtype and
                # train/eval mode: a task added to an eval-mode model must not update its
                # BatchNorm statistics on a plain forward)
                own = mod.xbm_tasks[name]
                own.train(mod.training)
                like = next(iter(mod.parameters(recurse=False)), None)
                if like is None:  # a norm without affine parameters: its statistics
                    like = next((b for b in mod.buffers(recurse=False)
                                 if b.is_floating_point()), ref)
                own.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
                shared = [k for k, t in own.state_dict(keep_vars=True).items()
                          if _storages([t]) & backbone_storage]
                if shared:  # training it would write the programmed cells in place
                    raise XbmError(f"task {name!r}: the {m.name} method's state {shared[0]!r} "
                                   "shares memory with the programmed backbone, so training it "
                                   "would rewrite the backbone; its create_layer_state must "
                                   "copy (.detach().clone()) what it takes from the layer")
        except BaseException:  # an interrupt too: nothing half-added stays
            for _, mod in task_aware_modules(self.model):
                mod.remove_task(name)
            raise
        self.tasks[name] = TaskInfo(name, m.name, m.config.to_dict(), num_classes, dataset)
        self.methods[name] = m
        m._xbm_serves = (weakref.ref(self), name)
        self.set_trainable(name)
        self.set_task(name)
        return m

    def _task_params(self, name: str) -> Iterator[nn.Parameter]:
        """Every parameter of a learned task (``task_parameters``' groups, flattened)."""
        for group in self.task_parameters(name).values():
            yield from group

    def remove_task(self, name: str) -> None:
        """Drop a learned task and its state (the backbone is untouched); the active task falls
        back to ``base`` if it was this one."""
        self._require(name)
        for _, mod in task_aware_modules(self.model):
            mod.remove_task(name)
        del self.tasks[name]
        del self.methods[name]  # its object stays marked: its bookkeeping was this task's
        if self._active == name:
            self.set_task(BASE_TASK)

    def export_task(self, name: str) -> nn.Module:
        """A plain torch copy of the backbone that computes task ``name`` (``base``: as
        pretrained): no xbm class left, the backbone's state-dict keys, eval mode; for
        deployment or export elsewhere (:func:`xbm.nn.export_task`, PEFT's
        ``merge_and_unload``). This model is not touched."""
        from xbm.nn import export_task

        if name != BASE_TASK:
            self._require(name)
        return export_task(self.model, name)

    def set_trainable(self, name: str) -> None:
        """Make ``name``'s own parameters the only trainable ones (``requires_grad``), as
        :meth:`add_task` does for a new task: a hand-written loop over the trainable parameters
        then trains that task, e.g. an earlier one further. ``set_task`` only routes forwards;
        it does not change this (it also serves evaluation, which must not)."""
        self._require(name)
        for t in self.tasks:
            for p in self._task_params(t):
                p.requires_grad_(t == name)

    def set_task(self, name: str) -> None:
        """Route every forward through `name` (`base` = the backbone as pretrained). Which task
        is trainable stays as it was: :meth:`set_trainable` changes that."""
        if not isinstance(name, str):
            raise XbmError(f"set_task takes a task name, got {type(name).__name__}")
        if name != BASE_TASK:
            self._require(name)
        for _, mod in task_aware_modules(self.model):
            mod.active_task = name
        self._active = name

    @contextlib.contextmanager
    def use_task(self, name: str) -> Iterator[None]:
        """``with model.use_task(name):`` routes forwards through ``name``, then restores the
        task that was active before."""
        prev = self._active
        self.set_task(name)
        try:
            yield
        finally:  # the previous task, unless the block removed it: then base, as remove_task
            self.set_task(prev if prev == BASE_TASK or prev in self.tasks else BASE_TASK)

    def _require(self, name: str) -> None:
        if name == BASE_TASK:
            raise XbmError(f"{BASE_TASK!r} is the pretrained backbone's own task: it has no "
                           f"state of its own; name a learned task ({self._task_list()})")
        if name not in self.tasks:
            raise XbmError(f"unknown task {name!r}; this model has: {self._task_list(True)}")

    def _task_list(self, include_base: bool = False) -> str:
        names = self.task_names(include_base)
        return ", ".join(names) if names else "no learned task yet (add_task first)"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, whatever it takes (``train_task`` and ``evaluate`` feed
        ``(x, y)`` batches and call it with ``x`` alone)."""
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def forward_mixed(self, x: torch.Tensor, tasks: Sequence[str]) -> list[torch.Tensor]:
        """Logits for a batch whose samples belong to different tasks (``tasks[i]`` is sample
        i's task; ``base`` allowed), in input order.

        The samples of one task run together, one task after another, as a chip would switch
        its column masks between groups: one mask switch per task in the batch, not per sample.
        Tasks have their own heads and so their own number of classes, hence a list of 1-D
        tensors. Inference only (eval mode, no gradient); the active task and the training
        flag are restored afterwards. A single name (a string) puts every sample in that task.
        """
        if isinstance(tasks, str):
            tasks = [tasks] * x.shape[0]
        if len(tasks) != x.shape[0]:
            raise XbmError(f"a mixed-task batch: {x.shape[0]} samples but {len(tasks)} task "
                           "names; give one task per sample")
        for t in dict.fromkeys(tasks):
            if t != BASE_TASK:
                self._require(t)
        out: list[torch.Tensor | None] = [None] * len(tasks)
        # inference: BatchNorm uses each task's running statistics; every submodule's own
        # train/eval flag comes back afterwards
        with eval_mode(self):
            for t in dict.fromkeys(tasks):  # first-seen order: deterministic
                idx = [i for i, ti in enumerate(tasks) if ti == t]
                with self.use_task(t):
                    logits = self.model(x[idx])
                for j, i in enumerate(idx):
                    out[i] = logits[j]
        return out  # type: ignore[return-value]

    def predict_mixed(self, x: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """Top-1 class of every sample under its own task (see :meth:`forward_mixed`)."""
        if isinstance(tasks, str):
            tasks = [tasks] * x.shape[0]
        if x.shape[0] == 0 and not len(tasks):
            return torch.zeros(0, dtype=torch.long, device=x.device)
        return torch.stack([lg.argmax() for lg in self.forward_mixed(x, tasks)])

    # -- parameters -------------------------------------------------------------------------
    def task_parameters(self, name: str) -> dict[str, list[nn.Parameter]]:
        """The parameters a task trains, grouped as ``state`` (per-layer), ``head`` and ``norm``."""
        self._require(name)
        groups: dict[str, list[nn.Parameter]] = {"state": [], "head": [], "norm": []}
        for _, mod in task_aware_modules(self.model):
            if name not in mod.xbm_tasks:
                continue
            kind = ("state" if isinstance(mod, CrossbarLayer)
                    else "head" if isinstance(mod, TaskHead) else "norm")
            groups[kind].extend(mod.xbm_tasks[name].parameters())
        return groups

    def trainable_params(self, name: str) -> int:
        """Parameters the task learns: head, per-task norms and each layer's
        :meth:`~xbm.methods.AdaptionMethod.trainable_count` (not the storage it allocates); 0
        for ``base``, which learns nothing here, as :meth:`mask_bits` and
        :meth:`reprogrammed_cells` say for it."""
        if name == BASE_TASK:
            return 0
        groups = self.task_parameters(name)
        n = sum(p.numel() for p in groups["head"] + groups["norm"])
        m = self.methods[name]
        return n + sum(m.trainable_count(layer, st) for _, layer, st in self.layer_states(name))

    def layer_states(self, name: str) -> Iterator[tuple[str, CrossbarLayer, nn.Module]]:
        """(layer name, crossbar layer, the task's state module in it) for every crossbar
        layer."""
        self._require(name)
        for lname, mod in task_aware_modules(self.model):
            if isinstance(mod, CrossbarLayer) and name in mod.xbm_tasks:
                yield lname, mod, mod.xbm_tasks[name]

    def mask_bits(self, name: str) -> int:
        """Mask memory of a task in bits (0 for ``base``, the backbone as programmed)."""
        if name == BASE_TASK:
            return 0
        self._require(name)
        m = self.methods[name]
        return sum(m.mask_bits(layer, st) for _, layer, st in self.layer_states(name))

    def reprogrammed_cells(self, name: str) -> int:
        """Cells rewritten to deploy a task onto the chip holding the backbone (0 for
        ``base``)."""
        if name == BASE_TASK:
            return 0
        self._require(name)
        m = self.methods[name]
        return sum(m.reprogrammed_cells(layer, st) for _, layer, st in self.layer_states(name))

    def masked_off_columns(self, name: str) -> int:
        """Crossbar columns a task switches off, i.e. whose ADC conversion it skips (0 for
        ``base``)."""
        if name == BASE_TASK:
            return 0
        self._require(name)
        m = self.methods[name]
        return sum(m.masked_off_columns(layer, st) for _, layer, st in self.layer_states(name))

    def mapping(self) -> MappingReport:
        """The per-layer crossbar mapping of the converted model (``xbm map``'s report)."""
        return map_model(self.model, self.spec, lambda n, m: isinstance(m, CrossbarLayer),
                         self.head_name)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The programmed backbone's tensors (every state-dict entry that is not task state)."""
        return backbone_state(self.model)

    def task_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """One task's tensors, under their full state-dict keys. A module used under two names
        (weight tying) lists its tensors once, under the first name, as ``named_modules`` and
        :meth:`layer_states` do (a bundle cannot hold one tensor twice)."""
        self._require(name)
        mid = f"{TASK_KEY}.{name}."
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in self.model.state_dict(keep_vars=True).items():
            if (k.startswith(mid) or f".{mid}" in k) and id(v) not in seen:
                seen.add(id(v))
                out[k] = v.detach()
        return out

    def _map_layer_states(self, task: str, tensors: dict[str, torch.Tensor], fn) -> None:
        """Replace, in place, each crossbar layer's ``task`` tensors in ``tensors`` by
        ``fn(layer_name, layer, state, tensors with keys relative to the state)`` (the method's
        bundle packing or unpacking)."""
        for lname, layer, st in self.layer_states(task):
            pre = f"{lname}.{TASK_KEY}.{task}." if lname else f"{TASK_KEY}.{task}."
            local = {k[len(pre):]: tensors.pop(k) for k in list(tensors) if k.startswith(pre)}
            tensors.update({pre + k: v for k, v in fn(lname, layer, st, local).items()})

    # -- bundles ----------------------------------------------------------------------------
    def save_bundle(self, path: str | Path, tasks: list[str] | None = None) -> None:
        """Save the named tasks' state (all tasks by default) as one safetensors bundle.

        The bundle records the backbone's content hash and the crossbar geometry, and refuses to
        load onto anything else. An existing file at ``path`` is replaced only if it is a task
        bundle (or empty): a backbone, a fault map or any other file is refused, so a typo cannot
        destroy the backbone every bundle of it depends on.

        Raises:
            XbmError: ``path`` holds another kind of file, or a task cannot be saved.
        """
        _check_bundle_target(path)
        _refuse_meta(self.model.parameters())
        if isinstance(tasks, str):
            raise XbmError(f"save_bundle: tasks must be a list of task names, got the string "
                           f"{tasks!r}; write tasks=[{tasks!r}]")
        tasks = list(self.tasks) if tasks is None else list(tasks)
        for t in tasks:
            self._require(t)
        twice = sorted({t for t in tasks if tasks.count(t) > 1})
        if twice:  # a bundle holds each task once (loading one twice would fail)
            raise XbmError(f"save_bundle: tasks lists {', '.join(twice)} more than once")
        for t in tasks:  # as load_bundle will check them: refused now, not when loading
            try:
                _check_task_extra(self.tasks[t])
            except TypeError as exc:
                raise XbmError(f"save_bundle: task {t!r}: {exc}; bundles record these fields "
                               "for eval (classes as strings, sizes and seeds as integers)"
                               ) from None
        tensors: dict[str, torch.Tensor] = {}
        for t in tasks:
            sd = self.task_state_dict(t)
            pack = self.methods[t].pack_state
            self._map_layer_states(t, sd, lambda _n, layer, st, local, pack=pack:
                                   pack(layer, st, local))
            # checked as packed, i.e. as loading checks them (XMA2's warm-up sum too)
            bad = next((k for k, v in sd.items() if v.is_floating_point()
                        and not bool(torch.isfinite(v).all())), None)
            if bad is not None:  # a bundle that holds it could not be loaded again
                raise XbmError(f"task {t!r} holds NaN or infinite values ({bad}): it diverged "
                               "in training; retrain it (e.g. at a lower lr), or save the other "
                               "tasks with save_bundle(path, tasks=[...])")
            tensors.update(sd)
        backbone_hash = self.backbone_hash
        stale = self._stale_source(backbone_hash)
        meta = {
            "format": BUNDLE_FORMAT,
            "backbone_hash": backbone_hash,
            "spec": self.spec.to_dict(),
            "arch": {} if "arch" in stale else self.arch,
            "head_name": self.head_name,
            "tasks": [asdict(self.tasks[t]) for t in tasks],
            "content_hash": tensors_hash(tensors),
        }
        if self.backbone_recipe and "backbone_recipe" not in stale:
            meta["backbone_recipe"] = self.backbone_recipe
        if self.backbone_file and "backbone_file" not in stale:
            meta["backbone_file"] = self.backbone_file
        meta["meta_hash"] = metadata_hash(meta)
        save_safetensors(path, tensors, meta)

    def load_bundle(self, path: str | Path) -> list[str]:
        """Add the tasks saved in a bundle; returns their names.

        The active task stays what it was (``set_task`` one of the names to use it), and the
        loaded tasks' parameters are frozen (``requires_grad=False``): they are already
        trained. If anything in the file does not fit (another backbone or crossbar spec, a task
        name this model already has, a corrupt tensor), nothing is added.

        Raises:
            BundleError: the file is not a bundle of this backbone and spec, or is corrupt.
            XbmError: a task of the bundle has the name of a task this model already has.
        """
        tensors, meta, spec, infos = _read_checked_bundle(path, self.head_name)
        if meta.get("backbone_hash") != self.backbone_hash:
            raise BundleError(
                f"{path}: bundle belongs to backbone {meta.get('backbone_hash')}, this model's "
                f"backbone is {self.backbone_hash}; load it onto the backbone it was trained on"
            )
        if spec.geometry_dict() != self.spec.geometry_dict():
            mine = self.spec.geometry_dict()
            diff = [f"{k} {v} against this model's {mine[k]}"
                    for k, v in spec.geometry_dict().items() if mine[k] != v]
            raise BundleError(
                f"{path}: bundle was learned on another crossbar spec ({'; '.join(diff)}); "
                "build the model with the bundle's spec (xbm.multitask.read_bundle_meta returns it)"
            )
        clash = [ti.name for ti in infos if ti.name in self.tasks]
        if clash:
            raise XbmError(f"{path}: this model already has a task named {clash[0]!r}; "
                           "remove_task it first, or load the bundle into a fresh model")
        added: list[str] = []
        active = self._active
        # add_task freezes every other task: the tasks this model had keep their flags
        had = [p for t in self.tasks for p in self._task_params(t)]
        flags = [p.requires_grad for p in had]
        self._loading_bundle = True
        # the tasks' fresh initialisation, overwritten by the saved values below, must not
        # draw from the global RNG: a task added after the load (xbm adapt --bundle, same
        # --seed) started from other values depending on what the bundle held
        cuda = sorted({t.device.index or 0 for t in self.model.parameters() if t.is_cuda})
        try:
            with torch.random.fork_rng(devices=cuda):
                self._add_bundle_tasks(path, tensors, infos, added)
        except BaseException:  # an interrupt (Ctrl-C in a notebook) too
            for t in added:  # leave the model as it was
                self.remove_task(t)
            raise
        else:
            for t in added:
                for p in self._task_params(t):
                    p.requires_grad_(False)
        finally:
            self._loading_bundle = False
            for p, f in zip(had, flags, strict=True):
                p.requires_grad_(f)
            self.set_task(active)
        # kept when saved again (the file this model's backbone was loaded from stays: it is
        # where the backbone is now; a cache entry is never recorded, see load_backbone)
        if self.backbone_recipe is None and isinstance(meta.get("backbone_recipe"), dict):
            self.backbone_recipe = dict(meta["backbone_recipe"])
        if self.backbone_file is None and isinstance(meta.get("backbone_file"), str):
            self.backbone_file = meta["backbone_file"]
        return added

    def _stale_source(self, backbone_hash: str) -> set[str]:
        """The defaults taken from load_backbone's file that no longer describe the backbone:
        its weights changed since (another hash), so the file and recipe are not its; the
        architecture too where the classifier's class count changed (a head swapped)."""
        if not self._from_source or backbone_hash == self._source_hash:
            return set()
        stale = self._from_source - {"arch"}
        head = dict(self.model.named_modules()).get(self.head_name)
        n = getattr(head, "out_features", None)
        if "arch" in self._from_source and n is not None and n != self.arch.get("num_classes"):
            stale.add("arch")
        return stale

    def _add_bundle_tasks(self, path: str | Path, tensors: dict[str, torch.Tensor],
                          infos: list[TaskInfo], added: list[str]) -> None:
        """Add each of a bundle's tasks and load its tensors (checked), appending each name to
        ``added`` as soon as it exists, so that the caller can remove them on failure."""
        for ti in infos:
            self.add_task(ti.name, ti.num_classes, ti.method, dict(ti.config), ti.dataset)
            added.append(ti.name)
            self.tasks[ti.name].extra = dict(ti.extra or {})  # kept when saved again
            unpack = self.methods[ti.name].unpack_state

            def _unpack(lname, layer, st, local, task=ti.name, unpack=unpack):
                try:
                    return unpack(layer, st, local)
                except BundleError as exc:
                    raise BundleError(f"{path}: task {task!r}, layer {lname}: {exc}"
                                      ) from None

            self._map_layer_states(ti.name, tensors, _unpack)
            own = self.task_state_dict(ti.name)
            missing = sorted(set(own) - set(tensors))
            if missing:
                raise BundleError(f"{path}: task {ti.name!r} lacks tensor {missing[0]}"
                                  f"{_LAYER_SET_HINT}")
            for k, v in own.items():
                if tuple(tensors[k].shape) != tuple(v.shape):
                    raise BundleError(
                        f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, expected "
                        f"{tuple(v.shape)}"
                    )
                if tensors[k].dtype != v.dtype:  # load_state_dict would cast it silently
                    raise BundleError(
                        f"{path}: tensor {k} is {tensors[k].dtype}, expected {v.dtype}; the "
                        "file is corrupt or was edited, re-create it with xbm adapt")
                t = tensors[k]
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    # a NaN score switches a column off in the forward but not in the
                    # accounting's eyes, and a NaN head answers nothing
                    raise BundleError(f"{path}: tensor {k} holds NaN or infinite values "
                                      f"(task {ti.name!r} diverged in training?); retrain "
                                      "it, e.g. at a lower lr")
            self.model.load_state_dict({k: tensors[k] for k in own}, strict=False)
        known = {k for t in added for k in self.task_state_dict(t)}
        stray = sorted(set(tensors) - known)
        if stray:
            raise BundleError(f"{path}: bundle has unexpected tensor {stray[0]}"
                              f"{_LAYER_SET_HINT}")
