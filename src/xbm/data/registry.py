"""Dataset registry: names -> builder functions returning :class:`TaskData`.

Builders are registered by name so configs and the CLI refer to datasets by a string, and so other
modules (or user code) can add datasets without editing this package.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from xbm.config import same_definition
from xbm.data.task import TaskData
from xbm.errors import XbmWarning, unknown, user_stacklevel

#: A builder takes ``(root, seed)`` and returns the whole task in memory.
Builder = Callable[[str | None, int], TaskData]

_REGISTRY: dict[str, Builder] = {}
_NO_ROOT: set[str] = set()  # datasets whose builder ignores a root (they ship in a package)

FOLDER_PREFIX = "folder:"


def register_dataset(name: str, *, reads_root: bool = True) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(root, seed) -> TaskData`` under ``name``.

    ``reads_root=False`` declares that the builder ignores ``root`` (the data ships inside a
    package): a task adapted with ``--data-root`` then records no root for ``xbm eval`` to need.

    The same function registered again (a notebook cell or a reloaded module) replaces the
    earlier registration, as ``register_method`` does.

    Raises:
        ValueError: the name is taken by another function or uses the reserved ``folder:``
            prefix (a programming error, not a user one).
    """
    if name.startswith(FOLDER_PREFIX):
        raise ValueError(f"dataset names may not start with {FOLDER_PREFIX!r}")

    def deco(fn: Builder) -> Builder:
        old = _REGISTRY.get(name)
        if old is not None and not same_definition(old, fn):
            raise ValueError(f"dataset {name!r} is already registered by "
                             f"{old.__module__}.{old.__qualname__}; pick another name")
        _REGISTRY[name] = fn
        _NO_ROOT.discard(name)
        if not reads_root:
            _NO_ROOT.add(name)
        return fn

    return deco


def reads_root(name: str) -> bool:
    """Whether the dataset ``name`` reads its files from a ``root`` (``--data-root``); an
    image folder does not (its path is the root)."""
    return name in _REGISTRY and name not in _NO_ROOT


def list_datasets() -> list[str]:
    """Registered dataset names, sorted (``folder:PATH`` is accepted in addition)."""
    return sorted(_REGISTRY)


