"""``xbm simulate``: accuracy of learned tasks on the crossbar-faithful path, and fault-aware XBM.

Two modes (``docs/simulation.md`` has worked examples):

* **sweep** (``--bundle B``): evaluate every task of a bundle on the faithful path over the
  product of ``--adc-bits``, ``--fault-rates`` and ``--variation``; print a table (``--json``
  for machines) and draw accuracy-vs-ADC-bits and accuracy-vs-fault-rate plots (``--plot DIR``).
* **fault-aware** (``--fault-aware --dataset D``): learn the same task twice with XBM, once on the
  ideal chip and once through a chip's fault map (``xbm.hardware.faults.fault_aware``), and
  compare both masks deployed on that faulty chip; the clean task is also evaluated over
  ``--adc-bits``. The programmed backbone is checked bit-identical afterwards.

A fault rate ``r`` means ``r/2`` stuck-at-OFF plus ``r/2`` stuck-at-ON cells (MNSIM 2.0 also draws
both kinds, at 0.1% each by default); ``--sa1-fraction`` changes the split.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from xbm.errors import ConfigError, XbmError
from xbm.hardware.simulate import BACKENDS
from xbm.train.pretrain import PRECISIONS

#: Test images per task unless ``--test-subset`` says otherwise.
DEFAULT_TEST_SUBSET = 1000


def _floats(s: str, flag: str = "", lo: float = 0.0, hi: float = math.inf) -> list[float]:
    """A comma list of numbers in [lo, hi]; an empty entry is an error, not skipped."""
    items = s.split(",")
    try:
        out = [float(v) for v in items]
    except ValueError:
        raise ConfigError(f"{flag} expected a comma list of numbers, got {s!r}") from None
    # finite too: inf passed "[0, inf]" here and was refused by SimConfig only after the
    # backbone, the data and the ideal evaluation
    bad = [v for v in out if not (math.isfinite(v) and lo <= v <= hi)]
    if bad:
        where = f"[{lo:g}, {hi:g}]" if math.isfinite(hi) else f"finite and >= {lo:g}"
        raise ConfigError(f"{flag} values must be {where}, got {bad[0]:g}")
    return _once(out, flag)


def _ints(s: str, flag: str = "") -> list[int]:
    try:
        values = [int(v) for v in s.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} expected a comma list of integers, got {s!r}") from None
    return _once(values, flag)


def _once(values: list, flag: str) -> list:
    """A sweep lists each value once: a repeat ran the same evaluation twice, in two rows."""
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ConfigError(f"{flag} lists {dup[0]:g} twice; list each value once")
    return values


def _adc_bits(args: argparse.Namespace, spec: Any = None) -> list[int | None]:
    """The ADC resolutions to sweep; ``[None]`` (one run, no ADC) under ``--adc-mode ideal``.

    An ideal ADC ignores its resolution, so sweeping one would repeat the same evaluation and
    label identical rows with different bit counts.
    """
    if args.adc_mode == "ideal":
        if args.adc_bits is not None:
            raise ConfigError("--adc-bits has no effect with --adc-mode ideal (no ADC); drop "
                              "--adc-bits, or pick --adc-mode calibrate or fixed")
        return [None]
    bits = _ints("4,6,8" if args.adc_bits is None else args.adc_bits, "--adc-bits")
    for b in bits:  # every resolution checked (against the spec too) before the first run
        cfg = _sim_config(args, b, 0.0)
        if spec is not None:
            cfg.spec_for(spec)
    return bits


def _adc_label(bits: int | None) -> int | str:
    """How a row names its ADC: its bits, or ``'ideal'`` for no ADC."""
    return "ideal" if bits is None else bits


#: Defaults of the fault-aware mode's own flags (None on the parser, so that a flag given in
#: the wrong mode can be told from its default).
FAULT_AWARE_RATE = 0.01
FAULT_AWARE_EPOCHS = 2
FAULT_AWARE_PRECISION = "fp32"
#: Flags that only one mode reads; given in the other, they would be silently ignored.
SWEEP_ONLY = (("bundle", "--bundle"), ("task", "--task"), ("fault_rates", "--fault-rates"),
              ("variation", "--variation"), ("fault_map", "--fault-map"))
FAULT_AWARE_ONLY = (("fault_rate", "--fault-rate"), ("save_fault_map", "--save-fault-map"),
                    ("out", "--out"), ("epochs", "--epochs"), ("precision", "--precision"),
                    ("image_size", "--image-size"))


def _check_mode_flags(args: argparse.Namespace) -> None:
    """Refuse a flag of the other mode: the sweep ran with a fault rate it never used, and the
    fault-aware mode with the sweep's rates, both without a word."""
    if not 0 <= args.sa1_fraction <= 1:  # both modes, before any loading or pretraining
        raise ConfigError(f"--sa1-fraction must lie in [0, 1], got {args.sa1_fraction:g}")
    # ADC flags the chosen --adc-mode never reads: the results recorded them as in force
    if args.adc_mode == "ideal" and getattr(args, "adc_offset_trim", False):
        raise ConfigError("--adc-offset-trim has no effect with --adc-mode ideal (no ADC to "
                          "trim); drop it, or pick --adc-mode calibrate or fixed")
    if args.adc_granularity is not None and args.adc_mode != "calibrate":
        raise ConfigError(f"--adc-granularity has no effect with --adc-mode {args.adc_mode} "
                          "(only a calibrated ADC range is shared by a layer, tile or "
                          "column); drop it, or pick --adc-mode calibrate")
    if args.fault_aware:
        wrong = [flag for attr, flag in SWEEP_ONLY if getattr(args, attr, None) is not None]
        if wrong:
            raise ConfigError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for the "
                              "sweep (--bundle), not --fault-aware, which trains on a chip "
                              "drawn at --fault-rate; drop "
                              f"{'it' if len(wrong) == 1 else 'them'}")
        args.fault_rate = FAULT_AWARE_RATE if args.fault_rate is None else args.fault_rate
        if not 0 <= args.fault_rate <= 1:  # in the flag's words, not the derived sa0/sa1 rates
            raise ConfigError(f"--fault-rate must be a fraction of cells in [0, 1], got "
                              f"{args.fault_rate:g}")
        args.epochs = FAULT_AWARE_EPOCHS if args.epochs is None else args.epochs
        args.precision = FAULT_AWARE_PRECISION if args.precision is None else args.precision
        return
    wrong = [flag for attr, flag in FAULT_AWARE_ONLY if getattr(args, attr, None) is not None]
    if wrong:
        hint = " (the sweep takes --fault-rates)" if "--fault-rate" in wrong else ""
        raise ConfigError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} for "
                          f"--fault-aware, not the sweep of a --bundle{hint}; drop "
                          f"{'it' if len(wrong) == 1 else 'them'}")


