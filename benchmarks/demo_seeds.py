"""The demo over several seeds, and the table of how far each method is from a reference.

Issue 2 asks whether XBM's mean new-task accuracy is within 2 points of Piggyback's, issue 5
whether XMA's is at least Piggyback's and XBM's. One seed cannot answer either: at the CPU
default a single task moves by about a point between seeds. This script runs ``xbm demo`` (the
same ``run_demo``, the same defaults) once per seed into ``OUT/seed<S>/``, skipping seeds whose
``results.json`` is already there (so an interrupted call resumes), and then tabulates every
method's mean new-task accuracy per seed with its gap to ``--ref``: mean, sample standard
deviation, smallest and largest gap, and on how many seeds the gap is at least ``-within``.

    .venv/bin/python benchmarks/demo_seeds.py --out runs/seeds --seeds 0-2 \\
        --methods piggyback,xbm,xma

``--pretrain-seed 0`` adapts the one seed-0 backbone under every seed (the spread of the
adaption alone: subsets, batch order); without it each seed pretrains its own backbone, as
``xbm demo --seed S`` does (the spread of backbone and adaption together).
``--summarize PATH ...`` only tabulates ``results.json`` files (or folders holding one) that
exist already, e.g. demos run by hand. Results whose configurations differ in anything but the
seed are refused (naming the fields), since their gaps would not be comparable (a field that
only the newer of two files records, such as ``cuda_graph``, is not counted as a difference).

Writes ``OUT/seeds.json`` and ``OUT/seeds.md`` atomically and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from xbm.errors import XbmError
from xbm.io import check_output, write_json_atomic, write_text_atomic
from xbm.methods import get_method_class

# config fields that may differ between the runs of one table: the seeds, and which methods ran
# (a method's statistics cover the seeds that ran it)
VARYING = {"seed", "pretrain_seed", "methods"}


def parse_seeds(text: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]`` (seeds are integers >= 0)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi or lo)
            if a < 0 or b < a:
                raise ValueError
        except ValueError:
            raise XbmError(f"--seeds: cannot read {part!r}; give seeds >= 0 as 0,1,2 or 0-6"
                           ) from None
        seeds.extend(range(a, b + 1))
    if len(set(seeds)) != len(seeds):
        raise XbmError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def load_results(path: str | Path) -> dict[str, Any]:
    """A demo's ``results.json`` (``path`` is the file or a folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise XbmError(f"{p} does not exist; pass a demo's results.json or its --out folder")
    try:
        res = json.loads(p.read_text())
        res["summary"], res["config"], res["checks"]  # noqa: B018 - the keys the table needs
    except (json.JSONDecodeError, KeyError, TypeError):
        raise XbmError(f"{p} is not a demo results.json (no summary/config/checks); "
                       "pass the file `xbm demo` wrote") from None
    res["_path"] = str(p)
    return res


def _backbone_seed(res: dict[str, Any]) -> int:
    """The seed the run's backbone was pretrained with (``pretrain_seed``, else ``seed``)."""
    ps = res["config"].get("pretrain_seed")
    return res["config"]["seed"] if ps is None else ps


def kept_run_mismatch(res: dict[str, Any], cfg: Any) -> list[str]:
    """The fields in which a kept ``results.json`` differs from the run ``cfg`` asks for.

    ``results.json`` records resolved values (width 16, precision bf16, ...) where ``cfg`` may
    hold ``None`` or ``"auto"``; those are not compared, nor fields the older file lacks. The
    backbone is compared by the seed it was pretrained with."""
    import dataclasses

    kept = res["config"]
    diff = [k for k, v in dataclasses.asdict(cfg).items()
            if k not in ("seed", "pretrain_seed") and k in kept and v is not None
            and v != "auto" and kept[k] != v]
    want = cfg.seed if cfg.pretrain_seed is None else cfg.pretrain_seed
    if _backbone_seed(res) != want:
        diff.append(f"backbone seed ({_backbone_seed(res)}, asked {want})")
    return diff


def _same(field: str, a: Any, b: Any) -> bool:
    """Two results' values of a config field as the same run. The device by its type: results
    before session 30 record it as given (``auto``), later ones resolved (``cpu``, ``cuda``;
    ``cuda:0`` under torchrun)."""
    if field == "device":
        if a in (None, "auto") or b in (None, "auto"):
            return True
        return str(a).split(":")[0] == str(b).split(":")[0]
    return a == b


