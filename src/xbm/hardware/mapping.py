"""Mapping of torch layers onto crossbar tiles: the canonical tiled view.

A Conv2d weight (Cout, Cin/groups, kh, kw) is the layer matrix with rows = Cin/groups*kh*kw inputs
(wordlines) and cols = Cout outputs; a Linear weight (out, in) has rows = in, cols = out. Rows are
zero-padded to a multiple of R and split into row tiles. Because torch stores weights output-major,
the tiled view is a *reshape* of the (Cout, rows) matrix to (Cout, row_tiles, R). A column mask is
stored and learned per crossbar column, (row_tiles, Cout); :func:`apply_column_mask` multiplies
it into the weight in the tile view where the rows fill whole tiles (or one tile), and otherwise
expands it over each column's rows into a transient (Cout, rows) tensor first: one multiply (and
at most one expansion) per layer, with a hand-written backward (see :class:`_ColumnMask`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from xbm.hardware.spec import CrossbarSpec

FilterFn = Callable[[str, nn.Module], bool]


def layer_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(rows, cols) of a Conv2d/Linear layer matrix."""
    w = module.weight
    if isinstance(module, nn.Conv2d):
        return int(w.shape[1] * w.shape[2] * w.shape[3]), int(w.shape[0])
    if isinstance(module, nn.Linear):
        return int(w.shape[1]), int(w.shape[0])
    raise TypeError(f"{type(module).__name__} has no crossbar mapping (Conv2d or Linear only)")


def num_row_tiles(rows: int, R: int) -> int:
    """Row tiles (crossbars stacked along the inputs) for a layer matrix with ``rows`` rows."""
    return math.ceil(rows / R)


def num_col_tiles(cols: int, spec: CrossbarSpec) -> int:
    """Column tiles (crossbars side by side) for ``cols`` logical output columns.

    A crossbar holds ``spec.logical_cols`` whole weights; a weight's slices never straddle two
    crossbars, so the bitlines left over when the physical columns per weight do not divide
    ``spec.cols`` stay unused (as in the simulator, ``xbm.hardware.simulate``).
    """
    return math.ceil(cols / spec.logical_cols)


