"""Task bundles and backbone files: round trips, and refusals with clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

from xbm.data import make_fixture_task
from xbm.errors import BundleError, DatasetNotFoundError
from xbm.hardware import get_spec
from xbm.io import save_safetensors
from xbm.models import create_model
from xbm.multitask import MultiTaskModel
from xbm.train import train_task
from xbm.train.pretrain import PretrainConfig, load_backbone, pretrain

ARCH = {"name": "small_cnn", "num_classes": 4, "in_channels": 1, "width": None}


def build(seed=0, rows=16, **spec):
    torch.manual_seed(seed)
    return MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1),
                          get_spec(**{"rows": rows, "cols": 16} | spec), arch=ARCH)


@pytest.fixture
def trained(tmp_path):
    mtm = build()
    data = make_fixture_task("a", num_classes=3, n_train=32, n_test=16, seed=0)
    for method in ("xbm", "piggyback"):
        mtm.add_task(method, 3, method, dataset="fixture")
        loader, _ = data.loaders(16, seed=0)
        train_task(mtm, method, loader, 1, torch.device("cpu"), progress=False)
        with torch.no_grad():  # one epoch switches nothing off: a lost score would not show
            for _, _, st in mtm.layer_states(method):
                st.score.view(-1)[::3] = -1.0
    assert mtm.masked_off_columns("xbm") > 0 and mtm.reprogrammed_cells("piggyback") > 0
    path = tmp_path / "tasks.safetensors"
    mtm.save_bundle(path)
    return mtm, path


def test_bundle_round_trip_restores_outputs(trained):
    mtm, path = trained
    x = torch.randn(3, 1, 28, 28)
    other = build()
    assert other.load_bundle(path) == ["xbm", "piggyback"]
    other.eval()
    mtm.eval()
    for t in ("xbm", "piggyback", "base"):
        with mtm.use_task(t), other.use_task(t):
            assert torch.equal(mtm(x), other(x))
    for t in ("xbm", "piggyback"):
        want, got = mtm.task_state_dict(t), other.task_state_dict(t)
        assert want.keys() == got.keys()
        assert all(torch.equal(v, got[k]) for k, v in want.items())
        assert other.masked_off_columns(t) == mtm.masked_off_columns(t)
        assert other.reprogrammed_cells(t) == mtm.reprogrammed_cells(t)
    assert other.tasks["xbm"].method == "xbm" and other.tasks["xbm"].dataset == "fixture"


def test_bundle_refuses_another_backbone(trained):
    """Other weights, and a backbone that differs in one BatchNorm statistic alone (the
    backbone's hash covers its buffers too)."""
    _, path = trained
    with pytest.raises(BundleError, match="backbone"):
        build(seed=1).load_bundle(path)
    nudged = build()
    with torch.no_grad():
        next(b for n, b in nudged.model.named_buffers() if n.endswith("running_var"))[0] += 1e-3
    with pytest.raises(BundleError, match="backbone"):
        nudged.load_bundle(path)


@pytest.mark.parametrize("change, said", [
    ({"rows": 8}, "rows 16 against this model's 8"),
    ({"cols": 32}, "cols 16 against this model's 32"),
    ({"cell_bits": 4}, "cell_bits 2 against this model's 4"),
    ({"pe_rows": 1}, "pe_rows 2 against this model's 1"),
])
def test_bundle_refuses_another_spec(trained, change, said):
    """Every field of the geometry counts, not only the rows that shape a mask: bit widths
    decide a task's re-programmed cells, the PE shape XMA2's grid."""
    _, path = trained
    with pytest.raises(BundleError, match=rf"another crossbar spec \({said}\); build the "
                                          r"model with the bundle's spec"):
        build(**change).load_bundle(path)


def assert_untouched(fresh: MultiTaskModel) -> None:
    """Nothing half-loaded: no task, no per-task state left in any layer, and the backbone as
    a model built the same way holds it."""
    assert fresh.tasks == {}
    assert not [k for k in fresh.model.state_dict() if "xbm_tasks." in k]
    clean = build().backbone_state()
    assert clean.keys() == fresh.backbone_state().keys()
    assert all(torch.equal(v, fresh.backbone_state()[k]) for k, v in clean.items())


def test_corrupt_and_truncated_bundles(trained, tmp_path):
    _, path = trained
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a bundle at all")
    for p, says in ((trunc, "the file is corrupt or truncated, re-create it"),
                    (junk, "the file is corrupt or truncated, re-create it"),
                    (tmp_path / "missing.safetensors", "no such file; check the path")):
        fresh = build()
        with pytest.raises(BundleError) as info:
            fresh.load_bundle(p)
        msg = str(info.value)  # one line that names the file, the problem and the fix
        assert msg.startswith(f"{p}: ") and msg.endswith(says) and "\n" not in msg, msg
        assert_untouched(fresh)


def test_a_changed_header_byte_is_caught(trained, tmp_path):
    """The content hash covers the tensors only: one flipped bit in a task record (28 -> 20,
    its image size) still parsed, and eval then fed the task 20-pixel images and reported
    another accuracy, exit 0."""
    from xbm.multitask import read_bundle_meta

    _, path = trained
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")  # safetensors: 8-byte header length, JSON header
    header = data[8:8 + n]
    assert header.count(b'\\"dataset\\": \\"fixture\\"') == 2
    changed = header.replace(b'\\"dataset\\": \\"fixture\\"', b'\\"dataset\\": \\"fixturf\\"', 1)
    assert len(changed) == len(header)
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(data[:8] + changed + data[8 + n:])
    for load in (lambda p: build().load_bundle(p), read_bundle_meta):
        with pytest.raises(BundleError, match="metadata hash mismatch; the bundle's header"):
            load(bad)
    fresh = build()
    with pytest.raises(BundleError):
        fresh.load_bundle(bad)
    assert_untouched(fresh)
    assert build().load_bundle(path) == ["xbm", "piggyback"]  # the untouched file loads


def test_bundle_with_a_wrong_tensor_shape_leaves_the_model_clean(trained, tmp_path):
    mtm, _ = trained
    tensors = mtm.task_state_dict("xbm")
    key = next(k for k in tensors if k.endswith("score"))
    tensors[key] = torch.zeros(2, 2)
    from dataclasses import asdict

    meta = {"format": "xbm-task-bundle/1", "backbone_hash": mtm.backbone_hash,
            "spec": mtm.spec.to_dict(), "arch": ARCH, "head_name": "fc",
            "tasks": [asdict(mtm.tasks["xbm"])]}
    bad = tmp_path / "bad.safetensors"
    save_safetensors(bad, tensors, meta)
    fresh = build()
    with pytest.raises(BundleError, match="shape"):
        fresh.load_bundle(bad)
    assert_untouched(fresh)  # it failed in the middle: the layers it had reached are clean


def test_save_bundle_replaces_only_a_bundle(trained, tmp_path, monkeypatch):
    """save_bundle wrote over any file: a backbone (which every bundle of it depends on), a
    fault map or a text file became a bundle without a word. The CLI refused already."""
    from xbm.errors import XbmError

    mtm, path = trained
    mtm.save_bundle(path)  # its own bundle, updated in place: as before
    assert build().load_bundle(path) == ["xbm", "piggyback"]
    backbone = tmp_path / "bb.safetensors"
    save_safetensors(backbone, {"w": torch.ones(2)}, {"format": "xbm-backbone/1"})
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    other = tmp_path / "other.safetensors"
    save_safetensors(other, {"w": torch.ones(2)}, {"tool": "someone else's"})
    for target, said in ((backbone, "is an xbm backbone"), (notes, "is not an xbm task bundle"),
                         (other, "is not an xbm task bundle"), (tmp_path, "is a folder")):
        before = target.read_bytes() if target.is_file() else None
        with pytest.raises(XbmError, match=f"save_bundle: .* {said}"):
            mtm.save_bundle(target)
        assert before is None or target.read_bytes() == before
    # "~" as the write takes it (not expanded): a backbone in ./~/ is guarded too
    (tmp_path / "~").mkdir()
    save_safetensors(tmp_path / "~" / "bb.safetensors", {"w": torch.ones(2)},
                     {"format": "xbm-backbone/1"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(XbmError, match="is an xbm backbone"):
        mtm.save_bundle("~/bb.safetensors")
    empty = tmp_path / "empty.safetensors"  # e.g. a NamedTemporaryFile: nothing to lose
    empty.touch()
    mtm.save_bundle(empty)
    assert build().load_bundle(empty) == ["xbm", "piggyback"]


def test_loading_a_bundle_leaves_the_rng_alone(trained):
    """load_bundle drew every stored task's throw-away initialisation from the global RNG, so
    a task added after it (xbm adapt --bundle with the same --seed) started from other values
    depending on what the bundle held."""
    _, path = trained

    def new_task(with_bundle: bool) -> dict[str, torch.Tensor]:
        mtm = build()
        torch.manual_seed(7)
        if with_bundle:
            mtm.load_bundle(path)
        mtm.add_task("new", 3, "xma")
        return {k: v.clone() for k, v in mtm.task_state_dict("new").items()}

    alone, after = new_task(False), new_task(True)
    assert alone.keys() == after.keys() and all(torch.equal(alone[k], after[k]) for k in alone)


def test_not_a_bundle(tmp_path):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, {"a": torch.zeros(1)}, {"format": "other"})
    with pytest.raises(BundleError, match="not an xbm task bundle"):
        build().load_bundle(p)


def test_another_tools_safetensors_file_is_not_called_corrupt(tmp_path):
    """safetensors' own metadata is not JSON ({"format": "pt"}): such a file was reported as
    "corrupt or truncated" rather than as not being xbm's."""
    from safetensors.torch import save_file

    p = tmp_path / "torch.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"format": "pt"})
    with pytest.raises(BundleError, match="not an xbm task bundle") as e:
        build().load_bundle(p)
    assert "corrupt" not in str(e.value)


class _Tied(torch.nn.Module):
    """One conv used under two names (weight tying): a crossbar read twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = self.c2
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["xbm", "xma2", "finetune"])
def test_a_layer_used_under_two_names_saves_and_loads(tmp_path, method):
    """state_dict() lists a shared module once per name, and safetensors refuses tensors that
    share memory: training worked, then save_bundle failed with safetensors' RuntimeError."""
    torch.manual_seed(0)
    mtm = MultiTaskModel(_Tied(), get_spec(rows=16, cols=16))
    cfg = {"warmup_steps": 1, "pe_budget": 0.34} if method == "xma2" else None
    mtm.add_task("t", 3, method, cfg)
    data = make_fixture_task("t", num_classes=3, n_train=32, n_test=8, seed=0)
    train_task(mtm, "t", data.loaders(16, seed=0)[0], 1, torch.device("cpu"), progress=False)
    path = tmp_path / "tied.safetensors"
    mtm.save_bundle(path)
    torch.manual_seed(0)
    other = MultiTaskModel(_Tied(), get_spec(rows=16, cols=16))
    assert other.load_bundle(path) == ["t"]
    x = torch.randn(2, 1, 8, 8)
    mtm.eval()
    other.eval()
    with mtm.use_task("t"), other.use_task("t"):
        assert torch.equal(mtm(x), other(x))


def test_backbone_file_round_trip_and_corruption(tmp_path):
    cfg = PretrainConfig(model="small_cnn", width=4, dataset="animal-mnist", epochs=1,
                         train_subset=128)
    out = tmp_path / "bb.safetensors"
    try:
        model, meta = pretrain(cfg, torch.device("cpu"), out, progress=False, log=lambda *a: None)
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc))
    loaded, meta2 = load_backbone(out)
    assert meta2["content_hash"] == meta["content_hash"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
        # pretraining runs channels-last on the CPU; what it returns must be laid out as what
        # loads from the cache, or a fresh and a cached backbone would compute differently
        assert v.stride() == loaded.state_dict()[k].stride(), k
    # flip one byte in the tensor data: the content hash catches it
    raw = bytearray(out.read_bytes())
    raw[-5] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="hash|corrupt"):
        load_backbone(bad)
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_cached_backbone_names_the_file_and_the_fix(tmp_path, monkeypatch):
    """A damaged cache entry is not pretrained over silently (minutes) nor loaded: the error names
    the file to delete."""
    from xbm.train.pretrain import get_backbone

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    cfg = PretrainConfig(model="small_cnn", width=4, dataset="animal-mnist", epochs=1,
                         train_subset=128)
    try:
        _, _, path = get_backbone(cfg, torch.device("cpu"), progress=False, log=lambda *a: None)
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"cached backbone is unusable: .*hash.*Delete .*"
                       + path.name):
        get_backbone(cfg, torch.device("cpu"), progress=False, log=lambda *a: None)
    # a backbone the user names keeps the plain message (it is theirs, not the cache's)
    with pytest.raises(BundleError, match="content hash mismatch") as exc:
        get_backbone(cfg, torch.device("cpu"), progress=False, log=lambda *a: None, path=path)
    assert "Delete" not in str(exc.value)