def register(sub: argparse._SubParsersAction, common, add_spec_args) -> None:
    """Add the ``simulate`` sub-command to the ``xbm`` parser."""
    from xbm.cli import BACKBONE_HELP, MODEL_HELP, TASK_ROOT_HELP
    from xbm.config import seed_arg

    sp = sub.add_parser("simulate", help="accuracy on the crossbar-faithful path (ADC, noise, "
                        "faults); fault-aware XBM")
    sp.add_argument("--bundle", help="task bundle to evaluate (sweep mode)")
    sp.add_argument("--task", help="only this task of the bundle (base: the backbone's own "
                    "task, on its pretraining set or --dataset)")
    sp.add_argument("--fault-aware", action="store_true",
                    help="train XBM with and without the chip's faults and compare")
    sp.add_argument("--dataset", help="dataset (fault-aware mode; sweep: override the task's)")
    sp.add_argument("--backbone", help=BACKBONE_HELP)
    sp.add_argument("--model", help=MODEL_HELP)
    sp.add_argument("--width", type=int,
                    help="backbone width (default: the --bundle's or --backbone's, which it must "
                    "match, else 16 on CPU, 64 on CUDA)")
    sp.add_argument("--adc-bits", help="comma list of ADC resolutions (default 4,6,8; none "
                    "with --adc-mode ideal, which has no ADC)")
    sp.add_argument("--fault-rates",
                    help="sweep mode: comma list of stuck-at cell rates (default: 0, a "
                    "fault-free chip; fault-aware mode takes --fault-rate)")
    sp.add_argument("--fault-rate", type=float,
                    help=f"fault-aware mode: the chip's stuck-at cell rate (default "
                    f"{FAULT_AWARE_RATE:g}; the sweep takes --fault-rates)")
    sp.add_argument("--sa1-fraction", type=float,
                    help="share of faulty cells stuck ON, the rest stuck OFF (default 0.5; "
                    "a --fault-map has its own)")
    sp.add_argument("--variation", help="sweep mode: comma list of programming variations "
                    "(default 0)")
    sp.add_argument("--read-noise", type=float, default=0.0,
                    help="relative read noise (sigma) per cell, drawn anew each batch "
                    "(default 0)")
    sp.add_argument("--levels", type=int, help="conductance levels per cell, evenly spaced "
                    "(default: 2^cell_bits, i.e. no effect)")
    sp.add_argument("--adc-mode", default="calibrate", choices=["calibrate", "fixed", "ideal"],
                    help="calibrate: each ADC's range from calibration batches (default); fixed: "
                    "the full theoretical range; ideal: no ADC quantisation")
    sp.add_argument("--adc-granularity", choices=["layer", "tile", "column"],
                    help="what shares one calibrated ADC range, with --adc-mode calibrate "
                    "(default tile: one crossbar)")
    sp.add_argument("--adc-offset-trim", action="store_true",
                    help="trim each output column's mean ADC error, measured on the "
                    "calibration batches (SimConfig.adc_offset_trim; default off: an untrimmed "
                    "chip, whose accuracy need not rise with --adc-bits below the lossless "
                    "resolution)")
    sp.add_argument("--bn-recalibration", action="store_true",
                    help="re-estimate each task's own BatchNorm statistics on the chip's "
                    "outputs over the calibration batches, for the simulation only "
                    "(SimConfig.bn_recalibration; needs per-task BN)")
    sp.add_argument("--input-headroom", type=float, default=1.0,
                    help="factor on each layer's calibrated input range (default 1: test "
                    "inputs above the calibration batches' largest are clipped)")
    sp.add_argument("--backend", default="auto", choices=list(BACKENDS),
                    help="simulation kernels (SimConfig.backend)")
    sp.add_argument("--sim-input-bits", type=int, help="override the spec's input bits")
    sp.add_argument("--sim-dac-bits", type=int, help="override the spec's DAC bits per cycle")
    sp.add_argument("--sim-cell-bits", type=int, help="override the spec's cell bits")
    sp.add_argument("--fault-map", help="use this saved fault map (sweep: instead of "
                    "--fault-rates; its rows carry the map's own rate)")
    sp.add_argument("--save-fault-map", help="fault-aware mode: save the chip's fault map here")
    sp.add_argument("--out", help="fault-aware mode: save both tasks as a bundle here")
    sp.add_argument("--image-size", type=int,
                    help="fault-aware mode: image side fed to the backbone (default: the side "
                    "it was pretrained at or import-backbone recorded, else its family's: 224 "
                    "for an ImageNet layout, 28 else); the sweep feeds each task at its own")
    sp.add_argument("--epochs", type=int,
                    help=f"fault-aware mode: training epochs (default {FAULT_AWARE_EPOCHS})")
    sp.add_argument("--precision", choices=list(PRECISIONS),
                    help="fault-aware mode: training precision (default fp32, which every "
                    "recorded figure used; auto: bf16 autocast on CPUs with native bf16 units, "
                    "as the demo; evaluation and simulation stay fp32)")
    sp.add_argument("--train-subset", type=int, default=4000,
                    help="training images: fault-aware mode trains on them; both modes "
                    "calibrate input scales and ADC ranges on two batches of them, never on "
                    "test images (default %(default)s)")
    sp.add_argument("--test-subset", type=int,
                    help=f"test images (default {DEFAULT_TEST_SUBSET}; a task with fewer uses "
                    "all of its own, said only when the flag asks for more)")
    sp.add_argument("--batch-size", type=int, default=128, help="default %(default)s")
    sp.add_argument("--chip-seed", type=seed_arg,
                    help="seed of the chip alone: its programming variation, read noise and "
                    "fault maps (default: --seed). Vary it with --seed fixed to see the spread "
                    "between chips on one test set")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument("--json-out", help="also write the JSON results to this file (an earlier "
                    "results file there is replaced; any other file is refused)")
    sp.add_argument("--plot", help="folder for accuracy-vs-ADC-bits / -fault-rate plots")
    add_spec_args(sp)
    common(sp, seed_help="the subsets, the training (fault-aware mode) and, unless "
           "--chip-seed, the chip's variation, noise and faults (default 0; a bundle's tasks "
           "draw their --test-subset with the seed each was learned with, as xbm eval does, "
           "so the ideal row repeats its figure); the default backbone is the seed-0 one",
           root_help=TASK_ROOT_HELP)
    sp.set_defaults(func=cmd_simulate, seed=None)


