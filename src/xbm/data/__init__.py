"""Offline datasets as in-memory tensors, a seeded batch iterator, and benchmark task sequences.

Importing this package registers the built-in datasets: ``fashion-mnist``, ``mnist``,
``animal-mnist``, ``letters`` and ``digits``; ``folder:PATH`` loads an image folder.
"""

from xbm.data import builtin as _builtin  # noqa: F401  (registers the built-in datasets)
from xbm.data import letters as _letters  # noqa: F401
from xbm.data.benchmarks import BENCHMARKS, Benchmark, get_benchmark
from xbm.data.builtin import (
    ANIMAL_CLASSES,
    ANIMAL_SPLIT_SEED,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_animal_mnist,
    load_digits,
    load_fashion_mnist,
    load_idx_dataset,
    load_mnist,
)
from xbm.data.fixture import make_fixture_task
from xbm.data.folder import IMAGE_EXTENSIONS, load_image_folder
from xbm.data.idx import parse_idx, read_idx, write_idx
from xbm.data.letters import LETTERS_CLASSES, LETTERS_FONTS, make_letters
from xbm.data.registry import (
    cache_dir,
    dataset_reference,
    list_datasets,
    load_dataset,
    reads_root,
    register_dataset,
)
from xbm.data.splits import stratified_pick
from xbm.data.task import MEAN, STD, BatchLoader, TaskData, normalise

__all__ = [
    "ANIMAL_CLASSES",
    "ANIMAL_SPLIT_SEED",
    "BENCHMARKS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "LETTERS_CLASSES",
    "LETTERS_FONTS",
    "MEAN",
    "STD",
    "BatchLoader",
    "Benchmark",
    "TaskData",
    "cache_dir",
    "dataset_reference",
    "get_benchmark",
    "list_datasets",
    "load_animal_mnist",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_image_folder",
    "load_mnist",
    "make_fixture_task",
    "make_letters",
    "normalise",
    "parse_idx",
    "read_idx",
    "reads_root",
    "register_dataset",
    "stratified_pick",
    "write_idx",
]
