"""The main job: pretrain (or load) a backbone, learn new tasks with every method, compare.

For each method a fresh multi-task model is built on the same programmed backbone and learns the
benchmark's new tasks in sequence; after the last task every task seen so far is evaluated again,
which shows forgetting (none, for the mask methods) and checks that the backbone is bit-identical.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from xbm.config import check_seed, from_fields
from xbm.errors import ConfigError, XbmError, XbmWarning, user_stacklevel
from xbm.hardware.cost import task_costs
from xbm.hardware.spec import CrossbarSpec, get_spec
from xbm.io import check_output, tensors_hash, write_json_atomic
from xbm.methods import create_method, get_method_class
from xbm.models.registry import model_defaults
from xbm.multitask import MultiTaskModel
from xbm.train import distributed as xdist
from xbm.train.loop import (
    evaluate,
    evaluate_task,
    resolve_cuda_graph,
    resolve_device,
    seed_everything,
    train_task,
)
from xbm.train.pretrain import (
    LEGACY_RECIPE,
    PRECISIONS,
    PretrainConfig,
    default_width,
    get_backbone,
    resolve_precision,
)

DEFAULT_METHODS = ["finetune", "linear-probe", "piggyback", "xbm", "xma", "xma2"]
RESULTS_SCHEMA = "xbm-results/1"


@dataclass
class DemoConfig:
    """Defaults are sized for 10 minutes on 2 CPU cores, pretraining included (width 16, two
    adaption epochs, bf16 autocast where the CPU has native bf16 units: 461 s on a fresh clone;
    docs/benchmarks.md, "Two adaption epochs"). A CPU without native bf16 runs in fp32 and may
    take longer: two 2-core boxes forced to fp32 took 478 s (an AMX Xeon) and 667 s (an
    AVX512-BF16 EPYC), an emulated AVX2-only CPU 762 s; ``epochs=1`` fits the 10 minutes there
    (478 s on the emulated AVX2-only CPU, pretraining included), at one epoch's accuracy. On
    CUDA the width defaults to 64 and the steps replay from CUDA graphs, where with these
    defaults XBM came within 0.52 points of Piggyback and XMA within 0.33 (mean of three seeds;
    2.5 minutes on an H200 shared by three demos; docs/benchmarks.md, "GPU session 4")."""

    benchmark: str = "mnist-family"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    model: str = "resnet18_cifar"
    width: int | None = None
    """Backbone width; ``None`` picks by device (``xbm.train.pretrain.default_width``): 16 on
    CPU, which the 10-minute budget on 2 cores allows, 64 on CUDA, where XBM's gap to Piggyback
    closes (docs/benchmarks.md)."""
    pretrain_epochs: int = PretrainConfig.epochs
    pretrain_subset: int | None = None
    epochs: int = 2
    """Adaption epochs per task. Two since session 13: at one, the per-task BatchNorm and head
    (and with them every method) were still learning, the column masks most of all: the second
    epoch gave XBM +2.8 points and Piggyback +1.3 on the mean of three seeds at width 16, taking
    XBM from 3.3 to 1.8 points under Piggyback (docs/benchmarks.md, "Two adaption epochs").
    On a CPU with native bf16 ``precision="auto"`` wins most of the time back; in fp32 the
    demo took 667 s instead of 498 s on one box (478 s on another, whose fp32 is faster)."""
    train_subset: int | None = 6000
    test_subset: int | None = 2000
    batch_size: int = 32
    """Adaption batch size: Piggyback's and KSM's (papers.md). An epoch of 6,000 images is 188
    steps; at one epoch, batch 128 (47 steps) left XBM 15 points behind Piggyback, and batch 32
    costs the same wall time per epoch on 2 CPU cores (docs/benchmarks.md)."""
    pretrain_batch_size: int = 128
    """Batch size of the backbone's pretraining (part of the cache key)."""
    pretrain_augment: str = PretrainConfig.augment
    """Pretraining augmentation (``xbm.data.augment``; part of the cache key)."""
    pretrain_mixup: float = PretrainConfig.mixup
    """Pretraining mixup α, 0 = off (``PretrainConfig.mixup``; part of the cache key)."""
    pretrain_precision: str = PretrainConfig.precision
    """``auto`` (bf16 on CPUs with native bf16 units, else fp32), ``fp32`` or ``bf16``
    (``PretrainConfig.precision``; the resolved value is part of the cache key)."""
    precision: str = "auto"
    """Adaption precision: ``auto`` (bf16 autocast on CPUs with native bf16 units, fp32
    elsewhere, CUDA included: the rule of ``pretrain_precision``), ``fp32`` or ``bf16``. Only
    the training steps' forward runs in bf16; scores, masks, gradients and every evaluation
    stay fp32 (``xbm.train.loop.train_task``)."""
    cuda_graph: bool | None = None
    """Replay each adaption step from a CUDA graph (``train_task``'s ``cuda_graph``); ``None``:
    on where the device is CUDA. A replay is bit for bit the eager step it records (tested on an
    H200), with Adam in its capturable form, which rounds differently from the plain Adam of the
    eager figures recorded before session 15: accuracies agree within seed noise, not digit for
    digit (``false`` brings the eager path back). It removes the host overhead that bounds a GPU
    step at batch 32: Piggyback's, XBM's and XMA's training took 4.1-4.8x less time at the GPU
    default, XBM 0.90x Piggyback's (docs/benchmarks.md, "GPU session 4"). XMA2 runs its warm-up
    and PE selection eagerly and replays the steps after them."""
    eval_batch_size: int = 256
    seed: int = 0
    """Seed of the adaption runs (training subsets, test subsets, batch order, mask init) and,
    unless ``pretrain_seed`` is set, of the backbone."""
    pretrain_seed: int | None = None
    """Seed of the backbone's pretraining; ``None``: ``seed``. Set it to repeat the adaption on
    one cached backbone under several seeds (``xbm demo --pretrain-seed 0 --seed S``), which
    separates the spread of the adaption itself from that of the backbone and skips the
    pretraining."""
    preset: str = "default"
    rows: int | None = None
    cols: int | None = None
    weight_bits: int | None = None
    cell_bits: int | None = None
    energy: str = "default"
    device: str = "auto"
    data_root: str | None = None
    method_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Types and ranges, so a bad YAML value fails in a second rather than as a traceback
        or minutes into the run. (Names are checked where they are looked up: the methods,
        benchmark, presets and pretraining recipe all fail before any training.)"""
        for f in ("benchmark", "model", "pretrain_augment", "pretrain_precision", "precision",
                  "preset", "energy", "device", "data_root"):
            v = getattr(self, f)  # a list or a number here was a TypeError deep in the run
            if not (isinstance(v, str) or (v is None and f in ("data_root", "device"))):
                raise ConfigError(f"demo {f} must be a name (a string), got {v!r}")
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not isinstance(self.methods, list) or not self.methods or \
                not all(isinstance(m, str) for m in self.methods):
            raise ConfigError(f"demo methods must be a non-empty list of method names, e.g. "
                              f"[xbm, piggyback]; got {self.methods!r}")
        dup = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dup:
            raise ConfigError(f"demo methods lists {', '.join(dup)} twice; list each once")
        for f in ("epochs", "batch_size", "eval_batch_size", "pretrain_epochs",
                  "pretrain_batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"demo {f} must be an integer >= 1, got {v!r}")
        for f in ("width", "train_subset", "test_subset", "pretrain_subset", "rows", "cols",
                  "weight_bits", "cell_bits"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"demo {f} must be an integer >= 1 (or left out), got {v!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown demo precision {self.precision!r}; choose one of: "
                              f"{', '.join(PRECISIONS)}")
        for f, field_ in (("pretrain_augment", "augment"), ("pretrain_mixup", "mixup"),
                          ("pretrain_precision", "precision")):
            try:  # checked as the recipe checks it, but named by the demo's field
                PretrainConfig(**{field_: getattr(self, f)})
            except ConfigError as exc:
                raise ConfigError(f"demo {f}: {exc}") from None
        for f in ("seed", "pretrain_seed"):
            v = getattr(self, f)
            if v is not None or f == "seed":
                check_seed(v, f"demo {f}")
        if self.cuda_graph is not None and not isinstance(self.cuda_graph, bool):
            raise ConfigError(f"demo cuda_graph must be true, false or null (on where the device "
                              f"is CUDA), got {self.cuda_graph!r}")
        from xbm.hardware.energy import get_preset

        get_preset(self.energy)

    def width_for(self, device: torch.device) -> int:
        """The backbone width this config runs at on ``device``."""
        return self.width if self.width is not None else default_width(device)

    def pretrain_config(self, device: torch.device, base: str = "fashion-mnist"
                        ) -> PretrainConfig:
        """The backbone this config adapts: pretrained on ``base`` (the benchmark's base task)
        at this config's width for ``device``."""
        return PretrainConfig(model=self.model, width=self.width_for(device), dataset=base,
                              epochs=self.pretrain_epochs, batch_size=self.pretrain_batch_size,
                              seed=self.seed if self.pretrain_seed is None
                              else self.pretrain_seed, augment=self.pretrain_augment,
                              mixup=self.pretrain_mixup, precision=self.pretrain_precision,
                              train_subset=self.pretrain_subset, test_subset=self.test_subset
                              ).for_device(device)

    def precision_for(self, device: torch.device) -> str:
        """The adaption precision this config runs at on ``device`` (``auto`` resolved)."""
        return resolve_precision(self.precision, device)

    def spec(self) -> CrossbarSpec:
        return get_spec(self.preset, rows=self.rows, cols=self.cols,
                        weight_bits=self.weight_bits, cell_bits=self.cell_bits)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoConfig:
        return from_fields(cls, d, owner="demo config")


def _run_record(method: str, task: str, base: bool, acc: float, **kw: Any) -> dict[str, Any]:
    rec = {"method": method, "task": task, "base_task": base, "accuracy": round(acc, 4)}
    rec.update(kw)
    return rec


def fp32_time_note(cfg: DemoConfig, device: torch.device, precision: str) -> str | None:
    """What to expect where "auto" fell back to fp32 on a CPU at the default two epochs: the
    10-minute budget holds with native bf16 units only (docs/benchmarks.md), and a user should
    learn that before the minutes, not after."""
    if device.type != "cpu" or cfg.precision != "auto" or precision != "fp32" or \
            cfg.epochs != DemoConfig.epochs:
        return None
    return ("note: this CPU has no native bf16 units, so the demo runs in fp32; on 2 cores it "
            "may take more than 10 minutes (2-core boxes forced to fp32 took 478 s and 667 s, an "
            "emulated AVX2-only CPU 762 s, against 427-500 s in bf16); --epochs 1 fits in 10 "
            "(478 s on the emulated AVX2-only CPU, pretraining included), at one epoch's "
            "accuracy (docs/benchmarks.md)")


def _check_results_file(path: Path) -> None:
    """``results.json`` is replaced at the end of a run: refuse, before any work, a folder, a
    symbolic link (the write goes through it and would overwrite the file it names, a bundle
    say) or a file that is not an earlier run's results."""
    import json

    if path.is_symlink():
        raise XbmError(f"--out: {path} is a symbolic link (to {os.readlink(path)}); the run "
                       "would write its results through it: remove the link or pass another "
                       "--out")
    if path.is_dir():
        raise XbmError(f"--out: {path} is a folder; remove it or pass another --out")
    if path.exists():
        try:
            ok = isinstance(json.loads(path.read_text(encoding="utf-8")).get("runs"), list)
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise XbmError(f"--out: {path} exists and is not an xbm demo results file; it "
                           "would be replaced: move it or pass another --out")


def _check_subsets(cfg: DemoConfig, base: Any, tasks: list[Any], log=print) -> None:
    """Subset sizes against the datasets, before any work. A pretraining subset larger than
    the base task's training set is refused (the backbone would train on all of it, cached
    under a name that says otherwise); a task's train or test subset larger than its set uses
    all of it, and the run says so, since its accuracy rests on fewer images than asked."""
    n_base = len(base.train_y)
    if cfg.pretrain_subset is not None and cfg.pretrain_subset > n_base:
        raise ConfigError(f"demo pretrain_subset (--pretrain-subset) {cfg.pretrain_subset} "
                          f"exceeds the {n_base:,} training images of {base.name}, the base "
                          "task; drop it to pretrain on them all")
    over = []
    for flag, n, kind, sets in (("--train-subset", cfg.train_subset, "training", tasks),
                                ("--test-subset", cfg.test_subset, "test", [base, *tasks])):
        sizes = [(d.name, len(d.train_y if kind == "training" else d.test_y)) for d in sets]
        small = [f"{name}'s {have:,}" for name, have in sizes if n is not None and n > have]
        if small:
            over.append(f"{flag} {n} is more than {', '.join(small)} {kind} images: all of "
                        "them are used")
    if over and xdist.is_main():
        log(f"note: {'; '.join(over)}")


T = TypeVar("T")


def _field(name: str, check: Callable[..., T], *args: Any) -> T:
    """``check(*args)``, its error naming the demo field the value came from (``cmd_demo`` then
    adds the ``--config`` file that set it): "unknown method 'nope'" alone did not say where
    the name was written."""
    try:
        return check(*args)
    except XbmError as exc:
        raise type(exc)(f"demo {name}: {exc}") from None


def run_demo(cfg: DemoConfig, out_dir: str | Path, progress: bool = True, log=print
             ) -> dict[str, Any]:
    """Run the main job and write ``out_dir/results.json``; returns the results object."""
    from xbm.data import get_benchmark, load_dataset

    # fail fast on unknown names, bad method configs and an unwritable output, before minutes
    # of training
    check_output(out_dir, "dir", "--out")
    results_path = Path(out_dir).expanduser() / "results.json"
    _check_results_file(results_path)
    for m in cfg.methods:
        _field("methods", get_method_class, m)
    if not isinstance(cfg.method_configs, dict):
        raise ConfigError("demo config method_configs must map method names to their fields, "
                          f"e.g. {{xbm: {{lr: 1e-3}}}}; got {cfg.method_configs!r}")
    for m, fields in cfg.method_configs.items():  # checked even for a method not run
        try:  # a misspelt name is not silently ignored
            cls = get_method_class(m)
        except XbmError as exc:
            raise ConfigError(f"method_configs: {exc}") from None
        if not isinstance(fields, dict):
            raise ConfigError(f"method_configs.{m} must be a mapping of fields, got {fields!r}")
        try:
            cls.config_class.from_dict(dict(fields))
        except ConfigError as exc:
            raise ConfigError(f"method_configs.{m}: {exc}") from None
    idle = [m for m in cfg.method_configs if m not in cfg.methods]
    if idle:  # a --methods that left them out, or a method missing from methods: say which
        warnings.warn(
            f"method_configs for {', '.join(idle)} set but not used: the demo runs "
            f"{', '.join(cfg.methods)}; add {'them' if len(idle) > 1 else 'it'} to methods "
            "(--methods) to run with those fields", XbmWarning, stacklevel=user_stacklevel())
    bench = _field("benchmark", get_benchmark, cfg.benchmark)
    _field("model", model_defaults, cfg.model)  # before the datasets and pretraining
    spec = cfg.spec()
    device = _field("device", resolve_device, cfg.device)
    cuda_graph = resolve_cuda_graph(cfg.cuda_graph, device)  # what runs (torchrun: eager)
    t_start = time.perf_counter()
    pcfg = cfg.pretrain_config(device, bench.base)
    precision = cfg.precision_for(device)
    if xdist.is_main():  # what "auto" resolved to, before minutes of work
        log(f"xbm demo: {cfg.benchmark} on {device}, {cfg.model} width {pcfg.width}, "
            f"pretraining {pcfg.precision}, adaption {precision}"
            f"{' with CUDA graphs' if cuda_graph else ''}, {cfg.epochs} epoch(s) per task; "
            f"methods {', '.join(cfg.methods)}")
        note = fp32_time_note(cfg, device, precision)
        if note:
            log(note)
        if results_path.exists():  # after every check: a run that refuses replaces nothing
            log(f"note: {results_path} holds an earlier run's results; this run replaces them "
                "when it ends (another --out keeps both)")
    # every dataset first: a missing one or an oversized subset fails before the pretraining
    base_full = load_dataset(bench.base, root=cfg.data_root)
    full = [load_dataset(name, root=cfg.data_root) for name in bench.tasks]
    for d in (base_full, *full):  # a colour folder of a registered benchmark, read as grey
        d.say_if_colour_was_dropped()
    _check_subsets(cfg, base_full, full, log)
    base_data = base_full.subset(None, cfg.test_subset, seed=cfg.seed)
    del base_full
    tasks = [d.subset(cfg.train_subset, cfg.test_subset, seed=cfg.seed) for d in full]
    del full
    backbone, bmeta, bpath = xdist.main_first(lambda: get_backbone(
        pcfg, device, root=cfg.data_root, progress=progress and xdist.is_main(), log=log))
    _, base_test = base_data.loaders(cfg.eval_batch_size, seed=cfg.seed)
    runs: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    mapping = None
    base_acc: float | None = None
    for method in cfg.methods:
        seed_everything(cfg.seed)
        mtm = MultiTaskModel(copy.deepcopy(backbone), spec, arch=bmeta["arch"]).to(device)
        mapping = mapping or mtm.mapping().to_dict()
        before = {k: v.clone() for k, v in mtm.backbone_state().items()}
        if base_acc is None:  # every method starts from a copy of the same backbone, and the
            # base task reads only the backbone: one evaluation serves all (each method's final
            # base evaluation, the check, stays its own)
            base_acc = evaluate(mtm, base_test, device)
        after_train: dict[str, float] = {}
        task_hash: dict[str, str] = {}
        per_task: dict[str, dict[str, Any]] = {}
        for d in tasks:
            mtm.add_task(d.name, d.num_classes, method, cfg.method_configs.get(method),
                         dataset=d.name)
            train_loader, test_loader = d.loaders(cfg.batch_size, seed=cfg.seed,
                                                  test_batch_size=cfg.eval_batch_size)
            tr = train_task(mtm, d.name, train_loader, cfg.epochs, device, progress=progress,
                            precision=precision, cuda_graph=cuda_graph)
            acc = evaluate_task(mtm, d.name, test_loader, device)
            after_train[d.name] = acc
            # every tensor of the task as learned: the final check compares the tensors, not
            # only an accuracy that a small change might leave as it was
            task_hash[d.name] = tensors_hash(mtm.task_state_dict(d.name))
            per_task[d.name] = {
                "mask_bits": mtm.mask_bits(d.name),
                "reprogrammed_cells": mtm.reprogrammed_cells(d.name),
                "masked_off_columns": mtm.masked_off_columns(d.name),
                "trainable_params": mtm.trainable_params(d.name),
                "train_seconds": round(tr.train_seconds, 3),
                "train_steps": tr.steps,
                "cuda_graph": tr.cuda_graph,
            }
            c = task_costs(mtm, d.name, cfg.energy)
            per_task[d.name].update(adaption_energy_j=c["adaption_energy_j"],
                                    switch_energy_j=c["switch_energy_j"],
                                    inference_energy_j=c["inference_energy_j"])
            log(f"  {method:<13} {d.name:<14} acc {acc:6.2f}%  ({tr.train_seconds:.1f}s)")
        # Every task seen so far, once more, after the last task was learned.
        final_base = evaluate_task(mtm, "base", base_test, device)
        runs.append(_run_record(method, bench.base, True, final_base, mask_bits=0,
                                reprogrammed_cells=0, masked_off_columns=0, trainable_params=0,
                                train_seconds=0.0, adaption_energy_j=0.0, switch_energy_j=0.0,
                                accuracy_before=round(base_acc, 4)))
        for d in tasks:
            _, test_loader = d.loaders(cfg.eval_batch_size, seed=cfg.seed)
            final = evaluate_task(mtm, d.name, test_loader, device)
            runs.append(_run_record(method, d.name, False, final,
                                    accuracy_after_training=round(after_train[d.name], 4),
                                    **per_task[d.name]))
        after = mtm.backbone_state()
        # the converted model's tensors, and the backbone file's own hash: nothing between
        # loading the file and the last task changed a cell
        identical = all(torch.equal(before[k], after[k]) for k in before) and \
            set(before) == set(after) and mtm.backbone_hash == bmeta["content_hash"]
        checks[method] = {
            "backbone_bit_identical": identical,
            "base_accuracy_unchanged": final_base == base_acc,
            "earlier_tasks_unchanged": all(
                r["accuracy"] == r["accuracy_after_training"]
                for r in runs if r["method"] == method and not r["base_task"]) and all(
                tensors_hash(mtm.task_state_dict(t)) == h for t, h in task_hash.items()),
        }
    brecipe = bmeta.get("config", {})  # backbones cached before a field existed lack it
    results = {
        "schema": RESULTS_SCHEMA,
        # width, precision and crossbar geometry as resolved (None meant "the default")
        "config": dataclasses.asdict(cfg) | {"device": str(device), "width": pcfg.width,
                                             "pretrain_precision": pcfg.precision,
                                             "precision": precision,
                                             "cuda_graph": cuda_graph,
                                             "rows": spec.rows, "cols": spec.cols,
                                             "weight_bits": spec.weight_bits,
                                             "cell_bits": spec.cell_bits},
        "spec": spec.to_dict(),
        # every field of each method's config in force (method_configs holds only overrides)
        "method_configs": {m: create_method(m, cfg.method_configs.get(m)).config.to_dict()
                           for m in cfg.methods},
        "backbone": {k: bmeta[k] for k in ("arch", "dataset", "accuracy", "content_hash", "seed",
                                           "epochs")}
        | {k: brecipe.get(k, v) for k, v in LEGACY_RECIPE.items()} | {"path": str(bpath)}
        # the images its accuracy was measured on when pretrained (a cached backbone's may be
        # another --test-subset than this run's; None: not recorded)
        | {"test_images": bmeta.get("test_images")},
        "mapping_totals": mapping["totals"] if mapping else {},
        "energy_preset": cfg.energy,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs": runs,
        "summary": summarize(runs),
        "checks": checks,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    out = Path(out_dir)
    if xdist.is_main():
        if (out / "results.json").exists():  # a run folder holds its latest run, said aloud
            log(f"replacing {out / 'results.json'} of an earlier run")
        write_json_atomic(out / "results.json", results)
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: mean new-task accuracy and totals over new tasks."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        s = out.setdefault(r["method"], {"new_task_accuracies": {}, "mask_bits": 0,
                                         "reprogrammed_cells": 0, "trainable_params": 0,
                                         "train_seconds": 0.0, "adaption_energy_j": 0.0,
                                         "switch_energy_j": 0.0})
        if r["base_task"]:
            s["base_accuracy"] = r["accuracy"]
            continue
        s["new_task_accuracies"][r["task"]] = r["accuracy"]
        for k in ("mask_bits", "reprogrammed_cells", "trainable_params", "adaption_energy_j",
                  "switch_energy_j"):
            s[k] += r.get(k, 0)
        s["train_seconds"] = round(s["train_seconds"] + r["train_seconds"], 3)
    for s in out.values():
        accs = list(s["new_task_accuracies"].values())
        s["mean_new_task_accuracy"] = round(sum(accs) / len(accs), 4) if accs else None
    return out


