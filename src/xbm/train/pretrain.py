"""Pretraining the base-task backbone and caching it as safetensors with metadata.

No pretrained ImageNet CNN is available offline, so the project pretrains its own backbone on the
base task and caches it; the cache key holds everything that changes the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xbm.config import check_seed, is_finite_number
from xbm.errors import BundleError, ConfigError, XbmError, XbmWarning, user_stacklevel
from xbm.io import (
    check_metadata_hash,
    header_field,
    load_safetensors,
    metadata_hash,
    save_safetensors,
    tensors_hash,
)
from xbm.train.loop import ProgressClock, _progress, cosine_lambda, evaluate, seed_everything

BACKBONE_FORMAT = "xbm-backbone/1"


def cache_dir() -> Path:
    """Where backbones and generated data are cached (``$XBM_CACHE``, default ~/.cache/xbm):
    the data package's rule, so an empty ``XBM_CACHE`` is unset here too (it wrote backbones
    into ./backbones) and a ``~`` in it is expanded."""
    from xbm.data.registry import cache_dir as data_cache_dir

    return data_cache_dir()


#: The default backbone width on CPU: what the demo's 10-minute budget on 2 cores allows.
CPU_WIDTH = 16
#: The default backbone width on a GPU. The column masks' capacity grows with width: at 64 XBM
#: came within 0.8 points of Piggyback and XMA above it on three seeds, against 5.7 and 3.3
#: points below at 16 (docs/benchmarks.md, "GPU session"; both with the earlier 1-epoch,
#: unaugmented backbone); the demo then took ~2 minutes on an H200.
GPU_WIDTH = 64


def accuracy_text(meta: dict[str, Any]) -> str:
    """A backbone's recorded accuracy and what it was measured on: a demo pretrains on the
    whole base task but scores it on the demo's test subset, and a later ``xbm pretrain`` of
    the same recipe finds that figure in the cache (the subset is not part of the cache key)."""
    acc = meta.get("accuracy")
    if not isinstance(acc, (int, float)) or isinstance(acc, bool):
        return "unknown"
    n = meta.get("test_images")
    if not isinstance(n, int) or isinstance(n, bool):  # backbones saved before it was kept
        sub = (meta.get("config") or {}).get("test_subset")
        return f"{acc:.2f}%" + (f" on {sub:,} test images" if isinstance(sub, int) else "")
    return f"{acc:.2f}% on {n:,} test images"


def default_width(device: torch.device | str) -> int:
    """The backbone width to use where the user gave none: ``GPU_WIDTH`` on CUDA, else
    ``CPU_WIDTH``. One rule for ``demo``, ``pretrain``, ``adapt`` and ``simulate --fault-aware``, so
    their default backbone is the same cached one on a given machine (``eval`` takes the
    bundle's own)."""
    return GPU_WIDTH if torch.device(device).type == "cuda" else CPU_WIDTH


#: Pretraining precisions (``PretrainConfig.precision``; ``xbm pretrain --precision``). ``auto``
#: resolves per device: :func:`default_precision`.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) below AVX512_CORE_BF16: under them oneDNN has no
#: native bf16 kernels, whatever the CPU has.
_ISA_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE",
                               "AVX512_CORE_VNNI"})


def native_bf16_cpu() -> bool:
    """True where this CPU has bfloat16 arithmetic units (AMX tiles or AVX512-BF16), on which
    oneDNN runs bf16 convolutions natively; elsewhere autocast emulates bf16, which is expected
    to be slower than fp32 (not measured: every box this project ran on had AMX or, in session
    13, AVX512-BF16). The probes are private torch helpers; a torch without them counts as no.
    A ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) cap below AVX512_CORE_BF16 counts as no
    too: oneDNN then uses none of those units (this is also how the project emulates an
    AVX2-only CPU on its AMX box)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.strip().upper() in _ISA_WITHOUT_BF16:
        return False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except (RuntimeError, AttributeError):
            continue
    return False


def default_precision(device: torch.device | str) -> str:
    """What ``precision="auto"`` means on ``device``: ``bf16`` on a CPU with native bf16 units,
    else ``fp32``.

    Why: pretraining is half of the demo's 10-minute budget on 2 CPU cores, and on such a CPU a
    bf16 step takes 0.48-0.54x the time of an fp32 one while the mask methods' accuracy was the
    same over three seeds (docs/benchmarks.md, "Pretraining in bfloat16"). Without native units
    bf16 is emulated and expected to be slower, and on CUDA pretraining takes seconds and the
    recorded GPU figures are fp32, so both stay fp32. ``fp32``/``bf16`` force one everywhere.
    """
    dev = torch.device(device)
    return "bf16" if dev.type == "cpu" and native_bf16_cpu() else "fp32"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` with ``auto`` replaced by :func:`default_precision` for ``device``: the one
    rule pretraining and adaption (``xbm demo``, ``xbm adapt``) share."""
    return default_precision(device) if precision == "auto" else precision


