"""Shared fixtures: tiny models and tasks so the suite stays fast on 2 cores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from xbm.hardware import get_spec
from xbm.models import create_model
from xbm.multitask import MultiTaskModel

# no example database in .hypothesis/ of the working directory (the repo); hypothesis still
# writes its constants cache there, under its own .gitignore
settings.register_profile("xbm", database=None)
settings.load_profile("xbm")


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
