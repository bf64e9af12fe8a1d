"""Ablations of XMA (how many shift levels) and XMA2 (how many PEs to re-program).

On the demo benchmark's backbone (the cached ``xbm demo`` ResNet-18, pretrained on Fashion-MNIST)
and the demo's subset sizes, one multi-task model per configuration learns the chosen new tasks in
sequence, as ``xbm demo`` does:

* XBM and Piggyback: the references for "XMA >= XBM and >= Piggyback" and for mask memory.
* XMA with 2, 3, 5 and 7 levels: {0, 1} (XBM-like), {0, 1/2, 1}, {0, 1/8, 1/4, 1/2, 1} (the
  default) and {0, 1/32, ..., 1/2, 1}; and {0, 1/4, 1/2, 1, 2}, 5 levels with an up-shift.
* XMA2 at PE budgets 0, 5, 10 and 25% (default levels); budget 0 must reproduce XMA exactly.
* Optionally (``--random-control``) XMA2 at 10% with a random PE ranking (same warm-up and
  schedule): does the gradient rule matter? And (``--lr-sweep``) the learning rates behind the
  defaults: XMA's score lr and XMA2's re-programmed-weight lr.

For every run it records accuracy, mask bits, re-programmed cells, the cost model's deploy
(re-programming + mask write) energy, and for XMA2 the chip measurements: the accuracy the first
task would have on a chip that never restores the PEs later tasks rewrote, and the cells a switch
between the first two tasks rewrites. Writes ``ablation_xma.json`` and ``ablation_xma.png``
(atomically) to ``--out``; finished runs are kept in ``ablation_xma.partial.json`` so that
``--resume`` continues an interrupted call.

    .venv/bin/python benchmarks/ablation_xma.py --out runs/ablation_xma --random-control --lr-sweep

By default the runs learn the demo's three new tasks (MNIST, Animal-MNIST, letters; before
session 29 the default was the first two). On 2 quiet CPU cores, at today's two (bf16) epochs,
10 runs over the three tasks took 578 s (plus ~2 minutes the first time, to pretrain the
backbone into the cache); the 11 default runs over two tasks took about 5 minutes at one fp32
epoch, 8 with both options. Shared cores make it several times slower.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from xbm.config import positive_int, seed_arg
from xbm.data import get_benchmark, load_dataset
from xbm.errors import XbmError
from xbm.hardware.cost import task_costs
from xbm.io import atomic_path, write_json_atomic
from xbm.methods.xma import XMAConfig
from xbm.methods.xma2 import ENERGY_RANKS, chip_without_restore
from xbm.multitask import MultiTaskModel
from xbm.train.demo import DemoConfig
from xbm.train.loop import evaluate_task, resolve_device, seed_everything, train_task
from xbm.train.pretrain import get_backbone

LEVEL_SETS: dict[str, list[float]] = {
    "2": [0, 1],
    "3": [0, 0.5, 1],
    "5": [0, 0.125, 0.25, 0.5, 1],
    "7": [0, 1 / 32, 1 / 16, 0.125, 0.25, 0.5, 1],
    "5up": [0, 0.25, 0.5, 1, 2],
}
"""Down-shift-only ladders of 2, 3, 5 (the default) and 7 levels, and one with an up-shift."""
BUDGETS = [0.0, 0.05, 0.10, 0.25]
LR_SWEEP = [0.1, 1.0, 3.0]
"""``--lr-sweep``: XMA score learning rates around the default 0.3 (default levels)."""
WEIGHT_LR_SWEEP = [1e-3, 2e-2]
"""``--lr-sweep``: XMA2 re-programmed-weight learning rates around the default 5e-3 (10%)."""


def _task_cost(mtm: MultiTaskModel, task: str) -> dict[str, float]:
    """Deploy energy (re-programming + mask write) from the cost model's default preset."""
    c = task_costs(mtm, task, "default")
    return {"adaption_energy_j": c["adaption_energy_j"]}


def switch_cells(mtm: MultiTaskModel, from_task: str, to_task: str) -> int:
    """Cells a restoring chip rewrites to switch tasks (the cost model's count)."""
    return task_costs(mtm, to_task, "default", reference=from_task)["switch_reprogrammed_cells"]


