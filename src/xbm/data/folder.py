"""Load a user's own images: one sub-folder per class.

Layouts accepted::

    PATH/<class>/*.png|jpg|jpeg              -> seeded stratified split by ``test_fraction``
    PATH/train/<class>/..., PATH/test/<class>/...  -> the given split

Class names are the sorted sub-folder names (hidden folders ignored), so label ids do not depend on
file-system listing order. Images are converted with PIL to ``L`` (1 channel) or ``RGB`` (3) and
resized to a square ``image_size`` (bilinear, aspect ratio not kept), so any mix of sizes loads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from xbm.data.splits import stratified_pick
from xbm.data.task import TaskData
from xbm.errors import ConfigError, DatasetNotFoundError, XbmError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

_LAYOUT_HINT = "expected PATH/<class>/*.png (or PATH/train/<class>/ and PATH/test/<class>/)"


def _listdir(folder: Path) -> list[Path]:
    """The folder's entries; a folder that cannot be listed is a one-line error."""
    try:
        return list(folder.iterdir())
    except OSError as exc:
        raise XbmError(f"{folder}: cannot read the folder ({exc.strerror or exc}); check that "
                       "it exists and that you may read it") from None


def _class_dirs(path: Path) -> list[Path]:
    return sorted((p for p in _listdir(path) if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in _listdir(folder)
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path, mode: str, image_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise XbmError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc}); "
                       "delete or replace the file") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _load_split(root: Path, classes: list[str], mode: str,
                image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a class may be absent from one split (checked by the caller)
        files = _images_in(folder)
        if not files:
            raise DatasetNotFoundError(f"{folder}: class folder has no images "
                                       f"({'/'.join(IMAGE_EXTENSIONS)}); add images or remove "
                                       "the folder")
        for f in files:
            xs.append(_read_image(f, mode, image_size))
            ys.append(label)
    channels = 1 if mode == "L" else 3
    x = torch.from_numpy(np.stack(xs)) if xs else torch.empty(
        0, channels, image_size, image_size, dtype=torch.uint8)
    return x, torch.tensor(ys, dtype=torch.int64)


def load_image_folder(path: str | os.PathLike, image_size: int = 28, channels: int = 1,
                      test_fraction: float = 0.2, seed: int = 0) -> TaskData:
    """Load an image-folder dataset into memory.

    Args:
        path: dataset directory (see the module docstring for the layouts).
        image_size: side of the stored square images.
        channels: 1 (grayscale) or 3 (RGB).
        test_fraction: test share per class when there is no ``train/``/``test/`` split; every
            class keeps at least one training image.
        seed: split seed (only used without ``train/``/``test/``).

    Raises:
        DatasetNotFoundError: the path is missing, has no class folders, or a class folder has no
            images.
        XbmError: the path is not a directory or an image cannot be read.
        ConfigError: bad ``channels``, ``image_size`` or ``test_fraction``.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}; set channels to 1 or 3")
    if image_size < 1:
        raise ConfigError(f"image_size must be positive, got {image_size}; set image_size >= 1")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}; "
                          "set it to e.g. 0.2")
    if not str(path).strip():
        raise XbmError("folder: needs a path, e.g. --dataset folder:./my_images")
    root = Path(path).expanduser()
    try:
        return _load(root, image_size, channels, test_fraction, seed)
    except XbmError:
        raise
    except OSError as exc:  # e.g. a sub-folder without read or search permission
        where = exc.filename or root
        raise XbmError(f"{where}: cannot read ({exc.strerror or exc}); check the permissions "
                       "of the image folder") from None


def _load(root: Path, image_size: int, channels: int, test_fraction: float,
          seed: int) -> TaskData:
    if not root.exists():
        raise DatasetNotFoundError(f"{root}: image folder does not exist; check the path "
                                   f"({_LAYOUT_HINT})")
    if not root.is_dir():
        raise XbmError(f"{root}: not a directory; pass the folder that holds one sub-folder per "
                       "class")
    mode = "L" if channels == 1 else "RGB"
    name = f"folder:{root}"
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [p.name for p in _class_dirs(root / "train")]
        if not classes:
            raise DatasetNotFoundError(f"{root / 'train'}: no class sub-folders; {_LAYOUT_HINT}")
        extra = sorted({p.name for p in _class_dirs(root / "test")} - set(classes))
        if extra:
            raise XbmError(f"{root / 'test'}: classes {extra} are not in {root / 'train'}; "
                           "add them to train/ or remove them from test/")
        _need_two(root / "train", classes)
        train_x, train_y = _load_split(root / "train", classes, mode, image_size)
        test_x, test_y = _load_split(root / "test", classes, mode, image_size)
        if test_y.numel() == 0:
            raise XbmError(f"{root / 'test'}: no test images; add images to test/<class>/ or "
                           "remove test/ to split the training images")
        return TaskData(name, train_x, train_y, test_x, test_y, classes)
    classes = [p.name for p in _class_dirs(root)]
    if not classes:
        raise DatasetNotFoundError(f"{root}: no class sub-folders; {_LAYOUT_HINT}")
    _need_two(root, classes)
    x, y = _load_split(root, classes, mode, image_size)
    n_test = round(y.numel() * test_fraction)
    test_idx, train_idx = stratified_pick(y, n_test, seed, keep_one=True)
    if test_idx.numel() == 0:
        raise XbmError(f"{root}: {y.numel()} images leave no test images at test_fraction "
                       f"{test_fraction}; add images, or a train/ and test/ split")
    return TaskData(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes)


def _need_two(root: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        raise XbmError(f"{root}: only one class folder ({classes[0]!r}); a classification task "
                       "needs at least 2, one sub-folder per class")
