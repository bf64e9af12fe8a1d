"""Pretraining augmentation: seeded, shape-preserving, background-filling, and in the cache key."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xbm.data.augment import AUGMENTATIONS, AffineAugment, get_augment
from xbm.errors import ConfigError, DatasetNotFoundError
from xbm.train.pretrain import PretrainConfig


def _batch(n: int = 16, side: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, side, side, generator=g) * 2 - 1


def test_identity_when_every_strength_is_zero():
    x = _batch()
    aug = AffineAugment(rotate_deg=0, scale=0, shift_px=0, hflip=False)
    out = aug(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_flip_alone_mirrors_some_images_and_keeps_the_rest():
    x = _batch(64)
    aug = AffineAugment(rotate_deg=0, scale=0, shift_px=0, hflip=True)
    out = aug(x, torch.Generator().manual_seed(1))
    same = [(out[i] - x[i]).abs().max() < 1e-5 for i in range(64)]
    mirrored = [(out[i] - x[i].flip(-1)).abs().max() < 1e-5 for i in range(64)]
    assert all(a or b for a, b in zip(same, mirrored, strict=True))
    assert 10 < sum(mirrored) < 54  # about half of them


def test_seeded_and_shape_preserving():
    x = _batch()
    aug = get_augment("affine-flip")
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, x, atol=1e-3)  # it does change the images


def test_pixels_from_outside_are_background():
    # an all-background image stays all background under any warp
    x = torch.full((8, 1, 28, 28), -1.0)
    out = AffineAugment(rotate_deg=30, scale=0.3, shift_px=6)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    # a shifted bright image brings background in, never zeros (the normalised mid-grey)
    y = torch.ones(8, 1, 28, 28)
    out = AffineAugment(rotate_deg=0, scale=0, shift_px=6, hflip=False)(
        y, torch.Generator().manual_seed(0))
    assert out.min() < -0.9


@pytest.mark.parametrize("kw", [{"rotate_deg": -1}, {"scale": 1.0}, {"scale": -0.1},
                                {"shift_px": -2}])
def test_bad_strength_is_a_clear_error(kw):
    with pytest.raises(ConfigError, match="augmentation"):
        AffineAugment(**kw)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError, match="affine-flip"):
        get_augment("mixup")
    assert get_augment("none") is None
    assert set(AUGMENTATIONS) >= {"none", "affine", "affine-flip"}


def test_augmentation_is_part_of_the_cache_key():
    plain = PretrainConfig(augment="none", precision="fp32").cache_name()
    assert "affine" not in plain  # backbones cached before augmentation keep their names
    names = {PretrainConfig(augment=a, precision="fp32").cache_name() for a in AUGMENTATIONS}
    assert len(names) == len(AUGMENTATIONS)


def _tiny_pretrain_meta(**kw) -> dict:
    """Metadata of a tiny backbone pretrained with ``PretrainConfig(**kw)``."""
    from xbm.train.pretrain import pretrain

    cfg = PretrainConfig(model="small_cnn", width=4, dataset="animal-mnist", epochs=1,
                         train_subset=128, **kw)
    try:
        return pretrain(cfg, torch.device("cpu"), None, progress=False, log=lambda *a: None)[1]
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc))


def test_pretraining_uses_the_augmentation():
    metas = {aug: _tiny_pretrain_meta(augment=aug) for aug in ("none", "affine-flip")}
    assert [m["config"]["augment"] for m in metas.values()] == ["none", "affine-flip"]
    assert metas["none"]["content_hash"] != metas["affine-flip"]["content_hash"]


def test_unknown_augmentation_fails_before_any_work(tmp_path):
    from xbm.train.demo import DemoConfig, run_demo

    with pytest.raises(ConfigError, match="unknown augmentation 'blur'"):
        PretrainConfig(augment="blur")
    with pytest.raises(ConfigError, match="unknown augmentation"):
        run_demo(DemoConfig(pretrain_augment="blur", width=4), tmp_path / "out",
                 progress=False, log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_mixup_is_validated_keyed_and_used():
    for bad in (-0.1, float("nan"), float("inf")):  # inf: betavariate hung
        with pytest.raises(ConfigError, match=r"mixup must be a number in \[0, 1000\]"):
            PretrainConfig(mixup=bad)
    fp32 = PretrainConfig(precision="fp32")
    assert "mixup" not in dataclasses.replace(fp32, mixup=0).cache_name()
    assert fp32.cache_name().endswith("-affine-flip-mixup0.4.safetensors")
    metas = {alpha: _tiny_pretrain_meta(mixup=alpha) for alpha in (0.0, 0.4)}
    assert [m["config"]["mixup"] for m in metas.values()] == [0.0, 0.4]
    assert metas[0.0]["content_hash"] != metas[0.4]["content_hash"]


def test_precision_is_validated_keyed_and_used():
    with pytest.raises(ConfigError, match="unknown pretraining precision 'fp16'"):
        PretrainConfig(precision="fp16")
    # fp32 backbones cached before precision existed keep their names
    assert "fp32" not in PretrainConfig(precision="fp32").cache_name()
    assert PretrainConfig(precision="bf16").cache_name().endswith("-mixup0.4-bf16.safetensors")
    from xbm.train.pretrain import pretrain

    cfgs = {p: PretrainConfig(model="small_cnn", width=4, dataset="animal-mnist", epochs=1,
                              train_subset=128, precision=p) for p in ("fp32", "bf16")}
    try:
        out = {p: pretrain(c, torch.device("cpu"), None, progress=False, log=lambda *a: None)
               for p, c in cfgs.items()}
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc))
    assert [m["config"]["precision"] for _, m in out.values()] == ["fp32", "bf16"]
    assert out["fp32"][1]["content_hash"] != out["bf16"][1]["content_hash"]
    # mixed precision trains in bf16 but keeps (and saves) float32 weights
    assert {t.dtype for t in out["bf16"][0].state_dict().values() if t.is_floating_point()} \
        == {torch.float32}


def test_auto_precision_resolves_per_device_before_the_cache_key(monkeypatch):
    """``auto`` (the default) is bf16 only on a CPU with native bf16 units: elsewhere bf16 would
    be slower, and the GPU figures are fp32. The cache key never holds ``auto``, which would
    name different backbones on different machines."""
    import xbm.train.pretrain as pt

    cfg = PretrainConfig()
    assert cfg.precision == "auto"
    with pytest.raises(ValueError, match="for_device"):
        cfg.cache_name()
    assert isinstance(pt.native_bf16_cpu(), bool)  # the real probe runs on any torch
    monkeypatch.setattr(pt, "native_bf16_cpu", lambda: True)
    assert cfg.for_device("cpu").precision == "bf16"
    assert cfg.for_device(torch.device("cuda")).precision == "fp32"
    monkeypatch.setattr(pt, "native_bf16_cpu", lambda: False)
    assert cfg.for_device("cpu").precision == "fp32"
    assert cfg.for_device("cpu").cache_name() == PretrainConfig(precision="fp32").cache_name()
    forced = PretrainConfig(precision="bf16")
    assert forced.for_device("cpu") is forced  # an explicit choice is kept everywhere


def test_auto_precision_is_resolved_in_the_saved_metadata(monkeypatch):
    import xbm.train.pretrain as pt

    monkeypatch.setattr(pt, "native_bf16_cpu", lambda: False)
    assert _tiny_pretrain_meta()["config"]["precision"] == "fp32"


@pytest.mark.parametrize("cap,expect_native", [("AVX2", False), ("avx512_core", False),
                                               ("SSE41", False), ("AVX512_CORE_BF16", True),
                                               ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_a_onednn_isa_cap_below_bf16_means_no_native_bf16(cap, expect_native, monkeypatch):
    """Under ONEDNN_MAX_CPU_ISA=AVX2 oneDNN has no bf16 kernels on any CPU, so ``auto`` must
    pretrain in fp32 there; at or above AVX512_CORE_BF16 the hardware probe decides."""
    import xbm.train.pretrain as pt

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert pt.native_bf16_cpu() is expect_native
    assert pt.default_precision("cpu") == ("bf16" if expect_native else "fp32")


def test_a_data_root_names_its_own_cached_backbone(tmp_path):
    """A backbone pretrained on ``--data-root`` copies replaced the default cache entry (and
    was loaded as the default later); a root now adds a hash of its absolute path."""
    cfg = PretrainConfig(precision="fp32")
    default = cfg.cache_name()
    mine = cfg.cache_name(tmp_path / "fm_a")
    assert mine != default and "-root" in mine and mine.endswith(".safetensors")
    assert cfg.cache_name(tmp_path / "fm_a") == mine != cfg.cache_name(tmp_path / "fm_b")
    assert cfg.cache_name(None) == default
    # a dataset that reads no root (an image folder, digits): the root names nothing
    for ds in (f"folder:{tmp_path / 'imgs'}", "digits"):
        other = dataclasses.replace(cfg, dataset=ds)
        assert other.cache_name(tmp_path / "fm_a") == other.cache_name()


def test_a_data_root_falls_back_to_the_cached_default_backbone(tmp_path, monkeypatch):
    """``xbm adapt --data-root`` may point at a task's data only: with no backbone cached
    under the root's name, the cached default serves (it did before roots were in the key)."""
    import torch

    from xbm.io import save_safetensors, tensors_hash
    from xbm.models import create_model
    from xbm.train.pretrain import cache_dir, get_backbone

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    cfg = PretrainConfig(model="small_cnn", width=2, precision="fp32")
    arch = {"name": "small_cnn", "num_classes": 10, "in_channels": 1, "width": 2}
    state = create_model("small_cnn", num_classes=10, in_channels=1, width=2).state_dict()
    default = cache_dir() / "backbones" / cfg.cache_name()
    default.parent.mkdir(parents=True)
    save_safetensors(default, state, {"format": "xbm-backbone/1", "arch": arch,
                                      "dataset": "fashion-mnist", "accuracy": 0.0,
                                      "content_hash": tensors_hash(state)})
    said = []
    _, _, path = get_backbone(cfg, torch.device("cpu"), root=str(tmp_path / "task_data"),
                              log=said.append)
    assert path == default
    # said, with the command that would pretrain one on the root instead
    assert "no backbone pretrained on --data-root" in said[0] and "the cached default one " \
        "serves, pretrained on the installed fashion-mnist" in said[0]
    assert f"--data-root {tmp_path / 'task_data'}" in said[0] and "xbm pretrain --model " \
        "small_cnn --width 2" in said[0]


