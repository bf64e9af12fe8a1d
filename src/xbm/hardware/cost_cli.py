"""``xbm cost``: mask memory, re-programmed cells, energy and latency of every method.

Loaded by :mod:`xbm.cli` through its extension mechanism (:func:`register`). Two inputs:

- ``--model NAME``: any registered backbone, no weights needed. Numbers that depend on learned
  values (Piggyback's masked-off fraction, XBM's switched-off columns) come from documented
  default flags, or are measured from a bundle with ``--fractions-from``.
- ``--bundle PATH``: the learned tasks of a task bundle, costed exactly through each method's
  accounting hooks, plus the switch energy between every pair of tasks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from xbm.errors import ConfigError, XbmError

DEFAULT_RESULTS = Path("runs/demo/results.json")
_EXTRA_SPEC = ("adc_bits", "dac_bits", "input_bits")


def _kv(values: list[str] | None, flag: str) -> dict[str, float]:
    """Parse repeated NAME=FLOAT options."""
    out: dict[str, float] = {}
    for item in values or []:
        name, sep, v = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"{flag} takes METHOD=FRACTION, got {item!r}")
        from xbm.methods import METHODS

        name = name.strip()
        if name not in METHODS:
            raise ConfigError(f"{flag} {name}: unknown method; choose one of "
                              f"{', '.join(METHODS)}")
        try:
            f = float(v)
        except ValueError:
            raise ConfigError(f"{flag} {name}: {v!r} is not a number") from None
        if not 0 <= f <= 1:
            raise ConfigError(f"{flag} {name}: a fraction must lie in [0, 1], got {v}")
        from xbm.cli import _once

        out[name] = _once(out, name, f, flag)
    return out


def _overrides(values: list[str] | None) -> dict[str, Any]:
    from xbm.cli import _once, _parse_value  # as --set reads values: False, .001, 5e-9 alike

    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"--set-energy takes FIELD=VALUE (e.g. "
                              f"device.write_pulses_per_cell=5), got {item!r}")
        out[key.strip()] = _once(out, key.strip(), _parse_value(v), "--set-energy")
    return out


def _preset(args: argparse.Namespace):
    from xbm.hardware.energy import get_preset, load_preset_file

    if args.preset_file and args.energy is not None:
        raise ConfigError(f"--energy {args.energy} and --preset-file {args.preset_file} both name "
                          "the energy preset; pass one (--set-energy changes single constants)")
    preset = load_preset_file(args.preset_file) if args.preset_file else \
        get_preset(args.energy or "default")
    changes = _overrides(args.set_energy)
    return preset.with_overrides(changes) if changes else preset


def _explicit_spec(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("rows", "cols", "weight_bits", "cell_bits", *_EXTRA_SPEC)
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _spec(args: argparse.Namespace, preset):
    from xbm.hardware import get_spec

    if args.energy_spec and args.preset not in (None, "default"):
        raise ConfigError(f"--preset {args.preset} and --energy-spec both choose the crossbar "
                          "geometry (a crossbar preset, or the energy preset's source); pass one "
                          "(--rows, --cols and the bit flags still override either)")
    spec = get_spec(args.preset or "default")
    if args.energy_spec and preset.spec_overrides:
        spec = spec.replace(**preset.spec_overrides)
    explicit = _explicit_spec(args)
    return spec.replace(**explicit) if explicit else spec


def _geometry_not_taken(preset, spec, how: str) -> str | None:
    """A note when the chosen energy preset is for other crossbars than those costed (its
    source's, or a preset file's): its constants are then applied to another array (said, so
    a reader does not take the figures for the source's own chip); ``how`` says why, or what
    would change it."""
    theirs = {k: v for k, v in (preset.spec_overrides or {}).items()
              if getattr(spec, k, v) != v}
    if not theirs:
        return None
    said = ", ".join(f"{k} {v} (costed: {getattr(spec, k)})" for k, v in theirs.items())
    return f"energy preset {preset.name} is for crossbars with {said}; {how}"


def _assumptions(args: argparse.Namespace, measured: tuple[dict, dict] | None = None):
    from xbm.hardware.cost import Assumptions

    rewrite: dict[str, float] = {}
    off: dict[str, float] = {}
    if measured:
        rewrite |= measured[0]
        off |= measured[1]
    given_rewrite = _kv(args.fraction, "--fraction")
    given_off = _kv(args.off_fraction, "--off-fraction")
    _check_capable(given_rewrite, given_off)  # what a bundle measured is whatever it is
    rewrite |= given_rewrite
    off |= given_off
    for flag, into, method in (("piggyback_off_fraction", rewrite, "piggyback"),
                               ("finetune_changed_fraction", rewrite, "finetune"),
                               ("xbm_off_fraction", off, "xbm")):
        v = getattr(args, flag)
        given = given_rewrite if into is rewrite else given_off
        if v is not None and method in given:
            other = "--fraction" if into is rewrite else "--off-fraction"
            raise ConfigError(f"--{flag.replace('_', '-')} and {other} {method}=F both set "
                              f"{method}'s fraction; give one")
        if v is not None:
            if not 0 <= v <= 1:
                raise ConfigError(f"--{flag.replace('_', '-')} must be a fraction in [0, 1], "
                                  f"got {v:g}")
            into[method] = v
    return Assumptions(rewrite_fraction=rewrite, column_off_fraction=off,
                       iterations=Assumptions.iterations if args.iterations is None
                       else args.iterations, batch_size=Assumptions.batch_size
                       if args.batch_size is None else args.batch_size,
                       backward_factor=args.backward_factor, churn=args.churn,
                       training_skips_off_columns=args.training_skips_off_columns)


def _recorded_workloads(args: argparse.Namespace, mtm: Any, tasks: list[str],
                        assumptions: Any) -> tuple[dict[str, Any], list[str]]:
    """``--workload recorded``: per task, the assumptions with its recorded steps and batch
    (``xbm adapt`` records both), and the tasks that recorded none (priced at the default)."""
    if args.workload != "recorded":
        return {}, []
    if args.iterations is not None or args.batch_size is not None:
        raise ConfigError("--workload recorded takes each task's own steps and batch; drop "
                          "--iterations/--batch-size, or price one workload with them "
                          "(--workload protocol)")
    from dataclasses import replace

    per_task, none = {}, []
    for t in tasks:
        extra = mtm.tasks[t].extra or {}
        steps, batch = extra.get("train_steps"), extra.get("batch_size")
        world = extra.get("processes", 1)  # torchrun: one step is world x batch images
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for v in (steps, batch, world)):
            per_task[t] = replace(assumptions, iterations=steps, batch_size=batch * world)
        else:
            none.append(t)
    return per_task, none


def _check_capable(rewrite: dict[str, float], off: dict[str, float]) -> None:
    """A fraction a method cannot have would price what it cannot do: Piggyback's masked-off
    weights are rewritten cells, not skipped ADC conversions, and XBM rewrites no cell."""
    from xbm.hardware.cost import switches_off_columns
    from xbm.methods import get_method_class

    for name in off:
        cls = get_method_class(name)
        if not switches_off_columns(name):
            hint = (f"; its re-programmed share is --fraction {name}=F"
                    if cls.reprograms_cells else "")
            raise ConfigError(f"--off-fraction {name}: {name} switches off no crossbar column "
                              f"(only column masks do: xbm, xma, xma2){hint}")
    for name in rewrite:
        cls = get_method_class(name)
        if not cls.reprograms_cells:
            hint = (f"; its switched-off columns are --off-fraction {name}=F"
                    if switches_off_columns(name) else "")
            raise ConfigError(f"--fraction {name}: {name} re-programs no cell{hint}")


def load_bundle_model(bundle: str, backbone: str | None, args: argparse.Namespace | None = None,
                      with_meta: bool = False):
    """A MultiTaskModel holding a bundle's tasks, on the bundle's own crossbar spec (and, with
    ``with_meta``, the backbone file's metadata beside it).

    Raises:
        BundleError: unreadable bundle, no matching backbone, or a backbone of another
            architecture or content.
        ConfigError: an explicit spec flag contradicts the spec the bundle was learned on.
    """
    from xbm.multitask import MultiTaskModel, read_bundle_meta
    from xbm.train.pretrain import bundle_backbone_path, load_backbone

    meta, spec, _ = read_bundle_meta(bundle)
    if args is not None:  # spec flags and --preset must agree with the bundle's own spec
        from xbm.cli import _check_spec_flags

        _check_spec_flags(args, spec, bundle, extra=_EXTRA_SPEC)
    path = backbone if backbone is not None else str(bundle_backbone_path(bundle, meta))
    model, bmeta = load_backbone(path)
    if backbone is not None:  # as eval and simulate: the content hash is what must match
        from xbm.cli import check_bundle_backbone

        check_bundle_backbone(bundle, meta, backbone, bmeta)
    # (no separate architecture check: a backbone found by the bundle's hash, or given and
    # checked against it, holds the very tensors the bundle was learned on)
    mtm = MultiTaskModel(model, spec, arch=bmeta.get("arch"),
                         head_name=meta.get("head_name", "fc"))
    mtm.load_bundle(bundle)
    return (mtm, bmeta) if with_meta else mtm


def cmd_cost(args: argparse.Namespace) -> int:
    from xbm.hardware import cost as C
    from xbm.io import check_output

    if args.results and not args.plot:
        raise ConfigError("--results feeds the accuracy axis of --plot; add --plot DIR, or "
                          "drop --results")
    if args.model and args.backbone and not args.fractions_from:
        raise ConfigError("--backbone applies to --bundle or --fractions-from, or costs a "
                          "backbone file alone; with --model it was ignored: drop one of them")
    if args.fractions_from:
        given = [flag for flag, v in (
            ("--fraction", args.fraction), ("--off-fraction", args.off_fraction),
            ("--piggyback-off-fraction", args.piggyback_off_fraction),
            ("--finetune-changed-fraction", args.finetune_changed_fraction),
            ("--xbm-off-fraction", args.xbm_off_fraction)) if v is not None]
        if given:
            raise ConfigError(f"{given[0]} and --fractions-from both set the fractions (the "
                              "latter measures them from a bundle); drop one")
    if args.plot:
        check_output(args.plot, "dir", "--plot")
        if args.results and not Path(args.results).is_file():
            raise XbmError(f"--results {args.results}: no such file; pass the demo's "
                           "results.json")

    if args.dump_preset:
        # it prints a preset and costs nothing: a flag that chooses what to cost would be
        # silently dropped (and --set-energy edits the printed preset)
        from xbm.cli import build_parser
        from xbm.hardware.energy import get_preset

        # every flag given besides --set-energy (it was a list of nine: --rows, --adc-bits,
        # --per-layer, ... were dropped without a word)
        defaults = vars(build_parser().parse_args(["cost", "--dump-preset", args.dump_preset]))
        ignored = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                   if k not in ("dump_preset", "set_energy", "func", "command")
                   and k in defaults and v != defaults[k]]
        if ignored:
            raise ConfigError(f"--dump-preset prints a preset as YAML and costs nothing; drop "
                              f"{', '.join(ignored)} (cost with --preset-file FILE after "
                              "editing the dump)")
        preset = get_preset(args.dump_preset)
        changes = _overrides(args.set_energy)
        sys.stdout.write((preset.with_overrides(changes) if changes else preset).to_yaml())
        return 0
    preset = _preset(args)
    if args.bundle and args.model:
        raise ConfigError("pass either --model (no weights) or --bundle (learned tasks), not both")
    if not args.bundle and not args.model and args.backbone:
        # a backbone file (an imported one, say): cost its architecture, as --model would;
        # loaded whole, so a task bundle or a damaged file is named as such
        from xbm.train.pretrain import load_backbone

        bmeta = load_backbone(args.backbone)[1]
        arch = bmeta.get("arch") or {}
        if not arch.get("name"):
            raise XbmError(f"--backbone {args.backbone}: records no architecture; pass --model")
        for field in ("width", "in_channels"):
            if getattr(args, field) is not None and getattr(args, field) != arch.get(field):
                raise ConfigError(f"--{field.replace('_', '-')} {getattr(args, field)} differs "
                                  f"from the backbone's {arch.get(field)}; drop it")
        args.model, args.width, args.in_channels = (arch["name"], arch.get("width"),
                                                     arch.get("in_channels"))
        if args.input_size is None:  # the side it was pretrained at, where it records one
            from xbm.train.pretrain import backbone_side

            args.input_size = backbone_side(bmeta)
        if not args.fractions_from:
            args.backbone = None  # its weights do not matter: --model's costs need none
    if not args.bundle and not args.model:
        raise ConfigError("pass --model NAME (e.g. resnet50), --backbone FILE or --bundle PATH")
    methods = None if args.methods is None else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods == []:
        raise ConfigError("--methods is empty; name methods (e.g. --methods xbm,piggyback) or "
                          "drop the flag for every one")
    # --sensitivity compares a method with a baseline: --methods METHOD,BASELINE names them
    sens_pair = ("xbm", "piggyback")
    if args.sensitivity and methods is not None and len(methods) == 2:
        sens_pair = (methods[0], methods[1])
    elif args.sensitivity and methods is not None and not {"xbm", "piggyback"} <= set(methods):
        raise ConfigError(f"--sensitivity sweeps one method's saving over a baseline; pass "
                          f"--methods METHOD,BASELINE (default xbm,piggyback), got "
                          f"{', '.join(methods)}")
    if methods is not None:
        from xbm.methods import get_method_class

        for m in methods:
            get_method_class(m)
        twice = sorted({m for m in methods if methods.count(m) > 1})
        if twice:
            raise ConfigError(f"--methods lists {', '.join(twice)} twice; name each method once")
    if args.bundle:
        # the bundle's backbone fixes the model, and its tasks' fractions are measured: these
        # flags were read by nothing, so the report looked like they had no effect
        ignored = [flag for flag, v in (
            ("--width", args.width), ("--in-channels", args.in_channels),
            ("--fractions-from", args.fractions_from), ("--fraction", args.fraction),
            ("--off-fraction", args.off_fraction),
            ("--piggyback-off-fraction", args.piggyback_off_fraction),
            ("--finetune-changed-fraction", args.finetune_changed_fraction),
            ("--xbm-off-fraction", args.xbm_off_fraction)) if v is not None]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} "
                              "not apply to --bundle, whose backbone fixes the model and whose "
                              "tasks' fractions are measured; drop "
                              f"{'it' if len(ignored) == 1 else 'them'} (or cost --model)")
    sens = None
    if args.bundle:
        if args.sensitivity:
            raise ConfigError("--sensitivity sweeps the no-weights defaults; use it with --model")
        if args.energy_spec:
            raise ConfigError("--energy-spec does not apply to --bundle: the bundle fixes the "
                              "crossbar spec it was learned on")
        mtm, bmeta = load_bundle_model(args.bundle, args.backbone, args, with_meta=True)
        assumptions = _assumptions(args)
        picked = None if args.tasks is None else \
            [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown_tasks = [t for t in picked or [] if t not in mtm.tasks]
        twice = sorted({t for t in picked or [] if picked.count(t) > 1})
        if twice:
            raise ConfigError(f"--tasks lists {', '.join(twice)} twice; name each task once")
        if picked == [] or unknown_tasks:
            what = f"has no task {unknown_tasks[0]!r}" if unknown_tasks else "names no task"
            raise ConfigError(f"--tasks {args.tasks!r} {what}; {args.bundle} holds "
                              f"{', '.join(mtm.tasks)}")
        tasks = [t for t in mtm.tasks if (methods is None or mtm.tasks[t].method in methods)
                 and (picked is None or t in picked)]
        if not tasks:
            raise XbmError(f"{args.bundle}: no task learned by {', '.join(methods or [])}"
                           + (f" among {', '.join(picked)}" if picked else ""))
        arch = mtm.arch or {}
        costed = {"name": arch.get("name"), "width": arch.get("width"),
                  "what": f"--bundle {args.bundle}"}
        # the side the tasks were fed at, where they record it (one for the bundle), else the
        # backbone's, as eval feeds them
        from xbm.cli import backbone_default_side, task_image_size

        default = backbone_default_side(bmeta)
        sizes = sorted({task_image_size(mtm.tasks[t], default) for t in tasks})
        if args.input_size is None and len(sizes) > 1:
            by_side = "; ".join(
                f"{s}: {','.join(t for t in tasks if task_image_size(mtm.tasks[t], default) == s)}"
                for s in sizes)
            raise ConfigError(f"the tasks were learned at different image sides ({by_side}); "
                              "cost them at one with --input-size, or the tasks of one side "
                              "with --tasks")
        size = args.input_size or sizes[0]
        per_task, own = _recorded_workloads(args, mtm, tasks, assumptions)
        report = C.bundle_report(mtm, preset, assumptions, tasks, arch.get("name", "bundle"),
                                 size, args.in_channels, per_task=per_task)
        trained = {t: mtm.tasks[t].extra.get("train_steps") for t in tasks}
        if args.workload == "recorded":
            said = ", ".join(f"{t} {a.iterations} steps x batch {a.batch_size}"
                             for t, a in per_task.items())
            report.notes.append(
                "on-chip adaption is priced at each task's recorded workload"
                + (f": {said}" if said else "")
                + ("" if not own else f"{'; ' if said else ': '}{', '.join(own)} recorded "
                   f"none, priced at the default {assumptions.iterations} x "
                   f"{assumptions.batch_size}")
                + ("; the methods' on-chip savings against Piggyback are left out (their "
                   "tasks trained different workloads)" if report.workloads_differ() else ""))
        elif args.iterations is None and any(isinstance(v, int) for v in trained.values()):
            def batch(t: str) -> str:  # under torchrun a step is processes x batch images
                b, w = mtm.tasks[t].extra.get("batch_size"), mtm.tasks[t].extra.get("processes", 1)
                return "?" if b is None else (f"{b * w} ({w} processes x {b})"
                                              if isinstance(w, int) and w > 1 else str(b))

            did = ", ".join(f"{t} {v} steps at batch {batch(t)}"
                            for t, v in trained.items() if isinstance(v, int))
            report.notes.append(
                f"on-chip adaption is priced at the default {assumptions.iterations} iterations "
                f"x batch {assumptions.batch_size} (30 epochs of Flowers-102, the papers' "
                f"protocol); these tasks trained {did}: --workload recorded prices that "
                "workload instead")
    else:
        if args.tasks is not None:
            raise ConfigError("--tasks picks tasks of a --bundle; drop it, or pass --bundle")
        if args.workload == "recorded":
            raise ConfigError("--workload recorded prices the steps a --bundle's tasks "
                              "trained; without one, give --iterations/--batch-size")
        measured, measured_spec = None, None
        if args.fractions_from:
            mtm = load_bundle_model(args.fractions_from, args.backbone)
            measured, measured_spec = C.measured_fractions(mtm), mtm.spec
        assumptions = _assumptions(args, measured)
        spec = _spec(args, preset)
        preset.check_spec(spec)
        from xbm.models.registry import model_defaults

        costed = {"name": args.model, "width": args.width if args.width is not None else
                  model_defaults(args.model)["width"], "what": f"--model {args.model}"}
        ctx = C.model_context(args.model, spec, width=args.width, in_channels=args.in_channels,
                              input_size=args.input_size)
        from xbm.methods import list_methods

        report = C.cost_model(ctx, methods or list_methods(), preset, assumptions)
        if measured:
            def fmt(d: dict[str, float]) -> str:
                return ", ".join(f"{m} {v:.2%}" for m, v in d.items()) or "none"

            report.notes.append(
                f"fractions measured from {args.fractions_from}: rewrite {fmt(measured[0])}; "
                f"columns off {fmt(measured[1])}; spread evenly over the layers (--bundle "
                "costs each task's real masks, layer by layer, so their inference energies "
                "differ); methods the bundle lacks keep the defaults")
            # the fractions are of crossbar columns and PEs: only the array's and the PE's
            # shape make them another chip's (bit widths leave them as they are)
            fields = ("rows", "cols", "pe_rows", "pe_cols")
            theirs = {k: getattr(measured_spec, k) for k in fields}
            mine = {k: getattr(spec, k) for k in fields}
            if theirs != mine:  # a column of R rows is another column on another array
                diff = ", ".join(f"{k} {theirs[k]} there, {mine[k]} here" for k in fields
                                 if theirs[k] != mine[k])
                report.notes.append(f"the bundle's tasks were learned on other crossbars "
                                    f"({diff}): their fractions are applied here as measured")
        if args.sensitivity:
            sens = C.sensitivity(ctx, preset, assumptions, *sens_pair)
    # a preset chosen (the default's geometry is documented), or the default with its
    # crossbars edited in a preset file (--set-energy cannot change them)
    from xbm.hardware.energy import get_preset

    if preset.name.split("+", 1)[0] != "default" or \
            (preset.spec_overrides or {}) != (get_preset("default").spec_overrides or {}):
        how = ("the bundle's crossbars are costed" if args.bundle else
               "flags given override it" if args.energy_spec else
               f"drop --preset {args.preset} and pass --energy-spec to cost at the preset's"
               if args.preset not in (None, "default") else
               "--energy-spec costs at the preset's")
        note = _geometry_not_taken(preset, report.spec, how)
        if note:
            report.notes.append(note)
    out = report.to_dict(per_layer=args.per_layer)
    if sens is not None:
        out["sensitivity"] = sens
    try:  # constants that are each finite can still multiply to infinity over a model
        json.dumps(out, allow_nan=False)
    except ValueError:
        raise XbmError("the cost figures overflow to infinity; a value is far out of range: "
                       "check the energy constants (--set-energy, --preset-file) and the "
                       "workload (--iterations, --batch-size, --backward-factor, "
                       "--churn)") from None
    written = _plots(args, out, preset, costed) if args.plot else []
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(report.table(per_layer=args.per_layer))
        if sens is not None:
            print()
            print(C.format_sensitivity(sens, *sens_pair))
    for p in written:
        print(f"wrote {p}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _plots(args: argparse.Namespace, report: dict[str, Any], preset,
           costed: dict[str, Any]) -> list[Path]:
    from xbm.report import plots

    out = Path(args.plot)
    results = Path(args.results) if args.results else (
        DEFAULT_RESULTS if DEFAULT_RESULTS.is_file() else None)
    data = plots.load_results(results) if results is not None else None  # fails before writing
    if data is not None:
        _note_results_mismatch(data, results, preset, costed)
    written = [plots.plot_energy_breakdown(report, out / "energy_breakdown.png")]
    if data is not None:
        written.append(plots.plot_accuracy_vs_mask(data, out / "accuracy_vs_mask_memory.png"))
        written.append(plots.plot_accuracy_vs_energy(data, out / "accuracy_vs_adaption_energy.png",
                                                     preset))
    return written


def _note_results_mismatch(data: dict[str, Any], path: Path, preset,
                           costed: dict[str, Any]) -> None:
    """The accuracy plots show the demo's runs as recorded in ``path``; say so on stderr where
    that is not the model (``costed``: name, width and the flag that chose it) or preset this
    command costs, rather than let the plots pass for them (``--results`` may also have been
    picked up from the default path unasked)."""
    arch = (data.get("backbone") or {}).get("arch") or {}
    if (arch.get("name"), arch.get("width")) != (costed["name"], costed["width"]):
        print(f"note: the accuracy plots show the runs of {path} ({arch.get('name', '?')} width "
              f"{arch.get('width', '?')}), not {costed['what']} ({costed['name']} width "
              f"{costed['width']})", file=sys.stderr)
    rp = data.get("energy_preset")
    if rp is not None and rp != preset.name:
        runs = [r for r in data.get("runs", []) if not r.get("base_task")]
        recorded = all(r.get("adaption_energy_j") is not None for r in runs)
        print(f"note: {path} priced its adaption energies with preset {rp!r}, not {preset.name!r}"
              + ("; the energy plot shows them as recorded and labels them so" if recorded else
                 f"; runs without a recorded energy are priced with {preset.name!r}"),
              file=sys.stderr)


def register(sub: argparse._SubParsersAction, common: Any = None, add_spec_args: Any = None
             ) -> None:
    """Add ``xbm cost`` to the ``xbm`` command (called by :func:`xbm.cli.build_parser`)."""
    from xbm.hardware.cost import Assumptions
    from xbm.hardware.energy import PRESETS

    a = Assumptions()
    p = sub.add_parser(
        "cost", help="mask memory, re-programmed cells, energy and latency per method",
        description="Hardware cost of adapting to and switching between tasks: every number is "
                    "an event count times a cited constant (docs/cost-model.md).")
    src = p.add_argument_group("what to cost")
    src.add_argument("--model", help="registered backbone, e.g. resnet50 (no weights needed)")
    src.add_argument("--bundle", help="task bundle (.safetensors): cost its learned tasks")
    src.add_argument("--backbone", help="backbone .safetensors: alone, cost its architecture "
                                        "(as --model); with --bundle/--fractions-from, their "
                                        "backbone (default: the cached one with the matching "
                                        "hash, or the file the bundle records)")
    src.add_argument("--tasks", help="with --bundle: comma list of its tasks to cost "
                     "(default: all)")
    src.add_argument("--methods", help="comma list (default: every registered method; with "
                                       "--bundle: every task)")
    src.add_argument("--width", type=int, help="backbone width (default: the model's)")
    src.add_argument("--in-channels", type=int, help="input channels (default: the model's)")
    src.add_argument("--input-size", "--image-size", type=int, dest="input_size",
                     help="image side for output positions (--image-size, as the other "
                          "commands call it, is the same flag; default: with --bundle the side "
                          "its tasks were learned at, with --backbone the side it was "
                          "pretrained at; else 224 for ImageNet layouts, 28 for the rest)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--energy",
                    help=f"energy preset: {', '.join(sorted(PRESETS))} (default: default = "
                         "neurosim)")
    hw.add_argument("--preset-file", "--energy-file", dest="preset_file",
                    help="YAML energy preset (see --dump-preset); --energy-file is the same "
                         "flag (an energy preset, as --energy names one; --preset is the "
                         "crossbar's)")
    hw.add_argument("--dump-preset", metavar="NAME", help="print a preset as editable YAML, exit")
    hw.add_argument("--set-energy", action="append", metavar="FIELD=VALUE",
                    help="override one constant, e.g. device.write_pulses_per_cell=5")
    hw.add_argument("--energy-spec", action="store_true",
                    help="take the crossbar geometry the energy preset's source assumed "
                         "(explicit --rows etc. still win)")
    hw.add_argument("--adc-bits", type=int, help="ADC resolution (default: the crossbar "
                    "preset's, 8 for default, 6 for mnsim; with --energy-spec the energy "
                    "preset's source's)")
    hw.add_argument("--dac-bits", type=int, help="input bits per wordline cycle (default 1)")
    hw.add_argument("--input-bits", type=int, help="activation precision (default 8)")
    if add_spec_args is not None:
        add_spec_args(p)
    fr = p.add_argument_group("defaults for learned values (no-weights mode)")
    fr.add_argument("--piggyback-off-fraction", type=float,
                    help="fraction of weights Piggyback masks off (re-programmed to zero); "
                         "default 0.10")
    fr.add_argument("--finetune-changed-fraction", type=float,
                    help="fraction of weights fine-tuning changes; default 1.0")
    fr.add_argument("--xbm-off-fraction", type=float,
                    help="fraction of crossbar columns XBM switches off; default 0.10")
    fr.add_argument("--fraction", action="append", metavar="METHOD=F",
                    help="rewrite fraction of any method (repeatable)")
    fr.add_argument("--off-fraction", action="append", metavar="METHOD=F",
                    help="switched-off column fraction of any method (repeatable)")
    fr.add_argument("--fractions-from", metavar="BUNDLE",
                    help="measure both fractions per method from a bundle's tasks")
    wl = p.add_argument_group("on-chip adaption workload")
    wl.add_argument("--iterations", type=int,
                    help=f"training iterations (default {a.iterations}: 30 epochs of Flowers-102 "
                         "at batch 32)")
    wl.add_argument("--batch-size", type=int,
                    help=f"images per iteration (default {a.batch_size})")
    wl.add_argument("--workload", choices=["protocol", "recorded"], default="protocol",
                    help="with --bundle, the on-chip adaption priced: protocol (default: "
                    "--iterations x --batch-size for every task, the papers' 30 epochs of "
                    "Flowers-102 unless given) or recorded (each task's own steps and batch "
                    "as `xbm adapt` recorded them)")
    wl.add_argument("--backward-factor", type=float, default=a.backward_factor,
                    help="crossbar passes per backward step (default 1: one transposed read)")
    wl.add_argument("--churn", type=float, default=a.churn,
                    help="mask flips per finally-masked weight during on-chip training "
                         "(default 1, a lower bound)")
    wl.add_argument("--training-skips-off-columns", action="store_true",
                    help="let on-chip training skip the conversions of switched-off columns "
                         "as inference does (an earlier accounting; by default "
                         "training converts every column: a column's score gradient needs its "
                         "partial sum)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the full report as JSON")
    out.add_argument("--per-layer", action="store_true", help="add per-layer tables")
    out.add_argument("--sensitivity", action="store_true",
                     help="sweep the uncertain constants: the saving of --methods "
                          "METHOD,BASELINE when two are named (else xbm over piggyback)")
    out.add_argument("--plot", metavar="DIR", help="write PNG plots (needs matplotlib)")
    out.add_argument("--results", help=f"demo results.json for accuracy plots (default "
                                       f"{DEFAULT_RESULTS} if it exists)")
    p.set_defaults(func=cmd_cost)


__all__ = ["cmd_cost", "load_bundle_model", "register"]