def test_check_output_probes_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    """Permission bits are not the whole story (root passes os.access on /proc, where every
    create fails): a folder that cannot take a file is refused before any work."""
    import tempfile

    from xbm.errors import XbmError
    from xbm.io import check_output

    assert check_output(tmp_path / "sub" / "x.safetensors") == tmp_path / "sub" / "x.safetensors"
    assert list(tmp_path.iterdir()) == []  # probed, nothing left, the missing folder not made

    def refuse(*a, **kw):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(XbmError, match=r"--out .*x: cannot create files in .*"
                       r"\(Read-only file system\); pass a writable path"):
        check_output(tmp_path / "x")


def test_a_failed_atomic_write_names_the_target_and_leaves_nothing(tmp_path):
    """A disk that fills while a file is written: the error names the file asked for, not the
    temporary one beside it, and neither is left behind."""
    import errno

    from xbm.io import atomic_path

    target = tmp_path / "x.safetensors"
    with pytest.raises(OSError) as e, atomic_path(target) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")  # a file where the folder would go: mkdir fails
    with pytest.raises(OSError) as e, atomic_path(tmp_path / "file" / "y"):
        pass
    assert e.value.filename == str(tmp_path / "file" / "y")


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_folder_lock_keeps_another_process_out(tmp_path):
    """The lock adapt holds while it folds in and writes a bundle: another process cannot take
    it meanwhile, and can once it is released."""
    import subprocess

    from xbm.io import folder_lock

    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\ntry:\n"
             "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('free')\n"
             "except BlockingIOError:\n    print('held')\n")

    def other() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(tmp_path)], check=True,
                              capture_output=True, text=True).stdout.strip()

    with folder_lock(tmp_path / "b.safetensors"):
        assert other() == "held"
    assert other() == "free"