def test_a_cached_backbone_of_another_recipe_is_refused(tmp_path, monkeypatch):
    """A cache name rounded lr and mixup to six digits (1.0000004e-3 took 1e-3's backbone),
    and a file renamed or copied into the cache was loaded on its name alone: names now keep
    every digit, and the recipe the file records must be the one asked for."""
    import torch

    from xbm.errors import BundleError
    from xbm.train.pretrain import cache_dir, get_backbone, pretrain

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    assert PretrainConfig(lr=1.0000004e-3, precision="fp32").cache_name() != \
        PretrainConfig(lr=1e-3, precision="fp32").cache_name()
    assert "-lr0.002-" in PretrainConfig(precision="fp32").cache_name()  # as every earlier name
    root = tmp_path / "fm"
    root.mkdir()
    _write_idx_root(root)
    made = PretrainConfig(model="small_cnn", width=2, dataset="mnist", epochs=1, batch_size=8,
                          precision="fp32", lr=3e-3)
    asked = PretrainConfig(model="small_cnn", width=2, dataset="mnist", epochs=1, batch_size=8,
                           precision="fp32")
    out = cache_dir() / "backbones" / asked.cache_name()
    pretrain(made, torch.device("cpu"), out, root=str(root), progress=False, log=lambda *a: None)
    with pytest.raises(BundleError, match=r"was pretrained with another recipe than its name "
                       r"says \(lr 0.003 vs 0.002: recorded vs asked\); delete it"):
        get_backbone(asked, torch.device("cpu"), log=lambda *a: None)
    _, _, p = get_backbone(asked, torch.device("cpu"), path=out, log=lambda *a: None)
    assert p == out  # a file the user names is theirs to choose


