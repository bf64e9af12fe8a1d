"""Hardware cost of multi-task adaption: event counts times cited constants.

The model has three layers, each a plain function of the one below, so every number in a report
can be traced back to an event count and the constant it was multiplied by:

1. **Facts** (:class:`LayerFacts`): what one task of one method does to one crossbar layer: mask
   bits, cells re-programmed to deploy it, cells that differ from another task's programmed state,
   crossbar columns switched off, cells rewritten during on-chip training. They come from a learned
   task (:func:`task_facts`, exact, read through the method's own accounting hooks) or, with no
   weights at all, from the method's class plus documented default fractions
   (:func:`default_facts`, see :data:`METHOD_DEFAULTS`).
2. **Events** (:func:`layer_events`): crossbar cell reads, DAC drives, ADC conversions (none for a
   switched-off column), shift-and-adds per image; write pulses, verify reads and mask-bit writes
   per deployment, switch and on-chip adaption. Counts follow from the mapping (rows, columns,
   tiles), the spec (slices, input cycles) and the output positions of each layer.
3. **Energy and latency** (:func:`method_cost`): each count times one constant of an
   :class:`~xbm.hardware.energy.EnergyPreset`, kept together as a :class:`Term`.

Settings: *deploy* (trained off-chip, then programmed: re-program what the method changed, write
its mask), *switch* (from one learned task to another), *inference* (per image) and *on-chip*
adaption (N training iterations on the chip: forward and backward crossbar passes plus the
re-programming every update implies). See ``docs/cost-model.md`` for the formulas and sources.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xbm.errors import ConfigError, XbmError, XbmWarning, user_stacklevel
from xbm.hardware.energy import EnergyPreset, get_preset
from xbm.hardware.mapping import (
    LayerMapping,
    MappingReport,
    column_tile_index,
    map_model,
    weight_matrix,
)
from xbm.hardware.spec import CrossbarSpec

if TYPE_CHECKING:
    from xbm.multitask import MultiTaskModel

BASE = "base"


# -- terms --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    """One event count times one constant: the atom of every reported energy or time."""

    events: float
    """How many times the event happens."""
    unit: float
    """Energy (J) or time (s) per event."""
    constant: str
    """Which preset constant (or derived constant) ``unit`` is."""

    @property
    def value(self) -> float:
        return float(self.events) * self.unit

    def scaled(self, k: float) -> Term:
        """The same event happening ``k`` times as often."""
        return replace(self, events=self.events * k)

    def to_dict(self) -> dict[str, Any]:
        return {"events": _num(self.events), "per_event": self.unit, "constant": self.constant,
                "value": self.value}


def _num(x: float) -> int | float:
    """Integral floats as ints, so JSON shows exact counts."""
    if isinstance(x, int):
        return x
    return int(x) if float(x).is_integer() and abs(x) < 2 ** 63 else float(x)


def _sum(terms: dict[str, Term]) -> float:
    return float(sum(t.value for t in terms.values()))


# -- method defaults (no weights) -----------------------------------------------------------
@dataclass(frozen=True)
class MethodDefaults:
    """What a method does to the chip when no learned task is at hand (``xbm cost --model``).

    Only the numbers that depend on learned values live here; mask bits always come from the
    method's own ``mask_bits`` hook, evaluated on a weightless (meta-device) copy of the model.
    """

    rewrite_fraction: float = 0.0
    """Fraction of a layer's weights whose cells are re-programmed to deploy a task."""
    rewrite_flag: str = ""
    """The ``xbm cost`` flag that sets ``rewrite_fraction``."""
    column_off_fraction: float = 0.0
    """Fraction of crossbar columns (row tile x output) the task switches off (no conversion)."""
    switch: str = "update"
    """How two tasks' programmed states differ. ``mask``: each zeroes an independent random
    subset of fraction f, so 2f(1-f) of the weights differ (Piggyback: restore A's zeros, zero B's);
    ``update``: each writes new values into fraction f, so 1-(1-f)^2 differ (the union)."""
    onchip: str = "per-update"
    """Re-programming during on-chip adaption. ``per-update``: every optimiser step rewrites the
    changed fraction (weights move every step); ``flips``: a weight's cells are rewritten when its
    binary mask flips, ``churn`` flips per finally-masked weight in total."""
    config_fraction: str = ""
    """A field of the method's config whose default is the rewrite fraction (XMA2: ``pe_budget``),
    so the cost default follows the method's own default."""
    config_fraction_of: str = "weights"
    """What ``config_fraction`` is a fraction of: ``weights``, or ``pes`` (XMA2's ``pe_budget``:
    the method re-programs K = floor(f x PEs) whole PEs of the model, so a small model's K is 0;
    priced as K full PEs, which gradient saliency, a sum over a PE, favours)."""
    pattern: str = "scattered"
    """Where rewritten cells sit, for write latency: ``scattered`` (uniformly random weights, so
    most crossbar rows are touched) or ``packed`` (whole rows/PEs, as XMA2's PE re-programming)."""
    note: str = ""


METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    "finetune": MethodDefaults(
        rewrite_fraction=1.0, rewrite_flag="--finetune-changed-fraction", switch="update",
        onchip="per-update",
        note="every weight trains, so every weight's cells change (upper bound; a quantised chip "
             "skips updates below one LSB)"),
    "linear-probe": MethodDefaults(note="only the digital head (and BN) is per task"),
    "piggyback": MethodDefaults(
        rewrite_fraction=0.10, rewrite_flag="--piggyback-off-fraction", switch="mask",
        onchip="flips",
        note="masked-off weights' cells are re-programmed to zero conductance; the fraction is "
             "an uncalibrated default, measure it with --fractions-from BUNDLE"),
    "xbm": MethodDefaults(
        column_off_fraction=0.10,
        note="column mask gates ADC outputs; no cell is ever rewritten"),
    "xma": MethodDefaults(
        column_off_fraction=0.10,
        note="shift-based column scaling in the shift-and-add unit; level 0 skips the column"),
    "xma2": MethodDefaults(
        rewrite_fraction=0.10, rewrite_flag="--fraction xma2=F", column_off_fraction=0.10,
        switch="update", onchip="per-update", pattern="packed", config_fraction="pe_budget",
        config_fraction_of="pes",
        note="tier-1 PEs (K = floor(XMA2Config.pe_budget x PEs) of the model, priced as full "
             "PEs) are fine-tuned and re-programmed"),
    "xst": MethodDefaults(
        rewrite_fraction=0.10, rewrite_flag="--fraction xst=F", switch="update",
        onchip="per-update", pattern="packed",
        note="re-grown columns are re-programmed; pruned columns are switched off, not reset"),
}
"""Defaults by method name. A method not listed falls back to: no rewrites if its class says
``reprograms_cells = False``, else every weight rewritten (fraction 1.0, an upper bound), flagged
in the report; override with ``--fraction NAME=F`` / ``--off-fraction NAME=F``."""


def method_defaults(name: str) -> tuple[MethodDefaults, bool]:
    """(defaults, known) for a method name; unknown names get the class-driven fallback."""
    if name in METHOD_DEFAULTS:
        return METHOD_DEFAULTS[name], True
    from xbm.methods import get_method_class

    cls = get_method_class(name)
    if cls.reprograms_cells:
        return MethodDefaults(rewrite_fraction=1.0, rewrite_flag=f"--fraction {name}=F",
                              note="no defaults known for this method: every weight assumed "
                                   "rewritten (upper bound)"), False
    return MethodDefaults(note="no defaults known; the class declares no re-programming"), False


def switches_off_columns(name: str) -> bool:
    """Whether method ``name`` has a per-column mask (its class overrides ``column_scale``), so
    that a share of its crossbar columns can be switched off. A name that is not registered
    keeps its table default."""
    from xbm.errors import UnknownNameError
    from xbm.methods import AdaptionMethod, get_method_class

    try:
        cls = get_method_class(name)
    except UnknownNameError:
        return True
    return cls.column_scale is not AdaptionMethod.column_scale


MAX_WORKLOAD = 10**12
"""Upper bound on ``iterations`` and ``batch_size``: a trillion is past any training run, and
event counts beyond it reach float overflow on large models."""


def _short_int(v: int) -> str:
    s = str(v)
    return s if len(s) <= 24 else f"{s[:8]}...({len(s)} digits)"