def _file_safe(name: str) -> str:
    """``name`` as one file-name component: a dataset such as ``folder:/data/cats`` would
    otherwise put the cache entry in sub-folders, where no lookup finds it. Names that are safe
    already (every built-in dataset) stay as they are, so existing cache entries keep their
    names; others get a short hash of the full name, so two folders never share an entry."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')[-40:]}-{digest}"


#: Upper bounds far past any sane value: an Adam learning rate of 1e38 overflows float32
#: inside the optimizer (a traceback), and mixup's Beta(alpha, alpha) sampler hangs near 1e308.
MAX_LR = 1e3
MAX_MIXUP = 1e3


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides the pretrained weights (and so the cache key)."""

    model: str = "resnet18_cifar"
    width: int = 16
    dataset: str = "fashion-mnist"
    epochs: int = 3
    """Three epochs. With augmentation one epoch cost the base task 4 points (86.5% against
    90.7% on the demo's test subset); with augmentation and mixup a third epoch narrowed XBM's
    gap to Piggyback from 2.5 to 1.6-1.8 points on three seeds (docs/benchmarks.md, "Pretraining
    epochs"). Channels-last on the CPU pays for most of the extra epoch."""
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    train_subset: int | None = None
    image_size: int = 28
    """Side the base task is fed at (an image folder is read at it, a built-in dataset
    resized to it); part of the cache key. Adaption on the backbone defaults to it."""
    channels: int | None = None
    """Image channels of the backbone: ``None`` (the dataset's own: 1 for every built-in
    dataset and for an image folder, read as grayscale), 1, or 3 (RGB: an image folder read in
    colour, a grayscale dataset repeated into three channels). 3 is part of the cache key; a
    backbone pretrained on RGB takes RGB tasks in ``xbm adapt``."""
    augment: str = "affine-flip"
    """Random affine augmentation of the base task while pretraining (``xbm.data.augment``):
    ``none``, ``affine`` or ``affine-flip``. A backbone trained on augmented Fashion-MNIST
    serves the mask methods' new tasks better (docs/benchmarks.md, "Pretraining
    augmentation")."""
    mixup: float = 0.4
    """Mixup strength α (Zhang et al., ICLR 2018) while pretraining; 0 turns it off. Each batch
    is blended with a shuffled copy of itself by λ ~ Beta(α, α) and the loss mixes the two
    labels by λ. On top of ``affine-flip`` it raised every method's new-task accuracy and
    narrowed XBM's gap to Piggyback further, for about 1-2 points of base-task accuracy
    (docs/benchmarks.md, "Pretraining augmentation")."""
    test_subset: int | None = None
    """Test images for the reported accuracy (does not change the weights, so not in the key)."""
    precision: str = "auto"
    """``auto``, ``fp32`` or ``bf16``. ``bf16`` runs the forward and loss under bfloat16 autocast
    (weights and optimizer stay float32, and the saved backbone is float32); on a CPU with AMX a
    step took 0.48-0.54x the time of an fp32 one and the mask methods' accuracy was unchanged
    over three seeds (docs/benchmarks.md, "Pretraining in bfloat16"). ``auto`` (default) is
    bf16 on CPUs with native bf16 units and fp32 elsewhere (:func:`default_precision`); it is
    resolved by :meth:`for_device` before the cache key is formed, and a bf16 backbone is a
    different cache entry from an fp32 one."""

    def __post_init__(self) -> None:
        from xbm.data.augment import get_augment

        get_augment(self.augment)  # an unknown name fails here, before any cache lookup
        check_seed(self.seed, "pretraining seed")
        for f in ("epochs", "batch_size", "width", "image_size"):
            v = getattr(self, f)
            if f == "width" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"pretraining {f} must be an integer >= 1, got {v!r}")
        from xbm.models.registry import check_side_range

        check_side_range(self.image_size, "pretraining image_size")
        if self.channels is not None and (self.channels not in (1, 3)
                                          or isinstance(self.channels, bool)):
            raise ConfigError(f"pretraining channels must be 1 (grayscale) or 3 (RGB), got "
                              f"{self.channels!r}")
        for f in ("train_subset", "test_subset"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"pretraining {f} must be an integer >= 1 (leave it out for "
                                  f"the whole split), got {v!r}")
        if not (is_finite_number(self.lr) and 0 < self.lr <= MAX_LR):
            raise ConfigError(f"pretraining lr must be a number in (0, {MAX_LR:g}], got "
                              f"{self.lr!r}")
        # betavariate never returns for alpha near 1e308 (inf too); mixup's alpha is ~0.1-1
        if not (is_finite_number(self.mixup) and 0 <= self.mixup <= MAX_MIXUP):
            raise ConfigError(f"PretrainConfig.mixup must be a number in [0, {MAX_MIXUP:g}] "
                              f"(0 = off), got {self.mixup!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown pretraining precision {self.precision!r}; choose one of "
                              f"{', '.join(PRECISIONS)}")

    def for_device(self, device: torch.device | str) -> PretrainConfig:
        """This config with ``precision="auto"`` resolved for ``device`` (itself otherwise)."""
        if self.precision != "auto":
            return self
        return replace(self, precision=resolve_precision(self.precision, device))

    def cache_name(self, root: str | os.PathLike | None = None) -> str:
        """The cache file name: every field that changes the weights. Needs a resolved
        precision (:meth:`for_device`), since ``auto`` names different backbones on different
        machines. ``root``, a ``--data-root`` the data came from, adds a hash of its absolute
        path: a backbone trained on a user's own copy must neither replace the default one nor
        be taken for it. A dataset that reads no root (an image folder, digits) ignores it."""
        if self.precision == "auto":
            raise ValueError("PretrainConfig.cache_name() needs a resolved precision; call "
                             "for_device(device) first")
        sub = f"-n{self.train_subset}" if self.train_subset else ""
        aug = "" if self.augment == "none" else f"-{self.augment}"
        aug += f"-mixup{_num(self.mixup)}" if self.mixup > 0 else ""
        aug += "" if self.precision == "fp32" else f"-{self.precision}"
        aug += "-rgb" if self.channels == 3 else ""  # None, 1: every earlier backbone's name
        from xbm.data.registry import reads_root

        # a root the dataset never reads (an image folder, digits) names nothing it trained on
        if root is not None and str(root) and reads_root(self.dataset):
            where = os.path.abspath(os.path.expanduser(os.fspath(root)))
            aug += "-root" + hashlib.sha256(where.encode()).hexdigest()[:8]
        return (f"{self.model}-w{self.width}-{_file_safe(self.dataset)}-e{self.epochs}"
                f"-b{self.batch_size}"
                f"-lr{_num(self.lr)}-s{self.seed}{sub}-{self.image_size}px{aug}.safetensors")

    def differs_from(self, other: PretrainConfig) -> list[str]:
        """The fields that change the weights (every one :meth:`cache_name` names) on which
        ``other`` differs, each as ``"name mine vs other"``."""
        def norm(f: str, v: Any) -> Any:
            return (3 if v == 3 else 1) if f == "channels" else v  # None: 1 (as stored)

        return [f"{f} {getattr(self, f)!r} vs {getattr(other, f)!r}" for f in WEIGHT_FIELDS
                if norm(f, getattr(self, f)) != norm(f, getattr(other, f))]


