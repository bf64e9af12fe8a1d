"""XMA (Zhang et al., DAC 2022): a shift-based, multi-level mask per crossbar column.

Each crossbar column (one logical output column inside one row tile, XBM's unit) gets a level from
a small set of powers of two, plus 0. Scaling a digitised partial sum by 2^k is a change of the
shift amount in the column's existing shift-and-add unit, and level 0 gates the column's ADC as in
XBM, so no cell is rewritten and the mask is ceil(log2(len(levels))) bits per column.

The paper's levels, bit count and quantiser are not public (papers.md section 6, open question 4).
What this module assumes, and why:

* **Levels** default to {0, 2^-3, 2^-2, 2^-1, 1}: off, three right shifts and the identity (5
  levels, 3 bits per column). Right shifts only: a right shift of the digitised partial sum can
  never overflow the accumulator, while each left shift needs one more bit. Accuracy does not
  decide it: against this set the up-shift set {0, 1/4, 1/2, 1, 2} scored +0.42, +0.12 and
  -0.34 points on the last three default backbones (mean of MNIST and Animal-MNIST, one seed
  each), i.e. noise, and 74.1% against 82.6% under the old 47-step recipe (docs/benchmarks.md,
  "XMA and XMA2 ablations"). ``levels`` takes any other set.
* **Scores in log2 space.** Each column holds one real score s, initialised to 0, so every column
  starts at level 2^0 = 1: the task starts as the pretrained backbone, as Piggyback and XBM start
  with an all-ones mask. The forward rounds s to the nearest allowed exponent; level 0 sits one
  step below the smallest non-zero exponent e_min in that ladder, i.e. s < e_min - 1/2 gives 0.
* **Straight-through estimator with identity backward** (Piggyback's and XBM's estimator), so a
  column at level 0 still receives gradient and can come back.
* **Learning rate 0.3.** Adam moves a score by about lr per step whatever the gradient scale, and
  a level change needs a move of 1/2 in log2 space (one level), against 5e-3 for XBM's threshold
  at lr 1e-3 (5 steps per flip). With the demo's two adaption epochs 0.3 scored 0.20 above 0.6
  on the mean of three seeds (at one epoch 0.6 had been 0.45 above; "Two adaption epochs" and
  "Learning rates, re-tuned" in docs/benchmarks.md); the figures below are from earlier
  backbones at one epoch. With one epoch of the demo (188 cosine-decayed steps per task, batch 32)
  lr 0.1 / 0.3 / 0.5 / 1.0 gave 90.68 / 91.97 / 91.63 / 90.38% (three tasks); with 47 steps
  (batch 128) a column needed lr 1 to cross the ladder: lr 0.1 / 0.3 / 1 / 3 gave 68.9 / 80.9 /
  82.6 / 81.4% (ablation, mean of two tasks).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xbm.config import is_finite_number
from xbm.errors import ConfigError
from xbm.hardware.mapping import apply_column_mask
from xbm.methods.base import AdaptionMethod, MethodConfig, register_method

DEFAULT_LEVELS: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0)


def is_power_of_two(x: float) -> bool:
    """True for 2^k with integer k (k may be negative): the values a shifter can apply."""
    if not (is_finite_number(x) and x > 0):  # an int beyond any float: not finite, no raise
        return False
    mantissa, _ = math.frexp(float(x))
    return mantissa == 0.5


MAX_SHIFT = 16
"""Levels lie within 2^-16..2^16: a shift of a digitised partial sum by more than 16 bits
leaves an 8-16-bit datapath, and 2^-200 (say) is 0 in float32, so a configured level would not be
the one applied."""


def validate_levels(levels: Any, owner: str = "XMAConfig") -> list[float]:
    """Check a level set and return it as a list of floats.

    A shift-and-add unit can only apply powers of two or gate a column, the quantiser needs an
    ordered ladder, and the task must be able to start as the backbone (level 1), so each of
    these is a configuration error rather than something to repair silently.

    Raises:
        ConfigError: not a non-empty list; an entry is neither 0 nor a power of two; not sorted
            ascending without duplicates; or 1 is missing.
    """
    if hasattr(levels, "tolist") and not isinstance(levels, (list, tuple)):
        levels = levels.tolist()  # a numpy array or a tensor, as np.linspace gives
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple)):
        raise ConfigError(f"{owner}.levels must be a list such as [0, 0.25, 0.5, 1, 2], "
                          f"got {levels!r}")
    if not levels:
        raise ConfigError(f"{owner}.levels must not be empty; e.g. [0, 0.25, 0.5, 1, 2]")
    out: list[float] = []
    for v in levels:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numpy's floats too
            raise ConfigError(f"{owner}.levels holds {v!r}; every level must be a number")
        if v != 0 and not is_power_of_two(v):
            raise ConfigError(
                f"{owner}.levels holds {v!r}; every level must be 0 or a power of two "
                "(2^k, k an integer), the only scales a shift can apply"
            )
        if v != 0 and abs(math.log2(float(v))) > MAX_SHIFT:
            raise ConfigError(
                f"{owner}.levels holds {v!r} = 2^{int(math.log2(float(v)))}; a shift-and-add "
                f"unit shifts by a few bits, so levels lie within 2^-{MAX_SHIFT}..2^{MAX_SHIFT} "
                "(further out they also leave float32's exact range: 0 or inf)"
            )
        out.append(float(v))
    if any(b <= a for a, b in zip(out, out[1:], strict=False)):
        raise ConfigError(f"{owner}.levels must be sorted ascending without duplicates, "
                          f"got {levels!r}")
    if 1.0 not in out:
        raise ConfigError(f"{owner}.levels must contain 1 so that the task starts as the "
                          f"pretrained backbone, got {levels!r}")
    return out


def level_bits(num_levels: int) -> int:
    """Mask bits per column for ``num_levels`` levels: ceil(log2(n)) (0 for a single level)."""
    return math.ceil(math.log2(num_levels)) if num_levels > 1 else 0


def shift_tables(exponents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket boundaries, level values) of :func:`shift_quantize` for ``exponents``: the
    midpoints between consecutive exponents (nearest rounding in log2 space) and 2^exponent."""
    return (exponents[1:] + exponents[:-1]) / 2, torch.exp2(exponents)