@pytest.mark.filterwarnings("ignore:the backbone reached")
def test_two_runs_of_one_recipe_pretrain_it_once(tmp_path, monkeypatch):
    """Two runs that need the same uncached backbone (two demos sharing $XBM_CACHE) both
    pretrained it and both wrote it. The second now waits on the first's lock and loads what
    the first cached."""
    import threading
    import time

    import torch

    from xbm.train import pretrain as pt

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "fm"
    root.mkdir()
    _write_idx_root(root)
    cfg = PretrainConfig(model="small_cnn", width=2, dataset="mnist", epochs=1, batch_size=8,
                         precision="fp32")
    real, calls = pt.pretrain, []
    started, go = threading.Event(), threading.Event()

    def slow_pretrain(*a, **k):  # the first run holds the lock until the second waits on it
        calls.append(1)
        started.set()
        assert go.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(pt, "pretrain", slow_pretrain)
    results, said = {}, []

    def run(key, log):
        results[key] = pt.get_backbone(cfg, torch.device("cpu"), root=str(root),
                                       progress=False, log=log)

    first = threading.Thread(target=run, args=("first", lambda *a: None))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=run, args=("second", said.append))
    second.start()
    deadline = time.monotonic() + 30
    while not any("waiting for it to finish" in m for m in said) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.set()
    first.join(60)
    second.join(60)
    assert len(calls) == 1, "the waiting run pretrained too"
    assert "another xbm process is pretraining" in said[0]
    assert said[-1].startswith("loaded cached backbone")
    assert results["first"][1]["content_hash"] == results["second"][1]["content_hash"]
    assert results["first"][2] == results["second"][2]


def test_the_pretrain_lock_steps_aside_where_locks_are_not_supported(tmp_path, monkeypatch):
    """NFS without lockd (ENOLCK) or a FUSE mount (EOPNOTSUPP) cannot lock: the work goes ahead
    unlocked, as before locks existed, rather than failing."""
    import errno
    import fcntl

    from xbm.train.pretrain import pretrain_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with pretrain_lock(tmp_path / "bb.safetensors", log=ran.append):
        ran.append("body")
    assert ran == ["body"]


