"""Plots of the cost model and the demo's results (matplotlib, imported lazily).

- :func:`plot_energy_breakdown`: stacked energy components per method, one panel per setting
  (deploy, switch, inference per image, on-chip adaption), from an ``xbm cost --json`` report.
- :func:`plot_accuracy_vs_mask`: new-task accuracy against mask memory, from a demo results.json.
- :func:`plot_accuracy_vs_energy`: new-task accuracy against adaption (deploy) energy.

PNG files are written atomically (temporary sibling, then rename), so an interrupted run never
leaves a truncated image behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from xbm.errors import XbmError
from xbm.io import atomic_path

SETTINGS = (
    ("deploy", "adapt (deploy)"),
    ("switch", "switch task"),
    ("inference", "inference / image"),
    ("onchip", "on-chip adaption"),
)
COMPONENT_LABELS = {
    "write_pulses": "cell write pulses",
    "verify_reads": "verify reads",
    "mask_bit_writes": "mask bit writes",
    "cell_reads": "crossbar cell reads",
    "dac_drives": "DAC drives",
    "adc_conversions": "ADC conversions",
    "shift_adds": "shift-and-add",
}


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or a one-line error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise XbmError("plots need matplotlib: pip install matplotlib (or the 'xbm' "
                       "package's dependencies)") from None
    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 130, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG through a temporary file, then free it: an interrupted write
    leaves no half-drawn image under the name (every command's plots go through here)."""
    path = Path(path)
    with atomic_path(path) as tmp:  # which also gives the file the umask's permissions
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    _pyplot().close(fig)
    return path


def si_joules(x: float) -> str:
    """6.3 mJ, 33 nJ, 731 J: short labels for bars that span ten orders of magnitude."""
    if x == 0:
        return "0 J"
    for scale, prefix in ((1, ""), (1e-3, "m"), (1e-6, "\u00b5"), (1e-9, "n"), (1e-12, "p")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}J"
    return f"{x:.2g} J"


def load_results(path: str | Path) -> dict[str, Any]:
    """A demo results.json, checked for the fields the accuracy plots read."""
    from xbm.io import input_problem

    p = Path(path).expanduser()
    problem = input_problem(p)
    if problem:
        raise XbmError(f"results file {path} {problem}; run `xbm demo` or pass --results "
                       "FILE (a demo's results.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise XbmError(f"results file {path} is not UTF-8 text; is it a demo results.json?"
                       ) from None
    except json.JSONDecodeError as exc:
        raise XbmError(f"results file {path} is not valid JSON ({exc.msg})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list):
        raise XbmError(f"results file {path} has no 'runs' list; is it a demo results.json?")
    bb = data.get("backbone")  # xbm cost compares its model with the one recorded here
    for what, v in (("backbone", bb), ("backbone.arch",
                                       bb.get("arch") if isinstance(bb, dict) else None),
                    ("config", data.get("config"))):
        if v is not None and not isinstance(v, dict):
            raise XbmError(f"results file {path}: {what} is {v!r:.40}, not a mapping; is it a "
                           "demo results.json?")
    for i, r in enumerate(runs):  # what the plots read, checked before any file is written
        if not isinstance(r, dict):
            raise XbmError(f"results file {path}: run {i} is not a record (got {r!r})")
        for k in ("method", "task", "accuracy", "mask_bits"):
            if k not in r:
                raise XbmError(f"results file {path}: a run lacks field {k!r}")
        if not isinstance(r["method"], str) or not isinstance(r["task"], str):
            raise XbmError(f"results file {path}: run {i}'s method and task must be names")
        for k in ("accuracy", "mask_bits"):
            v = r[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise XbmError(f"results file {path}: run {i}'s {k} is {v!r}, not a finite "
                               "number")
        # the energy plot reads these (a string crashed it after the first plots were saved)
        for k in ("adaption_energy_j", "reprogrammed_cells"):
            v = r.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v)):
                raise XbmError(f"results file {path}: run {i}'s {k} is {v!r}, not a finite "
                               "number or null")
        if r.get("adaption_energy_j") is None and r.get("reprogrammed_cells", 0) is None:
            raise XbmError(f"results file {path}: run {i} records neither adaption_energy_j "
                           "nor reprogrammed_cells; the energy plot needs one")
        if "base_task" in r and not isinstance(r["base_task"], bool):
            raise XbmError(f"results file {path}: run {i}'s base_task is {r['base_task']!r}, "
                           "not true or false")
    if any("base_task" not in r for r in runs):
        # before base_task was recorded the base task's run would pass for a new task
        raise XbmError(f"results file {path}: a run lacks field 'base_task' (a results.json "
                       "from an older xbm); re-run xbm demo")
    if not _new_task_runs(data):
        raise XbmError(f"results file {path} has no new-task runs to plot; pass a demo's "
                       "results.json")
    return data