def cache_dir() -> Path:
    """Where generated data is cached: ``$XBM_CACHE``, else ``~/.cache/xbm``."""
    env = os.environ.get("XBM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xbm"


def image_folder_path(name: str) -> str | None:
    """The path of the image folder ``name`` names (``folder:PATH``, an existing directory
    that is not a registered name, or a name with a slash or a leading ``.`` or ``~``), as
    given; ``None`` for a registered dataset. The one rule :func:`load_dataset`,
    :func:`dataset_reference` and task naming share."""
    if name.startswith(FOLDER_PREFIX):
        return name[len(FOLDER_PREFIX):]
    if name not in _REGISTRY and (os.path.isdir(name) or _looks_like_a_path(name)):
        return name  # a path that is not there is said to be missing, not an unknown name
    return None


def _looks_like_a_path(name: str) -> bool:
    return any(sep in name for sep in {"/", os.sep}) or name.startswith((".", "~"))


def dataset_reference(name: str) -> str:
    """How a bundle records the dataset ``name`` names: an image folder as ``folder:`` plus its
    absolute path, so that ``xbm eval`` finds it from any working directory; a registered name
    as it is."""
    path = image_folder_path(name)
    if path is None or not path.strip():
        return name
    return FOLDER_PREFIX + str(Path(path).expanduser().resolve())


def load_dataset(name: str, root: str | os.PathLike | None = None, seed: int = 0, *,
                 channels: int | None = None, image_size: int | None = None) -> TaskData:
    """Load a dataset by name into memory.

    Args:
        name: a registered name (see :func:`list_datasets`), ``folder:PATH``, or the path of an
            existing directory laid out as an image folder (see ``load_image_folder``).
        root: where to look for the dataset's files instead of its default location (for
            ``letters``: a rendering copied there, else the cache). Ignored for image folders.
        seed: the *data* seed for datasets whose split or content is generated: ``digits``,
            ``letters`` and image folders without ``train/``/``test/``. Keep it constant across
            runs that should be compared (the default 0 is what benchmarks use); it is not the
            training seed. ``animal-mnist`` ignores it and always uses its fixed split.
        channels: image channels the model takes (``None``: as stored; an image folder then
            loads as grayscale). An image folder is read in that mode; a grayscale dataset is
            repeated into three channels for an RGB backbone (:meth:`TaskData.with_channels`).
        image_size: the side an image folder's pictures are stored at (default 28). Built-in
            datasets stay 28x28: pass the size to :meth:`TaskData.loaders` to feed them larger.

    Raises:
        UnknownNameError: the name is neither registered nor a path.
        DatasetNotFoundError: the dataset's files are not installed (message names the fix).
    """
    from xbm.data.folder import load_image_folder

    folder = image_folder_path(name)
    if folder is not None:
        data = load_image_folder(folder, image_size=28 if image_size is None else image_size,
                                 channels=1 if channels is None else channels, seed=seed)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if channels is None and data.colour_read_as_grey and not caller.startswith("xbm."):
            # grey by default, not by choice: said here, or a script never hears of it (the
            # commands say it in their own words: say_if_colour_was_dropped)
            warnings.warn(f"{data.name}: the images are in colour and were read as grayscale "
                          "(an image folder's default); whatever told its classes apart by "
                          "hue is gone. To keep colour, read it with channels=3 for an RGB "
                          "backbone (xbm pretrain --channels 3); channels=1 reads it as grey "
                          "without this warning", XbmWarning, stacklevel=user_stacklevel())
            data.colour_said = True
        return data
    try:
        builder = _REGISTRY[name]
    except KeyError:
        exc = unknown("dataset", name, [*_REGISTRY, f"{FOLDER_PREFIX}PATH"])
        inside = Path(os.path.expanduser(os.fspath(root))) / name if root is not None else None
        if inside is not None and inside.is_dir():  # a folder in the data root, by its name
            exc.args = (f"{exc}; {inside} is a folder: pass {FOLDER_PREFIX}{inside} (a data "
                        "root holds the registered datasets' files, not image folders)",)
        raise exc from None
    _say_if_a_folder_is_shadowed(name, root)
    # a root given as --data-root=~/x or in a YAML reaches here unexpanded (no shell did it);
    # the backbone cache name and recorded recipe use the expanded path too
    data = builder(None if root is None else os.path.expanduser(os.fspath(root)), seed)
    if not isinstance(data, TaskData):  # a user's builder: one line, not an AttributeError
        from xbm.errors import XbmError

        raise XbmError(f"dataset {name!r}: its builder returned a {type(data).__name__}, not "
                       "a TaskData; return xbm.data.TaskData(name, train_x, train_y, test_x, "
                       "test_y, classes) with uint8 (N, C, H, W) images and int64 labels")
    return data if channels is None else data.with_channels(channels)


def _say_if_a_folder_is_shadowed(name: str, root: str | os.PathLike | None) -> None:
    """A registered name wins over a same-named image folder in the working directory
    (``./digits/`` with class sub-folders): the user who meant the folder trained on the
    built-in dataset without a word. A folder without sub-folders (IDX files, say) is not an
    image folder, and a folder given as the data root is read as one."""
    import warnings

    from xbm.errors import XbmWarning, user_stacklevel

    here = Path(name)
    if not here.is_dir():
        return
    if root is not None and Path(os.path.expanduser(os.fspath(root))).resolve() == \
            here.resolve():
        return
    try:
        classes = any(child.is_dir() for child in here.iterdir())
    except OSError:
        return
    if classes:
        warnings.warn(f"dataset {name!r} is the registered one; the folder {name}/ in the "
                      f"working directory is not read: pass {FOLDER_PREFIX}{name} (or ./{name}) "
                      "to train on its images", XbmWarning, stacklevel=user_stacklevel())
