"""In-memory task data and a fast seeded batch iterator.

All datasets of the offline protocols are small (at most 70k 28x28 images, 55 MB as uint8), so they
are held as whole tensors. Keeping them uint8 until a batch is drawn saves 4x memory, and a plain
index-and-slice iterator is much faster than ``torch.utils.data.DataLoader`` with workers on a
2-core machine, where worker start-up and per-sample collation dominate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xbm.data.splits import generator, stratified_pick
from xbm.errors import ConfigError, XbmError, XbmWarning, user_stacklevel

#: Inputs are mapped from uint8 [0, 255] to [0, 1] and then to ``(x - MEAN) / STD`` = [-1, 1].
#: A fixed symmetric normalisation (instead of per-dataset statistics) means a backbone pretrained
#: on one task sees inputs on the same scale for every later task, and no statistics have to be
#: stored with a task or recomputed on subsets.
MEAN = 0.5
STD = 0.5


def normalise(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Turn a uint8 batch (B, C, H, W) into normalised float32, resized to ``size`` if it differs.

    Resizing is bilinear, with antialiasing when shrinking so downscaled digits do not alias.
    """
    out = x.float().div_(255.0).sub_(MEAN).div_(STD)
    if size is not None and (out.shape[-2] != size or out.shape[-1] != size):
        shrink = size < out.shape[-2] or size < out.shape[-1]
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=shrink)
    return out


class BatchLoader:
    """Iterate ``(x, y)`` batches over in-memory tensors, deterministically for a seed.

    With ``shuffle`` the order of epoch ``e`` comes from a generator seeded by ``(seed, e)``; the
    epoch counter advances on every ``iter()``, and :meth:`set_epoch` restores it when resuming, so
    a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
                 seed: int = 0, size: int | None = None, device: torch.device | str | None = None,
                 drop_last: bool = False) -> None:
        """Create the loader.

        Args:
            x: uint8 images (N, C, H, W).
            y: int64 labels (N,).
            batch_size: samples per batch (> 0).
            shuffle: reshuffle every epoch (training) or keep the stored order (evaluation).
            seed: shuffle seed.
            size: output image side; ``None`` keeps the stored size.
            device: where batches are produced. The uint8 tensors are moved there once, so a GPU
                run pays for one small transfer instead of one per batch.
            drop_last: drop a final incomplete batch.
        """
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}; set batch_size >= 1")
        self.device = torch.device(device) if device is not None else x.device
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.size = size
        self.drop_last = drop_last
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Number of samples in the underlying tensors."""
        return int(self.y.shape[0])

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce the order of ``epoch`` (for resuming)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        if self.shuffle:
            # Mix seed and epoch so (seed, epoch+1) never equals (seed+1, epoch).
            order = torch.randperm(n, generator=generator(self.seed * 1_000_003 + self.epoch))
            order = order.to(self.device)
        else:
            order = None
        self.epoch += 1
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min(n, (b + 1) * self.batch_size)
            if order is None:
                xb, yb = self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.x[idx], self.y[idx]
            yield normalise(xb, self.size), yb