def test_pretrain_keeps_a_registered_colour_datasets_channels(monkeypatch):
    """``PretrainConfig.channels`` left out is the dataset's own: a registered RGB dataset
    pretrains an RGB backbone, as before the field existed; asking for grey is refused."""
    from xbm.data import register_dataset, registry
    from xbm.errors import ConfigError

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_dataset("tiny-rgb")
    def _rgb(root, seed):
        return make_fixture_task("tiny-rgb", 3, 16, 8, seed).with_channels(3)

    recipe = dict(model="small_cnn", width=2, dataset="tiny-rgb", epochs=1, batch_size=8,
                  augment="none", mixup=0.0, precision="fp32")
    _, meta = pretrain(PretrainConfig(**recipe), torch.device("cpu"), progress=False,
                       log=lambda *a: None)
    assert meta["arch"]["in_channels"] == 3 and meta["config"]["channels"] is None
    with pytest.raises(ConfigError, match="needs a 3-channel backbone"):
        pretrain(PretrainConfig(**recipe, channels=1), torch.device("cpu"), progress=False,
                 log=lambda *a: None)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX links and permission bits")
def test_a_write_through_a_link_keeps_the_link_and_the_files_permissions(tmp_path):
    """Updating a bundle through a symbolic link replaced the link by a plain file (the file it
    pointed to kept the old tasks), and a chmod 600 bundle came back world-readable."""
    import os
    import stat

    from xbm.io import atomic_path

    shared = tmp_path / "shared"
    shared.mkdir()
    real = shared / "real.bin"
    real.write_text("old")
    os.chmod(real, 0o600)
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    with atomic_path(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert sorted(p.name for p in shared.iterdir()) == ["real.bin"]  # no temporary left
    fresh = tmp_path / "fresh.bin"  # a new file: the usual 0666 & ~umask
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(fresh) as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_a_tensor_of_another_dtype_is_refused(trained, tmp_path):
    """Only shapes were compared: a head bias stored as int64 (hashes recomputed) was cast
    silently by load_state_dict."""
    from xbm.io import load_safetensors, metadata_hash, tensors_hash

    _, path = trained
    tensors, meta = load_safetensors(path)
    key = next(k for k in tensors if k.startswith("fc.") and k.endswith(".bias"))
    tensors[key] = tensors[key].round().to(torch.int64)
    meta["content_hash"] = tensors_hash(tensors)
    meta["meta_hash"] = metadata_hash(meta)
    bad = tmp_path / "dtype.safetensors"
    save_safetensors(bad, tensors, meta)
    fresh = build()
    with pytest.raises(BundleError, match=f"tensor {key} is torch.int64, expected torch.float32"):
        fresh.load_bundle(bad)
    assert_untouched(fresh)


def test_metadata_with_integer_keys_round_trips(tmp_path):
    """The header hash was taken over the dict in memory but checked over its JSON copy, whose
    keys are strings: {9: .., 10: ..} sorted otherwise and a good bundle read as corrupt (and
    keys of mixed types could not be saved at all)."""
    mtm = build()
    mtm.add_task("a", 3, "xbm")
    mtm.tasks["a"].extra["per_class_counts"] = {9: 5, 10: 7}
    mtm.tasks["a"].extra["mixed"] = {1: "x", "b": 2}
    path = tmp_path / "k.safetensors"
    mtm.save_bundle(path)
    fresh = build()
    assert fresh.load_bundle(path) == ["a"]
    assert fresh.tasks["a"].extra["per_class_counts"] == {"9": 5, "10": 7}


def test_save_bundle_refuses_extras_the_loader_would(tmp_path):
    """extra["classes"] = [0, 1, 2] saved, and the loader then called the file corrupt."""
    from xbm.errors import XbmError

    mtm = build()
    mtm.add_task("a", 3, "xbm")
    mtm.tasks["a"].extra["classes"] = [0, 1, 2]
    with pytest.raises(XbmError, match="task 'a': extra.classes holds a name that is not a "
                       "string"):
        mtm.save_bundle(tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_a_converted_half_precision_model_is_refused_too():
    """apply() refuses a bfloat16 model, but one converted first and cast afterwards took the
    already-converted branch and trained bfloat16 task state."""
    from xbm.errors import XbmError
    from xbm.nn import apply

    model = apply(create_model("small_cnn", num_classes=4, in_channels=1), get_spec(rows=16,
                                                                                   cols=16))
    with pytest.raises(XbmError, match="the model holds bfloat16 tensors"):
        MultiTaskModel(model.to(torch.bfloat16), get_spec(rows=16, cols=16))


def test_an_empty_xbm_cache_is_unset(monkeypatch, tmp_path):
    """Backbones went to ./backbones under XBM_CACHE='' (the data cache already read it as
    unset), and a ~ in it was not expanded."""
    from pathlib import Path

    from xbm.data.registry import cache_dir as data_cache_dir
    from xbm.train.pretrain import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XBM_CACHE", "")
    assert cache_dir() == data_cache_dir() == Path.home() / ".cache" / "xbm"
    monkeypatch.setenv("XBM_CACHE", "~/c")
    assert cache_dir() == tmp_path / "c"


def _edit_header(path, out, field, value) -> None:
    """Rewrite one JSON field of an xbm file's header, keeping every other field (its
    meta_hash included), as a hand edit or a corrupt byte would."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta[field] = json.dumps(value)
    save_file(tensors, str(out), metadata=meta)


def test_backbone_and_fault_map_headers_are_hashed_too(tmp_path):
    """A backbone's or fault map's header was not covered by any hash: an edited width in
    'arch' built another model (or failed oddly), edited rates were simulated as recorded."""
    from xbm.hardware import get_spec
    from xbm.hardware.faults import FaultMap
    from xbm.models import create_model
    from xbm.train.pretrain import import_backbone, load_backbone

    ckpt = tmp_path / "w.pth"
    torch.save(create_model("small_cnn", num_classes=4, in_channels=1).state_dict(), ckpt)
    bb = tmp_path / "bb.safetensors"
    meta = import_backbone("small_cnn", ckpt, bb, num_classes=4, in_channels=1,
                           dataset="fixture", accuracy=50.0)
    assert load_backbone(bb)[1]["meta_hash"] == meta["meta_hash"]
    edited = tmp_path / "edited.safetensors"
    _edit_header(bb, edited, "accuracy", 99.0)
    with pytest.raises(BundleError, match="metadata hash mismatch; the backbone's header was "
                       "changed or is corrupt; re-run pretrain"):
        load_backbone(edited)
    # a backbone written before its header was hashed still loads
    old = tmp_path / "old.safetensors"
    from safetensors import safe_open

    with safe_open(str(bb), framework="pt") as f:
        header = {k: v for k, v in f.metadata().items() if k != "meta_hash"}
    _edit_header(bb, old, "accuracy", 50.0)
    with safe_open(str(old), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    from safetensors.torch import save_file

    save_file(tensors, str(old), metadata=header)
    assert load_backbone(old)[1]["accuracy"] == 50.0

    mtm = MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1),
                         get_spec(rows=16, cols=16))
    fm = FaultMap.generate(mtm, sa0_rate=0.01, sa1_rate=0.02, seed=5)
    chip = tmp_path / "chip.safetensors"
    fm.save(chip)
    assert FaultMap.load(chip).sa1_rate == 0.02
    _edit_header(chip, edited, "sa1_rate", 0.2)
    with pytest.raises(BundleError, match="the fault map's header was changed"):
        FaultMap.load(edited)


def test_outputs_into_a_stream_write_into_it_and_leave_it_a_stream(tmp_path, monkeypatch):
    """As root, an output path of /dev/null was replaced by the atomic rename: /dev/null
    became a regular file that every later program wrote into (a CLI fuzz did it). A
    character device or a named pipe is now written into, and stays what it was."""
    import json
    import os
    import stat
    import threading
    from pathlib import Path

    from xbm.io import _is_stream, check_output, write_json_atomic

    assert _is_stream(Path(os.devnull)) and not _is_stream(tmp_path)
    import tempfile

    staging = tmp_path / "staging"  # a stream's content is staged in the temp dir
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    assert check_output(fifo, "file", "--json-out") == fifo
    write_json_atomic(fifo, {"a": 1})
    reader.join(timeout=30)
    assert json.loads(got[0]) == {"a": 1}
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # still a pipe, not a file renamed onto it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "staging"]
    assert list(staging.iterdir()) == []  # no temporary left
    # a shell's `--json-out >(cmd)`: /dev/fd/N, a link whose real path (/proc/PID/fd/
    # pipe:[...]) cannot be opened; it was refused as "cannot create files in /proc/PID/fd"
    if not Path("/dev/fd").is_dir():
        return
    r, w = os.pipe()
    try:
        anon = Path(f"/dev/fd/{w}")
        assert check_output(anon, "file", "--json-out") == anon
        write_json_atomic(anon, {"b": 2})
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as f:
            r = -1
            assert json.loads(f.read()) == {"b": 2}
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


def test_a_bundle_with_a_task_name_the_new_rule_refuses_still_loads(tmp_path):
    """Session 28 refused new task names led by '-' (``--task -x`` reads as a flag); a bundle
    that holds one from before (``--task=-birds``, a folder named -birds/) must still load,
    be evaluated and be extended."""
    import copy

    from xbm.errors import XbmError

    torch.manual_seed(0)
    bb = create_model("small_cnn", num_classes=3, in_channels=1, width=4)
    old = MultiTaskModel(copy.deepcopy(bb), "default")
    old._loading_bundle = True  # what add_task accepted before session 28
    old.add_task("-birds", 3, "xbm")
    old._loading_bundle = False
    path = tmp_path / "old.safetensors"
    old.save_bundle(path)
    mtm = MultiTaskModel(copy.deepcopy(bb), "default")
    assert mtm.load_bundle(path) == ["-birds"]
    mtm.add_task("cats", 3, "xbm")  # extended with a new name
    with pytest.raises(XbmError, match="not starting with '-'"):
        mtm.add_task("-dogs", 3, "xbm")  # a new name keeps the new rule
    with pytest.raises(XbmError, match="is invalid"):
        mtm.add_task("dogs\n", 3, "xbm")  # `$` matched before a trailing newline
