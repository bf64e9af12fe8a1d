"""xbm: crossbar-aware multi-task adaption on ReRAM in-memory-computing accelerators.

Sub-commands: ``demo`` (the main job), ``pretrain``, ``import-backbone``, ``adapt``, ``eval``,
``map``, ``methods``, ``models``, and those that other modules register (``cost``,
``simulate``). Every user error ends in one line ``xbm: error: ...`` on stderr and exit
status 2, with nothing half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Any, NoReturn

from xbm.config import load_yaml, seed_arg
from xbm.errors import (
    ArchitectureMismatchError,
    BundleError,
    ConfigError,
    UnknownNameError,
    XbmError,
    XbmWarning,
)

EXTENSIONS = ("xbm.hardware.cost_cli", "xbm.hardware.simulate_cli")


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    from xbm.io import input_problem

    p = Path(path).expanduser()
    problem = input_problem(p)
    if problem:
        raise XbmError(f"config file {path} {problem}; pass a YAML file"
                       + (" (the one in the folder)" if p.is_dir() else ""))
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
        if data is None:  # an empty file (or /dev/null): no fields; 0, false or [] are refused
            data = {}
    except UnicodeDecodeError:
        raise XbmError(f"config file {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise XbmError(f"config file {path} is not valid YAML{where} "
                       f"({getattr(exc, 'problem', None) or exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise XbmError(f"config file {path} must hold a mapping of field: value")
    return data


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """Crossbar-spec flags shared by every command that maps a model."""
    from xbm.hardware.spec import SPEC_PRESETS

    # default None, not "default": with an existing bundle a preset named on the command line
    # is compared with the bundle's spec, and only one that was named
    p.add_argument("--preset",
                   help=f"crossbar preset: {', '.join(sorted(SPEC_PRESETS))} (default: "
                   "default = pytorx, 64x64)")
    add_geometry_args(p)


def add_geometry_args(p: argparse.ArgumentParser) -> None:
    """The four geometry flags that override a preset (None: the preset's value)."""
    for flag, what, default in (("--rows", "crossbar rows R", 64),
                                ("--cols", "crossbar columns C", 64),
                                ("--weight-bits", "weight precision", 8),
                                ("--cell-bits", "bits per cell", 2)):
        p.add_argument(flag, type=int,
                       help=f"{what} (default: the preset's, {default} for default)")


def spec_from_args(args: argparse.Namespace):
    from xbm.hardware import get_spec

    return get_spec(args.preset or "default", rows=args.rows, cols=args.cols,
                    weight_bits=args.weight_bits,
                    cell_bits=args.cell_bits)


WIDTH_HELP = ("backbone width (default: 16 on CPU, 64 on CUDA, for every --model: the demo's "
              "rule; map and cost use each model's own default, which xbm models lists)")
WIDTH_HELP_BUNDLE = ("default backbone width (16 on CPU, 64 on CUDA); with --backbone or an "
                     "existing --bundle, which fix the backbone, it must match it")
#: eval and simulate: a bundle's task reads the files adapt read
TASK_ROOT_HELP = ("folder with dataset files (default: installed; a bundle's task without "
                  "--dataset reads the --data-root it was adapted from, as adapt recorded it)")
BACKBONE_HELP = ("backbone .safetensors that xbm pretrain or xbm import-backbone wrote "
                 "(default: with an existing --bundle, the cached backbone whose content hash "
                 "the bundle records, or the file it records; else the cached demo backbone of "
                 "--model/--width, pretrained once if absent)")
DEFAULT_MODEL = "resnet18_cifar"
MODEL_HELP = (f"architecture of the default backbone (default {DEFAULT_MODEL}, the demo's); with "
              "--backbone or an existing --bundle, which fix it, it must match")


# -- demo ------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from xbm.train.demo import DemoConfig, format_table, run_demo

    fields: dict[str, Any] = _load_yaml(args.config) if args.config else {}
    from_file = set(fields)
    for k in ("methods", "epochs", "train_subset", "test_subset", "seed", "device", "width",
              "pretrain_epochs", "pretrain_seed", "pretrain_subset", "pretrain_augment",
              "pretrain_mixup", "pretrain_precision", "precision", "batch_size", "rows", "cols",
              "preset", "weight_bits", "cell_bits", "energy", "data_root", "benchmark",
              "cuda_graph"):
        v = getattr(args, k, None)
        if v is not None:
            fields[k] = v
            from_file.discard(k)
    try:
        cfg = DemoConfig.from_dict(fields)
        results = run_demo(cfg, args.out, progress=not args.no_progress)
    except XbmError as exc:  # a value the YAML gave: say where it is
        # (a pretrain_* field is named by the PretrainConfig field it fills: only there, so
        # the file's pretrain_epochs is not blamed for a bad --epochs, "demo epochs"). Other
        # errors (an unavailable device) count only where they start with the demo field
        text = str(exc)
        if isinstance(exc, (ConfigError, UnknownNameError)):
            named = any(re.search(rf"(?<!\w){re.escape(str(k))}\b", text)
                        for k in from_file) or \
                any(re.search(rf"PretrainConfig\.{re.escape(str(k).removeprefix('pretrain_'))}"
                              r"\b", text) for k in from_file if str(k).startswith("pretrain_"))
        else:
            named = any(text.startswith(f"demo {k}:") for k in from_file)
        if not (args.config and named):
            raise
        raise type(exc)(f"{exc} (in --config {args.config})") from None
    print()
    print(format_table(results))
    print(f"\nresults: {Path(args.out) / 'results.json'}  ({results['wall_seconds']:.0f}s)")
    return 0


# -- pretrain --------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> int:
    from xbm.data import dataset_reference
    from xbm.io import check_output
    from xbm.train import distributed as xdist
    from xbm.train import resolve_device
    from xbm.train.pretrain import (
        PretrainConfig,
        accuracy_text,
        cache_dir,
        load_backbone,
        pretrain,
    )

    _check_counts(args, ("epochs", "batch_size", "train_subset"))
    device = resolve_device(args.device)
    width = _width(args, device)
    _check_side(args.image_size, {"name": args.model, "in_channels": args.channels,
                                  "width": width})
    # an image folder by its absolute path: `folder:imgs` run from two directories is two
    # datasets, and the recipe that bundles record must rebuild from anywhere
    cfg = PretrainConfig(model=args.model, width=width,
                         dataset=dataset_reference(args.dataset), epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         train_subset=args.train_subset, augment=args.augment,
                         mixup=args.mixup, precision=args.precision,
                         image_size=args.image_size, channels=args.channels
                         ).for_device(device)
    out = Path(args.out) if args.out else \
        cache_dir() / "backbones" / cfg.cache_name(getattr(args, "data_root", None))
    old_hash = None
    if not args.out and out.exists():
        try:  # the recipe is cached already: training again would give the same backbone
            _, old = load_backbone(out)
            old_hash = old["content_hash"]
        except XbmError as exc:
            if not args.force:
                raise XbmError(f"cached backbone is unusable ({exc}); pass --force to pretrain "
                               "it anew") from None
        from xbm.train.pretrain import cached_recipe_problem

        problem = cached_recipe_problem(out, old, cfg) if old_hash else None
        if problem and not args.force:  # what adapt and demo would refuse is not "cached"
            raise XbmError(f"{problem}; pass --force to pretrain it anew (the file is kept "
                           "under its hash)")
        if not args.force:
            print(f"already cached: {out} (accuracy {accuracy_text(old)}, hash {old_hash}); "
                  "pass --force to pretrain it again")
            return 0
    check_output(out, "file", "--out" if args.out else "the backbone cache ($XBM_CACHE):",
                 ".safetensors", fix=None if args.out else "set XBM_CACHE to a writable "
                 "folder, or pass --out FILE")
    if args.out:
        _check_backbone_suffix(out)
    if args.out and out.exists() and not args.force:
        raise XbmError(f"{out} already exists; bundles made on it would stop loading if it were "
                       "replaced. Pass another --out, or --force to overwrite it")
    if args.out and not args.force:  # the recipe cached already: the same backbone, copied
        cached = cache_dir() / "backbones" / cfg.cache_name(getattr(args, "data_root", None))
        from xbm.train.pretrain import recipe_config

        try:
            old = load_backbone(cached)[1] if cached.exists() else None
        except XbmError:  # an unusable cache entry: pretrain into --out as asked
            old = None
        recorded = recipe_config((old or {}).get("config"))
        if recorded is None or recorded.differs_from(cfg):  # renamed in, or an older rule
            old = None
        if old is not None:
            if xdist.is_main():
                import shutil

                from xbm.io import atomic_path

                with atomic_path(out) as tmp:
                    shutil.copyfile(cached, tmp)
                print(f"copied the cached backbone of this recipe ({cached}; accuracy "
                      f"{accuracy_text(old)}, hash {old['content_hash']}) to {out}; pass "
                      "--force to pretrain it again")
            return 0
    if not xdist.is_main():  # pretraining is not distributed: rank 0 trains, the others wait
        xdist.barrier()
        return 0
    import contextlib

    from xbm.train.pretrain import pretrain_lock

    # two runs of one cached recipe: the second waits for the first, then finds it cached
    cache_lock = contextlib.nullcontext() if args.out or args.force else pretrain_lock(out)
    with cache_lock:
        if not args.out and not args.force and out.exists():
            _, old = load_backbone(out)
            print(f"already cached: {out} (pretrained by another run while this one waited; "
                  f"accuracy {accuracy_text(old)}, hash {old['content_hash']})")
            xdist.barrier()  # the other ranks wait there
            return 0
        kept = None
        if old_hash:  # --force on a cached recipe: bundles made on the old backbone find it
            kept = out.with_name(f"{out.stem}-{old_hash}.safetensors")
            try:
                os.replace(out, kept)
            except FileNotFoundError:  # another `pretrain --force` of this recipe kept it
                kept = None
        try:
            _, meta = pretrain(cfg, device, out, root=args.data_root,
                               progress=not args.no_progress)
        except BaseException:
            if kept is not None and not out.exists():
                os.replace(kept, out)  # nothing new was written: the cache stays as it was
            raise
    xdist.barrier()
    if kept is not None:
        if meta["content_hash"] == old_hash:
            kept.unlink()
        else:
            print(f"kept the previous backbone as {kept} (hash {old_hash}), so bundles made on "
                  "it still load")
    print(f"saved {out} (accuracy {accuracy_text(meta)}, hash {meta['content_hash']})")
    default = PretrainConfig(model=cfg.model, width=cfg.width).for_device(device)
    if out.resolve() == (cache_dir() / "backbones" / default.cache_name(args.data_root)).resolve():
        model = "" if cfg.model == DEFAULT_MODEL else f"--model {cfg.model} "
        same_root = " and this --data-root" if args.data_root else ""
        print(f"xbm adapt and xbm simulate use it by default (at {model}--width {cfg.width}"
              f"{same_root})")
    else:  # another recipe: the commands' default backbone is not this one
        import shlex

        print(f"to adapt or simulate on it, pass --backbone {shlex.quote(str(out))} (the "
              "bundles adapt makes on it record this file, so eval and cost find it there)")
    return 0


def _check_backbone_suffix(out: Path) -> None:
    """``--out`` of ``pretrain`` and ``import-backbone``: every ``--backbone`` reads
    safetensors."""
    if out.suffix != ".safetensors":
        raise XbmError(f"--out {out}: a backbone is saved as safetensors; name it *.safetensors")
    from xbm.io import xbm_file_kind

    kind = xbm_file_kind(out)
    if kind not in (None, "backbone"):
        # --force replaces a backbone; a bundle's learned tasks (or a chip's fault map) would
        # be lost with it
        raise XbmError(f"--out {out} is a {kind}, not a backbone; pass another --out (--force "
                       f"does not replace a {kind})")


def cmd_import_backbone(args: argparse.Namespace) -> int:
    """``xbm import-backbone``: a user's checkpoint as an xbm backbone file."""
    import shlex

    from xbm.io import check_output
    from xbm.train.pretrain import import_backbone

    out = Path(args.out)
    _check_backbone_suffix(out)
    check_output(out, "file", "--out", ".safetensors")
    if out.exists() and not args.force:
        raise XbmError(f"--out {out} already exists; pass --force to overwrite it, or another "
                       "--out")
    _check_counts(args, ("num_classes", "in_channels", "width"))
    from xbm.io import xbm_file_kind

    kind = xbm_file_kind(args.checkpoint)
    if kind is not None:  # its tensors are not a state dict of the model
        use = ("it is one already: pass it as --backbone" if kind == "backbone" else
               "pass a state dict (.pt/.pth or .safetensors) of the model's weights")
        raise XbmError(f"--checkpoint {args.checkpoint} is an xbm {kind}, not a checkpoint of "
                       f"a model; {use}")
    try:
        meta = import_backbone(args.model, args.checkpoint, out, num_classes=args.num_classes,
                               in_channels=args.in_channels, width=args.width,
                               dataset=args.dataset, accuracy=args.accuracy,
                               image_size=args.image_size)
    except ArchitectureMismatchError as exc:
        raise XbmError(f"{exc} (here: --model, --num-classes, --in-channels, --width)") from None
    a = meta["arch"]
    side = meta.get("image_size") or _family_side(a)
    print(f"saved {out} ({a['name']}, {a['num_classes']} classes, {a['in_channels']} input "
          f"channel(s), {side}x{side} images; hash {meta['content_hash']}); pass --backbone "
          f"{shlex.quote(str(out))} to xbm adapt, cost or simulate"
          + ("" if args.image_size is not None else
             f" (they feed it {side}x{side} images: if it was trained at another side, import "
             "it again with --image-size N)"))
    return 0


# -- adapt / eval ----------------------------------------------------------------------------
def _width(args: argparse.Namespace, device) -> int:
    """``--width``, else the device's default: one rule for ``demo``, ``pretrain`` and ``adapt``,
    so their default backbone is the same cached one on a given machine. (A command on an
    existing bundle finds the bundle's own backbone by its hash instead: ``_backbone``.)"""
    from xbm.train.pretrain import default_width

    if getattr(args, "width", None) is not None:
        return int(args.width)
    return default_width(device)


def _check_counts(args: argparse.Namespace, flags: tuple[str, ...]) -> None:
    """Subset, epoch and batch flags must be >= 1 (None = the default); checked up front, so the
    message names the flag rather than a library argument."""
    for f in flags:
        v = getattr(args, f, None)
        if v is not None and v < 1:
            raise XbmError(f"--{f.replace('_', '-')} must be >= 1, got {v}")


def _short(names: list[str], n: int = 6) -> str:
    """A class list for a one-line message."""
    return "[" + ", ".join(map(repr, names[:n])) + (f", ... ({len(names)})" if len(names) > n
                                                     else "") + "]"


def check_dataset_flag(args: argparse.Namespace, infos: list[Any]) -> None:
    """``--dataset`` without ``--task`` stands for the data of every task evaluated: refused
    (before any work) when the bundle's tasks were learned on different datasets, which left a
    partial table and a class-count error midway."""
    if not getattr(args, "dataset", None) or getattr(args, "task", None):
        return
    recorded = {t.dataset for t in infos}
    if len(recorded) > 1:
        by = ", ".join(f"{t.name} ({t.dataset or 'none recorded'})" for t in infos)
        raise ConfigError(f"--dataset {args.dataset} would stand for every task's data, but "
                          f"{args.bundle}'s tasks were learned on different ones: {by}; add "
                          "--task NAME to evaluate that task on it")


def _task_data(args: argparse.Namespace, task: Any, train_subset: int | None,
               test_subset: int | None, seed: int, channels: int | None = None,
               default_side: int = 28):
    """The data to evaluate a bundle's task on: ``--dataset`` or the one the task recorded.

    A dataset whose class count differs from the task's head would give a plausible-looking
    accuracy for the wrong labels, so it is refused; a recorded image folder that has moved
    gets an error naming the flag that points at its new place.

    The images come as the task was learned: ``channels`` (the backbone's) and the side it
    recorded (:func:`task_image_size`; ``default_side`` where it records none), which the
    returned loaders' ``size`` should be.

    Returns:
        (dataset name, TaskData subset, image side).
    """
    from xbm.data import load_dataset
    from xbm.data.registry import FOLDER_PREFIX
    from xbm.errors import DatasetNotFoundError

    ds = args.dataset or task.dataset
    if ds is None:
        raise XbmError(f"task {task.name!r} records no dataset (a bundle saved from Python "
                       "without dataset=); evaluate it alone with --task "
                       f"{task.name} --dataset NAME")
    # with --dataset every task reads the same one: said once, not per task
    _warn_unread_root(args.data_root, ds, "" if args.dataset else f" for task {task.name!r}")
    # the files adapt read (its --data-root), unless a dataset or a root is named: --dataset
    # NAME, even the task's own, reads the installed copy (said, when it is the task's own)
    recorded_root = (task.extra or {}).get("data_root")
    from xbm.data.registry import reads_root

    if recorded_root and not reads_root(ds):  # bundles from before session 26 (digits)
        recorded_root = None
    if args.dataset or args.data_root:
        if recorded_root and not args.data_root and args.dataset == task.dataset:
            warnings.warn(f"task {task.name!r}: --dataset {ds} reads the installed copy, not "
                          f"the --data-root {recorded_root} the task was adapted from (leave "
                          "out --dataset to read that)", XbmWarning, stacklevel=2)
        recorded_root = None
    moved = (f"task {task.name!r} was adapted with --data-root {recorded_root}: pass "
             f"--data-root where its files are now, or --dataset {ds} for the installed copy")
    if recorded_root and not os.path.isdir(recorded_root):
        # letters would render afresh and digits ignores a root: neither would say it moved
        raise DatasetNotFoundError(f"{recorded_root} is gone; {moved}")
    try:
        data = load_dataset(ds, root=args.data_root or recorded_root, channels=channels,
                            image_size=task_image_size(task, default_side))
    except DatasetNotFoundError as exc:
        if recorded_root:
            raise DatasetNotFoundError(f"{exc}; {moved}") from None
        if args.dataset or not ds.startswith(FOLDER_PREFIX):
            raise  # a built-in dataset's error already says how to install it
        raise DatasetNotFoundError(f"{exc}; task {task.name!r} was trained on these images: "
                                   f"pass --task {task.name} --dataset folder:PATH where they "
                                   "are now") from None
    recorded = [str(c) for c in (task.extra or {}).get("classes") or []]
    now = [str(c) for c in getattr(data, "classes", None) or []]
    fingerprint = (task.extra or {}).get("test_fingerprint")
    from xbm.data import dataset_reference

    same = not args.dataset or dataset_reference(args.dataset) == task.dataset
    if fingerprint and same and recorded == now and fingerprint != data.test_fingerprint() \
            and fingerprint != data.test_fingerprint(first_channel_only=True):  # pre-29 bundles
        from xbm.data.folder import has_own_split
        from xbm.data.registry import image_folder_path

        folder = image_folder_path(str(ds))
        split = (" (split 80/20 by file name, so some may be images it trained on)"
                 if folder is not None and not has_own_split(folder) else "")
        warnings.warn(f"task {task.name!r}: the test images of {ds} are not those it was "
                      f"adapted with: files were added, removed or changed since{split}; "
                      "its accuracy is on other images", XbmWarning, stacklevel=2)
    if recorded and now and recorded != now and len(recorded) == len(now):
        # an image folder's labels follow its sorted class names: a renamed class shifts them
        fix = ("evaluate it on its own data (leave out --dataset)" if args.dataset and
               not str(ds).startswith(FOLDER_PREFIX) else
               "restore the class names (an image folder's labels follow their sorted order)")
        raise XbmError(f"task {task.name!r} was trained on the classes {_short(recorded)}, but "
                       f"{ds} has {_short(now)}; its labels would not match: {fix}")
    if data.num_classes != task.num_classes:
        if args.dataset:
            fix = ("evaluate it on its own data (leave out --dataset) or pick the task it "
                   "belongs to with --task NAME")
        elif recorded:
            fix = (f"the task was trained on {_short(recorded)}: restore that folder's class "
                   "sub-folders")
        else:
            fix = "pass the --dataset it was trained on"
        raise XbmError(f"task {task.name!r} has {task.num_classes} classes but dataset {ds} has "
                       f"{data.num_classes}; {fix}")
    if not recorded and str(ds).startswith(FOLDER_PREFIX) and not args.dataset:
        warnings.warn(f"task {task.name!r} records no class names (a bundle from before "
                      "session 17's stable image-folder split, or not made by xbm adapt): its "
                      f"test split of {ds} may differ from its training split and include "
                      "training images; adapt it again to score it on held-out images",
                      XbmWarning, stacklevel=2)
    have = len(data.test_y)
    if test_subset is not None and test_subset > have and \
            getattr(args, "test_subset_given", True):  # as adapt says it; not for a default
        warnings.warn(f"task {task.name!r}: --test-subset {test_subset} is more than the "
                      f"{have} test images of {ds}: all used", XbmWarning, stacklevel=2)
    # its training images only calibrate a simulation (eval takes none): no class goes untrained
    return ds, data.subset(train_subset, test_subset, seed=seed, warn_untrained=False), \
        task_image_size(task, default_side)


def _base_task_data(args: argparse.Namespace, bmeta: dict[str, Any], tasks: list[Any],
                    seed: int):
    """The backbone's own task (``--task base``): its pretraining dataset, or ``--dataset``, at
    the side it was pretrained at (or import-backbone recorded; where it records none, the side
    its tasks were learned at, else its family's) and in its channels, ``--test-subset``
    drawn with ``seed``; returns what :func:`_task_data` does. The pretraining accuracy was
    measured on the subset ``--test-subset N`` draws when N and ``seed`` are the recipe's test
    subset and seed."""
    from xbm.data import load_dataset
    from xbm.data.registry import FOLDER_PREFIX
    from xbm.errors import DatasetNotFoundError

    recipe = bmeta.get("config") or {}
    ds = args.dataset or bmeta.get("dataset")
    if not ds or ds in ("unknown", "imported"):
        raise XbmError("the backbone records no pretraining dataset (an imported one); pass "
                       "--dataset NAME to evaluate the base task on it")
    from xbm.data.registry import image_folder_path, list_datasets

    if not args.dataset and image_folder_path(ds) is None and ds not in list_datasets():
        # import-backbone --dataset records what it was trained on, say imagenet
        raise XbmError(f"the backbone records its pretraining dataset as {ds!r}, which xbm "
                       "cannot load here; pass --dataset NAME or folder:PATH holding those "
                       "classes to evaluate the base task")
    _warn_unread_root(args.data_root, ds, " for the base task")
    from xbm.train.pretrain import backbone_side

    arch = bmeta.get("arch") or {}
    sides = sorted({task_image_size(t, _family_side(arch)) for t in tasks})
    side = backbone_side(bmeta) or (sides[0] if len(sides) == 1 else _family_side(arch))
    root = args.data_root or (recipe.get("data_root") if not args.dataset else None)
    try:
        data = load_dataset(ds, root=root, channels=arch.get("in_channels"), image_size=side)
    except DatasetNotFoundError as exc:
        if args.dataset or not str(ds).startswith(FOLDER_PREFIX):
            raise
        raise DatasetNotFoundError(f"{exc}; the backbone was pretrained on these images: pass "
                                   "--dataset folder:PATH where they are now") from None
    recorded = bmeta.get("classes")
    recorded = [str(c) for c in recorded] if isinstance(recorded, list) else []
    now = [str(c) for c in data.classes]
    if recorded and recorded != now and len(recorded) == len(now):
        # an image folder's labels follow its sorted class names: a renamed class swaps them
        fix = ("evaluate it on its own data (leave out --dataset)" if args.dataset else
               "restore the class names (an image folder's labels follow their sorted order)")
        raise XbmError(f"the backbone was pretrained on the classes {_short(recorded)}, but "
                       f"{ds} has {_short(now)}; its labels would not match: {fix}")
    if arch.get("num_classes") not in (None, data.num_classes):
        fix = (f"restore the class folders it was pretrained on ({_short(recorded)})"
               if recorded and str(ds).startswith(FOLDER_PREFIX) and not args.dataset
               else "pass the --dataset it was pretrained on")
        raise XbmError(f"the backbone's head has {arch['num_classes']} classes but {ds} has "
                       f"{data.num_classes}; {fix}")
    return ds, data.subset(None, args.test_subset, seed=seed), side


def _once(given: dict[str, Any], key: str, value: Any, flag: str) -> Any:
    """``value`` for ``key``, unless an earlier ``flag KEY=...`` gave it another: the last
    one won without a word, so a forgotten earlier copy in a long command line changed
    nothing the user could see."""
    if key in given and not _same_value(given[key], value):
        raise XbmError(f"{flag} {key} is given twice, as {given[key]!r} and {value!r}; keep one")
    return value


def _same_value(a: Any, b: Any) -> bool:
    """5 and 5.0 are one value, nan and nan too; 1 and true are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (a != a and b != b)
    return type(a) is type(b) and a == b


def _eval_seed(args: argparse.Namespace, recorded: object) -> int:
    """``--seed``, else the seed the task was learned with (``recorded``: adapt's, or for the
    base task pretraining's), else 0: its ``--test-subset`` then draws the images the task
    was scored on, so eval repeats the figure adapt printed."""
    if args.seed is not None:
        return args.seed
    return recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else 0


def _check_new_task_name(task: str, bundle: str | None, bundle_tasks: list[Any]) -> None:
    """A valid name the bundle does not hold yet (adapt)."""
    from xbm.multitask import check_task_name

    check_task_name(task, "--task")
    if task == "base":  # refused by add_task too, but only after the data and the backbone
        raise XbmError("--task 'base' is reserved for the pretrained backbone's own task; pick "
                       "another name")
    if task in {t.name for t in bundle_tasks}:
        raise XbmError(f"{bundle} already holds a task {task!r}; pass --task NAME to add "
                       "this one under another name, or --out NEW.safetensors instead of "
                       "--bundle for a new bundle")


def task_image_size(task: Any, default: int = 28) -> int:
    """The image side a bundle's task was learned at; ``default`` for a task that records none
    (28 for the CLI's tasks from before it was recorded, when every task was 28x28; a caller
    that has the backbone passes its side, which a task trained from Python before session 30
    was most likely fed at)."""
    size = (task.extra or {}).get("image_size")
    return int(size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 \
        else default


def _image_size(args: argparse.Namespace, bundle_tasks: list[Any],
                backbone_side: int | None = None,
                arch: dict[str, Any] | None = None) -> int:
    """``--image-size``, else the side the bundle's tasks were learned at, else the backbone's
    side (the one it was pretrained at, or ``import-backbone`` recorded:
    :func:`xbm.train.pretrain.backbone_side`), else the model family's usual side (224 for an
    ImageNet layout, else 28, as ``xbm cost`` assumes): a bundle's tasks share one backbone,
    and its BatchNorm statistics and the cost model's positions depend on the side, so a new
    task follows the earlier ones unless told otherwise. Checked against ``arch`` (the
    backbone's architecture) when given: a side it cannot run on fails now, not as a traceback
    after the data has loaded."""
    if args.image_size is not None:
        side = int(args.image_size)
    elif bundle_tasks:
        default = backbone_side or _family_side(arch)  # a task that records none: eval's side
        sides = sorted({task_image_size(t, default) for t in bundle_tasks})
        if len(sides) > 1:  # no side is "the earlier tasks'": say so rather than pick one
            by_side = "; ".join(f"{s}: " + ", ".join(
                t.name for t in bundle_tasks if task_image_size(t, default) == s) for s in sides)
            raise XbmError(f"the bundle's tasks were learned at different image sides "
                           f"({by_side}); pass --image-size for the new task")
        side = sides[0]
    else:
        side = backbone_side or _family_side(arch)
    _check_side(side, arch)
    return side


def backbone_default_side(bmeta: dict[str, Any]) -> int:
    """The side a backbone is fed at when nothing else says: the one it records
    (:func:`xbm.train.pretrain.backbone_side`), else its family's (:func:`_family_side`)."""
    from xbm.train.pretrain import backbone_side

    return backbone_side(bmeta) or _family_side(bmeta.get("arch"))


def _family_side(arch: dict[str, Any] | None) -> int:
    """The side a backbone that records none is fed at: its family's usual one (224 for a model
    that defaults to 3 channels, an ImageNet layout; else 28), which ``xbm cost`` assumes too."""
    from xbm.hardware.cost import default_input_size

    try:
        return default_input_size(arch["name"]) if arch and arch.get("name") else 28
    except XbmError:  # a model no longer registered: the file's own error comes later
        return 28


def _check_side(side: int, arch: dict[str, Any] | None) -> None:
    """``--image-size`` (given or defaulted) against the backbone's architecture: at least 8 (a
    ResNet halves the side five times) and one every layer of the model can run on."""
    from xbm.models.registry import check_input_side, check_side_range

    check_side_range(side, "--image-size")
    if arch and arch.get("name"):
        check_input_side(arch["name"], side, in_channels=arch.get("in_channels") or 1,
                         width=arch.get("width"))


def _backbone(args: argparse.Namespace, device, bundle_meta: dict[str, Any] | None = None):
    """``--backbone`` (for an existing bundle, checked to be the one it was learned on); else,
    for an existing bundle, the cached backbone whose content hash the bundle records, or the
    backbone file it records (never a fresh pretraining, which could only end in a mismatch);
    else the default backbone of the width, pretrained if it is not cached."""
    from xbm.train.pretrain import PretrainConfig, get_backbone, load_backbone

    if args.backbone or bundle_meta is not None:
        if args.backbone:
            model, meta = load_backbone(args.backbone)
            source = f"the backbone {args.backbone}"
            if bundle_meta is not None:
                check_bundle_backbone(args.bundle, bundle_meta, args.backbone, meta,
                                      adapt=getattr(args, "command", None) == "adapt")
        else:
            from xbm.train.pretrain import bundle_backbone_path

            model, meta = load_backbone(bundle_backbone_path(args.bundle, bundle_meta))
            source = f"the bundle {args.bundle}'s backbone"
        _check_arch_flags(args, meta["arch"], source)
        recipe = (bundle_meta or {}).get("backbone_recipe")
        if isinstance(recipe, dict) and not isinstance(meta.get("config"), dict) and \
                meta.get("content_hash") == (bundle_meta or {}).get("backbone_hash"):
            # an imported copy of the same weights records no recipe; the bundle kept the
            # one it was learned with (its pretraining dataset: eval --task base needs it)
            meta = meta | {"config": recipe}
            if meta.get("dataset") in (None, "unknown", "imported") and recipe.get("dataset"):
                meta["dataset"] = recipe["dataset"]
        return model, meta
    cfg = PretrainConfig(model=args.model or DEFAULT_MODEL, width=_width(args, device))
    # with --json, stdout carries only the JSON: the backbone's notes go to stderr
    log = (lambda *a: print(*a, file=sys.stderr)) if getattr(args, "json", False) else print
    if getattr(args, "train_subset", None) is not None:  # as get_backbone looks for it
        from xbm.train.pretrain import cache_dir

        root = getattr(args, "data_root", None)
        names = {cfg.for_device(device).cache_name(r) for r in {None, root}}
        if not any((cache_dir() / "backbones" / n).exists() for n in names):
            log(f"note: --train-subset {args.train_subset} sizes this task's training set; "
                "the default backbone it needs first is pretrained on all of its base task "
                "(for a quicker one: xbm pretrain --train-subset N --out FILE, then "
                "--backbone FILE)")
    model, meta, _ = get_backbone(cfg, device, root=getattr(args, "data_root", None),
                                  progress=not args.no_progress, log=log)
    return model, meta


def check_bundle_backbone(bundle: str | Path, bundle_meta: dict[str, Any], backbone: str | Path,
                          backbone_meta: dict[str, Any], adapt: bool = False) -> None:
    """A ``--backbone`` given with a ``--bundle`` must be the backbone the bundle was learned
    on; said here in the flags' words, before ``load_bundle`` refuses it in Python's."""
    want, have = bundle_meta.get("backbone_hash"), backbone_meta.get("content_hash")
    if want == have:
        return
    a, b = bundle_meta.get("arch") or {}, backbone_meta.get("arch") or {}
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if a and b else []
    if diff:  # another architecture, not only other weights: say which field
        have = f"{have}, another architecture (arch.{diff[0]} {b.get(diff[0])!r} against " \
               f"the bundle's {a.get(diff[0])!r})"
    fix = ("drop --backbone (the bundle's own is found by its hash), or give --out "
           "NEW.safetensors instead of --bundle to start a bundle on this backbone" if adapt else
           "drop --backbone to use the bundle's own (found in the cache by its hash, or at the "
           "file adapt was given), or pass the backbone it was learned on")
    raise BundleError(f"{bundle} was learned on the backbone with hash {want}, --backbone "
                      f"{backbone} has {have}; {fix}")


def _check_arch_flags(args: argparse.Namespace, arch: dict[str, Any], source: str) -> None:
    """``--model``/``--width`` pick the default backbone; given with a backbone file or a bundle
    (which fix the architecture) they must agree with it rather than be silently ignored."""
    have = f"{arch.get('name')}, width {arch.get('width')}"
    model = getattr(args, "model", None)
    if model is not None and model != arch.get("name"):
        raise ConfigError(f"--model {model} contradicts {source} ({have}); drop the flag")
    width = getattr(args, "width", None)
    if width is not None and "width" in arch and int(width) != arch["width"]:
        raise ConfigError(f"--width {width} contradicts {source} ({have}); drop the flag")


def _parse_value(v: str) -> Any:
    """A ``--set`` value: JSON (numbers such as 1e-3, lists, true/false), else YAML (True,
    .001, [0, 0.5]), else the text itself; the config's own validation judges the result."""
    import yaml

    try:
        return json.loads(v)
    except json.JSONDecodeError:
        pass
    try:
        out = load_yaml(v)
    except yaml.YAMLError:
        return v
    return v if out is None else out


def _check_spec_flags(args: argparse.Namespace, spec, bundle: str,
                      extra: tuple[str, ...] = ()) -> None:
    """A spec flag given with an existing bundle must agree with the bundle's spec (``extra``:
    more spec fields that the command has flags for)."""
    from xbm.hardware import get_spec

    fields = ("rows", "cols", "weight_bits", "cell_bits", *extra)
    if getattr(args, "preset", None) is not None:  # the same command line as the bundle's: fine
        named = get_spec(args.preset)
        flags = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
        named = named.replace(**flags) if flags else named
        have = spec.geometry_dict()
        diff = [k for k, v in named.geometry_dict().items() if have.get(k) != v]
        if diff:
            raise ConfigError(f"--preset {args.preset} contradicts the bundle {bundle}, which "
                              f"was learned with {', '.join(f'{k}={have[k]}' for k in diff)}; "
                              "drop the flag")
    for k in fields:
        v = getattr(args, k, None)
        if v is not None and getattr(spec, k) != v:
            raise ConfigError(f"--{k.replace('_', '-')} {v} contradicts the bundle {bundle}, which "
                              f"was learned with {k}={getattr(spec, k)}; drop the flag")


def _check_bundle_out(out: str, bundle: str | None) -> None:
    """The bundle ``adapt`` writes: a writable path, and no existing file other than the bundle
    being extended (that would lose its tasks, or clobber an unrelated file)."""
    from xbm.io import check_output, xbm_file_kind

    flag = "--bundle" if bundle is not None and Path(out) == Path(bundle) else "--out"
    p = check_output(out, "file", flag, ".safetensors")
    if p.exists() and (bundle is None or p.resolve() != Path(bundle).resolve()):
        if xbm_file_kind(p) == "backbone":
            raise XbmError(f"{p} is a backbone file; pass it as --backbone, and as --out a new "
                           "file for the task bundle")
        raise XbmError(f"{p} already exists; pass --bundle {p} to add this task to it, another "
                       "--out, or remove the file")
    check_bundle_suffix(p, flag)


def check_bundle_suffix(path: Path, flag: str) -> None:
    """A new task bundle is named *.safetensors, as backbones are (an existing bundle under
    another name, written before this rule, is still updated in place)."""
    if not path.exists() and path.suffix != ".safetensors":
        raise XbmError(f"{flag} {path}: a task bundle is saved as safetensors; name it "
                       "*.safetensors")


def record_task_data(mtm: Any, task: str, args: argparse.Namespace, data: Any,
                     image_size: int, fingerprint: str | None = None) -> None:
    """Record in a new task what ``xbm eval`` needs to read its data again: the class names,
    the image size, the data root (for datasets that read one), the batch size and the seed,
    and ``fingerprint``, the whole test split's :meth:`~xbm.data.TaskData.test_fingerprint`
    (taken before ``--test-subset``), which eval compares. Shared by every command that saves
    a task (adapt, ``simulate --fault-aware --out``); pass ``dataset=dataset_reference(...)``
    to ``add_task`` too, so a folder is found from anywhere.
    """
    from xbm.data.registry import reads_root

    extra = mtm.tasks[task].extra
    if getattr(data, "classes", None):  # eval and simulate check them (a renamed class folder)
        extra["classes"] = [str(c) for c in data.classes]
    extra["image_size"] = image_size  # eval feeds the task at this size again
    # eval reads the same files; digits ships in scikit-learn and an image folder is its own
    # root, so a root they never read is not recorded (eval would need it to exist)
    if args.data_root and reads_root(args.dataset):
        extra["data_root"] = os.path.abspath(os.path.expanduser(args.data_root))
    # the training workload, for `xbm cost --bundle` to compare with its on-chip default
    extra["batch_size"] = args.batch_size
    extra["seed"] = args.seed  # eval draws its --test-subset with it again
    if fingerprint is not None:
        extra["test_fingerprint"] = fingerprint


def cmd_adapt(args: argparse.Namespace) -> int:
    from xbm.data import dataset_reference, load_dataset
    from xbm.methods import get_method_class
    from xbm.multitask import MultiTaskModel, reserved_task_name
    from xbm.train import distributed as xdist
    from xbm.train import (
        evaluate_task,
        resolve_cuda_graph,
        resolve_device,
        seed_everything,
        train_task,
    )
    from xbm.train.pretrain import PretrainConfig, backbone_side, resolve_precision

    cls = get_method_class(args.method)
    method_cfg = _load_yaml(args.method_config) if args.method_config else {}
    if "method_configs" in method_cfg:  # a demo config, given where one method's fields go
        entry = method_cfg["method_configs"]
        hint = (f"put its method_configs.{args.method} fields in a file of their own"
                if isinstance(entry, dict) and args.method in entry else
                f"give a file of {args.method}'s own fields (xbm methods lists them)")
        raise XbmError(f"--method-config {args.method_config} is an xbm demo config "
                       "(method_configs:); --method-config takes one method's fields, e.g. "
                       f"`lr: 1e-3`: pass this file to xbm demo --config, or {hint}")
    given: dict[str, Any] = {}
    for kv in args.set or []:
        k, eq, v = kv.partition("=")
        if not eq or not k.strip():
            raise XbmError(f"--set takes FIELD=VALUE (e.g. --set lr=1e-3), got {kv!r}")
        key = k.strip().replace("-", "_")
        given[key] = _once(given, key, _parse_value(v), "--set")
        method_cfg[key] = given[key]
    cls.config_class.from_dict(method_cfg)  # validate before training
    _check_counts(args, ("epochs", "batch_size", "train_subset", "test_subset"))
    device = resolve_device(args.device)
    cuda_graph = resolve_cuda_graph(args.cuda_graph, device)  # fail fast: before pretraining
    # Everything cheap is checked before the backbone, which may need minutes of pretraining:
    # the crossbar spec (a bundle's own spec wins) and the bundle's metadata.
    spec = spec_from_args(args)
    bundle_meta, bundle_tasks = None, []
    if args.bundle and Path(args.bundle).exists():
        from xbm.multitask import read_bundle_meta

        bundle_meta, spec, bundle_tasks = read_bundle_meta(args.bundle)
        _check_spec_flags(args, spec, args.bundle)
    # an image folder's task is named after the folder (`folder:data/birds` -> birds), a
    # registered dataset's after its name; a name keeps only what task names allow (letters,
    # digits, -, _). Named and checked before the data loads (a large folder takes a while).
    from xbm.data.registry import image_folder_path

    folder = image_folder_path(args.dataset)
    # abspath, not resolve(): a symlinked folder is named as the user named it
    stem = args.dataset if folder is None else \
        Path(os.path.abspath(os.path.expanduser(folder))).name
    # accents folded (Ümlaut -> Umlaut), not dropped: names are ASCII, as tensor keys
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    task = args.task
    if task is None:
        # not led by '-': `--task -birds` would read as a flag (a folder named -birds/)
        task = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_stem).strip("_")[-64:].lstrip("-_") \
            or "task"
        if reserved_task_name(task) or task == "base":  # a folder named train/ or base/
            task = f"{task[:59]}-task"
    _check_new_task_name(task, args.bundle, bundle_tasks)  # before the data loads
    out = args.out or args.bundle
    if out is not None:
        _check_bundle_out(out, args.bundle)
    else:
        out = f"{task}.safetensors"
        _check_bundle_out(out, None)
    # A given backbone file is checked before the dataset loads (a cheap check first); the
    # default backbone may need pretraining, so then the dataset's availability comes first.
    loaded = _backbone(args, device, bundle_meta) if args.backbone or bundle_meta else None
    # images come in the backbone's shape: an image folder is read in its channel mode, a
    # grayscale dataset repeated into RGB for a 3-channel backbone; the side is --image-size,
    # else what the bundle's tasks were learned at, else the backbone's pretraining side, else
    # 28 (the default backbone's input)
    channels = (loaded[1].get("arch") or {}).get("in_channels") if loaded else None
    # (no backbone loaded: the default one, pretrained at the default recipe's side)
    image_size = _image_size(args, bundle_tasks, backbone_side(loaded[1]) if loaded else
                             PretrainConfig.image_size,
                             loaded[1].get("arch") if loaded else
                             {"name": args.model or DEFAULT_MODEL, "width": _width(args, device)})
    data = load_dataset(args.dataset, root=args.data_root, channels=channels,
                        image_size=image_size)
    data.say_if_colour_was_dropped()
    full = (len(data.train_y), len(data.test_y))
    fingerprint = data.test_fingerprint()  # of the whole test split, which eval reads again
    data = data.subset(args.train_subset, args.test_subset, seed=args.seed)
    # what the accuracy will rest on: with a few test images each one moves it by whole points
    over = [f"{flag} {n} is more than the {have} there: all used"
            for flag, n, have in (("--train-subset", args.train_subset, full[0]),
                                  ("--test-subset", args.test_subset, full[1]))
            if n is not None and n > have]
    stored = tuple(int(v) for v in data.train_x.shape[2:])
    if stored != (image_size, image_size):  # resized in each batch: say so, not only in --json
        over.append(f"stored {stored[0]}x{stored[1]}, fed at {image_size}x{image_size}"
                    + ("" if args.image_size is not None else
                       "; --image-size N feeds another side"))
    if xdist.is_main():  # once, not per torchrun rank
        (sys.stderr if args.json else sys.stdout).write(
            f"{args.dataset}: {len(data.train_y):,} training and {len(data.test_y):,} test "
            f"images, {data.num_classes} classes" + (f" ({'; '.join(over)})" if over else "")
            + "\n")
    backbone, meta = loaded if loaded is not None else \
        xdist.main_first(lambda: _backbone(args, device))
    want = (meta.get("arch") or {}).get("in_channels")
    if want is not None and want != data.in_channels:  # the default backbone, pretrained now
        data = data.with_channels(want)
    seed_everything(args.seed)
    mtm = MultiTaskModel(backbone, spec, arch=meta["arch"], backbone_recipe=meta.get("config"),
                         backbone_file=args.backbone).to(device)
    new_bundle = not (args.bundle and Path(args.bundle).exists())
    if not new_bundle:
        mtm.load_bundle(args.bundle)
    # an image folder is recorded by its absolute path, so eval finds it from anywhere
    mtm.add_task(task, data.num_classes, args.method, method_cfg,
                 dataset=dataset_reference(args.dataset))
    record_task_data(mtm, task, args, data, image_size, fingerprint)
    # under torchrun each process takes every world-th batch: a step is world x batch images
    mtm.tasks[task].extra["processes"] = xdist.world_size()
    train_loader, test_loader = data.loaders(args.batch_size, seed=args.seed, size=image_size,
                                             test_batch_size=max(args.batch_size, 256))
    precision = resolve_precision(args.precision, device)
    tr = train_task(mtm, task, train_loader, args.epochs, device, progress=not args.no_progress,
                    precision=precision, cuda_graph=cuda_graph)
    acc = evaluate_task(mtm, task, test_loader, device)
    mtm.tasks[task].extra["train_steps"] = tr.steps
    if xdist.is_main():
        from xbm.io import folder_lock

        with folder_lock(out):  # another adapt may be writing the same bundle
            order = _fold_in_concurrent_tasks(mtm, out, args.bundle, bundle_meta, task)
            mtm.save_bundle(out, tasks=order)
        new_bundle = order == [task]  # another run may have created it meanwhile
    rec = {"method": args.method, "task": task, "accuracy": round(acc, 4),
           "mask_bits": mtm.mask_bits(task), "reprogrammed_cells": mtm.reprogrammed_cells(task),
           "masked_off_columns": mtm.masked_off_columns(task),
           "trainable_params": mtm.trainable_params(task),
           "train_seconds": round(tr.train_seconds, 3), "train_steps": tr.steps,
           "batch_size": args.batch_size, "processes": xdist.world_size(),
           "precision": precision,
           "cuda_graph": tr.cuda_graph, "train_images": len(data.train_y),
           "test_images": len(data.test_y), "classes": data.num_classes,
           "image_size": image_size, "in_channels": data.in_channels,
           "bundle": str(out), "new_bundle": new_bundle}
    subset = " (a subset; xbm eval scores all by default)" if len(data.test_y) < full[1] else ""
    print(json.dumps(rec, indent=2) if args.json else
          f"{task}: {args.method} accuracy {acc:.2f}% on {len(data.test_y):,} test images"
          f"{subset} | "
          f"mask {rec['mask_bits']:,} bits | "
          f"re-programmed cells {rec['reprogrammed_cells']:,} | saved {out}"
          f"{' (a new bundle)' if new_bundle else f' ({len(mtm.tasks)} tasks)'}")
    return 0


def _fold_in_concurrent_tasks(mtm: Any, out: str | os.PathLike, bundle: str | None,
                              loaded_meta: dict[str, Any] | None, task: str) -> list[str]:
    """The tasks ``adapt`` saves to ``out``, in order, after folding in what other commands wrote
    there while this one trained (the caller holds the folder's lock).

    Two ``xbm adapt --bundle B`` runs started together each read B, train for minutes and save
    B with their own task added: without this the second save dropped the first one's task.
    Tasks written meanwhile are loaded from the file as it is now (the same backbone and spec,
    or the load refuses) and kept ahead of this run's task.

    Raises:
        XbmError: ``out`` is not the bundle being updated yet now exists, or holds a task of
            this run's name: nothing is written.
    """
    from xbm.multitask import read_bundle_meta

    p = Path(out)
    if not p.exists():
        return list(mtm.tasks)
    if bundle is None or p.resolve() != Path(bundle).resolve():
        raise XbmError(f"{out} was written by another command while this one trained; nothing "
                       f"written: pass --bundle {out} to add the task to it, or another --out")
    lost = ("nothing written: run again with --out NEW.safetensors to keep the task in a "
            "bundle of its own")
    try:
        meta, _, infos = read_bundle_meta(p)
    except XbmError as exc:
        raise XbmError(f"{out} was rewritten by another command while this one trained and "
                       f"cannot be read now ({exc}); {lost}") from None
    names = [t.name for t in infos]
    if loaded_meta is not None and meta.get("content_hash") == loaded_meta.get("content_hash") \
            and names == [t["name"] for t in loaded_meta.get("tasks", [])]:
        return list(mtm.tasks)  # unchanged since it was read: the common case
    if task in names:
        raise XbmError(f"{out}: another command added a task named {task!r} to it while this one "
                       "trained; nothing written: run again with --task OTHER_NAME")
    for t in [t for t in mtm.tasks if t != task]:  # the bundle as read, replaced by the file now
        mtm.remove_task(t)
    had = {t["name"] for t in (loaded_meta or {}).get("tasks", [])}
    try:
        mtm.load_bundle(p)
    except XbmError as exc:  # another backbone or crossbar spec
        raise XbmError(f"{out} was rewritten by another command while this one trained, for "
                       f"another backbone or crossbar spec ({exc}); {lost}") from None
    new = [n for n in names if n not in had]
    if new:
        print(f"{out}: kept task(s) {', '.join(new)}, added by another command while this one "
              "trained", file=sys.stderr)
    return [*names, task]


def cmd_eval(args: argparse.Namespace) -> int:
    from xbm.multitask import MultiTaskModel, read_bundle_meta
    from xbm.train import distributed as xdist
    from xbm.train import evaluate_task, resolve_device

    _check_counts(args, ("batch_size", "test_subset"))
    device = resolve_device(args.device)
    meta, spec, infos = read_bundle_meta(args.bundle)  # before the backbone: cheap checks first
    if args.task and args.task != "base" and args.task not in {t.name for t in infos}:
        raise XbmError(f"{args.bundle}: no task {args.task!r}; it holds "
                       f"{', '.join(t.name for t in infos) or 'no tasks'} (and 'base', the "
                       "backbone's own task)")
    check_dataset_flag(args, infos)
    backbone, bmeta = xdist.main_first(lambda: _backbone(args, device, meta))
    mtm = MultiTaskModel(backbone, spec, arch=bmeta["arch"]).to(device)
    names = mtm.load_bundle(args.bundle)
    todo = [args.task] if args.task else names
    out = []
    # a row as each task finishes (a bundle of many tasks on a CPU takes minutes); under --json
    # stdout holds the JSON alone, so the rows go to stderr as progress, unless --no-progress
    wt = max([4, *(len(t) for t in todo)])
    wd = max([7, *(len((mtm.tasks[t].dataset if t in mtm.tasks else bmeta.get("dataset"))
                       or "") for t in todo)])
    head = f"{'task':<{wt}}  {'method':<13} {'dataset':<{wd}}  accuracy  test images"
    rows_to = None if args.json and args.no_progress else sys.stderr if args.json else sys.stdout
    if rows_to is not None and not xdist.is_main():
        rows_to = None
    for i, t in enumerate(todo):
        # the same seed as `xbm adapt --seed`, so its --test-subset draws the same images
        if t == "base":
            seed = _eval_seed(args, (bmeta.get("config") or {}).get("seed"))
            ds, data, size = _base_task_data(args, bmeta, list(mtm.tasks.values()), seed)
        else:
            seed = _eval_seed(args, (mtm.tasks[t].extra or {}).get("seed"))
            ds, data, size = _task_data(args, mtm.tasks[t], None, args.test_subset,
                                        seed=seed,
                                        channels=(bmeta.get("arch") or {}).get("in_channels"),
                                        default_side=backbone_default_side(bmeta))
        _, test_loader = data.loaders(args.batch_size, seed=seed, size=size)
        if i == 0 and rows_to is not None:  # once the first task's data is found: a missing
            # dataset's error then stands alone, not under a table header with no rows
            if args.json:  # the rows go to stderr beside the JSON: say what they are
                print(f"evaluating {len(todo)} task(s):", file=rows_to)
            print(head, file=rows_to, flush=True)
        acc = evaluate_task(mtm, t, test_loader, device)
        r = {"task": t, "method": "base" if t == "base" else mtm.tasks[t].method, "dataset": ds,
             "accuracy": round(acc, 4), "test_images": len(data.test_y), "seed": seed,
             "image_size": size}
        out.append(r)
        if rows_to is not None:
            print(f"{r['task']:<{wt}}  {r['method']:<13} {r['dataset']:<{wd}}  "
                  f"{r['accuracy']:>7.2f}%  {r['test_images']:>11,}", file=rows_to, flush=True)
    if args.json:  # an object, as adapt's and cost's: what was evaluated, then the tasks
        print(json.dumps({"bundle": str(args.bundle), "backbone_hash": bmeta.get("content_hash"),
                          "seed": args.seed, "test_subset": args.test_subset, "tasks": out},
                         indent=2))
    return 0


# -- map / methods ---------------------------------------------------------------------------
def cmd_map(args: argparse.Namespace) -> int:
    import torch

    from xbm.hardware import map_model
    from xbm.models import create_model

    spec = spec_from_args(args)
    kw = {k: v for k, v in (("in_channels", args.in_channels), ("width", args.width))
          if v is not None}
    if args.backbone:  # its architecture, from the header: no weights are read
        from xbm.train.pretrain import backbone_file_arch

        if not Path(args.backbone).is_file():
            raise XbmError(f"--backbone {args.backbone} "
                           + ("is a folder, not a backbone file" if Path(args.backbone).is_dir()
                              else "does not exist"))
        arch = backbone_file_arch(args.backbone)
        if not arch or not arch.get("name"):
            raise XbmError(f"--backbone {args.backbone}: no xbm backbone file (xbm pretrain or "
                           "xbm import-backbone write one), or it is unreadable")
        source = f"the backbone {args.backbone}"
        _check_arch_flags(args, arch, source)
        ch = args.in_channels
        if ch is not None and arch.get("in_channels") is not None and ch != arch["in_channels"]:
            raise ConfigError(f"--in-channels {ch} contradicts {source} "
                              f"({arch['in_channels']}); drop the flag")
        args.model = arch["name"]
        kw = {k: arch[k] for k in ("in_channels", "width", "num_classes")
              if arch.get(k) is not None}
    elif not args.model:
        raise ConfigError("pass --model NAME (e.g. resnet50) or --backbone FILE")
    with torch.device("meta"):
        model = create_model(args.model, **kw)
    report = map_model(model, spec)
    # the sizes mapped, the model's own defaults resolved: each family has its own (small_cnn
    # 8, the CIFAR ResNets 16, ...), which need not be the backbone a command trained
    from xbm.models.registry import model_defaults

    defaults = model_defaults(args.model)
    model_info = {"name": args.model} | {k: kw.get(k, defaults[k])
                                         for k in ("width", "in_channels")}
    if args.json:
        print(json.dumps({"model": model_info} | report.to_dict(), indent=2))
    else:
        print(f"model {args.model}, width {model_info['width']}, "
              f"{model_info['in_channels']} input channel(s)")
        print(report.table())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from xbm.methods import METHODS

    for name, cls in METHODS.items():
        flag = "re-programs cells" if cls.reprograms_cells else "no re-programming"
        print(f"{name:<14} {flag:<18} {cls.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from xbm.models import list_models
    from xbm.models.registry import model_defaults

    print(f"{'model':<16} {'width':>6} {'in_channels':>11} {'num_classes':>11}")
    for name in list_models():
        d = {k: "-" if v is None else v for k, v in model_defaults(name).items()}
        print(f"{name:<16} {d['width']:>6} {d['in_channels']:>11} {d['num_classes']:>11}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (as every other xbm error) instead of the whole
    usage block, naming the sub-command's --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"xbm: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from xbm import __version__
    from xbm.data.augment import AUGMENTATIONS
    from xbm.methods import list_methods
    from xbm.train.pretrain import PRECISIONS, PretrainConfig

    # no abbreviations of the top-level flags: `--plugi M` was taken for --plugin, whose
    # modules are imported before parsing (so an abbreviation would be parsed, not imported)
    p = _Parser(prog="xbm", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"xbm {__version__}")
    p.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import MODULE (a module name, found on PYTHONPATH or in the working "
                   "directory, or a .py file's path) before anything else, so the methods, "
                   "datasets, models and presets it registers can be named (repeatable; "
                   f"also {PLUGINS_ENV}=MOD1,MOD2)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, seed_help: str,
               root_help: str = "folder with dataset files (default: installed)") -> None:
        sp.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:N")
        sp.add_argument("--seed", type=seed_arg, default=0, help=seed_help)
        sp.add_argument("--data-root", help=root_help)
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")

    d = sub.add_parser("demo", help="the main job: pretrain, adapt with every method, compare")
    d.add_argument("--out", default="runs/demo",
                   help="output folder for results.json (default: %(default)s)")
    d.add_argument("--config", help="YAML file of demo fields (CLI flags override it)")
    d.add_argument("--methods", help=f"comma list from: {', '.join(list_methods())}")
    d.add_argument("--benchmark", help="task set (default mnist-family: Fashion-MNIST base; "
                   "MNIST, Animal-MNIST, letters)")
    d.add_argument("--epochs", type=int, help="adaption epochs per task (default 2)")
    d.add_argument("--pretrain-epochs", type=int,
                   help=f"backbone pretraining epochs (default {PretrainConfig.epochs})")
    d.add_argument("--pretrain-subset", type=int, help="seeded subset of the base task's "
                   "training images for pretraining (default: all 60,000; for a quick try)")
    d.add_argument("--pretrain-augment", choices=list(AUGMENTATIONS),
                   help=f"backbone pretraining augmentation (default {PretrainConfig.augment})")
    d.add_argument("--pretrain-mixup", type=float, metavar="ALPHA",
                   help="backbone pretraining mixup alpha, 0 = off "
                   f"(default {PretrainConfig.mixup:g})")
    d.add_argument("--pretrain-precision", choices=list(PRECISIONS),
                   help="backbone pretraining precision (default auto: bf16 on CPUs with "
                   "native bf16 units, where it takes about half the time, else fp32; each "
                   "gives its own backbone)")
    d.add_argument("--precision", choices=list(PRECISIONS),
                   help="adaption precision (default auto: bf16 autocast on CPUs with native "
                   "bf16 units, else fp32; scores, masks and evaluation stay fp32)")
    d.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each adaption step from a CUDA graph (default: on with CUDA; "
                   "4-5x faster at batch 32 on an H200; XMA2 from its PE selection on; "
                   "--no-cuda-graph trains eagerly with plain Adam, as the GPU figures recorded "
                   "before graphs became the default)")
    d.add_argument("--train-subset", type=int, help="training images per task (default 6000)")
    d.add_argument("--test-subset", type=int, help="test images per task (default 2000)")
    d.add_argument("--batch-size", type=int, help="adaption batch size (default 32)")
    d.add_argument("--width", type=int, help="backbone width (default: 16 on CPU, 64 on CUDA, "
                   "for every model a --config YAML's model: names)")
    from xbm.hardware.energy import PRESETS as ENERGY_PRESETS
    from xbm.hardware.spec import SPEC_PRESETS

    d.add_argument("--preset", help=f"crossbar preset: {', '.join(sorted(SPEC_PRESETS))} "
                   "(default: default = pytorx, 64x64)")
    add_geometry_args(d)
    d.add_argument("--energy", help="energy preset of the table's energy columns: "
                   f"{', '.join(sorted(ENERGY_PRESETS))} (default: default = neurosim)")
    d.add_argument("--device", help="auto (CUDA if present; default), cpu, cuda:N")
    d.add_argument("--seed", type=seed_arg, help="seed of the backbone, the subsets and the masks "
                   "(default 0; each seed pretrains its own backbone unless --pretrain-seed)")
    d.add_argument("--pretrain-seed", type=seed_arg, help="seed of the backbone alone (default: "
                   "--seed); e.g. --pretrain-seed 0 --seed 1 adapts the seed-0 backbone again "
                   "with other subsets and batch order")
    d.add_argument("--data-root", help="folder with dataset files (default: installed)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=cmd_demo)

    pt = sub.add_parser("pretrain", help="pretrain and cache a backbone (safetensors)")
    pt.add_argument("--model", default=DEFAULT_MODEL,
                    help="a registered model (default %(default)s, the demo's)")
    pt.add_argument("--width", type=int, help=WIDTH_HELP)
    pt.add_argument("--dataset", default="fashion-mnist",
                    help="base task: a dataset name or folder:PATH (default %(default)s)")
    pt.add_argument("--epochs", type=int, default=PretrainConfig.epochs,
                    help="default: %(default)s")
    pt.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    pt.add_argument("--lr", type=float, default=2e-3, help="Adam, cosine (default: %(default)g)")
    pt.add_argument("--train-subset", type=int, help="seeded subset of the training images "
                    "(default: all)")
    pt.add_argument("--augment", default=PretrainConfig.augment, choices=list(AUGMENTATIONS),
                    help="random affine augmentation of the base task (default: %(default)s; "
                    "'affine' does not mirror, for classes that are not mirror-symmetric)")
    pt.add_argument("--mixup", type=float, default=PretrainConfig.mixup, metavar="ALPHA",
                    help="mixup alpha while pretraining, 0 = off (default: %(default)g)")
    pt.add_argument("--precision", default=PretrainConfig.precision, choices=list(PRECISIONS),
                    help="bf16 runs forward and loss under bfloat16 autocast: faster on CPUs "
                    "with AMX or AVX512-BF16 and on GPUs, slower elsewhere; a separate cached "
                    "backbone. auto = bf16 on such CPUs, fp32 otherwise and on CUDA "
                    "(default: %(default)s)")
    pt.add_argument("--image-size", type=int, default=PretrainConfig.image_size,
                    help="side the base task is fed at: an image folder is read at it, a "
                    "built-in dataset resized to it; adapt on this backbone defaults to it "
                    "(default: %(default)s)")
    pt.add_argument("--channels", type=int, choices=(1, 3),
                    help="3: an RGB backbone (an image folder read in colour, a grayscale "
                    "dataset repeated into RGB), for RGB tasks (default: the dataset's own; "
                    "an image folder is read as grayscale)")
    pt.add_argument("--out", help="output .safetensors (default: the cache)")
    pt.add_argument("--force", action="store_true",
                    help="pretrain even when the recipe is cached (a folder dataset is cached "
                    "by its path, not its images: force after changing them); overwrite an "
                    "existing --out. The previous cached backbone is kept under its hash")
    common(pt, "the backbone's seed (default 0)")
    pt.set_defaults(func=cmd_pretrain)

    im = sub.add_parser("import-backbone",
                        help="write your own checkpoint (torchvision-format state dict) as an "
                             "xbm backbone file that --backbone takes")
    im.add_argument("--model", required=True, help="the registered model the checkpoint is "
                    "for, e.g. resnet50 (torchvision's key names)")
    im.add_argument("--checkpoint", required=True,
                    help=".pth/.pt (torch.save; weights only) or .safetensors state dict; a "
                    "{'state_dict': ...} or {'model': ...} wrapper and a prefix of every key "
                    "('module.', Lightning's 'model.') are accepted")
    im.add_argument("--out", required=True, help="backbone file to write (.safetensors)")
    im.add_argument("--num-classes", type=int, help="classes of the checkpoint's head "
                    "(default: the model's, e.g. 1000 for resnet50)")
    im.add_argument("--in-channels", type=int, help="default: the model's")
    im.add_argument("--width", type=int, help="default: the model's")
    im.add_argument("--dataset", default="imported",
                    help="what it was trained on, recorded (default %(default)s)")
    im.add_argument("--accuracy", type=float, help="its accuracy there, recorded (default: "
                    "unknown)")
    im.add_argument("--image-size", type=int,
                    help="the image side it was trained at, recorded: adapt, eval, cost and "
                         "simulate feed images at it unless given --image-size/--input-size "
                         "(not given: they take the family's, 224 for an ImageNet-layout "
                         "model such as resnet50, else 28)")
    im.add_argument("--force", action="store_true", help="overwrite an existing --out")
    im.set_defaults(func=cmd_import_backbone)

    ad = sub.add_parser("adapt", help="learn one task with one method; save a task bundle")
    ad.add_argument("--method", default="xbm",
                    help=f"default %(default)s; one of: {', '.join(list_methods())}")
    ad.add_argument("--dataset", required=True, help="dataset name or folder:PATH")
    ad.add_argument("--task", help="task name (default: from the dataset)")
    ad.add_argument("--backbone", help=BACKBONE_HELP)
    ad.add_argument("--model", help=MODEL_HELP)
    ad.add_argument("--width", type=int, help=WIDTH_HELP_BUNDLE)
    ad.add_argument("--bundle", help="bundle to add the task to, updated in place; created "
                    "(with a note) if the file does not exist yet")
    ad.add_argument("--out", help="bundle to write (default: --bundle or TASK.safetensors)")
    ad.add_argument("--image-size", type=int, help="image side fed to the backbone (default: "
                    "the bundle's tasks', else the side the backbone was pretrained at or "
                    "import-backbone recorded, else its family's: 224 for an ImageNet layout, "
                    "28 else); an image folder is read at this size and in the backbone's channels "
                    "(RGB for a 3-channel one), a built-in dataset resized to it and repeated "
                    "into RGB")
    ad.add_argument("--epochs", type=int, default=1, help="default: %(default)s")
    ad.add_argument("--batch-size", type=int, default=32,
                    help="training batch (default 32, as the demo, Piggyback and KSM)")
    ad.add_argument("--train-subset", type=int, help="seeded subset of the training images "
                    "(default: all; the demo uses 6000)")
    ad.add_argument("--test-subset", type=int, help="seeded subset of the test images "
                    "(default: all; the demo uses 2000)")
    ad.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                    help="training precision (default auto: bf16 autocast on CPUs with native "
                    "bf16 units, else fp32, as the demo; evaluation stays fp32)")
    ad.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                    help="replay each training step from a CUDA graph (default: on with CUDA; "
                    "4-5x faster at small batches; XMA2 captures after its eager warm-up and PE "
                    "selection)")
    ad.add_argument("--method-config", help="YAML file of method config fields")
    ad.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="method config field, e.g. --set lr=1e-3 (repeatable)")
    ad.add_argument("--json", action="store_true", help="print the run's record as JSON")
    add_spec_args(ad)
    common(ad, "default 0: the subsets, batch order and masks; the default backbone is the "
           "seed-0 one (other seeds: --backbone)")
    ad.set_defaults(func=cmd_adapt)

    ev = sub.add_parser("eval", help="evaluate the tasks of a bundle")
    ev.add_argument("--bundle", required=True, help="task bundle `xbm adapt` wrote")
    ev.add_argument("--task", help="only this task (default: every task of the bundle); base: "
                    "the backbone's own task, on the dataset it was pretrained on")
    ev.add_argument("--dataset", help="dataset (default: the one the task recorded, or the "
                    "backbone's pretraining set for --task base)")
    ev.add_argument("--backbone", help="backbone .safetensors (default: the cached one whose "
                    "hash the bundle records, or the backbone file the bundle records)")
    ev.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    ev.add_argument("--test-subset", type=int, help="seeded subset of the test images "
                    "(default: all)")
    ev.add_argument("--json", action="store_true", help="print the accuracies as JSON")
    common(ev, "draws the --test-subset as `xbm adapt` with this seed drew it (default: the "
           "seed each task was learned with, as adapt recorded it, else 0)",
           root_help=TASK_ROOT_HELP)
    ev.set_defaults(seed=None)
    ev.set_defaults(func=cmd_eval)

    mp = sub.add_parser("map", help="per-layer crossbar mapping report of a registered model")
    mp.add_argument("--model", help="a registered model, e.g. resnet18_cifar (the demo's "
                    "backbone) or resnet50")
    mp.add_argument("--backbone", help="a backbone file instead of --model: its recorded "
                    "architecture is mapped (no weights are read)")
    mp.add_argument("--width", type=int, help="base width of models that take one (default: the "
                    "model's own; the demo's backbone is 16 on CPU, 64 on CUDA)")
    mp.add_argument("--in-channels", type=int, help="input channels (default: the model's own)")
    mp.add_argument("--json", action="store_true", help="print the report as JSON")
    add_spec_args(mp)
    mp.set_defaults(func=cmd_map)

    me = sub.add_parser("methods", help="list the registered adaption methods")
    me.set_defaults(func=cmd_methods)
    mo = sub.add_parser("models", help="list the registered backbones and their default sizes")
    mo.set_defaults(func=cmd_models)

    for mod in EXTENSIONS:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(mod).register(sub, common=common, add_spec_args=add_spec_args)
    return p


#: Arguments that name files or folders: a leading ``~`` is expanded (``--out=~/x`` and
#: ``--out ~/x`` then mean the same).
_PATH_ARGS = ("out", "plot", "json_out", "results", "save_fault_map", "bundle", "backbone",
              "fault_map", "config", "preset_file", "data_root", "fractions_from")


#: Environment variable naming plugin modules (comma-separated), as ``--plugin`` does.
PLUGINS_ENV = "XBM_PLUGINS"


def _take_plugins(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without its ``--plugin MODULE`` options, the modules): they are imported before
    the parser is built, whose help lists the registered names, so they may stand anywhere
    on the command line (up to a ``--``)."""
    rest, mods, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest.extend(argv[i:])
            break
        if tok == "--plugin":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise XbmError("--plugin needs a module name or a .py file's path, e.g. "
                               "--plugin my_methods")
            mods.append(argv[i + 1])
            i += 2
            continue
        head = tok.split("=", 1)[0]
        if len(head) > 3 and head != "--plugin" and "--plugin".startswith(head):
            raise XbmError(f"{head}: write --plugin in full (its modules are imported before "
                           "the command line is parsed)")
        if tok.startswith("--plugin="):
            mods.append(tok.split("=", 1)[1])
        else:
            rest.append(tok)
        i += 1
    return rest, mods


def load_plugins(names: list[str]) -> None:
    """Import each of ``names``: a module name (the working directory is searched too, as
    ``python -m`` would) or the path of a ``.py`` file. What they register
    (``register_method``, ``register_dataset``, ``register_model``, presets) is then known to
    every command, as to a Python script that imports them.

    Raises:
        XbmError: a plugin is missing, empty or fails to import (its error named).
    """
    import importlib.util

    for name in names:
        name = name.strip()
        if not name:
            raise XbmError(f"an empty plugin name (in --plugin or {PLUGINS_ENV}); name a module "
                           "or a .py file")
        path = Path(os.path.expanduser(name))
        try:
            if name.endswith(".py") or os.sep in name or "/" in name:
                if not path.is_file():
                    raise XbmError(f"plugin {name}: no such file; pass a .py file's path or an "
                                   "importable module name")
                where = path.resolve()
                if _loaded_from(where):  # this file, by name or by path: once
                    continue
                # keyed by the whole path: two plugins both called p.py are two modules
                digest = hashlib.sha256(str(where).encode()).hexdigest()[:8]
                mod_name = f"xbm_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
                spec = importlib.util.spec_from_file_location(mod_name, where)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
            else:
                if os.getcwd() not in sys.path and "" not in sys.path:
                    # `xbm` is a script, so the working directory is not searched; appended,
                    # so a file there cannot shadow an installed package
                    sys.path.append(os.getcwd())
                if name not in sys.modules:
                    found = importlib.util.find_spec(name)
                    origin = getattr(found, "origin", None)
                    if origin and _loaded_from(Path(origin).resolve()):
                        continue  # the same file, loaded by its path already
                importlib.import_module(name)
        except XbmError:
            raise
        except ModuleNotFoundError as exc:
            if exc.name and name.split(".")[0] == exc.name.split(".")[0]:
                raise XbmError(f"plugin {name}: no module named {exc.name!r}; run xbm from the "
                               "folder that holds it, add that folder to PYTHONPATH, or pass "
                               "the .py file's path") from None
            raise XbmError(f"plugin {name} failed to import: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the plugin's own bug, named in one line
            raise XbmError(f"plugin {name} failed to import: {type(exc).__name__}: {exc}"
                           ) from None


def _loaded_from(path: Path) -> bool:
    """Whether a loaded module was read from the file ``path``."""
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.endswith(".py") and os.path.basename(f) == path.name:
            try:
                if Path(f).resolve() == path:
                    return True
            except OSError:
                continue
    return False


def _asks_for_help(argv: list[str]) -> bool:
    """Whether the command line asks for help or the version (before any ``--``)."""
    for tok in argv:
        if tok == "--":
            return False
        if tok in ("-h", "--help", "--version") or (len(tok) > 3 and "--help".startswith(tok)):
            return True
    return False


#: Whether this process loaded plugins (an unknown name's hint then says check the spelling).
_PLUGINS_LOADED: list[str] = []


def main(argv: list[str] | None = None) -> int:
    try:
        argv, plugins = _take_plugins(list(sys.argv[1:] if argv is None else argv))
        env = os.environ.get(PLUGINS_ENV, "")
        names = [m for m in env.split(",") if m.strip()] + plugins
        import contextlib

        try:
            with contextlib.redirect_stdout(sys.stderr):  # a plugin's prints: not in --json
                load_plugins(names)
        except XbmError as exc:
            if not _asks_for_help(argv):
                raise
            # help and the version still answer, without what the plugin would register
            print(f"xbm: warning: {exc} (ignored for --help and --version, which then list "
                  "only what is registered without it; other commands stop here)",
                  file=sys.stderr)
        _PLUGINS_LOADED[:] = names
    except XbmError as exc:
        print(f"xbm: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the sub-command's parser, whose --help lists what it takes
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    empty = [k for k, v in vars(args).items() if isinstance(v, str) and not v.strip()]
    if empty:  # `--out ''` wrote TASK.safetensors, `--task ''` evaluated every task
        print(f"xbm: error: --{empty[0].replace('_', '-')} is empty; give it a value or leave "
              "it out", file=sys.stderr)
        return 2
    for name in _PATH_ARGS:  # `--plot=~/p` reaches us unexpanded (no shell did it): a folder
        v = getattr(args, name, None)  # literally named ~ was made in the working directory
        if isinstance(v, str) and v.startswith("~"):
            setattr(args, name, os.path.expanduser(v))
    from xbm.train import distributed as xdist

    if xdist.launched():  # under torchrun: join the group; only rank 0 prints
        xdist.init_from_env()
        if not xdist.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    import warnings

    def _warn(message, category, filename, lineno, file=None, line=None) -> None:
        if xdist.is_main():  # one line, as errors are, and once per run, not per rank
            text = str(message).strip().splitlines() or [""]
            print(f"xbm: warning: {text[0]}{_warning_origin(category, filename, lineno)}",
                  file=sys.stderr)

    shown, warnings.showwarning = warnings.showwarning, _warn
    try:
        _say_if_the_root_is_unread(args)
        return int(args.func(args) or 0)
    except XbmError as exc:
        msg = _name_the_flag(str(exc), argv)
        if isinstance(exc, UnknownNameError) and re.match(
                r"(?:demo \w+: |--[\w-]+: )?unknown (method|dataset|model|energy preset|"
                r"crossbar preset|benchmark) ", msg):
            hint = ("; check the spelling, or that your plugin registers it" if _PLUGINS_LOADED
                    else "; one of your own: pass --plugin MODULE, the module that registers it")
            at = re.search(r" \(in --config [^)]*\)$", msg)  # stays last: where it came from
            msg = msg[:at.start()] + hint + msg[at.start():] if at else msg + hint
        print(f"xbm: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xbm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `xbm map ... | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a file the checks up front could not foresee (disk full, ...)
        where = exc.filename or ""
        what = f"{where}: " if where else "writing the output (standard output or a file): "
        print(f"xbm: error: {what}{exc.strerror or exc}; check the path and free space, then "
              "run again", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown
        xdist.shutdown()


def _say_if_the_root_is_unread(args: argparse.Namespace) -> None:
    """``--data-root`` beside a ``--dataset`` that never reads it (an image folder is its own
    root, digits ships with scikit-learn): it was dropped without a word, and a user who
    meant the folder inside it trained on something else or got "unknown dataset". ``eval``
    and the ``simulate`` sweep say it per task, where the dataset is known
    (:func:`_warn_unread_root`)."""
    ds = getattr(args, "dataset", None)
    if args.command not in ("adapt", "pretrain", "simulate") or \
            (args.command == "simulate" and not args.fault_aware):
        return
    _warn_unread_root(getattr(args, "data_root", None), ds)


def _warn_unread_root(root: str | None, ds: str | None, who: str = "") -> None:
    """Warn that ``root`` is not read by the dataset ``ds`` (see
    :func:`_say_if_the_root_is_unread`); ``who`` names the task it is read for."""
    from xbm.data.registry import image_folder_path, list_datasets, reads_root

    if not (root and ds) or reads_root(ds):
        return
    if image_folder_path(ds) is None and ds not in list_datasets():
        return  # an unknown name: its own error says so
    what = ("an image folder, read from its own path" if image_folder_path(ds) is not None
            else "read from its installed package, never from a root")
    warnings.warn(f"--data-root {root} is not read{who}: --dataset {ds} is {what}", XbmWarning,
                  stacklevel=2)


def _name_the_flag(message: str, argv: list[str]) -> str:
    """Prefix the flag the user typed to a config class's complaint about its field.

    Values are checked where they are used, in the config dataclasses, whose messages name
    fields (``CrossbarSpec.rows must be ...``, ``PretrainConfig.mixup must be ...``); the user
    typed ``--rows`` or ``--pretrain-mixup``. A message that already starts with a flag, or
    whose field no typed flag names, is left as it is."""
    if message.startswith("--"):
        return message
    flags = [tok.split("=", 1)[0] for tok in argv if tok.startswith("--")]
    field = re.match(r"demo (\w+): ", message)  # the demo's field, typed as its flag
    if field and f"--{field[1].replace('_', '-')}" in flags:
        return f"--{field[1].replace('_', '-')}: {message[field.end():]}"

    def says(field: str) -> bool:
        # "rows must be ..." or a comparison, "dac_bits (9) exceeds input_bits (8)"; one
        # value in the brackets, not a shape ("vs model (8, 1, 3, 3)" named no --model)
        return bool(field) and re.search(
            rf"(?<![\w-]){re.escape(field)}(?: must\b| \(-?\d[^,()]*\))", message)

    # a flag named exactly as the field first (--epochs for "demo epochs", not
    # --pretrain-epochs); a prefixed flag only where the message names its class
    for flag in flags:
        if says(flag[2:].replace("-", "_")):
            return f"{flag}: {message}"
    for flag in flags:
        name = flag[2:].replace("-", "_")
        for prefix, owners in (("pretrain_", ("PretrainConfig.",)),
                               ("sim_", ("SimConfig.", "CrossbarSpec."))):
            if name.startswith(prefix) and any(o in message for o in owners) and \
                    says(name.removeprefix(prefix)):
                # the flag says what "demo pretrain_mixup: " said for a --config file
                return f"{flag}: {message.removeprefix(f'demo {name}: ')}"
    return message


def _warning_origin(category: type, filename: str, lineno: int) -> str:
    """Where a warning that another library raised comes from (torch, numpy, ...): empty for
    xbm's own, which read as xbm's words, so a library's notice is not taken for xbm's."""
    from xbm.errors import XbmWarning

    path = Path(filename).resolve()
    if issubclass(category, XbmWarning) or path.is_relative_to(Path(__file__).resolve().parent):
        return ""  # xbm's own (an XbmWarning points at the caller's line, the launcher here)
    parts = path.parts
    where = next((Path(*parts[i + 1:]) for i in range(len(parts) - 1, -1, -1)
                  if parts[i] in ("site-packages", "dist-packages")), Path(path.name))
    return f" ({category.__name__} from {where}:{lineno})"


if __name__ == "__main__":
    sys.exit(main())