def summarize(results: list[dict[str, Any]], ref: str = "piggyback", within: float = 2.0
              ) -> dict[str, Any]:
    """Per seed each method's mean new-task accuracy and its gap to ``ref``; the gaps' mean,
    sample standard deviation, minimum, maximum and the number of seeds with gap >= -within.

    Raises:
        XbmError: no results; the results' configurations differ beyond the seeds; a seed
            appears twice; ``ref`` was not run in every result.
    """
    if not results:
        raise XbmError("no results to summarize")
    first = results[0]["config"]
    for r in results[1:]:
        # a field only one side has is newer than the other results.json, not a difference
        diff = sorted(k for k in set(first) & set(r["config"])
                      if k not in VARYING and not _same(k, first[k], r["config"][k]))
        if diff:
            raise XbmError(f"{r['_path']} differs from {results[0]['_path']} in "
                           f"{', '.join(diff)}; summarize runs that differ only in the seed")
    keys = [(r["config"]["seed"], _backbone_seed(r)) for r in results]
    if len(set(keys)) != len(keys):
        raise XbmError("two results have the same seed and backbone seed; pass each run once")
    methods = list(dict.fromkeys(m for r in results for m in r["summary"]))
    if any(ref not in r["summary"] for r in results):
        raise XbmError(f"--ref {ref} was not run in every result; pick one of: "
                       f"{', '.join(methods)}")
    rows = []
    for r in sorted(results, key=lambda r: r["config"]["seed"]):
        acc = {m: s["mean_new_task_accuracy"] for m, s in r["summary"].items()}
        rows.append({
            "seed": r["config"]["seed"],
            "pretrain_seed": r["config"].get("pretrain_seed"),
            "backbone_hash": r.get("backbone", {}).get("content_hash"),
            "base_accuracy": r.get("backbone", {}).get("accuracy"),
            "accuracy": acc,
            "per_task": {m: s["new_task_accuracies"] for m, s in r["summary"].items()},
            "gap": {m: round(a - acc[ref], 4) for m, a in acc.items() if m != ref},
            "checks": all(all(c.values()) for c in r["checks"].values()),
            "path": r["_path"],
        })
    stats: dict[str, Any] = {}
    for m in methods:
        accs = [row["accuracy"][m] for row in rows if m in row["accuracy"]]
        st: dict[str, Any] = {"seeds": len(accs), "mean": round(statistics.fmean(accs), 4),
                              "std": round(statistics.stdev(accs), 4) if len(accs) > 1 else None}
        if m != ref:
            gaps = [row["gap"][m] for row in rows if m in row["gap"]]
            st["gap"] = {
                "mean": round(statistics.fmean(gaps), 4),
                "std": round(statistics.stdev(gaps), 4) if len(gaps) > 1 else None,
                "min": min(gaps), "max": max(gaps),
                "within": sum(g >= -within for g in gaps),
                "at_least_ref": sum(g >= 0 for g in gaps),
            }
        stats[m] = st
    return {"ref": ref, "within": within, "methods": methods, "rows": rows, "stats": stats,
            "config": {k: v for k, v in first.items() if k not in VARYING}}