def _run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The simulation settings a results file records (besides the specs and the rows); with
    ``--fault-map`` the faults are the file's, and ``chip_seed`` seeds variation and noise."""
    return {"seed": args.seed, "chip_seed": _chip_seed(args), "adc_mode": args.adc_mode,
            # what shares a calibrated range: none without one (fixed and ideal modes)
            "adc_granularity": _granularity(args) if args.adc_mode == "calibrate" else None,
            "read_noise": args.read_noise,
            "input_headroom": args.input_headroom,
            "adc_offset_trim": bool(getattr(args, "adc_offset_trim", False)),
            "bn_recalibration": bool(getattr(args, "bn_recalibration", False)),
            "fault_map": getattr(args, "fault_map", None)}


def _chip_seed(args: argparse.Namespace) -> int:
    """The chip's seed: ``--chip-seed``, else ``--seed``."""
    cs = getattr(args, "chip_seed", None)
    return args.seed if cs is None else cs


def _granularity(args: argparse.Namespace) -> str:
    """``--adc-granularity``, else SimConfig's default (the flag's default is None, so that
    one given in a mode without a calibrated range can be told apart and refused)."""
    from xbm.hardware.simulate import SimConfig

    return getattr(args, "adc_granularity", None) or SimConfig.adc_granularity


def _sim_config(args: argparse.Namespace, adc_bits: int | None, variation: float):
    from xbm.hardware.simulate import SimConfig

    return SimConfig(adc_bits=adc_bits, adc_mode=args.adc_mode,
                     adc_granularity=_granularity(args), variation=variation,
                     read_noise=args.read_noise, levels=args.levels, seed=_chip_seed(args),
                     input_headroom=getattr(args, "input_headroom", 1.0),
                     adc_offset_trim=bool(getattr(args, "adc_offset_trim", False)),
                     bn_recalibration=bool(getattr(args, "bn_recalibration", False)),
                     backend=args.backend, input_bits=args.sim_input_bits,
                     dac_bits=args.sim_dac_bits, cell_bits=args.sim_cell_bits)


