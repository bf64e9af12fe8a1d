"""Load a user's own images: one sub-folder per class.

Layouts accepted::

    PATH/<class>/*.png|jpg|jpeg|bmp|gif|webp|tif  -> a stable split by ``test_fraction``
    PATH/train/<class>/..., PATH/test/<class>/...  -> the given split (``val/``, ``valid/`` or
                                                     ``validation/`` for test/; any case;
                                                     ``test/`` first when there are several)

Class names are the sorted sub-folder names (hidden folders ignored), so label ids do not depend on
file-system listing order. Images are converted with PIL to ``L`` (1 channel) or ``RGB`` (3) and
resized to a square ``image_size`` (bilinear, aspect ratio not kept), so any mix of sizes loads;
a camera's EXIF orientation is applied, 16-bit images are scaled (not clipped) to 8 bits and
transparent pixels are composited onto white.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from xbm.data.splits import class_quotas
from xbm.data.task import TaskData
from xbm.errors import ConfigError, DatasetNotFoundError, XbmError, XbmWarning, user_stacklevel

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_LAYOUT_HINT = "expected PATH/<class>/*.png (or PATH/train/<class>/ and PATH/test/<class>/)"

#: Folder names taken as the training split (any case), in this order.
TRAIN_NAMES = ("train", "training")
#: Folder names taken as the test split beside ``train/`` (any case), in this order; one
#: without class sub-folders (Kaggle's unlabelled ``test/*.png``) is passed over.
TEST_NAMES = ("test", "testing", "val", "valid", "validation")


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


def _to_8bit(img):
    """PIL's ``convert("L")`` clips 16/32-bit integer images at 255 (a 16-bit PNG turns almost
    white); scale them to 8 bits instead. A 16-bit mode is / 257 (0..65535 -> 0..255) whatever
    the image holds; 32-bit integer (``I``) and float (``F``) images say nothing of their
    range, so theirs is guessed from the values: up to 1 (float), 255, 65535, or their max."""
    from PIL import Image

    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    peak = float(arr.max(initial=0))
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and peak <= 1.0:
        top = 1.0
    else:
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return Image.fromarray(np.clip(np.round(arr * 255.0 / top), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(img):
    """Transparent pixels onto a white background, as image viewers show them: converting
    RGBA to L or RGB would drop the alpha and keep whatever colour transparent pixels hold."""
    from PIL import Image

    if "A" not in img.getbands() and "transparency" not in img.info:
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


#: A pixel is coloured when its largest and smallest channel differ by more than this (0-255):
#: a grey photo saved as an RGB JPEG differs by a few levels between channels.
_COLOUR_SPREAD = 24
#: An image holds colour when at least this share of its pixels are coloured: a small coloured
#: mark (a red dot that is the whole class) counts, JPEG ringing around grey edges does not.
_COLOUR_SHARE = 0.002


def _in_colour(img) -> bool:
    """Whether an image (8-bit, alpha flattened) holds colour, judged on a grid of 128 to 255
    pixels a side (every k-th pixel of a larger image: cheap next to decoding it)."""
    if img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;"):
        return False
    rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    step = max(1, min(rgb.shape[:2]) // 128)
    small = rgb[::step, ::step].astype(np.int16)
    coloured = (small.max(axis=2) - small.min(axis=2)) > _COLOUR_SPREAD
    return float(coloured.mean()) >= _COLOUR_SHARE


def images_look_grey(x: torch.Tensor, chunk: int = 1024) -> bool:
    """Whether no image of a uint8 ``(N, 3, H, W)`` batch holds colour by :func:`_in_colour`'s
    measure (a grey scan with a faint tint, or JPEG noise between channels, still counts as
    grey); one channel is grey by definition. Read a chunk at a time, stopping at the first
    image in colour, so a large set costs no int16 copy of itself. An empty batch shows nothing,
    so it is not called grey; a non-uint8 batch is refused, since the colour thresholds are in
    8-bit steps (a float image in [0, 1] would always look grey)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"images_look_grey takes uint8 images, got {x.dtype}: convert with "
                        "(x * 255).round().to(torch.uint8) first")
    if x.dim() != 4 or x.shape[0] == 0:
        return False
    if x.shape[1] != 3:
        return x.shape[1] == 1
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].to(torch.int16)
        spread = part.amax(dim=1) - part.amin(dim=1)  # (n, H, W)
        share = (spread > _COLOUR_SPREAD).flatten(1).float().mean(dim=1)
        if bool((share >= _COLOUR_SHARE).any()):
            return False
    return True


