"""Method registry and the interface every adaption method implements.

One module per method (PEFT's layout): each defines a config dataclass and a method class, and
registers both by name. The CLI choices, the docs table and the test matrix all come from
:data:`METHODS`, so adding a method is one new module.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from xbm.config import check_number_fields, from_fields, same_definition
from xbm.errors import ConfigError, unknown


@dataclass
class MethodConfig:
    """Fields every method shares. Subclasses add their own, each with a docstring."""

    lr: float = 1e-3
    """Adam learning rate of the task state (scores, masks, weights). The reference recipes use
    1e-4 (Piggyback) / 2e-4 (KSM) over 30 epochs; the offline demo trains ~100x fewer steps, so
    defaults are raised per method (docs/assumptions.md)."""

    head_lr: float = 2e-2
    """Adam learning rate of the task's classifier head and of its per-task normalisation. 2e-2
    rather than the papers' 1e-4/2e-4: the demo gives each task two epochs, not 30. At 47 steps
    per task, 5e-3 / 2e-2 / 5e-2 gave the linear probe 44.7 / 65.4 / - and XBM 68.4 / 74.4 / 72.0;
    at one epoch of 188 steps (session 13) 5e-3 / 2e-2 / 5e-2 / 1e-1 gave the linear probe
    80.9 / 90.9 / 92.8 / 89.6 but XBM 2e-2 / 3e-2 / 5e-2 94.2 / 94.1 / 94.1, so 2e-2 stays
    (docs/benchmarks.md)."""

    per_task_bn: bool = True
    """Give the task its own BatchNorm/LayerNorm (trained). On by default, as KSM (this lab's
    predecessor) does; off reproduces Piggyback's frozen BN. Off, every method loses points on
    the demo (5-11 at one adaption epoch), and Piggyback's ``lr`` must not exceed its default:
    its masks then shift activations that the frozen statistics no longer normalise. At the
    demo's two epochs Piggyback reached 96.2% at 5e-4 and at 3e-4 and collapsed to 54% at 1e-3,
    against 98.2% with per-task BN (three seeds; docs/benchmarks.md, "Piggyback's own
    recipe")."""

    weight_decay: float = 0.0
    """Adam weight decay (0 in Piggyback and KSM)."""

    def __post_init__(self) -> None:
        check_number_fields(self)
        name = type(self).__name__
        for f in ("lr", "head_lr"):
            v = getattr(self, f)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v)
                                           and v > 0):
                raise ConfigError(f"{name}.{f} must be > 0, got {v!r}")
            if v > 1e3:  # 1e38 overflowed float32 inside Adam (a traceback); 1e308 ran on inf
                raise ConfigError(f"{name}.{f} must be at most 1e3, got {v!r}")
        if isinstance(self.weight_decay, bool) or not (
                isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay <= 1e3):
            # 1e39 overflowed float32 inside Adam (a traceback), as lr did
            raise ConfigError(f"{name}.weight_decay must be a number in [0, 1e3], got "
                              f"{self.weight_decay!r}")
        if not isinstance(self.per_task_bn, bool):
            raise ConfigError(f"{name}.per_task_bn must be true or false, got "
                              f"{self.per_task_bn!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        return from_fields(cls, d)


class AdaptionMethod:
    """How one task adapts a crossbar layer.

    A method creates per-layer task state, computes the effective weight the chip applies for the
    task, and accounts for what the task costs: mask bits and re-programmed cells.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    reprograms_cells: ClassVar[bool] = False
    """True if deploying a task rewrites programmed cells (fine-tuning, Piggyback, ...)."""
    trains_backbone_weights: ClassVar[bool] = False
    description: ClassVar[str] = ""
    pure_column_scale: ClassVar[bool] = False
    """True if :meth:`effective_weight` is exactly ``apply_column_mask(programmed_weight,
    column_scale)`` with no side effects, so a single-row-tile layer may scale its output
    instead (``CrossbarLayer.output_scale``). Off where the forward also gathers statistics."""
    graph_safe: ClassVar[bool] = True
    """True if, once :meth:`graph_ready`, a training step of this method is the same kernels
    every time, with no host-side logic (Python counters, reads of device values), so
    ``train_task(cuda_graph=True)`` may capture it once as a CUDA graph and replay it. False
    falls back to eager steps."""

    def __init__(self, config: MethodConfig | None = None) -> None:
        # exactly the method's own config class: a subclass's extra fields (XMA2Config given to
        # xma) would do nothing here and make the saved bundle unreadable
        if config is not None and type(config) is not self.config_class:
            raise ConfigError(
                f"method {self.name!r} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
                + ("; its extra fields would be ignored" if isinstance(config, self.config_class)
                   else ""))
        # a copy: a config edited after add_task (say, to reuse it for the next task) must not
        # change a task already added, nor what its bundle records; built anew from its fields,
        # so that one edited after construction (c.levels = [0, 3]) is checked again here,
        # not found when its bundle fails to load
        self.config = type(config).from_dict(config.to_dict()) if config is not None \
            else self.config_class()

    def __deepcopy__(self, memo: dict[int, Any]) -> AdaptionMethod:
        # a copy serves no task yet (a MultiTaskModel copied whole marks its copies again)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "_xbm_serves":
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def __copy__(self) -> AdaptionMethod:
        # a shallow copy is a deep one: a copy shares no container (XMA2's layer list) with
        # the object it came from, which may serve a task in another model
        return copy.deepcopy(self)

    def __getstate__(self) -> dict[str, Any]:
        # pickling (torch.save of a whole MultiTaskModel) as deepcopy: the weak reference to the
        # model served cannot be pickled, and MultiTaskModel.__setstate__ marks the copy again
        return {k: v for k, v in self.__dict__.items() if k != "_xbm_serves"}

    def _forget_layers(self) -> None:
        """Drop what this object keeps of another model's layers before it serves a task
        (``add_task`` takes an object whose model is gone, or a copy of one): none by
        default."""

    # -- per-layer state ---------------------------------------------------------------------
    def create_layer_state(self, layer: nn.Module) -> nn.Module:
        """Per-task parameters for one crossbar layer (an empty module when there are none)."""
        return nn.Module()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.config!r})"

    def effective_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        """The weight the chip computes with for this task."""
        return layer.weight

    def effective_bias(self, layer: nn.Module, state: nn.Module) -> torch.Tensor | None:
        return layer.bias

    # -- accounting -------------------------------------------------------------------------
    def programmed_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        """The weight held in the cells while this task runs (what a faithful simulation reads).

        Equals :meth:`effective_weight` unless the method scales columns after the ADC.
        """
        return self.effective_weight(layer, state)

    def spare_weights(self, layer: nn.Module, state: nn.Module) -> torch.Tensor | None:
        """Bool mask (the weight's shape) of the weights this task keeps in spare crossbars
        rather than the backbone's (XMA2's spare PEs): the chip's fault map and programming
        variation, drawn per backbone cell, do not apply to them. None: every weight of
        :meth:`programmed_weight` sits in the backbone's cells."""
        return None

    def column_scale(self, layer: nn.Module, state: nn.Module) -> torch.Tensor | None:
        """Per crossbar column factor (row_tiles, Cout) applied to the digitised partial sums, or
        None. Column methods act here, on the ADC outputs, never on the cells."""
        return None

    def mask_bits(self, layer: nn.Module, state: nn.Module) -> int:
        """Bits of mask memory the task needs in this layer."""
        return 0

    def planned_mask_bits(self, layer: nn.Module, state: nn.Module,
                          rewrite_fraction: float) -> int:
        """Mask bits of a task that will re-program ``rewrite_fraction`` of the layer's crossbar
        columns (row tile x output; whole PEs for XMA2), estimated from a fresh state (``xbm
        cost --model`` has no trained task, and no weights). Default: :meth:`mask_bits` of that
        state."""
        return self.mask_bits(layer, state)

    def reprogrammed_cells(self, layer: nn.Module, state: nn.Module) -> int:
        """Cells that must be rewritten to deploy this task on the programmed backbone."""
        return 0

    def masked_off_columns(self, layer: nn.Module, state: nn.Module) -> int:
        """Crossbar columns (row tile x output) the task switches off (no ADC conversion)."""
        return 0

    def trainable_count(self, layer: nn.Module, state: nn.Module) -> int:
        """Task parameters in this layer that actually learn: every element of the state by
        default. A method that holds a dense copy but trains only part of it (XMA2's selected
        PEs) counts that part, so the demo's trainable column is not inflated by storage."""
        return sum(p.numel() for p in state.parameters())

    # -- bundles ----------------------------------------------------------------------------
    def pack_state(self, layer: nn.Module, state: nn.Module, tensors: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
        """The bundle form of one layer's task tensors (keys relative to ``state``).

        Identity by default. A method that allocates dense storage but learns only part of it
        (XMA2's weight copy) stores the part, so a bundle's size follows what the task learned.
        """
        return tensors

    def unpack_state(self, layer: nn.Module, state: nn.Module, tensors: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`pack_state`; raise :class:`~xbm.errors.BundleError` on bad input."""
        return tensors

    # -- training hooks ---------------------------------------------------------------------
    def graph_ready(self) -> bool:
        """Whether the next training steps are static enough to capture (see ``graph_safe``).
        A method whose first steps run host-side logic (XMA2's warm-up and PE selection) says
        False until they are done; ``train_task`` runs those eagerly and captures afterwards."""
        return True

    def param_groups(self, state_params: list[nn.Parameter]) -> list[dict[str, Any]]:
        """Optimizer groups for the task state (head and norms are added by the trainer)."""
        if not state_params:
            return []
        return [{"params": state_params, "lr": self.config.lr}]

    def on_task_start(self, model: nn.Module, task: str) -> None:
        """Called before training (warnings about a training recipe belong here, not in the
        config, which is also built when a trained task is loaded)."""

    def on_task_end(self, model: nn.Module, task: str) -> None:
        """Called after training (PackNet-style methods prune or freeze here)."""


METHODS: dict[str, type[AdaptionMethod]] = {}


def register_method(name: str) -> Callable[[type[AdaptionMethod]], type[AdaptionMethod]]:
    """Class decorator: register a method under ``name`` (docs/methods.md, "Your own method").

    The same class registered again (a notebook cell or a module re-run) replaces the earlier
    registration; another class under a taken name is an error.

    Raises:
        ValueError: ``name`` is taken by another class (a programming error, not a user one).
    """

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) \
            or name == "base":
        raise ValueError(f"method name {name!r} is invalid: use 1-64 letters, digits, '-' or "
                         "'_' ('base' is the backbone's own task)")

    def deco(cls: type[AdaptionMethod]) -> type[AdaptionMethod]:
        _check_config_class(name, getattr(cls, "config_class", None))
        old = METHODS.get(name)
        if old is not None and not same_definition(old, cls):
            raise ValueError(f"method {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__}; pick another name")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def _check_config_class(name: str, cfg: object) -> None:
    """A method's ``config_class`` must be a ``MethodConfig`` dataclass of its own: a plain
    class failed at ``add_task`` with an AttributeError, and a subclass without ``@dataclass``
    kept its parent's defaults, silently ignoring the ones it set."""
    import dataclasses

    if not (isinstance(cfg, type) and issubclass(cfg, MethodConfig)):
        raise ValueError(f"method {name!r}: config_class must be a subclass of "
                         f"xbm.methods.MethodConfig (a @dataclass), got {cfg!r}")
    import inspect

    mine = vars(cfg)
    fields = {f.name for f in dataclasses.fields(cfg)}
    notes = {k: a for k, a in inspect.get_annotations(cfg).items()  # its own, not inherited
             if "ClassVar" not in str(a)}  # a ClassVar is no field: fine without @dataclass
    own = set(notes) | {k for k in mine if k in fields}
    if own and "__dataclass_fields__" not in mine:
        raise ValueError(f"method {name!r}: config_class {cfg.__qualname__} sets "
                         f"{', '.join(sorted(own))} but is not a @dataclass itself, so its "
                         "values would be ignored; decorate it with @dataclass")


def list_methods() -> list[str]:
    """The registered method names, in registration order (the CLI's and the docs' order)."""
    return list(METHODS)


def get_method_class(name: str) -> type[AdaptionMethod]:
    """The method class registered as ``name``; its ``config_class`` is its config dataclass.

    Raises:
        UnknownNameError: no such method (the message lists the registered ones).
        ConfigError: ``name`` is not a string (a config or a class in the method's place).
    """
    if not isinstance(name, str):
        hint = ("a config goes in config=, e.g. add_task(NAME, NUM_CLASSES, 'xma', "
                "config=XMAConfig(lr=0.3))" if isinstance(name, (MethodConfig, dict)) else
                f"pass its registered name, {name.name!r}" if isinstance(name, type) and
                issubclass(name, AdaptionMethod) and getattr(name, "name", None) else
                "pass a registered name, e.g. 'xbm'")
        raise ConfigError(f"a method is named by a string, got {type(name).__name__} "
                          f"{_short_repr(name)}: {hint}")
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def _short_repr(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def create_method(name: str, config: MethodConfig | dict[str, Any] | None = None
                  ) -> AdaptionMethod:
    """Instantiate a registered method, with a config object, a dict of fields, or defaults."""
    cls = get_method_class(name)
    if isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    return cls(config)


def binarize(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """score > threshold -> 1, else 0, in the scores' dtype (no autograd)."""
    return (scores > threshold).to(scores.dtype)


class BinarizeSTE(torch.autograd.Function):
    """score > threshold -> {0, 1}; the backward is the identity (Piggyback's estimator)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return binarize(scores, threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@dataclass
class MaskConfig(MethodConfig):
    """Shared fields of the score-based binary mask methods (Piggyback's recipe)."""

    mask_init: float = 1e-2
    """Initial real-valued score (Piggyback and KSM: 1e-2, so every mask starts on)."""

    threshold: float = 5e-3
    """Scores above this are 1 (Piggyback and KSM: 5e-3)."""

    lr: float = field(default=1e-3)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_init <= self.threshold:
            raise ConfigError(
                f"{type(self).__name__}.mask_init ({self.mask_init}) must exceed threshold "
                f"({self.threshold}) so that every mask starts on"
            )
