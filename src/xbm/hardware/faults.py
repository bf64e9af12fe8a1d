"""What the cells of a chip hold: weight encoding into cells, stuck-at fault maps, faulty weights.

A programmed weight is stored as follows (the conventions the faithful simulator uses too, see
``docs/simulation.md``):

* **Weight quantisation**: symmetric, one scale per layer, ``s_w = max|W| / Q`` with
  ``Q = 2**(weight_bits-1) - 1``; ``W_int = clamp(round(W / s_w), -Q, Q)`` (int8 for 8 bits).
* **Differential pairs** (``signed='differential'``): ``|W_int|`` is split into
  ``spec.slices`` digits of ``cell_bits`` bits, least significant first; a positive weight puts
  its digits on the positive cell of each pair and leaves the negative one at level 0, and vice
  versa. The top slice may be only partly used (8-bit weights on 2-bit cells: bit 6 alone).
* **Offset** (``signed='offset'``): ``W_int + 2**(weight_bits-1)`` (always in
  ``[1, 2**weight_bits - 1]``) is split into digits on one cell per slice; the offset is removed
  digitally after the ADC.

Cells are indexed ``(output column, layer-matrix row, slice, polarity)`` with polarity 0 = the
positive (or only) cell and 1 = the negative cell of a pair. That is the *granularity of a fault
map*: one code per physical cell that holds a weight digit. Cells of zero padding in a ragged row
tile and unused bitlines hold no weight, so their faults cannot change any output and are not
stored. A stuck-at-OFF cell (SA0, high-resistance state) reads level 0 whatever was programmed; a
stuck-at-ON cell (SA1, low-resistance state) reads the top level ``2**cell_bits - 1``. This is the
SAF model of MNSIM 2.0 (stuck-at HRS/LRS rates, thu-nics/MNSIM-2.0 SimConfig.ini) and PytorX
(elliothe/pytorx python/torx/module/SAF.py), applied at cell level so that a fault in a
high-order slice costs more than one in a low-order slice, as on a real bit-sliced chip.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xbm.errors import BundleError, ConfigError, XbmError, XbmWarning
from xbm.hardware.mapping import apply_column_mask, weight_matrix
from xbm.hardware.spec import CrossbarSpec

FAULT_MAP_FORMAT = "xbm-fault-map/1"
FAULT_OK = 0
STUCK_OFF = 1
"""Stuck-at-OFF (SA0): the cell reads level 0 (high-resistance state)."""
STUCK_ON = 2
"""Stuck-at-ON (SA1): the cell reads the top level (low-resistance state)."""


# -- weight encoding ---------------------------------------------------------------------------
def weight_qmax(spec: CrossbarSpec) -> int:
    """Largest integer weight magnitude: ``2**(weight_bits-1) - 1`` (symmetric, int8 for 8 bits)."""
    return 2 ** (spec.weight_bits - 1) - 1


def quantize_weight(weight: torch.Tensor, spec: CrossbarSpec,
                    scale_from: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-layer quantisation of a (Cout, rows) matrix: ``(W_int, s_w)``.

    One scale per layer is what a chip with a single digital post-scale per layer can apply; a
    per-column scale would need a multiplier per bitline. ``scale_from`` (the programmed
    backbone's weight) sets that scale, as the chip fixed it when the backbone was programmed:
    a task that rewrites some cells (Piggyback's zeros, XMA2's re-programmed PEs) leaves every
    other cell and the scale as they are, and a rewritten weight beyond the range saturates.
    """
    q = weight_qmax(spec)
    amax = (weight if scale_from is None else scale_from).detach().abs().amax().to(
        device=weight.device, dtype=weight.dtype)
    s_w = torch.where(amax > 0, amax / q, torch.ones_like(amax))
    w_int = torch.clamp(torch.round(weight.detach() / s_w), -q, q)
    return w_int, s_w


def _digits(v: torch.Tensor, spec: CrossbarSpec) -> torch.Tensor:
    """Split non-negative integers into ``spec.slices`` digits of ``cell_bits``: (..., S)."""
    base = float(2 ** spec.cell_bits)
    pw = base ** torch.arange(spec.slices, dtype=v.dtype, device=v.device)
    return torch.remainder(torch.floor(v.unsqueeze(-1) / pw), base)


