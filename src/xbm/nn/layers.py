"""Task-aware layers: crossbar Conv2d/Linear, per-task normalisation and per-task heads.

Conversion swaps the class of an existing module in place (see :func:`xbm.nn.convert.apply`), so
the programmed backbone's parameters stay the very same tensors under the very same state-dict
keys. Per-task state lives in an ``xbm_tasks`` ModuleDict keyed by task name (the PEFT pattern),
which is also how bundles find it: any state-dict key containing ``.xbm_tasks.`` is task state,
everything else is the programmed backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from xbm.hardware.mapping import layer_matrix_shape, num_row_tiles
from xbm.hardware.spec import CrossbarSpec

if TYPE_CHECKING:
    from xbm.methods.base import AdaptionMethod

BASE_TASK = "base"
TASK_KEY = "xbm_tasks"

#: Scale the output instead of the weight where a task's column scale acts on a single row tile
#: (``CrossbarLayer.output_scale``), sparing the backward those layers' weight gradient. Off by
#: default: the forward is the same, but the mask gradient is summed in another order, so
#: training takes another floating-point path and every recorded figure would move by noise
#: (and XMA2 at budget 0, which keeps the general path, would no longer equal XMA bit for bit),
#: for a saving measured in docs/benchmarks.md ("Training step of each method", (b), and
#: "Training step on the H200").
#: ``benchmarks/bench_methods.py --fast-path`` times it.
SINGLE_TILE_FAST_PATH = False


class TaskAware:
    """Mixin: holds per-task sub-modules and the name of the active task."""

    active_task: str
    xbm_tasks: nn.ModuleDict

    def _init_task_aware(self) -> None:
        self.active_task = BASE_TASK
        # in the mode of the module it joins (an eval-mode backbone stays all eval)
        self.xbm_tasks = nn.ModuleDict().train(self.training)  # type: ignore[attr-defined]

    def remove_task(self, task: str) -> None:
        if task in self.xbm_tasks:
            del self.xbm_tasks[task]
        if self.active_task == task:
            self.active_task = BASE_TASK


class CrossbarLayer(TaskAware):
    """Shared behaviour of crossbar Conv2d and Linear: frozen programmed weight + task states."""

    is_crossbar_layer = True
    """Read by ``xbm.hardware.mapping.is_convertible`` (which cannot import this module)."""

    weight: nn.Parameter
    spec: CrossbarSpec
    methods: dict[str, AdaptionMethod]
    simulator: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None
    """When set (by xbm.hardware.simulate), forward runs this crossbar-faithful path instead of
    the ideal one-matmul path."""
    matrix_rows: int
    matrix_cols: int

    def _init_crossbar(self, spec: CrossbarSpec) -> None:
        self._init_task_aware()
        self.spec = spec
        self.methods = {}
        self.simulator = None
        self.matrix_rows, self.matrix_cols = layer_matrix_shape(self)  # type: ignore[arg-type]
        self.weight.requires_grad_(False)
        if getattr(self, "bias", None) is not None:
            self.bias.requires_grad_(False)

    @property
    def row_tiles(self) -> int:
        return num_row_tiles(self.matrix_rows, self.spec.rows)

    def add_task_state(self, task: str, method: AdaptionMethod) -> None:
        self.methods[task] = method
        self.xbm_tasks[task] = method.create_layer_state(self)

    def remove_task(self, task: str) -> None:
        super().remove_task(task)
        self.methods.pop(task, None)

    def effective_weight_and_bias(self, task: str | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the chip computes with for ``task`` (the active one by default)."""
        task = self.active_task if task is None else task
        if task == BASE_TASK or task not in self.methods:
            return self.weight, self.bias
        method = self.methods[task]
        state = self.xbm_tasks[task]
        return method.effective_weight(self, state), method.effective_bias(self, state)

    def output_scale(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(programmed weight, per-output scale (Cout,), bias) when the active task's column
        scale can be applied to the layer's output, else None.

        With one row tile a crossbar column is a whole output, so conv(x, W ⊙ m) equals
        conv(x, W) · m[c] (exactly: the scales are 0, 1 or powers of two). Autograd then needs
        no gradient of the frozen W: the mask's gradient is Σ ∂L/∂y · conv(x, W), which costs
        one multiply and a reduction instead of a weight gradient. This is the cheap exact
        gradient the column masks have wherever rows <= R (the stem and 1x1 shortcuts of a
        CIFAR ResNet); for more tiles the per-tile partial sums would have to be kept.
        """
        task = self.active_task
        if (not SINGLE_TILE_FAST_PATH or self.row_tiles != 1 or self.simulator is not None
                or task == BASE_TASK or task not in self.methods):
            return None
        method, state = self.methods[task], self.xbm_tasks[task]
        if not method.pure_column_scale:
            return None
        scale = method.column_scale(self, state)
        if scale is None:
            return None
        return (method.programmed_weight(self, state), scale.reshape(-1),
                method.effective_bias(self, state))

    def spare_weights(self, task: str | None = None) -> torch.Tensor | None:
        """The weights ``task`` keeps in spare crossbars (see
        :meth:`~xbm.methods.AdaptionMethod.spare_weights`), or None."""
        task = self.active_task if task is None else task
        if task == BASE_TASK or task not in self.methods:
            return None
        return self.methods[task].spare_weights(self, self.xbm_tasks[task])

    def chip_view(self, task: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight in the cells, per-column ADC-output scale (row_tiles, Cout) or None, bias) for
        ``task``: what a crossbar-faithful simulation needs. The effective weight equals
        ``apply_column_mask(weight, scale, R)`` when a scale is given."""
        task = self.active_task if task is None else task
        if task == BASE_TASK or task not in self.methods:
            return self.weight, None, self.bias
        method = self.methods[task]
        state = self.xbm_tasks[task]
        return (method.programmed_weight(self, state), method.column_scale(self, state),
                method.effective_bias(self, state))


class CrossbarConv2d(nn.Conv2d, CrossbarLayer):
    """A Conv2d whose weight is programmed into crossbars; tasks change only what they declare."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.simulator is not None:
            return self.simulator(self, x)
        fast = self.output_scale()
        if fast is not None:
            w, scale, b = fast
            y = self._conv_forward(x, w, None) * scale[:, None, None]
            return y if b is None else y + b[:, None, None]
        w, b = self.effective_weight_and_bias()
        return self._conv_forward(x, w, b)


class CrossbarLinear(nn.Linear, CrossbarLayer):
    """A Linear whose weight is programmed into crossbars."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.simulator is not None:
            return self.simulator(self, x)
        fast = self.output_scale()
        if fast is not None:
            w, scale, b = fast
            y = F.linear(x, w) * scale
            return y if b is None else y + b
        w, b = self.effective_weight_and_bias()
        return F.linear(x, w, b)


class TaskBatchNorm(TaskAware):
    """BatchNorm with optional per-task copies.

    The backbone's own BN (the base task's) is always applied in inference mode once converted: its
    running statistics are part of the programmed model and must never drift. A task with
    per-task BN gets its own copy, which trains normally (KSM's convention); a task without one uses
    the frozen base BN (Piggyback's convention).
    """

    def add_task_bn(self, task: str) -> None:
        cls = _BN_PLAIN[type(self)]
        # built in the base's dtype and device: loading float64 values into a float32 copy
        # rounded them, so a fresh task was not exactly the base task
        copy = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                   track_running_stats=self.track_running_stats, **_factory(self))
        state = _bn_base_state(self)
        if self.momentum is None and "num_batches_tracked" in state:
            # a cumulative average: the copy averages the task's own batches, not the
            # backbone's count of pretraining batches (which kept the task's statistics at the
            # backbone's)
            state["num_batches_tracked"].zero_()
        _load_values(copy, state)
        self.xbm_tasks[task] = copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.active_task in self.xbm_tasks:
            return self.xbm_tasks[self.active_task](x)
        self._check_input_dim(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


def _factory(norm: nn.Module) -> dict[str, Any]:
    """The dtype and device of a norm's own tensors (its affine weight, else its statistics),
    for a per-task copy built like it."""
    for k in ("weight", "running_mean"):
        v = getattr(norm, k, None)
        if isinstance(v, torch.Tensor):
            return {"device": v.device, "dtype": v.dtype}
    return {}


def _load_values(copy: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The base norm's values into its per-task copy; a weightless (meta-device) model has
    none to copy, and its copy keeps only the shapes, as the model does (the cost model's
    use)."""
    if any(v.is_meta for v in state.values()):
        return
    copy.load_state_dict(state)


def _bn_base_state(bn: nn.Module) -> dict[str, Any]:
    out = {}
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        v = getattr(bn, k, None)
        if v is not None:
            out[k] = v.detach().clone()
    return out


class TaskBatchNorm2d(TaskBatchNorm, nn.BatchNorm2d):
    """Per-task BatchNorm2d (see :class:`TaskBatchNorm`)."""


class TaskBatchNorm1d(TaskBatchNorm, nn.BatchNorm1d):
    """Per-task BatchNorm1d (see :class:`TaskBatchNorm`)."""


_BN_PLAIN = {TaskBatchNorm2d: nn.BatchNorm2d, TaskBatchNorm1d: nn.BatchNorm1d}


class TaskLayerNorm(nn.LayerNorm, TaskAware):
    """LayerNorm with optional per-task copies (the ViT analogue of per-task BN)."""

    def add_task_bn(self, task: str) -> None:
        copy = nn.LayerNorm(self.normalized_shape, eps=self.eps,
                            elementwise_affine=self.elementwise_affine,
                            bias=self.bias is not None, **_factory(self))
        _load_values(copy, _bn_base_state(self))
        self.xbm_tasks[task] = copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.active_task in self.xbm_tasks:
            return self.xbm_tasks[self.active_task](x)
        return super().forward(x)


class TaskHead(nn.Linear, TaskAware):
    """The classifier: the base task's is the backbone's own; every new task gets a fresh one."""

    def add_task_head(self, task: str, num_classes: int) -> nn.Linear:
        # as the backbone's head: a bias-free classifier's task heads have none either, so an
        # exported task loads into a fresh model of the architecture
        head = nn.Linear(self.in_features, num_classes, bias=self.bias is not None)
        head.to(self.weight.device)
        self.xbm_tasks[task] = head
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.active_task in self.xbm_tasks:
            return self.xbm_tasks[self.active_task](x)
        return super().forward(x)
