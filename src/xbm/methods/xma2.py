"""XMA2 (Zhang et al., Front. Electron. 2022): 2-tier masks, PE-wise re-programming plus XMA.

Tier 1 picks the few processing elements (PEs) worth re-programming for the new task; their
weights are fine-tuned and rewritten. Tier 2 is XMA's shift-based column mask on every other,
frozen PE. The paper's tier-1 rule, PE quota, PE size and training order are not public
(papers.md section 7, open question 5); this module's choices, and why:

* **PE** = ``spec.pe_rows`` row tiles x ``spec.pe_cols`` column tiles of one layer, a column tile
  being the ``spec.logical_cols`` whole weights one crossbar holds (output column j lies in tile
  ``j // spec.logical_cols``), so the PE grid is the one
  :class:`xbm.hardware.mapping.LayerMapping` counts in ``pes``.
* **Tier-1 score = accumulated gradient saliency.** During a short warm-up (``warmup_steps``
  training steps) every layer accumulates the gradient of the loss with respect to its effective
  weight, G = sum_t dL/dW_eff; a PE's score is sum over its weights of |G|. Adam moves every free
  weight by about lr per step in the direction of the (consistent) gradient, so the first-order loss
  decrease from fine-tuning a PE is about lr * sum|G| over it: the score ranks PEs by what
  re-programming them would buy (Hyb-Learn's task-correlated PE split, papers.md section 12, is
  the same idea). Summing the gradient before the absolute value favours PEs whose gradient is
  consistent across batches over PEs that only see noise. A trained per-PE gate with a sparsity
  penalty (the abstract's "PE-wise mask") would need a penalty weight and threshold whose scale is
  unknown, and under a fixed budget a top-K of a statistic is simpler and deterministic.
* **Selection = global top-K** over every PE of the model, K = floor(pe_budget x PEs); PEs with a
  zero score are never picked. With ``energy_budget_j`` the walk down the ranking also skips any
  PE whose cells would overrun the re-programming energy left (priced by the energy preset).
  The budget is a fraction of PEs because re-programming energy is proportional to the
  rewritten cells, and a PE's cells are fixed by its shape.
* **Training order**: (1) warm-up: tier-2 column scores train on all columns (exactly XMA) while
  the statistics accumulate; (2) at the first training forward after the warm-up, the method
  selects the PEs for the whole model at once (the method object is shared by every layer of the
  task, so no trainer hook is needed); inside a selected PE the current column levels are folded
  into the task's copy of the weights (W * level), so the function is continuous across the switch;
  (3) joint training of the tier-2 scores of the frozen PEs and the weights of the selected PEs
  (Adam at ``weight_lr``). Selected PEs use their own weights with column scale 1: a shift on top of
  free weights adds nothing, and the paper applies tier 2 to the frozen PEs only.
* **pe_budget = 0** selects nothing, creates no weight copy and gathers no statistics, so it is
  XMA exactly (same outputs, same scores, tested).
* Steps and statistics are counted in :meth:`XMA2.effective_weight`, i.e. on the ideal path the
  toolkit trains with; training through the faithful simulator (which reads ``chip_view``) gathers
  none, and such a task re-programs nothing (with a warning).

**Earlier tasks and the shared chip.** In software every task keeps its own view: the backbone
tensors never change and a task reads the backbone weights outside its own selected PEs, so earlier
tasks are unaffected (tested, and the demo's ``earlier_tasks_unchanged`` check holds). On a chip
with in-place re-programming a PE holds one task's weights at a time, so switching tasks must
restore the PEs the outgoing task rewrote and write the incoming task's: the cost model counts
those writes (``switch_reprogrammed_cells`` of ``xbm.hardware.cost.task_costs`` with
``reference=`` the outgoing task) from :meth:`XMA2.backbone_cells`. Without the restore, earlier
tasks *do* change; :func:`chip_without_restore` measures by how much (docs/benchmarks.md).
``spare_pes=True`` prevents it: each selected PE is written once into a spare PE that replaces the
backbone PE's output for this task only, so the backbone cells are never touched and a switch
writes nothing, at the area of one spare PE per selected PE. (Forbidding a task to pick PEs that
earlier tasks re-programmed would not help: the earlier task still reads the later task's PEs as
backbone.)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from xbm.errors import BundleError, ConfigError, XbmError, XbmWarning, user_stacklevel
from xbm.hardware.mapping import (
    apply_column_mask,
    column_sum_over_tiles,
    column_tile_index,
    num_col_tiles,
)
from xbm.methods.base import MethodConfig, register_method
from xbm.methods.xma import XMA, XMAConfig

if TYPE_CHECKING:
    from xbm.multitask import MultiTaskModel

PE_SCORES = ("grad", "random")
#: bundle keys of a task saved inside its warm-up (the steps taken and the gradient sum so far)
WARMUP_STEPS_KEY = "warmup_steps_done"
WARMUP_GRAD_KEY = "warmup_grad_sum"
ENERGY_RANKS = ("score", "density")


def _round_up(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, rounded up: a budget printed as "at least" this
    must not fall short of ``x`` by the rounding."""
    if x <= 0:
        return f"{x:.{digits}g}"
    e = math.floor(math.log10(x)) - digits + 1
    return f"{math.ceil(x / 10 ** e) * 10 ** e:.{digits}g}"