def _read_image(path: Path, mode: str, image_size: int, look_for_colour: bool = False
                ) -> tuple[np.ndarray, bool]:
    """The image as a (channels, side, side) uint8 array in ``mode``, and, if asked, whether
    the file holds colour (so that reading a colour folder as grey can be said)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # a camera's orientation tag, applied
            img = _flatten_alpha(_to_8bit(img))
            colour = look_for_colour and _in_colour(img)
            img = img.convert(mode)
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise XbmError(f"{path}: image too large to load safely ({exc}); shrink it or remove "
                       "it from the folder") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise XbmError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc}); "
                       "delete or replace the file") from None
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), colour


def _cgroup_limit_files(cgroup_root: Path = Path("/sys/fs/cgroup"),
                        proc_cgroup: Path = Path("/proc/self/cgroup")) -> list[Path]:
    """Every cgroup memory-limit file that bounds this process: its own cgroup's and each
    ancestor's, cgroup v2 (``memory.max``) and v1 (``memory.limit_in_bytes``). A limit set
    without a cgroup namespace (Slurm, ``systemd-run -p MemoryMax``) sits at the process's own
    path (``/proc/self/cgroup``), not at the mount root, and a parent's limit binds too."""
    own: list[tuple[Path, str]] = []  # (controller folder, path inside it)
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # "0::/user.slice/x.scope" (v2), "4:memory:/slurm/job_1" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3 or ".." in parts[2].split("/"):  # a path outside our namespace
            continue
        if parts[0] == "0" and parts[1] == "":
            own.append((cgroup_root, parts[2]))
        elif "memory" in parts[1].split(","):
            own.append((cgroup_root / "memory", parts[2]))
    files = [cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"]
    for base, rel in own:
        name = "memory.max" if base == cgroup_root else "memory.limit_in_bytes"
        folder = base / rel.strip("/") if rel.strip("/") else base
        while True:  # the cgroup itself, then its ancestors up to the controller's root
            if base / name != folder / name:
                files.append(folder / name)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return list(dict.fromkeys(files))


def _memory_bytes() -> int | None:
    """The memory this process may use: the machine's physical memory, or the lowest cgroup
    limit over its own cgroup and their ancestors (``_cgroup_limit_files``) where one is lower;
    None where the OS does not say."""
    try:
        have = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None
    for limit in _cgroup_limit_files():
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means none; v1's "no limit" is a huge number
            have = min(have, int(text))
    return have


def _list_split(root: Path, classes: list[str]) -> list[tuple[int, Path]]:
    """(label, file) of every image of a split, class by class in sorted file order."""
    listed: list[tuple[int, Path]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a class may be absent from one split (checked by the caller)
        files = _images_in(folder)
        _warn_skipped(folder)
        if not files:
            raise DatasetNotFoundError(f"{folder}: class folder has no images "
                                       f"({'/'.join(IMAGE_EXTENSIONS)}); add images or remove "
                                       "the folder")
        listed += [(label, f) for f in files]
    return listed


def _warn_skipped(folder: Path) -> None:
    """Say what a class folder holds that is not read: sub-folders (a class's images are the
    files directly in its folder; images one level deeper would otherwise vanish without a
    word) and links to images that do not exist. Other files (a labels.csv) pass unremarked."""
    entries = _listdir(folder)
    nested = sorted(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
    broken = sorted(p.name for p in entries
                    if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_symlink() and not p.exists())
    if nested:
        shown = ", ".join(n + "/" for n in nested[:3]) + (", ..." if len(nested) > 3 else "")
        warnings.warn(f"{folder}: {len(nested)} sub-folder(s) ({shown}) not read: a class's "
                      "images are the files directly in its folder; move them up a level to "
                      "use them", XbmWarning, stacklevel=user_stacklevel())
    if broken:
        shown = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "")
        warnings.warn(f"{folder}: {len(broken)} link(s) to missing images skipped ({shown})",
                      XbmWarning, stacklevel=user_stacklevel())


def _check_memory(root: Path, n: int, channels: int, image_size: int, copies: int) -> None:
    """Refuse, before any image is read, a folder whose tensors would not fit: the images take
    ``n * channels * side**2`` bytes, ``copies`` times over while loading (2 where the train
    and test sets are cut out of one tensor, 1 where they are read into their own)."""
    need, have = n * channels * image_size ** 2, _memory_bytes()
    if have is not None and copies * need > have // 2:  # batches and the model need the rest
        twice = ", twice that while loading" if copies == 2 else ""
        raise XbmError(f"{root}: {n:,} images at {image_size}x{image_size} ({channels} "
                       f"channel(s)) take {need / 2**30:.1f} GiB{twice}: more than half of the "
                       f"{have / 2**30:.1f} GiB this machine allows; pass a smaller --image-size "
                       "or use fewer images")


def _read_split(listed: list[tuple[int, Path]], mode: str, image_size: int,
                look_for_colour: bool) -> tuple[torch.Tensor, torch.Tensor, list[str], bool]:
    """Images (filled into one preallocated tensor), labels, file names, and whether any file
    holds colour (looked for only until one does, and only if asked)."""
    channels = 1 if mode == "L" else 3
    x = torch.empty(len(listed), channels, image_size, image_size, dtype=torch.uint8)
    fill = x.numpy()  # a view: each image is copied into place, with no list of them
    colour = False
    for i, (_label, f) in enumerate(listed):
        fill[i], in_colour = _read_image(f, mode, image_size, look_for_colour and not colour)
        colour = colour or in_colour
    return (x, torch.tensor([lab for lab, _ in listed], dtype=torch.int64),
            [f.name for _, f in listed], colour)


def stable_test_pick(labels: torch.Tensor, names: list[str], classes: list[str], n_test: int,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(test, train) indices: each class's quota of test images are the files whose hash of
    (seed, class, file name) is smallest. A file's side therefore depends on its own name, not
    on the other files: adding or removing images moves at most the few at a class's quota
    boundary, where a shuffled split would deal every image anew and put training images
    into the test set of a task trained before."""
    quotas = class_quotas(labels, n_test, keep_one=True)
    picked: list[int] = []
    for c in sorted(quotas):
        idx = torch.nonzero(labels == c, as_tuple=True)[0].tolist()
        idx.sort(key=lambda i: hashlib.sha256(  # surrogateescape: any file-system name
            f"{seed}/{classes[c]}/{names[i]}".encode("utf-8", "surrogateescape")).digest())
        picked += idx[: quotas[c]]
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[picked] = True
    return torch.nonzero(mask, as_tuple=True)[0], torch.nonzero(~mask, as_tuple=True)[0]


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
    train_dir, test_dir = _split_dirs(root)
    if train_dir is not None and test_dir is not None:
        classes = [p.name for p in _class_dirs(train_dir)]
        if not classes:
            raise DatasetNotFoundError(f"{train_dir}: no class sub-folders; {_LAYOUT_HINT}")
        extra = sorted({p.name for p in _class_dirs(test_dir)} - set(classes))
        if extra:
            raise XbmError(f"{test_dir}: classes {extra} are not in {train_dir}; "
                           f"add them to {train_dir.name}/ or remove them from {test_dir.name}/")
        _need_two(train_dir, classes)
        train_list, test_list = _list_split(train_dir, classes), _list_split(test_dir, classes)
        if not test_list:  # said before minutes of decoding the training images
            raise XbmError(f"{test_dir}: no test images; {_no_test_fix(root, train_dir, test_dir)}")
        _warn_unread(root, train_dir, test_dir)
        _check_memory(root, len(train_list) + len(test_list), channels, image_size, 1)
        train_x, train_y, _, c_train = _read_split(train_list, mode, image_size, mode == "L")
        test_x, test_y, _, c_test = _read_split(test_list, mode, image_size,
                                                mode == "L" and not c_train)
        if test_y.numel() == 0:
            raise XbmError(f"{test_dir}: no test images; {_no_test_fix(root, train_dir, test_dir)}")
        _warn_untested(test_dir, classes, test_y, split_dir=True)
        return TaskData(name, train_x, train_y, test_x, test_y, classes,
                        colour_read_as_grey=c_train or c_test)
    classes = [p.name for p in _class_dirs(root)]
    if not classes:
        raise DatasetNotFoundError(f"{root}: no class sub-folders; {_LAYOUT_HINT}")
    split_names = [c for c in classes if c.lower() in (*TRAIN_NAMES, *TEST_NAMES)]
    if split_names and len(split_names) == len(classes):
        raise XbmError(f"{root}: found {', '.join(s + '/' for s in split_names)} but not both a "
                       "train/ and a test/ (or val/) folder; add the missing one with the same "
                       "class sub-folders, or put the class folders directly in "
                       f"{root} to have them split 80/20")
    for split in split_names:  # a half-made split next to class folders, not a class "train"
        if not _images_in(root / split) and _class_dirs(root / split):
            others = [c for c in classes if c not in split_names]
            raise XbmError(f"{root}: {split}/ holds class folders, as in a train/test split, "
                           f"next to class folders ({', '.join(c + '/' for c in others)}); "
                           "put every class under train/ and test/ (or val/), or every class "
                           f"folder directly in {root} to have them split 80/20")
    for split in split_names:  # Kaggle's unlabelled test/*.png beside class folders
        if split.lower() in TEST_NAMES and _images_in(root / split) and \
                len(split_names) < len(classes):  # a class may be called "train" (CIFAR-100)
            warnings.warn(f"{root}: {split}/ holds images beside class folders and is taken as "
                          f"a class named {split!r}; if it is an unlabelled test split, move it "
                          f"out of {root} (a split is train/<class>/ and test/<class>/)",
                          XbmWarning, stacklevel=user_stacklevel())
    _need_two(root, classes)
    listed = _list_split(root, classes)
    _check_memory(root, len(listed), channels, image_size, 2)
    x, y, names, colour = _read_split(listed, mode, image_size, mode == "L")
    n_test = round(y.numel() * test_fraction)
    test_idx, train_idx = stable_test_pick(y, names, classes, n_test, seed)
    if test_idx.numel() == 0:
        raise XbmError(f"{root}: {y.numel()} images leave no test images at test_fraction "
                       f"{test_fraction}; add images, or a train/ and test/ split")
    _warn_untested(root, classes, y[test_idx])
    return TaskData(name, x[train_idx], y[train_idx], x[test_idx], y[test_idx], classes,
                    colour_read_as_grey=colour)


def has_own_split(path: str | os.PathLike) -> bool:
    """Whether the image folder ``path`` brings its own training and test folders (then its
    test images are never training images); False for one split by ``test_fraction``, or a
    folder that cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said when the folder is loaded
            train_dir, test_dir = _split_dirs(Path(os.path.expanduser(path)))
    except (XbmError, OSError):
        return False
    return train_dir is not None and test_dir is not None


def _split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    """The training and test folders of ``root`` (:data:`TRAIN_NAMES`, :data:`TEST_NAMES`,
    matched in any case). Two folders that differ only in case (``test/`` and ``Test/``) are
    an error: which one a listing returns first depends on the file system. Of several test
    names (``test/`` and ``val/``) the first in :data:`TEST_NAMES` that holds class folders is
    the test split, with a warning naming the others: a ``test/`` of unlabelled images (as
    Kaggle ships one) is passed over for a labelled ``val/``."""
    by_name: dict[str, list[Path]] = {}
    for p in _class_dirs(root):
        by_name.setdefault(p.name.lower(), []).append(p)
    for key in (*TRAIN_NAMES, *TEST_NAMES):
        if len(by_name.get(key, [])) > 1:
            names = " and ".join(f"{p.name}/" for p in by_name[key])
            raise XbmError(f"{root}: both {names} are there, which differ only in case; merge "
                           "them into one folder")
    trains = [by_name[k][0] for k in TRAIN_NAMES if k in by_name]
    if len(trains) > 1:
        raise XbmError(f"{root}: both {trains[0].name}/ and {trains[1].name}/ are there; keep "
                       "one training folder")
    train_dir = trains[0] if trains else None
    tests = [by_name[k][0] for k in TEST_NAMES if k in by_name]
    if train_dir is not None and tests:
        labelled = [p for p in tests if _class_dirs(p)]
        if labelled and labelled[0] is not tests[0]:
            warnings.warn(f"{root}: {labelled[0].name}/ is the test split ("
                          f"{', '.join(p.name + '/' for p in tests if not _class_dirs(p))} "
                          "holds no class folders: unlabelled images are not read)",
                          XbmWarning, stacklevel=user_stacklevel())
        tests = labelled or tests
        if len(tests) > 1:
            warnings.warn(f"{root}: {tests[0].name}/ is the test split; "
                          f"{', '.join(p.name + '/' for p in tests[1:])} not used", XbmWarning,
                          stacklevel=user_stacklevel())
    return train_dir, (tests[0] if tests else None)


def _no_test_fix(root: Path, train_dir: Path, test_dir: Path) -> str:
    """How to fix a split whose test folder holds no labelled image."""
    return (f"add images to {test_dir.name}/<class>/, or move the class folders of "
            f"{train_dir.name}/ up into {root} and remove {train_dir.name}/ and "
            f"{test_dir.name}/ to have them split 80/20")


def _warn_unread(root: Path, train_dir: Path, test_dir: Path) -> None:
    """With a train/test split, what else the folder holds is not read: a class folder beside
    the split, or images loose in the root or in a split folder. Said, not dropped silently."""
    split_names = (*TRAIN_NAMES, *TEST_NAMES, "__macosx")  # and a macOS zip's resource forks
    others = [f"{p.name}/" for p in _class_dirs(root) if p.name.lower() not in split_names
              and (_images_in(p) or any(_images_in(c) for c in _class_dirs(p)))]
    loose = [f"{d.name}/" if d is not root else "the folder itself"
             for d in (root, train_dir, test_dir) if _images_in(d)]
    parts = []
    if others:
        parts.append(f"{', '.join(others)} beside {train_dir.name}/ and {test_dir.name}/ "
                     f"(a class belongs in {train_dir.name}/<class>/ and "
                     f"{test_dir.name}/<class>/)")
    if loose:
        parts.append(f"images directly in {', '.join(loose)} (they have no class folder)")
    if parts:
        warnings.warn(f"{root}: not read: {'; '.join(parts)}", XbmWarning,
                      stacklevel=user_stacklevel())


def _warn_untested(where: Path, classes: list[str], test_y: torch.Tensor,
                   split_dir: bool = False) -> None:
    """A class without test images is never scored: its accuracy would be silently absent
    from the task's mean."""
    missing = [c for i, c in enumerate(classes) if not bool((test_y == i).any())]
    if missing:
        fix = (f"add images to {where.name}/<class>/ for them" if split_dir else
               "add images (a class needs about 5 for one to go to the test split)")
        warnings.warn(f"{where}: class(es) {missing} have no test images, so the task's "
                      f"accuracy does not measure them; {fix}", XbmWarning,
                      stacklevel=user_stacklevel())


def _need_two(root: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        raise XbmError(f"{root}: only one class folder ({classes[0]!r}); a classification task "
                       "needs at least 2, one sub-folder per class")
