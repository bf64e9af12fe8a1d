"""Energy and timing constants of a ReRAM crossbar chip, as editable, cited presets.

The cost model (:mod:`xbm.hardware.cost`) multiplies event counts by the constants defined here.
They live in small frozen dataclasses (aihwkit style): :class:`DeviceParams` for the ReRAM cell
(write and read pulses) and :class:`PeripheryParams` for the circuits around the array (ADC, DAC,
shift-and-add, mask register), composed into a named :class:`EnergyPreset`. Each field says what it
is, its unit (in the name) and where its default comes from, because the papers this project
reproduces publish none of their constants (papers.md, open question 7): every number a report
prints must be traceable to one of these fields.

Presets are data. ``xbm cost --dump-preset neurosim > my.yaml`` writes one as YAML with the source
of each value as a comment; ``xbm cost --model resnet50 --preset-file my.yaml`` reads an edited
copy back, validated field by field.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xbm.config import is_finite_number, load_yaml
from xbm.errors import ConfigError, unknown

WRITE_CONDUCTANCE_CHOICES = ("mean", "on", "off")


def _check_positive(owner: str, obj: Any, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()
                    ) -> None:
    """Raise a one-line ConfigError naming the first field that is not a positive number."""
    for name in names:
        v = getattr(obj, name)
        if not is_finite_number(v):  # an int beyond any float too (math.isfinite overflowed)
            raise ConfigError(f"{owner}.{name} must be a finite number, got {v!r}")
        if name in allow_zero:
            if v < 0:
                raise ConfigError(f"{owner}.{name} must be >= 0, got {v!r}")
        elif v <= 0:
            raise ConfigError(f"{owner}.{name} must be > 0, got {v!r}")


def _check_int(owner: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{owner}.{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class DeviceParams:
    """The ReRAM cell: how much a write pulse and a read cost.

    Energy of one pulse across a cell is Joule heating, V^2 * G * t. Which conductance G a pulse
    sees depends on the cell's state, so the choice is a field (``write_conductance``), never a
    silent constant.
    """

    write_voltage_v: float = 4.0
    """Write (SET/RESET) pulse amplitude in volts. NeuroSim V2.1 default: 4 V
    (neurosim/DNN_NeuroSim_V2.1 Training_pytorch/NeuroSIM/Param.cpp, writeVoltage)."""

    write_pulse_s: float = 50e-9
    """Width of one write pulse in seconds. NeuroSim V2.1: 50 ns (Param.cpp, writePulseWidth)."""

    r_on_ohm: float = 240e3
    """Low-resistance (fully on) state in ohms. NeuroSim V2.1: 240 kOhm (Param.cpp,
    resistanceOn)."""

    on_off_ratio: float = 100.0
    """R_off / R_on. NeuroSim V2.1: 100 (Param.cpp, resistanceOff = 100 * resistanceOn)."""

    read_voltage_v: float = 0.5
    """Read voltage on a driven wordline, in volts. NeuroSim V2.1: 0.5 V (Param.cpp,
    readVoltage)."""

    read_pulse_s: float = 10e-9
    """Read pulse width in seconds: how long a crossbar read (one input bit cycle) lasts at least.
    NeuroSim V2.1: 10 ns (Param.cpp, readPulseWidth)."""

    conductance_levels: int = 60
    """Distinct conductance states the device can be programmed to. NeuroSim V2.1: 60
    (Param.cpp, maxNumLevelLTP/LTD). Informational: it is the basis of ``write_pulses_per_cell``."""

    write_pulses_per_cell: float = 20.0
    """Mean write pulses (each followed by ``verify_reads_per_pulse`` verify reads) to move one
    cell to a new target conductance. Default 20: with identical pulses of one level each
    (NeuroSim's pulse-based update) between a uniformly random start and target out of L = 60
    levels the mean distance is (L^2 - 1) / (3L) = 19.99 levels [inference, not a published
    figure]. The most uncertain constant of the model; ``xbm cost --sensitivity`` sweeps it."""

    verify_reads_per_pulse: float = 1.0
    """Verify reads after each write pulse (write-and-verify programming). 1 = read after every
    pulse; 0 = open-loop programming. [assumption: write-and-verify with one verify read per
    pulse, the simplest closed loop; no source gives a count for these presets]"""

    write_conductance: str = "mean"
    """Conductance a write pulse sees in V^2*G*t: ``mean`` = (G_on + G_off)/2, the average over a
    cell swept through its range (default); ``on`` = G_on, the worst case (highest current);
    ``off`` = G_off, the best case. YAML 1.1 and ``--set-energy`` read on/off as booleans, so
    a boolean is taken as on (true, yes) or off (false, no)."""

    def __post_init__(self) -> None:
        _check_positive("device", self, (
            "write_voltage_v", "write_pulse_s", "r_on_ohm", "on_off_ratio", "read_voltage_v",
            "read_pulse_s", "write_pulses_per_cell", "verify_reads_per_pulse"),
            allow_zero=("verify_reads_per_pulse",))
        _check_int("device", self, ("conductance_levels",))
        if self.on_off_ratio < 1:
            raise ConfigError(f"device.on_off_ratio must be >= 1 (R_off >= R_on), got "
                              f"{self.on_off_ratio!r}")
        if self.write_conductance not in WRITE_CONDUCTANCE_CHOICES:
            raise ConfigError(f"device.write_conductance must be one of "
                              f"{', '.join(WRITE_CONDUCTANCE_CHOICES)}, got "
                              f"{self.write_conductance!r}")

    @property
    def g_on_s(self) -> float:
        """On-state conductance in siemens."""
        return 1.0 / self.r_on_ohm

    @property
    def g_off_s(self) -> float:
        """Off-state conductance in siemens."""
        return 1.0 / (self.r_on_ohm * self.on_off_ratio)

    @property
    def g_mean_s(self) -> float:
        """Mean of on and off conductance: a cell whose level is uniform over its range."""
        return 0.5 * (self.g_on_s + self.g_off_s)

    @property
    def g_write_s(self) -> float:
        """The conductance used for write-pulse energy (see ``write_conductance``)."""
        return {"mean": self.g_mean_s, "on": self.g_on_s, "off": self.g_off_s}[
            self.write_conductance]

    @property
    def write_pulse_energy_j(self) -> float:
        """Energy of one write pulse: V_w^2 * G_write * t_w."""
        return self.write_voltage_v ** 2 * self.g_write_s * self.write_pulse_s

    @property
    def cell_read_energy_j(self) -> float:
        """Energy of one cell read with its wordline driven: V_r^2 * G_mean * t_r."""
        return self.read_voltage_v ** 2 * self.g_mean_s * self.read_pulse_s


@dataclass(frozen=True)
class PeripheryParams:
    """Circuits around the arrays: converters, digital accumulation, mask storage, timing."""

    adc_energy_ref_j: float = 1.667e-12
    """ADC energy per conversion at ``adc_ref_bits``, in joules. Default: ISAAC's 8-bit ADC,
    16 mW for 8 ADCs at 1.2 GS/s = 1.667 pJ (Shafiee et al., ISCA 2016, table of IMA components,
    as tabulated in Accelergy-Project/hwcomponents-library hwcomponents_library/library/isaac.py,
    IsaacADC)."""

    adc_ref_bits: int = 8
    """Resolution at which ``adc_energy_ref_j`` and ``adc_latency_ref_s`` were measured."""

    adc_energy_bit_scaling: float = 2.0
    """Factor per extra bit of ADC resolution: E(b) = E_ref * scaling^(b - ref_bits). 2.0 is the
    Walden figure of merit (constant energy per conversion step, E = FoM * 2^b); capacitive-DAC SAR
    scaling (Saberi et al. 2011, as tabulated beside IsaacADC) is closer to 1.2 per bit."""

    adc_latency_ref_s: float = 1 / 1.2e9
    """Time of one conversion at ``adc_ref_bits``; scales linearly with bits (a SAR ADC resolves
    one bit per step). Default: ISAAC's 1.2 GS/s ADC (hwcomponents-library isaac.py)."""

    columns_per_adc: int = 8
    """Crossbar (slice) columns multiplexed onto one ADC; they are converted one after another.
    NeuroSim V2.1: 8 (Param.cpp, numColMuxed)."""

    dac_energy_j: float = 0.4167e-12
    """Energy of driving one wordline for one input cycle with a 1-bit DAC. ISAAC: 4 mW for
    8 x 128 1-bit DACs, 0.4167 pJ per drive (hwcomponents-library isaac.py, IsaacDAC). A b-bit
    DAC costs 2^(b-1) times this (the same power-of-two scaling IsaacDAC applies)."""

    shift_add_energy_j: float = 0.021e-12
    """Energy of one shift-and-add of a digitised partial sum. ISAAC: 0.2 mW over the ADCs'
    8 x 1.2 GS/s of conversions, 0.021 pJ per operation (hwcomponents-library isaac.py,
    IsaacShiftAdd)."""

    mask_bit_write_energy_j: float = 0.0889e-12
    """Energy to bring one mask bit from on-chip memory into the mask register: an eDRAM read,
    20.45 pJ per 256-bit access = 0.0799 pJ/bit (ISAAC, IsaacEDRAM), plus a register access,
    0.009 pJ/bit at 40 nm (Aladdin, hwcomponents-library aladdin.py, AladdinRegister: the figure
    of its ``read`` action; the library's table puts ``write`` at 0, so charging the access
    figure for the write is the conservative reading)."""

    mask_write_bits_per_cycle: int = 256
    """Mask bits written per digital cycle (the eDRAM port width of ISAAC, 256 bits)."""

    digital_cycle_s: float = 1e-9
    """Digital clock period. NeuroSim V2.1: 1 GHz (Param.cpp, clkFreq)."""

    wordline_activity: float = 0.5
    """Fraction of wordlines driven high in one bit-serial input cycle; only those cells conduct.
    0.5 = random input bits [assumption]."""

    differential_in_analog: bool = True
    """True: the two cells of a differential pair are subtracted on the bitlines before the ADC,
    one conversion per slice (MNSIM's Sub_Position = 0); False: each polarity is converted."""

    parallel_write_crossbars: int = 1
    """Crossbars programmed at the same time. 1 = one at a time (shared write drivers, a chip-wide
    write-current budget) [assumption, conservative]; raise it to model parallel programming.
    Within a crossbar, one row is written per pulse with all its target cells in parallel
    (row-by-row programming, as NeuroSim's weight update [recalled, not verified])."""

    def __post_init__(self) -> None:
        _check_positive("periphery", self, (
            "adc_energy_ref_j", "adc_energy_bit_scaling", "adc_latency_ref_s", "dac_energy_j",
            "shift_add_energy_j", "mask_bit_write_energy_j", "digital_cycle_s",
            "wordline_activity"))
        _check_int("periphery", self, ("adc_ref_bits", "columns_per_adc",
                                       "mask_write_bits_per_cycle", "parallel_write_crossbars"))
        if self.wordline_activity > 1:
            raise ConfigError(f"periphery.wordline_activity must be in (0, 1], got "
                              f"{self.wordline_activity!r}")
        if self.adc_energy_bit_scaling < 1:
            raise ConfigError(f"periphery.adc_energy_bit_scaling must be >= 1 (more bits never "
                              f"cost less), got {self.adc_energy_bit_scaling!r}")
        if not isinstance(self.differential_in_analog, bool):
            raise ConfigError(f"periphery.differential_in_analog must be true or false, got "
                              f"{self.differential_in_analog!r}")

    def adc_energy_j(self, bits: int) -> float:
        """Energy of one conversion at ``bits`` resolution."""
        return self.adc_energy_ref_j * self.adc_energy_bit_scaling ** (bits - self.adc_ref_bits)

    def adc_latency_s(self, bits: int) -> float:
        """Time of one conversion at ``bits`` resolution."""
        return self.adc_latency_ref_s * bits / self.adc_ref_bits

    def dac_drive_energy_j(self, bits: int) -> float:
        """Energy of one wordline drive by a ``bits``-bit DAC."""
        return self.dac_energy_j * 2.0 ** (bits - 1)


# Fields of CrossbarSpec an energy preset may suggest (the geometry its source assumed).
SPEC_OVERRIDE_FIELDS = ("rows", "cols", "weight_bits", "cell_bits", "signed", "pe_rows", "pe_cols",
                        "input_bits", "dac_bits", "adc_bits")

#: The highest ADC resolution the cost model prices. [assumption] The ADC energy extrapolates
#: one reference converter (ISAAC's 8-bit ADC by default) by ``adc_energy_bit_scaling`` per bit;
#: 16 is a round bound well past the 5-8-bit ADCs of ReRAM accelerator designs (ISAAC 8,
#: MNSIM 2.0's preset 6, NeuroSim's 5), beyond which the extrapolation means nothing.
#: ``xbm simulate`` takes up to 32 bits, for accuracy alone.
MAX_ADC_BITS = 16


@dataclass(frozen=True)
class EnergyPreset:
    """A named, cited set of device and periphery constants."""

    name: str = "custom"
    """Preset name, for reports."""

    source: str = ""
    """One-line citation of the preset as a whole."""

    device: DeviceParams = field(default_factory=DeviceParams)
    """The ReRAM cell."""

    periphery: PeripheryParams = field(default_factory=PeripheryParams)
    """ADC, DAC, shift-and-add, mask register, timing."""

    spec_overrides: dict[str, Any] = field(default_factory=dict)
    """CrossbarSpec fields the source assumes (array size, cell bits, ADC bits). Applied only on
    request (``xbm cost --energy-spec``), so that the same geometry as every other command is the
    default."""

    notes: dict[str, str] = field(default_factory=dict)
    """Source of each value that differs from the field's documented default, by dotted field name
    (``device.write_voltage_v``); written as comments by :meth:`to_yaml`."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"energy preset name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.device, DeviceParams):
            raise ConfigError("energy preset field 'device' must be a DeviceParams")
        if not isinstance(self.periphery, PeripheryParams):
            raise ConfigError("energy preset field 'periphery' must be a PeripheryParams")
        bad = sorted(set(self.spec_overrides) - set(SPEC_OVERRIDE_FIELDS), key=repr)
        if bad:
            raise ConfigError(f"spec_overrides.{bad[0]} is not a crossbar field; valid: "
                              f"{', '.join(SPEC_OVERRIDE_FIELDS)}")
        # every field finite can still make a product overflow (1e200 V squared): the report
        # would print inf or raise OverflowError; the constants the cost model derives must be
        # numbers, checked here once
        d, p = self.device, self.periphery
        derived = (("device.write_pulse_energy_j", lambda: d.write_pulse_energy_j),
                   ("device.cell_read_energy_j", lambda: d.cell_read_energy_j),
                   ("the write energy per cell", self.write_energy_per_cell_j),
                   ("the write time per row", self.write_time_per_row_s),
                   (f"the {MAX_ADC_BITS}-bit ADC energy", lambda: p.adc_energy_j(MAX_ADC_BITS)),
                   ("the 1-bit ADC energy", lambda: p.adc_energy_j(1)))
        for what, value in derived:
            try:
                ok = is_finite_number(value())
            except (OverflowError, ZeroDivisionError):
                ok = False
            if not ok:
                raise ConfigError(f"{what} is not a finite number with these constants (a "
                                  "value far out of range); check the fields it is made of")

    # -- derived constants --------------------------------------------------------------------
    def write_energy_per_cell_j(self) -> float:
        """Energy to re-program one cell: pulses x (pulse + verify reads)."""
        d = self.device
        return d.write_pulses_per_cell * (
            d.write_pulse_energy_j + d.verify_reads_per_pulse * d.cell_read_energy_j)

    def write_time_per_row_s(self) -> float:
        """Time to re-program one crossbar row (all its target cells in parallel)."""
        d = self.device
        return d.write_pulses_per_cell * (d.write_pulse_s + d.verify_reads_per_pulse *
                                          d.read_pulse_s)

    def check_spec(self, spec: Any) -> None:
        """Refuse a crossbar spec these constants cannot describe (one-line error naming it)."""
        if spec.adc_bits > MAX_ADC_BITS:
            raise ConfigError(f"CrossbarSpec.adc_bits ({spec.adc_bits}) exceeds {MAX_ADC_BITS}; "
                              "no ADC energy model covers that resolution (it extrapolates a "
                              "reference converter, ISAAC's 8-bit ADC by default); cost at <= 16 "
                              "bits (xbm simulate takes up to 32, for accuracy alone)")

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable fields."""
        return {
            "name": self.name,
            "source": self.source,
            "device": dataclasses.asdict(self.device),
            "periphery": dataclasses.asdict(self.periphery),
            "spec_overrides": dict(self.spec_overrides),
            "notes": dict(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "energy preset") -> EnergyPreset:
        """Build and validate a preset; unknown or mistyped fields are one-line errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"{origin} must be a mapping of field: value")
        top = {"name", "source", "device", "periphery", "spec_overrides", "notes"}
        extra = sorted(set(d) - top, key=repr)  # a YAML `1:` key is a number: no str sort
        if extra:
            raise ConfigError(f"{origin}: unknown field {extra[0]!r}; valid: "
                              f"{', '.join(sorted(top))}")
        parts: dict[str, Any] = {}
        for key, klass in (("device", DeviceParams), ("periphery", PeripheryParams)):
            sub = d.get(key) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{origin}: {key} must be a mapping of field: value")
            names = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(sub) - names, key=repr)
            if bad:
                raise ConfigError(f"{origin}: unknown field {key}.{bad[0]}; valid: "
                                  f"{', '.join(sorted(names))}")
            try:
                parts[key] = klass(**_coerce_numbers(klass, sub))
            except ConfigError as exc:
                raise ConfigError(f"{origin}: {exc}") from None
        for key in ("spec_overrides", "notes"):
            v = d.get(key) or {}
            if not isinstance(v, dict):
                raise ConfigError(f"{origin}: {key} must be a mapping")
            parts[key] = dict(v)
        try:
            return cls(name=str(d.get("name", "custom")), source=str(d.get("source", "")),
                       **parts)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None

    def with_overrides(self, changes: dict[str, Any]) -> EnergyPreset:
        """A copy with dotted fields changed, e.g. ``{"device.write_pulses_per_cell": 5}``.

        A changed value no longer carries the preset's citation: its note says it was set
        here (and what the preset had), and the name gains ``+set`` so reports do not pass
        the edited constants off as the named preset's."""
        d = self.to_dict()
        notes = dict(self.notes)
        for key, value in changes.items():
            part, _, name = key.partition(".")
            if part not in ("device", "periphery") or not name:
                raise ConfigError(f"energy override {key!r} must name device.FIELD or "
                                  "periphery.FIELD")
            if name not in d[part]:
                raise ConfigError(f"energy override: unknown field {key}; valid: "
                                  f"{', '.join(part + '.' + n for n in sorted(d[part]))}")
            d[part][name] = value
        out = EnergyPreset.from_dict(d, origin=f"preset {self.name!r}")
        changed = [k for k in changes
                   if getattr(getattr(out, k.split(".")[0]), k.split(".")[1])
                   != getattr(getattr(self, k.split(".")[0]), k.split(".")[1])]
        if not changed:
            return out
        for k in changed:
            part, name = k.split(".")
            was = getattr(getattr(self, part), name)
            cited = self.notes.get(k)
            notes[k] = (f"set by an override; the {self.name} preset has {was!r}"
                        + (f" ({cited})" if cited else ""))
        name = self.name if self.name.endswith("+set") else f"{self.name}+set"
        return dataclasses.replace(out, name=name, notes=notes)

    def to_yaml(self) -> str:
        """YAML text with each value's source as a comment; :func:`load_preset_file` reads it."""
        import json

        def scalar(v: Any) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, float):
                r = repr(v)  # YAML 1.1 (PyYAML) reads 5e-08 as text, 5.0e-08 as a float
                return r.replace("e", ".0e", 1) if "e" in r and "." not in r else r
            if isinstance(v, int):
                return str(v)
            return json.dumps(v)  # a quoted YAML-compatible string

        lines = [f"# xbm energy preset {self.name!r}; edit and load with "
                 "`xbm cost --model NAME --preset-file FILE` (or --bundle, --backbone).",
                 "# Units are in the field names (_v volts, _s seconds, _j joules, _ohm ohms).",
                 f"name: {scalar(self.name)}", f"source: {scalar(self.source)}"]
        for part in ("device", "periphery"):
            lines.append(f"{part}:")
            obj = getattr(self, part)
            defaults = {f.name: f.default for f in dataclasses.fields(obj)}
            for k, v in dataclasses.asdict(obj).items():
                note = self.notes.get(f"{part}.{k}") or (
                    "xbm's default in every preset (its source: docs/cost-model.md)"
                    if v == defaults.get(k) else "no source recorded for this value")
                lines.append(f"  {k}: {scalar(v)}  # {note}")
        lines.append("spec_overrides:" + ("" if self.spec_overrides else " {}"))
        for k, v in self.spec_overrides.items():
            lines.append(f"  {k}: {scalar(v)}")
        lines.append("notes:" + ("" if self.notes else " {}"))
        for k, v in self.notes.items():
            lines.append(f"  {k}: {scalar(v)}")
        return "\n".join(lines) + "\n"


def _coerce_numbers(klass: type, values: dict[str, Any]) -> dict[str, Any]:
    """Numeric text (YAML 1.1 reads ``50e-9`` as a string) becomes the field's number type."""
    types = {f.name: str(f.type) for f in dataclasses.fields(klass)}
    out = dict(values)
    for k, v in values.items():
        if k == "write_conductance" and isinstance(v, bool):
            # true/false (or a bool from Python) for the choices on/off; xbm's YAML reader
            # (1.2) leaves on/off as text, but files written by YAML 1.1 tools may say true
            out[k] = "on" if v else "off"
        if isinstance(v, str) and types.get(k) in ("float", "int"):
            with contextlib.suppress(ValueError):  # left as text: validation names the field
                out[k] = float(v) if types[k] == "float" else int(v)
    return out


# -- presets ----------------------------------------------------------------------------------
_NS = "neurosim/DNN_NeuroSim_V2.1 Training_pytorch/NeuroSIM/Param.cpp"
_ISAAC = "ISAAC (ISCA 2016) via Accelergy-Project/hwcomponents-library isaac.py"
_MNSIM = "thu-nics/MNSIM-2.0"

_SHARED_NOTES = {
    "periphery.adc_energy_ref_j": f"{_ISAAC}, IsaacADC: 16 mW / (8 ADCs x 1.2 GS/s)",
    "periphery.adc_latency_ref_s": f"{_ISAAC}: 1.2 GS/s",
    "periphery.dac_energy_j": f"{_ISAAC}, IsaacDAC",
    "periphery.shift_add_energy_j": f"{_ISAAC}, IsaacShiftAdd",
    "periphery.mask_bit_write_energy_j": "ISAAC eDRAM 20.45 pJ/256 bit + Aladdin register "
                                         "access 0.009 pJ/bit (hwcomponents-library; its "
                                         "read figure, write listed as 0)",
    "periphery.mask_write_bits_per_cycle": "ISAAC eDRAM port width",
    "periphery.wordline_activity": "assumption: random input bits",
    "periphery.parallel_write_crossbars": "assumption: one crossbar programmed at a time",
    "periphery.adc_ref_bits": "the resolution of the adc_energy_ref_j figure",
    "periphery.adc_energy_bit_scaling": "Walden figure of merit, energy x2 per bit "
                                        "[assumption]",
    "device.verify_reads_per_pulse": "assumption: write-and-verify, one verify read per pulse",
}

_NEUROSIM_DEVICE = DeviceParams()
_NEUROSIM_NOTES = {
    "device.write_voltage_v": f"{_NS} writeVoltage",
    "device.write_pulse_s": f"{_NS} writePulseWidth",
    "device.r_on_ohm": f"{_NS} resistanceOn",
    "device.on_off_ratio": f"{_NS} resistanceOff = 100 x resistanceOn",
    "device.read_voltage_v": f"{_NS} readVoltage",
    "device.read_pulse_s": f"{_NS} readPulseWidth",
    "device.conductance_levels": f"{_NS} maxNumLevelLTP",
    "device.write_pulses_per_cell": "(L^2-1)/(3L) for L = 60 levels, one level per pulse "
                                    "[inference]",
    "periphery.columns_per_adc": f"{_NS} numColMuxed",
    "periphery.digital_cycle_s": f"{_NS} clkFreq = 1 GHz",
} | _SHARED_NOTES

PRESETS: dict[str, EnergyPreset] = {
    "neurosim": EnergyPreset(
        name="neurosim",
        source="NeuroSim V2.1 device (Param.cpp: 4 V/50 ns writes, Ron 240 kOhm, on/off 100, "
               "0.5 V/10 ns reads, 8 columns per ADC); converters and digital from ISAAC",
        device=_NEUROSIM_DEVICE,
        periphery=PeripheryParams(),
        spec_overrides={"rows": 128, "cols": 128, "weight_bits": 8, "cell_bits": 1,
                        "adc_bits": 5},
        notes=_NEUROSIM_NOTES | {
            "periphery.adc_energy_ref_j": "NeuroSim computes ADC energy from circuit models; "
                                          "ISAAC's 8-bit ADC (1.667 pJ) with Walden scaling "
                                          "stands in",
        },
    ),
    "mnsim": EnergyPreset(
        name="mnsim",
        source="MNSIM 2.0 (SimConfig.ini: 3 V/10 ns writes, 0.15 V/3.16 ns reads, LRS 10 kOhm, "
               "HRS 1 MOhm, 256x256 crossbars; ADC.py choice 4: 6-bit SAR, 1.26 mW, 1 GS/s)",
        device=DeviceParams(
            write_voltage_v=3.0, write_pulse_s=10e-9, r_on_ohm=10e3, on_off_ratio=100.0,
            read_voltage_v=0.15, read_pulse_s=3.16e-9, conductance_levels=2,
            write_pulses_per_cell=1.0, verify_reads_per_pulse=1.0),
        periphery=PeripheryParams(
            adc_energy_ref_j=10.08e-12, adc_ref_bits=6, adc_latency_ref_s=8e-9,
            columns_per_adc=16, digital_cycle_s=10e-9),
        spec_overrides={"rows": 256, "cols": 256, "weight_bits": 8, "cell_bits": 1,
                        "adc_bits": 6},
        notes=_SHARED_NOTES | {
            "device.write_voltage_v": f"{_MNSIM} SimConfig.ini Write_Voltage (docs anchors A4)",
            "device.write_pulse_s": f"{_MNSIM} SimConfig.ini Write_Latency",
            "device.r_on_ohm": f"{_MNSIM} SimConfig.ini Device_Resistance LRS 10 kOhm",
            "device.on_off_ratio": f"{_MNSIM} HRS 1 MOhm / LRS 10 kOhm",
            "device.read_voltage_v": f"{_MNSIM} SimConfig.ini Read_Voltage",
            "device.read_pulse_s": f"{_MNSIM} SimConfig.ini Read_Latency",
            "device.conductance_levels": f"{_MNSIM} SimConfig.ini Device_Level = 2",
            "device.write_pulses_per_cell": "binary cell: one SET or RESET pulse (MNSIM models a "
                                            "single Write_Latency)",
            "periphery.adc_energy_ref_j": f"{_MNSIM} MNSIM/Hardware_Model/ADC.py choice 4: "
                                          "1.26 mW x (6+2) bits / 1 GS/s = 10.08 pJ",
            "periphery.adc_ref_bits": f"{_MNSIM} ADC.py choice 4 precision",
            "periphery.adc_latency_ref_s": f"{_MNSIM} ADC.py latency (precision+2)/rate",
            "periphery.columns_per_adc": f"{_MNSIM} 256 columns / ADC_Num 16",
            "periphery.digital_cycle_s": f"{_MNSIM} SimConfig.ini Digital_Frequency 100 MHz",
        },
    ),
    "isaac": EnergyPreset(
        name="isaac",
        source="ISAAC (Shafiee et al., ISCA 2016): 128x128 crossbars, one 8-bit 1.2 GS/s ADC per "
               "crossbar, 1-bit DACs, shift-and-add, eDRAM; ISAAC has no write model, so the "
               "device is NeuroSim V2.1's",
        device=_NEUROSIM_DEVICE,
        periphery=PeripheryParams(columns_per_adc=128),
        spec_overrides={"rows": 128, "cols": 128, "weight_bits": 16, "cell_bits": 2,
                        "signed": "offset", "adc_bits": 8, "dac_bits": 1},
        notes=_NEUROSIM_NOTES | {
            "periphery.columns_per_adc": "ISAAC: 8 ADCs per IMA of 8 crossbars = one per "
                                         "128 columns",
        },
    ),
}
DEFAULT_PRESET = "neurosim"
"""The default preset. NeuroSim V2.1 is the only public simulator with a re-programming (write)
model (docs anchors A3), and NeuroSim was developed at ASU, the XBM authors' institution, so it is
the most likely basis of their energy figures [inference]."""
PRESETS["default"] = dataclasses.replace(PRESETS[DEFAULT_PRESET], name="default")


#: The presets xbm ships: a user's registration may not replace them.
_BUILT_IN = frozenset(PRESETS)


def register_energy_preset(preset: EnergyPreset) -> EnergyPreset:
    """Add ``preset`` by its name (``get_preset(name)``, ``xbm cost --energy NAME`` given
    ``--plugin MODULE``). Its ``source`` must cite where the constants come from, as every
    built-in preset's does (``notes`` per value, where they differ). The module that
    registered a name may register it again (a reloaded module, a notebook cell) and replaces
    its preset; another module's different preset under that name, or a built-in preset's
    name, is refused.

    Raises:
        ValueError: not an EnergyPreset, no name or source, a built-in name or another
            module's.
    """
    import sys

    from xbm.config import register_named

    return register_named(PRESETS, preset, EnergyPreset, "energy preset", _BUILT_IN,
                          ("+set", "+edited"), owner=sys._getframe(1).f_globals.get("__name__"))


def get_preset(name: str = "default") -> EnergyPreset:
    """A named preset (``neurosim``, ``mnsim``, ``isaac`` or ``default``)."""
    if name not in PRESETS:
        raise unknown("energy preset", name, PRESETS)
    return PRESETS[name]


def load_preset_file(path: str | Path) -> EnergyPreset:
    """Read a YAML preset (e.g. one written by ``xbm cost --dump-preset``), validated."""
    import yaml

    from xbm.io import input_problem

    p = Path(path).expanduser()
    problem = input_problem(p)
    if problem:
        raise ConfigError(f"energy preset file {path} {problem}; pass a YAML file (xbm cost "
                          "--dump-preset NAME > my.yaml writes one)")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"energy preset file {path} is not UTF-8 text; save it as UTF-8 "
                          "YAML") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"energy preset file {path} is not valid YAML "
                          f"({exc.__class__.__name__})") from None
    preset = EnergyPreset.from_dict(data or {}, origin=f"energy preset file {path}")
    return _mark_edits(preset, path)