@dataclass
class XMA2Config(XMAConfig):
    """XMA's column levels plus tier-1 PE re-programming. The paper publishes no quota, rule or
    order (papers.md section 7); each default here is an assumption, measured in
    docs/benchmarks.md."""

    lr: float = 0.3
    """Adam learning rate of the frozen PEs' column scores (tier 2), XMA's own since session 13.
    At one adaption epoch, when XMA ran at 0.6, 0.6 scored lower here, where the re-programmed
    PEs do most of the adapting: at a 10% budget 0.6 gave 96.10 / 96.35 against 0.3's 96.62 /
    96.70 (seeds 1 / 2, docs/benchmarks.md, "Learning rates, re-tuned"). At ``pe_budget`` 0
    XMA2 is XMA; the ablation passes XMA's ``lr`` there, so the two stay identical if either
    default moves."""

    pe_budget: float = 0.10
    """Fraction of the model's PEs the task may re-program, in [0, 1] (K = floor(budget x PEs)).
    10%: the issue's reference point; the ablation sweeps 0, 5, 10 and 25%."""

    warmup_steps: int = 10
    """Training steps of tier 2 alone, while tier-1 statistics accumulate, before the PEs are
    chosen. 10 batches (320 images at the demo's batch 32) give a stable gradient sum and left
    178 of the demo's 188 steps per task (one epoch, before session 13; 366 of 376 now) to
    fine-tuning the chosen PEs; 3 and 30 were within 0.3 points on the demo
    (docs/benchmarks.md). A step is a forward with grad enabled and trainable scores (in
    train or eval mode) after the optimizer last updated the
    layer's column scores (its version counter or, for a fused optimizer, which leaves that
    alone, its values), so a layer used twice per forward (weight tying), gradient
    checkpointing's second forward and gradient accumulation each count one step per update. An
    update too small to change a score's value (bf16 scores, a fused optimizer) is not seen."""

    weight_lr: float = 5e-3
    """Adam learning rate of the re-programmed PEs' weights. Finetune uses 5e-4 for all weights;
    a tenth of the PEs trained for a few dozen steps need a larger step: at a 10% budget and 37
    steps after the warm-up (batch 128), 1e-3 / 5e-3 / 2e-2 gave 86.5 / 89.6 / 83.3% (ablation,
    docs/benchmarks.md). At one epoch of the demo (188 steps) 2e-3 / 5e-3 / 1e-2 were within 0.3
    points. The best rate falls as the width grows: over three seeds 2e-3 scored 0.40 below 5e-3
    at width 16 and 0.32 above it at width 32 (docs/benchmarks.md, "XMA2 at width 32"), and at
    width 64 (the GPU default, two epochs, three seeds) 1e-3 / 2e-3 / 5e-3 gave 98.31 / 98.23 /
    98.24 ("GPU session 3"); on wider backbones try 1e-3 to 2e-3."""

    energy_budget_j: float | None = None
    """Deploy-energy budget in joules (None: no energy limit). PEs are taken in ``energy_rank``
    order, skipping any that would overrun, while the cells they hold times the energy preset's
    ``write_energy_per_cell_j`` (write pulses plus verify reads) fit in the budget left after
    the task's largest mask write (tier-1 and tier-2 bits x ``mask_bit_write_energy_j``). Both
    are upper bounds, so the cost model's ``adaption_energy_j`` of the task (changed weights
    only, plus its mask bits) is at most this, unless the mask write alone is more: a warning
    says so (the mask bits cannot be skipped). ``pe_budget`` still caps the count: set it to
    1.0 to budget by energy alone."""

    energy_preset: str = "default"
    """Energy preset that prices ``energy_budget_j`` (``xbm cost --help`` lists them under
    ``--energy``)."""

    energy_rank: str = "score"
    """Walk order under ``energy_budget_j``: ``score`` (tier-1 score, largest first) or
    ``density`` (tier-1 score per cell, i.e. per joule of re-programming: the greedy rule for a
    knapsack). Ignored without an energy budget. ``score`` is the default because it was
    measured first; docs/benchmarks.md compares both at equal energy."""

    pe_score: str = "grad"
    """Tier-1 PE ranking: ``grad`` (accumulated gradient saliency, see the module docstring) or
    ``random`` (a fixed-seed random ranking, the ablation's control)."""

    spare_pes: bool = False
    """Write each selected PE into a spare PE instead of rewriting the backbone's: earlier tasks
    never see this task's weights on the chip and task switches write nothing, at the area of one
    spare PE per selected PE; re-programmed cells then count every cell of the selected PEs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        b = self.pe_budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0:
            raise ConfigError(f"{name}.pe_budget must be a fraction in [0, 1], got {b!r}")
        self.pe_budget = float(b)
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"{name}.warmup_steps must be an integer >= 0, got {w!r}")
        if not (isinstance(self.weight_lr, (int, float)) and not isinstance(self.weight_lr, bool)
                and 0 < self.weight_lr <= 1e3):  # 1e38 overflowed inside Adam, as lr did
            raise ConfigError(f"{name}.weight_lr must be in (0, 1e3], got {self.weight_lr!r}")
        e = self.energy_budget_j
        if e is not None and (isinstance(e, bool) or not isinstance(e, (int, float))
                              or not math.isfinite(e) or e < 0):
            raise ConfigError(f"{name}.energy_budget_j must be a number of joules >= 0 or null, "
                              f"got {e!r}")
        if not isinstance(self.energy_preset, str):
            raise ConfigError(f"{name}.energy_preset must be a preset name, got "
                              f"{self.energy_preset!r}")
        if self.energy_preset != XMA2Config.energy_preset or e is not None:
            from xbm.hardware.energy import get_preset

            try:  # an unknown preset fails at config time, not mid-task (nor is it ignored)
                get_preset(self.energy_preset)
            except XbmError as exc:
                raise ConfigError(f"{name}.energy_preset: {exc}") from None
        if self.energy_rank not in ENERGY_RANKS:
            raise ConfigError(f"{name}.energy_rank must be one of {', '.join(ENERGY_RANKS)}, "
                              f"got {self.energy_rank!r}")
        if self.pe_score not in PE_SCORES:
            raise ConfigError(f"{name}.pe_score must be one of {', '.join(PE_SCORES)}, "
                              f"got {self.pe_score!r}")
        if self.pe_score == "grad" and w == 0 and b > 0:
            raise ConfigError(f"{name}: pe_score 'grad' needs warmup_steps >= 1 to gather "
                              "gradients; use pe_score 'random' for a selection without warm-up")
        if not isinstance(self.spare_pes, bool):
            raise ConfigError(f"{name}.spare_pes must be true or false")
        if e is not None and b == 0:  # _choose takes no PE at a zero budget, whatever the joules
            raise ConfigError(f"{name}: energy_budget_j={e!r} with pe_budget 0 re-programs "
                              "nothing (the energy budget caps the PEs pe_budget allows); set "
                              "pe_budget > 0, or energy_budget_j null")


def pe_grid(layer: nn.Module) -> tuple[int, int, torch.Tensor]:
    """(PE rows, PE cols, (row_tiles, Cout) tensor of each crossbar column's flat PE index).

    A logical output column j sits in column tile ``j // spec.logical_cols`` (a crossbar holds
    whole weights, ``xbm.hardware.mapping.column_tile_index``); the grid's size matches
    ``LayerMapping.pes``.
    """
    spec = layer.spec
    rt, cout = layer.row_tiles, layer.matrix_cols
    ct = num_col_tiles(cout, spec)
    npr, npc = math.ceil(rt / spec.pe_rows), math.ceil(ct / spec.pe_cols)
    row_pe = torch.arange(rt) // spec.pe_rows
    col_pe = column_tile_index(cout, spec) // spec.pe_cols
    return npr, npc, row_pe[:, None] * npc + col_pe[None, :]


@register_method("xma2")
class XMA2(XMA):
    """Tier 1: fine-tune and re-program the top PEs under a budget; tier 2: XMA on the rest."""

    pure_column_scale = False  # its forward counts steps and hooks the gradient (tier 1)
    config_class = XMA2Config
    reprograms_cells = True
    trains_backbone_weights = True
    description = ("2-tier: top PEs (pe_budget) fine-tuned and re-programmed; XMA shift mask on "
                   "the frozen PEs")
    config: XMA2Config

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        self._layers: list[tuple[nn.Module, nn.Module]] = []
        self._selected = False
        self._finished = False

    def _forget_layers(self) -> None:
        # the layers of a model that is gone: their PEs would count in K and in the selection
        if not self._finished:
            self._layers = []  # rebound, not cleared: a copy.copy shares the list
            self._selected = False

    # -- state ------------------------------------------------------------------------------
    def create_layer_state(self, layer: nn.Module) -> nn.Module:
        if self._finished:
            raise XbmError("an XMA2 method object holds one task's PE selection; create a new "
                           "one per task (MultiTaskModel.add_task does when given the name)")
        state = super().create_layer_state(layer)
        npr, npc, col_pe = pe_grid(layer)
        dev = layer.weight.device
        state.register_buffer("column_pe", col_pe.to(dev), persistent=False)
        state.register_buffer("pe_mask", torch.zeros(npr, npc, dtype=torch.bool, device=dev))
        state.register_buffer("pe_score", torch.zeros(npr, npc, dtype=layer.weight.dtype,
                                                       device=dev))
        state.register_buffer("phase", torch.zeros(1, dtype=torch.uint8, device=dev))
        if self.config.pe_budget > 0:
            state.weight = nn.Parameter(layer.weight.detach().clone())
        state._steps = 0
        state._step_version = -1
        state._step_score = None
        state._grad_acc = None
        self._layers.append((layer, state))
        return state

    def selected_columns(self, state: nn.Module, pe_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """(row_tiles, Cout) bool: crossbar columns inside the selected PEs (this task's, or those
        of ``pe_mask``)."""
        pm = state.pe_mask if pe_mask is None else pe_mask.to(torch.bool)
        return pm.reshape(-1).to(state.column_pe.device)[state.column_pe]

    @staticmethod
    def _per_pe(state: nn.Module, per_col: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Sum a (row_tiles, Cout) per-column quantity into a flat per-PE vector."""
        out = torch.zeros(state.pe_mask.numel(), dtype=dtype, device=state.column_pe.device)
        return out.index_add_(0, state.column_pe.reshape(-1), per_col.reshape(-1).to(dtype))

    def _weight_mask(self, layer: nn.Module, sel_cols: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(layer.weight)
        return apply_column_mask(ones, sel_cols.to(ones.dtype), layer.spec.rows) > 0

    def _selection(self, layer: nn.Module, state: nn.Module
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(selected columns, per-weight mask of the selected PEs), or None without any.

        Cached on the PE mask's storage and version counter, so a forward costs no device sync and
        no per-weight mask rebuild, while selection, bundle loading (``load_state_dict`` copies in
        place) and device moves all invalidate it.
        """
        pm = state.pe_mask
        # inference mode too: masks built under torch.inference_mode are inference tensors,
        # which a later training step cannot save for backward
        key = (pm.data_ptr(), pm._version, layer.weight.data_ptr(),
               torch.is_inference_mode_enabled())
        cached = state.__dict__.get("_sel_cache")
        if cached is None or cached[0] != key:
            if bool(pm.any()):
                sel = self.selected_columns(state)
                value = (sel, self._weight_mask(layer, sel))
            else:
                value = None
            cached = (key, value)
            state.__dict__["_sel_cache"] = cached
        return cached[1]

    def graph_ready(self) -> bool:
        """After the PE selection: until then a Python step count drives the warm-up and the
        selection (which a graph replay would skip); afterwards every step is the same kernels
        (the selection masks are cached, ``_tick`` returns at once)."""
        return self._selected

    # -- tier-1 bookkeeping -----------------------------------------------------------------
    def _collecting(self) -> bool:
        return self.config.pe_budget > 0 and self.config.pe_score == "grad"

    @staticmethod
    def pe_cells(layer: nn.Module, state: nn.Module) -> torch.Tensor:
        """Flat per-PE count of the cells that hold this layer's weights (ragged tiles count only
        their real rows)."""
        per_col = column_sum_over_tiles(torch.ones_like(layer.weight), layer.spec.rows)
        return XMA2._per_pe(state, per_col, torch.long).cpu() * layer.spec.cells_per_weight

    def _choose(self, flat: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Global top-K by score (K from ``pe_budget``), then the energy budget if one is set,
        walked in ``energy_rank`` order."""
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        k = math.floor(self.config.pe_budget * flat.numel() + 1e-9)
        if k <= 0:
            if self.config.pe_budget > 0 and flat.numel():  # a small model: say it, once
                warnings.warn(
                    f"xma2: pe_budget {self.config.pe_budget:g} of this model's {flat.numel()} "
                    "PEs is 0 PEs (K = floor(budget x PEs)): nothing is re-programmed and the "
                    "task is XMA plus its PE mask bits; set pe_budget to at least "
                    f"{_round_up(1 / flat.numel())} to re-program one PE, or use xma",
                    XbmWarning, stacklevel=user_stacklevel())
            return chosen
        budgeted = self.config.energy_budget_j is not None
        key = flat
        if budgeted and self.config.energy_rank == "density":
            key = flat / cells.clamp(min=1).to(flat.dtype)
        order = torch.argsort(key, descending=True, stable=True)
        order = order[flat[order] > 0]
        if not budgeted:
            chosen[order[:k]] = True
            return chosen
        from xbm.hardware.energy import get_preset

        preset = get_preset(self.config.energy_preset)
        per_cell = preset.write_energy_per_cell_j()
        # reserve the mask write at its largest (no PE selected), so deploy energy fits too
        bits = sum(st.pe_mask.numel() + self.config.bits_per_column * st.score.numel()
                   for _, st in self._layers)
        mask_j = bits * preset.periphery.mask_bit_write_energy_j
        spare = self.config.energy_budget_j - mask_j
        if spare < 0:  # the mask write alone overruns: say so rather than exceed it silently
            warnings.warn(
                f"xma2: energy_budget_j {self.config.energy_budget_j:.3g} J is below the "
                f"{mask_j:.3g} J that writing the task's mask bits takes ({bits:,} bits, preset "
                f"{self.config.energy_preset!r}): no PE is re-programmed and the task's deploy "
                f"energy, its mask write, exceeds the budget; set at least "
                f"{_round_up(mask_j)} J",
                XbmWarning, stacklevel=user_stacklevel())
        left = int(math.floor(spare / per_cell + 1e-9)) if spare > 0 else 0
        taken = 0
        for i in order.tolist():
            if taken >= k:
                break
            c = int(cells[i])
            if c <= left:
                chosen[i] = True
                left -= c
                taken += 1
        return chosen

    def _tick(self, layer: nn.Module, state: nn.Module) -> bool:
        """Count a training step (a forward with grad enabled and trainable scores, after the
        optimizer last changed the layer's column scores); select PEs once the warm-up is over.
        Returns True when this forward's gradient feeds the tier-1 statistics."""
        # a step trains the scores: grad mode on and the scores trainable. Not layer.training:
        # a loop that keeps the model in eval mode (frozen BatchNorm, Piggyback's convention)
        # never ended the warm-up, and the task silently stayed plain XMA
        if not (torch.is_grad_enabled() and state.score.requires_grad) or self._selected:
            return False
        if state.phase.item():  # a task loaded from a bundle: its selection is final
            self._selected = True
            return False
        score, last = state.score.detach(), state._step_score
        # the optimizer's in-place update bumps the version; a fused Adam's does not, so the
        # values are compared too (warm-up forwards only; a moved model counts a new step)
        if state._steps and score._version == state._step_version and last is not None and \
                last.device == score.device and torch.equal(score, last):
            # no optimizer step since this layer's last forward: the same training step (a
            # layer used twice per forward, or gradient accumulation), counted once
            return self._collecting()
        if state._steps >= self.config.warmup_steps:
            self.select()
            return False
        state._steps += 1
        state._step_version = score._version
        state._step_score = score.clone()
        return self._collecting()

    @staticmethod
    def _accumulate(state: nn.Module, grad: torch.Tensor) -> None:
        g = grad.detach()
        if state._grad_acc is None:
            state._grad_acc = g.clone()
        else:
            if state._grad_acc.device != g.device:  # a plain attribute: .to() left it behind
                state._grad_acc = state._grad_acc.to(g.device)
            state._grad_acc.add_(g)

    def _importance(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        """Flat per-PE tier-1 score from the accumulated gradients (zeros without any)."""
        if state._grad_acc is None:
            return torch.zeros_like(state.pe_score).reshape(-1)
        acc = state._grad_acc.to(state.column_pe.device)
        per_col = column_sum_over_tiles(acc.abs(), layer.spec.rows)
        return self._per_pe(state, per_col, state.pe_score.dtype)

    @torch.no_grad()
    def select(self) -> None:
        """Choose the task's PEs over the whole model (global top-K) and fold the current column
        levels into the chosen PEs' weights. Idempotent; called by the first training forward
        after the warm-up (a task still in it has none: it is XMA until then)."""
        if self._selected:
            return
        layers = self._layers
        # under torchrun the hooks saw this rank's batches only; every rank must choose alike
        from xbm.train.distributed import sum_over_ranks

        sum_over_ranks(st._grad_acc for _, st in layers if st._grad_acc is not None)
        scores = [self._importance(layer, st) for layer, st in layers]
        flat = torch.cat([s.cpu() for s in scores]) if scores else torch.zeros(0)
        if self.config.pe_score == "random" and flat.numel():
            gen = torch.Generator().manual_seed(0)
            sizes = torch.cat([torch.bincount(st.column_pe.reshape(-1).cpu(),
                                              minlength=st.pe_mask.numel()) for _, st in layers])
            flat = torch.rand(flat.numel(), generator=gen) * (sizes > 0)
        cells = (torch.cat([self.pe_cells(layer, st) for layer, st in layers]) if layers
                 else torch.zeros(0, dtype=torch.long))
        chosen = self._choose(flat, cells)
        start = 0
        for layer, st in layers:
            n = st.pe_mask.numel()
            st.pe_score.copy_(flat[start:start + n].view_as(st.pe_score))
            st.pe_mask.copy_(chosen[start:start + n].view_as(st.pe_mask))
            start += n
            st.phase.fill_(1)
            st._grad_acc = st._step_score = None
            selection = self._selection(layer, st)
            if selection is not None:
                # Inside the chosen PEs the column scale becomes 1 and the weights take over
                # what the warm-up's levels did: W * level, the same function.
                scaled = apply_column_mask(layer.weight, self.levels(st), layer.spec.rows)
                st.weight.copy_(torch.where(selection[1], scaled, layer.weight))
        self._selected = True

    # -- forward ----------------------------------------------------------------------------
    def _column_levels(self, state: nn.Module, sel: torch.Tensor | None) -> torch.Tensor:
        lv = self.levels(state)
        return lv if sel is None else torch.where(sel, torch.ones_like(lv), lv)

    def effective_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        collect = self._tick(layer, state)
        selection = self._selection(layer, state)
        if selection is None:
            eff = apply_column_mask(layer.weight, self.levels(state), layer.spec.rows)
            if collect and eff.requires_grad:
                eff.register_hook(partial(self._accumulate, state))
            return eff
        sel, wmask = selection
        base = apply_column_mask(layer.weight, self._column_levels(state, sel), layer.spec.rows)
        return torch.where(wmask, state.weight, base)

    def programmed_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        selection = self._selection(layer, state)
        if selection is None:
            return layer.weight
        return torch.where(selection[1], state.weight, layer.weight)

    def backbone_cells(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        """What the backbone's own crossbars hold while this task runs (spare PEs leave them)."""
        return layer.weight if self.config.spare_pes else self.programmed_weight(layer, state)

    def spare_weights(self, layer: nn.Module, state: nn.Module) -> torch.Tensor | None:
        """With ``spare_pes`` the selected PEs' weights, which live in spare PEs."""
        if not self.config.spare_pes:
            return None
        selection = self._selection(layer, state)
        return None if selection is None else selection[1]

    def column_scale(self, layer: nn.Module, state: nn.Module) -> torch.Tensor | None:
        selection = self._selection(layer, state)
        return self._column_levels(state, None if selection is None else selection[0])

    # -- accounting -------------------------------------------------------------------------
    def mask_bits(self, layer: nn.Module, state: nn.Module) -> int:
        """Tier 1: one bit per PE (re-programmed or not); tier 2: XMA's bits per column of the
        frozen PEs. The re-programmed weights themselves are cells, counted by
        :meth:`reprogrammed_cells`, not mask memory. At ``pe_budget`` 0 there is no tier 1."""
        return self._bits(state, state.score.numel() - int(self.selected_columns(state).sum()))

    def planned_mask_bits(self, layer: nn.Module, state: nn.Module,
                          rewrite_fraction: float) -> int:
        """Tier 1's bit per PE, plus tier 2's bits on the columns left frozen when
        ``rewrite_fraction`` of the crossbar columns (whole PEs) are re-programmed: a fresh state
        has no selection yet, so :meth:`mask_bits` would count every column as frozen."""
        return self._bits(state, round(state.score.numel() * (1 - rewrite_fraction)))

    def _bits(self, state: nn.Module, frozen_columns: int) -> int:
        """Tier 1 (one bit per PE, none at budget 0) plus tier 2 on ``frozen_columns``."""
        tier1 = state.pe_mask.numel() if self.config.pe_budget > 0 else 0
        return tier1 + self.config.bits_per_column * frozen_columns

    def reprogrammed_cells(self, layer: nn.Module, state: nn.Module) -> int:
        selection = self._selection(layer, state)
        if selection is None:
            return 0
        wmask = selection[1]
        if self.config.spare_pes:
            n = int(wmask.sum())
        else:
            n = int(((state.weight.detach() != layer.weight) & wmask).sum())
        return n * layer.spec.cells_per_weight

    def trainable_count(self, layer: nn.Module, state: nn.Module) -> int:
        """Column scores of the frozen PEs plus the selected PEs' weights (the dense copy is
        storage): a selected PE's columns run at scale 1, so their scores learn nothing, and
        ``mask_bits`` leaves them out too."""
        selection = self._selection(layer, state)
        # a single level (levels=[1]) leaves every score dead, as in XMA: they still step (the
        # warm-up counts optimizer steps on them) but learn nothing the output sees
        scores = state.score.numel() if len(self.config.levels) > 1 else 0
        if selection is None:
            return scores
        return (scores - int(selection[0].sum()) if scores else 0) + int(selection[1].sum())

    def selected_pes(self, layer: nn.Module, state: nn.Module) -> int:
        """PEs this task re-programs in the layer (spare PEs used, when ``spare_pes``)."""
        return int(state.pe_mask.sum())

    # -- bundles ----------------------------------------------------------------------------
    def pack_state(self, layer: nn.Module, state: nn.Module, tensors: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
        """Store only the selected PEs' weights (``weight_selected``, in weight order); the rest of
        the dense copy is the backbone, which the bundle's backbone hash already pins."""
        if "weight" not in tensors:
            return tensors
        out = dict(tensors)
        weight = out.pop("weight")
        selection = self._selection(layer, state)
        out["weight_selected"] = (weight.new_zeros(0) if selection is None
                                  else weight[selection[1]].contiguous())
        if not int(state.phase) and state._steps:
            # saved inside the warm-up: its step count and gradient sum, so that training the
            # loaded task continues the warm-up where it stopped and selects the same PEs
            out[WARMUP_STEPS_KEY] = torch.tensor([state._steps], dtype=torch.int64)
            if state._grad_acc is not None:
                out[WARMUP_GRAD_KEY] = state._grad_acc.detach().to(weight.dtype).contiguous()
        return out

    def unpack_state(self, layer: nn.Module, state: nn.Module, tensors: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        if "weight_selected" not in tensors:
            return tensors
        out = dict(tensors)
        self._unpack_warmup(layer, state, out)
        sel_w = out.pop("weight_selected")
        pe_mask = out.get("pe_mask")
        if pe_mask is None:
            raise BundleError("XMA2 state lacks a pe_mask of shape "
                              f"{tuple(state.pe_mask.shape)}")
        if tuple(pe_mask.shape) != tuple(state.pe_mask.shape):
            raise BundleError(
                f"XMA2 pe_mask has shape {tuple(pe_mask.shape)}, this spec's PE grid is "
                f"{tuple(state.pe_mask.shape)}; a bundle saved before column tiles held whole "
                "weights (xbm before 2026-11-27, on a spec whose weight columns do not divide "
                "cols) must be adapted again")
        wmask = self._weight_mask(layer, self.selected_columns(state, pe_mask))
        if sel_w.dim() != 1 or sel_w.numel() != int(wmask.sum()):
            raise BundleError(f"weight_selected holds {sel_w.numel()} values, the pe_mask selects "
                              f"{int(wmask.sum())} weights")
        weight = layer.weight.detach().clone()
        weight[wmask] = sel_w.to(weight.dtype).to(weight.device)
        out["weight"] = weight
        return out

    def _unpack_warmup(self, layer: nn.Module, state: nn.Module,
                       out: dict[str, torch.Tensor]) -> None:
        """Pop a mid-warm-up bundle's step count and gradient sum from ``out`` into ``state``."""
        steps = out.pop(WARMUP_STEPS_KEY, None)
        grad = out.pop(WARMUP_GRAD_KEY, None)
        if steps is None:
            if grad is not None:
                raise BundleError(f"{WARMUP_GRAD_KEY} without {WARMUP_STEPS_KEY}")
            return
        phase = out.get("phase")
        if phase is not None and phase.numel() == 1 and int(phase.reshape(-1)[0]):
            raise BundleError(f"{WARMUP_STEPS_KEY} on a task whose PEs are already selected")
        if steps.dtype != torch.int64 or steps.numel() != 1:
            raise BundleError(f"{WARMUP_STEPS_KEY} must be one int64, got {steps.numel()} "
                              f"{steps.dtype} value(s)")
        n = int(steps.reshape(-1)[0])
        if not 0 < n <= self.config.warmup_steps:
            raise BundleError(f"{WARMUP_STEPS_KEY} is {n}, outside 1..warmup_steps="
                              f"{self.config.warmup_steps}")
        if grad is not None:
            w = layer.weight
            if tuple(grad.shape) != tuple(w.shape) or not grad.is_floating_point():
                raise BundleError(f"{WARMUP_GRAD_KEY} has shape {tuple(grad.shape)} "
                                  f"({grad.dtype}), the layer's weight {tuple(w.shape)}")
            if not bool(torch.isfinite(grad).all()):
                raise BundleError(f"{WARMUP_GRAD_KEY} holds NaN or infinite values")
            grad = grad.to(w.dtype).to(w.device)
            from xbm.train import distributed as xdist

            if xdist.rank() != 0:  # the bundle holds every rank's sum: counted once, on rank 0
                grad = torch.zeros_like(grad)
        state._steps = n
        state._grad_acc = grad

    # -- training hooks ---------------------------------------------------------------------
    def param_groups(self, state_params: list[nn.Parameter]) -> list[dict]:
        weights = {id(st.weight) for _, st in self._layers if hasattr(st, "weight")}
        scores = [p for p in state_params if id(p) not in weights]
        wts = [p for p in state_params if id(p) in weights]
        groups = []
        if scores:  # with one level too: their optimizer steps are how the warm-up counts
            groups.append({"params": scores, "lr": self.config.lr})
        if wts:
            groups.append({"params": wts, "lr": self.config.weight_lr})
        return groups

    def on_task_end(self, model: nn.Module, task: str) -> None:
        """End of a ``train_task`` call. A task still in its warm-up re-programs nothing yet
        (no PE is selected, so it is exactly XMA) and stays open: a later ``train_task`` call
        continues the warm-up and then selects (training in short chunks, say to evaluate
        between them, used to close the selection for good after the first chunk)."""
        if not self._selected:
            from xbm.train import distributed as xdist

            if xdist.world_size() > 1:
                # each rank summed its own batches (select() adds them up): gather them on rank
                # 0 now, which saves the bundle, so that a bundle saved here holds them all
                accs = [st._grad_acc for _, st in self._layers if st._grad_acc is not None]
                xdist.sum_over_ranks(accs)
                if xdist.rank() != 0:
                    for acc in accs:
                        acc.zero_()
            steps = max((st._steps for _, st in self._layers), default=0)
            if self.config.pe_budget > 0 and steps <= self.config.warmup_steps:
                warnings.warn(
                    f"xma2 task {task!r} has trained {steps} step(s), not more than "
                    f"warmup_steps={self.config.warmup_steps}: no PE is re-programmed yet (the "
                    "task is plain XMA until a later train_task call ends the warm-up, on "
                    "this model or after the task's bundle is loaded and set_trainable); steps "
                    "are counted on the ideal training path (effective_weight)",
                    XbmWarning, stacklevel=user_stacklevel())
        self._finished = True


# -- the shared chip -----------------------------------------------------------------------
@contextlib.contextmanager
def chip_without_restore(mtm: MultiTaskModel, written: Sequence[str]) -> Iterator[None]:
    """Temporarily put into the backbone the cells that ``written`` tasks rewrote (in order), as a
    chip that never restores does; evaluate an earlier task inside to measure what it loses.

    A task evaluated inside still reads its own re-programmed PEs (switching to it writes them) but
    sees every other written task's PEs in place of the backbone's weights. What a task leaves in
    the backbone's cells is the cost model's :func:`xbm.hardware.cost.cells_view` (spare PEs leave
    nothing). The backbone tensors are restored bit-exactly on exit. The cells a restoring switch
    rewrites are the cost model's ``switch_reprogrammed_cells`` (``task_costs(..., reference=)``).
    """
    from xbm.hardware.cost import cells_view
    from xbm.nn import CrossbarLayer

    saved: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for mod in mtm.model.modules():
                if not isinstance(mod, CrossbarLayer):
                    continue
                original = mod.weight.detach().clone()
                chip = original.clone()
                for t in written:
                    cells = cells_view(mod, t)
                    chip = torch.where(cells != original, cells, chip)
                saved.append((mod, original))
                mod.weight.copy_(chip)
        yield
    finally:
        with torch.no_grad():
            for mod, original in saved:
                mod.weight.copy_(original)