def encode_cells(w_int: torch.Tensor, spec: CrossbarSpec) -> torch.Tensor:
    """Cell levels ``(Cout, rows, S, P)`` that store an integer weight matrix (see module doc)."""
    if spec.signed == "differential":
        d = _digits(w_int.abs(), spec)
        pos = (w_int > 0).unsqueeze(-1).to(d.dtype)
        neg = (w_int < 0).unsqueeze(-1).to(d.dtype)
        return torch.stack((d * pos, d * neg), dim=-1)
    off = float(2 ** (spec.weight_bits - 1))
    return _digits(w_int + off, spec).unsqueeze(-1)


def cells_to_slices(cells: torch.Tensor, spec: CrossbarSpec) -> torch.Tensor:
    """What each slice column contributes: ``g+ - g-`` (differential) or ``g`` (offset): (.., S).

    A differential pair's currents are subtracted on the bitline pair before the ADC (PytorX's
    conductance pair), so one conversion serves both cells.
    """
    if spec.signed == "differential":
        return cells[..., 0] - cells[..., 1]
    return cells[..., 0]


def slice_weights(spec: CrossbarSpec, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Significance ``2**(s*cell_bits)`` of each slice (the shift of shift-and-add)."""
    return (2.0 ** (spec.cell_bits * torch.arange(spec.slices, device=device))).to(dtype)


def slices_to_int(slices: torch.Tensor, spec: CrossbarSpec) -> torch.Tensor:
    """Integer weight (offset removed) that slice values ``(..., S)`` represent."""
    w = (slices * slice_weights(spec, slices.dtype, slices.device)).sum(-1)
    if spec.signed == "offset":
        w = w - 2 ** (spec.weight_bits - 1)
    return w


def apply_fault_codes(cells: torch.Tensor, codes: torch.Tensor | None,
                      spec: CrossbarSpec) -> torch.Tensor:
    """Cells with stuck-at faults applied (``codes`` has the cells' shape)."""
    if codes is None:
        return cells
    top = float(2 ** spec.cell_bits - 1)
    codes = codes.to(cells.device)
    out = torch.where(codes == STUCK_OFF, torch.zeros_like(cells), cells)
    return torch.where(codes == STUCK_ON, torch.full_like(cells, top), out)


def cell_shape(module: nn.Module, spec: CrossbarSpec) -> tuple[int, int, int, int]:
    """(Cout, rows, slices, cells per slice) of a crossbar layer's cells."""
    m = weight_matrix(module.weight)
    return int(m.shape[0]), int(m.shape[1]), spec.slices, spec.cells_per_slice


# -- fault maps ---------------------------------------------------------------------------------
def _layer_root(model: nn.Module) -> nn.Module:
    """The converted torch model inside a MultiTaskModel (or the model itself)."""
    from xbm.multitask import MultiTaskModel

    return model.model if isinstance(model, MultiTaskModel) else model


def _crossbar_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from xbm.nn.convert import crossbar_layers

    return crossbar_layers(_layer_root(model))


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed from the chip seed and the layer name, independent of layer order."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:7], "little")


@dataclass
class FaultMap:
    """Stuck-at faults of one chip: an int8 code per weight-holding cell, per crossbar layer.

    Codes are :data:`FAULT_OK`, :data:`STUCK_OFF` and :data:`STUCK_ON`; each layer's tensor has
    the shape ``(Cout, rows, slices, cells_per_slice)`` (see the module docstring). Saving and
    loading it means the same chip is simulated every time, on any machine.
    """

    spec: dict[str, Any]
    codes: dict[str, torch.Tensor]
    sa0_rate: float = 0.0
    sa1_rate: float = 0.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def generate(cls, model: nn.Module, spec: CrossbarSpec | None = None,
                 sa0_rate: float = 0.0, sa1_rate: float = 0.0, seed: int = 0) -> FaultMap:
        """Draw faults independently per cell: SA0 with ``sa0_rate``, SA1 with ``sa1_rate``.

        Each layer draws from its own generator seeded by ``(seed, layer name)``, so a layer's
        faults do not depend on which other layers exist.
        """
        for n, r in (("sa0_rate", sa0_rate), ("sa1_rate", sa1_rate)):
            if not 0.0 <= r <= 1.0:
                raise ConfigError(f"{n} must be within [0, 1], got {r}")
        if sa0_rate + sa1_rate > 1.0:
            raise ConfigError(f"sa0_rate + sa1_rate must be <= 1, got {sa0_rate + sa1_rate}")
        layers = _crossbar_layers(model)
        if not layers:
            raise XbmError("model has no crossbar layers; convert it (MultiTaskModel) first")
        spec = spec or layers[0][1].spec
        codes: dict[str, torch.Tensor] = {}
        for name, layer in layers:
            g = torch.Generator().manual_seed(_layer_seed(seed, name))
            u = torch.rand(cell_shape(layer, spec), generator=g)
            c = torch.zeros(u.shape, dtype=torch.int8)
            c[u < sa0_rate] = STUCK_OFF
            c[(u >= sa0_rate) & (u < sa0_rate + sa1_rate)] = STUCK_ON
            codes[name] = c
        return cls(spec=spec.geometry_dict(), codes=codes, sa0_rate=float(sa0_rate),
                   sa1_rate=float(sa1_rate), seed=int(seed))

    @property
    def crossbar_spec(self) -> CrossbarSpec:
        return CrossbarSpec.from_dict(dict(self.spec))

    def rates(self) -> dict[str, float]:
        """Measured fractions of SA0 and SA1 cells over the whole map."""
        total = sum(c.numel() for c in self.codes.values())
        sa0 = sum(int((c == STUCK_OFF).sum()) for c in self.codes.values())
        sa1 = sum(int((c == STUCK_ON).sum()) for c in self.codes.values())
        return {"cells": total, "sa0": sa0 / max(total, 1), "sa1": sa1 / max(total, 1)}

    def check(self, model: nn.Module, spec: CrossbarSpec | None = None) -> None:
        """Raise unless this map fits ``model``'s crossbar layers and their cell layout.

        Args:
            model: the (converted) model the map is used on.
            spec: the cell layout simulated (default: each layer's own spec).
        """
        layers = dict(_crossbar_layers(model))
        missing = sorted(set(layers) - set(self.codes))
        if missing:
            raise XbmError(f"fault map has no layer {missing[0]!r}: it was drawn for another "
                           f"model (it has {len(self.codes)} layers, this model "
                           f"{len(layers)}); draw one for this model (xbm simulate "
                           "--fault-aware --save-fault-map FILE on its backbone, or "
                           "FaultMap.generate)")
        mine = self.crossbar_spec
        for name, layer in layers.items():
            if not _cells_compatible(spec or layer.spec, mine):
                raise XbmError(
                    f"fault map was drawn for another cell layout than layer {name!r} uses "
                    "(weight_bits, cell_bits or signed differ); generate a map for this spec")
            if tuple(self.codes[name].shape) != cell_shape(layer, mine):
                raise XbmError(f"fault map layer {name!r} has shape "
                               f"{tuple(self.codes[name].shape)}, the model's cells are "
                               f"{cell_shape(layer, mine)}: the map was drawn for another "
                               "model or width; pass a map saved on this backbone, or drop "
                               "--fault-map to draw one at --fault-rates")
        used = spec or next((layer.spec for layer in layers.values()), mine)
        said = self.__dict__.setdefault("_geometries_said", set())  # once per map: check()
        if (used.rows, used.cols) != (mine.rows, mine.cols) and \
                (used.rows, used.cols) not in said:  # runs again in each evaluation
            said.add((used.rows, used.cols))
            # the codes are per weight cell, so they still fit; but the chip is another one
            warnings.warn(f"fault map was drawn on {mine.rows}x{mine.cols} crossbars, this model "
                          f"is mapped onto {used.rows}x{used.cols}: each stuck cell stays with "
                          "the weight bits it held, not with its tile position, so this is not "
                          "the same chip; draw a map for this geometry to simulate one",
                          XbmWarning, stacklevel=2)

    def save(self, path: str | Path) -> None:
        """Write the map as one safetensors file (atomically), with its spec and rates."""
        from xbm.io import metadata_hash, save_safetensors

        meta = {"format": FAULT_MAP_FORMAT, "spec": dict(self.spec), "sa0_rate": self.sa0_rate,
                "sa1_rate": self.sa1_rate, "seed": self.seed, "extra": self.extra}
        meta["meta_hash"] = metadata_hash(meta)
        save_safetensors(path, {k: v.to(torch.int8) for k, v in self.codes.items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> FaultMap:
        """Read a map written by :meth:`save`."""
        from xbm.io import check_metadata_hash, load_safetensors

        tensors, meta = load_safetensors(path)
        if meta.get("format") != FAULT_MAP_FORMAT:
            raise BundleError(f"{path}: not an xbm fault map (format {meta.get('format')!r})")
        check_metadata_hash(path, meta, "fault map", "make it again with xbm simulate "
                            "--fault-aware --save-fault-map")
        try:  # a hand-edited or foreign header: one line naming it, not a traceback
            spec, extra = meta["spec"], meta.get("extra", {})
            if not isinstance(spec, dict) or not isinstance(extra, dict):
                raise TypeError("spec and extra must be mappings")
            rates = [float(meta.get(k, 0.0)) for k in ("sa0_rate", "sa1_rate")]
            if not all(0.0 <= r <= 1.0 for r in rates):
                raise ValueError(f"rates {rates} outside [0, 1]")
            seed = meta.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed {seed!r} is not an integer")
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BundleError(f"{path}: the fault map's metadata is unreadable ({exc}); make it "
                              "again with xbm simulate --fault-aware --save-fault-map") from None
        known = (FAULT_OK, STUCK_OFF, STUCK_ON)
        for name, t in tensors.items():  # any other code ran as a healthy cell, unsaid
            if t.is_floating_point() or t.is_complex() or not bool(
                    torch.isin(t, torch.tensor(known, dtype=t.dtype)).all()):
                raise BundleError(f"{path}: layer {name}'s cell codes are not all in {known} "
                                  "(ok, stuck off, stuck on); make the map again with xbm "
                                  "simulate --fault-aware --save-fault-map")
        return cls(spec=dict(spec), codes=dict(tensors), sa0_rate=rates[0], sa1_rate=rates[1],
                   seed=seed, extra=dict(extra))


def _cells_compatible(a: CrossbarSpec, b: CrossbarSpec) -> bool:
    return (a.weight_bits, a.cell_bits, a.signed) == (b.weight_bits, b.cell_bits, b.signed)


# -- faulted weights for the ideal path ---------------------------------------------------------
def faulted_weight(weight: torch.Tensor, codes: torch.Tensor | None,
                   spec: CrossbarSpec, scale_from: torch.Tensor | None = None) -> torch.Tensor:
    """The weight a chip with stuck cells computes with, in the ideal (one matmul) path.

    Returns ``W + s_w * (W_int_faulted - W_int)``: the float weight plus the change that the
    stuck cells make to its quantised value. With no fault in a weight's cells that weight is
    returned exactly (bit-identical), so the map changes only what the faults change. The
    correction carries no gradient (the cells are physical facts); a gradient reaching the
    weight, e.g. for a method that re-programs cells, passes through unchanged.
    """
    if codes is None or not bool((codes != FAULT_OK).any()):
        return weight
    with torch.no_grad():
        m = weight_matrix(weight)
        w_int, s_w = quantize_weight(m.float(), spec, scale_from)
        cells = encode_cells(w_int, spec)
        faulty = cells_to_slices(apply_fault_codes(cells, codes.to(m.device), spec), spec)
        delta = (slices_to_int(faulty, spec) - w_int) * s_w
    return weight + delta.to(weight.dtype).reshape(weight.shape)


def apply_faults_to_backbone(obj: nn.Module | Mapping[str, torch.Tensor], fault_map: FaultMap,
                             spec: CrossbarSpec | None = None) -> dict[str, torch.Tensor]:
    """Faulted copies of the programmed weights: a new state dict; the input is not touched.

    Args:
        obj: a MultiTaskModel or converted model (its backbone state is used), or a plain state
            dict whose ``<layer>.weight`` keys name the fault map's layers.
        fault_map: the chip's faults.
        spec: cell layout; default the map's own.

    Returns:
        ``{key: tensor}`` with every mapped layer's weight replaced by :func:`faulted_weight` and
        every other tensor cloned.
    """
    spec = spec or fault_map.crossbar_spec
    if isinstance(obj, nn.Module):
        from xbm.multitask import backbone_state

        state = backbone_state(_layer_root(obj))
    else:
        state = dict(obj)
    out = {k: v.detach().clone() for k, v in state.items()}
    for name, codes in fault_map.codes.items():
        key = f"{name}.weight"
        if key not in out:
            raise XbmError(f"fault map layer {name!r} has no weight {key!r} in this state dict")
        out[key] = faulted_weight(out[key], codes, spec)
    return out


class FaultyIdealPath:
    """A layer ``simulator`` that runs the ideal one-matmul path on the faulted cells.

    The column scale of the task (XBM's mask) multiplies the faulted weight exactly where the
    hardware applies it (``apply_column_mask``), so gradients reach the mask scores: a mask learned
    through this path sees the broken columns and can switch them off. Costs one extra weight-sized
    add per forward; the faulted weight is cached per programmed-weight version.
    """

    def __init__(self, codes: torch.Tensor, spec: CrossbarSpec) -> None:
        self.codes = codes
        self.spec = spec
        self._cache: tuple[Any, torch.Tensor] | None = None

    def _weight(self, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if w.requires_grad or not isinstance(w, nn.Parameter):
            # a trained or per-call weight (its address may be reused): no caching; quantised
            # on the backbone's scale (ref), which the chip keeps
            return faulted_weight(w, self.codes, self.spec, ref)
        key = (id(w), w.data_ptr(), w._version, w.device, w.dtype,
               id(ref), ref.data_ptr(), ref._version)
        if self._cache is None or self._cache[0] != key:  # a finetuned task's own weights too
            self._cache = (key, faulted_weight(w, self.codes, self.spec, ref))
        return self._cache[1]

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w, scale, b = layer.chip_view()
        spare = layer.spare_weights()
        faulted = self._weight(w, layer.weight)
        # weights in spare crossbars (XMA2's spare PEs) do not sit on the faulty cells
        w = faulted if spare is None else torch.where(spare, w, faulted)
        if scale is not None:
            w = apply_column_mask(w, scale, layer.spec.rows)
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, w, b)
        return F.linear(x, w, b)


@contextlib.contextmanager
def fault_aware(model: nn.Module, fault_map: FaultMap,
                spec: CrossbarSpec | None = None) -> Iterator[nn.Module]:
    """Run ``model`` (ideal path, full speed, differentiable) on the chip described by a fault map.

    Inside the block every crossbar layer computes with its faulted cells; train a task in it
    (``train_task``) and its column mask learns to route around the broken columns. The
    programmed backbone tensors are never written; the previous ``simulator`` is restored on exit.
    """
    # ``spec``: the cell layout simulated (xbm simulate --sim-cell-bits draws its map on it);
    # by default each layer's own, so that a map for another chip is refused
    fault_map.check(model, spec)
    spec = fault_map.crossbar_spec
    layers = _crossbar_layers(model)
    saved = [(layer, layer.simulator) for _, layer in layers]
    try:
        for name, layer in layers:
            layer.simulator = FaultyIdealPath(fault_map.codes[name], spec)
        yield model
    finally:
        for layer, sim in saved:
            layer.simulator = sim


def fault_summary(fault_map: FaultMap, model: nn.Module) -> dict[str, Any]:
    """How many weights and crossbar columns a map touches (for reports)."""
    spec = fault_map.crossbar_spec
    weights = cols = bad_w = bad_c = 0
    for name, _layer in _crossbar_layers(model):
        c = fault_map.codes[name]
        bad = (c != FAULT_OK).flatten(2).any(-1)  # (Cout, rows)
        weights += bad.numel()
        bad_w += int(bad.sum())
        rows = bad.shape[1]
        rt = math.ceil(rows / spec.rows)
        padded = F.pad(bad, (0, rt * spec.rows - rows)).reshape(bad.shape[0], rt, spec.rows)
        per_col = padded.any(-1)
        cols += per_col.numel()
        bad_c += int(per_col.sum())
    return {"weights": weights, "faulty_weights": bad_w, "crossbar_columns": cols,
            "faulty_columns": bad_c} | fault_map.rates()


__all__ = [
    "FAULT_MAP_FORMAT",
    "FAULT_OK",
    "STUCK_OFF",
    "STUCK_ON",
    "FaultMap",
    "FaultyIdealPath",
    "apply_fault_codes",
    "apply_faults_to_backbone",
    "cell_shape",
    "cells_to_slices",
    "encode_cells",
    "fault_aware",
    "fault_summary",
    "faulted_weight",
    "quantize_weight",
    "slice_weights",
    "slices_to_int",
    "weight_qmax",
]