def _calibration_batches(data, args: argparse.Namespace, n: int = 2,
                         size: int | None = None) -> list[torch.Tensor]:
    """A few training batches (never test data) for input scales and ADC ranges, at the side
    ``size`` the task is fed at."""
    loader, _ = data.loaders(args.batch_size, seed=args.seed, size=size)
    out = []
    for x, _y in loader:
        out.append(x)
        if len(out) >= n:
            break
    return out


def evaluate_faithful(mtm, task: str, config, loader, device, calibration,
                      fault_map=None) -> dict[str, Any]:
    """Accuracy of ``task`` on the faithful path, with ADC conversion counts."""
    from xbm.hardware.simulate import faithful
    from xbm.train import evaluate

    t0 = time.perf_counter()
    with mtm.use_task(task), faithful(mtm, config, fault_map, calibration=calibration) as sim:
        acc = evaluate(mtm, loader, device)
    return {"accuracy": round(acc, 4), "adc_conversions": sim.conversions,
            "skipped_conversions": sim.skipped_conversions,
            "seconds": round(time.perf_counter() - t0, 2)}


def _fault_map(mtm, spec, rate: float, args: argparse.Namespace):
    from xbm.hardware.faults import FaultMap

    # --sa1-fraction was checked by _check_mode_flags, before any work
    return FaultMap.generate(mtm, spec, sa0_rate=rate * (1 - args.sa1_fraction),
                             sa1_rate=rate * args.sa1_fraction, seed=_chip_seed(args))


def _cell(col: str, v: Any) -> str:
    """A table cell: percentages with two decimals (as every other xbm table), rates as
    written, no ADC as ``-``."""
    if v is None:
        return "-"
    if isinstance(v, float) and not isinstance(v, bool):
        if col in ("fault_rate", "variation", "sa1_fraction"):
            return f"{v:g}"
        if col == "seconds":
            return f"{v:.1f}"
        return f"{v + 0.0:+.2f}" if col == "delta" else f"{v:.2f}"
    return str(v)


def _progress(args: argparse.Namespace, line: str) -> None:
    """A finished setting's line while the rest runs: on stderr (the table or JSON that follows
    on stdout repeats it), silenced by --no-progress."""
    if not args.no_progress:
        print(line, file=sys.stderr, flush=True)