def _write_idx_root(root) -> None:
    """Four tiny MNIST-style IDX files (16 training, 8 test images) in ``root``."""
    import numpy as np

    from xbm import data as xd

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("t10k", 8)):
        xd.write_idx(root / f"{split}-images-idx3-ubyte.gz",
                     rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        xd.write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_a_data_root_backbone_records_the_root_in_its_rebuild_command(tmp_path):
    """The recipe a bundle keeps must rebuild the backbone: one pretrained from ``--data-root``
    copies needs that root in the command, or the command pretrains on other data."""
    import torch

    from xbm.train.pretrain import pretrain, pretrain_command

    root = tmp_path / "my fm"
    root.mkdir()
    _write_idx_root(root)
    cfg = PretrainConfig(model="small_cnn", width=2, epochs=1, batch_size=8, precision="fp32")
    _, meta = pretrain(cfg, torch.device("cpu"), root=str(root), progress=False,
                       log=lambda *a: None)
    assert meta["config"]["data_root"] == str(root)
    assert pretrain_command(meta["config"]).endswith(f"--data-root '{root}'")
    assert "--data-root" not in pretrain_command(cfg.for_device("cpu").__dict__)


def test_pretrain_refuses_a_subset_larger_than_the_data(tmp_path):
    """It trained on the whole set and cached it under an ``-n100000`` name, a second copy of
    the plain recipe's backbone."""
    import pytest
    import torch

    from xbm.errors import ConfigError
    from xbm.train.pretrain import pretrain

    _write_idx_root(tmp_path)
    cfg = PretrainConfig(model="small_cnn", width=2, epochs=1, batch_size=8, precision="fp32",
                         train_subset=17)
    out = tmp_path / "bb.safetensors"
    with pytest.raises(ConfigError, match="train_subset 17 exceeds the 16 training images"):
        pretrain(cfg, torch.device("cpu"), out, root=str(tmp_path), progress=False,
                 log=lambda *a: None)
    assert not out.exists()


_ODD_BATCH_SCRIPT = """
import sys, torch
from xbm.train import pretrain as P

seen, build = [], P.build_model

def spy(arch):
    model = build(arch)
    conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    conv.register_forward_pre_hook(lambda m, inp: seen.append(
        (inp[0].shape[0], m.weight.is_contiguous(memory_format=torch.channels_last),
         m.weight.detach().double().sum().item())) if m.training else None)
    return model

P.build_model = spy
cfg = P.PretrainConfig(model="resnet18_cifar", width=4, epochs=2, batch_size=7,
                       precision="fp32", augment="none", mixup=0)
P.pretrain(cfg, torch.device("cpu"), root=sys.argv[1], progress=False, log=lambda *a: None)
print(seen)
"""


def test_pretraining_runs_odd_batches_in_the_standard_layout(tmp_path):
    """torch 2.13's oneDNN corrupts the heap (a segfault or "double free") in the weight gradient
    of a channels-last convolution on a batch of odd size: an image folder or subset whose last
    batch is odd killed ``xbm pretrain``. Odd batches now run in the standard layout, even ones
    channels-last as before. A subprocess, so that a crash fails this test, not the suite."""
    import ast
    import itertools
    import subprocess
    import sys

    _write_idx_root(tmp_path)  # 16 images in batches of 7: 7, 7, 2 per epoch
    run = subprocess.run([sys.executable, "-c", _ODD_BATCH_SCRIPT, str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    assert [s[:2] for s in seen] == [(7, False), (7, False), (2, True)] * 2
    # and every step, across each re-layout, still trains the weights the model holds
    sums = [s[2] for s in seen]
    assert all(a != b for a, b in itertools.pairwise(sums)), sums


@pytest.mark.parametrize("acc,warned", [(9.0, True), (18.9, True), (19.1, False), (80.0, False)])
def test_a_backbone_near_chance_is_warned_about(acc, warned, tmp_path, monkeypatch):
    """A backbone at chance (too few images or epochs) let every later task score the
    majority class without a word."""
    import warnings

    from xbm.train import pretrain as P

    _write_idx_root(tmp_path)
    monkeypatch.setattr(P, "evaluate", lambda *a, **k: acc)
    cfg = PretrainConfig(model="small_cnn", width=2, epochs=1, batch_size=8, precision="fp32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P.pretrain(cfg, torch.device("cpu"), root=str(tmp_path), progress=False,
                   log=lambda *a: None)
    said = [str(w.message) for w in caught if "near chance" in str(w.message)]
    assert len(said) == warned
    if warned:
        assert said[0].startswith(f"the backbone reached {acc:.2f}% on fashion-mnist's test set, "
                                  "near chance (10.0% for 10 classes)")