def _component(name: str) -> str:
    for prefix in ("compute_", "rewrite_"):
        if name.startswith(prefix):
            base = name[len(prefix):]
            return COMPONENT_LABELS.get(base, base)
    return COMPONENT_LABELS.get(name, name)


def plot_energy_breakdown(report: dict[str, Any], path: str | Path) -> Path:
    """Stacked bars of each method's energy components, one panel per setting.

    Args:
        report: an ``xbm cost --json`` object (``CostReport.to_dict()``); in bundle mode the
            per-task entries are drawn.
        path: the PNG to write.
    """
    plt = _pyplot()
    entries = report.get("tasks") or report.get("methods") or {}
    entries = {k: v for k, v in entries.items() if "breakdown" in v}
    if not entries:
        raise XbmError("the report has no per-method breakdown to plot")
    names = list(entries)
    comps: list[str] = []
    for v in entries.values():
        for s, _ in SETTINGS:
            for k in v["breakdown"][s]:
                if _component(k) not in comps:
                    comps.append(_component(k))
    cmap = plt.get_cmap("tab10")
    colors = {c: cmap(i % 10) for i, c in enumerate(comps)}
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(4.2 * len(SETTINGS), 4.4))
    for ax, (setting, title) in zip(axes, SETTINGS, strict=True):
        top = 0.0
        for i, n in enumerate(names):
            bottom = 0.0
            acc: dict[str, float] = {}
            for k, t in entries[n]["breakdown"][setting].items():
                acc[_component(k)] = acc.get(_component(k), 0.0) + float(t["value"])
            for c, v in acc.items():
                ax.bar(i, v, bottom=bottom, color=colors[c], edgecolor="white", linewidth=0.5)
                bottom += v
            ax.annotate(si_joules(bottom), (i, bottom), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
            top = max(top, bottom)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylabel("energy (J)")
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in comps]
    fig.legend(handles, comps, loc="lower center", ncol=min(len(comps), 7), frameon=False,
               bbox_to_anchor=(0.5, -0.06))
    s = report.get("spec", {})
    a = report.get("assumptions", {})
    # --workload recorded prices each task at its own steps: say those, not the default
    own = {(w.get("iterations"), w.get("batch_size"))
           for w in (report.get("onchip_workloads") or {}).values()}
    onchip = (f"{a.get('iterations')} it. x batch {a.get('batch_size')}" if not own else
              "{} it. x batch {}".format(*own.pop()) if len(own) == 1 else
              "each task's recorded workload")
    fig.suptitle(f"{report.get('model', '')}: energy by component ({s.get('rows')}x{s.get('cols')}"
                 f" crossbars, preset {report.get('energy_preset', {}).get('name')}, on-chip = "
                 f"{onchip})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _new_task_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if not r.get("base_task")]


def _scatter_by_method(ax: Any, runs: list[dict[str, Any]], xkey: Any, plt: Any) -> None:
    methods = list(dict.fromkeys(r["method"] for r in runs))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        rs = [r for r in runs if r["method"] == m]
        xs = [xkey(r) for r in rs]
        ys = [float(r["accuracy"]) for r in rs]
        ax.scatter(xs, ys, color=cmap(i % 10), alpha=0.45, s=22)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        ax.scatter([mx], [my], color=cmap(i % 10), s=90, marker="D", edgecolor="black",
                   label=f"{m} (mean)")
        # above and below in turn: methods with near means (xma, xma2; the 0-bit ones) no
        # longer print their names over each other
        ax.annotate(m, (mx, my), xytext=(5, 5 if i % 2 == 0 else -13),
                    textcoords="offset points", fontsize=8)
    ax.set_ylabel("new-task accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def run_label(results: dict[str, Any]) -> str:
    """Which run a plot shows, for its title: benchmark, backbone, seed and epochs as the
    results record them (empty for results without a config). Two runs' plots side by side
    were otherwise told apart by their file names only."""
    cfg = results.get("config")
    if not isinstance(cfg, dict):
        return ""
    parts = []
    if isinstance(cfg.get("benchmark"), str):
        parts.append(cfg["benchmark"])
    if isinstance(cfg.get("model"), str):
        width = cfg.get("width")
        parts.append(cfg["model"] + (f" width {width}" if isinstance(width, int) else ""))
    for k, what in (("seed", "seed"), ("epochs", "epoch(s)")):
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            parts.append(f"seed {v}" if k == "seed" else f"{v} {what}")
    return ", ".join(parts)


def _title(ax: Any, what: str, results: dict[str, Any]) -> None:
    label = run_label(results)
    if label:  # two lines in a smaller size; one line keeps matplotlib's title size
        ax.set_title(f"{what}\n{label}", fontsize=10)
    else:
        ax.set_title(what)


def plot_accuracy_vs_mask(results: dict[str, Any], path: str | Path) -> Path:
    """New-task accuracy against mask memory per task (x on a symmetric log scale: 0 shows)."""
    plt = _pyplot()
    runs = _new_task_runs(results)
    if not runs:
        raise XbmError("results hold no new-task runs to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    _scatter_by_method(ax, runs, lambda r: float(r["mask_bits"]), plt)
    _zero_and_decades_x(ax, [float(r["mask_bits"]) for r in runs])
    ax.set_xlabel("mask memory per task (bits, symlog)")
    _title(ax, "accuracy vs mask memory", results)
    fig.tight_layout()
    return save_figure(fig, path)


def _zero_and_decades_x(ax: Any, values: list[float]) -> None:
    """A symlog x axis for values that are 0 or spread over decades (mask bits, joules): the
    linear stretch around 0 ends at the smallest positive value, and ticks sit at 0 and at
    whole decades from there (a threshold a decade lower put a '0' and a '10^-11' label on
    top of each other). All zeros: a plain axis with one tick at 0."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    positive = [v for v in values if v > 0]
    if not positive:
        ax.set_xscale("linear")
        ax.set_xlim(-1, 1)
        ax.xaxis.set_major_locator(FixedLocator([0]))
        return
    lo, hi = min(positive), max(positive)
    ax.set_xscale("symlog", linthresh=lo, linscale=0.5)
    k0, k1 = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    decades = [10.0 ** k for k in range(k0, k1 + 1)]
    if len(decades) < 2 and 10.0 ** (k0 - 1) >= lo / 3:  # one label alone: the decade below,
        decades.insert(0, 10.0 ** (k0 - 1))  # when it sits clear of the 0 tick
    decades = decades or [lo]
    ticks = ([0.0] if any(v == 0 for v in values) else []) + decades
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda v, _pos: "0" if v == 0 else f"$10^{{{round(math.log10(v))}}}$"
        if abs(math.log10(v) - round(math.log10(v))) < 1e-9 else f"{v:.2g}"))


def deploy_energy_of_run(run: dict[str, Any], preset: Any) -> float:
    """Adaption (deploy) energy of a results.json run: its recorded ``adaption_energy_j``, else
    re-programmed cells x write energy per cell + mask bits x mask-bit write energy."""
    if run.get("adaption_energy_j") is not None:
        return float(run["adaption_energy_j"])
    return (float(run.get("reprogrammed_cells", 0)) * preset.write_energy_per_cell_j()
            + float(run["mask_bits"]) * preset.periphery.mask_bit_write_energy_j)


def plot_accuracy_vs_energy(results: dict[str, Any], path: str | Path, preset: Any = None
                            ) -> Path:
    """New-task accuracy against adaption (deploy) energy per task (symlog x)."""
    from xbm.hardware.energy import get_preset

    plt = _pyplot()
    preset = preset or get_preset()
    runs = _new_task_runs(results)
    if not runs:
        raise XbmError("results hold no new-task runs to plot")
    energies = [deploy_energy_of_run(r, preset) for r in runs]
    # energies the demo recorded were priced with the demo's preset, whatever ``preset`` is
    priced_by = results.get("energy_preset", preset.name) if all(
        r.get("adaption_energy_j") is not None for r in runs) else preset.name
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    _scatter_by_method(ax, runs, lambda r: deploy_energy_of_run(r, preset), plt)
    _zero_and_decades_x(ax, energies)
    ax.set_xlabel(f"adaption energy per task (J, symlog; preset {priced_by})")
    _title(ax, "accuracy vs adaption energy (deploy)", results)
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = [
    "deploy_energy_of_run",
    "load_results",
    "plot_accuracy_vs_energy",
    "plot_accuracy_vs_mask",
    "plot_energy_breakdown",
    "si_joules",
]
