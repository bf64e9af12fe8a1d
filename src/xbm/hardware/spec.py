"""Crossbar geometry and bit widths.

The papers this project implements do not publish their crossbar size, bit widths or mapping
(see ``docs/assumptions.md``). Every such detail is therefore a field here, with a default chosen
from a cited source, so that results state exactly what they assumed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from xbm.config import from_fields
from xbm.errors import ConfigError, unknown

SIGNED_SCHEMES = ("differential", "offset")


#: Upper bounds of CrossbarSpec's integer fields, far past any built array (crossbars are
#: 64-1024 wordlines; weights and inputs at most 32 bits) but within what torch can index.
MAX_FIELD = {"rows": 65536, "cols": 65536, "weight_bits": 32, "cell_bits": 32, "pe_rows": 4096,
             "pe_cols": 4096, "input_bits": 32, "dac_bits": 32, "adc_bits": 32}


@dataclass(frozen=True)
class CrossbarSpec:
    """Geometry and precision of the crossbars that hold a programmed backbone."""

    rows: int = 64
    """Wordlines per crossbar (R). 64 follows PytorX (He & Fan, DAC'19; elliothe/pytorx), the same
    lab's crossbar simulator. XBM masks one column per R rows, so its mask memory is ~1/R of an
    element-wise mask."""

    cols: int = 64
    """Physical bitlines per crossbar (C). 64, as PytorX."""

    weight_bits: int = 8
    """Precision of a programmed weight. 8 bits, as PytorX and NeuroSim's WAGE 8-bit models."""

    cell_bits: int = 2
    """Bits stored per ReRAM cell; a weight takes ceil(weight_bits / cell_bits) slice columns. 2-bit
    cells are a common multi-level choice (ISAAC uses 2-bit cells, Shafiee et al., ISCA 2016)."""

    signed: str = "differential"
    """How signed weights are stored: ``differential`` (a positive and a negative cell per slice,
    PytorX's conductance pair) or ``offset`` (one cell per slice plus a digital offset)."""

    pe_rows: int = 2
    """Crossbars per processing element (PE) along the row-tile axis. MNSIM 2.0's default PE groups
    2x2 crossbars (thu-nics/MNSIM-2.0 SimConfig.ini); XMA2 re-programs whole PEs."""

    pe_cols: int = 2
    """Crossbars per PE along the column-tile axis (see ``pe_rows``)."""

    input_bits: int = 8
    """Activation precision fed to the wordlines (PytorX: 8-bit inputs)."""

    dac_bits: int = 1
    """Input bits applied per wordline cycle; inputs take ceil(input_bits/dac_bits) cycles.
    1-bit (bit-serial) inputs, as ISAAC."""

    adc_bits: int = 8
    """Resolution of each column's ADC (ISAAC: 8-bit ADC per crossbar)."""

    name: str = "custom"
    """Preset name, for reports."""

    source: str = ""
    """Citation for the preset's values."""

    def __post_init__(self) -> None:
        for f in ("name", "source"):  # both go into reports and bundle metadata as text
            if not isinstance(getattr(self, f), str):
                raise ConfigError(f"CrossbarSpec.{f} must be a string, got "
                                  f"{getattr(self, f)!r}")
        for f in ("rows", "cols", "weight_bits", "cell_bits", "pe_rows", "pe_cols", "input_bits",
                  "dac_bits", "adc_bits"):
            v = getattr(self, f)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"CrossbarSpec.{f} must be a positive integer, got {v!r}")
            if v > MAX_FIELD[f]:  # 2^40 rows could not be allocated; 2^64 overflowed torch
                shown = v if v < 10**24 else f"a {len(str(v))}-digit number"
                raise ConfigError(f"CrossbarSpec.{f} must be at most {MAX_FIELD[f]}, got {shown}")
            if type(v) is not int:  # numpy's integers: plain ints for JSON metadata
                object.__setattr__(self, f, int(v))
        if self.weight_bits < 2:
            raise ConfigError(
                f"CrossbarSpec.weight_bits must be >= 2, got {self.weight_bits}: a signed weight "
                "needs a sign and at least one magnitude bit (1 bit quantises every weight to 0)"
            )
        if self.signed == "differential" and self.adc_bits < 2:
            raise ConfigError(
                f"CrossbarSpec.adc_bits must be >= 2 with differential cells, got "
                f"{self.adc_bits}: the ADC reads a signed (sign-magnitude) partial sum, and one "
                "bit leaves no magnitude code"
            )
        if self.cell_bits > self.weight_bits:
            raise ConfigError(
                f"CrossbarSpec.cell_bits ({self.cell_bits}) exceeds weight_bits "
                f"({self.weight_bits}); a cell cannot hold more bits than the weight has"
            )
        if self.dac_bits > self.input_bits:
            raise ConfigError(
                f"CrossbarSpec.dac_bits ({self.dac_bits}) exceeds input_bits ({self.input_bits})"
            )
        if self.signed not in SIGNED_SCHEMES:
            raise ConfigError(
                f"CrossbarSpec.signed must be one of {', '.join(SIGNED_SCHEMES)}, "
                f"got {self.signed!r}"
            )
        if self.cols < self.physical_columns_per_weight:
            raise ConfigError(
                f"CrossbarSpec.cols ({self.cols}) cannot hold one weight, which needs "
                f"{self.physical_columns_per_weight} physical columns "
                f"({self.slices} slices x {self.cells_per_slice} cells); raise cols or cell_bits"
            )

    @property
    def slices(self) -> int:
        """Bit-slice columns per weight: ceil(weight_bits / cell_bits). A differential pair's
        sides each store a magnitude of at most weight_bits - 1 bits, so with 1-bit cells their
        top slice always holds 0: kept, as simulators count columns per synapse
        (docs/assumptions.md, ``signed``)."""
        return math.ceil(self.weight_bits / self.cell_bits)

    @property
    def cells_per_slice(self) -> int:
        """Cells per slice: 2 for a differential pair, 1 with an offset."""
        return 2 if self.signed == "differential" else 1

    @property
    def physical_columns_per_weight(self) -> int:
        """Physical bitlines that one logical output column takes."""
        return self.slices * self.cells_per_slice

    @property
    def cells_per_weight(self) -> int:
        """ReRAM cells that store one weight (all its slices, both polarities)."""
        return self.physical_columns_per_weight

    @property
    def logical_cols(self) -> int:
        """Logical output columns (whole weights) that fit side by side in one crossbar."""
        return self.cols // self.physical_columns_per_weight

    @property
    def input_cycles(self) -> int:
        """Wordline cycles to apply one input vector bit-serially."""
        return math.ceil(self.input_bits / self.dac_bits)

    def replace(self, **changes: Any) -> CrossbarSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields, for bundles and results."""
        return dataclasses.asdict(self)

    def geometry_dict(self) -> dict[str, Any]:
        """Every field but the name and source: a bundle must match these to load. Only
        ``rows`` (and, for XMA2's PE grid, ``cols`` and the PE shape) decide a mask's shape, but
        the bit widths decide a task's re-programmed cells and costs, so a bundle loads onto
        the chip it was learned for; ``xbm simulate --adc-bits`` and its other flags explore
        other periphery without reloading it."""
        d = self.to_dict()
        d.pop("name")
        d.pop("source")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CrossbarSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return from_fields(cls, d)


SPEC_PRESETS: dict[str, CrossbarSpec] = {
    "pytorx": CrossbarSpec(
        name="pytorx",
        source="PytorX (He & Fan, DAC 2019; elliothe/pytorx python/torx/module/layer.py): 64x64, "
        "8-bit weights and inputs, conductance pairs",
    ),
    "isaac": CrossbarSpec(
        rows=128, cols=128, weight_bits=16, cell_bits=2, signed="offset", adc_bits=8,
        dac_bits=1,
        name="isaac",
        source="ISAAC (Shafiee et al., ISCA 2016): 128x128 arrays, 2-bit cells, 16-bit weights "
        "stored biased (one cell per slice, the bias removed digitally; CrossSim's ISAAC.json: "
        "offset mapping), 1-bit DAC, 8-bit ADC",
    ),
    "mnsim": CrossbarSpec(
        rows=256, cols=256, weight_bits=8, cell_bits=1, adc_bits=6, dac_bits=1,
        name="mnsim",
        source="MNSIM 2.0 (thu-nics/MNSIM-2.0 SimConfig.ini): 256x256 crossbars, PE 2x2; "
               "ADC.py choice 4: 6-bit SAR, as the mnsim energy preset",
    ),
    "neurosim": CrossbarSpec(
        rows=128, cols=128, weight_bits=8, cell_bits=1, adc_bits=5, dac_bits=1,
        name="neurosim",
        source="DNN+NeuroSim V1.4 defaults (Param.cpp): 128-row sub-array, 1 bit/cell, 5-bit ADC",
    ),
}
SPEC_PRESETS["default"] = dataclasses.replace(SPEC_PRESETS["pytorx"], name="default")


def get_spec(name: str = "default", **overrides: Any) -> CrossbarSpec:
    """A named preset with optional field overrides (``None`` overrides are ignored)."""
    if name not in SPEC_PRESETS:
        raise unknown("crossbar preset", name, SPEC_PRESETS)
    changes = {k: v for k, v in overrides.items() if v is not None}
    valid = {f.name for f in dataclasses.fields(CrossbarSpec)}
    unknown_keys = sorted(set(overrides) - valid)
    if unknown_keys:
        raise ConfigError(f"CrossbarSpec has no field(s) {', '.join(unknown_keys)}; valid: "
                          f"{', '.join(sorted(valid))}")
    spec = SPEC_PRESETS[name]
    return spec.replace(**changes) if changes else spec


#: The presets xbm ships: a user's registration may not replace them.
_BUILT_IN = frozenset(SPEC_PRESETS)


def register_spec_preset(spec: CrossbarSpec) -> CrossbarSpec:
    """Add ``spec`` as a named crossbar preset (``get_spec(spec.name)``, ``--preset NAME``
    given ``--plugin MODULE``). Its ``source`` must say where its numbers come from, as every
    built-in preset's does. The module that registered a name may register it again (a
    reloaded module, a notebook cell) and replaces its preset; another module's different
    preset under that name, or a built-in preset's name, is refused.

    Raises:
        ValueError: not a CrossbarSpec, no name or source, a built-in name or another
            module's (a programming error, not a user one).
    """
    import sys

    from xbm.config import register_named

    return register_named(SPEC_PRESETS, spec, CrossbarSpec, "crossbar preset", _BUILT_IN,
                          owner=sys._getframe(1).f_globals.get("__name__"))


__all__ = ["CrossbarSpec", "SPEC_PRESETS", "get_spec", "register_spec_preset"]