@dataclass
class Assumptions:
    """The workload and the defaults that stand in for learned values."""

    rewrite_fraction: dict[str, float] = field(default_factory=dict)
    """Per method name: overrides :attr:`MethodDefaults.rewrite_fraction`."""
    column_off_fraction: dict[str, float] = field(default_factory=dict)
    """Per method name: overrides :attr:`MethodDefaults.column_off_fraction`. A method without
    a column mask (Piggyback, fine-tuning, the linear probe) switches off no column: its entry
    is not priced and not reported (``xbm cost --off-fraction`` refuses it)."""
    iterations: int = 1913
    """On-chip training iterations. 1913 = 30 epochs (Piggyback's recipe) x 2040 Flowers-102
    train+val images / batch 32 = 1912.5, rounded up; Flowers-102 is the smallest of the
    fine-grained benchmark's datasets. (A loader that keeps the last partial batch takes
    ceil(2040/32) = 64 batches per epoch, 1920 iterations: 0.4% more.)"""
    batch_size: int = 32
    """Images per iteration (Piggyback and KSM: 32)."""
    backward_factor: float = 1.0
    """Crossbar passes of the backward step per forward pass: 1 = one transposed read for the
    activation gradient (NeuroSim V2.1's bidirectional sub-arrays). Weight/score gradients are
    digital and not counted."""
    churn: float = 1.0
    """Mask flips per finally-masked weight during on-chip training (methods with onchip =
    ``flips``). 1 = each crosses the threshold once: a lower bound."""
    training_skips_off_columns: bool = False
    """Whether on-chip training skips the ADC conversions of switched-off columns, as inference
    does. Off (the default since session 17): the straight-through score gradient of a
    switched-off column is the sum of output gradient x that column's partial sum, so training
    converts every column, and a column mask saves conversions at inference only. On: the
    accounting before session 17, which credited on-chip XBM with the skipped conversions."""

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
            if v > MAX_WORKLOAD:  # far beyond any run; larger ones overflow the float sums
                raise ConfigError(f"{name} must be at most {MAX_WORKLOAD:.0e}, got "
                                  f"{_short_int(v)}")
        if not isinstance(self.training_skips_off_columns, bool):
            raise ConfigError("training_skips_off_columns must be true or false, got "
                              f"{self.training_skips_off_columns!r}")
        for name in ("backward_factor", "churn"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ConfigError(f"{name} must be >= 0, got {v!r}")
        for kind in ("rewrite_fraction", "column_off_fraction"):
            for m, v in getattr(self, kind).items():
                if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                    raise ConfigError(f"{kind} of {m!r} must be in [0, 1], got {v!r}")

    def rewrite(self, name: str) -> float:
        if name in self.rewrite_fraction:
            return self.rewrite_fraction[name]
        d = method_defaults(name)[0]
        if d.config_fraction:
            from xbm.methods import get_method_class

            v = getattr(get_method_class(name).config_class(), d.config_fraction, None)
            if isinstance(v, (int, float)):
                return float(v)
        return d.rewrite_fraction

    def applied_rewrite(self, name: str, mapping: MappingReport | None = None,
                        of: str = "weights") -> float:
        """The fraction of weights a task of ``name`` re-programs: :meth:`rewrite`, or 0 for a
        method that never re-programs cells, whatever fraction is configured for it. With the
        model's ``mapping``, a default that counts PEs (XMA2's ``pe_budget``) becomes the
        fraction of weights (or, ``of="columns"``, of crossbar columns, which is what mask bits
        count) in the K whole PEs the method selects (:func:`pe_budget_fraction`)."""
        from xbm.methods import get_method_class

        if not get_method_class(name).reprograms_cells:
            return 0.0
        f = self.rewrite(name)
        d = method_defaults(name)[0]
        if mapping is not None and name not in self.rewrite_fraction and \
                d.config_fraction and d.config_fraction_of == "pes":
            return pe_budget_fraction(mapping, f, of)
        return f

    def column_off(self, name: str) -> float:
        """The share of crossbar columns a task of ``name`` switches off, or 0 for a method
        without a column mask (Piggyback, fine-tuning), whatever fraction is configured for it:
        as :meth:`applied_rewrite` is 0 for a method that re-programs nothing."""
        if not switches_off_columns(name):
            return 0.0
        return self.column_off_fraction.get(name, method_defaults(name)[0].column_off_fraction)

    def to_dict(self) -> dict[str, Any]:
        return {"rewrite_fraction": dict(self.rewrite_fraction),
                "column_off_fraction": {m: v for m, v in self.column_off_fraction.items()
                                        if switches_off_columns(m)},  # what was priced
                "iterations": self.iterations, "batch_size": self.batch_size,
                "backward_factor": self.backward_factor, "churn": self.churn,
                "training_skips_off_columns": self.training_skips_off_columns}


# -- facts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFacts:
    """What one task does to one crossbar layer (all counts, no energy)."""

    name: str
    mask_bits: int
    """Mask memory the task needs in this layer (bits)."""
    reprogrammed_cells: int
    """Cells rewritten to deploy the task on the backbone as programmed."""
    reprogrammed_rows: float
    """Crossbar rows those writes touch (write latency: one row per pulse train)."""
    switch_cells: int
    """Cells that differ between the reference task's programmed state and this task's."""
    switch_rows: float
    """Crossbar rows the switch writes touch."""
    masked_off_columns: int
    """Crossbar columns (row tile x output) switched off: no ADC conversion."""
    onchip_cells: float
    """Cells rewritten over the whole on-chip adaption."""
    onchip_rows: float
    """Crossbar rows rewritten over the whole on-chip adaption (summed over updates)."""


def row_slots(lm: LayerMapping) -> int:
    """Crossbar rows holding this layer: every matrix row appears once per column tile."""
    return lm.rows * lm.col_tiles


def touched_rows(lm: LayerMapping, p: float, pattern: str = "scattered") -> float:
    """Expected crossbar rows touched when a fraction ``p`` of the layer's weights is rewritten.

    ``scattered``: a crossbar row of column tile t holds that tile's w_t weights, each
    rewritten independently with probability p, so it is touched with probability
    1 - (1 - p)^w_t (a ragged last tile's rows hold fewer weights, so are touched less often).
    ``packed``: rewritten weights fill whole rows, p x rows.
    """
    p = min(max(p, 0.0), 1.0)
    slots = row_slots(lm)
    if p == 0:
        return 0.0
    if pattern == "packed":
        return p * slots
    return lm.rows * sum(1.0 - (1.0 - p) ** w for w in lm.tile_columns())


def pe_budget_fraction(mapping: MappingReport, budget: float, of: str = "weights") -> float:
    """What a PE budget re-programs: K = floor(budget x PEs) PEs of the whole model (XMA2's rule,
    ``XMA2._choose``), each taken as a full PE (pe_rows row tiles of R rows by pe_cols crossbars
    of logical columns), as a fraction of the model's ``weights`` or of its crossbar
    ``columns`` (row tile x output), capped at 1."""
    spec = mapping.spec
    k = math.floor(budget * sum(lm.pes for lm in mapping.layers) + 1e-9)
    if of == "columns":
        full = spec.pe_rows * spec.pe_cols * spec.logical_cols
        total = sum(lm.row_tiles * lm.cols for lm in mapping.layers)
    elif of == "weights":
        full = spec.pe_rows * spec.rows * spec.pe_cols * spec.logical_cols
        total = sum(lm.weights for lm in mapping.layers)
    else:
        raise ValueError(f"of must be 'weights' or 'columns', got {of!r}")
    return min(1.0, k * full / total) if total else 0.0


def default_facts(name: str, mapping: MappingReport, mask_bits: dict[str, int],
                  assumptions: Assumptions) -> list[LayerFacts]:
    """Facts of a typical task of method ``name`` without weights (documented defaults).

    Args:
        name: a registered method.
        mapping: the model's mapping under the spec.
        mask_bits: per layer, the method's ``mask_bits`` (from :func:`meta_mask_bits`).
        assumptions: fractions and workload.
    """
    d, _ = method_defaults(name)
    f = assumptions.applied_rewrite(name, mapping)
    off = assumptions.column_off(name)
    cpw = mapping.spec.cells_per_weight
    sf = 2 * f * (1 - f) if d.switch == "mask" else 1 - (1 - f) ** 2
    n = assumptions.iterations
    out = []
    for lm in mapping.layers:
        w = lm.weights
        deploy = round(f * w)
        switch = round(sf * w)
        if d.onchip == "flips":
            onchip_cells = assumptions.churn * deploy * cpw
            p_step = min(1.0, assumptions.churn * f / n)
            onchip_rows = n * touched_rows(lm, p_step, d.pattern)
        else:
            onchip_cells = float(n * deploy * cpw)
            onchip_rows = n * touched_rows(lm, f, d.pattern)
        out.append(LayerFacts(
            name=lm.name,
            mask_bits=int(mask_bits.get(lm.name, 0)),
            reprogrammed_cells=deploy * cpw,
            reprogrammed_rows=touched_rows(lm, f, d.pattern),
            switch_cells=switch * cpw,
            switch_rows=touched_rows(lm, sf, d.pattern),
            masked_off_columns=round(off * lm.row_tiles * lm.cols),
            onchip_cells=onchip_cells,
            onchip_rows=onchip_rows,
        ))
    return out


def _diff_rows(diff: torch.Tensor, spec: CrossbarSpec) -> int:
    """Crossbar rows holding at least one differing weight; ``diff`` is (Cout, rows) bool.

    Output c's cells sit in column tile c // logical_cols (whole weights per crossbar); every
    matrix row appears once per column tile.
    """
    if not bool(diff.any()):
        return 0
    tile = column_tile_index(diff.shape[0], spec, device=diff.device)
    touched = 0
    for t in torch.unique(tile).tolist():
        touched += int(diff[tile == t].any(dim=0).sum())
    return touched


def cells_view(layer: nn.Module, task: str) -> torch.Tensor:
    """The weights held in ``layer``'s own crossbar cells while ``task`` runs.

    A method may define ``backbone_cells(layer, state)`` when it writes somewhere other than the
    backbone's cells (XMA2's spare PEs); otherwise its ``programmed_weight`` is what the cells hold.
    """
    if task == BASE or task not in getattr(layer, "methods", {}):
        return layer.weight
    method = layer.methods[task]
    state = layer.xbm_tasks[task]
    fn = getattr(method, "backbone_cells", None)
    return fn(layer, state) if fn is not None else method.programmed_weight(layer, state)


def task_facts(mtm: MultiTaskModel, task: str, reference: str = BASE,
               assumptions: Assumptions | None = None) -> list[LayerFacts]:
    """Exact facts of a learned task, read through the method's accounting hooks.

    Deploy counts are the method's own ``reprogrammed_cells``; switch counts compare the weights
    held in the cells (:func:`cells_view`) for ``reference`` and for ``task`` weight by weight, so
    they hold for any pair of tasks and any method (a column mask never changes the cells).
    """
    a = assumptions or Assumptions()
    if task == BASE:
        raise XbmError(f"{BASE!r} is the backbone as programmed: it costs nothing to deploy; "
                       "name a learned task (and pass base as reference= to switch from it)")
    method = mtm.methods.get(task)
    if method is None:
        raise XbmError(f"unknown task {task!r}; this model has: "
                       f"{', '.join(mtm.task_names(True))}")
    if reference != BASE and reference not in mtm.tasks:
        raise XbmError(f"unknown reference task {reference!r}; this model has: "
                       f"{', '.join(mtm.task_names(True))}")
    d, _ = method_defaults(method.name)
    spec = mtm.spec
    cpw = spec.cells_per_weight
    n = a.iterations
    mapping = {lm.name: lm for lm in mtm.mapping().layers}
    out = []
    with torch.no_grad():
        for lname, layer, st in mtm.layer_states(task):
            lm = mapping[lname]
            bits = int(method.mask_bits(layer, st))
            cells = int(method.reprogrammed_cells(layer, st))
            off = int(method.masked_off_columns(layer, st))
            w_task = weight_matrix(cells_view(layer, task))
            base_diff = w_task != weight_matrix(layer.weight)
            sw_diff = w_task != weight_matrix(cells_view(layer, reference))
            f = cells / max(lm.weights * cpw, 1)
            rows = float(_diff_rows(base_diff, spec)) if cells else 0.0
            if cells and rows == 0:  # rewrites that leave values unchanged (e.g. zero weights)
                rows = touched_rows(lm, f, d.pattern)
            if d.onchip == "flips":
                onchip_cells = a.churn * cells
                onchip_rows = n * touched_rows(lm, min(1.0, a.churn * f / n), d.pattern)
            else:
                onchip_cells = float(n * cells)
                onchip_rows = n * rows
            out.append(LayerFacts(
                name=lname, mask_bits=bits, reprogrammed_cells=cells, reprogrammed_rows=rows,
                switch_cells=int(sw_diff.sum()) * cpw,
                switch_rows=float(_diff_rows(sw_diff, spec)),
                masked_off_columns=off, onchip_cells=onchip_cells, onchip_rows=onchip_rows,
            ))
    return out


# -- the weightless model context ----------------------------------------------------------
def default_input_size(model_name: str) -> int:
    """224 for models whose factory defaults to 3 channels (ImageNet layouts), else 28."""
    import inspect

    from xbm.models.registry import _factory

    p = inspect.signature(_factory(model_name)).parameters.get("in_channels")
    return 224 if p is not None and p.default == 3 else 28


def default_in_channels(model_name: str) -> int:
    import inspect

    from xbm.models.registry import _factory

    p = inspect.signature(_factory(model_name)).parameters.get("in_channels")
    return int(p.default) if p is not None and isinstance(p.default, int) else 3


def output_positions(model: nn.Module, input_shape: tuple[int, ...],
                     names: Iterable[str]) -> dict[str, int]:
    """Output positions per image of each named Conv2d/Linear: H_out x W_out for a conv, the
    number of rows a Linear sees (tokens) otherwise. Runs one forward pass with hooks; works on
    the meta device, so no weights are needed."""
    wanted = set(names)
    found: dict[str, int] = {}
    hooks = []
    model = _shape_twin(model, input_shape)
    for n, mod in model.named_modules():
        if n in wanted:
            def hook(m: nn.Module, inp: Any, out: torch.Tensor, n: str = n) -> None:
                if isinstance(m, nn.Conv2d):
                    found[n] = int(out.shape[-1] * out.shape[-2])
                else:
                    found[n] = int(out.numel() // (out.shape[0] * out.shape[-1]))
            hooks.append(mod.register_forward_hook(hook))
    try:
        from xbm.nn.modes import eval_mode

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # eval mode: a training-mode BatchNorm refuses a batch of one where the last feature map
        # is 1 x 1 (a VGG at 28 px, a ResNet at 8 px), and shapes do not depend on the mode
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(*input_shape, device=device))
    except Exception as exc:
        raise XbmError(f"cannot run the model on a {tuple(input_shape)} input to count output "
                       f"positions ({type(exc).__name__}: {exc}); pass an input size and "
                       "channel count that the model accepts (xbm cost: --input-size / "
                       "--in-channels; in Python: input_size= / in_channels=)") from None
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(wanted - set(found))
    if missing:
        raise XbmError(f"layer {missing[0]} did not run in the forward pass; its output "
                       "positions are unknown")
    return found


#: Largest weightless model (parameters and buffers, in elements) that :func:`output_positions`
#: materialises on the CPU to count positions: a forward on the meta device goes through
#: torch's decompositions, whose first use imports TorchDynamo (1.4-2.3 s per `xbm cost`), while
#: a zero-filled CPU twin of a ResNet-50 (25.6 M) takes 100 MB and a tenth of a second.
CPU_SHAPE_PASS_ELEMENTS = 64_000_000
#: Largest input (elements) the CPU shape pass takes: activations grow with it (`xbm cost
#: --input-size 100000` allocated 40 GB); beyond it the meta device counts, with no memory.
CPU_SHAPE_PASS_INPUT = 3 * 1024 * 1024


def _shape_twin(model: nn.Module, input_shape: tuple[int, ...] = ()) -> nn.Module:
    """``model`` itself, or for a weightless (meta) model small enough, a zero-filled CPU copy
    with the same module names: output shapes need no weights, and the CPU runs them faster
    than the meta device's first use (above), at sizes whose activations fit easily."""
    import copy

    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or not all(t.is_meta for t in tensors) or \
            sum(t.numel() for t in tensors) > CPU_SHAPE_PASS_ELEMENTS or \
            math.prod(input_shape) > CPU_SHAPE_PASS_INPUT:
        return model
    twin = copy.deepcopy(model).to_empty(device="cpu")
    with torch.no_grad():
        for t in [*twin.parameters(), *twin.buffers()]:
            t.zero_()
    return twin


@dataclass
class ModelContext:
    """A weightless (meta-device) model on crossbars: mapping, output positions, layers."""

    model_name: str
    input_shape: tuple[int, ...]
    mapping: MappingReport
    positions: dict[str, int]
    model: nn.Module

    def layers(self) -> dict[str, nn.Module]:
        from xbm.nn import CrossbarLayer

        return {n: m for n, m in self.model.named_modules() if isinstance(m, CrossbarLayer)}


def model_context(model_name: str, spec: CrossbarSpec, *, width: int | None = None,
                  in_channels: int | None = None, input_size: int | None = None
                  ) -> ModelContext:
    """Build a registered model on the meta device, put it on crossbars and count positions."""
    from xbm.models import create_model
    from xbm.nn import CrossbarLayer, apply

    for name, v in (("input_size", input_size), ("in_channels", in_channels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    in_ch = in_channels if in_channels is not None else default_in_channels(model_name)
    size = input_size if input_size is not None else default_input_size(model_name)
    with torch.device("meta"):
        model = create_model(model_name, in_channels=in_ch, width=width)
    apply(model, spec, head_name=getattr(model, "head_name", "fc"))
    mapping = map_model(model, spec, lambda n, m: isinstance(m, CrossbarLayer),
                        getattr(model, "head_name", "fc"))
    shape = (1, in_ch, size, size)
    positions = output_positions(model, shape, [lm.name for lm in mapping.layers])
    return ModelContext(model_name, shape, mapping, positions, model)


def meta_mask_bits(name: str, ctx: ModelContext, rewrite_fraction: float = 0.0
                   ) -> dict[str, int]:
    """Per layer, the method's ``planned_mask_bits`` on a freshly created (untrained) task state,
    for a task that re-programs ``rewrite_fraction`` of the crossbar columns (XMA2 drops the
    column bits of the PEs it re-programs).

    Most methods count mask bits from state shapes, which works on the weightless meta device. A
    method that reads values while counting gets, one layer at a time, a zero-weight CPU twin of
    the layer instead, so memory stays bounded by the largest layer.
    """
    import copy

    from xbm.methods import create_method

    layers = ctx.layers()
    method = create_method(name)
    out: dict[str, int] = {}
    try:
        for lname, layer in layers.items():
            out[lname] = int(method.planned_mask_bits(layer, method.create_layer_state(layer),
                                                      rewrite_fraction))
        return out
    except Exception:  # value-dependent counting: fall back to materialised twins
        out.clear()
    for lname, layer in layers.items():
        try:
            twin = copy.deepcopy(layer).to_empty(device="cpu")
            with torch.no_grad():
                for t in list(twin.parameters()) + list(twin.buffers()):
                    t.zero_()
            m = create_method(name)
            out[lname] = int(m.planned_mask_bits(twin, m.create_layer_state(twin),
                                                 rewrite_fraction))
        except Exception as exc:
            if isinstance(exc, (MemoryError, RuntimeError)) and "alloc" in str(exc).lower():
                raise XbmError(f"layer {lname} ({type(layer).__name__} of "
                               f"{tuple(layer.weight.shape)}) does not fit in memory, which "
                               f"method {name!r} needs to count its mask bits; use a smaller "
                               "--width") from None
            raise XbmError(f"method {name!r} cannot count its mask bits without weights "
                           f"({type(exc).__name__}: {exc}); cost it from a bundle instead"
                           ) from None
    return out


# -- events -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerEvents:
    """Per-image inference events of one layer and its cycle-level latency."""

    positions: int
    input_cycles: int
    cell_reads: int
    dac_drives: int
    adc_conversions: int
    shift_adds: int
    cycle_s: float
    latency_s: float


def conversions_per_column(spec: CrossbarSpec, preset: EnergyPreset) -> int:
    """ADC conversions per crossbar column per input cycle: one per bit slice (two when the
    polarities of a differential pair are converted separately)."""
    pol = 1 if preset.periphery.differential_in_analog else spec.cells_per_slice
    return spec.slices * pol


def layer_events(lm: LayerMapping, spec: CrossbarSpec, preset: EnergyPreset, positions: int,
                 masked_off_columns: int) -> LayerEvents:
    """Inference events of one layer for one image.

    - cell reads = P x I x cells (every cell sees every input cycle; energy scales by activity)
    - DAC drives = P x I x rows x col_tiles (each crossbar drives its own wordlines)
    - ADC conversions = P x I x conversions per column x (row_tiles x Cout - masked-off)
    - shift-and-adds = ADC conversions (each digitised partial sum is shifted and added once)

    Latency: crossbars of a layer run in parallel and layers in sequence; one input cycle lasts
    max(read pulse, ceil(active conversions per crossbar / ADCs per crossbar) x ADC time).

    A crossbar that holds columns of g convolution groups (:attr:`LayerMapping.tile_groups`:
    a depthwise conv) is read g times per input cycle, once per group's input vector on the
    shared wordlines: its DAC drives and cell reads count g times (the other groups' cells
    conduct too; bitlines are not gated) and its cycle lasts g reads, each converting that
    group's columns. Ungrouped layers are unaffected.
    """
    per = spec.input_cycles * positions
    cpc = conversions_per_column(spec, preset)
    columns = lm.row_tiles * lm.cols
    off = min(max(masked_off_columns, 0), columns)
    conv = per * cpc * (columns - off)
    p = preset.periphery
    conv_slots = spec.logical_cols * cpc  # conversions a full crossbar needs per input cycle
    tiles = lm.tile_group_columns()
    groups = [len(cols) for cols in tiles]
    adcs = max(1, math.ceil(conv_slots / p.columns_per_adc))
    on = 1 - off / columns if columns else 0.0

    def read(n: int) -> float:  # one read of n columns: the pulse, or their conversions
        return max(preset.device.read_pulse_s,
                   math.ceil(n * cpc * on / adcs) * p.adc_latency_s(spec.adc_bits))

    # the busiest crossbar: one read per group it holds, each converting that group's columns
    cycle = max((sum(read(n) for n in cols) for cols in tiles), default=read(0))
    cpw = lm.cells // max(lm.weights, 1)
    reads = sum(lm.rows * n * cpw * g for n, g in zip(lm.tile_columns(), groups, strict=True))
    return LayerEvents(
        positions=positions, input_cycles=spec.input_cycles,
        cell_reads=per * reads, dac_drives=per * lm.rows * sum(groups),
        adc_conversions=conv, shift_adds=conv, cycle_s=cycle, latency_s=per * cycle)


# -- costs --------------------------------------------------------------------------------------
@dataclass
class MethodCost:
    """Energy, latency and event counts of one method (or one learned task)."""

    method: str
    label: str
    source: str
    facts: list[LayerFacts]
    events: list[LayerEvents]
    deploy: dict[str, Term]
    switch: dict[str, Term]
    inference: dict[str, Term]
    onchip: dict[str, Term]
    latency: dict[str, dict[str, Term]]
    info: dict[str, Any] = field(default_factory=dict)
    layer_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mask_bits(self) -> int:
        return sum(f.mask_bits for f in self.facts)

    @property
    def reprogrammed_cells(self) -> int:
        return sum(f.reprogrammed_cells for f in self.facts)

    @property
    def switch_cells(self) -> int:
        return sum(f.switch_cells for f in self.facts)

    @property
    def masked_off_columns(self) -> int:
        return sum(f.masked_off_columns for f in self.facts)

    def energy(self, setting: str) -> float:
        return _sum(getattr(self, setting))

    def time(self, setting: str) -> float:
        return _sum(self.latency[setting])

    def summary(self) -> dict[str, Any]:
        """The flat numbers (the JSON ``methods`` entry without its breakdown)."""
        return {
            "mask_bits": self.mask_bits,
            "reprogrammed_cells": self.reprogrammed_cells,
            "masked_off_columns": self.masked_off_columns,
            "switch_reprogrammed_cells": self.switch_cells,
            "adaption_energy_j": self.energy("deploy"),
            "adaption_latency_s": self.time("deploy"),
            "switch_energy_j": self.energy("switch"),
            "switch_latency_s": self.time("switch"),
            "inference_energy_j": self.energy("inference"),
            "inference_latency_s": self.time("inference"),
            "onchip_adaption_energy_j": self.energy("onchip"),
            "onchip_adaption_latency_s": self.time("onchip"),
        }

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        d = self.summary() | {
            "source": self.source,
            "info": self.info,
            "breakdown": {s: {k: t.to_dict() for k, t in getattr(self, s).items()}
                          for s in ("deploy", "switch", "inference", "onchip")},
            "latency_breakdown": {s: {k: t.to_dict() for k, t in terms.items()}
                                  for s, terms in self.latency.items()},
        }
        if per_layer:
            d["layers"] = self.layer_rows
        return d


def method_cost(method: str, facts: list[LayerFacts], mapping: MappingReport,
                positions: dict[str, int], preset: EnergyPreset,
                assumptions: Assumptions | None = None, *, label: str | None = None,
                source: str = "defaults", info: dict[str, Any] | None = None) -> MethodCost:
    """Turn per-layer facts into energy and latency terms (the pure arithmetic layer)."""
    a = assumptions or Assumptions()
    spec = mapping.spec
    preset.check_spec(spec)
    dev, per = preset.device, preset.periphery
    by_name = {lm.name: lm for lm in mapping.layers}
    if {f.name for f in facts} - set(by_name):
        raise XbmError("facts name layers the mapping does not have; build them from the same "
                       "model and spec")
    e_pulse = dev.write_pulse_energy_j
    e_read = dev.cell_read_energy_j
    e_read_active = e_read * per.wordline_activity
    e_bit = per.mask_bit_write_energy_j
    e_adc = per.adc_energy_j(spec.adc_bits)
    e_dac = per.dac_drive_energy_j(spec.dac_bits)
    e_sa = per.shift_add_energy_j
    pulses = dev.write_pulses_per_cell
    verify = dev.verify_reads_per_pulse
    t_row = preset.write_time_per_row_s() / per.parallel_write_crossbars
    events: list[LayerEvents] = []
    rows_out: list[dict[str, Any]] = []
    tot = {k: 0.0 for k in ("reads", "dac", "adc", "sa", "lat", "deploy_cells", "deploy_rows",
                            "switch_cells", "switch_rows", "onchip_cells", "onchip_rows", "bits",
                            "train_adc", "train_sa", "train_lat")}
    for f in facts:
        lm = by_name[f.name]
        ev = layer_events(lm, spec, preset, positions[f.name], f.masked_off_columns)
        events.append(ev)
        # on-chip training converts every column unless told otherwise (Assumptions)
        ev_train = ev if a.training_skips_off_columns or not f.masked_off_columns else \
            layer_events(lm, spec, preset, positions[f.name], 0)
        tot["train_adc"] += ev_train.adc_conversions
        tot["train_sa"] += ev_train.shift_adds
        tot["train_lat"] += ev_train.latency_s
        tot["reads"] += ev.cell_reads
        tot["dac"] += ev.dac_drives
        tot["adc"] += ev.adc_conversions
        tot["sa"] += ev.shift_adds
        tot["lat"] += ev.latency_s
        tot["deploy_cells"] += f.reprogrammed_cells
        tot["deploy_rows"] += f.reprogrammed_rows
        tot["switch_cells"] += f.switch_cells
        tot["switch_rows"] += f.switch_rows
        tot["onchip_cells"] += f.onchip_cells
        tot["onchip_rows"] += f.onchip_rows
        tot["bits"] += f.mask_bits
        infer_j = (ev.cell_reads * e_read_active + ev.dac_drives * e_dac +
                   ev.adc_conversions * e_adc + ev.shift_adds * e_sa)
        rows_out.append({
            "layer": f.name, "rows": lm.rows, "cols": lm.cols, "row_tiles": lm.row_tiles,
            "col_tiles": lm.col_tiles, "positions": ev.positions, "mask_bits": f.mask_bits,
            "reprogrammed_cells": f.reprogrammed_cells, "switch_cells": f.switch_cells,
            "masked_off_columns": f.masked_off_columns, "cell_reads": ev.cell_reads,
            "dac_drives": ev.dac_drives, "adc_conversions": ev.adc_conversions,
            "shift_adds": ev.shift_adds, "inference_energy_j": infer_j,
            "inference_latency_s": ev.latency_s,
            "adaption_energy_j": f.reprogrammed_cells * pulses * (e_pulse + verify * e_read)
            + f.mask_bits * e_bit,
        })

    def writes(cells: float, bits: float) -> dict[str, Term]:
        return {
            "write_pulses": Term(cells * pulses, e_pulse, "device.write_pulse_energy_j"),
            "verify_reads": Term(cells * pulses * verify, e_read, "device.cell_read_energy_j"),
            "mask_bit_writes": Term(bits, e_bit, "periphery.mask_bit_write_energy_j"),
        }

    def write_time(rows: float, bits: float) -> dict[str, Term]:
        return {
            "row_writes": Term(rows, t_row, "write_time_per_row_s / parallel_write_crossbars"),
            "mask_write_cycles": Term(math.ceil(bits / per.mask_write_bits_per_cycle),
                                      per.digital_cycle_s, "periphery.digital_cycle_s"),
        }

    bits = tot["bits"]
    inference = {
        "cell_reads": Term(tot["reads"], e_read_active,
                           "device.cell_read_energy_j x periphery.wordline_activity"),
        "dac_drives": Term(tot["dac"], e_dac, "periphery.dac_energy_j x 2^(dac_bits-1)"),
        "adc_conversions": Term(tot["adc"], e_adc,
                                f"periphery.adc_energy_j({spec.adc_bits} bits)"),
        "shift_adds": Term(tot["sa"], e_sa, "periphery.shift_add_energy_j"),
    }
    images = a.iterations * a.batch_size * (1 + a.backward_factor)
    training = inference | {
        "adc_conversions": Term(tot["train_adc"], e_adc,
                                f"periphery.adc_energy_j({spec.adc_bits} bits); every column "
                                "while training" if not a.training_skips_off_columns else
                                f"periphery.adc_energy_j({spec.adc_bits} bits)"),
        "shift_adds": Term(tot["train_sa"], e_sa, "periphery.shift_add_energy_j"),
    }
    onchip = {f"compute_{k}": t.scaled(images) for k, t in training.items()}
    onchip |= {f"rewrite_{k}": t for k, t in
               writes(tot["onchip_cells"], bits * a.iterations).items()}
    latency = {
        "deploy": write_time(tot["deploy_rows"], bits),
        "switch": write_time(tot["switch_rows"], bits),
        "inference": {"layer_cycles": Term(1, tot["lat"], "sum over layers of P x I x cycle")},
        "onchip": {"compute": Term(images, tot["train_lat"],
                                   "latency per training image pass")}
        | {f"rewrite_{k}": t for k, t in
           write_time(tot["onchip_rows"], bits * a.iterations).items()},
    }
    return MethodCost(
        method=method, label=label or method, source=source, facts=facts, events=events,
        deploy=writes(tot["deploy_cells"], bits),
        switch=writes(tot["switch_cells"], bits),
        inference=inference, onchip=onchip, latency=latency, info=dict(info or {}),
        layer_rows=rows_out)


# -- reports ------------------------------------------------------------------------------------
def derived_constants(preset: EnergyPreset, spec: CrossbarSpec) -> dict[str, float]:
    """The per-event constants the report multiplies by, for traceability."""
    d, p = preset.device, preset.periphery
    return {
        "write_pulse_energy_j": d.write_pulse_energy_j,
        "cell_read_energy_j": d.cell_read_energy_j,
        "write_energy_per_cell_j": preset.write_energy_per_cell_j(),
        "write_time_per_row_s": preset.write_time_per_row_s(),
        "adc_energy_j": p.adc_energy_j(spec.adc_bits),
        "adc_latency_s": p.adc_latency_s(spec.adc_bits),
        "dac_drive_energy_j": p.dac_drive_energy_j(spec.dac_bits),
        "shift_add_energy_j": p.shift_add_energy_j,
        "mask_bit_write_energy_j": p.mask_bit_write_energy_j,
        "conversions_per_column": conversions_per_column(spec, preset),
        "input_cycles": spec.input_cycles,
        "cells_per_weight": spec.cells_per_weight,
    }


@dataclass
class CostReport:
    """Costs of several methods (or learned tasks) on one model, spec and preset."""

    model: str
    spec: CrossbarSpec
    preset: EnergyPreset
    assumptions: Assumptions
    mapping: MappingReport
    input_shape: tuple[int, ...] | None
    costs: list[MethodCost]
    switch_matrix: dict[str, dict[str, float]] | None = None
    notes: list[str] = field(default_factory=list)
    workloads: dict[str, dict[str, int]] | None = None
    """Per task, the on-chip workload it was priced at when not every task has
    ``assumptions``' (``xbm cost --bundle --workload recorded``)."""

    def __post_init__(self) -> None:
        levels = self.preset.device.conductance_levels
        if 2 ** self.spec.cell_bits > levels:  # priced, but no such device could hold it
            self.notes.append(
                f"energy preset {self.preset.name!r} describes a device with {levels} "
                f"conductance levels, fewer than the {2 ** self.spec.cell_bits} a "
                f"{self.spec.cell_bits}-bit cell needs: its per-cell write and read constants "
                "are for that device (with --model, --energy-spec costs the cells its "
                "source assumed; a --bundle's cells are its own)")

    def by_method(self) -> dict[str, dict[str, Any]]:
        """``methods`` entries: one per method; several tasks of a method are averaged."""
        groups: dict[str, list[MethodCost]] = {}
        for c in self.costs:
            groups.setdefault(c.method, []).append(c)
        out: dict[str, dict[str, Any]] = {}
        for m, cs in groups.items():
            if len(cs) == 1:
                out[m] = cs[0].to_dict()
                continue
            keys = cs[0].summary().keys()
            out[m] = {k: float(sum(c.summary()[k] for c in cs) / len(cs)) for k in keys}
            out[m] |= {"source": "mean over tasks", "tasks": [c.label for c in cs]}
        return out

    def comparisons(self) -> dict[str, Any]:
        """Every method against Piggyback (the paper's baseline), when both are present."""
        ms = self.by_method()
        pb = ms.get("piggyback")
        if pb is None:
            return {}
        settings = {"deploy": "adaption_energy_j", "switch": "switch_energy_j",
                    "inference": "inference_energy_j", "onchip": "onchip_adaption_energy_j"}
        out: dict[str, Any] = {}
        for name, c in ms.items():
            if name == "piggyback":
                continue
            row: dict[str, Any] = {
                "mask_bits_ratio": c["mask_bits"] / pb["mask_bits"] if pb["mask_bits"] else None}
            for s, k in settings.items():
                row[f"{s}_energy_saving"] = 1 - c[k] / pb[k] if pb[k] else None
            if self.workloads_differ():  # tasks priced at other workloads: not comparable
                row["onchip_energy_saving"] = None
            row["switch_energy_ratio"] = pb["switch_energy_j"] / c["switch_energy_j"] \
                if c["switch_energy_j"] else None
            out[f"{name}_vs_piggyback"] = row
        return out

    def workloads_differ(self) -> bool:
        """Whether the tasks were priced at more than one on-chip workload (``--workload
        recorded``): their on-chip energies then compare workloads as well as methods."""
        return len({(w.get("iterations"), w.get("batch_size"))
                    for w in (self.workloads or {}).values()}) > 1

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        t = self.mapping.totals()
        methods = self.by_method()
        if per_layer:
            for c in self.costs:
                if c.label == c.method:
                    methods[c.method]["layers"] = c.layer_rows
        d: dict[str, Any] = {
            "schema": "xbm-cost/1",
            "model": self.model,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "spec": self.spec.to_dict(),
            "energy_preset": self.preset.to_dict(),
            "constants": derived_constants(self.preset, self.spec),
            "assumptions": self.assumptions.to_dict(),
            "onchip_workloads": self.workloads,
            "mask_memory": {
                "column_bits": t["xbm_mask_bits"], "element_bits": t["piggyback_mask_bits"],
                "column_vs_element": t["xbm_mask_bits"] / max(t["piggyback_mask_bits"], 1),
                "formula": "column = sum ceil(rows/R) x Cout; element = sum rows x Cout",
                "layers": t["layers"], "crossbars": t["crossbars"], "cells": t["cells"],
            },
            "methods": methods,
            "comparisons": self.comparisons(),
            "notes": self.notes,
        }
        # a bundle's report (it has a switch matrix) always lists its tasks: one whose tasks
        # happened to be named after their methods had no "tasks" key
        if self.switch_matrix is not None or any(c.label != c.method for c in self.costs):
            d["tasks"] = {c.label: {"method": c.method} | c.to_dict(per_layer)
                          for c in self.costs}
        if self.switch_matrix is not None:
            d["switch_energy_matrix_j"] = self.switch_matrix
        return d

    def table(self, per_layer: bool = False) -> str:
        """The text report: one row per method or task, then the settings that apply."""
        pb = next((c for c in self.costs if c.method == "piggyback"), None)
        # a bundle's rows are its tasks: name the method each was learned with
        names = {id(c): c.label if c.label == c.method else f"{c.label} ({c.method})"
                 for c in self.costs}
        w = max([22, *(len(n) for n in names.values())])
        head = (f"{'method/task':<{w}} {'mask bits':>12} {'vs PB':>7} {'reprog cells':>13} "
                f"{'adapt J':>10} {'switch J':>10} {'switch s':>9} {'infer J/img':>11} "
                f"{'infer s/img':>11} {'on-chip J':>10}")
        lines = [head, "-" * len(head)]
        # against Piggyback's one bit per weight, whether or not its row is shown; "-" for a
        # method without a mask, as the demo's table
        pb_bits = pb.mask_bits if pb and pb.mask_bits else \
            self.mapping.totals()["piggyback_mask_bits"]
        for c in self.costs:
            vs = f"{c.mask_bits / pb_bits:.2%}" if c.mask_bits and pb_bits else "-"
            lines.append(
                f"{names[id(c)]:<{w}} {c.mask_bits:>12,} {vs:>7} {c.reprogrammed_cells:>13,} "
                f"{c.energy('deploy'):>10.3e} {c.energy('switch'):>10.3e} "
                f"{c.time('switch'):>9.2e} {c.energy('inference'):>11.3e} "
                f"{c.time('inference'):>11.2e} {c.energy('onchip'):>10.3e}")
        s = self.spec
        a = self.assumptions
        lines.append("-" * len(head))
        lines.append(
            f"{self.model}: {len(self.mapping.layers)} crossbar layers, {s.rows}x{s.cols} "
            f"crossbars, {s.weight_bits}-bit weights on {s.cell_bits}-bit cells ({s.signed}), "
            f"{s.adc_bits}-bit ADC; energy preset {self.preset.name!r}")
        k = derived_constants(self.preset, s)
        lines.append(
            f"preset constants: re-program {k['write_energy_per_cell_j']:.3g} J/cell, ADC "
            f"{k['adc_energy_j']:.3g} J and {k['adc_latency_s']:.3g} s/conversion at "
            f"{s.adc_bits} b, {self.preset.periphery.columns_per_adc} columns per ADC, mask bit "
            f"{k['mask_bit_write_energy_j']:.3g} J")
        src = "the base task (the backbone as programmed)" if self.switch_matrix is not None \
            else "another learned task of the same method"
        lines.append(
            f"adapt = deploy a task trained off-chip (re-program + mask write); switch = from "
            f"{src}; on-chip = "
            + ("each task's recorded workload (notes) " if self.workloads else
               f"{a.iterations} iterations x batch {a.batch_size} ")
            + f"(forward + {a.backward_factor:g} backward pass; "
            + ("switched-off columns skipped, as at inference" if a.training_skips_off_columns
               else "every column converted") + ") + re-programming")
        for c in self.costs:
            bd = {k: t.value for k, t in c.deploy.items()}
            lines.append(
                f"  {names[id(c)]:<{w}} adapt: pulses {bd['write_pulses']:.3e} J, verify "
                f"{bd['verify_reads']:.3e} J, mask {bd['mask_bit_writes']:.3e} J | infer: "
                + ", ".join(f"{k.replace('_', ' ')} {t.value:.2e}" for k, t in
                            c.inference.items()))
        for n in self.notes:
            lines.append(f"note: {n}")
        if self.switch_matrix is not None and len(self.switch_matrix) <= 12:
            dst = list(next(iter(self.switch_matrix.values())))
            lines.append("")
            lines.append("switch energy (J), from row task to column task:")
            wr = max([9, *(len(t) for t in self.switch_matrix)])  # names in full
            wc = max([10, *(len(t) for t in dst)]) + 2
            lines.append(f"{'from / to':<{wr}}" + "".join(f"{t:>{wc}}" for t in dst))
            for src_task, row in self.switch_matrix.items():
                lines.append(f"{src_task:<{wr}}" + "".join(f"{row[t]:>{wc}.3e}" for t in dst))
        if per_layer:
            for c in self.costs:
                lines.append("")
                lines.append(f"[{c.label}] per layer (pos: output positions per image, each "
                             "one crossbar read per input cycle)")
                h = (f"{'layer':<28} {'pos':>6} {'mask bits':>10} {'reprog cells':>12} "
                     f"{'off cols':>8} {'ADC conv':>12} {'infer J':>10} {'adapt J':>10}")
                lines += [h, "-" * len(h)]
                for r in c.layer_rows:
                    lines.append(
                        f"{r['layer'][:28]:<28} {r['positions']:>6} {r['mask_bits']:>10,} "
                        f"{r['reprogrammed_cells']:>12,} {r['masked_off_columns']:>8,} "
                        f"{r['adc_conversions']:>12,} {r['inference_energy_j']:>10.3e} "
                        f"{r['adaption_energy_j']:>10.3e}")
        return "\n".join(lines)


def cost_model(ctx: ModelContext, methods: Iterable[str], preset: EnergyPreset | None = None,
               assumptions: Assumptions | None = None) -> CostReport:
    """Costs of registered methods on a weightless model, from documented defaults."""
    preset = preset or get_preset()
    a = assumptions or Assumptions()
    costs = []
    notes = []
    for m in methods:
        d, known = method_defaults(m)
        bits = meta_mask_bits(m, ctx, a.applied_rewrite(m, ctx.mapping, of="columns"))
        facts = default_facts(m, ctx.mapping, bits, a)
        info = {"rewrite_fraction": a.applied_rewrite(m, ctx.mapping),
                "rewrite_flag": d.rewrite_flag, "column_off_fraction": a.column_off(m),
                "switch_model": d.switch, "onchip_model": d.onchip, "pattern": d.pattern,
                "switch_from": "another task of the same method", "note": d.note,
                "defaults_known": known}
        if not known:
            notes.append(f"{m}: {d.note}")
        costs.append(method_cost(m, facts, ctx.mapping, ctx.positions, preset, a, info=info))
    return CostReport(ctx.model_name, ctx.mapping.spec, preset, a, ctx.mapping, ctx.input_shape,
                      costs, notes=notes)


# -- learned tasks ------------------------------------------------------------------------------
_POSITIONS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], dict[str, int]]] = \
    weakref.WeakKeyDictionary()


