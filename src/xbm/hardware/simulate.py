"""Crossbar-faithful simulation: bit slices, bit-serial inputs, per-tile ADC, noise and faults.

The ideal path (one matmul with the effective weight) is what training uses. This module answers
what the chip really computes. For every crossbar layer it models, in this order:

1. **Weights** quantised symmetrically per layer to ``weight_bits`` and stored in cells
   (``xbm.hardware.faults``: differential pairs or an offset, ``spec.slices`` digits of
   ``cell_bits`` each); optional finite conductance levels, programming variation, stuck-at
   faults and read noise change what each cell conducts.
2. **Inputs** quantised per layer to ``input_bits`` unsigned levels ``u``: ``u = round(x/s_in)``
   for non-negative inputs (activations after ReLU) and ``u = round(x/s_in) + 2**(input_bits-1)``
   (a zero point) for signed ones (the first layer's normalised image). They are applied
   bit-serially, ``dac_bits`` per wordline cycle (``spec.input_cycles`` cycles).
3. **Partial sums**: every row tile (crossbar), every slice column and every input cycle yields
   its own bitline sum, in integer units of (input level x cell level).
4. **ADC** per crossbar column: ``code = clamp(round(p / step), lo, hi)`` with a sign-magnitude
   range ``[-(2**(b-1)-1), 2**(b-1)-1]`` for differential columns and ``[0, 2**b-1]`` for offset
   columns. ``step`` is calibrated (``adc_mode='calibrate'``), fixed by the full-scale range
   (``'fixed'``), or the ADC is skipped (``'ideal'``).
5. **Column scale** (XBM's mask, XMA's shifts) multiplies the ADC output of each crossbar column,
   where the hardware gates it: a masked-off column's conversion is skipped and counted as such.
6. **Shift-and-add** over slices (``2**(s*cell_bits)``) and input cycles (``2**(c*dac_bits)``),
   **accumulation** over row tiles, then the digital corrections (input zero point, weight
   offset), the scales ``s_in * s_w`` and the bias.

How it stays fast (``docs/simulation.md`` has the measurements): all tiles, slices and cycles of a
layer are **one grouped convolution** whose groups are the row tiles (each group reads only the
few input channels its tile's rows come from) and whose output channels stack the slices; the
input cycles are stacked along the batch. The ADC, column scale, shift-and-add and tile
accumulation are one fused reduction (compiled by ``torch.compile`` on CPU, Triton on GPU), run
over batch chunks that keep the partial sums in cache. There is no Python loop over tiles, slices
or cycles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import numbers
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xbm.config import from_fields
from xbm.errors import ConfigError, XbmError, XbmWarning
from xbm.hardware.faults import (
    FaultMap,
    apply_fault_codes,
    cells_to_slices,
    encode_cells,
    quantize_weight,
    slice_weights,
    slices_to_int,
)
from xbm.hardware.mapping import column_tile_index, num_row_tiles, weight_matrix
from xbm.hardware.spec import CrossbarSpec
from xbm.nn.modes import eval_mode

ADC_MODES = ("calibrate", "fixed", "ideal")
ADC_GRANULARITIES = ("layer", "tile", "column")
BACKENDS = ("auto", "torch", "compile", "triton")
VARIATION_DISTS = ("lognormal", "gaussian")


@dataclass
class SimConfig:
    """How faithfully to simulate the chip. Every non-ideality is off by default except the
    quantisation that the crossbar spec itself implies (weights, inputs, ADC)."""

    adc_bits: int | None = None
    """ADC resolution; ``None`` uses the spec's ``adc_bits``. Sweeping this is the main use."""

    adc_mode: str = "calibrate"
    """``calibrate``: each ADC's range is the largest partial sum seen on a few calibration
    batches (times ``adc_headroom``), as a programmable reference voltage would be set;
    ``fixed``: the ADC covers the full theoretical range ``R * (2**dac_bits-1) * (2**cell_bits-1)``
    and keeps its top ``adc_bits`` bits (a power-of-two step); ``ideal``: no ADC quantisation."""

    adc_granularity: str = "tile"
    """What shares one calibrated range: ``layer`` (all crossbars of a layer), ``tile`` (one
    crossbar: a row tile x column tile, the usual per-array ADC reference) or ``column`` (one
    crossbar column)."""

    adc_headroom: float = 1.0
    """Factor on the calibrated range (< 1 clips rare large sums for finer steps)."""

    adc_offset_trim: bool = False
    """Trim each output column's mean ADC error, measured while calibrating, as a digital
    offset (a per-column trim, as a deployed chip's calibration sets one). Partial sums of a
    few levels (bit-serial inputs, few-level cells, short tiles) sit on the integer grid, so a
    deterministic ADC's error there is a fixed offset per column and input pattern, not
    zero-mean noise; its size is not monotone in the step, which makes accuracy non-monotone
    in ``adc_bits`` below the lossless resolution (docs/simulation.md, "ADC error on small
    partial sums"). The reference is the same reads' unquantised partial sums on the
    calibration batches, fitted in one pass in layer order (each layer on inputs trimmed by
    the layers before it, each batch by the running mean over the batches so far, itself
    included: the trims depend on the batch order, not on ``chunk_elements``; until session
    27 each chunk was trimmed by the chunks before it, which moved the trims by up to 5e-4.
    That pass holds about three copies of each chunk's partial sums). It helps from about 5
    bits on and can cost accuracy at 3-4 bits, where the error is a gain as well (measured
    there; ``bn_recalibration`` absorbs both). Off by default: an untrimmed chip, as every
    figure before session 24."""

    bn_recalibration: bool = False
    """Re-estimate the active task's own BatchNorm statistics on the chip's outputs over the
    calibration batches, while the simulation is installed (input ranges, ADC ranges and
    trims are then measured again with them, twice over); the task's trained statistics come
    back when it is removed, and calibrating again starts from them. The ADC's
    per-column offset and gain errors are then absorbed by the digital BatchNorm after each
    layer (docs/simulation.md, "ADC error on small partial sums": on a 10%-variation chip it
    brought a task back to its ideal accuracy). Needs per-task BatchNorm (the default): the
    base task's and a frozen-BN task's statistics are the programmed model's, and are
    refused. Off by default."""

    input_headroom: float = 1.0
    """Factor on each layer's calibrated input range. Inputs above the largest seen on the
    calibration batches are clipped: on a test set they cost more than the input step does
    (an audit measured 1.7e-2 × max|y| of output error from clipping against 3e-4 from the
    step, 16-bit inputs, ideal ADC), so > 1 trades a coarser step for room."""

    calibration_batches: int = 2
    """Batches that :meth:`Simulation.calibrate` uses (input scales and ADC ranges)."""

    quantize_inputs: bool = True
    """Quantise inputs to ``input_bits`` and apply them bit-serially. Off: one analog cycle with
    the float input (an ideal DAC), for isolating the other effects."""

    weight_bits: int | None = None
    """Override the spec's weight precision (``None``: the spec's). The mapping (rows per tile,
    hence every column mask) does not depend on it."""

    cell_bits: int | None = None
    """Override the spec's bits per cell (sets the number of slices)."""

    input_bits: int | None = None
    """Override the spec's input precision."""

    dac_bits: int | None = None
    """Override the spec's input bits per wordline cycle."""

    variation: float = 0.0
    """Relative programming variation of each cell's conductance (sigma), drawn once per chip
    (per ``seed`` and layer): the same chip every run."""

    variation_dist: str = "lognormal"
    """``lognormal``: ``g * exp(sigma * n)``; ``gaussian``: ``g * (1 + sigma * n)``, clipped at
    0. A cell at level 0 stays at 0 (an ideal OFF state)."""

    read_noise: float = 0.0
    """Relative read noise (sigma) of each cell, drawn anew for every forward call (one draw per
    batch, shared by its samples), from a seeded stream: reproducible run to run."""

    levels: int | None = None
    """Distinct conductance states of a cell, evenly spaced between OFF and ON; each digit is
    programmed to the nearest. ``None``: exactly ``2**cell_bits`` (no effect)."""

    seed: int = 0
    """Seed of programming variation and read noise."""

    backend: str = "auto"
    """``torch`` (eager, always available), ``compile`` (``torch.compile`` fuses the input
    quantiser and the ADC reduction: C++ loops on CPU, needs a C++ compiler; Triton on CUDA) or
    ``triton`` (one hand-written kernel per layer that steps the GEMM's K loop one crossbar tile
    at a time and never writes partial sums; CUDA, or Triton's interpreter with
    ``TRITON_INTERPRET=1``). ``auto``: on CUDA ``torch`` (on an H200 it was the fastest of the
    three: 0.95x ``compile`` and 0.64x ``triton`` on the default spec, docs/benchmarks.md); on
    CPU ``compile`` where a C++ compiler exists, else ``torch``. A failing compile falls back to
    eager with a warning. Calibration always runs the grouped-conv path (it needs the partial
    sums)."""

    allow_tf32: bool = False
    """Let CUDA convolutions and matmuls use TF32 while the simulation is installed. Off (the
    default) because TF32 rounds float operands to 10 mantissa bits: the calibration passes
    (float inputs through the cells) and the float head then differ from the CPU's by ~1e-3,
    enough to move quantisation steps (measured on an H200: 3.6e-4 relative output error with
    an ideal ADC, 1e-7 without TF32). The integer digit-by-level products are exact either
    way. No effect on CPU."""

    chunk_elements: int = 1 << 24
    """Batch chunking: partial sums of at most this many elements are live at once, so they stay
    in cache and memory stays bounded whatever the number of slices and cycles."""

    def __post_init__(self) -> None:
        for f, choices in (("adc_mode", ADC_MODES), ("adc_granularity", ADC_GRANULARITIES),
                           ("backend", BACKENDS), ("variation_dist", VARIATION_DISTS)):
            if getattr(self, f) not in choices:
                raise ConfigError(f"SimConfig.{f} must be one of {', '.join(choices)}, got "
                                  f"{getattr(self, f)!r}")
        import numpy as np

        def integer(v: object) -> bool:  # numpy's integers too (a YAML or numpy sweep value)
            return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

        for f in ("adc_bits", "weight_bits", "cell_bits", "input_bits", "dac_bits"):
            v = getattr(self, f)
            if v is not None and (not integer(v) or v < 1):
                raise ConfigError(f"SimConfig.{f} must be a positive integer or None, got {v!r}")
        if self.adc_bits is not None and self.adc_bits > 32:
            raise ConfigError("SimConfig.adc_bits must be <= 32; use adc_mode='ideal' for no ADC")
        if self.levels is not None and (not integer(self.levels) or self.levels < 2):
            raise ConfigError(f"SimConfig.levels must be an integer >= 2 or None, got "
                              f"{self.levels!r}")
        for f in ("quantize_inputs", "allow_tf32", "adc_offset_trim", "bn_recalibration"):
            if not isinstance(getattr(self, f), (bool, np.bool_)):
                raise ConfigError(f"SimConfig.{f} must be true or false, got "
                                  f"{getattr(self, f)!r}")
        if not integer(self.seed):  # any integer: it is only hashed (--chip-seed)
            raise ConfigError(f"SimConfig.seed must be an integer, got {self.seed!r}")
        for f in ("variation", "read_noise"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ConfigError(f"SimConfig.{f} must be a finite number >= 0, got {v!r}")
        for f in ("adc_headroom", "input_headroom"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v <= 0:
                raise ConfigError(f"SimConfig.{f} must be a finite number > 0, got {v!r}")
        for f in ("calibration_batches", "chunk_elements"):
            v = getattr(self, f)
            if not integer(v) or v < 1:
                raise ConfigError(f"SimConfig.{f} must be an integer >= 1, got {v!r}")
        if self.adc_mode == "fixed" and not self.quantize_inputs:
            raise ConfigError("adc_mode='fixed' needs quantize_inputs=True (the full-scale range "
                              "is in input levels)")

    def spec_for(self, spec: CrossbarSpec) -> CrossbarSpec:
        """The layer's spec with this config's bit-width overrides applied (validated)."""
        ch = {f: getattr(self, f) for f in ("adc_bits", "weight_bits", "cell_bits", "input_bits",
                                             "dac_bits") if getattr(self, f) is not None}
        return spec.replace(**ch) if ch else spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimConfig:
        return from_fields(cls, d)


# -- the fused ADC reduction ------------------------------------------------------------------
def _adc_reduce(out: torch.Tensor, inv: torch.Tensor, mult: torch.Tensor, bias: torch.Tensor,
                lo: torch.Tensor, hi: torch.Tensor, quantize: bool) -> torch.Tensor:
    """ADC + column scale + shift-and-add + tile accumulation + bias, functional form.

    ``out``: partial sums (C, n, M, g, K, Cg) (cycles, samples, pixels, conv groups, row tiles x
    slices, columns); ``inv``: 1/step (1, 1, 1, g, K, Cg); ``mult``: step x shifts x column scale
    x output scale (C, 1, 1, g, K, Cg); ``bias``: (g, Cg). Returns (n, M, g, Cg). This is what
    ``torch.compile`` fuses into one pass that reads every partial sum once and writes only the
    layer's output.
    """
    q = torch.clamp(torch.round(out * inv), lo, hi) * mult if quantize else out * mult
    return q.sum(dim=(0, 4)) + bias


def _adc_reduce_eager(out: torch.Tensor, inv: torch.Tensor, mult: torch.Tensor,
                      bias: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      quantize: bool) -> torch.Tensor:
    """Same as :func:`_adc_reduce`, in place on ``out`` (no temporaries) for eager mode."""
    if quantize:
        out.mul_(inv).round_().clamp_(lo, hi)
    out.mul_(mult)
    return out.sum(dim=(0, 4)).add_(bias)


def _gather(x: torch.Tensor, win: torch.Tensor | None, G: int) -> torch.Tensor:
    """NHWC input -> the channel windows of every row tile, concatenated: (n, H, W, tiles*G).

    Windows are G contiguous channels, so this copies G-channel blocks (an unfold view indexed
    by window start), not single channels."""
    if win is None:
        return x
    return x.unfold(3, G, 1)[:, :, :, win].flatten(3)


def _quant_input(x: torch.Tensor, win: torch.Tensor | None, G: int, inv_s: torch.Tensor,
                 zp: torch.Tensor, top: torch.Tensor, pw: torch.Tensor | None,
                 base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered input levels ``u`` and their DAC digits, least significant first: (C, ...).

    ``pw`` holds the cycles' place values ``base**c`` (C,) and ``base`` the DAC's 2**bits as
    tensors, None for one cycle: computed by the caller, because a Python float derived from a
    symbolic int inside ``torch.compile(dynamic=True)`` breaks inductor in torch 2.11."""
    u = torch.clamp(torch.round(_gather(x, win, G) * inv_s) + zp, torch.zeros_like(top), top)
    if pw is None or base is None:
        return u.unsqueeze(0), u
    pw = pw.view(-1, *([1] * u.dim()))
    return torch.remainder(torch.floor(u.unsqueeze(0) / pw), base), u


_COMPILED: dict[str, Callable[..., torch.Tensor] | None] = {}


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl"))


def _resolve_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":  # eager cuDNN beat both fused paths on an H200 (benchmarks.md)
        return "torch"
    return "compile" if _have_cxx() else "torch"


#: Compiled variants each fused function may build. A network's layers differ in which sizes
#: are 1 (one input cycle, one conv group, one row tile: torch.compile specialises those even
#: with ``dynamic=True``), in whether the ADC quantises and whether channels are windowed, so
#: the default spec on a CIFAR ResNet-18 needs more than dynamo's default of 8, after which it
#: silently ran the remaining layers eagerly (seen on CPU and on an H200, docs/benchmarks.md).
RECOMPILE_LIMIT = 64


def _compiled(name: str, fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """``torch.compile(fn)``, once; None (with a warning) where the toolchain is unusable, so a
    simulation never fails for lack of a compiler. Calls run with dynamo's per-function
    recompile limit raised to :data:`RECOMPILE_LIMIT` (only while they run)."""
    if name not in _COMPILED:
        try:
            compiled = torch.compile(fn, dynamic=True)
        except Exception as exc:  # pragma: no cover - depends on the toolchain
            warnings.warn(f"torch.compile unavailable ({exc}); using eager", XbmWarning,
                          stacklevel=3)
            _COMPILED[name] = None
        else:
            import torch._dynamo as dynamo

            cfg = dynamo.config
            key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"

            def call(*args: Any) -> Any:
                with cfg.patch(**{key: max(RECOMPILE_LIMIT, getattr(cfg, key))}):
                    return compiled(*args)

            _COMPILED[name] = call
    return _COMPILED[name]


def _reducer(backend: str) -> Callable[..., torch.Tensor]:
    """The ADC reduction for a backend."""
    if backend == "compile":
        fn = _compiled("reduce", _adc_reduce)
        if fn is not None:
            return fn
    return _adc_reduce_eager


def _quantizer(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The fused input quantiser for a backend."""
    if backend == "compile":
        fn = _compiled("quant", _quant_input)
        if fn is not None:
            return fn
    return _quant_input


# -- geometry of one layer ----------------------------------------------------------------------
class _Plan:
    """Static geometry: which input channels each row tile reads, and where its rows sit.

    Row tile ``t`` holds layer-matrix rows ``[tR, (t+1)R)`` of the flattened (Cin/g, kh, kw) index,
    so it reads input channels ``[tR // kk, ceil((t+1)R / kk))``: at most ``G`` consecutive
    channels. Each tile becomes one group of a grouped convolution over a gathered window of
    ``G`` channels; rows of the window outside the tile get zero weights. With R = 64 and 3x3
    kernels G = 8, i.e. 72 rows computed per 64 held: 12.5% extra multiply-adds, no im2col.
    """

    def __init__(self, layer: nn.Module, spec: CrossbarSpec) -> None:
        w = layer.weight
        self.conv = isinstance(layer, nn.Conv2d)
        self.cout = int(w.shape[0])
        if self.conv:
            self.groups = int(layer.groups)
            self.cin_g, self.kh, self.kw = int(w.shape[1]), int(w.shape[2]), int(w.shape[3])
            self.stride = tuple(layer.stride)
            self.dilation = tuple(layer.dilation)
            self.pads = _conv_pads(layer)
            self.padding_mode = layer.padding_mode
        else:
            self.groups, self.cin_g, self.kh, self.kw = 1, int(w.shape[1]), 1, 1
            self.stride, self.dilation, self.pads = (1, 1), (1, 1), (0, 0, 0, 0)
            self.padding_mode = "zeros"
        self.cout_g = self.cout // self.groups
        kk = self.kh * self.kw
        self.kk = kk
        self.rows = self.cin_g * kk
        R = spec.rows
        self.R = R
        self.rt = num_row_tiles(self.rows, R)
        starts = [t * R // kk for t in range(self.rt)]
        ends = [math.ceil(min((t + 1) * R, self.rows) / kk) for t in range(self.rt)]
        self.G = max(e - s for s, e in zip(starts, ends, strict=True))
        c0 = [min(s, self.cin_g - self.G) for s in starts]
        j = torch.arange(self.G * kk)
        row_idx = torch.tensor(c0)[:, None] * kk + j[None, :]  # (rt, G*kk)
        t = torch.arange(self.rt)[:, None]
        self.row_idx = row_idx
        self.row_mask = (row_idx >= t * R) & (row_idx < torch.clamp((t + 1) * R, max=self.rows))
        ch = (torch.arange(self.groups)[:, None, None] * self.cin_g
              + torch.tensor(c0)[None, :, None] + torch.arange(self.G)[None, None, :]).reshape(-1)
        self.in_idx = None if torch.equal(ch, torch.arange(self.groups * self.cin_g)) else ch
        # window starts: the gather copies G contiguous channels per tile (fast), not one by one
        self.win_start = (torch.arange(self.groups)[:, None] * self.cin_g
                          + torch.tensor(c0)[None, :]).reshape(-1)
        # logical column -> column tile (crossbar) index, for per-tile ADC ranges
        self.col_tile = column_tile_index(self.cout, spec)

    def stack_weights(self, slices: torch.Tensor) -> torch.Tensor:
        """(Cout, rows, S) slice values -> grouped-conv weight (g*rt*S*Cg, G, kh, kw)."""
        S = slices.shape[-1]
        idx = self.row_idx.to(slices.device)
        w = slices[:, idx, :] * self.row_mask.to(slices.device)[None, :, :, None].to(slices.dtype)
        w = w.reshape(self.groups, self.cout_g, self.rt, self.G * self.kk, S)
        w = w.permute(0, 2, 4, 1, 3)  # (g, rt, S, Cg, G*kk)
        w = w.reshape(self.groups * self.rt * S * self.cout_g, self.G, self.kh, self.kw)
        return w.contiguous(memory_format=torch.channels_last)

    def tile_sums(self, m: torch.Tensor) -> torch.Tensor:
        """Sum a (Cout, rows) matrix over each crossbar column's rows: (rt, Cout)."""
        pad = self.rt * self.R - self.rows
        return F.pad(m, (0, pad)).reshape(self.cout, self.rt, self.R).sum(-1).t()

    def row_mask_full(self) -> torch.Tensor:
        """(rt, Cin/g, kh, kw): 1 where a row of the layer matrix belongs to tile t."""
        r = torch.arange(self.rows)
        t = torch.arange(self.rt)[:, None]
        m = (r[None, :] >= t * self.R) & (r[None, :] < (t + 1) * self.R)
        return m.float().reshape(self.rt, self.cin_g, self.kh, self.kw)

    def ones_weights(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Grouped-conv weight that sums each tile's inputs (g*rt, G, kh, kw)."""
        w = self.row_mask.to(device=device, dtype=dtype).reshape(self.rt, self.G, self.kh,
                                                                 self.kw)
        return w.repeat(self.groups, 1, 1, 1)


def _conv_pads(layer: nn.Conv2d) -> tuple[int, int, int, int]:
    """Explicit (left, right, top, bottom) padding of a Conv2d, 'same'/'valid' resolved."""
    p = layer.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0, 0, 0)
        out = []
        for k, d in ((layer.kernel_size[1], layer.dilation[1]),
                     (layer.kernel_size[0], layer.dilation[0])):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]
    return (int(p[1]), int(p[1]), int(p[0]), int(p[0]))


def _seed(*parts: Any) -> int:
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:7], "little")


@dataclass
class _Calib:
    """Per-task calibration of one layer."""

    in_absmax: float = 0.0
    in_min: float = 0.0
    s_in: float = 1.0
    zp: float = 0.0
    psum_max: torch.Tensor | None = None  # (rt, Cout) max |partial sum| seen
    adc_offset: torch.Tensor | None = None  # (Cout,) mean ADC error, added back (trim)
    off_sum: torch.Tensor | None = None  # while calibrating the trim: sum of errors, count
    off_count: int = 0
    in_ready: bool = False
    adc_ready: bool = False


class LayerSim:
    """The crossbar-faithful ``simulator`` of one crossbar layer (see the module docstring)."""

    def __init__(self, name: str, layer: nn.Module, config: SimConfig,
                 codes: torch.Tensor | None, sim: Simulation) -> None:
        self.name = name
        self.config = config
        self.spec = config.spec_for(layer.spec)
        self.plan = _Plan(layer, self.spec)
        self.codes = codes
        self.sim = sim
        self.calib: dict[str, _Calib] = {}
        self.mode = "run"  # "run" | "calib_input" | "calib_adc" | "calib_offset"
        self._cache: tuple[Any, dict[str, torch.Tensor]] | None = None
        self._var_eps: torch.Tensor | None = None
        self._calls = 0

    # -- cells ------------------------------------------------------------------------------
    def _program(self, w: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 ref: torch.Tensor | None = None, spare: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """Quantise, encode, limit levels, vary and fault the cells of programmed weight ``w``,
        on the scale of the backbone's weight ``ref`` (the chip's, fixed when it was
        programmed): a task's rewritten cells change no other cell. ``spare``: weights held in
        spare crossbars, which the backbone's variation and faults do not touch."""
        cfg, spec = self.config, self.spec
        m = weight_matrix(w.detach()).to(device=device, dtype=torch.float32)
        w_int, s_w = quantize_weight(m, spec, ref)
        cells = encode_cells(w_int, spec)
        top = float(2 ** spec.cell_bits - 1)
        if cfg.levels is not None:
            k = (cfg.levels - 1) / top
            cells = torch.round(cells * k) / k
        clean = cells
        if cfg.variation > 0:
            if self._var_eps is None or self._var_eps.shape != cells.shape:
                g = torch.Generator().manual_seed(_seed(cfg.seed, self.name, "program"))
                self._var_eps = torch.randn(cells.shape, generator=g)
            eps = self._var_eps.to(device)
            if cfg.variation_dist == "lognormal":
                cells = cells * torch.exp(cfg.variation * eps)
            else:
                cells = torch.clamp(cells * (1 + cfg.variation * eps), min=0.0)
        cells = apply_fault_codes(cells, self.codes, spec)
        if spare is not None:  # spare PEs: their own cells, not the backbone's faulty ones
            on_spare = weight_matrix(spare).to(device)
            cells = torch.where(on_spare.reshape(*on_spare.shape, *[1] * (cells.dim() - 2)),
                                clean, cells)
        # zero-point correction: each column's programmed sum as a calibration read after
        # programming measures it (faults and variation included, read noise not)
        actual = slices_to_int(cells_to_slices(cells, spec), spec)
        out = {"w_int": w_int, "s_w": s_w, "cells": cells,
               "rowsum": self.plan.tile_sums(actual)}
        if cfg.read_noise == 0:
            sl = cells_to_slices(cells, spec)
            out["slices"] = sl
            out["wst"] = self.plan.stack_weights(sl).to(dtype)
        return out

    def _prepared(self, w: torch.Tensor, device: torch.device, dtype: torch.dtype,
                  ref: torch.Tensor | None = None, spare: torch.Tensor | None = None
                  ) -> dict[str, torch.Tensor]:
        # Only a parameter (the programmed backbone weight) is cached: a tensor a method builds
        # per call may reuse a freed address with version 0 and different contents.
        if isinstance(w, nn.Parameter) and spare is None:
            key = (id(w), w.data_ptr(), w._version, tuple(w.shape), device, dtype,
                   None if ref is None else (id(ref), ref.data_ptr(), ref._version))
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self._program(w, device, dtype, ref))
            prep = self._cache[1]
        else:
            prep = self._program(w, device, dtype, ref, spare)
        if self.config.read_noise > 0:
            g = torch.Generator().manual_seed(_seed(self.config.seed, self.name, "read",
                                                    self._calls))
            eps = torch.randn(prep["cells"].shape, generator=g).to(device)
            cells = prep["cells"] * (1 + self.config.read_noise * eps)
            prep = dict(prep)
            prep["slices"] = cells_to_slices(cells, self.spec)
            prep["wst"] = self.plan.stack_weights(prep["slices"]).to(dtype)
        return prep

    # -- ADC steps --------------------------------------------------------------------------
    def _adc(self, cal: _Calib, device: torch.device, scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor | None, float, float]:
        """(step (rt, Cout) or None for an ideal ADC, lo, hi). ``scale``: the task's column
        scales (rt, Cout); a masked-off column (scale 0) is not read, so its partial sums do
        not widen the range its tile or layer shares."""
        cfg, spec, plan = self.config, self.spec, self.plan
        if cfg.adc_mode == "ideal" or self.mode in ("calib_adc", "calib_input"):
            return None, 0.0, 0.0
        b = spec.adc_bits
        # offset cells read non-negative sums of non-negative input levels; analog inputs
        # (quantize_inputs off) keep their sign, so their sums need the signed range too
        signed = spec.signed == "differential" or (not cfg.quantize_inputs and cal.in_min < 0)
        qmax = 2 ** (b - 1) - 1 if signed else 2 ** b - 1
        lo, hi = (-float(qmax), float(qmax)) if signed else (0.0, float(qmax))
        if cfg.adc_mode == "fixed":
            cyc_max = 2 ** min(spec.dac_bits, spec.input_bits) - 1
            full = plan.R * cyc_max * (2 ** spec.cell_bits - 1)
            need = math.ceil(math.log2(full + 1))
            step = float(2 ** max(0, need - (b - 1 if signed else b)))
            return torch.full((plan.rt, plan.cout), step, device=device), lo, hi
        if not cal.adc_ready or cal.psum_max is None:
            raise XbmError(f"layer {self.name!r}: ADC ranges are not calibrated for task "
                           f"{self.sim.current_task(self)!r}; call Simulation.calibrate(batches) "
                           "(or pass calibration= to faithful()) first")
        r = cal.psum_max.to(device) * cfg.adc_headroom
        if scale is not None and cfg.adc_granularity != "column":
            r = r * (scale.detach().to(device) != 0)
        if cfg.adc_granularity == "layer":
            r = r.amax().expand_as(r)
        elif cfg.adc_granularity == "tile":
            ct = plan.col_tile.to(device)
            n_ct = int(ct.max()) + 1
            per = torch.zeros(plan.rt, n_ct, device=device).scatter_reduce(
                1, ct.expand(plan.rt, -1), r, reduce="amax", include_self=True)
            r = per[:, ct]
        min_step = 1.0 if cfg.quantize_inputs else 1e-12
        return torch.clamp(r / qmax, min=min_step), lo, hi

    # -- forward ----------------------------------------------------------------------------
    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # an empty batch: the ideal path's empty output, nothing to count
            return self._empty(x)
        task = self.sim.current_task(layer)
        cal = self.calib.setdefault(task, _Calib())
        if self.mode == "calib_input":
            with torch.no_grad():
                cal.in_absmax = max(cal.in_absmax, float(x.detach().abs().amax()))
                cal.in_min = min(cal.in_min, float(x.detach().amin()))
        with torch.no_grad():
            if self.plan.conv:
                xh = x.permute(0, 2, 3, 1)  # NHWC: a view when x is channels_last
                y = self._forward(layer, xh, cal)
                y = y.permute(0, 3, 1, 2)  # channels_last output
            else:
                lead = x.shape[:-1]
                xh = x.reshape(-1, 1, 1, x.shape[-1])
                y = self._forward(layer, xh, cal).reshape(*lead, self.plan.cout)
        self._calls += 1
        return y

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        """The output of a batch without samples, in the shape and layout of a real one's."""
        plan = self.plan
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        if not plan.conv:
            return x.new_zeros((*x.shape[:-1], plan.cout), dtype=dtype)
        p = plan.pads  # (left, right, top, bottom), as F.pad takes them
        ho, wo = _out_hw(plan, (x.shape[2] + p[2] + p[3], x.shape[3] + p[0] + p[1]))
        return x.new_zeros((x.shape[0], plan.cout, max(ho, 0), max(wo, 0)), dtype=dtype
                           ).contiguous(memory_format=torch.channels_last)

    def _forward(self, layer: nn.Module, xh: torch.Tensor, cal: _Calib) -> torch.Tensor:
        """Faithful output, NHWC in and out: (N, H, W, Cin) -> (N, Ho, Wo, Cout)."""
        cfg, spec, plan = self.config, self.spec, self.plan
        dev = xh.device
        dtype = xh.dtype if xh.dtype in (torch.float32, torch.float64) else torch.float32
        w, scale, bias = layer.chip_view()
        prep = self._prepared(w, dev, dtype, layer.weight, layer.spare_weights())
        S = spec.slices
        g, rt, cg = plan.groups, plan.rt, plan.cout_g
        backend = _resolve_backend(cfg.backend, dev)
        # -- input quantisation parameters (unsigned levels, zero point for signed inputs)
        # calibrating input ranges: this chip's cells, analog inputs, no ADC
        quantize_inputs = cfg.quantize_inputs and self.mode != "calib_input"
        if quantize_inputs:
            if not cal.in_ready:
                raise XbmError(f"layer {self.name!r}: input scale not calibrated for task "
                               f"{self.sim.current_task(layer)!r}; call Simulation.calibrate("
                               "batches) (or pass calibration= to faithful()) first")
            C = spec.input_cycles
            db = min(spec.dac_bits, spec.input_bits)
            s_in, zp, top = cal.s_in, cal.zp, float(2 ** spec.input_bits - 1)
        else:
            C, db, s_in, zp, top = 1, 0, 1.0, 0.0, 0.0
        # -- padding: by the conv itself when zero-valued levels are right; explicit otherwise
        pads = plan.pads
        sym = pads[0] == pads[1] and pads[2] == pads[3]
        conv_pad: tuple[int, int] = (0, 0)
        if not any(pads):
            pre_pad = None
        elif plan.padding_mode == "zeros" and zp == 0 and sym:
            pre_pad, conv_pad = None, (pads[2], pads[0])
        else:
            pre_pad = pads
        # -- ADC and scales, per (g, tile, slice, column)
        step, lo, hi = self._adc(cal, dev, scale)
        quantize = step is not None
        cs = (scale.detach().to(dev, dtype) if scale is not None
              else torch.ones(rt, plan.cout, device=dev, dtype=dtype))  # (rt, Cout)
        st = step.to(dtype) if quantize else torch.ones(rt, plan.cout, device=dev, dtype=dtype)

        def per_group(t: torch.Tensor) -> torch.Tensor:  # (rt, Cout) -> (g, rt, 1, Cg)
            return t.reshape(rt, g, cg).permute(1, 0, 2).unsqueeze(2)

        out_scale = float(s_in) * prep["s_w"].to(dtype)
        sw = slice_weights(spec, dtype, dev).view(1, 1, S, 1)
        cyc = (2.0 ** (db * torch.arange(C, device=dev))).to(dtype)
        mult = per_group(st * cs) * sw * out_scale  # (g, rt, S, Cg)
        mult = (cyc.view(C, 1, 1, 1, 1, 1) * mult.reshape(1, 1, 1, g, rt * S, cg)).contiguous()
        inv = (1.0 / per_group(st)).expand(g, rt, S, cg).reshape(1, 1, 1, g, rt * S, cg)
        inv = inv.contiguous()
        b = bias.detach().to(dev, dtype) if bias is not None else torch.zeros(
            plan.cout, device=dev, dtype=dtype)
        if zp:  # digital zero-point correction with each column's measured programmed sum
            b = b - out_scale * zp * (cs * prep["rowsum"].to(dtype)).sum(0)
        if quantize and cal.adc_offset is not None and self.mode == "run":  # the offset trim
            b = b + cal.adc_offset.to(dev, dtype)
        bias_g = b.reshape(g, cg).contiguous()
        offset = float(2 ** (spec.weight_bits - 1)) if spec.signed == "offset" else 0.0
        if backend == "triton" and self.mode == "run":
            return self._forward_triton(xh, prep, cal, quantize_inputs, C, db, s_in, zp, top,
                                        step, lo, hi, cs, st, out_scale, b, offset)
        reduce = _reducer(backend)
        quant = _quantizer(backend)
        # scalars as 0-d tensors: a compiled function would otherwise specialise (and recompile)
        # on every layer's float input scale
        qparams = torch.tensor([1.0 / s_in, zp, top], device=dev, dtype=dtype).unbind()
        if C > 1:
            dac_base = torch.tensor(float(2 ** db), device=dev, dtype=dtype)
            place = dac_base ** torch.arange(C, device=dev, dtype=dtype)
        else:
            dac_base = place = None
        adc_lo, adc_hi = torch.tensor([lo, hi], device=dev, dtype=dtype).unbind()
        wst = prep["wst"]
        win = plan.win_start.to(dev) if plan.in_idx is not None else None
        # -- batch chunks bound the live partial sums whatever the slices and cycles
        n_total, h, w_ = xh.shape[0], xh.shape[1], xh.shape[2]
        if pre_pad is not None:
            h, w_ = h + pre_pad[2] + pre_pad[3], w_ + pre_pad[0] + pre_pad[1]
        ho, wo = _out_hw(plan, (h + 2 * conv_pad[0], w_ + 2 * conv_pad[1]))
        per_sample = C * wst.shape[0] * max(ho * wo, 1)
        chunk = max(1, min(n_total, cfg.chunk_elements // max(per_sample, 1)))
        y_all = None
        for i in range(0, n_total, chunk):
            xc = xh[i:i + chunk]
            if pre_pad is not None:  # pad the float input with 0: it quantises to the zero point
                mode = "constant" if plan.padding_mode == "zeros" else plan.padding_mode
                xc = F.pad(xc.permute(0, 3, 1, 2), pre_pad, mode=mode).permute(0, 2, 3, 1)
            n = xc.shape[0]
            if quantize_inputs:
                dig, u = quant(xc.to(dtype), win, plan.G, qparams[0], qparams[1], qparams[2],
                               place, dac_base)
            else:
                u = _gather(xc.to(dtype), win, plan.G)
                dig = u.unsqueeze(0)
            dig = dig.reshape(C * n, *dig.shape[2:]).permute(0, 3, 1, 2)  # channels_last
            out = F.conv2d(dig, wst, None, plan.stride, conv_pad, plan.dilation, g * rt)
            oh = out.permute(0, 2, 3, 1)
            if not oh.is_contiguous():
                oh = oh.contiguous()
            oh = oh.view(C, n, ho * wo, g, rt * S, cg)
            if self.mode == "calib_adc":
                self._record(cal, oh)
            if self.mode == "calib_offset" and quantize:
                y = self._trim_step(cal, oh, inv, mult, bias_g, adc_lo, adc_hi)
            else:
                y = reduce(oh, inv, mult, bias_g, adc_lo, adc_hi, quantize)  # (n, M, g, Cg)
            y = y.reshape(n, ho, wo, plan.cout)
            if offset:  # digital removal of the weight offset: off * sum of each tile's inputs
                ones = plan.ones_weights(dtype, dev).contiguous(memory_format=torch.channels_last)
                tsum = F.conv2d(u.permute(0, 3, 1, 2), ones, None, plan.stride, conv_pad,
                                plan.dilation, g * rt)
                tsum = tsum.permute(0, 2, 3, 1).reshape(n, ho, wo, g, rt)
                csg = cs.reshape(rt, g, cg).permute(1, 0, 2)  # (g, rt, Cg)
                corr = torch.einsum("nhwgt,gto->nhwgo", tsum, csg).reshape(n, ho, wo, plan.cout)
                y = y - out_scale * offset * corr
            self.sim._count(self, n * ho * wo * C * S, scale)
            if chunk >= n_total:
                y_all = y
                break
            if y_all is None:
                y_all = torch.empty(n_total, ho, wo, plan.cout, device=dev, dtype=y.dtype)
            y_all[i:i + n] = y
        assert y_all is not None
        if self.mode == "calib_offset" and quantize:
            return self._trimmed(cal, y_all)
        return y_all

    def _forward_triton(self, xh: torch.Tensor, prep: dict[str, torch.Tensor], cal: _Calib,
                        quantize_inputs: bool, C: int, db: int, s_in: float, zp: float,
                        top: float, step: torch.Tensor | None, lo: float, hi: float,
                        cs: torch.Tensor, st: torch.Tensor, out_scale: torch.Tensor,
                        b: torch.Tensor, offset: float) -> torch.Tensor:
        """The fused Triton kernel (``xbm.hardware.kernels.conv_adc``), NHWC in and out."""
        import os

        from xbm.hardware.kernels.conv_adc import conv_adc

        cfg, spec, plan = self.config, self.spec, self.plan
        dev = xh.device
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise XbmError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 to run "
                           "the kernel in Triton's interpreter); use backend='compile' "
                           "(xbm simulate --backend compile) on CPU")
        f32 = torch.float32
        x = xh.to(f32)
        pads = plan.pads
        if plan.padding_mode != "zeros" or pads[0] != pads[1] or pads[2] != pads[3]:
            mode = "constant" if plan.padding_mode == "zeros" else plan.padding_mode
            x = F.pad(x.permute(0, 3, 1, 2), pads, mode=mode).permute(0, 2, 3, 1)
            kpad = (0, 0)
        else:
            kpad = (pads[2], pads[0])
        if quantize_inputs:
            u = torch.clamp(torch.round(x * (1.0 / s_in)) + zp, 0.0, top).contiguous()
        else:
            u = x.contiguous()
        g, rt, cg, S = plan.groups, plan.rt, plan.cout_g, spec.slices
        key = "wtri"
        if key not in prep:
            sl = F.pad(prep["slices"].to(f32), (0, 0, 0, rt * plan.R - plan.rows))
            prep[key] = sl.reshape(g, cg, rt * plan.R, S).permute(0, 3, 2, 1).contiguous()
        sw = slice_weights(spec, f32, dev)
        cyc = (2.0 ** (db * torch.arange(C, device=dev))).to(f32)
        mult = cyc.view(C, 1, 1, 1) * (st * cs).to(f32).view(1, rt, 1, plan.cout) * \
            sw.view(1, 1, S, 1) * out_scale.to(f32)
        exact_ints = quantize_inputs and cfg.variation == 0 and cfg.read_noise == 0 and \
            cfg.levels is None and spec.cell_bits <= 11 and db <= 11
        y = conv_adc(u, prep[key], kh=plan.kh, kw=plan.kw, stride=plan.stride, pads=kpad,
                     dilation=plan.dilation, groups=g, rows=plan.rows, R=plan.R, cycles=C,
                     dac_bits=max(db, 1), zp=zp, inv=(1.0 / st).to(f32), mult=mult,
                     bias=b.to(f32), lo=lo, hi=hi, quantize=step is not None,
                     ieee=not exact_ints)
        n, ho, wo = y.shape[:3]
        if offset:  # digital removal of the weight offset, from each tile's input sum
            mask = plan.row_mask_full().to(dev, f32)  # (rt, Cin_g, kh, kw)
            un = u.permute(0, 3, 1, 2)
            if any(kpad):
                un = F.pad(un, (kpad[1], kpad[1], kpad[0], kpad[0]), value=zp)
            tsum = F.conv2d(un, mask.repeat(g, 1, 1, 1), None, plan.stride, 0, plan.dilation, g)
            tsum = tsum.permute(0, 2, 3, 1).reshape(n, ho, wo, g, rt)
            csg = cs.to(f32).reshape(rt, g, cg).permute(1, 0, 2)
            corr = torch.einsum("nhwgt,gto->nhwgo", tsum, csg).reshape(n, ho, wo, plan.cout)
            y = y - out_scale.to(f32) * offset * corr
        self.sim._count(self, n * ho * wo * C * S, cs)
        return y.to(xh.dtype if xh.dtype in (torch.float32, torch.float64) else f32)

    @staticmethod
    def _trim_step(cal: _Calib, oh: torch.Tensor, inv: torch.Tensor, mult: torch.Tensor,
                   bias_g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Calibrating the offset trim: add this chunk's ADC error (unquantised minus quantised
        output, per column) to the running sum and return the quantised output, untrimmed: the
        whole batch is trimmed once every chunk is in (:meth:`_trimmed`), so what the later
        layers are fitted on does not depend on how the batch was chunked."""
        yq = _adc_reduce(oh, inv, mult, bias_g, lo, hi, True)  # (n, M, g, Cg)
        yi = _adc_reduce(oh * inv, inv, mult, bias_g, lo, hi, False)  # mult holds the step
        d = (yi - yq).double().sum(dim=(0, 1)).reshape(-1).cpu()
        cal.off_sum = d if cal.off_sum is None else cal.off_sum + d
        cal.off_count += yq.shape[0] * yq.shape[1]
        return yq

    @staticmethod
    def _trimmed(cal: _Calib, y: torch.Tensor) -> torch.Tensor:
        """A calibration batch's output (N, Ho, Wo, Cout) trimmed by the running mean error
        over every batch so far, this one whole: the layers after this one are fitted on
        trimmed inputs, as they will run."""
        if cal.off_sum is None or not cal.off_count:
            return y
        return y + (cal.off_sum / cal.off_count).to(y.device, y.dtype)

    def _record(self, cal: _Calib, oh: torch.Tensor) -> None:
        """Running max of |partial sum| per (row tile, column) over cycles, slices, pixels."""
        plan = self.plan
        a = oh.abs().amax(dim=(0, 1, 2))  # (g, rt*S, Cg)
        a = a.view(plan.groups, plan.rt, -1, plan.cout_g).amax(2)  # (g, rt, Cg)
        a = a.permute(1, 0, 2).reshape(plan.rt, plan.cout).float().cpu()
        cal.psum_max = a if cal.psum_max is None else torch.maximum(cal.psum_max, a)


def _out_hw(plan: _Plan, hw: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """Output size of the (already padded) input ``hw``."""
    h, w = int(hw[0]), int(hw[1])
    ho = (h - plan.dilation[0] * (plan.kh - 1) - 1) // plan.stride[0] + 1
    wo = (w - plan.dilation[1] * (plan.kw - 1) - 1) // plan.stride[1] + 1
    return ho, wo


# -- a whole model -------------------------------------------------------------------------------
def _root(model: nn.Module) -> nn.Module:
    from xbm.multitask import MultiTaskModel

    return model.model if isinstance(model, MultiTaskModel) else model


class Simulation:
    """Crossbar-faithful simulators installed on every crossbar layer of a model.

    Use :func:`faithful` rather than this class directly; it installs and always removes them.
    ``conversions`` and ``skipped_conversions`` count ADC conversions performed and skipped
    (masked-off crossbar columns) since installation, for the cost model.
    """

    def __init__(self, model: nn.Module, config: SimConfig | None = None,
                 fault_map: FaultMap | None = None) -> None:
        from xbm.nn.convert import crossbar_layers

        self.model = model
        self.config = config or SimConfig()
        self.root = _root(model)
        layers = crossbar_layers(self.root)
        if not layers:
            raise XbmError("model has no crossbar layers; wrap it in a MultiTaskModel first")
        if fault_map is not None:
            fault_map.check(self.root, self.config.spec_for(layers[0][1].spec))
        self.layers: list[tuple[str, nn.Module, LayerSim]] = []
        for name, layer in layers:
            codes = fault_map.codes[name] if fault_map is not None else None
            self.layers.append((name, layer, LayerSim(name, layer, self.config, codes, self)))
        self._saved: list[tuple[nn.Module, Any]] = []
        self._tf32: tuple[bool, bool] | None = None  # the switches before install()
        # BatchNorm statistics that bn_recalibration replaced, restored by remove()
        self._bn_saved: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._bn_tasks: set[str] = set()  # tasks whose ranges were measured with those
        self.conversions = 0
        self.skipped_conversions = 0

    def current_task(self, layer: nn.Module) -> str:
        return str(getattr(layer, "active_task", "base"))

    def _count(self, ls: LayerSim, per_column: int, scale: torch.Tensor | None) -> None:
        if ls.mode != "run":
            return
        total = ls.plan.rt * ls.plan.cout
        active = total if scale is None else int((scale.detach() != 0).sum())
        self.conversions += per_column * active
        self.skipped_conversions += per_column * (total - active)

    def install(self) -> None:
        """Set every crossbar layer's ``simulator``; the previous ones are kept for
        :meth:`remove`."""
        if self._tf32 is not None:  # installed already
            return
        self._saved = [(layer, layer.simulator) for _, layer, _ in self.layers]
        for _, layer, ls in self.layers:
            layer.simulator = ls
        self._tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        if not self.config.allow_tf32:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False

    def remove(self) -> None:
        """Restore the simulators (and TF32 switches) that were set before :meth:`install`."""
        if self._tf32 is None:  # not installed
            return
        for layer, sim in self._saved:
            layer.simulator = sim
        self._saved = []
        self._restore_bn(list(self._bn_saved))
        self._bn_saved = {}
        # their input and ADC ranges (and trims) were measured with the recalibrated statistics
        # just put back: a later install must calibrate again, not run on mixed states
        for _, _, ls in self.layers:
            for t in self._bn_tasks:
                ls.calib.pop(t, None)
        self._bn_tasks = set()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self._tf32
        self._tf32 = None

    def _set_mode(self, mode: str) -> None:
        for _, _, ls in self.layers:
            ls.mode = mode

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Any], task: str | None = None) -> None:
        """Set input scales and ADC ranges of the active task from a few batches.

        Two passes over at most ``config.calibration_batches`` batches: the first records each
        layer's input range while the chip (its cells, with faults and variation) computes with
        float inputs and no ADC, the second, with quantised inputs and an ideal ADC, records
        every crossbar column's largest partial sum. With ``config.adc_offset_trim`` a third
        pass, with the ADCs as set, measures each output column's mean ADC error (the trim).
        With ``config.bn_recalibration`` the task's BatchNorm statistics are then re-estimated
        on the chip and the passes above run again with them (twice over: the ranges follow
        the statistics, and the statistics the ranges); the trained statistics come back when
        the simulation is removed, and a second ``calibrate`` starts from them again.
        Batches may be tensors or ``(x, y)``, on any device (they are moved to the model's).
        ``task``: calibrate this task (of a MultiTaskModel) rather than the active one.
        """
        if task is not None:
            use = getattr(self.model, "use_task", None)
            if use is None:
                raise ConfigError("calibrate(task=...) needs a MultiTaskModel; set the task on "
                                  "the model and call calibrate(batches)")
            with use(task):
                return self.calibrate(batches)
        dev = self.layers[0][1].weight.device
        xs = []
        for item in batches:
            x = item[0] if isinstance(item, (tuple, list)) else item
            xs.append(x.to(dev) if isinstance(x, torch.Tensor) else x)  # CPU loaders on CUDA
            if len(xs) >= self.config.calibration_batches:
                break
        if not xs:
            raise XbmError("calibration needs at least one batch")
        if all(isinstance(x, torch.Tensor) and x.numel() == 0 for x in xs):
            # no sample: no range could be measured, and the layers would run uncalibrated
            raise XbmError(f"calibration got {len(xs)} batch(es) without a sample; pass "
                           "batches of images (e.g. a few of the task's training batches)")
        installed = self._tf32 is not None
        bns = self._task_bns() if self.config.bn_recalibration else []
        if bns and not installed:  # remove() below would put the trained statistics back
            raise ConfigError("bn_recalibration replaces the task's BatchNorm statistics while "
                              "the simulation is installed: calibrate inside faithful(...) "
                              "or after Simulation.install()")
        self.install()
        if bns:
            self._bn_tasks.add(self.current_task(self.layers[0][1]))
        try:
            with eval_mode(self.model):  # each submodule's own flag comes back
                self._restore_bn(bns)  # a second calibrate starts from the trained statistics
                self._calibrate_ranges(xs)
                for _ in range(2 if bns else 0):
                    self._recalibrate_bn(bns, xs)
                    self._calibrate_ranges(xs)
        except BaseException:
            # nothing half-done stays: the trained statistics, and no calibration (the next
            # forward asks for one)
            self._restore_bn(bns)
            for _, layer, ls in self.layers:
                ls.calib[self.current_task(layer)] = _Calib()
            raise
        finally:
            self._set_mode("run")
            if not installed:
                self.remove()

    def _calibrate_ranges(self, xs: list[torch.Tensor]) -> None:
        """Input scales, ADC ranges and (with ``adc_offset_trim``) the trims of the active task,
        from scratch."""
        for _, layer, ls in self.layers:
            ls.calib[self.current_task(layer)] = _Calib()
        self._set_mode("calib_input")
        for x in xs:
            self.model(x)
        bits = {id(ls): ls.spec.input_bits for _, _, ls in self.layers}
        for _, layer, ls in self.layers:
            cal = ls.calib[self.current_task(layer)]
            signed = cal.in_min < 0
            levels = 2 ** (bits[id(ls)] - 1) - 1 if signed else 2 ** bits[id(ls)] - 1
            top = cal.in_absmax * self.config.input_headroom
            cal.s_in = top / levels if top > 0 else 1.0
            cal.zp = float(2 ** (bits[id(ls)] - 1)) if signed else 0.0
            cal.in_ready = True
        if self.config.adc_mode == "calibrate":
            self._set_mode("calib_adc")
            for x in xs:
                self.model(x)
        for _, layer, ls in self.layers:
            cal = ls.calib[self.current_task(layer)]
            if cal.psum_max is None:
                cal.psum_max = torch.zeros(ls.plan.rt, ls.plan.cout)
            cal.adc_ready = True
        if self.config.adc_offset_trim and self.config.adc_mode != "ideal":
            self._set_mode("calib_offset")
            for x in xs:
                self.model(x)
            for _, layer, ls in self.layers:
                cal = ls.calib[self.current_task(layer)]
                if cal.off_sum is not None and cal.off_count:
                    cal.adc_offset = (cal.off_sum / cal.off_count).float()
                cal.off_sum, cal.off_count = None, 0
        self._set_mode("run")

    def _task_bns(self) -> list[nn.Module]:
        """The active task's own BatchNorm copies (what ``bn_recalibration`` re-estimates)."""
        from xbm.nn.layers import TaskBatchNorm

        bns = []
        for name, m in self.root.named_modules():
            if not isinstance(m, TaskBatchNorm) or m.running_mean is None:
                continue
            own = m.xbm_tasks[m.active_task] if m.active_task in m.xbm_tasks else None  # noqa: SIM401
            if own is None:
                raise ConfigError(
                    f"bn_recalibration re-estimates a task's own BatchNorm statistics, but "
                    f"{name} runs the backbone's BatchNorm for task {m.active_task!r} (the "
                    "base task, or a task without per-task BN), whose statistics are the "
                    "programmed model's; simulate this task without it")
            bns.append(own)
        if not bns:
            raise ConfigError("bn_recalibration: this model has no BatchNorm layer with running "
                              "statistics (a ViT's LayerNorm keeps none), so it would change "
                              "nothing; drop it")
        return bns

    def _restore_bn(self, bns: list[nn.Module]) -> None:
        """Put back the trained statistics of those of ``bns`` that a recalibration replaced."""
        with torch.no_grad():
            for bn in bns:
                if bn in self._bn_saved:
                    mean, var, n = self._bn_saved[bn]
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    bn.num_batches_tracked.copy_(n)

    def _recalibrate_bn(self, bns: list[nn.Module], xs: list[torch.Tensor]) -> None:
        """Cumulative statistics of ``bns`` over ``xs`` on the chip (train-mode BN: each layer
        normalises with its batch's statistics, so the next is measured on recalibrated
        inputs); the trained ones are saved for :meth:`remove`. Not counted as inference
        conversions."""
        momenta = []
        for bn in bns:
            if bn not in self._bn_saved:
                self._bn_saved[bn] = (bn.running_mean.clone(), bn.running_var.clone(),
                                      bn.num_batches_tracked.clone())
            bn.reset_running_stats()
            momenta.append(bn.momentum)
            bn.momentum = None  # a cumulative average over the batches
            bn.train()  # the caller's eval_mode puts every flag back
        self._set_mode("run")
        counts = (self.conversions, self.skipped_conversions)
        try:
            for x in xs:
                self.model(x)
        finally:
            self.conversions, self.skipped_conversions = counts
            for bn, mom in zip(bns, momenta, strict=True):
                bn.momentum = mom
                bn.eval()

    def state(self) -> dict[str, Any]:
        """Calibration per layer and task (for reports and debugging)."""
        out: dict[str, Any] = {}
        for name, _, ls in self.layers:
            out[name] = {t: {"s_in": c.s_in, "zero_point": c.zp,
                             "psum_max": None if c.psum_max is None else
                             float(c.psum_max.max())} for t, c in ls.calib.items()}
        return out


@contextlib.contextmanager
def faithful(model: nn.Module, config: SimConfig | None = None,
             fault_map: FaultMap | None = None,
             calibration: Iterable[Any] | None = None) -> Iterator[Simulation]:
    """Run ``model`` (a MultiTaskModel or converted model) on the crossbar-faithful path.

    Args:
        model: the model; its active task is simulated (set it with ``set_task``/``use_task``).
        config: what to simulate (default :class:`SimConfig`).
        fault_map: stuck-at faults of the chip, or None.
        calibration: batches for :meth:`Simulation.calibrate` of the active task; without them,
            call ``sim.calibrate`` yourself before the first forward (unless nothing needs
            calibration: ``quantize_inputs=False`` and an ``ideal``/``fixed`` ADC).

    Yields:
        The installed :class:`Simulation`. On exit every layer's previous ``simulator`` is
        restored; the programmed weights are never written.
    """
    sim = Simulation(model, config, fault_map)
    sim.install()
    try:
        if calibration is not None:
            sim.calibrate(calibration)
        elif not sim.config.quantize_inputs and sim.config.adc_mode != "calibrate":
            for _, layer, ls in sim.layers:
                cal = ls.calib.setdefault(sim.current_task(layer), _Calib())
                cal.adc_ready = True
        yield sim
    finally:
        sim.remove()


__all__ = [
    "ADC_GRANULARITIES",
    "ADC_MODES",
    "BACKENDS",
    "LayerSim",
    "SimConfig",
    "Simulation",
    "faithful",
]