def shift_quantize(scores: torch.Tensor, mids: torch.Tensor, values: torch.Tensor,
                   zero_below: float) -> torch.Tensor:
    """Log2-space scores -> the nearest allowed level (no autograd). Ties go to the larger
    level, as round-half-up would; scores under ``zero_below`` give 0."""
    levels = values[torch.bucketize(scores, mids, right=True)]
    if zero_below != -math.inf:
        # a NaN score (a diverged run) gives 0 too, as XBM leaves a NaN column off; bucketize
        # puts NaN in the top bucket, a column at its largest scale
        levels = levels.masked_fill((scores < zero_below) | scores.isnan(), 0.0)
    else:
        levels = torch.where(scores.isnan(), values[0], levels)
    return levels.to(scores.dtype)


class ShiftQuantizeSTE(torch.autograd.Function):
    """Log2-space score -> nearest allowed level; the backward is the identity.

    ``exponents`` are the non-zero levels' log2 values, ascending; ``zero_below`` is the score
    under which the level is 0 (``-inf`` when 0 is not a level).
    """

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, exponents: torch.Tensor,
                zero_below: float) -> torch.Tensor:
        return shift_quantize(scores.detach(), *shift_tables(exponents), zero_below)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


@dataclass
class XMAConfig(MethodConfig):
    """XMA's shift levels and score recipe. Every default is an assumption: the paper does not
    publish its levels, quantiser or training recipe (papers.md section 6)."""

    levels: list[float] = field(default_factory=lambda: list(DEFAULT_LEVELS))
    """Allowed column scales: 0 and/or powers of two within 2^-16..2^16, ascending, containing
    1. Default
    {0, 2^-3, 2^-2, 2^-1, 1}: right shifts only, so no accumulator overflow; 3 bits per column
    (module docstring; the paper's set is not public)."""

    score_init: float = 0.0
    """Initial log2-space score. 0 = level 1 everywhere, so the task starts as the backbone; a
    score that quantises to another level is refused."""

    lr: float = 0.3
    """Adam learning rate of the log2 scores. One level is 1/2 away in score space (XBM's threshold
    is 5e-3 away at lr 1e-3), and Adam steps are ~lr whatever the gradient scale. With the
    demo's two adaption epochs (session 13, three seeds, mean new-task accuracy) **0.3** / 0.6
    gave **96.91** / 96.71 (0.6 lower on seed 1 by 0.73, within 0.13 on the others). At one
    epoch 0.6 was the better (0.15 / 0.3 / 0.6: 94.68 / 95.07 / 95.52 on session 11's
    backbones), except on fp32 backbones, where 0.3 scored 0.29 and 0.43 higher
    (docs/benchmarks.md, "Two adaption epochs", "Learning rates, re-tuned" and "An AVX2-only
    CPU, emulated"): fewer steps want the larger rate."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.levels = validate_levels(self.levels, type(self).__name__)
        if not (isinstance(self.score_init, (int, float)) and math.isfinite(self.score_init)
                and abs(self.score_init) <= 1e6):  # 1e308 overflowed the float32 scores
            raise ConfigError(f"{type(self).__name__}.score_init must be a finite number within "
                              f"±1e6, got {self.score_init!r}")
        # in float32 too, the scores' dtype: 0.4999999999 rounds to a tie point there (0.5)
        # and started every column at level 2 of {0.5, 1, 2}, although float64 said 1
        start = 1.0
        for dt in (torch.float64, torch.float32):
            e = torch.tensor(self.exponents or [0.0], dtype=dt)
            got = float(shift_quantize(torch.tensor([float(self.score_init)], dtype=dt),
                                       *shift_tables(e), self.zero_below)[0])
            start = got if got != 1.0 else start
        if start != 1.0:  # the task must start as the backbone, as levels must contain 1
            raise ConfigError(f"{type(self).__name__}.score_init {self.score_init!r} starts every "
                              f"column at level {start:g}, not 1, so the task would not start "
                              "as the pretrained backbone; use a score near 0 (the default)")

    # -- derived --------------------------------------------------------------------------
    @property
    def exponents(self) -> list[float]:
        """log2 of the non-zero levels, ascending."""
        return [math.log2(v) for v in self.levels if v > 0]

    @property
    def zero_below(self) -> float:
        """Scores under this give level 0: half a step below the smallest non-zero exponent, as
        if 0 took the place of 2^(e_min - 1) in the ladder. -inf when 0 is not a level."""
        if self.levels[0] != 0.0:
            return -math.inf
        exps = self.exponents
        return exps[0] - 0.5 if exps else math.inf

    @property
    def bits_per_column(self) -> int:
        return level_bits(len(self.levels))


@register_method("xma")
class XMA(AdaptionMethod):
    """Crossbar column-wise shift mask: each column's ADC output is scaled by a level 2^k or 0."""

    pure_column_scale = True
    config_class = XMAConfig
    description = ("crossbar column-wise shift mask (levels 0/2^k, ceil(log2 L) bits per column); "
                   "no rewrites")
    config: XMAConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        super().__init__(config)
        # per (device, dtype): the exponents and their shift_tables, built once
        self._tables: dict[tuple[str, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def create_layer_state(self, layer: nn.Module) -> nn.Module:
        state = nn.Module()
        shape = (layer.row_tiles, layer.matrix_cols)
        state.score = nn.Parameter(
            torch.full(shape, float(self.config.score_init), dtype=layer.weight.dtype,
                       device=layer.weight.device)
        )
        return state

    def _tables_for(self, ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(exponents, bucket boundaries, level values) on ``ref``'s device and dtype."""
        key = (str(ref.device), ref.dtype)
        t = self._tables.get(key)
        if t is None:
            exps = self.config.exponents or [0.0]  # a {0}-only set never reads it
            e = torch.tensor(exps, dtype=ref.dtype, device=ref.device)
            t = self._tables[key] = (e, *shift_tables(e))
        return t

    def levels(self, state: nn.Module) -> torch.Tensor:
        """The (row_tiles, Cout) quantised column levels, differentiable through the STE."""
        return ShiftQuantizeSTE.apply(state.score, self._tables_for(state.score)[0],
                                      self.config.zero_below)

    def effective_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        # quantised inside the column mask's own autograd node (bit-identical to
        # apply_column_mask(weight, self.levels(state), R); one Python node per layer fewer)
        # the tables are looked up here, outside the autograd node: built inside it (on a first
        # forward under torch.compile) they are tensors Dynamo refuses to see created there
        _, mids, values = self._tables_for(state.score)
        return apply_column_mask(layer.weight, state.score, layer.spec.rows,
                                 quantize=functools.partial(
                                     shift_quantize, mids=mids, values=values,
                                     zero_below=self.config.zero_below))

    def _quantize(self, scores: torch.Tensor) -> torch.Tensor:
        """``ShiftQuantizeSTE``'s forward, with its tables built once per device and dtype (the
        reference tests/test_mapping.py checks the fused path against)."""
        _, mids, values = self._tables_for(scores)
        return shift_quantize(scores, mids, values, self.config.zero_below)

    def programmed_weight(self, layer: nn.Module, state: nn.Module) -> torch.Tensor:
        return layer.weight

    def column_scale(self, layer: nn.Module, state: nn.Module) -> torch.Tensor | None:
        return self.levels(state)

    def mask_bits(self, layer: nn.Module, state: nn.Module) -> int:
        return self.config.bits_per_column * state.score.numel()

    def trainable_count(self, layer: nn.Module, state: nn.Module) -> int:
        # a single level (levels=[1]) quantises every score to it: nothing the scores do reaches
        # the output, so they learn nothing (0 mask bits, no optimizer state; see param_groups)
        return super().trainable_count(layer, state) if len(self.config.levels) > 1 else 0

    def param_groups(self, state_params: list[nn.Parameter]) -> list[dict[str, Any]]:
        return super().param_groups(state_params) if len(self.config.levels) > 1 else []

    def masked_off_columns(self, layer: nn.Module, state: nn.Module) -> int:
        with torch.no_grad():
            return int((self.column_scale(layer, state) == 0).sum())

    def level_histogram(self, layer: nn.Module, state: nn.Module) -> dict[float, int]:
        """How many of the layer's columns sit at each level (for reports and ablations)."""
        with torch.no_grad():
            lv = self.column_scale(layer, state)
            return {v: int((lv == v).sum()) for v in self.config.levels}