def run(label: str, method: str, config: dict[str, Any], backbone, bmeta, spec, tasks, args,
        device: torch.device, log=print) -> dict[str, Any]:
    """One multi-task model learning ``tasks`` in sequence with one method configuration."""
    t0 = time.perf_counter()
    seed_everything(args.seed)
    mtm = MultiTaskModel(copy.deepcopy(backbone), spec, arch=bmeta["arch"]).to(device)
    before = {k: v.clone() for k, v in mtm.backbone_state().items()}
    loaders = {d.name: d.loaders(args.batch_size, seed=args.seed) for d in tasks}
    out: dict[str, Any] = {"label": label, "method": method, "config": config, "tasks": {}}
    for d in tasks:
        m = mtm.add_task(d.name, d.num_classes, method, config, dataset=d.name)
        tr = train_task(mtm, d.name, loaders[d.name][0], args.epochs, device, progress=False,
                        precision=args.precision)
        acc = evaluate_task(mtm, d.name, loaders[d.name][1], device)
        rec: dict[str, Any] = {
            "accuracy": round(acc, 4),
            "mask_bits": mtm.mask_bits(d.name),
            "reprogrammed_cells": mtm.reprogrammed_cells(d.name),
            "masked_off_columns": mtm.masked_off_columns(d.name),
            "train_seconds": round(tr.train_seconds, 2),
            "steps": tr.steps,
        }
        rec.update(_task_cost(mtm, d.name))
        states = list(mtm.layer_states(d.name))
        if hasattr(m, "level_histogram"):
            hist: dict[float, int] = {}
            for _, layer, st in states:
                for k, v in m.level_histogram(layer, st).items():
                    hist[k] = hist.get(k, 0) + v
            rec["level_histogram"] = {str(k): v for k, v in hist.items()}
        if hasattr(m, "selected_pes"):
            rec["selected_pes"] = sum(m.selected_pes(la, st) for _, la, st in states)
            rec["total_pes"] = sum(st.pe_mask.numel() for _, _, st in states)
        out["tasks"][d.name] = rec
        log(f"  {label:<16} {d.name:<13} acc {acc:6.2f}%  reprog {rec['reprogrammed_cells']:>9,}"
            f"  ({tr.train_seconds:.0f}s)")
    # every task once more, after the last one was learned
    for d in tasks:
        again = evaluate_task(mtm, d.name, loaders[d.name][1], device)
        out["tasks"][d.name]["accuracy_after_all"] = round(again, 4)
    after = mtm.backbone_state()
    out["backbone_bit_identical"] = all(torch.equal(before[k], after[k]) for k in before)
    names = [d.name for d in tasks]
    if method == "xma2" and len(names) >= 2 and mtm.reprogrammed_cells(names[0]) > 0:
        first = names[0]
        with chip_without_restore(mtm, names):
            no_restore = evaluate_task(mtm, first, loaders[first][1], device)
        out["chip"] = {
            "first_task": first,
            "accuracy_own_view": out["tasks"][first]["accuracy_after_all"],
            "accuracy_no_restore": round(no_restore, 4),
            "switch_cells_first_to_second": switch_cells(mtm, first, names[1]),
            "switch_cells_second_to_first": switch_cells(mtm, names[1], first),
        }
        log(f"  {label:<16} chip without restore: {first} {no_restore:.2f}% (own view "
            f"{out['chip']['accuracy_own_view']:.2f}%), switch cells "
            f"{out['chip']['switch_cells_first_to_second']:,}")
    recs = out["tasks"].values()
    out["mean_accuracy"] = round(sum(r["accuracy"] for r in recs) / len(tasks), 4)
    for k in ("mask_bits", "reprogrammed_cells", "masked_off_columns", "train_seconds",
              "adaption_energy_j"):
        if all(k in r for r in recs):
            out[k] = sum(r[k] for r in recs)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    """Two panels: XMA accuracy vs levels; XMA2 accuracy vs re-programming energy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["label"]: r for r in results["runs"]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    lv = [(int(n), runs[f"xma-{n}"]) for n in LEVEL_SETS if n.isdigit() and f"xma-{n}" in runs]
    if lv:
        ax1.plot([n for n, _ in lv], [r["mean_accuracy"] for _, r in lv], "o-", color="C0",
                 label="XMA, right shifts only")
        for n, r in lv:
            bits = math.ceil(math.log2(n))
            ax1.annotate(f"{bits} bit{'s' if bits > 1 else ''}/col", (n, r["mean_accuracy"]),
                         textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        if "xma-5up" in runs:
            ax1.plot([5], [runs["xma-5up"]["mean_accuracy"]], "^", color="C5",
                     label="XMA {0, 1/4, 1/2, 1, 2}")
        for name, color in (("xbm", "C1"), ("piggyback", "C2")):
            if name in runs:
                ax1.axhline(runs[name]["mean_accuracy"], ls="--", color=color, label=name.upper()
                            if name == "xbm" else "Piggyback")
        ax1.set_xticks([n for n, _ in lv])
        ax1.margins(y=0.12)
        ax1.set_xlabel("number of shift levels (incl. 0)")
        ax1.set_ylabel("mean new-task accuracy (%)")
        ax1.set_title("XMA: shift levels")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
    else:
        ax1.set_visible(False)  # no level runs (--levels ""): no empty axes
    bud = [(b, runs[f"xma2-{b:g}"]) for b in BUDGETS if f"xma2-{b:g}" in runs]
    xma2 = [r for label, r in runs.items() if label.startswith("xma2-")]
    if xma2:  # PE budgets, energy budgets or the random control: any of them alone too
        key = "adaption_energy_j" if all("adaption_energy_j" in r for r in xma2) \
            else "reprogrammed_cells"
        scale, unit = (1e6, "µJ") if key == "adaption_energy_j" else (1e-6, "M cells")
        if bud:
            xs = [r[key] * scale for _, r in bud]
            ys = [r["mean_accuracy"] for _, r in bud]
            ax2.plot(xs, ys, "o-", color="C3", label="XMA2 (grad PE rule)")
            for i, ((b, _), x, y) in enumerate(zip(bud, xs, ys, strict=True)):
                # alternate above and below: neighbouring budgets' labels no longer overprint
                ax2.annotate(f"{b:.0%}", (x, y), textcoords="offset points",
                             xytext=(4, -12 if i % 2 == 0 else 6), fontsize=8)
        for suffix, color, what in (("uJ", "C6", "score order"),
                                    ("uJ-density", "C8", "score-per-cell order")):
            eb = sorted(((r["config"]["energy_budget_j"], r) for label, r in runs.items()
                         if label.startswith("xma2-E") and label.endswith(suffix) and key in r),
                        key=lambda t: t[0])
            if eb:
                ax2.plot([r[key] * scale for _, r in eb], [r["mean_accuracy"] for _, r in eb],
                         "D", color=color, label=f"XMA2, energy budget per task ({what})")
        if "xma2-random-0.1" in runs and key in runs["xma2-random-0.1"]:
            r = runs["xma2-random-0.1"]
            ax2.plot([r[key] * scale], [r["mean_accuracy"]], "x", color="C4", ms=9,
                     label="XMA2 10%, random PEs")
        if "xma-5" in runs:
            ax2.axhline(runs["xma-5"]["mean_accuracy"], ls=":", color="C0", label="XMA (5 levels)")
        if "piggyback" in runs and key in runs["piggyback"]:
            r = runs["piggyback"]
            ax2.plot([r[key] * scale], [r["mean_accuracy"]], "s", color="C2", label="Piggyback")
        ax2.set_xlabel(("deploy energy: re-programming + mask write" if key ==
                        "adaption_energy_j" else "re-programmed cells") + f" ({unit}, summed "
                       "over tasks)")
        ax2.set_ylabel("mean new-task accuracy (%)")
        ax2.set_title("XMA2: PE and energy budgets")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    else:
        ax2.set_visible(False)
    tasks = ", ".join(results["tasks"])
    arch = results["backbone"]["arch"]
    fig.suptitle(f"{arch['name']} width {arch.get('width')} on {results['backbone']['dataset']} "
                 f"-> {tasks}; {results['config']['epochs']} epoch(s), "
                 f"{results['config']['train_subset']} train images per task, seed "
                 f"{results['config'].get('seed')}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


#: Flags that choose which runs there are (not how each runs): --resume keeps the finished
#: runs of a call that had other ones.
_PLAN_FLAGS = ("levels", "budgets", "energy_budgets", "energy_rank", "no_baselines",
               "lr_sweep", "random_control")


def _floats(p: argparse.ArgumentParser, text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag}: {text!r} is not a comma list of numbers")


def _plan(p: argparse.ArgumentParser, args: argparse.Namespace, ranks: list[str]
          ) -> tuple[list[tuple[str, str, dict[str, Any]]], list[str]]:
    """The runs and the task names, every value checked (each run's config as its method
    checks it, the tasks by name, --out writable), before the backbone: a bad --budgets used
    to fail after the backbone and the runs before it, at the defaults minutes in."""
    from xbm.data.registry import image_folder_path, list_datasets
    from xbm.errors import XbmError
    from xbm.io import check_output
    from xbm.methods import get_method_class

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        p.error("--tasks is empty; name the new tasks, e.g. mnist,animal-mnist")
    if len(set(names)) != len(names):
        p.error(f"--tasks {args.tasks!r} names a task twice; give each once")
    for n in names:
        if image_folder_path(n) is None and n not in list_datasets():
            p.error(f"--tasks: unknown dataset {n!r}; choose from {', '.join(list_datasets())} "
                    "or folder:PATH")
    plan: list[tuple[str, str, dict[str, Any]]] = []
    if not args.no_baselines:
        plan += [("xbm", "xbm", {}), ("piggyback", "piggyback", {})]
    for n in (x.strip() for x in args.levels.split(",") if x.strip()):
        if n not in LEVEL_SETS:
            p.error(f"--levels: unknown set {n!r}; choose from {', '.join(LEVEL_SETS)}")
        plan.append((f"xma-{n}", "xma", {"levels": LEVEL_SETS[n]}))
    for b in _floats(p, args.budgets, "--budgets"):
        # at budget 0 XMA2 is XMA, so it runs with XMA's score lr (XMA2's own default is tuned
        # for training beside re-programmed PEs); xma2_budget0_equals_xma then checks identity
        plan.append((f"xma2-{b:g}", "xma2",
                     {"pe_budget": b, **({"lr": XMAConfig().lr} if b == 0 else {})}))
    for e in _floats(p, args.energy_budgets, "--energy-budgets"):
        for r in ranks:
            suffix = "" if r == "score" else "-density"
            plan.append((f"xma2-E{e:g}uJ{suffix}", "xma2",
                         {"pe_budget": 1.0, "energy_budget_j": e * 1e-6, "energy_rank": r}))
    if args.lr_sweep:
        plan += [(f"xma-5-lr{lr:g}", "xma", {"lr": lr}) for lr in LR_SWEEP]
        plan += [(f"xma2-0.1-wlr{w:g}", "xma2", {"pe_budget": 0.1, "weight_lr": w})
                 for w in WEIGHT_LR_SWEEP]
    if args.random_control:
        plan.append(("xma2-random-0.1", "xma2", {"pe_budget": 0.1, "pe_score": "random"}))
    if not plan:
        p.error("nothing to run: --no-baselines with empty --levels and --budgets")
    labels = [label for label, _, _ in plan]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        p.error(f"{', '.join(twice)} would run twice (a value repeated in --levels, --budgets, "
                "--energy-budgets or --energy-rank); give each once")
    for label, method, cfg in plan:
        try:
            get_method_class(method).config_class.from_dict(cfg)
        except XbmError as exc:
            p.error(f"run {label}: {exc}")
    try:
        check_output(args.out, "dir", "--out")
    except XbmError as exc:
        p.error(str(exc))
    return plan, names


def main(argv: list[str] | None = None) -> int:
    d = DemoConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/ablation_xma",
                   help="folder for ablation_xma.json, .png and the progress file "
                   "(default %(default)s)")
    p.add_argument("--tasks", default=",".join(get_benchmark(d.benchmark).tasks),
                   help="comma list of new tasks (default: the demo's, %(default)s; figures "
                   "recorded before session 29 without --tasks ran mnist,animal-mnist)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs,
                   help="adaption epochs per task (as xbm demo; default %(default)s)")
    p.add_argument("--train-subset", type=positive_int, default=d.train_subset,
                   help="training images per task (as xbm demo; default %(default)s)")
    p.add_argument("--test-subset", type=positive_int, default=d.test_subset,
                   help="test images per task (as xbm demo; default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="adaption batch size (as xbm demo; default %(default)s)")
    p.add_argument("--levels", default="2,3,5,7,5up",
                   help=f"XMA level sets to run, from {', '.join(LEVEL_SETS)}")
    p.add_argument("--budgets", default="0,0.05,0.1,0.25", help="XMA2 PE budgets to run")
    p.add_argument("--energy-budgets", default="",
                   help="XMA2 re-programming energy budgets per task in µJ (comma list; "
                        "pe_budget 1.0, so energy alone limits the PEs)")
    p.add_argument("--energy-rank", default="score",
                   help="walk order(s) under an energy budget: score, density or both "
                        "(comma list)")
    p.add_argument("--no-baselines", action="store_true", help="skip XBM and Piggyback")
    p.add_argument("--lr-sweep", action="store_true",
                   help="also XMA at score lr " + ", ".join(f"{v:g}" for v in LR_SWEEP)
                   + " and XMA2 10%% at weight lr "
                   + ", ".join(f"{v:g}" for v in WEIGHT_LR_SWEEP))
    p.add_argument("--random-control", action="store_true",
                   help="also XMA2 at 10%% with a random PE ranking")
    p.add_argument("--width", type=positive_int, default=d.width,
                   help="backbone width (as xbm demo; default: the device's, 16 on CPU)")
    p.add_argument("--pretrain-subset", type=positive_int, default=d.pretrain_subset,
                   help="the backbone's pretraining images (as xbm demo; default: all)")
    p.add_argument("--pretrain-seed", type=seed_arg, default=d.pretrain_seed,
                   help="the backbone's seed (as xbm demo; default: --seed)")
    p.add_argument("--pretrain-epochs", type=positive_int, default=d.pretrain_epochs,
                   help="the backbone's pretraining epochs (as xbm demo)")
    p.add_argument("--pretrain-augment", default=d.pretrain_augment,
                   help="the backbone's pretraining augmentation (as xbm demo)")
    p.add_argument("--pretrain-mixup", type=float, default=d.pretrain_mixup,
                   help="the backbone's pretraining mixup alpha (as xbm demo)")
    p.add_argument("--pretrain-precision", default=d.pretrain_precision,
                   choices=["auto", "fp32", "bf16"],
                   help="the backbone's pretraining precision (as xbm demo; auto = bf16 on CPUs "
                   "with native bf16 units)")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="adaption precision (as xbm demo; auto = bf16 autocast on CPUs with "
                   "native bf16 units)")
    p.add_argument("--seed", type=seed_arg, default=d.seed,
                   help="adaption and data seed (as xbm demo; default %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present), cpu or cuda:N")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs of an interrupted call with the same shared "
                   "options (the runs themselves may differ: each is matched by label and config)")
    p.add_argument("--data-root",
                   help="folder with the datasets' files (default: the installed packages)")
    args = p.parse_args(argv)
    ranks = [r.strip() for r in args.energy_rank.split(",") if r.strip()]
    for r in ranks:
        if r not in ENERGY_RANKS:
            p.error(f"--energy-rank: unknown order {r!r}; choose from {', '.join(ENERGY_RANKS)}")

    plan, names = _plan(p, args, ranks)  # all checked before minutes of pretraining
    t0 = time.perf_counter()
    try:  # a bad device, recipe value or data root: one line, before any pretraining
        device = resolve_device(args.device)
        spec = d.spec()
        d = dataclasses.replace(d, seed=args.seed, width=args.width,
                                pretrain_subset=args.pretrain_subset,
                                pretrain_seed=args.pretrain_seed,
                                pretrain_epochs=args.pretrain_epochs,
                                pretrain_augment=args.pretrain_augment,
                                pretrain_mixup=args.pretrain_mixup,
                                pretrain_precision=args.pretrain_precision,
                                precision=args.precision)
        pcfg = d.pretrain_config(device)
        tasks = [load_dataset(n, root=args.data_root).subset(
            args.train_subset, args.test_subset, seed=args.seed) for n in names]
    except XbmError as exc:
        p.error(str(exc))
    args.precision = d.precision_for(device)  # resolved, so run() and the resume key agree
    args.pretrain_precision = pcfg.precision  # resolved too (auto is bf16 or fp32 by CPU)
    backbone, bmeta, bpath = get_backbone(pcfg, device, root=args.data_root, progress=False)
    print(f"backbone {bpath.name} ({bmeta['accuracy']:.2f}% on {bmeta['dataset']}); "
          f"{len(plan)} runs x {len(tasks)} task(s) on {device}")
    out = Path(args.out)
    partial = out / "ablation_xma.partial.json"
    # what every run shares; which runs there are (the plan flags) may change between calls,
    # runs being matched by label and config
    key = {k: v for k, v in vars(args).items() if k not in ("out", "resume", *_PLAN_FLAGS)}
    done: dict[str, Any] = {}
    if args.resume and partial.is_file():
        saved = json.loads(partial.read_text())
        old_key = {k: v for k, v in (saved.get("key") or {}).items() if k not in _PLAN_FLAGS}
        if old_key == key and saved.get("backbone") == bmeta["content_hash"]:
            done = {r["label"]: r for r in saved["runs"]}
            print(f"resuming: {len(done)} run(s) from {partial}")
        else:
            diff = sorted(k for k in set(key) | set(old_key) if key.get(k) != old_key.get(k))
            why = f"other {', '.join(diff)}" if diff else "another backbone"
            print(f"--resume: {partial} was run with {why}; running every run again")
    runs = []
    for label, method, cfg in plan:
        if label in done and done[label]["config"] == cfg:
            runs.append(done[label])
            continue
        runs.append(run(label, method, cfg, backbone, bmeta, spec, tasks, args, device))
        # the finished runs of an earlier plan are kept too, for a later --resume of it
        planned = {r["label"] for r in runs}
        kept = [r for lbl, r in done.items() if lbl not in planned]
        write_json_atomic(partial, {"key": key, "backbone": bmeta["content_hash"],
                                    "runs": runs + kept})
    by = {r["label"]: r for r in runs}
    derived: dict[str, Any] = {}
    pb = by.get("piggyback")
    for label, r in by.items():
        if pb and label != "piggyback":
            derived[label] = {
                "mask_memory_vs_piggyback": round(r["mask_bits"] / pb["mask_bits"], 6),
                "mask_memory_saving_vs_piggyback": round(1 - r["mask_bits"] / pb["mask_bits"], 6),
                "accuracy_minus_piggyback": round(r["mean_accuracy"] - pb["mean_accuracy"], 4),
            }
    if "xma-5" in by and "xma2-0" in by:
        derived["xma2_budget0_equals_xma"] = all(
            by["xma-5"]["tasks"][t]["accuracy"] == by["xma2-0"]["tasks"][t]["accuracy"]
            for t in names)
    results = {
        "schema": "xbm-ablation-xma/1",
        "command": "benchmarks/ablation_xma.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]),
        "config": vars(args),
        "spec": spec.to_dict(),
        "backbone": {k: bmeta[k] for k in ("arch", "dataset", "accuracy", "content_hash")},
        "tasks": names,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "derived": derived,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "run_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
    }
    write_json_atomic(out / "ablation_xma.json", results)
    plot(results, out / "ablation_xma.png")
    print()
    lw = max([16, *(len(r["label"]) for r in runs)])  # labels in full, columns aligned
    print(f"{'run':<{lw}} {'mean acc':>8} {'mask bits':>10} {'vs PB':>7} {'reprog cells':>12} "
          f"{'deploy J':>10}")
    for r in runs:
        vs = derived.get(r["label"], {}).get("mask_memory_vs_piggyback")
        print(f"{r['label']:<{lw}} {r['mean_accuracy']:>8.2f} {r['mask_bits']:>10,} "
              f"{(f'{vs:.2%}' if vs is not None else '-'):>7} {r['reprogrammed_cells']:>12,} "
              f"{r.get('adaption_energy_j', float('nan')):>10.3e}")
    print(f"\nwrote {out / 'ablation_xma.json'} and {out / 'ablation_xma.png'} "
          f"({results['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
