"""How many of the re-programmed cells a bundle's tasks count actually change level.

``reprogrammed_cells`` follows issue 2's definition: every cell of each weight a task changes
(Piggyback: masked-off weights x cells per weight). On a chip, a cell whose stored level is
already the target needs a verify read, no write pulse: a masked-off weight's zero digits, and
the idle cell of each differential pair. This script quantises each layer as the simulator
does (symmetric, per layer, ``weight_bits``; the backbone's scale, which the chip keeps), splits
the weights programmed for the base task and for each task into cell levels (differential
pairs of ``cell_bits`` slices), and counts the cells whose level differs and by how many levels.
It prints, per task, the counted cells, the cells that change and the mean level change per
changed cell, and the write pulses the cost model prices (counted cells x
``write_pulses_per_cell``) against those a one-level-per-pulse write would take (level changes
x device levels per cell level).

    .venv/bin/python benchmarks/reprogram_levels.py tasks.safetensors [--backbone BB]

The bundle's own signed scheme is counted (its spec's ``signed``): ``differential`` (the
default spec's: magnitude digits in one polarity of each pair) or ``offset`` (the ``isaac``
crossbar preset's: the digits of q + 2^(weight_bits-1) in one cell per slice, as the simulator
stores them). The energy preset changes the joules, not which cells change.
"""

from __future__ import annotations

import argparse
import sys

import torch


def cell_levels(q: torch.Tensor, cell_bits: int, slices: int, signed: str = "differential",
                weight_bits: int = 8) -> torch.Tensor:
    """Levels of the cells holding integer weights ``q``: (cells per slice, slices, *q.shape):
    two polarities for ``differential``, one biased cell for ``offset``."""
    mask = 2 ** cell_bits - 1
    if signed == "offset":
        parts = (q + 2 ** (weight_bits - 1),)
    else:
        parts = (q.clamp(min=0), (-q).clamp(min=0))
    return torch.stack([torch.stack([(a >> (cell_bits * k)) & mask for k in range(slices)])
                        for a in parts])


def count_levels(mtm, preset) -> list[dict]:
    """Per task that re-programs cells: counted cells, cells whose level changes, their total
    level change, and the write pulses priced and needed (module docstring)."""
    spec = mtm.spec
    slices = spec.slices
    top = 2 ** (spec.weight_bits - 1) - 1
    # device levels per cell level: a 2-bit cell's 4 levels spread over the device's range
    step = (preset.device.conductance_levels - 1) / (2 ** spec.cell_bits - 1)
    rows = []
    for task, info in mtm.tasks.items():
        counted = mtm.reprogrammed_cells(task)
        if counted == 0:
            continue
        changing = steps = 0
        for _, layer, state in mtm.layer_states(task):
            base = layer.weight.detach().float()
            scale = base.abs().max().clamp(min=1e-30) / top
            new = mtm.methods[task].programmed_weight(layer, state).detach().float()
            qb = torch.round(base / scale).clamp(-top, top).long()
            qn = torch.round(new / scale).clamp(-top, top).long()
            diff = (cell_levels(qb, spec.cell_bits, slices, spec.signed, spec.weight_bits)
                    - cell_levels(qn, spec.cell_bits, slices, spec.signed,
                                  spec.weight_bits)).abs()
            changing += int((diff != 0).sum())
            steps += int(diff.sum())
        rows.append({"task": task, "method": info.method, "counted": counted,
                     "changing": changing, "level_steps": steps,
                     "pulses_priced": counted * preset.device.write_pulses_per_cell,
                     "pulses_one_per_level": steps * step})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--backbone", help="the bundle's backbone (default: found by its hash)")
    ap.add_argument("--energy", default="default", help="energy preset (default: default)")
    args = ap.parse_args(argv)

    from xbm.errors import XbmError
    from xbm.hardware.cost_cli import load_bundle_model
    from xbm.hardware.energy import get_preset

    try:
        mtm = load_bundle_model(args.bundle, args.backbone)
        preset = get_preset(args.energy)
    except XbmError as exc:
        print(f"reprogram_levels: error: {exc}", file=sys.stderr)
        return 2
    spec = mtm.spec
    step = (preset.device.conductance_levels - 1) / (2 ** spec.cell_bits - 1)
    cells = "differential pairs" if spec.signed == "differential" else "offset (biased) cells"
    print(f"{args.bundle}: {spec.weight_bits}-bit weights in {spec.slices}"
          f" slices of {spec.cell_bits}-bit cells, {cells}; preset {preset.name!r}: "
          f"{preset.device.write_pulses_per_cell:g} pulses per counted cell, {step:.3g} device "
          "levels per cell level")
    print(f"{'task':<20} {'method':<12} {'counted cells':>14} {'changing':>12} {'share':>7} "
          f"{'levels/cell':>11} {'pulses priced':>14} {'one/level':>12} {'ratio':>6}")
    rows = count_levels(mtm, preset)
    if not rows:
        print(f"no task of {args.bundle} re-programs a cell ("
              f"{', '.join(sorted({i.method for i in mtm.tasks.values()}))}): nothing to count")
        return 0
    for r in rows:
        print(f"{r['task']:<20} {r['method']:<12} {r['counted']:>14,} {r['changing']:>12,} "
              f"{r['changing'] / r['counted']:>7.1%} "
              f"{r['level_steps'] / max(r['changing'], 1):>11.2f} {r['pulses_priced']:>14.3e} "
              f"{r['pulses_one_per_level']:>12.3e} "
              f"{r['pulses_one_per_level'] / r['pulses_priced']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
