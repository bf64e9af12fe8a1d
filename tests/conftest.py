"""Shared fixtures: tiny models and tasks so the suite stays fast on 2 cores."""

from __future__ import annotations

import atexit
import shutil
import tempfile

import pytest
import torch
from hypothesis import configuration as hypothesis_configuration
from hypothesis import settings

from xbm.hardware import get_spec
from xbm.models import create_model
from xbm.multitask import MultiTaskModel

# nothing in .hypothesis/ of the working directory (the repo): no example database, and the
# constants cache hypothesis keeps goes to a temporary folder removed at exit
settings.register_profile("xbm", database=None)
settings.load_profile("xbm")
if hasattr(hypothesis_configuration, "set_hypothesis_home_dir"):  # hypothesis >= 6.131
    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="xbm-hypothesis-")
    atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
    hypothesis_configuration.set_hypothesis_home_dir(_HYPOTHESIS_HOME)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache from tests."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path_factory.getbasetemp() / "xbm-cache"))


@pytest.fixture(autouse=True)
def _restored_threads():
    """A test (a benchmark script run in-process) that sets torch's thread count must not
    leave every later test single-threaded: what ran after it was slower, and only in the
    full suite."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_backbone():
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=4, in_channels=1)


@pytest.fixture
def tiny_mtm(tiny_backbone):
    return MultiTaskModel(tiny_backbone, get_spec(rows=16, cols=16),
                          arch={"name": "small_cnn", "num_classes": 4, "in_channels": 1,
                                "width": None})