def format_table(results: dict[str, Any]) -> str:
    """The comparison table printed at the end of the demo."""
    summ = results["summary"]
    tasks = [r["task"] for r in results["runs"] if not r["base_task"]]
    tasks = list(dict.fromkeys(tasks))
    base = next((r["task"] for r in results["runs"] if r["base_task"]), "base")
    pb_bits = summ.get("piggyback", {}).get("mask_bits")
    cols = ["method", f"{base}*"] + tasks + ["mean new", "mask bits", "vs PB", "reprog cells",
                                              "adapt J", "switch J", "trainable", "train s"]
    rows = []
    for m, s in summ.items():
        # "-" for a method without a mask, as xbm cost prints it (not a 0.00% of Piggyback's)
        vs = f"{100 * s['mask_bits'] / pb_bits:.2f}%" if pb_bits and s["mask_bits"] else "-"
        rows.append([m, f"{s.get('base_accuracy', 0):.2f}"]
                    + [f"{s['new_task_accuracies'].get(t, float('nan')):.2f}" for t in tasks]
                    + [f"{s['mean_new_task_accuracy']:.2f}", f"{s['mask_bits']:,}", vs,
                       f"{s['reprogrammed_cells']:,}", f"{s['adaption_energy_j']:.3e}",
                       f"{s['switch_energy_j']:.3e}", f"{s['trainable_params']:,}",
                       f"{s['train_seconds']:.1f}"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(cols, widths, strict=False)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in
                             enumerate(zip(r, widths, strict=False))))
    out.append(f"* base task accuracy after all new tasks were learned (top-1 %); mask bits and "
               f"re-programmed cells summed over {len(tasks)} new tasks; vs PB = mask memory "
               "relative to Piggyback;\n  adapt J = energy to deploy the tasks trained off-chip "
               "(re-programming + mask writes), switch J = base task -> each task, summed, "
               f"under the '{results.get('energy_preset', 'default')}' energy preset "
               "(docs/cost-model.md)")
    if "piggyback" in summ and len(summ) > 1:  # the comparison issue 2 and 5 ask about
        ref = summ["piggyback"]["mean_new_task_accuracy"]
        out.append("mean new-task accuracy vs Piggyback: " + ", ".join(
            f"{m} {s['mean_new_task_accuracy'] - ref:+.2f}" for m, s in summ.items()
            if m != "piggyback") + " points")
    checks = results.get("checks", {})
    failed = [f"{m}: {k}" for m, c in checks.items() for k, ok in c.items() if not ok]
    if checks:
        out.append("checks: " + ("the programmed backbone tensors bit-identical after every "
                                 "method, the base task's accuracy and the earlier tasks' "
                                 "accuracies and tensors unchanged (reprog cells: what the "
                                 "chip would rewrite)" if not failed
                                 else "FAILED " + "; ".join(failed)))
    return "\n".join(out)


def load_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