#: PretrainConfig fields that change a backbone's weights (test_subset only scores it).
WEIGHT_FIELDS = ("model", "width", "dataset", "epochs", "batch_size", "lr", "seed",
                 "train_subset", "image_size", "channels", "augment", "mixup", "precision")


def _num(x: float) -> str:
    """A float in a cache name: ``%g`` as every earlier name has it, or the full ``repr`` where
    ``%g`` would round (lr 1.0000004e-3 and 1e-3 shared one file)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def build_model(arch: dict[str, Any]) -> nn.Module:
    from xbm.models import create_model

    return create_model(arch["name"], num_classes=arch["num_classes"],
                        in_channels=arch["in_channels"], width=arch.get("width"))


def _relayout(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Re-lay out the 4-D parameters (and their gradients) in place: each stays the very
    ``Parameter`` the optimizer holds, whatever ``torch.__future__``'s conversion setting (under
    which ``model.to`` may create new ones and leave the optimizer training orphans). Adam's
    state keeps its layout, which costs speed, not values."""
    def copy(t: torch.Tensor) -> torch.Tensor:
        # not .contiguous(memory_format=...): a 1x1 kernel counts as contiguous in either
        # format and is returned as it is, strides and all, and oneDNN picks its algorithm
        # from the strides (a channels-last 1x1 kernel kept the odd batch on the crashing path)
        return torch.empty_like(t, memory_format=memory_format).copy_(t)

    for p in model.parameters():
        if p.dim() == 4:
            p.data = copy(p.data)
            if p.grad is not None:
                p.grad = copy(p.grad)