def _print(rows: list[dict[str, Any]], cols: list[str], title: str | None = None) -> None:
    cells = [[_cell(c, r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    if title:
        print(title)
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    print("-" * (sum(widths) + 2 * (len(cols) - 1)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


# -- sweep -----------------------------------------------------------------------------------
def _sweep(args: argparse.Namespace) -> dict[str, Any]:
    from xbm.cli import (
        _backbone,
        _base_task_data,
        _check_counts,
        _check_spec_flags,
        _task_data,
        check_dataset_flag,
    )
    from xbm.hardware.faults import FaultMap, fault_aware
    from xbm.multitask import MultiTaskModel, read_bundle_meta
    from xbm.train import evaluate_task, resolve_device

    _check_counts(args, ("batch_size", "train_subset", "test_subset"))
    device = resolve_device(args.device)
    meta, spec, infos = read_bundle_meta(args.bundle)  # cheap checks before the backbone
    _check_spec_flags(args, spec, args.bundle)
    if args.task and args.task != "base" and args.task not in {t.name for t in infos}:
        raise XbmError(f"{args.bundle}: no task {args.task!r}; it holds "
                       f"{', '.join(t.name for t in infos) or 'no tasks'} (and 'base', the "
                       "backbone's own task)")
    check_dataset_flag(args, infos)
    if args.bn_recalibration:  # refused before any work, not after earlier tasks' sweeps
        frozen = ["base"] if args.task == "base" else [
            t.name for t in infos if (args.task in (None, t.name))
            and not (t.config or {}).get("per_task_bn", True)]
        if frozen:
            raise ConfigError(f"--bn-recalibration re-estimates a task's own BatchNorm "
                              f"statistics; task {frozen[0]!r} runs the backbone's (the base "
                              "task, or per_task_bn off), whose statistics are the programmed "
                              "model's: drop the flag, or pick other tasks with --task")
    if args.fault_map and args.fault_rates is not None:
        raise ConfigError("--fault-map replaces --fault-rates (the saved chip has its own fault "
                          "rate); pass one of them")
    if args.fault_map and getattr(args, "sa1_given", False):  # it was ignored without a word
        raise ConfigError("--fault-map holds its own stuck-on/stuck-off split (the saved "
                          "chip's); drop --sa1-fraction, or draw a chip with --fault-rates")
    variation = "0" if args.variation is None else args.variation  # "" is still an error
    adc_bits, variations = _adc_bits(args, spec), _floats(variation, "--variation")
    rates = _floats("0" if args.fault_rates is None else args.fault_rates, "--fault-rates", 0, 1)
    fixed_map = FaultMap.load(args.fault_map) if args.fault_map else None  # before the backbone
    backbone, bmeta = _backbone(args, device, meta)
    mtm = MultiTaskModel(backbone, spec, arch=bmeta["arch"]).to(device).eval()
    names = mtm.load_bundle(args.bundle)
    tasks = [args.task] if args.task else names
    sim_spec = _sim_config(args, None, 0.0).spec_for(spec)
    if fixed_map is not None:
        fixed_map.check(mtm, sim_spec)  # another chip's map: refused before any evaluation
        # a saved chip has its own rate: its rows carry it, never another rate's label
        maps = {round(fixed_map.sa0_rate + fixed_map.sa1_rate, 12): fixed_map}
    else:
        maps = {r: (_fault_map(mtm, sim_spec, r, args) if r > 0 else None) for r in rates}
    rows: list[dict[str, Any]] = []
    from xbm.cli import _eval_seed, backbone_default_side

    given = argparse.Namespace(seed=args.seed if getattr(args, "seed_given", True) else None)
    for t in tasks:
        if t == "base":  # the backbone as programmed, on its pretraining set (as xbm eval)
            seed = _eval_seed(given, (bmeta.get("config") or {}).get("seed"))
            _, data, size = _base_task_data(args, bmeta, list(mtm.tasks.values()), seed)
            if args.train_subset:  # the ADC calibration's images
                data = data.subset(args.train_subset, None, seed=seed, warn_untrained=False)
        else:
            seed = _eval_seed(given, (mtm.tasks[t].extra or {}).get("seed"))
            _, data, size = _task_data(args, mtm.tasks[t], args.train_subset, args.test_subset,
                                       seed=seed,
                                       channels=(bmeta.get("arch") or {}).get("in_channels"),
                                       default_side=backbone_default_side(bmeta))
        _, test_loader = data.loaders(args.batch_size, seed=seed, size=size)
        calib = _calibration_batches(data, args, size=size)
        ideal = evaluate_task(mtm, t, test_loader, device)
        rows.append({"task": t, "path": "ideal", "adc_bits": None, "fault_rate": 0.0,
                     "variation": 0.0, "accuracy": round(ideal, 4), "delta": 0.0})
        for r, fmap in maps.items():
            if fmap is not None:
                with mtm.use_task(t), fault_aware(mtm, fmap, sim_spec):
                    acc = evaluate_task(mtm, t, test_loader, device)
                rows.append({"task": t, "path": "ideal+faults", "adc_bits": None,
                             "fault_rate": r, "variation": 0.0, "accuracy": round(acc, 4),
                             "delta": round(acc - ideal, 4)})
            for v in variations:
                for b in adc_bits:
                    res = evaluate_faithful(mtm, t, _sim_config(args, b, v), test_loader, device,
                                            calib, fmap)
                    rows.append({"task": t, "path": "faithful", "adc_bits": _adc_label(b),
                                 "fault_rate": r, "variation": v, **res,
                                 "delta": round(res["accuracy"] - round(ideal, 4), 4)})
                    _progress(args, f"  {t} adc {_adc_label(b)} fault {r} var {v}: "
                                    f"{res['accuracy']:.2f}% ({res['seconds']:.0f}s)")
    return {"mode": "sweep", "bundle": args.bundle, "spec": spec.to_dict(),
            "simulated_spec": sim_spec.to_dict(), "rows": rows, **_run_settings(args)}


def _is_simulate_results(path: Path) -> bool:
    """Whether ``path`` holds a JSON object that this command wrote (its ``mode``): only such
    a file is rewritten by --json-out (a config beside it once was)."""
    try:
        if path.stat().st_size > 64 << 20:
            return False
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("mode") in ("sweep", "fault-aware")


def _check_distinct_paths(args: argparse.Namespace) -> None:
    """No output may land on an input or on another output, and the new artefacts (a bundle,
    a fault map) never replace an existing file: `--json-out B` once overwrote the bundle it
    read, and `--out A` replaced a bundle of learned tasks, both with exit 0."""
    def same(a: str, b: str) -> bool:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        try:
            return pa.exists() and pb.exists() and pa.samefile(pb) or \
                pa.resolve() == pb.resolve()
        except OSError:
            return False

    inputs = [(f, getattr(args, a, None)) for f, a in (("--bundle", "bundle"),
                                                        ("--fault-map", "fault_map"),
                                                        ("--backbone", "backbone"))]
    outputs = [(f, getattr(args, a, None)) for f, a in (("--json-out", "json_out"),
                                                         ("--out", "out"),
                                                         ("--save-fault-map", "save_fault_map"))]
    from xbm.io import header_field, xbm_file_kind

    if args.bundle and not args.backbone:  # the backbone file the bundle records is read too

        recorded = header_field(args.bundle, "backbone_file")
        if isinstance(recorded, str):
            inputs.append(("backbone file the --bundle records", recorded))
    inputs = [(f, v) for f, v in inputs if v]
    outputs = [(f, v) for f, v in outputs if v]
    for i, (fo, out) in enumerate(outputs):
        for fi, inp in inputs:
            if same(out, inp):
                raise XbmError(f"{fo} {out} is the {fi} this command reads; write to another "
                               "file")
        for fo2, out2 in outputs[i + 1:]:
            if same(out, out2):
                raise XbmError(f"{fo} and {fo2} are the same file {out}; give each its own")
        if fo != "--json-out" and Path(out).expanduser().exists():
            raise XbmError(f"{fo} {out} already exists; pass a new path (or delete the file)")
        kind = xbm_file_kind(Path(out).expanduser())
        if fo == "--json-out" and kind:  # a results file is rewritten; another command's not
            raise XbmError(f"--json-out {out} is a {kind}, not a results file; pass another "
                           "path")
        if fo == "--json-out" and Path(out).expanduser().is_file() and \
                not _is_simulate_results(Path(out).expanduser()):
            raise XbmError(f"--json-out {out} already exists and is not an `xbm simulate` "
                           "results file (it would be replaced); pass another path, or "
                           "delete it first")
    plot = getattr(args, "plot", None)
    for fo, out in [*inputs, *outputs] if plot else []:  # it failed after the whole run
        if same(plot, out):
            raise XbmError(f"--plot {plot} is also the {fo}; give the plots a folder of their "
                           "own")


# -- fault-aware -----------------------------------------------------------------------------
def _fault_aware(args: argparse.Namespace) -> dict[str, Any]:
    from xbm.cli import _backbone, _check_counts, record_task_data, spec_from_args
    from xbm.data import dataset_reference, load_dataset
    from xbm.hardware.faults import fault_aware, fault_summary
    from xbm.multitask import MultiTaskModel
    from xbm.train import evaluate_task, resolve_device, seed_everything, train_task
    from xbm.train.pretrain import resolve_precision

    if not args.dataset:
        raise XbmError("--fault-aware needs --dataset (the task to learn)")
    _check_counts(args, ("epochs", "batch_size", "train_subset", "test_subset"))
    device = resolve_device(args.device)
    # in the backbone's channels (read from a given file's header: the dataset's errors still
    # come before any pretraining of the default backbone, which is grayscale)
    from xbm.cli import DEFAULT_MODEL, _image_size
    from xbm.train.pretrain import PretrainConfig, backbone_file_arch, backbone_file_side

    channels = (backbone_file_arch(args.backbone) or {}).get("in_channels") \
        if args.backbone else None
    # the side: --image-size, else the one the backbone was pretrained at (the default
    # backbone's is 28)
    image_size = _image_size(args, [], backbone_file_side(args.backbone)
                             if args.backbone else PretrainConfig.image_size,
                             backbone_file_arch(args.backbone) if args.backbone else
                             {"name": args.model or DEFAULT_MODEL})
    data = load_dataset(args.dataset, root=args.data_root, channels=channels,
                        image_size=image_size)
    data.say_if_colour_was_dropped()  # it trains on the task, as adapt does
    fingerprint = data.test_fingerprint()  # of the whole test split, as adapt records it
    data = data.subset(args.train_subset, args.test_subset, seed=args.seed)
    backbone, bmeta = _backbone(args, device)
    want = (bmeta.get("arch") or {}).get("in_channels")
    if want is not None and want != data.in_channels:
        data = data.with_channels(want)
    spec = spec_from_args(args)
    adc_list = _adc_bits(args, spec)  # checked now, not after the training
    mtm = MultiTaskModel(copy.deepcopy(backbone), spec, arch=bmeta["arch"],
                         backbone_recipe=bmeta.get("config"),
                         backbone_file=args.backbone).to(device)
    before = {k: v.clone() for k, v in mtm.backbone_state().items()}
    sim_spec = _sim_config(args, None, 0.0).spec_for(spec)
    fmap = _fault_map(mtm, sim_spec, args.fault_rate, args)
    train_loader, test_loader = data.loaders(args.batch_size, seed=args.seed, size=image_size)
    progress = not args.no_progress
    precision = resolve_precision(args.precision, device)
    timings = {}
    for task in ("unaware", "aware"):
        seed_everything(args.seed)
        # a saved --out records what adapt's tasks do: eval reads their data again
        mtm.add_task(task, data.num_classes, "xbm", dataset=dataset_reference(args.dataset))
        record_task_data(mtm, task, args, data, image_size, fingerprint)
        t0 = time.perf_counter()
        if task == "aware":
            with fault_aware(mtm, fmap, sim_spec):
                tr = train_task(mtm, task, train_loader, args.epochs, device,
                                progress=progress, precision=precision)
        else:
            tr = train_task(mtm, task, train_loader, args.epochs, device, progress=progress,
                            precision=precision)
        timings[task] = round(time.perf_counter() - t0, 2)
        # the workload, as adapt records it: `xbm cost --workload recorded` prices these steps
        mtm.tasks[task].extra.update(train_steps=tr.steps, processes=1)
    calib = _calibration_batches(data, args, size=image_size)
    rows: list[dict[str, Any]] = []
    cfg8 = _sim_config(args, None, 0.0)
    for task in ("unaware", "aware"):
        ideal = evaluate_task(mtm, task, test_loader, device)
        with mtm.use_task(task), fault_aware(mtm, fmap, sim_spec):
            faulty = evaluate_task(mtm, task, test_loader, device)
        sim = evaluate_faithful(mtm, task, cfg8, test_loader, device, calib, fmap)
        rows.append({"task": task, "trained_on": "faulty chip" if task == "aware" else
                     "ideal chip", "ideal_clean": round(ideal, 4),
                     "ideal_faulty": round(faulty, 4),
                     ("faithful_faulty_no_adc" if args.adc_mode == "ideal" else
                      f"faithful_faulty_adc{sim_spec.adc_bits}"): sim["accuracy"],
                     "masked_off_columns": mtm.masked_off_columns(task),
                     "train_seconds": timings[task]})
    adc_rows = []
    clean_ideal = rows[0]["ideal_clean"]
    for b in adc_list:
        res = evaluate_faithful(mtm, "unaware", _sim_config(args, b, 0.0), test_loader, device,
                                calib)
        adc_rows.append({"task": "unaware", "adc_bits": _adc_label(b), **res,
                         "delta": round(res["accuracy"] - clean_ideal, 4)})
        _progress(args, f"  clean chip, adc {_adc_label(b)}: {res['accuracy']:.2f}% "
                        f"({res['seconds']:.0f}s)")
    after = mtm.backbone_state()
    identical = set(before) == set(after) and all(torch.equal(before[k], after[k])
                                                  for k in before)
    if args.out:
        from xbm.io import folder_lock

        with folder_lock(args.out):  # checked at the start; another run may have made it since
            if Path(args.out).expanduser().exists():
                raise XbmError(f"--out {args.out} appeared while this run trained (another "
                               "command wrote it); nothing was overwritten: pass another --out")
            mtm.save_bundle(args.out)
    if args.save_fault_map:  # with the results, not before the training: an interrupted run
        # left the map alone, and the same command then refused to overwrite it
        fmap.save(args.save_fault_map)
    return {"mode": "fault-aware", "dataset": args.dataset, "spec": spec.to_dict(),
            "simulated_spec": sim_spec.to_dict(), "fault_rate": args.fault_rate,
            "sa1_fraction": args.sa1_fraction, "faults": fault_summary(fmap, mtm),
            "backbone": bmeta.get("content_hash"), "rows": rows, "adc_sweep": adc_rows,
            "backbone_bit_identical": identical, "train_subset": args.train_subset,
            "test_subset": args.test_subset, "epochs": args.epochs, "precision": precision,
            "image_size": image_size,
            "saved_bundle": str(args.out) if args.out else None,
            "saved_fault_map": str(args.save_fault_map) if args.save_fault_map else None,
            **_run_settings(args)}


# -- plots -----------------------------------------------------------------------------------
def _save_plot(fig: Any, ax: Any, path: Path, xlabel: str,
               legend_size: int | None = 6) -> str:
    """Label the accuracy axis, add the legend, write ``path`` and free the figure."""
    ax.set_xlabel(xlabel)
    if xlabel == "ADC bits":  # whole bits only: no 4.5-bit tick between 4 and 6
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    from xbm.report.plots import save_figure

    return str(save_figure(fig, path, dpi=120, tight=False))


def _line_plot(plt: Any, rows: list[dict[str, Any]], x: str, key: tuple[str, ...],
               label: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Accuracy against ``x``, one line per distinct ``key`` (labelled by ``label(key)``).

    A task keeps one colour on every line of it (its ideal line too: see the returned
    task -> colour map) and its settings take line styles, so a plot of two tasks over
    several fault rates reads by colour, not by the legend alone."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    cmap = plt.get_cmap("tab10")
    keys = sorted({tuple(r[f] for f in key) for r in rows})
    tasks = sorted({r["task"] for r in rows if "task" in r})
    colours = {t: cmap(i % 10) for i, t in enumerate(tasks)}
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for k in keys:
        pts = sorted((r[x], r["accuracy"]) for r in rows if tuple(r[f] for f in key) == k)
        task = k[key.index("task")] if "task" in key else None
        n = seen[task] = seen.get(task, -1) + 1  # the task's n-th line: its style
        kw = {"color": colours[task], "ls": styles[n % len(styles)]} if task in colours else {}
        ax.plot(*zip(*pts, strict=True), marker="o", label=label(k), **kw)
    return fig, ax, colours


def _plots(res: dict[str, Any], folder: str) -> list[str]:
    from xbm.report.plots import _pyplot

    plt = _pyplot()  # a one-line error without matplotlib (checked before the sweep too)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if res["mode"] == "sweep":
        fr = [r for r in res["rows"] if r["path"] == "faithful"]
        if all(isinstance(r["adc_bits"], int) for r in fr):  # no ADC axis under adc-mode ideal
            fig, ax, colours = _line_plot(plt, fr, "adc_bits", ("task", "fault_rate",
                                                                "variation"),
                                          lambda k: f"{k[0]} faults {k[1]:g} var {k[2]:g}")
            for r in res["rows"]:
                if r["path"] == "ideal":  # in the task's colour: which curve it bounds
                    ax.axhline(r["accuracy"], ls=(0, (1, 2)), lw=1.0,
                               color=colours.get(r["task"], "gray"),
                               label=f"{r['task']} ideal")
            written.append(_save_plot(fig, ax, out / "accuracy_vs_adc_bits.png",
                                      "ADC bits"))
        if len({r["fault_rate"] for r in fr}) > 1:  # a sweep of one rate has no curve
            fig, ax, _ = _line_plot(plt, fr, "fault_rate", ("task", "adc_bits", "variation"),
                                    lambda k: f"{k[0]} adc {k[1]} var {k[2]:g}")
            written.append(_save_plot(fig, ax, out / "accuracy_vs_fault_rate.png",
                                      "stuck-at cell rate"))
    else:
        rows = [r for r in res["adc_sweep"] if isinstance(r["adc_bits"], int)]
        if rows:
            fig, ax, _ = _line_plot(plt, rows, "adc_bits", (), lambda k: "faithful")
            ax.axhline(res["rows"][0]["ideal_clean"], ls="--", color="gray", label="ideal")
            written.append(_save_plot(fig, ax, out / "accuracy_vs_adc_bits.png",
                                      "ADC bits", legend_size=None))
    return written


def cmd_simulate(args: argparse.Namespace) -> int:
    """Entry point of ``xbm simulate``."""
    from xbm.io import write_json_atomic
    from xbm.train import distributed as xdist

    if xdist.launched():
        raise XbmError("xbm simulate is not data-parallel: run it as one process, without "
                       "torchrun / scripts/distributed.sh")
    from xbm.io import check_output

    # --seed left out: 0 for the chip and the training, the recorded seed for a bundle
    # task's test subset (as xbm eval: its ideal row then repeats adapt's and eval's figure)
    args.seed_given = args.seed is not None
    if args.seed is None:
        args.seed = 0
    # the default asks for no more than a task has: a task of fewer test images is not
    # warned about (it was, in every run on a small image folder)
    args.test_subset_given = args.test_subset is not None
    if args.test_subset is None:
        args.test_subset = DEFAULT_TEST_SUBSET
    args.sa1_given = args.sa1_fraction is not None  # a saved map has its own split
    if args.sa1_fraction is None:
        args.sa1_fraction = 0.5
    _check_mode_flags(args)  # before anything is checked, loaded or trained
    for flag, path, kind in (("--json-out", args.json_out, "file"), ("--plot", args.plot, "dir"),
                             ("--out", getattr(args, "out", None), "file"),
                             ("--save-fault-map", getattr(args, "save_fault_map", None), "file")):
        if path:  # checked before the sweep, not after it
            check_output(path, kind, flag)
    _check_distinct_paths(args)
    if args.plot:  # before minutes of sweeping, not after
        from xbm.report.plots import _pyplot

        _pyplot()
    if getattr(args, "out", None):
        from xbm.cli import check_bundle_suffix

        check_bundle_suffix(Path(args.out), "--out")
    if args.fault_aware:
        res = _fault_aware(args)
    elif args.bundle:
        res = _sweep(args)
    else:
        raise XbmError("pass --bundle B (sweep) or --fault-aware --dataset D")
    if args.plot:
        res["plots"] = _plots(res, args.plot)
        if not res["plots"]:  # it ended with an empty folder and no word
            import warnings

            from xbm.errors import XbmWarning

            warnings.warn(f"--plot {args.plot}: nothing to plot (the plots are accuracy "
                          "against ADC bits, which --adc-mode ideal has none of, and against "
                          "two or more fault rates)", XbmWarning, stacklevel=2)
    if args.json_out:
        write_json_atomic(args.json_out, res)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    if res["mode"] == "sweep":
        _print(res["rows"], ["task", "path", "adc_bits", "fault_rate", "variation", "accuracy",
                             "delta"])
        print("accuracy: top-1 %; delta: points against the task's ideal (float) accuracy; "
              "path: ideal (no crossbar effects), ideal+faults (stuck cells only) or faithful "
              "(bit slices, DAC cycles, ADC, faults and variation)")
    else:
        f = res["faults"]
        print(f"chip: {f['sa0']:.3%} stuck-OFF + {f['sa1']:.3%} stuck-ON cells; "
              f"{f['faulty_weights'] / max(f['weights'], 1):.1%} of weights and "
              f"{f['faulty_columns'] / max(f['crossbar_columns'], 1):.1%} of crossbar columns "
              "hold a faulty cell")
        _print(res["rows"], list(res["rows"][0]))
        print()
        _print(res["adc_sweep"], ["task", "adc_bits", "accuracy", "delta", "seconds"],
               title="the fault-unaware task on a fault-free chip, by ADC resolution (delta: "
               "against its ideal accuracy)")
        print(f"backbone bit-identical: {res['backbone_bit_identical']}")
        if res.get("saved_bundle"):
            print(f"saved {res['saved_bundle']} (the fault-aware task and its fault-unaware "
                  "twin; xbm eval and xbm simulate --bundle take it)")
        if res.get("saved_fault_map"):
            print(f"saved {res['saved_fault_map']} (the chip's stuck cells; xbm simulate "
                  "--fault-map takes it)")
    for p in res.get("plots", []):
        print(f"plot: {p}")
    return 0