@dataclass
class TaskData:
    """One classification task held in memory.

    Attributes:
        name: dataset name (registry name or ``folder:PATH``).
        train_x: uint8 images (N, C, H, W).
        train_y: int64 labels (N,).
        test_x: uint8 images (M, C, H, W).
        test_y: int64 labels (M,).
        classes: class names; label ``i`` means ``classes[i]``.
        colour_read_as_grey: an image folder whose files hold colour, read as grayscale (for
            a 1-channel backbone): whatever told its classes apart by hue is gone, which
            the commands that train on the task say.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str] = field(default_factory=list)
    colour_read_as_grey: bool = False
    #: whether the grey reading was said already (by ``load_dataset``), so that
    #: :meth:`say_if_colour_was_dropped` does not say it twice
    colour_said: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Catch builder bugs here, once, rather than as shape errors deep in a training loop.
        for split, x, y in (("train", self.train_x, self.train_y),
                            ("test", self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise XbmError(f"{self.name}: {split}_x must be uint8 (N, C, H, W), got "
                               f"{x.dtype} {tuple(x.shape)}; fix the dataset builder")
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise XbmError(f"{self.name}: {split}_y must be int64 (N,) matching {split}_x, got "
                               f"{y.dtype} {tuple(y.shape)}; fix the dataset builder")
        if self.train_x.shape[1:] != self.test_x.shape[1:] and self.test_x.shape[0] > 0:
            raise XbmError(f"{self.name}: train and test images differ in shape "
                           f"{tuple(self.train_x.shape[1:])} vs {tuple(self.test_x.shape[1:])}")

    @property
    def num_classes(self) -> int:
        """Number of classes (the classifier's output width)."""
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        """Image channels (1 for every built-in dataset)."""
        return int(self.train_x.shape[1])

    def say_if_colour_was_dropped(self) -> None:
        """Warn (once per call) that this task's image folder holds colour and was read as
        grayscale: legal, rarely meant, and invisible in the results. Called by the commands
        that train on the task (adapt, pretrain, simulate --fault-aware), not by every command
        that reloads it."""
        if self.colour_read_as_grey and not self.colour_said:
            warnings.warn(f"{self.name}: the images are in colour and were read as grayscale, "
                          "for a 1-channel backbone; for colour, pretrain an RGB one "
                          "(xbm pretrain --channels 3) and adapt on it", XbmWarning,
                          stacklevel=user_stacklevel())

    def with_channels(self, channels: int) -> TaskData:
        """This task with ``channels`` image channels, for a backbone that takes them.

        A grayscale task is repeated into three equal channels, the usual way to feed one to an
        RGB network (an ``expand`` view: no copy until a batch is drawn). Colour cannot be made
        from nothing the other way, so three channels to one is refused: load an image folder as
        grayscale instead (``load_dataset(..., channels=1)``).

        Raises:
            ConfigError: ``channels`` is not 1 or 3, or asks for 1 channel of an RGB task.
        """
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}; set channels to 1 or 3")
        have = self.in_channels
        if channels == have:
            return self
        if have != 1:
            raise ConfigError(f"{self.name}: has {have}-channel images, the model takes "
                              f"{channels}; an image folder can be read as grayscale "
                              "(load_dataset(PATH, channels=1)), a dataset stored in colour "
                              "needs a 3-channel backbone")
        return TaskData(self.name, self.train_x.expand(-1, channels, -1, -1), self.train_y,
                        self.test_x.expand(-1, channels, -1, -1), self.test_y,
                        list(self.classes), colour_read_as_grey=self.colour_read_as_grey)

    def test_fingerprint(self, first_channel_only: bool = False) -> str:
        """A short hash of the test split (labels and pixels; of the first channel alone where
        every channel equals it, so a grayscale task repeated into RGB keeps its fingerprint):
        ``xbm adapt`` records it and ``xbm eval`` compares, so an image folder whose files
        changed in between is said rather than scored on other images (some of them, for a
        folder split 80/20, training images). ``first_channel_only``: the first channel
        whatever the others hold, as bundles before session 29 recorded it."""
        import hashlib

        h = hashlib.sha256()
        h.update(str(tuple(self.test_x.shape[2:])).encode())
        h.update(self.test_y.contiguous().numpy().tobytes())
        x = self.test_x
        if not first_channel_only and x.dim() == 4 and x.shape[1] > 1 and x.stride(1) != 0 \
                and not all(torch.equal(x[:, c], x[:, 0]) for c in range(1, x.shape[1])):
            h.update(b"every channel")  # colour: an edit to green or blue is a change too
            h.update(x.contiguous().numpy())
        else:
            h.update(x[:, :1].contiguous().numpy())
        return h.hexdigest()[:16]

    @property
    def image_size(self) -> int:
        """Stored image height (all loaders store square images)."""
        return int(self.train_x.shape[2])

    def __repr__(self) -> str:
        return (f"TaskData({self.name!r}, train={tuple(self.train_x.shape)}, "
                f"test={tuple(self.test_x.shape)}, classes={self.num_classes})")

    def subset(self, train: int | None = None, test: int | None = None,
               seed: int = 0, warn_untrained: bool = True) -> TaskData:
        """A seeded, class-stratified random subset (for quick runs and small-data studies).

        Args:
            train: number of training samples; ``None`` (or more than available) keeps all.
            test: number of test samples; ``None`` (or more than available) keeps all.
            seed: subset seed; train and test draws use separate streams derived from it.
            warn_untrained: say when the training subset leaves a class without images
                (off where the training images only calibrate, as in ``xbm simulate``).

        Returns:
            A new TaskData sharing no storage with this one; samples keep their stored order.
        """
        def take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
            if x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 0:
                # grayscale repeated for an RGB backbone (with_channels): copy one channel and
                # expand it again, rather than three times the images (141 MB, not 47, for
                # Fashion-MNIST's training set)
                one = x[:, :1]
                return (one.clone() if idx is None else one[idx]).expand(-1, x.shape[1], -1, -1)
            return x.clone() if idx is None else x[idx]

        def pick(x: torch.Tensor, y: torch.Tensor, n: int | None, s: int):
            if n is None or n >= y.shape[0]:
                return take(x, None), y.clone()
            if n < 0:
                raise ConfigError(f"subset size must be >= 0, got {n}; pass a count or None")
            idx, _ = stratified_pick(y, n, s)
            return take(x, idx), y[idx]

        tx, ty = pick(self.train_x, self.train_y, train, seed * 2)
        vx, vy = pick(self.test_x, self.test_y, test, seed * 2 + 1)
        lost = sorted(set(self.train_y.unique().tolist()) - set(ty.unique().tolist()))
        if lost and warn_untrained:  # a rare class's quota rounds to 0: never trained
            names = [self.classes[i] if 0 <= i < len(self.classes) else str(i) for i in lost]
            warnings.warn(f"{self.name}: a training subset of {ty.numel()} leaves class(es) "
                          f"{names} without training images (each class gets its share of the "
                          "subset); pass a larger --train-subset (train=)", XbmWarning,
                          stacklevel=user_stacklevel())
        return TaskData(self.name, tx, ty, vx, vy, list(self.classes),
                        colour_read_as_grey=self.colour_read_as_grey)

    def loaders(self, batch_size: int, seed: int = 0, size: int | None = None,
                device: torch.device | str | None = None,
                test_batch_size: int | None = None) -> tuple[BatchLoader, BatchLoader]:
        """Train and test batch iterators yielding normalised float32 batches.

        Batches are ``(x, y)`` with x float32 (B, C, size, size) in [-1, 1] (see :data:`MEAN`,
        :data:`STD`) and y int64, on ``device``. The train loader reshuffles every epoch from
        ``seed`` and drops a final batch of a single sample, because BatchNorm cannot normalise a
        batch of one in training mode; the test loader keeps the stored order and every sample.

        Args:
            batch_size: training batch size.
            seed: shuffle seed.
            size: image side fed to the model; images are resized only if it differs
                (``None``: the stored size, 28 for every built-in dataset).
            device: device of the produced batches.
            test_batch_size: evaluation batch size; defaults to ``batch_size``.
        """
        single_tail = self.train_y.shape[0] % batch_size == 1 if batch_size > 0 else False
        train = BatchLoader(self.train_x, self.train_y, batch_size, shuffle=True, seed=seed,
                            size=size, device=device,
                            drop_last=single_tail and self.train_y.shape[0] > 1)
        test = BatchLoader(self.test_x, self.test_y, test_batch_size or batch_size, shuffle=False,
                           seed=seed, size=size, device=device)
        return train, test