def mtm_positions(mtm: MultiTaskModel, input_size: int | None = None,
                  in_channels: int | None = None) -> tuple[dict[str, int], tuple[int, ...]]:
    """Output positions of a multi-task model's crossbar layers (cached per model and shape).

    Built on a weightless copy of the recorded architecture when there is one, so the user's model
    is never run; otherwise one forward pass of the base task on a zero image. Without a
    recorded architecture (a model built in Python without ``arch=``) the input channels are
    the first convolution's, and the image side, which nothing records, is 28 with a warning:
    pass ``input_size`` (and ``in_channels``). Such a model without any convolution (an MLP)
    is probed with one flat vector of its first Linear's ``in_features`` unless
    ``input_size`` or ``in_channels`` ask for images.
    """
    for what, v in (("input_size", input_size), ("in_channels", in_channels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{what} must be a positive integer, got {v!r}")
    arch = mtm.arch or {}
    from xbm.models.registry import list_models

    # a name no registry knows (a user's model, recorded for their own reference) cannot be
    # rebuilt weightless: the model itself is probed, as without a name
    name = arch.get("name") if arch.get("name") in list_models() else None
    first_conv = next((m for m in mtm.model.modules() if isinstance(m, nn.Conv2d)), None)
    in_ch = in_channels or arch.get("in_channels") or (
        default_in_channels(name) if name else first_conv.in_channels if first_conv else 1)
    size = input_size or (default_input_size(name) if name else None)
    first_linear = next((m for m in mtm.model.modules() if isinstance(m, nn.Linear)), None)
    if size is None and first_conv is None and first_linear is not None and in_channels is None:
        shape: tuple[int, ...] = (1, int(first_linear.in_features))  # an MLP takes flat vectors
    elif size is None:
        size = 28
        warnings.warn("cost model: the model records no registered architecture "
                      "(MultiTaskModel(..., arch={'name': a registered model, ...})), so its "
                      "input size is unknown; counting output positions on 28 x 28 images: "
                      "pass input_size= for another size",
                      XbmWarning, stacklevel=user_stacklevel())
        shape = (1, int(in_ch), 28, 28)
    else:
        shape = (1, int(in_ch), int(size), int(size))
    cache = _POSITIONS.setdefault(mtm, {})
    if shape in cache:
        return cache[shape], shape
    names = [lm.name for lm in mtm.mapping().layers]
    if name:
        from xbm.models import create_model

        with torch.device("meta"):
            model = create_model(name, num_classes=arch.get("num_classes"), in_channels=in_ch,
                                 width=arch.get("width"))
        pos = output_positions(model, shape, [n.removeprefix("model.") for n in names])
    else:
        with mtm.use_task(BASE):
            pos = output_positions(mtm.model, shape, names)
    cache[shape] = pos
    return pos, shape


def _as_preset(preset: EnergyPreset | str | None) -> EnergyPreset:
    """An energy preset, its name, or None for ``default``, as the Python API takes them."""
    return get_preset(preset or "default") if isinstance(preset, str) or preset is None \
        else preset


def recorded_side(mtm: MultiTaskModel, task: str) -> int | None:
    """The image side ``task`` records it was trained at (``extra["image_size"]``, as
    ``xbm adapt`` writes it); None where it records none.

    Raises:
        ConfigError: the record is not a positive integer (a model built in Python: bundles
            check it when they load).
    """
    side = (mtm.tasks[task].extra or {}).get("image_size")
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
        raise ConfigError(f"task {task!r} records image_size {side!r} (its extra), not a "
                          "positive integer; fix the record, or pass input_size=")
    return side


def task_cost(mtm: MultiTaskModel, task: str, preset: EnergyPreset | str | None = None, *,
              reference: str = BASE, assumptions: Assumptions | None = None,
              input_size: int | None = None, in_channels: int | None = None) -> MethodCost:
    """The full cost of one learned task (deploy from the backbone, switch from ``reference``);
    ``preset``: an energy preset or its name (default: ``default``). ``input_size``: the image
    side the energies are counted on; default the side the task records it was trained at
    (``extra["image_size"]``, as ``xbm adapt`` writes), else as :func:`mtm_positions`."""
    preset = _as_preset(preset)
    a = assumptions or Assumptions()
    facts = task_facts(mtm, task, reference, a)
    if input_size is None:  # a task trained on 64 px images was priced at 28 px, unsaid
        input_size = recorded_side(mtm, task)
    positions, _ = mtm_positions(mtm, input_size, in_channels)
    method = mtm.tasks[task].method
    d, _ = method_defaults(method)
    info = {"switch_from": reference, "onchip_model": d.onchip, "pattern": d.pattern}
    return method_cost(method, facts, mtm.mapping(), positions, preset, a, label=task,
                       source=f"task {task!r}", info=info)


def task_costs(mtm: MultiTaskModel, task: str, preset: EnergyPreset | str | None = None,
               *, reference: str = BASE, input_size: int | None = None,
               in_channels: int | None = None, assumptions: Assumptions | None = None,
               energy_preset: EnergyPreset | str | None = None) -> dict[str, Any]:
    """Flat cost numbers of one learned task, for results tables (the demo's columns).

    ``adaption_energy_j`` is the deploy setting: the task was trained off-chip and is programmed
    onto the chip holding the backbone (re-program what the method changed, write its mask).
    ``switch_energy_j`` is the cost of switching the chip from ``reference`` (default: the base
    task, i.e. the backbone as programmed) to this task: cells whose programmed value differs plus
    this task's mask bits. From the base task it equals the deploy energy for mask methods; between
    two learned tasks use ``reference=`` another task.

    Args:
        mtm: the multi-task model holding the task.
        task: the task's name.
        preset: an energy preset or its name (default: the ``default`` preset), as
            :func:`task_cost` takes it.
        reference: the task the chip switches from.
        input_size: image side for counting output positions (default: the side the task
            records, ``extra["image_size"]``; else 224 for ImageNet layouts and 28 for the
            others; a model without a recorded ``arch`` warns that it assumed 28).
        in_channels: input channels (default: the recorded architecture's, else the first
            convolution's).
        assumptions: on-chip workload (iterations, batch) for ``onchip_adaption_energy_j``.
        energy_preset: the former name of ``preset``, still read (deprecated).
    """
    if energy_preset is not None:
        if preset is not None:
            raise ConfigError("task_costs: pass preset= only (energy_preset= is its former "
                              "name)")
        warnings.warn("task_costs(energy_preset=) is now preset=, as task_cost takes it",
                      DeprecationWarning, stacklevel=2)
        preset = energy_preset
    preset = _as_preset(preset)
    c = task_cost(mtm, task, preset, reference=reference, assumptions=assumptions,
                  input_size=input_size, in_channels=in_channels)
    return c.summary() | {"energy_preset": preset.name, "switch_from": reference}


def switch_matrix(mtm: MultiTaskModel, preset: EnergyPreset | str | None = None,
                  tasks: list[str] | None = None, assumptions: Assumptions | None = None,
                  input_size: int | None = None,
                  in_channels: int | None = None) -> dict[str, dict[str, float]]:
    """Switch energy (J) from every task (rows, ``base`` included) to every learned task;
    ``preset``: an energy preset or its name (default: ``default``), as :func:`task_costs`."""
    tasks = tasks if tasks is not None else list(mtm.tasks)  # task_cost resolves the preset
    out: dict[str, dict[str, float]] = {}
    for src in [BASE, *tasks]:
        out[src] = {}
        for dst in tasks:
            if dst == src:
                out[src][dst] = 0.0
                continue
            c = task_cost(mtm, dst, preset, reference=src, assumptions=assumptions,
                          input_size=input_size, in_channels=in_channels)
            out[src][dst] = c.energy("switch")
    return out


def bundle_report(mtm: MultiTaskModel, preset: EnergyPreset, assumptions: Assumptions,
                  tasks: list[str], model_name: str, input_size: int | None = None,
                  in_channels: int | None = None,
                  per_task: dict[str, Assumptions] | None = None) -> CostReport:
    """Costs of learned tasks (deploy from the base task) plus their switch-energy matrix;
    ``per_task``: a task's own assumptions (its recorded on-chip workload) over
    ``assumptions``."""
    per_task = per_task or {}
    costs = [task_cost(mtm, t, preset, assumptions=per_task.get(t, assumptions),
                       input_size=input_size, in_channels=in_channels) for t in tasks]
    workloads = {t: {"iterations": per_task.get(t, assumptions).iterations,
                     "batch_size": per_task.get(t, assumptions).batch_size} for t in tasks}
    for c, t in zip(costs, tasks, strict=True):
        c.info["onchip_workload"] = workloads[t]
    if input_size is None:  # the header's shape is the one the tasks were priced at
        sides = {recorded_side(mtm, t) for t in tasks}
        input_size = sides.pop() if len(sides) == 1 else None
    _, shape = mtm_positions(mtm, input_size, in_channels)
    return CostReport(model_name, mtm.spec, preset, assumptions, mtm.mapping(), shape, costs,
                      switch_matrix=switch_matrix(mtm, preset, tasks, assumptions, input_size,
                                                  in_channels),
                      workloads=workloads if per_task else None)


def measured_fractions(mtm: MultiTaskModel) -> tuple[dict[str, float], dict[str, float]]:
    """Per method, the mean rewrite fraction and column-off fraction of a bundle's tasks.

    Used to calibrate the no-weights defaults (``xbm cost --fractions-from BUNDLE``).
    """
    rew: dict[str, list[float]] = {}
    off: dict[str, list[float]] = {}
    cpw = mtm.spec.cells_per_weight
    mapping = mtm.mapping()
    cells = sum(lm.weights for lm in mapping.layers) * cpw
    columns = sum(lm.row_tiles * lm.cols for lm in mapping.layers)
    for t, info in mtm.tasks.items():
        rew.setdefault(info.method, []).append(mtm.reprogrammed_cells(t) / max(cells, 1))
        off.setdefault(info.method, []).append(mtm.masked_off_columns(t) / max(columns, 1))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return ({m: mean(v) for m, v in rew.items()}, {m: mean(v) for m, v in off.items()})


# -- sensitivity ----------------------------------------------------------------------------
SENSITIVITY_GRID: dict[str, list[Any]] = {
    "device.write_pulses_per_cell": [1, 5, 20, 100],
    "write_energy_scale": [0.1, 1.0, 10.0],
    "adc_energy_scale": [0.1, 1.0, 10.0],
    "piggyback_off_fraction": [0.01, 0.05, 0.10, 0.30, 0.50],
    "column_off_fraction": [0.0, 0.10, 0.30, 0.50, 0.70],
    "iterations": [1, 100, 1913, 10000],
    "churn": [1, 10, 100],
}
"""What ``xbm cost --sensitivity`` sweeps: the constants the papers leave most uncertain."""


def _vary(preset: EnergyPreset, a: Assumptions, key: str, value: Any, method: str
          ) -> tuple[EnergyPreset, Assumptions]:
    if key == "write_energy_scale":
        return preset.with_overrides(
            {"device.write_pulse_s": preset.device.write_pulse_s * value}), a
    if key == "adc_energy_scale":
        return preset.with_overrides(
            {"periphery.adc_energy_ref_j": preset.periphery.adc_energy_ref_j * value}), a
    if key == "piggyback_off_fraction":
        return preset, replace(a, rewrite_fraction=a.rewrite_fraction | {"piggyback": value})
    if key == "column_off_fraction":
        return preset, replace(a, column_off_fraction=a.column_off_fraction | {method: value})
    if key in ("iterations", "churn"):
        return preset, replace(a, **{key: value})
    return preset.with_overrides({key: value}), a


def sensitivity(ctx: ModelContext, preset: EnergyPreset, assumptions: Assumptions,
                method: str = "xbm", baseline: str = "piggyback",
                grid: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """XBM's saving over Piggyback (or any pair) as each uncertain constant moves alone.

    Each row holds the baseline's and the method's deploy, switch, on-chip and per-image
    inference energies and the savings. ``write_energy_scale`` scales the write pulse width
    (so the pulse energy), ``adc_energy_scale`` the ADC energy per conversion and
    ``column_off_fraction`` the share of crossbar columns ``method`` switches off (their ADC
    conversions are skipped at inference; on-chip training converts them).
    """
    grid = grid or SENSITIVITY_GRID
    bits = {m: meta_mask_bits(m, ctx, assumptions.applied_rewrite(m, ctx.mapping, of="columns"))
            for m in (method, baseline)}
    rows = []
    for key, values in grid.items():
        if key == "piggyback_off_fraction" and "piggyback" not in (method, baseline):
            continue  # it moves Piggyback alone: rows of two other methods would all be equal
        if key == "column_off_fraction" and not switches_off_columns(method):
            continue  # ``method`` has no column to switch off (Piggyback, fine-tuning)
        for v in values:
            p, a = _vary(preset, assumptions, key, v, method)
            cs = {m: method_cost(m, default_facts(m, ctx.mapping, bits[m], a), ctx.mapping,
                                 ctx.positions, p, a) for m in (method, baseline)}
            x, b = cs[method], cs[baseline]
            row: dict[str, Any] = {"parameter": key, "value": v}
            for s in ("deploy", "switch", "onchip", "inference"):
                row[f"{baseline}_{s}_j"] = b.energy(s)
                row[f"{method}_{s}_j"] = x.energy(s)
                row[f"{s}_saving"] = 1 - x.energy(s) / b.energy(s) if b.energy(s) else None
            row["reprogram_share_of_baseline_onchip"] = (
                (b.onchip["rewrite_write_pulses"].value + b.onchip["rewrite_verify_reads"].value)
                / b.energy("onchip") if b.energy("onchip") else None)
            rows.append(row)
    return rows


def format_sensitivity(rows: list[dict[str, Any]], method: str = "xbm",
                       baseline: str = "piggyback") -> str:
    """Markdown table of :func:`sensitivity` rows."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.5g}%"

    head = (f"| parameter | value | {baseline} deploy J | {method} deploy J | deploy saving | "
            f"{baseline} on-chip J | on-chip saving | re-programming share of {baseline} "
            f"on-chip | {baseline}/{method} switch | inference saving |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        ratio = r[f"{baseline}_switch_j"] / r[f"{method}_switch_j"] if r[f"{method}_switch_j"] \
            else float("inf")
        lines.append(
            f"| {r['parameter']} | {r['value']:g} | {r[f'{baseline}_deploy_j']:.3e} | "
            f"{r[f'{method}_deploy_j']:.3e} | {pct(r['deploy_saving'])} | "
            f"{r[f'{baseline}_onchip_j']:.3e} | {pct(r['onchip_saving'])} | "
            f"{pct(r['reprogram_share_of_baseline_onchip'])} | {ratio:,.0f}x | "
            f"{pct(r['inference_saving'])} |")
    return "\n".join(lines)


__all__ = [
    "Assumptions",
    "CostReport",
    "LayerEvents",
    "LayerFacts",
    "METHOD_DEFAULTS",
    "MethodCost",
    "MethodDefaults",
    "ModelContext",
    "Term",
    "bundle_report",
    "cells_view",
    "cost_model",
    "default_facts",
    "format_sensitivity",
    "layer_events",
    "measured_fractions",
    "meta_mask_bits",
    "method_cost",
    "model_context",
    "output_positions",
    "sensitivity",
    "switch_matrix",
    "task_cost",
    "task_costs",
    "task_facts",
    "touched_rows",
]