def column_tile_index(cols: int, spec: CrossbarSpec,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The column tile (crossbar) holding each of ``cols`` logical output columns."""
    return torch.arange(cols, device=device) // spec.logical_cols


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The (Cout, rows) view of a Conv2d or Linear weight (outputs x inputs)."""
    return weight.reshape(weight.shape[0], -1)


def tile_view(weight: torch.Tensor, R: int) -> torch.Tensor:
    """Zero-pad and view a weight as (Cout, row_tiles, R). A copy only when rows % R != 0."""
    m = weight_matrix(weight)
    cout, rows = m.shape
    rt = num_row_tiles(rows, R)
    pad = rt * R - rows
    if pad:
        m = torch.nn.functional.pad(m, (0, pad))
    return m.reshape(cout, rt, R)


def from_tile_view(tiled: torch.Tensor, weight_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`tile_view`: drop the padding and restore the torch weight shape."""
    cout = tiled.shape[0]
    rows = math.prod(weight_shape[1:])
    return tiled.reshape(cout, -1)[:, :rows].reshape(weight_shape)


class _ColumnMask(torch.autograd.Function):
    """``weight * mask`` broadcast over each crossbar column's rows, with a hand-written backward;
    optionally quantising real-valued scores into the mask first (``quantize``: XBM's
    ``score > threshold``, XMA's nearest shift level), with the identity as its gradient (the
    straight-through estimator both use).

    Autograd through the obvious slice / multiply / concatenate version records about five more
    kernels per layer than Piggyback's one element-wise multiply (two multiplies, a concatenation
    and their backward slices and sums for a ragged last tile), which a GPU pays in launches at
    small batch sizes. Here the forward is one multiply (in the tile view where the rows fill
    whole tiles or one tile; else after one row-expansion of the mask), and the backward one
    multiply and one per-column sum (plus a pad for a ragged tile). Quantising inside the same
    Function leaves XBM and XMA one Python autograd node per layer, as Piggyback has: on a GPU a
    step at small batches is bound by that per-layer overhead, not by arithmetic
    (docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor, R: int,
                quantize: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        if quantize is not None:
            mask = quantize(mask)  # may keep the scores' memory layout
        if not mask.is_contiguous():  # the strided views below assume row-major (rt, Cout)
            mask = mask.contiguous()
        rt, cout = mask.shape
        rows = weight.numel() // cout
        ctx.save_for_backward(weight, mask)
        ctx.R, ctx.rows = R, rows
        # Strided views instead of chains of reshape / t / unsqueeze: each view is a dispatched
        # op, and on a GPU at small batches those per-op overheads are what a step costs.
        if (rt == 1 or rt * R == rows) and weight.is_contiguous():
            per_col = mask.as_strided((cout, rt, 1), (1, cout, 1))  # mask[t, c] at [c, t, 0]
            return (weight.view(cout, rt, rows // rt) * per_col).view(weight.shape)
        per_row = mask.t().repeat_interleave(R, dim=1)[:, :rows]  # (Cout, rows)
        return (weight.reshape(cout, rows) * per_row).reshape(weight.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        weight, mask = ctx.saved_tensors
        R, rows = ctx.R, ctx.rows
        rt, cout = mask.shape
        grad_w = grad_mask = None
        if ctx.needs_input_grad[1]:
            prod = grad * weight  # same shape: no views needed
            if rt * R != rows:
                prod = torch.nn.functional.pad(prod.reshape(cout, rows), (0, rt * R - rows))
            elif not prod.is_contiguous():
                prod = prod.contiguous()
            # summed from the (row_tiles, Cout, R) view of the (Cout, row_tiles, R) product, so
            # the result is born contiguous in the score's layout (a transposed result would
            # cost AccumulateGrad a copy)
            grad_mask = prod.as_strided((rt, cout, R), (R, rt * R, 1)).sum(dim=2)
        if ctx.needs_input_grad[0]:
            g = grad.reshape(cout, rows)
            if rt == 1 or rt * R == rows:
                grad_w = (g.view(cout, rt, rows // rt) * mask.t().unsqueeze(-1)
                          ).reshape(weight.shape)
            else:
                per_row = mask.t().repeat_interleave(R, dim=1)[:, :rows]
                grad_w = (g * per_row).reshape(weight.shape)
        return grad_w, grad_mask, None, None


def apply_column_mask(weight: torch.Tensor, mask: torch.Tensor, R: int,
                      quantize: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """Scale every crossbar column of ``weight`` by ``mask`` of shape (row_tiles, Cout).

    With ``quantize``, ``mask`` holds real-valued scores and the scale is ``quantize(scores)``
    (run without autograd), whose gradient is taken as the identity (straight-through): XBM's
    binary and XMA's shift-level column masks, each in one autograd node.

    Equivalent to ``from_tile_view(tile_view(w) * mask.T[..., None])``. This is the whole extra
    forward cost of a column mask: one multiply per weight plus the mask's expansion over rows
    (see :class:`_ColumnMask` for why the backward is written by hand).
    """
    rows = weight.numel() // max(weight.shape[0], 1)
    if mask.dim() != 2 or mask.shape[1] != weight.shape[0] or \
            mask.shape[0] != num_row_tiles(rows, R):
        raise ValueError(f"column mask of shape {tuple(mask.shape)} does not fit a weight of "
                         f"{weight.shape[0]} outputs x {rows} rows at R={R}; expected "
                         f"({num_row_tiles(rows, R)}, {weight.shape[0]})")
    return _ColumnMask.apply(weight, mask, R, quantize)


def column_sum_over_tiles(x: torch.Tensor, R: int) -> torch.Tensor:
    """Sum a per-weight tensor over each crossbar column's rows: -> (row_tiles, Cout).

    The adjoint of :func:`apply_column_mask`; used by reference checks and by methods that score
    columns from per-weight quantities.
    """
    return tile_view(x, R).sum(dim=2).t()


@dataclass(frozen=True)
class LayerMapping:
    """How one layer sits on crossbars."""

    name: str
    kind: str
    rows: int
    cols: int
    row_tiles: int
    col_tiles: int
    weights: int
    crossbars: int
    pes: int
    xbm_mask_bits: int
    piggyback_mask_bits: int
    cells: int
    groups: int = 1
    """Convolution groups. Their outputs are packed side by side into the column tiles, so a
    crossbar can hold columns of several groups; they share its wordlines but not its inputs,
    so each group there needs a read of its own (:attr:`tile_groups`)."""
    tile_cols: int = 0
    """Logical columns (whole weights) one crossbar holds, ``spec.logical_cols``."""

    def tile_columns(self) -> list[int]:
        """Logical columns each column tile holds, in tile order (the last may be partial)."""
        L = self.tile_cols or self.cols
        return [min(L, self.cols - t * L) for t in range(self.col_tiles)]

    def tile_group_columns(self) -> list[list[int]]:
        """Per column tile, the columns each convolution group has there (in group order): one
        entry per tile for an ungrouped layer; a depthwise conv packs many groups into one
        crossbar, and a group can straddle two."""
        per = max(self.cols // max(self.groups, 1), 1)  # output columns of one group
        L = self.tile_cols or self.cols
        out = []
        for t, n in enumerate(self.tile_columns()):
            lo, hi = t * L, t * L + n  # [lo, hi)
            out.append([min(hi, (g + 1) * per) - max(lo, g * per)
                        for g in range(lo // per, (hi - 1) // per + 1)])
        return out

    @property
    def tile_groups(self) -> list[int]:
        """Convolution groups whose columns each column tile holds, in tile order."""
        return [len(cols) for cols in self.tile_group_columns()]

    @classmethod
    def of(cls, name: str, module: nn.Module, spec: CrossbarSpec) -> LayerMapping:
        rows, cols = layer_matrix_shape(module)
        rt = num_row_tiles(rows, spec.rows)
        ct = num_col_tiles(cols, spec)
        pes = math.ceil(rt / spec.pe_rows) * math.ceil(ct / spec.pe_cols)
        return cls(
            name=name,
            # the torch layer type, also on a converted model (CrossbarConv2d is a Conv2d)
            kind="Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
            if isinstance(module, nn.Linear) else type(module).__name__,
            rows=rows,
            cols=cols,
            row_tiles=rt,
            col_tiles=ct,
            weights=rows * cols,
            crossbars=rt * ct,
            pes=pes,
            xbm_mask_bits=rt * cols,
            piggyback_mask_bits=rows * cols,
            cells=rows * cols * spec.cells_per_weight,
            groups=int(module.groups) if isinstance(module, nn.Conv2d) else 1,
            tile_cols=spec.logical_cols,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MappingReport:
    """Per-layer mapping of a model plus totals (the ``xbm map`` report)."""

    spec: CrossbarSpec
    layers: list[LayerMapping]

    def totals(self) -> dict[str, int]:
        keys = ("weights", "crossbars", "pes", "xbm_mask_bits", "piggyback_mask_bits", "cells")
        return {k: int(sum(getattr(lm, k) for lm in self.layers)) for k in keys} | {
            "layers": len(self.layers)
        }

    def to_dict(self) -> dict:
        t = self.totals()
        return {
            "spec": self.spec.to_dict(),
            "layers": [lm.to_dict() for lm in self.layers],
            "totals": t,
            "xbm_mask_bits": t["xbm_mask_bits"],
            "piggyback_mask_bits": t["piggyback_mask_bits"],
            "xbm_vs_piggyback": t["xbm_mask_bits"] / max(t["piggyback_mask_bits"], 1),
        }

    def table(self) -> str:
        head = f"{'layer':<28} {'kind':<7} {'rows':>6} {'cols':>6} {'row_tiles':>9} " \
               f"{'col_tiles':>9} {'crossbars':>9} {'xbm_bits':>9} {'pb_bits':>10}"
        lines = [head, "-" * len(head)]
        for lm in self.layers:
            lines.append(
                f"{lm.name[:28]:<28} {lm.kind[:7]:<7} {lm.rows:>6} {lm.cols:>6} {lm.row_tiles:>9} "
                f"{lm.col_tiles:>9} {lm.crossbars:>9} {lm.xbm_mask_bits:>9} "
                f"{lm.piggyback_mask_bits:>10}"
            )
        t = self.totals()
        lines.append("-" * len(head))
        lines.append(
            f"{'total (' + str(t['layers']) + ' layers)':<28} {'':<7} {'':>6} {'':>6} {'':>9} "
            f"{'':>9} {t['crossbars']:>9} {t['xbm_mask_bits']:>9} {t['piggyback_mask_bits']:>10}"
        )
        ratio = t["xbm_mask_bits"] / max(t["piggyback_mask_bits"], 1)
        lines.append(
            f"crossbar {self.spec.rows}x{self.spec.cols}, {self.spec.weight_bits}-bit weights on "
            f"{self.spec.cell_bits}-bit cells ({self.spec.signed}); XBM mask = {ratio:.3%} of "
            "Piggyback's"
        )
        return "\n".join(lines)


def resolve_head_name(model: nn.Module, head_name: str | None) -> str:
    """``head_name`` if given, else the model's own ``head_name`` attribute (every registered
    model has one; a user's model that names its classifier otherwise can say so there), else
    ``"fc"``."""
    if head_name is not None:
        return head_name
    own = getattr(model, "head_name", None)
    return own if isinstance(own, str) and own else "fc"


def default_filter(head_name: str = "fc") -> FilterFn:
    """Put every Conv2d and Linear on crossbars except the classifier head (kept per task)."""

    def fn(name: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv2d, nn.Linear)) and name != head_name and \
            not name.startswith(head_name + ".")

    return fn


#: The layer types a crossbar layer stands in for. Exact types: a subclass may compute
#: something else than its weight times its input (MultiheadAttention reads its
#: ``out_proj``'s weight itself, never calling it), so a subclass stays digital.
CONVERTIBLE: tuple[type, ...] = (nn.Conv2d, nn.Linear)


def is_convertible(module: nn.Module) -> bool:
    """Whether ``module`` can go on crossbars (or already is a crossbar layer)."""
    return type(module) in CONVERTIBLE or bool(getattr(module, "is_crossbar_layer", False))


def crossbar_modules(model: nn.Module, filter_fn: FilterFn | None = None,
                     head_name: str = "fc") -> Iterable[tuple[str, nn.Module]]:
    """(name, module) of the layers a filter puts on crossbars: ``filter_fn`` is asked about
    every convertible layer (:data:`CONVERTIBLE`) except the head, which stays per task."""
    fn = filter_fn or default_filter(head_name)
    for name, mod in model.named_modules():
        if name != head_name and is_convertible(mod) and fn(name, mod):
            yield name, mod


def unmapped_weight_layers(model: nn.Module, filter_fn: FilterFn | None = None,
                           head_name: str = "fc") -> list[str]:
    """Layers with a weight matrix that cannot go on crossbars although a user would expect
    them to: subclasses of Conv2d/Linear that the filter selects, every other convolution
    (Conv1d, Conv3d, transposed), and the other layers built on weight matrices (recurrent
    layers and cells, Bilinear, MultiheadAttention's fused input projection). ``xbm.apply``
    warns about them; lookup tables (Embedding) and norms are not matrix-vector products."""
    from torch.nn.modules.conv import _ConvNd

    fn = filter_fn or default_filter(head_name)
    matrix_layers = (nn.RNNBase, nn.RNNCellBase, nn.Bilinear, nn.MultiheadAttention)
    out = []
    for name, mod in model.named_modules():
        if name == head_name or is_convertible(mod):
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            if fn(name, mod):
                out.append(f"{name} ({type(mod).__name__})")
        elif isinstance(mod, (_ConvNd, *matrix_layers)):
            out.append(f"{name} ({type(mod).__name__})")
    return out


def map_model(model: nn.Module, spec: CrossbarSpec | str, filter_fn: FilterFn | None = None,
              head_name: str | None = None) -> MappingReport:
    """The mapping report of a model (works on the meta device: no weights needed).

    On a model already converted (``xbm.apply``, ``MultiTaskModel``) without a ``filter_fn``,
    the layers it put on crossbars, whatever filter chose them (the conversion's own
    ``MultiTaskModel.mapping()``); layers it left digital are not on a crossbar. ``spec`` may
    be a preset name; ``head_name`` defaults to the model's own ``head_name`` attribute, else
    ``"fc"``, as :func:`xbm.apply` does.
    """
    if isinstance(spec, str):
        from xbm.hardware import get_spec

        spec = get_spec(spec)
    if not isinstance(spec, CrossbarSpec):
        from xbm.errors import XbmError

        raise XbmError(f"spec must be a CrossbarSpec or a preset name such as 'default', got "
                       f"{type(spec).__name__}; build one with xbm.get_spec('default', rows=64)")
    head_name = resolve_head_name(model, head_name)
    if filter_fn is None and any(getattr(m, "is_crossbar_layer", False)
                                 for m in model.modules()):
        def filter_fn(name: str, module: nn.Module) -> bool:
            return getattr(module, "is_crossbar_layer", False)
    layers = [LayerMapping.of(n, m, spec) for n, m in crossbar_modules(model, filter_fn, head_name)]
    return MappingReport(spec=spec, layers=layers)