def _mark_edits(preset: EnergyPreset, path: str | Path) -> EnergyPreset:
    """A file that keeps a built-in preset's name (``--dump-preset neurosim > my.yaml``, one
    constant edited) was reported as that preset, citing its source for the edited value.
    Each value that differs from the named preset's is marked as ``--set-energy`` marks it,
    and the name gains ``+edited``."""
    base = PRESETS.get(preset.name)
    if base is None:
        return preset
    mine, theirs = preset.to_dict(), base.to_dict()
    changed = [(part, k) for part in ("device", "periphery") for k in mine[part]
               if mine[part][k] != theirs[part].get(k)]
    if not changed and mine["spec_overrides"] == theirs["spec_overrides"]:
        return preset
    notes = dict(preset.notes)
    for part, k in changed:
        cited = base.notes.get(f"{part}.{k}")
        notes[f"{part}.{k}"] = (f"edited in {path}; the {base.name} preset has "
                                f"{theirs[part][k]!r}" + (f" ({cited})" if cited else ""))
    so, to = theirs["spec_overrides"], mine["spec_overrides"]
    for k in sorted(set(so) | set(to)):  # the crossbars its constants are for
        if so.get(k) != to.get(k):
            notes[f"spec_overrides.{k}"] = (f"edited in {path}; the {base.name} preset has "
                                            f"{so.get(k)!r}")
    return dataclasses.replace(preset, name=f"{base.name}+edited", notes=notes)


__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "DeviceParams",
    "EnergyPreset",
    "PeripheryParams",
    "get_preset",
    "load_preset_file",
    "register_energy_preset",
]