def pretrain(cfg: PretrainConfig, device: torch.device, out: str | Path | None = None,
             root: str | None = None, progress: bool = True, log=print
             ) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``cfg.model`` on ``cfg.dataset`` and save it (atomically) to ``out``."""
    from xbm.data import load_dataset
    from xbm.data.augment import get_augment
    from xbm.data.folder import images_look_grey

    cfg = cfg.for_device(device)
    augment = get_augment(cfg.augment)
    data = load_dataset(cfg.dataset, root=root, image_size=cfg.image_size,
                        channels=cfg.channels)
    data.say_if_colour_was_dropped()
    if data.in_channels == 3 and images_look_grey(data.train_x):
        warnings.warn(f"{cfg.dataset}: every training image is grayscale, read as three "
                      "(near-)equal RGB channels: the backbone can learn no colour features "
                      "from it, and pretraining it with one channel does the same with a third "
                      "of the input work", XbmWarning, stacklevel=user_stacklevel())
    if cfg.train_subset and cfg.train_subset > len(data.train_y):
        # it would train on the whole set, cached under a name that says otherwise
        raise ConfigError(f"train_subset {cfg.train_subset} exceeds the {len(data.train_y)} "
                          f"training images of {cfg.dataset}; drop it (--train-subset) to use "
                          "them all")
    if cfg.train_subset or cfg.test_subset:
        data = data.subset(cfg.train_subset, cfg.test_subset, seed=cfg.seed)
    seed_everything(cfg.seed)
    arch = {"name": cfg.model, "num_classes": data.num_classes,
            "in_channels": data.in_channels, "width": cfg.width}
    model = build_model(arch).to(device)
    # oneDNN's x86 convolutions are faster on NHWC activations: a step takes 0.83x the time
    # (benchmarks/bench_pretrain.py). The weights go back to the standard layout before they
    # are returned or saved, so a fresh and a cached backbone are the same tensors.
    channels_last = device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # ...but not for a batch of odd size: torch 2.13's oneDNN corrupts the heap in the weight
    # gradient of a channels-last convolution there (AVX512-BF16 box, session 19: a segfault or
    # "double free" for batches of 3, 5, 7, ..., 67, 99, 127, plain torch, weights channels-last;
    # none with the standard layout or any even batch; a lone strided 1x1 convolution with 8
    # input channels is enough, likely oneDNN issue #6035, "1x1 convolution backward_weights
    # writes past the rtus workspace (nhwc, IC < ic_block)"). Such a batch (an odd last batch,
    # an odd --batch-size) runs in the standard layout; the default recipe's are all even.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    train_loader, test_loader = data.loaders(cfg.batch_size, seed=cfg.seed, size=cfg.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    total = cfg.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))
    # the augmentation's own stream, so turning it on does not change the batch order
    aug_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7)
    mix_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 11)
    mix_rng = random.Random(cfg.seed * 1_000_003 + 13)  # λ ~ Beta: torch has no seeded sampler
    bf16 = cfg.precision == "bf16"
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support; "
                          "pretrain with --precision fp32")
    stored = tuple(int(v) for v in data.train_x.shape[2:])
    resized = "" if stored == (cfg.image_size, cfg.image_size) else \
        f", stored {stored[0]}x{stored[1]}"  # resized in each batch, as adapt says too
    log(f"pretraining {cfg.model} (width {cfg.width}) on {cfg.dataset}: "
        f"{len(data.train_y)} images ({data.in_channels}x{cfg.image_size}x{cfg.image_size}"
        f"{resized}) x {cfg.epochs} epochs on {device}, "
        f"augmentation {cfg.augment}" + (f", mixup {cfg.mixup:g}" if cfg.mixup > 0 else "")
        + (", bfloat16 autocast" if bf16 else ""))
    t0 = time.perf_counter()
    model.train()
    clock = ProgressClock()
    for epoch in range(cfg.epochs):
        it = _progress(train_loader, len(train_loader), f"pretrain ep {epoch + 1}/{cfg.epochs}",
                       progress, later_epochs=cfg.epochs - epoch - 1, clock=clock)
        for x, y in it:
            x, y = x.to(device), y.to(device)
            if augment is not None:
                x = augment(x, aug_gen)
            if channels_last:
                want = torch.channels_last if x.shape[0] % 2 == 0 else torch.contiguous_format
                if want != layout:
                    _relayout(model, want)
                    layout = want
                if x.dim() == 4:
                    x = x.contiguous(memory_format=want)
            if cfg.mixup > 0:
                lam = mix_rng.betavariate(cfg.mixup, cfg.mixup)
                perm = torch.randperm(x.shape[0], generator=mix_gen).to(device)
                x = lam * x + (1 - lam) * x[perm]
            # a fresh autocast context per step: autocast caches its bf16 copies of the weights
            # until the context exits, so one context around the loop would freeze them
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x).float()
            if cfg.mixup > 0:
                loss = (lam * F.cross_entropy(logits, y)
                        + (1 - lam) * F.cross_entropy(logits, y[perm]))
            else:
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{float(loss.detach()):.3f}")
    secs = time.perf_counter() - t0
    acc = evaluate(model, test_loader, device)
    chance = 100.0 / max(data.num_classes, 1)
    # within a tenth of the way from chance to 100%: every task adapted on it would inherit
    # the failure, quietly
    if acc < chance + 0.1 * (100.0 - chance):
        warnings.warn(f"the backbone reached {acc:.2f}% on {cfg.dataset}'s test set, near chance "
                      f"({chance:.1f}% for {data.num_classes} classes): mask methods can only "
                      "select among the features it computes; pretrain longer, wider or on more "
                      "images (xbm pretrain --epochs, --width, --train-subset; xbm demo "
                      "--pretrain-epochs, --width, --pretrain-subset)", XbmWarning,
                      stacklevel=user_stacklevel())
    model = model.cpu().to(memory_format=torch.contiguous_format)
    state = model.state_dict()
    meta = {
        "format": BACKBONE_FORMAT,
        "arch": arch,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        # the data root goes with the recipe: without it no command could rebuild the backbone
        "config": cfg.__dict__ | ({"data_root": os.path.abspath(os.path.expanduser(root))}
                                  if root else {}),
        "accuracy": acc,
        # the labels' names: an image folder's follow its sorted class folders, so a renamed
        # class would swap them for `xbm eval --task base` (checked there)
        "classes": [str(c) for c in data.classes],
        "test_images": int(data.test_y.numel()),
        "train_seconds": secs,
        "content_hash": tensors_hash(state),
        "torch": torch.__version__,
    }
    meta["meta_hash"] = metadata_hash(meta)
    log(f"pretrained: {cfg.dataset} test accuracy {acc:.2f}% ({len(data.test_y):,} test images) "
        f"in {secs:.0f}s")
    if out is not None:
        save_safetensors(out, state, meta)
    return model, meta


def load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a backbone saved by :func:`pretrain` or :func:`import_backbone`, checking its
    content hash."""
    if Path(path).suffix in (".pth", ".pt", ".bin", ".ckpt"):  # a torch checkpoint, not ours
        raise BundleError(f"{path}: a torch checkpoint, not an xbm backbone file; convert it "
                          "once with `xbm import-backbone --model NAME --checkpoint "
                          f"{path} --out backbone.safetensors` and pass that file")
    tensors, meta = load_safetensors(path)
    if meta.get("format") != BACKBONE_FORMAT or "arch" not in meta:
        if str(meta.get("format", "")).startswith("xbm-task-bundle"):
            raise BundleError(f"{path}: this is a task bundle, not a backbone; pass it as "
                              "--bundle (its backbone is found by the hash it records)")
        raise BundleError(f"{path}: not an xbm backbone file (no backbone metadata); pass a "
                          "file `xbm pretrain` wrote, or convert a state dict of your own with "
                          "`xbm import-backbone`")
    check_metadata_hash(path, meta, "backbone", "re-run pretrain (or import-backbone)")
    if tensors_hash(tensors) != meta.get("content_hash"):
        raise BundleError(f"{path}: content hash mismatch; the file is corrupt, re-run pretrain")
    model = build_model(meta["arch"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise BundleError(f"{path}: weights do not fit {meta['arch']['name']} ({first})") from None
    # where it came from, for MultiTaskModel's arch/backbone_recipe/backbone_file defaults: a
    # bundle made from Python then records them without being told (and `xbm eval` finds its
    # backbone); the bundle's content hash still decides whether a file is the right one
    # (a cache entry is not recorded as a file: commands find it by its hash anyway)
    file = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    in_cache = file.resolve().parent == (cache_dir() / "backbones").resolve()
    model._xbm_source = {"arch": dict(meta["arch"]), "recipe": meta.get("config"),
                         "file": None if in_cache else str(file),
                         "hash": meta.get("content_hash")}
    return model, meta


def import_backbone(model: str, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
                    out: str | os.PathLike, num_classes: int | None = None,
                    in_channels: int | None = None, width: int | None = None,
                    dataset: str = "imported", accuracy: float | None = None,
                    image_size: int | None = None) -> dict[str, Any]:
    """Write a user's checkpoint (a torchvision-format state dict, ``.pth`` or
    ``.safetensors``, or from Python the state dict itself: ``net.state_dict()`` of a model
    trained in a script) as an xbm backbone file, so every command's ``--backbone`` takes it.

    The weights load strictly by key name (:func:`xbm.models.load_torchvision_state_dict`);
    sizes left out are the model's defaults (``xbm.models.registry.model_defaults``).
    ``image_size``, the side the checkpoint was trained at, is recorded: ``adapt``, ``eval``,
    ``cost`` and ``simulate`` feed images at it unless told otherwise. Left out, they take the
    family's usual side, 224 for a model that defaults to 3 channels (an ImageNet layout),
    else 28 (``adapt`` and ``eval`` used to take 28 for every model, where ``cost`` took 224).
    Returns the metadata written.

    Raises:
        XbmError: an unknown model, or a checkpoint that cannot be read or does not fit it.
    """
    from xbm.models import create_model, load_torchvision_state_dict
    from xbm.models.registry import model_defaults

    d = model_defaults(model)  # an unknown name fails here, in one line
    arch = {"name": model,
            "num_classes": num_classes if num_classes is not None else d["num_classes"],
            "in_channels": in_channels if in_channels is not None else d["in_channels"],
            "width": width if width is not None else d["width"]}
    if accuracy is not None and not (isinstance(accuracy, (int, float))
                                     and 0 <= accuracy <= 100):
        raise XbmError(f"--accuracy must be a top-1 percentage in [0, 100], got {accuracy!r}")
    from xbm.models.registry import check_input_side, check_side_range

    if image_size is not None:  # before the checkpoint is read
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise XbmError(f"--image-size must be an integer, got {image_size!r}")
        check_side_range(image_size, "--image-size")
        check_input_side(model, image_size, in_channels=arch["in_channels"] or 1,
                         width=arch["width"])
    net = create_model(model, **{k: v for k, v in arch.items() if k != "name" and v is not None})
    load_torchvision_state_dict(net, checkpoint)
    state = net.state_dict()
    source = "the state dict" if isinstance(checkpoint, Mapping) else \
        os.path.abspath(os.fspath(checkpoint))
    for k, v in state.items():  # copied into the model's tensors: check what arrived
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise XbmError(f"{source}: tensor {k} holds NaN or infinite values; a backbone "
                           "programmed with them computes nothing useful: export the weights "
                           "again from a healthy checkpoint")
    meta = {"format": BACKBONE_FORMAT, "arch": arch, "dataset": dataset, "accuracy": accuracy,
            "content_hash": tensors_hash(state), "torch": torch.__version__,
            "imported_from": source}
    if image_size is not None:
        meta["image_size"] = image_size
    meta["meta_hash"] = metadata_hash(meta)
    save_safetensors(out, {k: v.contiguous() for k, v in state.items()}, meta)
    return meta


def backbone_file_hash(path: str | Path) -> str | None:
    """The content hash a backbone file's header records; None for a missing or unreadable
    file (the tensors themselves are checked against it when the file is loaded)."""
    found = header_field(path, "content_hash")
    return found if isinstance(found, str) else None


def backbone_file_arch(path: str | Path) -> dict[str, Any] | None:
    """The architecture a backbone file's header records, read without its tensors; None for
    a missing or unreadable file (loading it says why)."""
    arch = header_field(path, "arch")
    return arch if isinstance(arch, dict) else None


def backbone_file_recipe(path: str | Path) -> dict[str, Any] | None:
    """The pretraining recipe (``PretrainConfig`` fields) a backbone file's header records,
    read without its tensors; None for an imported backbone, which has none, or a missing or
    unreadable file."""
    recipe = header_field(path, "config")
    return recipe if isinstance(recipe, dict) else None


def backbone_side(meta: Mapping[str, Any] | None) -> int | None:
    """The image side a backbone is fed at by default: the side its recorded recipe pretrained
    at, else the side ``import-backbone`` recorded (``--image-size``); None where it records
    neither (a file imported before session 30)."""
    meta = meta or {}
    recipe = meta.get("config")
    for side in ((recipe or {}).get("image_size") if isinstance(recipe, dict) else None,
                 meta.get("image_size")):
        if isinstance(side, int) and not isinstance(side, bool) and side >= 8:
            return side
    return None


def backbone_file_side(path: str | Path) -> int | None:
    """:func:`backbone_side` of a backbone file, read from its header without its tensors."""
    return backbone_side({"config": header_field(path, "config"),
                          "image_size": header_field(path, "image_size")})


def find_cached_backbone(backbone_hash: str) -> Path | None:
    """The cached backbone (``$XBM_CACHE/backbones``) whose content hash is ``backbone_hash``."""
    folder = cache_dir() / "backbones"
    for p in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        if backbone_file_hash(p) == backbone_hash:
            return p
    return None


#: What a backbone's recorded ``config`` lacked before a field existed meant: no augmentation,
#: no mixup, fp32 (the recipes of the time).
LEGACY_RECIPE = {"augment": "none", "mixup": 0.0, "precision": "fp32"}
#: Fields every recorded recipe has had: without one, no command can rebuild the backbone.
RECIPE_CORE = ("model", "width", "dataset", "epochs", "batch_size", "lr", "seed")


def recipe_config(recipe: dict[str, Any] | None) -> PretrainConfig | None:
    """The :class:`PretrainConfig` of a recorded recipe (a backbone's ``config``), fields that
    did not exist yet filled with what their absence meant; None if it is unusable."""
    if not isinstance(recipe, dict) or any(recipe.get(k) is None for k in RECIPE_CORE):
        return None
    names = {f.name for f in fields(PretrainConfig)}
    try:
        return PretrainConfig(**(LEGACY_RECIPE | {k: v for k, v in recipe.items() if k in names}))
    except (ConfigError, TypeError, ValueError):
        return None


def pretrain_command(recipe: dict[str, Any] | None) -> str | None:
    """The ``xbm pretrain`` command that rebuilds a backbone from its recorded recipe, quoted for
    a POSIX shell; None when the recipe is unusable or needs a setting the CLI has no flag for."""
    import shlex

    cfg = recipe_config(recipe)
    if cfg is None:
        return None
    parts = ["xbm", "pretrain"]
    for flag, v in (("--model", cfg.model), ("--width", cfg.width), ("--dataset", cfg.dataset),
                    ("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size),
                    ("--lr", cfg.lr), ("--seed", cfg.seed), ("--train-subset", cfg.train_subset),
                    ("--augment", cfg.augment), ("--mixup", cfg.mixup),
                    ("--precision", cfg.precision),
                    ("--image-size", None if cfg.image_size == PretrainConfig.image_size
                     else cfg.image_size),
                    ("--channels", cfg.channels),
                    ("--data-root", recipe.get("data_root"))):
        if v is not None:
            parts += [flag, shlex.quote(repr(v) if isinstance(v, float) else str(v))]
    return " ".join(parts)


def bundle_backbone_path(bundle: str | Path, bundle_meta: dict[str, Any]) -> Path:
    """The cached backbone a bundle was learned on, found by the content hash it records; never
    a fresh pretraining, which could only end in a mismatch.

    Raises:
        BundleError: the bundle records no hash, or no cached backbone has it.
    """
    h = bundle_meta.get("backbone_hash")
    if not h:
        raise BundleError(f"{bundle}: bundle records no backbone hash; it is corrupt, re-create "
                          "it with xbm adapt")
    found = find_cached_backbone(str(h))
    recorded = bundle_meta.get("backbone_file")
    moved = ""
    if found is None and isinstance(recorded, str):
        # the file adapt's --backbone named (a backbone kept outside the cache), if it still
        # holds the same backbone
        found_hash = backbone_file_hash(recorded)
        if found_hash == h:
            return Path(recorded)
        state = ("is gone" if not Path(recorded).exists() else
                 "cannot be read as a backbone" if found_hash is None else
                 "now holds another backbone")
        moved = f"; the file it was learned from, {recorded}, {state}"
    if found is None:
        recipe = bundle_meta.get("backbone_recipe")
        cfg, cmd = recipe_config(recipe), pretrain_command(recipe)
        if cfg is not None and cfg.precision != "auto" and \
                (cache_dir() / "backbones" / cfg.cache_name()).exists():
            raise BundleError(
                f"{bundle}: its backbone (hash {h}) is not cached; the cache holds another "
                f"backbone of the same recipe ({cfg.cache_name()}: another torch or machine "
                "trained it). Pass the bundle's own backbone file with --backbone PATH")
        if not (bundle_meta.get("arch") or {}).get("name"):
            # learned from Python on a model of the user's own: no command can rebuild it
            raise BundleError(
                f"{bundle}: no cached backbone matches its backbone hash {h}{moved}, and the "
                "bundle records no architecture (a model of your own, used from Python "
                "without arch=), so the command line cannot build it: register the model in a "
                "plugin and save its weights with xbm.import_backbone (docs/extending.md), then "
                "pass --plugin MODULE --backbone FILE; or load the bundle from Python "
                "(MultiTaskModel(model, spec).load_bundle)")
        rebuild = (f"or rebuild it with `{cmd}`, which gives the same hash with the same torch "
                   "on the same kind of machine" if cmd else
                   "or re-create it with the xbm pretrain command that made it")
        raise BundleError(
            f"{bundle}: no cached backbone matches its backbone hash {h}{moved}; pass the "
            f"backbone it was learned on with --backbone PATH ({rebuild})")
    return found


def cached_recipe_problem(p: Path, meta: dict[str, Any], cfg: PretrainConfig) -> str | None:
    """What makes the cache file ``p`` (its metadata ``meta``) not the backbone of recipe
    ``cfg``, whose cache name it has: a file copied or renamed in, or named by an older rule.
    None when it is that recipe's. ``get_backbone`` and ``xbm pretrain`` ask alike, so that
    pretrain does not call "cached" a file that every default-backbone command refuses."""
    arch = meta.get("arch") or {}
    if any(arch.get(k) != v for k, v in (("name", cfg.model), ("width", cfg.width))):
        return (f"cached backbone {p} holds {arch.get('name')} width {arch.get('width')}, but "
                f"its name says {cfg.model} width {cfg.width}")
    recorded = recipe_config(meta.get("config"))
    diff = recorded.differs_from(cfg) if recorded is not None else []
    if cfg.channels is not None and arch.get("in_channels") not in (None, cfg.channels):
        # channels None (as stored) of an RGB dataset: one name
        diff.append(f"in_channels {arch.get('in_channels')!r} vs {cfg.channels!r}")
    if diff:
        return (f"cached backbone {p} was pretrained with another recipe than its name says "
                f"({'; '.join(diff)}: recorded vs asked)")
    return None


def get_backbone(cfg: PretrainConfig, device: torch.device, root: str | None = None,
                 progress: bool = True, log=print, path: str | Path | None = None
                 ) -> tuple[nn.Module, dict[str, Any], Path]:
    """Load the cached backbone for ``cfg`` or pretrain and cache it."""
    cfg = cfg.for_device(device)
    p = Path(path) if path else cache_dir() / "backbones" / cfg.cache_name(root)
    if not path and root is not None and not p.exists():
        # a data root may hold only a task's data (xbm adapt): the default backbone serves,
        # but what a root pretrains is cached under the root's own name, never the default's
        default = cache_dir() / "backbones" / cfg.cache_name()
        if default.exists():
            p = default
            cmd = pretrain_command(cfg.__dict__ | {"data_root": os.path.abspath(
                os.path.expanduser(os.fspath(root)))}) or "xbm pretrain --data-root ROOT ..."
            log(f"no backbone pretrained on --data-root {root} is cached: the cached default "
                f"one serves, pretrained on the installed {cfg.dataset} (to pretrain one on the "
                f"root's copy: {cmd})")
    if p.exists():
        return (*_load_cached(p, cfg, bool(path), log), p)
    if not path:
        from xbm.io import check_output

        # an unwritable cache fails now, not after the minutes of pretraining
        check_output(p, "file", "the backbone cache ($XBM_CACHE):",
                     fix="set XBM_CACHE to a writable folder")
    # the cache's entries only: a file the user names gets no lock file beside it
    with pretrain_lock(p, log) if not path else contextlib.nullcontext():
        if p.exists():  # another process pretrained it while this one waited
            return (*_load_cached(p, cfg, bool(path), log), p)
        if not path:
            log(f"no cached backbone {p.name} in {p.parent}: pretraining it once (later runs "
                "load it; a command that takes --backbone PATH uses a backbone file you have "
                "instead)")
        model, meta = pretrain(cfg, device, p, root=root, progress=progress, log=log)
    return model, meta, p


def _load_cached(p: Path, cfg: PretrainConfig, given: bool, log) -> tuple[nn.Module,
                                                                          dict[str, Any]]:
    """Load ``get_backbone``'s file ``p``: a file the user ``given`` as is, a cache entry only
    if it is intact and of ``cfg``'s recipe."""
    try:
        model, meta = load_backbone(p)
    except BundleError as exc:
        if given:
            raise
        # a damaged cache entry: say which file and how to rebuild it, rather than
        # silently spending minutes on a new pretraining
        raise BundleError(f"cached backbone is unusable: {exc}. Delete {p} and run again to "
                          "pretrain it anew") from None
    problem = None if given else cached_recipe_problem(p, meta, cfg)
    if problem:
        raise BundleError(f"{problem}; delete it and run again to pretrain it anew")
    log(f"loaded cached backbone {p} ({meta['dataset']} accuracy {accuracy_text(meta)})")
    return model, meta


@contextlib.contextmanager
def pretrain_lock(p: Path, log=print) -> Iterator[None]:
    """Hold an exclusive lock on the backbone file ``p`` while it is pretrained, so that two
    runs that need one recipe (two demos sharing ``$XBM_CACHE``) pretrain it once: the second
    waits, then loads what the first cached. Before, both spent the minutes and wrote the same
    file.

    An advisory ``flock`` on ``.NAME.lock`` beside ``p``, which the operating system releases
    when its process dies, so a killed run leaves no stale lock. Where there is no ``flock``
    (Windows) or the lock file cannot be made, nothing is locked and concurrent runs duplicate
    the work, as before."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    lock = p.with_name(f".{p.name}.lock")
    fd = None
    if fcntl is not None:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            # another user's lock file in a shared cache: flock takes a read-only one
            with contextlib.suppress(OSError):
                fd = os.open(lock, os.O_RDONLY)
    if fd is None:
        yield
        return
    try:
        # a file system without locks (NFS without lockd, some FUSE mounts) raises another
        # OSError: the work goes ahead unlocked, as it did before locks existed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another xbm process is pretraining {p.name}: waiting for it to finish, then "
                f"loading what it caches (its lock: {lock})")
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock; the empty lock file stays (removing it would race)