def _fmt(x: float | None, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def to_markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (a row per seed, then mean, std, min and within)."""
    ref, methods = summary["ref"], summary["methods"]
    others = [m for m in methods if m != ref]
    head = ["seed", "backbone"] + methods + [f"{m} − {ref}" for m in others] + ["checks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        bb = row["seed"] if row["pretrain_seed"] is None else row["pretrain_seed"]
        cells = [str(row["seed"]), f"seed {bb}"]
        cells += [_fmt(row["accuracy"].get(m)) for m in methods]
        cells += [_fmt(row["gap"].get(m), sign=True) for m in others]
        cells.append("all true" if row["checks"] else "**FALSE**")
        lines.append("| " + " | ".join(cells) + " |")
    st = summary["stats"]

    def row(first: str, per_method: list[str], per_gap: list[str]) -> None:
        # one cell per column whatever the method count: a reference-only run has no gap
        # columns, and the rows once kept their separators anyway
        lines.append("| " + " | ".join([first, "", *per_method, *per_gap, ""]) + " |")

    row("**mean**", [f"**{_fmt(st[m]['mean'])}**" for m in methods],
        [f"**{_fmt(st[m]['gap']['mean'], True)}**" for m in others])
    row("std", [_fmt(st[m]["std"]) for m in methods], [_fmt(st[m]["gap"]["std"]) for m in others])
    if others:  # rows about gaps, of which a reference-only run has none
        blank = [""] * len(methods)
        row("smallest gap", blank, [_fmt(st[m]["gap"]["min"], True) for m in others])
        row(f"gap ≥ −{summary['within']:g}", blank,
            [f"{st[m]['gap']['within']} of {st[m]['seeds']}" for m in others])
        row("gap ≥ 0", blank, [f"{st[m]['gap']['at_least_ref']} of {st[m]['seeds']}"
                               for m in others])
    return "\n".join(lines) + "\n"


def run_seeds(out: Path, seeds: list[int], fields: dict[str, Any], log=print,
              ref: str | None = None) -> list[Path]:
    """Run the demo for every seed not yet in ``out``; the results.json paths, in seed order.
    ``ref``, the method the gaps are measured from, must be among the methods run: that is
    checked before any demo runs, not after all of them."""
    from xbm.train.demo import DemoConfig, run_demo

    cfgs = {s: DemoConfig.from_dict(fields | {"seed": s}) for s in seeds}  # all checked first
    if ref is not None and seeds and ref not in cfgs[seeds[0]].methods:
        raise XbmError(f"--ref {ref} is not among the methods run "
                       f"({', '.join(cfgs[seeds[0]].methods)}); add it to --methods or pick "
                       "one of them")
    for s in seeds:  # a kept run must be the run asked for, or the table would mix recipes
        kept = out / f"seed{s}" / "results.json"
        if kept.is_file():
            diff = kept_run_mismatch(load_results(kept), cfgs[s])
            if diff:
                raise XbmError(f"{kept} was run with another {', '.join(diff)}; pass another "
                               "--out, or remove it to run it again")
    paths = []
    for s in seeds:
        d = out / f"seed{s}"
        if (d / "results.json").is_file():
            log(f"seed {s}: {d / 'results.json'} exists, kept")
        else:
            t0 = time.perf_counter()
            log(f"seed {s}: running the demo into {d}")
            run_demo(cfgs[s], d, progress=False, log=lambda *a: None)
            log(f"seed {s}: done in {time.perf_counter() - t0:.0f} s")
        paths.append(d / "results.json")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder: OUT/seed<S>/results.json per seed, OUT/seeds.{json,md}")
    ap.add_argument("--seeds", help="e.g. 0,1,2 or 0-6 (default 0-2)")
    ap.add_argument("--pretrain-seed", type=int,
                    help="adapt this seed's backbone under every seed (default: each its own)")
    ap.add_argument("--methods", help="comma list (default: the demo's)")
    ap.add_argument("--config", help="YAML file of demo fields, as `xbm demo --config`")
    ap.add_argument("--ref", default="piggyback", help="the method gaps are measured from")
    ap.add_argument("--within", type=float, default=2.0,
                    help="count the seeds with gap >= -WITHIN (default %(default)s: issue 2)")
    ap.add_argument("--summarize", nargs="+", metavar="PATH",
                    help="only tabulate existing results.json files or demo --out folders")
    args = ap.parse_args(argv)
    if not math.isfinite(args.within) or args.within < 0:
        ap.error(f"--within must be a finite number of points >= 0, got {args.within}")
    try:
        if args.out:  # before any run: the summary is written there at the end
            check_output(args.out, "dir", "--out")
        if args.methods:
            for m in (x.strip() for x in args.methods.split(",") if x.strip()):
                get_method_class(m)  # an unknown name, before "--ref is not among them"
        if args.summarize:
            ignored = [f for f, v in (("--pretrain-seed", args.pretrain_seed),
                                      ("--methods", args.methods), ("--config", args.config),
                                      ("--seeds", args.seeds))
                       if v is not None]
            if ignored:  # they shape runs, and --summarize runs nothing
                raise XbmError(f"{', '.join(ignored)} cannot apply to --summarize, which only "
                               "tabulates finished runs; drop them")
            results = [load_results(p) for p in args.summarize]
        else:
            if not args.out:
                ap.error("--out is required unless --summarize")
            fields: dict[str, Any] = {}
            if args.config:
                from xbm.cli import _load_yaml

                fields = _load_yaml(args.config)
            if args.methods:
                fields["methods"] = args.methods
            if args.pretrain_seed is not None:
                fields["pretrain_seed"] = args.pretrain_seed
            seeds = parse_seeds("0-2" if args.seeds is None else args.seeds)
            paths = run_seeds(Path(args.out), seeds, fields,
                              log=lambda m: print(m, file=sys.stderr, flush=True), ref=args.ref)
            results = [load_results(p) for p in paths]
        summary = summarize(results, ref=args.ref, within=args.within)
    except XbmError as exc:
        print(f"demo_seeds: error: {exc}", file=sys.stderr)
        return 2
    md = to_markdown(summary)
    if args.out:
        write_json_atomic(Path(args.out) / "seeds.json", summary)
        write_text_atomic(Path(args.out) / "seeds.md", md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
