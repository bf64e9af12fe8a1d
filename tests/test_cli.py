"""The command line: the demo end to end on a tiny subset, the mapping report, clear errors."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from xbm.cli import main
from xbm.methods import list_methods

TINY = ["--width", "4", "--pretrain-epochs", "1", "--train-subset", "96", "--test-subset", "64",
        "--batch-size", "32", "--epochs", "1", "--no-progress", "--device", "cpu"]


def _datasets_installed() -> bool:
    from xbm.data import load_dataset
    from xbm.errors import DatasetNotFoundError

    try:
        for name in ("fashion-mnist", "mnist", "animal-mnist"):
            load_dataset(name)
    except DatasetNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(not _datasets_installed(),
                                reason="offline datasets not installed (bash scripts/setup.sh)")


@needs_data
def test_demo_end_to_end_on_a_tiny_subset(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("pretrain_subset: 256\n")
    out = tmp_path / "run"
    rc = main(["demo", "--out", str(out), "--config", str(cfg), *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    methods = res["config"]["methods"]
    assert methods == list_methods()  # the demo runs every registered method by default
    assert sorted({r["method"] for r in res["runs"]}) == sorted(methods)
    # the width used (given, or picked by device) is recorded, and is the backbone's
    assert res["config"]["width"] == res["backbone"]["arch"]["width"]
    assert [res["config"][k] for k in ("rows", "cols", "weight_bits", "cell_bits")] == \
        [res["spec"][k] for k in ("rows", "cols", "weight_bits", "cell_bits")]  # resolved
    # the default pretraining recipe is recorded with the backbone and named in its cache file
    assert res["backbone"]["augment"] == res["config"]["pretrain_augment"] == "affine-flip"
    assert res["backbone"]["mixup"] == res["config"]["pretrain_mixup"] == 0.4
    # the precision as resolved for this machine (auto: bf16 only with native bf16 units)
    from xbm.train.pretrain import default_precision

    prec = default_precision("cpu")
    assert res["backbone"]["precision"] == res["config"]["pretrain_precision"] == prec
    assert res["config"]["precision"] == prec  # the adaption's own, resolved by the same rule
    assert res["config"]["cuda_graph"] is False  # default (null) resolved: no CUDA here
    # every method's config in force, defaults included (config.method_configs: overrides)
    from xbm.methods import get_method_class

    assert set(res["method_configs"]) == set(methods)
    for m in methods:
        assert res["method_configs"][m] == get_method_class(m).config_class().to_dict()
    assert res["method_configs"]["xbm"]["threshold"] == 5e-3
    # the header says what "auto" resolved to, before any work
    assert f"xbm demo: mnist-family on cpu, resnet18_cifar width {res['config']['width']}, " \
        f"pretraining {prec}, adaption {prec}, " in printed
    assert "CUDA graphs" not in printed
    suffix = "" if prec == "fp32" else f"-{prec}"
    assert res["backbone"]["path"].endswith(f"-affine-flip-mixup0.4{suffix}.safetensors")
    assert "checks: the programmed backbone tensors bit-identical after every method" in printed
    from xbm.train.demo import format_table

    broken = json.loads(json.dumps(res))
    broken["checks"]["xbm"]["earlier_tasks_unchanged"] = False
    assert format_table(broken).splitlines()[-1] == "checks: FAILED xbm: earlier_tasks_unchanged"
    # the energy columns in one format, as xbm cost prints them (.3g mixed 0.000565 and 2.97e-09)
    head, _, *body = format_table(res).splitlines()
    assert head.split()[-7:] == ["adapt", "J", "switch", "J", "trainable", "train", "s"]
    for row in (line.split() for line in body[:len(methods)]):
        for v in row[-4:-2]:  # adapt J, switch J (then trainable, train s)
            assert re.fullmatch(r"\d\.\d{3}e[+-]\d\d", v), (row, v)
    gap = res["summary"]["xbm"]["mean_new_task_accuracy"] - \
        res["summary"]["piggyback"]["mean_new_task_accuracy"]
    assert "mean new-task accuracy vs Piggyback: " in printed and f"xbm {gap:+.2f}" in printed
    for m in methods:
        assert m in printed
        assert res["checks"][m]["backbone_bit_identical"] is True
        assert res["checks"][m]["base_accuracy_unchanged"] is True
        assert res["checks"][m]["earlier_tasks_unchanged"] is True
    for r in res["runs"]:
        for k in ("method", "task", "base_task", "accuracy", "mask_bits", "reprogrammed_cells",
                  "trainable_params", "train_seconds"):
            assert k in r, k
    _check_documented_schema(res)
    xbm_runs = [r for r in res["runs"] if r["method"] == "xbm" and not r["base_task"]]
    pb_runs = [r for r in res["runs"] if r["method"] == "piggyback" and not r["base_task"]]
    assert all(r["reprogrammed_cells"] == 0 for r in xbm_runs)
    tot = res["mapping_totals"]
    assert sum(r["mask_bits"] for r in xbm_runs) == len(xbm_runs) * tot["xbm_mask_bits"]
    assert sum(r["mask_bits"] for r in pb_runs) == len(pb_runs) * tot["piggyback_mask_bits"]
    # the second run reuses the cached backbone and gives the same masks and accuracies (seeded)
    out2 = tmp_path / "run2"
    assert main(["demo", "--out", str(out2), "--config", str(cfg), "--methods", "xbm",
                 *TINY]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    a = [r["accuracy"] for r in res["runs"] if r["method"] == "xbm"]
    b = [r["accuracy"] for r in res2["runs"] if r["method"] == "xbm"]
    assert a == b
    # --pretrain-seed: another adaption seed on the same cached backbone, nothing pretrained
    cached = sorted(p.name for p in Path(res["backbone"]["path"]).parent.iterdir())
    out3 = tmp_path / "run3"
    assert main(["demo", "--out", str(out3), "--config", str(cfg), "--methods", "xbm",
                 *TINY, "--seed", "1", "--pretrain-seed", "0", "--weight-bits", "4",
                 "--cell-bits", "1", "--energy", "isaac"]) == 0
    res3 = json.loads((out3 / "results.json").read_text())
    # the crossbar and energy flags the YAML takes are flags too
    assert (res3["spec"]["weight_bits"], res3["spec"]["cell_bits"]) == (4, 1)
    assert res3["energy_preset"] == "isaac"
    assert res3["backbone"]["content_hash"] == res["backbone"]["content_hash"]
    assert res3["backbone"]["seed"] == 0
    assert (res3["config"]["seed"], res3["config"]["pretrain_seed"]) == (1, 0)
    assert sorted(p.name for p in Path(res["backbone"]["path"]).parent.iterdir()) == cached


def _readme_table(first_header: str) -> list[tuple[list[str], list[str]]]:
    """Rows of the docs/usage.md table whose header starts with ``first_header``: the
    backticked names of the first cell, and the remaining cells."""
    from pathlib import Path

    lines = (Path(__file__).parents[1] / "docs" / "usage.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((re.findall(r"`([^`]+)`", cells[0]), cells[1:]))
    return rows


def _check_documented_schema(res: dict) -> None:
    """docs/usage.md's results-file tables name exactly the keys the demo writes."""
    top = {k for names, _ in _readme_table("top-level key") for k in names}
    assert top == set(res), (top ^ set(res))
    backbone_cell = next(c for names, c in _readme_table("top-level key") if names == ["backbone"])
    assert set(re.findall(r"`([^`]+)`", backbone_cell[0])) == set(res["backbone"])
    summary_cell = next(c for names, c in _readme_table("top-level key") if names == ["summary"])
    for s in res["summary"].values():
        assert set(re.findall(r"`([^`]+)`", summary_cell[0])) == set(s)
    checks_cell = next(c for names, c in _readme_table("top-level key") if names == ["checks"])
    for c in res["checks"].values():
        assert set(re.findall(r"`([^`]+)`", checks_cell[0])) == set(c)
    where = {k: cells[0] for names, cells in _readme_table("record field") for k in names}
    for r in res["runs"]:
        kind = "base task" if r["base_task"] else "new tasks"
        documented = {k for k, w in where.items() if w in ("all", kind)}
        assert set(r) == documented, (kind, set(r) ^ documented)


def test_default_width_by_device():
    from xbm.train.demo import DemoConfig
    from xbm.train.pretrain import CPU_WIDTH, GPU_WIDTH, default_width

    assert DemoConfig().width is None
    assert default_width("cpu") == CPU_WIDTH == 16
    assert default_width(torch.device("cuda")) == GPU_WIDTH == 64


def test_default_width_is_the_flag_or_the_devices():
    """Commands without a bundle share one default backbone per machine; a bundle's own backbone
    is found by hash whatever its width (test_eval_finds_the_bundles_backbone_by_hash)."""
    import argparse

    from xbm.cli import _width

    cuda = torch.device("cuda")
    assert _width(argparse.Namespace(width=32), cuda) == 32
    assert _width(argparse.Namespace(width=None), cuda) == 64
    assert _width(argparse.Namespace(width=None), torch.device("cpu")) == 16


def test_map_json_totals(capsys):
    assert main(["map", "--model", "resnet50", "--rows", "64", "--cols", "64", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["xbm_mask_bits"] == 366_528 and d["piggyback_mask_bits"] == 23_454_912
    assert isinstance(d["xbm_mask_bits"], int) and isinstance(d["piggyback_mask_bits"], int)
    first = d["layers"][0]
    for k in ("name", "rows", "cols", "row_tiles", "col_tiles"):
        assert k in first
    assert main(["map", "--model", "resnet18_cifar"]) == 0
    out = capsys.readouterr().out
    assert "XBM mask" in out
    assert out.startswith("model resnet18_cifar, width 16, 1 input channel(s)\n")  # resolved
    assert main(["map", "--model", "small_cnn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == \
        {"name": "small_cnn", "width": 8, "in_channels": 1}


def test_map_width_gives_the_demo_backbones_mapping(capsys):
    """``--width 16`` maps the CPU demo's backbone: its XBM bits per task are the demo's."""
    assert main(["map", "--model", "resnet18_cifar", "--width", "16", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    first = d["layers"][0]
    assert (first["rows"], first["cols"]) == (9, 16)  # 3x3 conv on 1 channel, 16 filters
    assert d["xbm_mask_bits"] == 11_120  # the CPU demo's 33,360 bits over 3 tasks, per task
    assert main(["map", "--model", "resnet18_cifar", "--width", "0"]) == 2
    assert "width must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["map", "--model", "nope"], "unknown model 'nope'"),
    (["map", "--model", "resnet50", "--rows", "0"], "rows"),
    (["map", "--model", "resnet50", "--cell-bits", "9"], "cell_bits"),
    (["map", "--model", "resnet50", "--preset", "bogus"], "unknown crossbar preset"),
    (["demo", "--methods", "xbm,bogus"], "unknown method 'bogus'"),
    (["demo", "--benchmark", "bogus"], "unknown benchmark"),
    (["adapt", "--dataset", "nope-data", "--method", "xbm"], "unknown dataset"),
    # a path is an image folder, missing, not an unknown dataset name
    (["adapt", "--dataset", "./no/such-folder", "--method", "xbm"],
     "no/such-folder: image folder does not exist; check the path"),
    (["adapt", "--dataset", "mnist", "--method", "bogus"], "unknown method"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--set", "foo"],
     "--set takes FIELD=VALUE"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--set", "lr=fast"], "lr must be a number"),
    # repeated with two values: the last one won without a word
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--set", "lr=1e-3", "--set",
      "lr=1e-2"], "--set lr is given twice, as 0.001 and 0.01; keep one"),
    (["cost", "--model", "small_cnn", "--set-energy", "device.write_pulses_per_cell=5",
      "--set-energy", "device.write_pulses_per_cell=6"],
     "--set-energy device.write_pulses_per_cell is given twice, as 5 and 6; keep one"),
    (["cost", "--model", "small_cnn", "--fraction", "piggyback=0.1", "--fraction",
      "piggyback=0.2"], "--fraction piggyback is given twice, as 0.1 and 0.2; keep one"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--set", "per_task_bn=1", "--set",
      "per_task_bn=true"], "--set per_task_bn is given twice, as 1 and True; keep one"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--set", "energy_preset=nvm"],
     "has no field(s) energy_preset"),
    # a bad spec fails before the default backbone would be pretrained (minutes)
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--rows", "0"], "rows"),
    # CUDA graphs asked for where there is no GPU: refused before any pretraining
    (["demo", "--cuda-graph", "--device", "cpu"], "cuda_graph needs a CUDA device"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--cuda-graph", "--device", "cpu"],
     "cuda_graph needs a CUDA device"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))  # nothing cached: fail fast or hang
    rc = main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "demo" else [])])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("xbm: error:") and needle in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_augmentation_in_yaml_is_exit_2(tmp_path, capsys):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("pretrain_augment: blur\nwidth: 4\n")
    rc = main(["demo", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unknown augmentation 'blur'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,needle", [
    ("width: [4\n", "is not valid YAML at line 2, column 1"),
    ("- width\n- 4\n", "must hold a mapping of field: value"),
    (b"width: \xff\n", "is not UTF-8 text"),
])
def test_a_broken_config_file_is_one_line_before_any_work(text, needle, tmp_path, capsys):
    cfg = tmp_path / "demo.yaml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text)
    rc = main(["demo", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("xbm: error: config file") and needle in err, err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_demo_config_given_as_a_method_config_says_which_is_which(tmp_path, capsys):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("epochs: 1\nmethod_configs: {xma2: {pe_budget: 0.05}}\n")
    rc = main(["adapt", "--dataset", "mnist", "--method", "xma2", "--method-config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"--method-config {cfg} is an xbm demo config" in err
    assert "pass this file to xbm demo --config, or put its method_configs.xma2 fields" in err


@pytest.mark.parametrize("exc,rc,needle", [
    (OSError(28, "No space left on device", "/full/results.json"), 2,
     "xbm: error: /full/results.json: No space left on device; check the path and free space"),
    (KeyboardInterrupt(), 130, "xbm: interrupted"),
])
def test_a_failure_no_check_foresaw_is_one_line(exc, rc, needle, capsys, monkeypatch):
    """A full disk or Ctrl-C in the middle of a command: one line and the exit status a shell
    expects, not a traceback."""
    import xbm.cli

    def fail(args):
        raise exc

    monkeypatch.setattr(xbm.cli, "cmd_map", fail)  # the parser binds it when main builds it
    assert main(["map", "--model", "resnet18_cifar"]) == rc
    err = capsys.readouterr().err.strip()
    assert err == needle or err.startswith(needle), err
    assert len(err.splitlines()) == 1


def test_empty_image_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    out = tmp_path / "t.safetensors"
    rc = main(["adapt", "--dataset", f"folder:{tmp_path / 'imgs'}", "--method", "xbm",
               "--out", str(out)])
    assert rc == 2
    err = _one_line_error(capsys)
    assert f"{tmp_path / 'imgs'}: no class sub-folders; expected PATH/<class>/" in err
    assert not out.exists()


def test_corrupt_backbone_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bb.safetensors"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "t.safetensors"
    rc = main(["adapt", "--dataset", "animal-mnist", "--backbone", str(bad), "--method", "xbm",
               "--train-subset", "10", "--out", str(out)])
    assert rc == 2
    err = _one_line_error(capsys)
    assert f"{bad}: not a readable safetensors file" in err and "corrupt or truncated" in err
    assert not out.exists()


def test_truncated_bundle_is_one_line_for_every_command(tmp_path, tiny_mtm, capsys):
    """A bundle cut off in a copy: eval, simulate and cost name the file and the fix."""
    path = _bundle(tmp_path, tiny_mtm)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    for argv in (["eval", "--device", "cpu"], ["simulate", "--device", "cpu"], ["cost"]):
        assert main([*argv, "--bundle", str(trunc)]) == 2
        err = _one_line_error(capsys)
        assert str(trunc) in err and ("corrupt" in err or "truncated" in err), err


def test_methods_lists_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for m in list_methods():
        assert m in out


def _bundle(tmp_path, tiny_mtm, **meta_changes):
    """A real task bundle of the tiny model, with some metadata replaced (and its metadata
    hash made to match, so that the checks of each field are what answers)."""
    from xbm.io import load_safetensors, metadata_hash, save_safetensors

    tiny_mtm.add_task("t", 3, "xbm")
    path = tmp_path / "b.safetensors"
    tiny_mtm.save_bundle(path)
    tensors, meta = load_safetensors(path)
    meta = meta | meta_changes
    meta["meta_hash"] = metadata_hash(meta)
    save_safetensors(path, tensors, meta)
    return path


@pytest.mark.parametrize("changes,needle", [
    ({"spec": [64, 64]}, "crossbar spec is a list, not a mapping"),
    ({"spec": "64x64"}, "crossbar spec is a str, not a mapping"),
    ({"spec": {"rows": 0}}, "unreadable crossbar spec"),
    ({"head_name": ["fc"]}, "head_name is ['fc'], not a layer name"),
    ({"tasks": [{"name": "t", "method": "xbm", "config": {}, "num_classes": 3,
                 "extra": "abc"}]}, "extra is a str, not a mapping"),
    ({"tasks": [{"name": "t", "method": "xbm", "config": {}, "num_classes": 3,
                 "extra": {"classes": 5}}]}, "extra.classes is 5, not a list"),
    ({"tasks": [{"name": "t", "method": "xbm", "config": {}, "num_classes": 3,
                 "extra": {"image_size": "28"}}]}, "extra.image_size is '28', not a int"),
    ({"tasks": [{"name": "t", "method": "xbm", "config": {}, "num_classes": 2 ** 33}]},
     "records 8589934592 classes but its head fc.xbm_tasks.t.weight has shape (3, "),
    ({"tasks": {"t": 1}}, "task list is a dict"),
    ({"tasks": [{"name": "t"}]}, "task record 0 is unreadable"),
    ({"tasks": [{"name": "t", "method": "nope", "config": {}, "num_classes": 3}]},
     "learned by method 'nope', which is not registered in this process"),
    ({"tasks": [{"name": "t", "method": "xbm", "config": {"lr": -1}, "num_classes": 3}]},
     "lr must be > 0"),
    ({"format": "other/1"}, "not an xbm task bundle"),
    ({"tasks": [{"name": "t", "method": "xbm", "config": {}, "num_classes": 3}] * 2},
     "task record 1 repeats the task name 't'; the file is corrupt"),
])
@pytest.mark.parametrize("command", ["eval", "adapt"])
def test_corrupt_bundle_metadata_is_one_line_before_any_backbone(
        command, changes, needle, tmp_path, tiny_mtm, capsys, monkeypatch):
    """Checked before the default backbone is looked up: with an empty cache it would be
    pretrained first otherwise (minutes), and a broken spec used to end in a traceback."""
    import os
    from pathlib import Path

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    path = _bundle(tmp_path, tiny_mtm, **changes)
    argv = ["eval", "--bundle", str(path)] if command == "eval" else \
        ["adapt", "--dataset", "mnist", "--method", "xbm", "--bundle", str(path)]
    rc = main([*argv, "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("xbm: error:") and needle in err, err
    assert len(err.splitlines()) == 1
    assert not (Path(os.environ["XBM_CACHE"]) / "backbones").exists()


def test_eval_names_a_missing_task(tmp_path, tiny_mtm, capsys):
    path = _bundle(tmp_path, tiny_mtm)
    assert main(["eval", "--bundle", str(path), "--task", "u", "--device", "cpu"]) == 2
    assert "no task 'u'; it holds t" in capsys.readouterr().err


def test_unreadable_image_folder_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """chmod cannot make a folder unreadable to root (CI may be root), so listing it fails by
    patching; the error must be one line, not a PermissionError traceback."""
    from pathlib import Path

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    real = Path.iterdir

    def iterdir(self):
        if self == root / "a":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    rc = main(["adapt", "--dataset", f"folder:{root}", "--method", "xbm"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot read the folder (Permission denied)" in err, err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("yaml_text,needle", [
    ("method_configs: {xma2: {pe_budget: 2}}\n", "pe_budget"),
    ("method_configs: {xmb: {lr: 0.001}}\n", "method_configs: unknown method 'xmb'"),
    ("method_configs: {xbm: 0.001}\n", "method_configs.xbm must be a mapping"),
    ("method_configs: [xbm]\n", "method_configs must map method names"),
])
def test_bad_method_configs_fail_before_any_training(yaml_text, needle, tmp_path, capsys,
                                                     monkeypatch):
    """At the defaults xma2 trains last, ~8 minutes in: its config is checked first."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml_text)
    rc = main(["demo", "--config", str(cfg), "--methods", "xbm,xma2", "--out",
               str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_method_configs_of_a_method_not_run_are_named(tmp_path, capsys, monkeypatch):
    """A shared YAML under a narrower --methods: the fields left unused are said, not dropped
    silently (an invalid --device then stops the run before any work)."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("method_configs: {xma: {lr: 0.5}, xbm: {lr: 0.001}}\n")
    rc = main(["demo", "--config", str(cfg), "--methods", "xbm", "--out", str(tmp_path / "o"),
               "--no-progress", "--device", "nope"])
    err = capsys.readouterr().err
    assert rc == 2 and "invalid device 'nope'" in err, err
    assert "xbm: warning: method_configs for xma set but not used: the demo runs xbm; add it " \
        "to methods (--methods)" in err, err
    assert not (tmp_path / "o").exists()
    cfg.write_text("method_configs: {xbm: {lr: 0.001}}\n")  # every entry used: no warning
    assert main(["demo", "--config", str(cfg), "--methods", "xbm", "--out", str(tmp_path / "o"),
                 "--no-progress", "--device", "nope"]) == 2
    assert "warning" not in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("xbm: error:") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("yaml_text,needle", [
    ("epochs: two\n", "epochs must be an integer >= 1"),
    ("epochs: -1\n", "epochs must be an integer >= 1"),
    ("methods: 5\n", "methods must be a non-empty list"),
    ("methods: [xbm, xbm]\n", "lists xbm twice"),
    ("energy: nope\n", "unknown energy preset 'nope'"),
    ("train_subset: 0\n", "train_subset must be an integer >= 1"),
    ("precision: fp16\n", "unknown demo precision 'fp16'"),
    ("pretrain_seed: one\n", "pretrain_seed must be an integer"),
    ("seed: 99999999999999999999999\n", "demo seed must be an integer in [0, 4294967295]"),
    ("pretrain_mixup: .inf\n", "mixup must be a number in [0, 1000]"),
    ("device: [1]\n", "demo device must be a name (a string), got [1]"),
    ("data_root: 5\n", "demo data_root must be a name (a string), got 5"),
    ("preset: [a]\n", "demo preset must be a name (a string)"),
    # a YAML key read as a number or a bool crashed the field listing with a TypeError
    ("1: 2\n", "field names must be text, got 1"),
    ("true: x\n", "field names must be text, got True"),
    ("on: x\n", "demo config has no field(s) on; valid: "),  # YAML 1.2: `on` is text
    ("method_configs: {xbm: {threshold: null}}\n", "XBMConfig.threshold must be a number, got "
     "None (null); leave it out for the default"),
])
def test_bad_demo_config_values_fail_at_once(yaml_text, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml_text)
    rc = main(["demo", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"])
    err = _one_line_error(capsys)
    assert rc == 2 and needle in err
    assert err.endswith(f"(in --config {cfg})"), err  # the value came from the file: said
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_a_bad_demo_flag_is_not_blamed_on_the_config_file(tmp_path, capsys, monkeypatch):
    """--epochs 0 beside a file that sets pretrain_epochs was said to be "(in --config ...)":
    the file's pretrain_epochs matched the word "epochs" of "demo epochs"."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("pretrain_epochs: 1\nepochs: 1\n")
    assert main(["demo", "--config", str(cfg), "--epochs", "0", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "demo epochs must be an integer >= 1, got 0" in err and "--config" not in err, err


@pytest.mark.parametrize("argv,needle", [
    (["pretrain", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["pretrain", "--lr", "-1"], "lr must be a number in (0, 1000]"),
    (["pretrain", "--train-subset", "0"], "--train-subset must be >= 1, got 0"),
    (["pretrain", "--image-size", "4"], "--image-size must be an integer in [8, 1024], got 4"),
    (["pretrain", "--out", "{tmp}"], "is a folder"),
    (["demo", "--out", "{tmp}/file"], "is an existing file"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--out", "{tmp}"], "is a folder"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--out", "{tmp}/file"],
     "already exists; pass --bundle"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--device", "mps"], "not supported"),
    (["adapt", "--dataset", "folder:", "--method", "xbm"], "folder: needs a path"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--epochs", "0"],
     "--epochs must be >= 1"),
    (["adapt", "--dataset", "mnist", "--method", "xbm", "--method-config", "{tmp}/binary"],
     "is not UTF-8 text"),
    (["demo", "--config", "{tmp}", "--out", "{tmp}/o"], "is a folder"),
    (["cost", "--model", "small_cnn", "--plot", "{tmp}/file"], "is an existing file"),
    (["adapt", "--dataset", "mnist", "--out", "{tmp}/plain.bin"],
     "--out {tmp}/plain.bin: a task bundle is saved as safetensors; name it *.safetensors"),
    (["adapt", "--dataset", "mnist", "--bundle", "{tmp}/new.bin"], "--bundle {tmp}/new.bin: a"),
    # the suggested path is one the command takes, and the flag named is the one given
    (["pretrain", "--out", "{tmp}"], "pass a file path such as {tmp}/out.safetensors"),
    (["adapt", "--dataset", "mnist", "--bundle", "{tmp}/file/b.safetensors"],
     "--bundle {tmp}/file/b.safetensors: {tmp}/file is a file"),
])
def test_bad_outputs_and_values_fail_before_any_work(argv, needle, tmp_path, capsys,
                                                     monkeypatch):
    """Before pretraining, loading data or training: an unwritable output used to surface as a
    traceback at the very end, after all the work."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "file").write_text("not a bundle")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00bad")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--no-progress"] *
              (argv[0] != "cost"))
    assert rc == 2 and needle.replace("{tmp}", str(tmp_path)) in _one_line_error(capsys)
    assert not (tmp_path / "cache").exists()
    assert (tmp_path / "file").read_text() == "not a bundle"  # never overwritten


def test_set_values_parse_as_json_then_yaml():
    from xbm.cli import _parse_value

    assert [_parse_value(v) for v in ("1e-3", ".001", "False", "neurosim", "[0, 0.5]", "")] == \
        [1e-3, 1e-3, False, "neurosim", [0, 0.5], ""]


def test_bundle_is_checked_against_its_content_hash_and_its_spec(tmp_path, tiny_mtm, capsys,
                                                                 monkeypatch):
    from xbm.io import load_safetensors, save_safetensors

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    path = _bundle(tmp_path, tiny_mtm)
    # a spec flag that contradicts the bundle is refused, not silently ignored
    assert main(["adapt", "--dataset", "mnist", "--method", "xbm", "--bundle", str(path),
                 "--rows", "32", "--device", "cpu"]) == 2
    assert "--rows 32 contradicts the bundle" in _one_line_error(capsys)
    # a --preset is compared with the bundle's spec, not by its name: the default preset's
    # 64x64 contradicts this 16x16 bundle (it passed, being named "default"), and the same
    # geometry with the flags that made it agrees (its command line again, with --bundle)
    assert main(["adapt", "--dataset", "mnist", "--method", "xbm", "--bundle", str(path),
                 "--preset", "default", "--device", "cpu"]) == 2
    assert "--preset default contradicts the bundle" in (err := _one_line_error(capsys)) and \
        "rows=16, cols=16" in err
    assert main(["adapt", "--dataset", "mnist", "--method", "xbm", "--bundle", str(path),
                 "--preset", "default", "--rows", "16", "--cols", "16", "--device",
                 "cpu"]) == 2
    err = _one_line_error(capsys)
    assert "contradicts" not in err and "no cached backbone" in err  # past the spec check
    # no cached backbone with the bundle's hash: an error at once, not a pretraining
    assert main(["eval", "--bundle", str(path), "--device", "cpu"]) == 2
    assert "no cached backbone matches its backbone hash" in _one_line_error(capsys)
    assert not (tmp_path / "cache").exists()
    # flipped bytes in a score
    tensors, meta = load_safetensors(path)
    key = next(k for k in tensors if k.endswith(".score"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1
    save_safetensors(path, tensors, meta)
    assert main(["eval", "--bundle", str(path), "--device", "cpu"]) == 2
    assert "content hash mismatch" in _one_line_error(capsys)


def test_image_folder_needs_two_classes_and_a_test_split(tmp_path):
    import numpy as np
    from PIL import Image

    from xbm.data.folder import load_image_folder
    from xbm.errors import XbmError

    def img(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(p)

    img(tmp_path / "one" / "a" / "0.png")
    with pytest.raises(XbmError, match="only one class folder"):
        load_image_folder(tmp_path / "one")
    for c in "ab":
        img(tmp_path / "tiny" / c / "0.png")
    with pytest.raises(XbmError, match="leave no test images"):
        load_image_folder(tmp_path / "tiny")
    # a train/ of class folders next to a class folder: a half-made split, said as such
    for c in ("circle", "train/circle", "train/square"):
        for i in range(5):
            img(tmp_path / "half" / c / f"{i}.png")
    with pytest.raises(XbmError, match=r"train/ holds class folders, as in a train/test split, "
                                       r"next to class folders \(circle/\)"):
        load_image_folder(tmp_path / "half")
    # ...while a class that happens to be called "train" (its images directly in it) is a class
    for c in ("circle", "train"):
        for i in range(5):
            img(tmp_path / "trains" / c / f"{i}.png")
    assert load_image_folder(tmp_path / "trains").classes == ["circle", "train"]


@needs_data
def test_eval_finds_the_bundles_backbone_by_hash(tmp_path, capsys, monkeypatch):
    """No --backbone, no --width: the cached backbone with the bundle's content hash is used,
    whatever its width, and the accuracy printed is the task's."""
    from xbm.hardware import CrossbarSpec
    from xbm.io import save_safetensors, tensors_hash
    from xbm.models import create_model
    from xbm.multitask import MultiTaskModel, read_bundle_meta

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    arch = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "width": 4}
    backbone = create_model("small_cnn", num_classes=3, in_channels=1, width=4)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    (tmp_path / "cache" / "backbones").mkdir(parents=True)
    save_safetensors(tmp_path / "cache" / "backbones" / "any-name.safetensors", state,
                     {"format": "xbm-backbone/1", "arch": arch, "dataset": "x", "accuracy": 0.0,
                      "content_hash": tensors_hash(state)})
    mtm = MultiTaskModel(backbone, CrossbarSpec(rows=16, cols=16), arch=arch)
    mtm.add_task("t", 10, "xbm", dataset="animal-mnist")
    path = tmp_path / "b.safetensors"
    mtm.save_bundle(path)
    assert main(["eval", "--bundle", str(path), "--test-subset", "40", "--json",
                 "--device", "cpu", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    (rec,) = res["tasks"]
    assert rec["task"] == "t" and rec["dataset"] == "animal-mnist"
    from xbm.data import load_dataset
    from xbm.train import evaluate_task

    _, test = load_dataset("animal-mnist").subset(None, 40, seed=0).loaders(256, seed=0)
    assert rec["accuracy"] == pytest.approx(evaluate_task(mtm, "t", test, "cpu"))  # its own
    assert res["bundle"] == str(path) and res["test_subset"] == 40 and res["seed"] is None
    assert res["tasks"][0]["seed"] == 0  # saved from Python: no seed recorded, so 0
    assert res["backbone_hash"] == read_bundle_meta(path)[0]["backbone_hash"]
    # a row per task as it finishes: on stdout, or on stderr beside --json (stdout: JSON alone)
    assert main(["eval", "--bundle", str(path), "--test-subset", "40", "--json",
                 "--device", "cpu"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["tasks"] == res["tasks"]
    err_lines = got.err.splitlines()
    assert err_lines[0] == "evaluating 1 task(s):"
    assert err_lines[1].split()[:2] == ["task", "method"]
    assert err_lines[2].startswith("t     xbm ")  # the header over the rows, aligned
    assert main(["eval", "--bundle", str(path), "--test-subset", "40", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "method", "dataset", "accuracy", "test", "images"]
    assert lines[1].split()[:3] == ["t", "xbm", "animal-mnist"] and lines[1].endswith("40")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["map", "--model", "resnet50", "--rows", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("xbm: error: argument --rows: invalid int value: 'x'; see `xbm map --help`")
    # an unknown flag points at the sub-command's help, which lists what it takes
    with pytest.raises(SystemExit) as exc:
        main(["map", "--model", "resnet50", "--bogus", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "xbm: error: unrecognized arguments: --bogus 1; see `xbm map --help`"


def test_bundle_records_an_image_folder_by_absolute_path(tmp_path, capsys, monkeypatch):
    """``adapt --dataset imgs`` (relative) then ``eval`` from another directory: the bundle holds
    the folder's absolute path, so eval reads the same images."""
    import numpy as np
    from PIL import Image

    from xbm.io import save_safetensors, tensors_hash
    from xbm.models import create_model
    from xbm.multitask import read_bundle_meta

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(6):
            p = tmp_path / "work" / "imgs" / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(p)
    torch.manual_seed(0)
    arch = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "width": 4}
    state = create_model("small_cnn", num_classes=3, in_channels=1, width=4).state_dict()
    bb = tmp_path / "bb.safetensors"
    save_safetensors(bb, state, {"format": "xbm-backbone/1", "arch": arch, "dataset": "x",
                                 "accuracy": 0.0, "content_hash": tensors_hash(state)})
    monkeypatch.chdir(tmp_path / "work")
    assert main(["adapt", "--dataset", "imgs", "--method", "xbm", "--backbone", str(bb),
                 "--rows", "16", "--cols", "16", "--batch-size", "4", "--out", "b.safetensors",
                 "--device", "cpu", "--no-progress", "--json", "--precision", "bf16",
                 "--test-subset", "500"]) == 0
    out, err = capsys.readouterr()
    rec = json.loads(out)
    assert rec["precision"] == "bf16"  # as asked, not auto's
    # what the accuracy rests on: 12 images split 80/20 per class (the note on stderr: --json)
    assert (rec["train_images"], rec["test_images"], rec["classes"]) == (10, 2, 2)
    assert (rec["train_steps"], rec["batch_size"]) == (3, 4)  # ceil(10 / 4) steps, one epoch
    from xbm.multitask import MultiTaskModel
    from xbm.train.pretrain import load_backbone

    again = MultiTaskModel(load_backbone(bb)[0], read_bundle_meta("b.safetensors")[1])
    again.load_bundle("b.safetensors")
    assert rec["masked_off_columns"] == again.masked_off_columns("imgs")
    assert "imgs: 10 training and 2 test images, 2 classes (--test-subset 500 is more than " \
        "the 2 there: all used)" in err
    assert rec["task"] == "imgs" and rec["new_bundle"] is True  # named after the folder
    assert rec["processes"] == 1  # one process: a step is batch_size images
    # a symlinked folder is named as the user named it, not after its target
    (tmp_path / "work" / "birds").symlink_to(tmp_path / "work" / "imgs")
    assert main(["adapt", "--dataset", "folder:birds", "--backbone", str(bb), "--rows", "16",
                 "--cols", "16", "--batch-size", "4", "--out", "b2.safetensors",
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "birds"
    # accents are folded into the ASCII that task names allow, not dropped
    (tmp_path / "work" / "Ümlaut").symlink_to(tmp_path / "work" / "imgs")
    assert main(["adapt", "--dataset", "folder:Ümlaut", "--backbone", str(bb), "--rows", "16",
                 "--cols", "16", "--batch-size", "4", "--out", "b3.safetensors",
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "Umlaut"
    # a folder named -birds/ is not a task `--task -birds` could name again
    (tmp_path / "work" / "-birds").symlink_to(tmp_path / "work" / "imgs")
    assert main(["adapt", "--dataset", "folder:-birds", "--backbone", str(bb), "--rows", "16",
                 "--cols", "16", "--batch-size", "4", "--out", "b5.safetensors",
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "birds"
    for bad, needle in (("", "--task is empty; give it a value or leave it out"),
                        ("a b", "--task 'a b' is invalid: use 1-64 letters"),
                        ("-x", "--task '-x' is invalid: use 1-64 letters, digits, '-' or '_', "
                         "not starting with '-' (a command line would read it as a flag)")):
        # an empty --task was the folder's name, silently
        assert main(["adapt", "--dataset", "imgs", f"--task={bad}", "--backbone", str(bb),
                     "--out", "b4.safetensors", "--device", "cpu", "--no-progress"]) == 2
        assert needle in _one_line_error(capsys)
    assert not Path("b4.safetensors").exists()
    # a bundle written under another suffix before the *.safetensors rule is still extended
    import shutil

    shutil.copy("b2.safetensors", "old.bin")
    assert main(["adapt", "--dataset", "imgs", "--task", "again", "--backbone", str(bb),
                 "--rows", "16", "--cols", "16", "--batch-size", "4", "--bundle", "old.bin",
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["bundle"], rec["new_bundle"]) == ("old.bin", False)
    # the same task name again: named, with the flag that adds it under another name
    before = Path("old.bin").read_bytes()
    assert main(["adapt", "--dataset", "imgs", "--task", "again", "--backbone", str(bb),
                 "--rows", "16", "--cols", "16", "--bundle", "old.bin", "--device", "cpu",
                 "--no-progress"]) == 2
    assert "already holds a task 'again'; pass --task NAME" in _one_line_error(capsys)
    # a given name is checked before the data loads (a missing folder is not reached)
    assert main(["adapt", "--dataset", "folder:gone", "--task", "again", "--backbone",
                 str(bb), "--bundle", "old.bin", "--device", "cpu", "--no-progress"]) == 2
    assert "already holds a task 'again'" in _one_line_error(capsys)
    # so is a name derived from the folder (b.safetensors holds "imgs"): the error came
    # after the images were read and counted
    assert main(["adapt", "--dataset", "imgs", "--backbone", str(bb), "--bundle",
                 "b.safetensors", "--device", "cpu", "--no-progress"]) == 2
    got = capsys.readouterr()
    assert got.out == "" and "already holds a task 'imgs'" in got.err
    # a --backbone other than the bundle's: the CLI's fix, not the Python API's wording
    torch.manual_seed(1)
    other = create_model("small_cnn", num_classes=3, in_channels=1, width=4).state_dict()
    bb2 = tmp_path / "bb2.safetensors"
    save_safetensors(bb2, other, {"format": "xbm-backbone/1", "arch": arch, "dataset": "x",
                                  "accuracy": 0.0, "content_hash": tensors_hash(other)})
    assert main(["adapt", "--dataset", "imgs", "--task", "third", "--backbone", str(bb2),
                 "--rows", "16", "--cols", "16", "--bundle", "old.bin", "--device", "cpu",
                 "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "old.bin was learned on the backbone with hash" in err and "drop --backbone" in err
    assert Path("old.bin").read_bytes() == before
    bundle = tmp_path / "work" / "b.safetensors"
    (record,) = read_bundle_meta(bundle)[2]
    assert record.dataset == f"folder:{(tmp_path / 'work' / 'imgs').resolve()}"
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--json",
                 "--device", "cpu", "--no-progress"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)["tasks"]
    assert rec["dataset"] == record.dataset and 0 <= rec["accuracy"] <= 100


def test_default_backbone_pretrains_from_the_given_data_root(monkeypatch, tmp_path):
    """``adapt``/``simulate`` without ``--backbone`` may pretrain the default backbone: it must
    read the base task from ``--data-root`` like everything else."""
    import argparse

    import xbm.train.pretrain as pt
    from xbm.cli import _backbone

    seen = {}

    def fake_get_backbone(cfg, device, root=None, **kw):
        seen["root"] = root
        return None, {}, None

    monkeypatch.setattr(pt, "get_backbone", fake_get_backbone)
    args = argparse.Namespace(backbone=None, model="resnet18_cifar", width=4,
                              data_root=str(tmp_path), no_progress=True)
    _backbone(args, torch.device("cpu"))
    assert seen["root"] == str(tmp_path)


def test_adapt_on_the_default_backbone_of_an_imagenet_layout_feeds_its_recipes_side(
        monkeypatch, tmp_path, capsys):
    """Without --backbone the default backbone of --model is pretrained at the default recipe's
    side (28): an ImageNet-layout model must not be fed at its family's 224 then, 64 times the
    work of what it was pretrained at."""
    import xbm.train.pretrain as pt
    from xbm.io import tensors_hash
    from xbm.models import create_model

    arch = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "width": 2}

    def fake_get_backbone(cfg, device, root=None, **kw):
        model = create_model("resnet18", num_classes=10, in_channels=1, width=2)
        return model, {"arch": arch, "config": {"image_size": cfg.image_size},
                       "dataset": "fashion-mnist", "accuracy": 0.0,
                       "content_hash": tensors_hash(model.state_dict())}, None

    monkeypatch.setattr(pt, "get_backbone", fake_get_backbone)
    imgs = _folder(tmp_path / "imgs", size=40)
    assert main(["adapt", "--dataset", str(imgs), "--model", "resnet18", "--width", "2",
                 "--method", "linear-probe", "--out", str(tmp_path / "b.safetensors"),
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 28


@pytest.mark.parametrize("as_json", [True, False])
def test_backbone_notes_keep_json_stdout_clean(monkeypatch, capsys, as_json):
    """``adapt --json`` without --backbone printed "loaded cached backbone ..." before its
    JSON, so the output did not parse: with --json the note goes to stderr."""
    import argparse

    import xbm.train.pretrain as pt
    from xbm.cli import _backbone

    def fake_get_backbone(cfg, device, root=None, progress=True, log=print):
        log("loaded cached backbone somewhere")
        return None, {}, None

    monkeypatch.setattr(pt, "get_backbone", fake_get_backbone)
    args = argparse.Namespace(backbone=None, model=None, width=4, data_root=None,
                              no_progress=True, json=as_json)
    _backbone(args, torch.device("cpu"))
    out, err = capsys.readouterr()
    assert ("loaded cached backbone" in err) is as_json
    assert ("loaded cached backbone" in out) is not as_json


def _folder(root, classes=("cat", "dog"), n=6, size=12):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(n):
            p = root / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(p)
    return root


def _tiny_backbone_file(path):
    from xbm.io import save_safetensors, tensors_hash
    from xbm.models import create_model

    torch.manual_seed(0)
    arch = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "width": 4}
    backbone = create_model("small_cnn", num_classes=3, in_channels=1, width=4)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    save_safetensors(path, state, {"format": "xbm-backbone/1", "arch": arch, "dataset": "x",
                                   "accuracy": 0.0, "content_hash": tensors_hash(state)})
    return backbone, arch


def test_a_task_trained_from_python_is_evaluated_at_the_side_it_learned(tmp_path, capsys):
    """A bundle saved from Python recorded no image side, so `xbm eval` fed its task 28x28
    images, whatever side it had learned at, and gave another accuracy without a word:
    train_task now records the side of the images it trains on."""
    from xbm.data import load_dataset
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel
    from xbm.train import evaluate_task, train_task

    imgs = _folder(tmp_path / "imgs", n=8, size=40)
    bb = tmp_path / "bb.safetensors"
    backbone, arch = _tiny_backbone_file(bb)
    mtm = MultiTaskModel(backbone, CrossbarSpec(rows=16, cols=16), arch=arch)
    mtm.add_task("t", 2, "xma", dataset=f"folder:{imgs}")
    train, test = load_dataset(f"folder:{imgs}", image_size=36).loaders(4, seed=0, size=36)
    train_task(mtm, "t", train, 2, torch.device("cpu"), progress=False)
    assert mtm.tasks["t"].extra["image_size"] == 36
    acc = evaluate_task(mtm, "t", test, torch.device("cpu"))
    mtm.save_bundle(tmp_path / "b.safetensors")
    capsys.readouterr()
    assert main(["eval", "--bundle", str(tmp_path / "b.safetensors"), "--backbone", str(bb),
                 "--json", "--no-progress", "--device", "cpu"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["tasks"]
    assert row["image_size"] == 36
    assert row["accuracy"] == round(acc, 4)


def test_a_bundle_from_python_records_the_backbone_it_was_loaded_from(tmp_path, capsys,
                                                                      monkeypatch):
    """MultiTaskModel on xbm.load_backbone's model records the file's architecture, recipe and
    path without arch= (a bundle made so named none, and `xbm eval` could not find its
    backbone); a bundle on a model of the user's own says what the command line needs."""
    import xbm
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))  # no cached backbone matches
    imgs = _folder(tmp_path / "imgs", n=6)
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    model, meta = xbm.load_backbone(bb)
    mtm = MultiTaskModel(model, CrossbarSpec(rows=16, cols=16))
    assert mtm.arch == meta["arch"] and mtm.backbone_file == str(bb.resolve())
    mtm.add_task("t", 2, "xbm", dataset=f"folder:{imgs}")
    mtm.save_bundle(tmp_path / "b.safetensors")
    assert main(["eval", "--bundle", str(tmp_path / "b.safetensors"), "--no-progress",
                 "--device", "cpu"]) == 0  # its backbone found at the recorded file
    capsys.readouterr()
    # the backbone moved: a model loaded from the new place keeps it when it takes in the
    # bundle's tasks (the bundle's old path is gone), and saves it
    import shutil

    (tmp_path / "moved").mkdir()
    shutil.move(bb, tmp_path / "moved" / "bb.safetensors")
    again = MultiTaskModel(xbm.load_backbone(tmp_path / "moved" / "bb.safetensors")[0],
                           CrossbarSpec(rows=16, cols=16))
    again.load_bundle(tmp_path / "b.safetensors")
    again.save_bundle(tmp_path / "b.safetensors")
    assert main(["eval", "--bundle", str(tmp_path / "b.safetensors"), "--no-progress",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    bb = tmp_path / "moved" / "bb.safetensors"
    # weights changed after loading: the file is not this backbone's, so it is not recorded
    # (eval said "the file it was learned from ... now holds another backbone"); a head of
    # another class count makes the file's architecture stale too
    from xbm.multitask import read_bundle_meta

    for edit in ("weights", "head"):
        model, _ = xbm.load_backbone(bb)
        with torch.no_grad():
            if edit == "weights":
                next(model.parameters()).add_(0.01)
            else:
                model.fc = torch.nn.Linear(model.fc.in_features, 5)
        edited = MultiTaskModel(model, CrossbarSpec(rows=16, cols=16))
        edited.add_task("t", 2, "xbm")
        edited.save_bundle(tmp_path / f"{edit}.safetensors")
        meta = read_bundle_meta(tmp_path / f"{edit}.safetensors")[0]
        assert "backbone_file" not in meta and "backbone_recipe" not in meta
        assert meta["arch"] == ({} if edit == "head" else mtm.arch)
    own = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    mine = MultiTaskModel(own, CrossbarSpec(rows=16, cols=16), head_name="4")
    mine.add_task("t", 2, "xbm", dataset=f"folder:{imgs}")
    mine.save_bundle(tmp_path / "own.safetensors")
    assert main(["eval", "--bundle", str(tmp_path / "own.safetensors"), "--device",
                 "cpu"]) == 2
    err = _one_line_error(capsys)
    assert "the bundle records no architecture (a model of your own" in err
    assert "--plugin MODULE --backbone FILE" in err and "docs/extending.md" in err


def test_adapting_into_a_bundle_keeps_the_backbone_file_it_records(tmp_path, capsys,
                                                                    monkeypatch):
    """A bundle's recorded backbone file survives a later adapt into it that finds the
    backbone in the cache (the cache's path, from load_backbone, replaced it, and eval then
    failed once the cache was cleared), and a cache entry is never recorded as the file."""
    import shutil

    from xbm.multitask import read_bundle_meta

    cache = tmp_path / "cache"
    monkeypatch.setenv("XBM_CACHE", str(cache))
    imgs = _folder(tmp_path / "imgs", n=6)
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    common = ["--dataset", str(imgs), "--method", "xbm", "--rows", "16", "--cols", "16",
              "--device", "cpu", "--no-progress"]
    assert main(["adapt", *common, "--backbone", str(bb), "--out", str(bundle),
                 "--task", "t1"]) == 0
    (cache / "backbones").mkdir(parents=True)
    shutil.copy(bb, cache / "backbones" / "copy.safetensors")
    assert main(["adapt", *common, "--bundle", str(bundle), "--task", "t2"]) == 0
    assert read_bundle_meta(bundle)[0]["backbone_file"] == str(bb.resolve())
    (cache / "backbones" / "copy.safetensors").unlink()
    capsys.readouterr()
    assert main(["eval", "--bundle", str(bundle), "--device", "cpu", "--no-progress"]) == 0


def _folder_task_bundle(tmp_path, num_classes: int, dataset: str):
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel

    bb = tmp_path / "bb.safetensors"
    backbone, arch = _tiny_backbone_file(bb)
    mtm = MultiTaskModel(backbone, CrossbarSpec(rows=16, cols=16), arch=arch)
    mtm.add_task("t", num_classes, "xbm", dataset=dataset)
    path = tmp_path / "b.safetensors"
    mtm.save_bundle(path)
    return path, bb


def test_eval_says_when_a_folders_test_images_changed_since_adapt(tmp_path, capsys,
                                                                   monkeypatch):
    """Images added to a folder between adapt and eval moved its 80/20 split: eval scored the
    task on other images, some of them training images, without a word."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    imgs = _folder(tmp_path / "pets", n=10)
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    run = ["--device", "cpu", "--no-progress"]
    assert main(["adapt", "--dataset", f"folder:{imgs}", "--method", "xbm", "--backbone",
                 str(bb), "--out", str(bundle), "--batch-size", "4", "--rows", "16", "--cols",
                 "16", "--test-subset", "2", *run]) == 0
    from xbm.multitask import read_bundle_meta

    (t,) = read_bundle_meta(bundle)[2]
    assert len(t.extra["test_fingerprint"]) == 16  # of the whole test split, not the subset
    capsys.readouterr()
    ev = ["eval", "--bundle", str(bundle), "--backbone", str(bb), *run]
    assert main(ev) == 0
    assert "warning" not in capsys.readouterr().err
    rng = np.random.default_rng(1)
    for i in range(10, 14):  # new images: some land in the test split
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(
            imgs / "cat" / f"{i}.png")
    assert main(ev) == 0
    assert "xbm: warning: task 'pets': the test images of folder:" in (err := capsys.
                                                                       readouterr().err) and \
        "are not those it was adapted with: files were added, removed or changed since " \
        "(split 80/20 by file name, so some may be images it trained on)" in err
    with warnings.catch_warnings():  # the same warning again, from the same line
        warnings.simplefilter("always")
        assert main([*ev, "--dataset", f"folder:{imgs}"]) == 0  # the same folder, named
    assert "not those it was adapted with" in capsys.readouterr().err
    other = _folder(tmp_path / "other", n=10)
    assert main([*ev, "--dataset", f"folder:{other}"]) == 0  # another one: it is not the same
    assert "not those it was adapted with" not in capsys.readouterr().err
    # a folder with its own train/ and test/: the change is said, but no test image can be a
    # training image, so the 80/20 clause is left out
    own = tmp_path / "own"
    _folder(own / "train", n=6), _folder(own / "test", n=3)
    split_bundle = tmp_path / "s.safetensors"
    assert main(["adapt", "--dataset", f"folder:{own}", "--method", "xbm", "--backbone",
                 str(bb), "--out", str(split_bundle), "--batch-size", "4", "--rows", "16",
                 "--cols", "16", *run]) == 0
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(
        own / "test" / "cat" / "new.png")
    capsys.readouterr()
    assert main(["eval", "--bundle", str(split_bundle), "--backbone", str(bb), *run]) == 0
    err = capsys.readouterr().err
    assert "are not those it was adapted with: files were added, removed or changed since; " \
        "its accuracy is on other images" in err and "80/20" not in err


def test_eval_reads_the_data_root_adapt_trained_from(tmp_path, capsys):
    """A task adapted with --data-root was evaluated on the installed dataset (or asked for
    an install it never used) when eval had no --data-root: it now reads the recorded root,
    and a root that has moved is named with the flag."""
    import numpy as np

    from xbm.data import write_idx

    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 7)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", "fashion-mnist", "--data-root", str(root), "--method",
                 "xbm", "--backbone", str(bb), "--epochs", "1", "--batch-size", "8", "--out",
                 str(bundle), "--device", "cpu", "--no-progress", "--rows", "16", "--cols",
                 "16"]) == 0
    capsys.readouterr()
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--json",
                 "--device", "cpu", "--no-progress"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)["tasks"]
    assert rec["test_images"] == 7  # the root's test set, not the installed 10,000
    root.rename(tmp_path / "moved")
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--device", "cpu",
                 "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert f"{root} is gone; task 'fashion-mnist' was adapted with --data-root {root}: pass " \
        "--data-root where its files are now, or --dataset fashion-mnist for the installed " \
        "copy" in err, err
    # --dataset, even the task's own, reads the installed copy, and says so
    rc = main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--json", "--device",
               "cpu", "--no-progress", "--dataset", "fashion-mnist", "--test-subset", "20"])
    out, err = capsys.readouterr()
    assert f"reads the installed copy, not the --data-root {root} the task was adapted " \
        "from" in err
    if rc == 0:
        assert json.loads(out)["tasks"][0]["test_images"] == 20  # of the installed 10,000
    else:
        assert "dataset-fashion-mnist" in err  # not installed: the install command is named
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--json", "--device",
                 "cpu", "--no-progress", "--data-root", str(tmp_path / "moved")]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["test_images"] == 7


def test_a_root_digits_never_read_is_not_recorded(tmp_path, capsys):
    """digits ships in scikit-learn and ignores --data-root; adapt recorded the root all the
    same, and eval then refused the task once that folder was gone."""
    root = tmp_path / "root"
    root.mkdir()
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", "digits", "--data-root", str(root), "--method", "xbm",
                 "--backbone", str(bb), "--epochs", "1", "--batch-size", "64", "--train-subset",
                 "128", "--out", str(bundle), "--device", "cpu", "--no-progress", "--rows", "16",
                 "--cols", "16"]) == 0
    root.rmdir()
    capsys.readouterr()
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--json", "--device",
                 "cpu", "--no-progress", "--test-subset", "40"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)["tasks"]
    assert rec["task"] == "digits" and rec["test_images"] == 40
    # a bundle written before this fix records the root: eval ignores a root digits never reads
    from xbm.multitask import MultiTaskModel, read_bundle_meta
    from xbm.train.pretrain import load_backbone

    model, bmeta = load_backbone(str(bb))
    mtm = MultiTaskModel(model, read_bundle_meta(bundle)[1], arch=bmeta["arch"])
    mtm.load_bundle(bundle)
    mtm.tasks["digits"].extra["data_root"] = str(tmp_path / "gone")
    old = tmp_path / "old.safetensors"
    mtm.save_bundle(old)
    assert main(["eval", "--bundle", str(old), "--backbone", str(bb), "--json", "--device",
                 "cpu", "--no-progress", "--test-subset", "40"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["test_images"] == 40



def test_eval_refuses_a_dataset_whose_classes_differ_from_the_tasks(tmp_path, capsys):
    """A 10-class task read on a 2-class folder used to print a plausible accuracy, exit 0."""
    imgs = _folder(tmp_path / "imgs")
    path, bb = _folder_task_bundle(tmp_path, 10, f"folder:{imgs}")
    for command in ("eval", "simulate"):
        argv = [command, "--bundle", str(path), "--backbone", str(bb), "--device", "cpu",
                "--no-progress"]
        if command == "simulate":
            argv += ["--adc-bits", "8", "--backend", "torch"]
        assert main(argv) == 2
        err = _one_line_error(capsys)
        assert "task 't' has 10 classes but dataset folder:" in err and "has 2" in err, err


def test_simulate_chip_seed_varies_the_chip_on_one_test_set(tmp_path, capsys):
    """``--seed`` draws the test subset (and, by default, the chip); ``--chip-seed`` the chip
    alone, so the spread between chips is measured on the same images."""
    imgs = _folder(tmp_path / "imgs", n=12)
    path, bb = _folder_task_bundle(tmp_path, 2, f"folder:{imgs}")
    base = ["simulate", "--bundle", str(path), "--backbone", str(bb), "--device", "cpu",
            "--no-progress", "--adc-bits", "8", "--backend", "torch", "--variation", "0.3",
            "--test-subset", "6", "--json"]
    runs = {}
    for extra in ([], ["--chip-seed", "0"], ["--chip-seed", "5"]):
        assert main([*base, "--seed", "1", *extra]) == 0
        runs[tuple(extra)] = json.loads(capsys.readouterr().out)
    assert runs[()]["seed"] == 1 and runs[()]["chip_seed"] == 1  # the default: --seed
    assert runs[("--chip-seed", "0")]["chip_seed"] == 0
    assert runs[("--chip-seed", "5")]["chip_seed"] == 5
    assert runs[()]["input_headroom"] == 1.0 and runs[()]["adc_mode"] == "calibrate"
    import argparse

    from xbm.hardware.simulate_cli import _sim_config

    args = argparse.Namespace(adc_mode="calibrate", adc_granularity="tile", read_noise=0.0,
                              levels=None, seed=1, chip_seed=5, backend="torch",
                              sim_input_bits=None, sim_dac_bits=None, sim_cell_bits=None)
    assert _sim_config(args, 8, 0.3).seed == 5  # the chip's draws follow --chip-seed
    args.chip_seed = None
    assert _sim_config(args, 8, 0.3).seed == 1
    assert runs[()]["adc_offset_trim"] is False and runs[()]["bn_recalibration"] is False
    args.adc_offset_trim = args.bn_recalibration = True  # --adc-offset-trim --bn-recalibration
    cfg = _sim_config(args, 8, 0.3)
    assert cfg.adc_offset_trim is True and cfg.bn_recalibration is True


def test_eval_of_a_moved_image_folder_names_the_flag(tmp_path, capsys):
    path, bb = _folder_task_bundle(tmp_path, 2, f"folder:{tmp_path / 'gone'}")
    assert main(["eval", "--bundle", str(path), "--backbone", str(bb), "--device", "cpu"]) == 2
    got = capsys.readouterr()
    assert got.out == ""  # no table header above an error, with no rows under it
    err = got.err.strip()
    assert err.startswith("xbm: error:") and len(err.splitlines()) == 1, err
    assert "image folder does not exist" in err and "pass --task t --dataset folder:PATH" in err
    imgs = _folder(tmp_path / "imgs")  # pointing at where the images are now works
    assert main(["eval", "--bundle", str(path), "--backbone", str(bb), "--device", "cpu",
                 "--dataset", f"folder:{imgs}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["task", "method", "dataset", "accuracy", "test", "images"]
    assert out[1].startswith("t ") and out[1].split()[-1] == "2"  # 12 images, 20%: 2 to test
    # more test images asked for than there are: said, as adapt says it
    assert main(["eval", "--bundle", str(path), "--backbone", str(bb), "--device", "cpu",
                 "--dataset", f"folder:{imgs}", "--test-subset", "50"]) == 0
    assert "xbm: warning: task 't': --test-subset 50 is more than the 2 test images of " \
        "folder:" in capsys.readouterr().err
    # simulate's default of 1000 test images is no request for more: said only when asked
    sim = ["simulate", "--bundle", str(path), "--backbone", str(bb), "--device", "cpu",
           "--dataset", f"folder:{imgs}", "--adc-bits", "8", "--train-subset", "4",
           "--no-progress"]
    assert main(sim) == 0
    assert "--test-subset" not in capsys.readouterr().err
    assert main([*sim, "--test-subset", "1000"]) == 0
    assert "--test-subset 1000 is more than the 2 test images" in capsys.readouterr().err


def test_simulate_refuses_bn_recalibration_of_the_programmed_models_statistics(tmp_path,
                                                                                capsys):
    imgs = _folder(tmp_path / "imgs")
    path, bb = _folder_task_bundle(tmp_path, 2, f"folder:{imgs}")
    argv = ["simulate", "--bundle", str(path), "--backbone", str(bb), "--device", "cpu",
            "--no-progress", "--adc-bits", "8", "--backend", "torch", "--bn-recalibration"]
    assert main([*argv, "--task", "base"]) == 2
    got = capsys.readouterr()
    assert got.out == "" and "task 'base' runs the backbone's" in got.err
    assert main([*argv, "--test-subset", "2", "--json"]) == 0  # the task's own BN: fine
    assert json.loads(capsys.readouterr().out)["bn_recalibration"] is True


def test_cost_workload_recorded_says_which_tasks_recorded_none(tmp_path, capsys):
    """A task saved from Python records no steps: --workload recorded prices it at the default
    and says so (it suggested the very flag the user had given, or said nothing)."""
    imgs = _folder(tmp_path / "imgs")
    path, bb = _folder_task_bundle(tmp_path, 2, f"folder:{imgs}")
    assert main(["cost", "--bundle", str(path), "--backbone", str(bb), "--workload",
                 "recorded", "--json"]) == 0
    notes = [n for n in json.loads(capsys.readouterr().out)["notes"] if "on-chip" in n]
    assert len(notes) == 1 and "t recorded none, priced at the default 1913 x 32" in notes[0]
    assert "--workload recorded prices" not in notes[0]


@pytest.mark.parametrize("command", ["eval", "simulate"])
def test_one_dataset_for_tasks_learned_on_different_ones_needs_task(command, tmp_path, capsys):
    """--dataset without --task stood for every task's data: following the moved-folder
    advice on a bundle that also held an mnist task printed the folder task's row, then failed
    on mnist's class count. Refused before any work when the tasks' datasets differ."""
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel

    bb = tmp_path / "bb.safetensors"
    backbone, arch = _tiny_backbone_file(bb)
    mtm = MultiTaskModel(backbone, CrossbarSpec(rows=16, cols=16), arch=arch)
    mtm.add_task("imgs", 2, "xbm", dataset=f"folder:{tmp_path / 'gone'}")
    mtm.add_task("digits", 10, "xbm", dataset="mnist")
    path = tmp_path / "b.safetensors"
    mtm.save_bundle(path)
    imgs = _folder(tmp_path / "imgs")
    argv = [command, "--bundle", str(path), "--backbone", str(bb), "--device", "cpu",
            "--no-progress", "--dataset", f"folder:{imgs}"]
    if command == "simulate":
        argv += ["--adc-bits", "8", "--backend", "torch"]
    assert main(argv) == 2
    got = capsys.readouterr()
    assert got.out == ""
    assert "learned on different ones: imgs (folder:" in got.err and "add --task NAME" in got.err
    if command == "eval":
        assert main([*argv, "--task", "imgs"]) == 0


@pytest.mark.parametrize("command", ["eval", "simulate"])
def test_eval_and_simulate_check_their_counts_by_flag(command, tmp_path, tiny_mtm, capsys):
    path = _bundle(tmp_path, tiny_mtm)
    assert main([command, "--bundle", str(path), "--test-subset", "-1", "--device", "cpu"]) == 2
    assert _one_line_error(capsys) == "xbm: error: --test-subset must be >= 1, got -1"


def test_simulate_refuses_a_fault_map_with_fault_rates(tmp_path, tiny_mtm, capsys, monkeypatch):
    """A saved chip has its own rate: it used to be evaluated once per --fault-rates value and
    labelled with each (0 by default)."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    path = _bundle(tmp_path, tiny_mtm)
    assert main(["simulate", "--bundle", str(path), "--fault-map", str(tmp_path / "chip"),
                 "--fault-rates", "0,0.02", "--device", "cpu"]) == 2
    assert "--fault-map replaces --fault-rates" in _one_line_error(capsys)
    assert not (tmp_path / "cache" / "backbones").exists()  # before any backbone


def test_pretrain_never_replaces_a_backbone_silently(tmp_path, capsys, monkeypatch):
    """Bundles pin their backbone by hash: an --out that exists is refused without --force, a
    cached recipe is reused, and only .safetensors names are written."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    imgs = _folder(tmp_path / "imgs", n=8)
    tiny = ["--model", "small_cnn", "--width", "2", "--dataset", f"folder:{imgs}", "--epochs",
            "1", "--batch-size", "4", "--augment", "none", "--mixup", "0", "--device", "cpu",
            "--no-progress"]
    out = tmp_path / "bb.safetensors"
    assert main(["pretrain", *tiny, "--out", str(out)]) == 0
    first = out.read_bytes()
    # not the default recipe: the commands would not find it without --backbone
    assert f"pass --backbone {out}" in capsys.readouterr().out
    assert main(["pretrain", *tiny, "--seed", "1", "--out", str(out)]) == 2
    assert "already exists" in _one_line_error(capsys) and out.read_bytes() == first
    assert main(["pretrain", *tiny, "--seed", "1", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != first
    assert main(["pretrain", *tiny, "--out", str(tmp_path / "bb.pt")]) == 2
    assert "name it *.safetensors" in _one_line_error(capsys)
    assert not (tmp_path / "bb.pt").exists()
    assert main(["pretrain", *tiny]) == 0  # into the cache
    capsys.readouterr()
    assert main(["pretrain", *tiny]) == 0
    said = capsys.readouterr().out
    assert said.startswith("already cached: ")
    assert re.search(r"\(accuracy \d+\.\d\d% on [\d,]+ test images, hash ", said), said
    # --out of a cached recipe: the cached backbone copied (usage.md: a recipe already in the
    # cache is reused), not minutes of pretraining again
    import xbm.train.pretrain as pt

    real_pretrain = pt.pretrain
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("pretrained again"))
    copy = tmp_path / "copy.safetensors"
    assert main(["pretrain", *tiny, "--out", str(copy)]) == 0
    assert capsys.readouterr().out.startswith("copied the cached backbone of this recipe")
    (cached,) = (tmp_path / "cache" / "backbones").glob("*.safetensors")
    assert copy.read_bytes() == cached.read_bytes()
    # a file of another recipe under this recipe's cache name: "already cached" before, while
    # adapt and demo refused it; now refused here too, and --force pretrains it anew
    import shutil

    shutil.copyfile(out, cached)  # out: pretrained at --seed 1
    assert main(["pretrain", *tiny]) == 2
    assert "was pretrained with another recipe than its name says (seed 1 vs 0" in \
        (err := _one_line_error(capsys)) and "pass --force to pretrain it anew" in err, err
    # two `pretrain --force` at once: the other run moved the cached file to its kept name
    # between our check and our move, which stopped us with "No such file or directory"
    import os

    monkeypatch.setattr(pt, "pretrain", real_pretrain)
    real_replace = os.replace

    def raced(src, dst):
        if os.fspath(src) == os.fspath(cached) and "-" in os.path.basename(os.fspath(dst)):
            real_replace(src, dst)  # the other run's move, just before ours
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", raced)
    assert main(["pretrain", *tiny, "--force"]) == 0, capsys.readouterr().err
    monkeypatch.setattr(os, "replace", real_replace)
    assert cached.exists() and len(list(cached.parent.glob("*.safetensors"))) == 2


def test_a_backbone_accuracy_says_how_many_test_images_it_was_measured_on():
    """A demo scores its backbone on its test subset; the cache keeps that figure for every later
    command of the recipe, so it is always said with its image count (older files: from the
    recorded test_subset, else the bare figure)."""
    from xbm.train.pretrain import accuracy_text

    assert accuracy_text({"accuracy": 12.5, "test_images": 200}) == "12.50% on 200 test images"
    assert accuracy_text({"accuracy": 88.0, "config": {"test_subset": 2000}}) == \
        "88.00% on 2,000 test images"
    assert accuracy_text({"accuracy": 88.0, "config": {"test_subset": None}}) == "88.00%"
    assert accuracy_text({"accuracy": None}) == accuracy_text({}) == "unknown"


def test_cli_warnings_are_one_line(capsys, monkeypatch):
    """xbm's own warnings read as xbm's words; another library's say where they come from."""
    import warnings

    import xbm.cli as cli

    def warn(args):
        warnings.warn_explicit("something to know\nand more", UserWarning,
                               filename=cli.__file__, lineno=1)
        warnings.warn("a library's notice", DeprecationWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "cmd_methods", warn)  # the parser binds it when built
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        before = warnings.showwarning
        assert cli.main(["methods"]) == 0
        assert warnings.showwarning is before  # main() puts the caller's formatter back
    line = warn.__code__.co_firstlineno + 3
    assert capsys.readouterr().err == (
        "xbm: warning: something to know\n"
        f"xbm: warning: a library's notice (DeprecationWarning from test_cli.py:{line})\n")
    assert cli._warning_origin(UserWarning, "/x/lib/python3.11/site-packages/torch/nn/f.py",
                               7) == " (UserWarning from torch/nn/f.py:7)"


def test_missing_backbone_error_gives_the_pretrain_command(tmp_path, capsys, monkeypatch):
    """A bundle records its backbone's pretraining config, so when the backbone is not cached
    the error names the exact `xbm pretrain` command that rebuilds it: from any directory (the
    folder is recorded by its absolute path) and quoted (a folder name with a space)."""
    import shlex

    _folder(tmp_path / "my imgs", n=8)
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bb = tmp_path / "bb.safetensors"
    assert main(["pretrain", "--model", "small_cnn", "--width", "2", "--dataset",
                 "folder:my imgs", "--epochs", "1", "--batch-size", "4", "--augment", "none",
                 "--mixup", "0", "--seed", "3", "--lr", "0.00123456789", "--device", "cpu",
                 "--no-progress", "--out", str(bb)]) == 0
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", "folder:my imgs", "--method", "xbm", "--backbone",
                 str(bb), "--model", "small_cnn", "--rows", "16", "--cols", "16",
                 "--batch-size", "4", "--out", str(bundle), "--device", "cpu",
                 "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path / "my imgs")  # somewhere else
    bb.unlink()  # the file adapt was given (the bundle records it) is gone too
    assert main(["eval", "--bundle", str(bundle), "--device", "cpu"]) == 2  # empty cache
    err = _one_line_error(capsys)
    assert "no cached backbone matches" in err and f"{bb}, is gone" in err
    argv = shlex.split(err.split("`")[1])
    assert argv[:2] == ["xbm", "pretrain"]
    flags = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert flags["--dataset"] == f"folder:{tmp_path / 'my imgs'}"
    assert flags["--lr"] == "0.00123456789" and flags["--seed"] == "3"
    assert flags["--augment"] == "none" and flags["--epochs"] == "1"
    # running that command (into the cache) makes the bundle's backbone findable again
    assert main([*argv[1:], "--device", "cpu", "--no-progress"]) == 0
    assert main(["eval", "--bundle", str(bundle), "--device", "cpu"]) == 0


def test_pretrain_force_on_the_cache_keeps_the_backbone_bundles_were_made_on(
        tmp_path, capsys, monkeypatch):
    """Re-pretraining a cached recipe with --force must not strand the bundles made on the
    previous backbone: it stays in the cache under its hash; and a bundle whose recipe is cached
    with another hash is told to pass its own backbone, not to run a command that cannot help."""
    import json

    from xbm.io import load_safetensors, metadata_hash, save_safetensors, tensors_hash
    from xbm.train.pretrain import find_cached_backbone

    imgs = _folder(tmp_path / "imgs", n=8)
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    tiny = ["--model", "small_cnn", "--width", "2", "--dataset", f"folder:{imgs}", "--epochs",
            "1", "--batch-size", "4", "--augment", "none", "--mixup", "0", "--device", "cpu",
            "--no-progress"]
    assert main(["pretrain", *tiny]) == 0
    (cached,) = (tmp_path / "cache" / "backbones").glob("*.safetensors")
    tensors, meta = load_safetensors(cached)
    # stand-in for a backbone another machine made: same recipe, other weights
    other = {k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}
    edited = meta | {"content_hash": tensors_hash(other)}
    save_safetensors(cached, other, edited | {"meta_hash": metadata_hash(edited)})
    old_hash = tensors_hash(other)
    capsys.readouterr()
    assert main(["pretrain", *tiny, "--force"]) == 0
    out = capsys.readouterr().out
    assert f"kept the previous backbone as {cached.with_name(cached.stem + '-' + old_hash)}" \
        in out
    assert find_cached_backbone(old_hash) is not None
    assert json.loads(json.dumps(load_safetensors(cached)[1]))["content_hash"] == meta[
        "content_hash"]  # the recipe's entry is the retrained (deterministic) backbone again
    # a bundle learned on a third backbone of this recipe: the cache has the recipe, not its hash
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel
    from xbm.train.pretrain import load_backbone

    model, bmeta = load_backbone(cached)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    mtm = MultiTaskModel(model, CrossbarSpec(rows=16, cols=16), arch=bmeta["arch"],
                         backbone_recipe=bmeta["config"])
    mtm.add_task("t", 2, "xbm", dataset=f"folder:{imgs}")
    mtm.save_bundle(tmp_path / "b.safetensors")
    assert main(["eval", "--bundle", str(tmp_path / "b.safetensors"), "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert "the cache holds another backbone of the same recipe" in err and "--backbone" in err


def test_pretrain_waits_for_another_run_of_its_recipe(tmp_path, capsys, monkeypatch):
    """`xbm pretrain` of a recipe another run is pretraining waits on its lock, then says the
    recipe is cached rather than pretraining it a second time."""
    import threading
    import time

    from xbm.train import pretrain as pt

    imgs = _folder(tmp_path / "imgs", n=8)
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    tiny = ["--model", "small_cnn", "--width", "2", "--dataset", f"folder:{imgs}", "--epochs",
            "1", "--batch-size", "4", "--augment", "none", "--mixup", "0", "--device", "cpu",
            "--no-progress"]
    assert main(["pretrain", *tiny]) == 0  # the file the other run is going to write
    (cached,) = (tmp_path / "cache" / "backbones").glob("*.safetensors")
    made = cached.read_bytes()
    cached.unlink()
    capsys.readouterr()
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("pretrained it again"))
    codes, seen = [], ""
    with pt.pretrain_lock(cached):  # the other run, pretraining
        waiting = threading.Thread(target=lambda: codes.append(main(["pretrain", *tiny])))
        waiting.start()
        deadline = time.monotonic() + 30
        while "waiting for it to finish" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen += capsys.readouterr().out
        cached.write_bytes(made)  # ... and caching it
    waiting.join(60)
    assert codes == [0]
    assert "another xbm process is pretraining" in seen
    assert "pretrained by another run while this one waited" in capsys.readouterr().out

def test_pretrain_command_fills_fields_older_backbones_lacked():
    from xbm.train.pretrain import pretrain_command

    old = {"model": "resnet18_cifar", "width": 16, "dataset": "fashion-mnist", "epochs": 1,
           "batch_size": 128, "lr": 0.002, "seed": 0, "train_subset": None, "image_size": 28,
           "test_subset": None}  # before augment, mixup and precision existed
    cmd = pretrain_command(old)
    assert cmd.endswith("--augment none --mixup 0.0 --precision fp32")
    assert pretrain_command(old | {"image_size": 32}).endswith("--precision fp32 --image-size 32")
    assert pretrain_command({"model": "x"}) is None and pretrain_command(None) is None


def test_simulate_with_an_ideal_adc_runs_once_and_says_so(tmp_path, capsys):
    """An ideal ADC has no resolution: the sweep used to repeat one evaluation under 4, 6 and 8
    'ADC bits'; now it runs once, labelled 'ideal', and an --adc-bits list is refused."""
    import json

    imgs = _folder(tmp_path / "imgs")
    path, bb = _folder_task_bundle(tmp_path, 2, f"folder:{imgs}")
    argv = ["simulate", "--bundle", str(path), "--backbone", str(bb), "--device", "cpu",
            "--no-progress", "--backend", "torch", "--adc-mode", "ideal"]
    assert main([*argv, "--adc-bits", "4,8"]) == 2
    assert "--adc-bits has no effect with --adc-mode ideal" in _one_line_error(capsys)
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["path"], r["adc_bits"]) for r in rows] == [("ideal", None), ("faithful", "ideal")]


def test_eval_with_adapts_seed_scores_the_images_adapt_scored(tmp_path, capsys, monkeypatch):
    """eval's --seed used to be ignored (its test subset was always drawn with seed 0), so a
    bundle adapted with --seed 3 --test-subset N could not be re-scored on the same images."""
    import json

    import xbm.train

    seen = []
    real = xbm.train.evaluate_task

    def spy(mtm, task, loader, device, *a, **kw):
        seen.append(torch.cat([x for x, _ in loader]))
        return real(mtm, task, loader, device, *a, **kw)

    monkeypatch.setattr(xbm.train, "evaluate_task", spy)
    imgs = _folder(tmp_path / "imgs", n=20)
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    common = ["--device", "cpu", "--no-progress", "--test-subset", "4", "--seed", "3"]
    assert main(["adapt", "--dataset", f"folder:{imgs}", "--method", "xbm", "--backbone",
                 str(bb), "--model", "small_cnn", "--rows", "16", "--cols", "16",
                 "--batch-size", "4", "--out", str(bundle), "--json", *common]) == 0
    adapted = json.loads(capsys.readouterr().out)["accuracy"]
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--json",
                 *common]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["accuracy"] == adapted
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # the same images, same order
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--json",
                 *common[:-1], "0"]) == 0
    assert not torch.equal(seen[2], seen[0])  # another seed, another subset
    capsys.readouterr()
    # no --seed: the one adapt recorded (it was 0, another subset and accuracy, with no note)
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(bb), "--json",
                 *common[:-2]]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seed"] is None and res["tasks"][0]["seed"] == 3
    assert res["tasks"][0]["accuracy"] == adapted and torch.equal(seen[3], seen[0])


@needs_data  # its last step adapts on MNIST
def test_model_and_width_flags_must_match_a_given_backbone_or_bundle(tmp_path, capsys,
                                                                     monkeypatch):
    """--model/--width pick the default backbone; with --backbone or a bundle they used to be
    ignored silently (a width-16 request trained on a width-4 backbone, exit 0)."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    path, bb = _folder_task_bundle(tmp_path, 10, "mnist")
    base = ["--dataset", "mnist", "--device", "cpu", "--no-progress"]
    for given in (["--backbone", str(bb)], ["--bundle", str(path), "--backbone", str(bb)]):
        for flag, needle in ((["--model", "resnet18_cifar"], "--model resnet18_cifar"),
                             (["--width", "16"], "--width 16")):
            assert main(["adapt", *base, *given, *flag, "--out",
                         str(tmp_path / "o.safetensors")]) == 2
            err = _one_line_error(capsys)
            assert f"{needle} contradicts the " in err and "(small_cnn, width 4)" in err, err
    assert main(["simulate", "--bundle", str(path), "--backbone", str(bb), "--width", "8",
                 "--device", "cpu", "--no-progress"]) == 2
    assert "--width 8 contradicts the backbone" in _one_line_error(capsys)
    assert not (tmp_path / "o.safetensors").exists()
    # flags that agree are fine
    assert main(["adapt", *base, "--backbone", str(bb), "--model", "small_cnn", "--width", "4",
                 "--train-subset", "16", "--test-subset", "8", "--rows", "16", "--cols", "16",
                 "--out", str(tmp_path / "ok.safetensors")]) == 0


def test_a_backbone_and_a_bundle_swapped_name_the_right_flag(tmp_path, capsys):
    path, bb = _folder_task_bundle(tmp_path, 2, "mnist")
    assert main(["eval", "--bundle", str(bb), "--device", "cpu"]) == 2
    assert "this is a backbone, not a task bundle; pass it as --backbone" in \
        _one_line_error(capsys)
    assert main(["adapt", "--dataset", "mnist", "--backbone", str(path), "--device", "cpu",
                 "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "this is a task bundle, not a backbone; pass it as --bundle" in \
        _one_line_error(capsys)


@pytest.mark.parametrize("argv,line", [
    (["adapt", "--dataset", "mnist", "--rows", "0"],
     "--rows: CrossbarSpec.rows must be a positive integer, got 0"),
    (["demo", "--pretrain-mixup", "-1"],
     "--pretrain-mixup: PretrainConfig.mixup must be a number in [0, 1000]"),
    (["demo", "--epochs", "0"], "--epochs: demo epochs must be an integer >= 1, got 0"),
    (["cost", "--model", "small_cnn", "--iterations", "0"], "--iterations: iterations must be"),
    (["cost", "--model", "small_cnn", "--piggyback-off-fraction", "1.5"],
     "--piggyback-off-fraction must be a fraction in [0, 1], got 1.5"),
])
def test_a_config_classs_complaint_names_the_flag_typed(argv, line, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    out = ["--out", str(tmp_path / "o")] if argv[0] == "demo" else []
    assert main([*argv, *out]) == 2
    assert _one_line_error(capsys).startswith(f"xbm: error: {line}")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_name_the_flag_leaves_other_messages_alone():
    from xbm.cli import _name_the_flag

    # already a flag; a field no typed flag names; the flag's name only as a substring
    assert _name_the_flag("--rows must be >= 1", ["--rows", "0"]) == "--rows must be >= 1"
    assert _name_the_flag("CrossbarSpec.cols must be positive", ["--rows", "0"]) == \
        "CrossbarSpec.cols must be positive"
    assert _name_the_flag("cell_bits must be <= 8", ["--bits", "9"]) == "cell_bits must be <= 8"
    assert _name_the_flag("SimConfig.adc_bits must be a positive integer",
                          ["--adc-bits=0"]) == "--adc-bits: SimConfig.adc_bits must be a " \
        "positive integer"
    # a comparison between two fields names the flag too ("--sim-dac-bits 9" said only
    # "CrossbarSpec.dac_bits (9) exceeds input_bits (8)")
    msg = "CrossbarSpec.dac_bits (9) exceeds input_bits (8); lower it"
    assert _name_the_flag(msg, ["simulate", "--sim-dac-bits", "9"]) == f"--sim-dac-bits: {msg}"
    msg = "SimConfig.mask_init (-0.5) must be >= 0"
    assert _name_the_flag(msg, ["--mask-init", "-0.5"]) == f"--mask-init: {msg}"
    # a shape in brackets is no comparison: import-backbone's mismatch named --model
    msg = "checkpoint 'w.pth' does not match ResNet: 1 shape mismatch(es): conv1.weight " \
        "(4, 1, 3, 3) vs model (8, 1, 3, 3), fc.bias (10,) vs model (7,)"
    assert _name_the_flag(msg, ["import-backbone", "--model", "resnet18_cifar"]) == msg
    # the flag named exactly as the field wins over a prefixed one typed earlier, and a prefix
    # is stripped only where the message names its class
    msg = "demo epochs must be an integer >= 1, got 0"
    assert _name_the_flag(msg, ["demo", "--pretrain-epochs", "3", "--epochs", "0"]) == \
        f"--epochs: {msg}"
    assert _name_the_flag(msg, ["demo", "--pretrain-epochs", "3"]) == msg  # from a YAML file
    msg = "CrossbarSpec.cell_bits must be <= weight_bits"
    assert _name_the_flag(msg, ["--sim-cell-bits", "4", "--cell-bits", "9"]) == \
        f"--cell-bits: {msg}"
    assert _name_the_flag("SimConfig.cell_bits must be >= 1", ["--sim-cell-bits", "0"]) == \
        "--sim-cell-bits: SimConfig.cell_bits must be >= 1"


def test_version_and_help_name_the_tool(capsys):
    from xbm import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"xbm {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_eval_refuses_a_folder_whose_classes_were_renamed(tmp_path, capsys):
    """Labels follow the sorted class-folder names: a renamed class shifted every label and
    eval printed 0% with exit 0. Bundles now record the class names and eval checks them."""
    imgs = _folder(tmp_path / "imgs", classes=("cat", "dog", "eel"), n=6)
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    common = ["--device", "cpu", "--no-progress", "--backbone", str(bb)]
    assert main(["adapt", "--dataset", f"folder:{imgs}", "--method", "xbm", "--model",
                 "small_cnn", "--rows", "16", "--cols", "16", "--batch-size", "4", "--out",
                 str(bundle), *common]) == 0
    capsys.readouterr()
    assert main(["eval", "--bundle", str(bundle), *common]) == 0
    capsys.readouterr()
    (imgs / "eel").rename(imgs / "ant")
    assert main(["eval", "--bundle", str(bundle), *common]) == 2
    err = _one_line_error(capsys)
    assert "trained on the classes ['cat', 'dog', 'eel']" in err and "'ant'" in err, err
    (imgs / "ant").rename(imgs / "eel")
    _folder(imgs, classes=("fox",), n=6)  # a class added: the count differs
    assert main(["eval", "--bundle", str(bundle), *common]) == 2
    err = _one_line_error(capsys)
    assert "restore that folder's class sub-folders" in err, err


def test_a_bundle_finds_the_backbone_file_adapt_was_given(tmp_path, capsys, monkeypatch):
    """A backbone kept outside the cache (``xbm pretrain --out``): the bundle adapt makes on it
    records the file, so eval and cost need no --backbone; a moved or replaced file is named."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))  # empty: no lookup by hash
    imgs = _folder(tmp_path / "imgs")
    bb = tmp_path / "mine" / "bb.safetensors"
    bb.parent.mkdir()
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", f"folder:{imgs}", "--method", "xbm", "--backbone",
                 str(bb), "--out", str(bundle), "--rows", "16", "--cols", "16", "--epochs", "1",
                 "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    for argv in (["eval", "--device", "cpu", "--no-progress"], ["cost"]):
        assert main([*argv, "--bundle", str(bundle)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    bb.rename(tmp_path / "elsewhere.safetensors")
    assert main(["eval", "--bundle", str(bundle), "--device", "cpu", "--no-progress"]) == 2
    assert f"the file it was learned from, {bb}, is gone" in capsys.readouterr().err
    torch.manual_seed(1)  # another backbone at the recorded path
    from xbm.io import save_safetensors, tensors_hash
    from xbm.models import create_model

    state = create_model("small_cnn", num_classes=3, in_channels=1, width=4).state_dict()
    save_safetensors(bb, state, {"format": "xbm-backbone/1", "content_hash": tensors_hash(state)})
    assert main(["cost", "--bundle", str(bundle)]) == 2
    assert f"{bb}, now holds another backbone" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "simulate", "cost"])
def test_a_wrong_backbone_for_a_bundle_is_said_in_the_flags_words(command, tmp_path, capsys):
    """eval used to answer with load_bundle's Python wording ("load it onto the backbone it
    was trained on"), cost with the first differing field."""
    path, _ = _folder_task_bundle(tmp_path, 2, f"folder:{_folder(tmp_path / 'imgs')}")
    from xbm.io import save_safetensors, tensors_hash
    from xbm.models import create_model

    torch.manual_seed(1)
    state = create_model("small_cnn", num_classes=3, in_channels=1, width=4).state_dict()
    other = tmp_path / "other.safetensors"
    save_safetensors(other, state, {"format": "xbm-backbone/1", "content_hash": tensors_hash(
        state), "arch": {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "width": 4}})
    extra = [] if command == "cost" else ["--device", "cpu", "--no-progress"]
    assert main([command, "--bundle", str(path), "--backbone", str(other), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xbm: error: {path} was learned on the backbone with hash")
    assert f"--backbone {other} has" in err and "drop --backbone to use the bundle's own" in err
    assert len(err.splitlines()) == 1


def test_yaml_duplicate_keys_are_refused_and_merge_keys_still_override(tmp_path, capsys):
    """`lr: 1e-3` then `lr: 2e-3` took the last value without a word (in method configs and
    in the demo's method_configs); a merge key's override is what it is for."""
    from xbm.cli import _load_yaml
    from xbm.config import load_yaml
    from xbm.errors import XbmError

    cfg = tmp_path / "dup.yaml"
    cfg.write_text("method_configs:\n  xbm: {lr: 1.0e-3, lr: 2.0e-3}\n")
    # read directly: a regression would not then run a whole default demo on the file
    with pytest.raises(XbmError, match=re.escape(
            "is not valid YAML at line 2, column 21 (found duplicate key 'lr' (first at line "
            "2); keep one)")):
        _load_yaml(str(cfg))
    assert load_yaml("a: &x {lr: 1}\nb:\n  <<: *x\n  lr: 2\n") == {"a": {"lr": 1},
                                                                    "b": {"lr": 2}}


def test_yaml_exponents_are_numbers_as_written(tmp_path):
    """PyYAML reads ``1e-3`` (YAML 1.1: no dot) as text; results.json then recorded "1e-3" and
    demo_seeds.py refused to compare two runs at the same rate written 1e-3 and 0.001."""
    from xbm.cli import _load_yaml
    from xbm.hardware.energy import get_preset, load_preset_file

    cfg = tmp_path / "c.yaml"
    cfg.write_text("method_configs: {piggyback: {lr: 1e-3}, xma: {lr: 5E-1}}\nseed: 1\n"
                   "name: 1e3x\nversion: 1.0.0\n")
    d = _load_yaml(str(cfg))
    assert d["method_configs"] == {"piggyback": {"lr": 0.001}, "xma": {"lr": 0.5}}
    assert isinstance(d["method_configs"]["piggyback"]["lr"], float) and d["seed"] == 1
    assert (d["name"], d["version"]) == ("1e3x", "1.0.0")  # not numbers: left as text
    # YAML 1.2 integers: 1.1 read a leading zero as octal and 1:30 as base 60, silently
    cfg.write_text("seed: 0042\nepochs: 010\ntime: 1:30\nhex: 0x1F\noct: 0o17\nneg: -3\n")
    assert _load_yaml(str(cfg)) == {"seed": 42, "epochs": 10, "time": "1:30", "hex": 31,
                                    "oct": 15, "neg": -3}
    # YAML 1.2 booleans: 1.1 read `pretrain_augment: off` as False ("must be a name, got
    # False") and a task named no as False
    cfg.write_text("a: on\nb: yes\nc: no\nd: y\ne: true\nf: False\ng: TRUE\nh: [off, true]\n")
    assert _load_yaml(str(cfg)) == {"a": "on", "b": "yes", "c": "no", "d": "y", "e": True,
                                    "f": False, "g": True, "h": ["off", True]}
    preset = tmp_path / "p.yaml"
    preset.write_text(get_preset("default").to_yaml().replace(
        "write_pulse_s: 5.0e-08", "write_pulse_s: 5e-08"))
    assert "write_pulse_s: 5e-08" in preset.read_text()
    assert load_preset_file(preset).device.write_pulse_s == 5e-08


def _colour_folder(root, n=24, size=20):
    """Two classes that differ only in hue, at equal luminance (PIL's ``L`` gives both the
    same grey): only a model fed the RGB channels can tell them apart."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # L = (19595 R + 38470 G + 7471 B) / 65536: (200, 60, 60) and (60, 131, 60) both give 101
    for name, rgb in (("red", (200, 60, 60)), ("green", (60, 131, 60))):
        for i in range(n):
            px = np.array(rgb, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
            p = root / name / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(px.astype(np.uint8), "RGB").save(p)
    return root


def _rgb_backbone_file(path):
    from xbm.io import save_safetensors, tensors_hash
    from xbm.models import create_model

    torch.manual_seed(0)
    state = create_model("small_cnn", num_classes=3, in_channels=3, width=4).state_dict()
    save_safetensors(path, state, {"format": "xbm-backbone/1", "dataset": "x", "accuracy": 0.0,
                                   "arch": {"name": "small_cnn", "num_classes": 3,
                                            "in_channels": 3, "width": 4},
                                   "content_hash": tensors_hash(state)})
    return path


def test_rgb_folder_on_a_3_channel_backbone_end_to_end(tmp_path, capsys):
    """An RGB backbone (an imported ImageNet-layout one, say) used to be refused by the CLI,
    which read every dataset as 28x28 grayscale. Now an image folder is read in the backbone's
    channels and at --image-size: a task told apart by hue alone is learned (read as grey it
    would sit at chance), the bundle records the side, and eval, simulate and cost feed the
    task as it was learned (eval repeats adapt's accuracy exactly)."""
    from xbm.data import load_dataset

    bb = _rgb_backbone_file(tmp_path / "rgb.safetensors")
    imgs = _colour_folder(tmp_path / "hues")
    grey = load_dataset(str(imgs), channels=1)
    assert grey.colour_read_as_grey  # adapt on a 1-channel backbone would say so
    assert grey.train_x.float().std(dim=(1, 2, 3)).max() < 30  # no hue left to learn from
    out = tmp_path / "t.safetensors"
    assert main(["adapt", "--dataset", str(imgs), "--method", "xbm", "--backbone", str(bb),
                 "--image-size", "16", "--epochs", "6", "--batch-size", "8", "--out", str(out),
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["in_channels"] == 3 and rec["image_size"] == 16
    assert rec["accuracy"] >= 90.0, rec  # hue learned
    assert main(["eval", "--bundle", str(out), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["accuracy"] == rec["accuracy"]
    assert main(["simulate", "--bundle", str(out), "--adc-bits", "8", "--backend", "torch",
                 "--device", "cpu", "--no-progress", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["path"] == "ideal" and rows[0]["accuracy"] == rec["accuracy"]
    assert main(["cost", "--bundle", str(out), "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert cost["input_shape"] == [1, 3, 16, 16], cost.get("input_shape")
    # the on-chip workload is the papers' default; the steps these tasks trained are said beside
    note = [n for n in cost["notes"] if n.startswith("on-chip adaption is priced at the default")]
    assert note and re.search(rf"{rec['task']} \d+ steps at batch 8: --workload recorded",
                              note[0]), cost["notes"]
    assert main(["cost", "--bundle", str(out), "--iterations", "100", "--json"]) == 0
    assert not [n for n in json.loads(capsys.readouterr().out)["notes"] if "on-chip" in n]
    # --workload recorded prices what the task trained: its on-chip energy scales with it
    assert main(["cost", "--bundle", str(out), "--workload", "recorded", "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    steps = rec["train_steps"]
    assert main(["cost", "--bundle", str(out), "--iterations", str(steps), "--batch-size", "8",
                 "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert own["methods"]["xbm"]["onchip_adaption_energy_j"] == pytest.approx(
        same["methods"]["xbm"]["onchip_adaption_energy_j"], rel=1e-12)
    assert own["methods"]["xbm"]["onchip_adaption_energy_j"] < \
        cost["methods"]["xbm"]["onchip_adaption_energy_j"]
    assert any(f"{rec['task']} {steps} steps x batch 8" in n for n in own["notes"])
    # one workload: nothing to leave out (it said the tasks "trained different workloads")
    assert not any("different workloads" in n for n in own["notes"])
    assert own["onchip_workloads"] == {rec["task"]: {"iterations": steps, "batch_size": 8}}
    assert main(["cost", "--bundle", str(out), "--workload", "recorded", "--iterations",
                 "5"]) == 2
    assert "drop --iterations/--batch-size" in _one_line_error(capsys)
    # a second task joins at the bundle's side unless told otherwise
    assert main(["adapt", "--dataset", "digits", "--method", "xbm", "--bundle", str(out),
                 "--train-subset", "40", "--test-subset", "40", "--device", "cpu",
                 "--no-progress", "--json"]) == 0
    rec2 = json.loads(capsys.readouterr().out)
    assert rec2["image_size"] == 16 and rec2["in_channels"] == 3  # grey digits repeated to RGB


def test_with_channels_repeats_grey_and_refuses_to_invent_colour():
    from xbm.data.task import TaskData
    from xbm.errors import ConfigError

    x = torch.randint(0, 255, (4, 1, 5, 5), dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1])
    d = TaskData("t", x, y, x[:2], y[:2], ["a", "b"])
    rgb = d.with_channels(3)
    assert rgb.train_x.shape == (4, 3, 5, 5) and rgb.in_channels == 3
    assert all(torch.equal(rgb.train_x[:, c], x[:, 0]) for c in range(3))
    assert rgb.train_x.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view
    assert d.with_channels(1) is d
    with pytest.raises(ConfigError, match="has 3-channel images, the model takes 1"):
        rgb.with_channels(1)
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        d.with_channels(2)


def test_pretrain_an_rgb_backbone_on_a_colour_folder(tmp_path, capsys, monkeypatch):
    """`xbm pretrain --channels 3 --image-size 16` reads an image folder in colour at that side:
    a base task told apart by hue alone is learned (as grey it would sit at chance). The recipe
    is recorded, its cache name differs from the grey one's, the command that rebuilds it
    carries both flags, and adapt on the backbone reads a new task in RGB at its side."""
    from dataclasses import replace

    from xbm.errors import ConfigError
    from xbm.train.pretrain import PretrainConfig, load_backbone, pretrain_command

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    imgs = _colour_folder(tmp_path / "hues")
    out = tmp_path / "rgb.safetensors"
    assert main(["pretrain", "--model", "small_cnn", "--width", "4", "--dataset", str(imgs),
                 "--channels", "3", "--image-size", "16", "--epochs", "6", "--batch-size", "8",
                 "--augment", "none", "--mixup", "0", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == 0
    assert "(3x16x16)" in capsys.readouterr().out
    model, meta = load_backbone(out)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert meta["arch"]["in_channels"] == 3 and first_conv.in_channels == 3
    assert meta["config"]["channels"] == 3 and meta["config"]["image_size"] == 16
    assert meta["accuracy"] >= 90.0, meta["accuracy"]  # hue learned
    cmd = pretrain_command(meta["config"])
    assert "--image-size 16 --channels 3" in cmd, cmd
    # every earlier backbone keeps its cache name (the demo's default one here), RGB gets its own
    grey = PretrainConfig(precision="bf16")
    name = ("resnet18_cifar-w16-fashion-mnist-e3-b128-lr0.002-s0-28px-affine-flip-mixup0.4-bf16"
            ".safetensors")
    assert grey.cache_name() == replace(grey, channels=1).cache_name() == name
    assert replace(grey, channels=3).cache_name() == name.replace(".safetensors",
                                                                   "-rgb.safetensors")
    bundle = tmp_path / "t.safetensors"
    assert main(["adapt", "--dataset", str(imgs), "--method", "xbm", "--backbone", str(out),
                 "--epochs", "1", "--batch-size", "8", "--out", str(bundle), "--device", "cpu",
                 "--no-progress", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["in_channels"] == 3 and rec["image_size"] == 16  # the backbone's side
    with pytest.raises(ConfigError, match="channels must be 1 .* or 3"):
        PretrainConfig(channels=2)
    # a grayscale base task pretrained as RGB learns no colour: said, and still done
    capsys.readouterr()
    assert main(["pretrain", "--model", "small_cnn", "--width", "2", "--dataset", "digits",
                 "--channels", "3", "--train-subset", "64", "--epochs", "1", "--device",
                 "cpu", "--no-progress", "--out", str(tmp_path / "g3.safetensors")]) == 0
    assert "xbm: warning: digits: every training image is grayscale" in capsys.readouterr().err
    # a colour folder adapted on a grey backbone: said once, by adapt (eval says nothing)
    grey_bb, g = tmp_path / "grey.safetensors", tmp_path / "g.safetensors"
    _tiny_backbone_file(grey_bb)
    assert main(["adapt", "--dataset", str(imgs), "--backbone", str(grey_bb), "--out",
                 str(g), "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().err.count("in colour and were read as grayscale") == 1
    assert main(["eval", "--bundle", str(g), "--device", "cpu"]) == 0
    assert "in colour" not in capsys.readouterr().err
    assert main(["simulate", "--fault-aware", "--dataset", str(imgs), "--backbone",
                 str(grey_bb), "--rows", "16", "--cols", "16", "--train-subset", "16",
                 "--test-subset", "16", "--epochs", "1", "--adc-bits", "8", "--backend",
                 "torch", "--device", "cpu", "--no-progress"]) == 0  # trains too: says it
    assert capsys.readouterr().err.count("in colour and were read as grayscale") == 1


def test_a_side_the_model_cannot_take_is_refused_before_any_work(tmp_path, capsys,
                                                                   monkeypatch):
    """A VGG pools its input down to nothing below 16 px, and a 5000 px side only runs the
    machine out of memory: each is a one-line error before data or pretraining, naming the
    side that works."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    imgs = _folder(tmp_path / "imgs")
    assert main(["pretrain", "--model", "vgg11_cifar", "--width", "4", "--image-size", "12",
                 "--dataset", str(imgs), "--device", "cpu", "--no-progress"]) == 2
    assert "--image-size 12: vgg11_cifar cannot take 12x12 images" in \
        (err := _one_line_error(capsys)) and "pass --image-size 16 or more" in err
    assert main(["pretrain", "--image-size", "5000", "--dataset", str(imgs), "--device",
                 "cpu"]) == 2
    assert "--image-size must be an integer in [8, 1024], got 5000" in _one_line_error(capsys)
    bb = tmp_path / "vgg.safetensors"
    assert main(["pretrain", "--model", "vgg11_cifar", "--width", "2", "--image-size", "16",
                 "--dataset", str(imgs), "--epochs", "1", "--batch-size", "4", "--augment",
                 "none", "--mixup", "0", "--device", "cpu", "--no-progress", "--out",
                 str(bb)]) == 0
    capsys.readouterr()
    for argv in (["adapt", "--dataset", str(imgs), "--backbone", str(bb), "--image-size", "8"],
                 ["simulate", "--fault-aware", "--dataset", str(imgs), "--backbone", str(bb),
                  "--image-size", "8"]):
        assert main([*argv, "--device", "cpu", "--no-progress"]) == 2, argv
        assert "vgg11_cifar cannot take 8x8 images" in _one_line_error(capsys)
    assert not (tmp_path / "cache" / "backbones").exists()


def test_image_size_below_what_a_resnet_takes_is_refused(tmp_path, capsys):
    imgs = _folder(tmp_path / "imgs")
    assert main(["adapt", "--dataset", str(imgs), "--image-size", "4", "--device", "cpu"]) == 2
    assert "--image-size must be an integer in [8, 1024], got 4" in _one_line_error(capsys)


def test_import_backbone_makes_a_users_checkpoint_usable_by_every_command(tmp_path, capsys):
    """A torchvision-format state dict (here a small 1-channel model, so the CLI's 28x28
    grayscale data fit it) becomes a backbone file that adapt, eval and cost take; a .pth given
    to --backbone directly says how to convert it, and a mismatch names the key."""
    import torch

    from xbm.models import create_model
    from xbm.train.pretrain import load_backbone

    torch.manual_seed(0)
    src = create_model("small_cnn", num_classes=7, in_channels=1, width=4)
    ckpt = tmp_path / "mine.pth"
    torch.save({"epoch": 9, "state_dict": {f"module.{k}": v for k, v in
                                           src.state_dict().items()}}, ckpt)
    bb = tmp_path / "bb.safetensors"
    assert main(["adapt", "--dataset", "x", "--backbone", str(ckpt)]) == 2
    assert "a torch checkpoint, not an xbm backbone file; convert it once with " \
           "`xbm import-backbone" in _one_line_error(capsys)
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint", str(ckpt),
                 "--out", str(bb), "--num-classes", "7", "--width", "4"]) == 0
    assert f"pass --backbone {bb}" in capsys.readouterr().out
    model, meta = load_backbone(bb)
    assert meta["arch"] == {"name": "small_cnn", "num_classes": 7, "in_channels": 1, "width": 4}
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    # never over an existing file unasked; a wrong size names the key
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint", str(ckpt),
                 "--out", str(bb)]) == 2
    assert "already exists; pass --force" in _one_line_error(capsys)
    other = tmp_path / "other.safetensors"
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint", str(ckpt),
                 "--out", str(other), "--width", "4"]) == 2  # the default 10 classes
    err = _one_line_error(capsys)
    assert "shape mismatch(es): fc.weight" in err and not other.exists()
    assert "its classifier fc.weight has 7 classes: build the model with num_classes=7, or " \
        "xbm import-backbone --num-classes 7" in err
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint", str(ckpt),
                 "--out", str(other), "--num-classes", "7"]) == 2  # the default width 8
    assert "(here: --model, --num-classes, --in-channels, --width)" in _one_line_error(capsys)
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint", str(bb),
                 "--out", str(other)]) == 2  # an xbm file's tensors are no state dict
    assert "is an xbm backbone, not a checkpoint of a model; it is one already: pass it as " \
        "--backbone" in _one_line_error(capsys) and not other.exists()
    # the file works where --backbone goes
    imgs = _folder(tmp_path / "imgs")
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", str(imgs), "--method", "xbm", "--backbone", str(bb),
                 "--rows", "16", "--cols", "16", "--out", str(bundle), "--device", "cpu",
                 "--no-progress"]) == 0
    for argv in (["eval", "--device", "cpu", "--no-progress"], ["cost"]):
        assert main([*argv, "--bundle", str(bundle)]) == 0  # found at the recorded file
    capsys.readouterr()


def test_an_imported_backbone_records_its_image_side_and_every_command_feeds_it(tmp_path,
                                                                               capsys):
    """An imported backbone recorded no side: adapt fed it 28x28 images and cost assumed 224 for
    an ImageNet layout. import-backbone now records --image-size, which adapt, eval and cost
    use; without it they agree on the family's side (224 for an ImageNet layout, 28 else)."""
    import torch

    from xbm.errors import XbmError
    from xbm.models import create_model
    from xbm.train.pretrain import import_backbone, load_backbone

    torch.manual_seed(0)
    state = create_model("small_cnn", num_classes=2, in_channels=1, width=4).state_dict()
    ckpt = tmp_path / "mine.pth"
    torch.save(state, ckpt)
    bb = tmp_path / "bb.safetensors"
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint", str(ckpt),
                 "--out", str(bb), "--num-classes", "2", "--width", "4",
                 "--image-size", "20"]) == 0
    assert "20x20 images" in capsys.readouterr().out
    assert load_backbone(bb)[1]["image_size"] == 20
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", str(_folder(tmp_path / "imgs", size=24)), "--method",
                 "xbm", "--backbone", str(bb), "--rows", "16", "--cols", "16", "--out",
                 str(bundle), "--device", "cpu", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 20
    assert main(["eval", "--bundle", str(bundle), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["image_size"] == 20
    assert main(["cost", "--backbone", str(bb), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 1, 20, 20]
    # a task that records no side (trained by a loop of the user's own) is taken at the
    # backbone's by every command: eval, cost, and adapt into its bundle
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel

    mtm = MultiTaskModel(load_backbone(bb)[0], CrossbarSpec(rows=16, cols=16))
    mtm.add_task("own", 2, "xbm", dataset=str(tmp_path / "imgs"))
    mtm.save_bundle(tmp_path / "own.safetensors")
    assert main(["eval", "--bundle", str(tmp_path / "own.safetensors"), "--json",
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["image_size"] == 20
    assert main(["cost", "--bundle", str(tmp_path / "own.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 1, 20, 20]
    assert main(["adapt", "--dataset", str(tmp_path / "imgs"), "--bundle",
                 str(tmp_path / "own.safetensors"), "--task", "next", "--device", "cpu",
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_size"] == 20
    # left out: the family's side, said
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint", str(ckpt),
                 "--out", str(tmp_path / "d.safetensors"), "--num-classes", "2",
                 "--width", "4"]) == 0
    assert "(they feed it 28x28 images: if it was trained at another side, import it again " \
        "with --image-size N)" in capsys.readouterr().out
    big = create_model("resnet18", num_classes=3, width=8).state_dict()
    meta = import_backbone("resnet18", big, tmp_path / "r.safetensors", num_classes=3, width=8)
    assert "image_size" not in meta  # the family's side applies
    assert main(["cost", "--backbone", str(tmp_path / "r.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 3, 224, 224]
    with pytest.raises(XbmError, match="--image-size must be an integer in"):
        import_backbone("small_cnn", state, tmp_path / "e.safetensors", num_classes=2,
                        width=4, image_size=4)


def test_map_takes_a_backbone_file(tmp_path, capsys):
    """cost took --backbone FILE, map wanted --model: it now maps a file's recorded
    architecture (its header alone), as --model with the same sizes does."""
    bb = _rgb_backbone_file(tmp_path / "rgb.safetensors")
    assert main(["map", "--backbone", str(bb), "--rows", "32", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(["map", "--model", "small_cnn", "--width", "4", "--in-channels", "3", "--rows",
                 "32", "--json"]) == 0
    assert got == json.loads(capsys.readouterr().out)
    for argv, said in ((["--backbone", str(bb), "--width", "8"], "--width 8 contradicts the "
                        "backbone"),
                       (["--backbone", str(bb), "--in-channels", "1"], "--in-channels 1 "
                        "contradicts the backbone"),
                       (["--backbone", str(tmp_path / "nope.safetensors")], "does not exist"),
                       ([], "pass --model NAME (e.g. resnet50) or --backbone FILE")):
        assert main(["map", *argv]) == 2
        assert said in _one_line_error(capsys)
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pth")
    assert main(["map", "--backbone", str(tmp_path / "w.pth")]) == 2
    assert "no xbm backbone file" in _one_line_error(capsys)


def test_models_lists_the_registry_with_default_sizes(capsys):
    from xbm.models import list_models

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "width", "in_channels", "num_classes"]
    assert [ln.split()[0] for ln in lines[1:]] == list_models()
    assert "resnet50" in {ln.split()[0] for ln in lines[1:] if ln.split()[-1] == "1000"}


def test_cost_takes_a_backbone_file_alone(tmp_path, capsys):
    """import-backbone says "pass --backbone FILE to xbm adapt, cost or simulate", but cost
    wanted --model or --bundle: a backbone alone now costs its recorded architecture."""
    bb = _rgb_backbone_file(tmp_path / "rgb.safetensors")
    assert main(["cost", "--backbone", str(bb), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(["cost", "--model", "small_cnn", "--width", "4", "--in-channels", "3",
                 "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert got["input_shape"] == [1, 3, 28, 28]
    assert got["mask_memory"] == want["mask_memory"] and got["methods"] == want["methods"]
    assert main(["cost", "--backbone", str(bb), "--width", "8"]) == 2
    assert "--width 8 differs from the backbone's 4; drop it" in _one_line_error(capsys)


def test_bad_input_found_by_a_fuzzing_review(tmp_path, capsys, monkeypatch):
    """Session 20's fuzzing review: each of these hung, overwrote an input, wrote a file from an
    empty flag, trained at chance with exit 0, or ended in a traceback."""
    import torch

    monkeypatch.chdir(tmp_path)
    path, bb = _folder_task_bundle(tmp_path, 2, f"folder:{_folder(tmp_path / 'imgs')}")
    before = path.read_bytes()
    cases = [
        (["pretrain", "--mixup", "inf", "--out", "x.safetensors"],
         "PretrainConfig.mixup must be a number in [0, 1000]"),
        (["adapt", "--dataset", "digits", "--seed", str(2**64)],
         "argument --seed: must be an integer in [0, 4294967295]"),
        (["simulate", "--bundle", str(path), "--backbone", str(bb), "--json-out", str(path)],
         "is the --bundle this command reads; write to another file"),
        (["simulate", "--fault-aware", "--dataset", "digits", "--out", str(path)],
         "already exists; pass a new path"),
        (["simulate", "--fault-aware", "--dataset", "digits", "--out", "z.safetensors",
          "--save-fault-map", "z.safetensors"], "are the same file z.safetensors"),
        (["simulate", "--bundle", str(path), "--backbone", str(bb), "--adc-bits", "4,4"],
         "--adc-bits lists 4 twice"),
        (["adapt", "--dataset", "digits", "--out", ""], "--out is empty"),
        (["eval", "--bundle", str(path), "--task", ""], "--task is empty"),
        (["adapt", "--dataset", "digits", "--set", "threshold=nan"],
         "threshold must be a finite number, got nan"),
        (["cost", "--model", "small_cnn", "--results", "r.json"],
         "--results feeds the accuracy axis of --plot"),
        (["cost", "--model", "small_cnn", "--backbone", str(bb)],
         "with --model it was ignored"),
        (["pretrain", "--model", "small_cnn", "--width", "10000000", "--out", "w.safetensors"],
         "does not fit in memory"),
    ]
    for argv, needle in cases:
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own refusals exit from the parser
            rc = exc.code
        assert rc == 2, argv
        err = _one_line_error(capsys)
        assert needle in err, (argv, err)
    assert path.read_bytes() == before  # no input touched
    assert not any(Path(f).exists() for f in ("x.safetensors", "z.safetensors", "w.safetensors",
                                              "digits.safetensors"))
    # import-backbone: weights that compute nothing, and an accuracy that is no percentage
    from xbm.models import create_model

    state = create_model("small_cnn", num_classes=3, in_channels=1, width=4).state_dict()
    state["features.0.weight"] = torch.full_like(state["features.0.weight"], float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    for extra, needle in (([], "holds NaN or infinite values"),
                          (["--accuracy", "150"], "--accuracy must be a top-1 percentage")):
        assert main(["import-backbone", "--model", "small_cnn", "--checkpoint", "nan.pth",
                     "--num-classes", "3", "--width", "4", "--out", "n.safetensors",
                     *extra]) == 2
        assert needle in _one_line_error(capsys)
    assert not Path("n.safetensors").exists()


def test_more_bad_files_from_the_fuzzing_review(tmp_path, capsys, monkeypatch):
    """A fault map with a broken header, a results file whose runs are not records, a cached
    backbone whose file name promises another model, a negative --fault-rate: each was a
    traceback, a file left behind, or a silent run at chance."""
    from xbm.io import load_safetensors, metadata_hash, save_safetensors

    monkeypatch.chdir(tmp_path)
    path, bb = _folder_task_bundle(tmp_path, 2, f"folder:{_folder(tmp_path / 'imgs')}")
    assert main(["simulate", "--fault-aware", "--dataset", str(tmp_path / "imgs"),
                 "--backbone", str(bb), "--rows", "16", "--cols", "16", "--epochs", "1",
                 "--adc-bits", "8", "--backend", "torch", "--save-fault-map", "fm.safetensors",
                 "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    tensors, meta = load_safetensors("fm.safetensors")
    for change in ({"spec": 5}, {"sa0_rate": "abc"}, {"seed": "x"}, {"extra": [1]}):
        # hashed again, as a tool that rewrites the header would: the fields' own checks
        save_safetensors("bad.safetensors", tensors,
                         (meta | change) | {"meta_hash": metadata_hash(meta | change)})
        assert main(["simulate", "--bundle", str(path), "--backbone", str(bb),
                     "--fault-map", "bad.safetensors", "--adc-bits", "8", "--backend", "torch",
                     "--device", "cpu", "--no-progress"]) == 2
        assert "the fault map's metadata is unreadable" in _one_line_error(capsys), change
    # results whose runs are not records: refused before any plot is written
    for runs, needle in (([1], "run 0 is not a record (got 1)"),
                         ([{"method": "xbm", "task": "a", "accuracy": 1, "mask_bits": "x"}],
                          "run 0's mask_bits is 'x', not a finite number"),
                         ([], "has no new-task runs to plot")):
        Path("r.json").write_text(json.dumps({"runs": runs}))
        assert main(["cost", "--model", "small_cnn", "--plot", "pl", "--results", "r.json"]) == 2
        assert needle in _one_line_error(capsys)
        assert not any(Path("pl").glob("*.png")) if Path("pl").exists() else True
    assert main(["simulate", "--fault-aware", "--dataset", "digits", "--fault-rate=-1"]) == 2
    assert "--fault-rate must be a fraction of cells in [0, 1], got -1" in \
        _one_line_error(capsys)
    # a cache entry named for resnet18_cifar width 16 that holds small_cnn
    from xbm.train.pretrain import PretrainConfig

    cached = tmp_path / "cache" / "backbones" / PretrainConfig(width=16).for_device(
        "cpu").cache_name()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(bb.read_bytes())
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    assert main(["adapt", "--dataset", "digits", "--width", "16", "--device", "cpu"]) == 2
    assert "holds small_cnn width 4, but its name says resnet18_cifar width 16" in \
        _one_line_error(capsys)


def test_import_backbone_names_what_is_wrong_with_an_unreadable_checkpoint(tmp_path, capsys):
    """A YAML file was said to "hold Python objects besides tensors", an empty one gave
    "EOFError", a truncated one "[Errno 22] Invalid argument"."""
    import torch

    (tmp_path / "p.yaml").write_text("a: 1\n")
    (tmp_path / "e.pth").write_bytes(b"")
    torch.save({"w": torch.zeros(10000)}, tmp_path / "t.pth")
    data = (tmp_path / "t.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(data[:len(data) // 2])
    for name, needle in (("p.yaml", "is not a torch checkpoint"), ("e.pth", "is empty"),
                         ("t.pth", "a truncated or corrupt file? copy it again")):
        assert main(["import-backbone", "--model", "small_cnn", "--checkpoint",
                     str(tmp_path / name), "--out", str(tmp_path / "o.safetensors")]) == 2
        assert needle in _one_line_error(capsys), name
    assert not (tmp_path / "o.safetensors").exists()
    # a safetensors file under another name is read as one (it was "not a torch checkpoint")
    from safetensors.torch import save_file

    from xbm.models import create_model

    sd = {k: v.half().contiguous() for k, v in create_model("small_cnn").state_dict().items()}
    for name in ("st.pth", "st.SAFETENSORS"):
        save_file(sd, str(tmp_path / name))
        out = tmp_path / f"{name}.safetensors"
        assert main(["import-backbone", "--model", "small_cnn", "--checkpoint",
                     str(tmp_path / name), "--out", str(out)]) == 0, capsys.readouterr().err
        assert out.exists()


def test_the_session_20_code_review_cases(tmp_path, capsys):
    """A task bundle given to `cost --backbone` was costed as a bare model; a 300-digit int
    crashed the finiteness check; a list as XMA2's energy_preset was a TypeError;
    `device: null` (auto) was refused by the demo config."""
    from xbm.errors import XbmError
    from xbm.methods.xma2 import XMA2Config
    from xbm.train.demo import DemoConfig

    path, _ = _folder_task_bundle(tmp_path, 2, "digits")
    assert main(["cost", "--backbone", str(path)]) == 2
    assert "this is a task bundle" in _one_line_error(capsys)
    with pytest.raises(XbmError, match="warmup_steps must be a finite number"):
        XMA2Config(warmup_steps=10**400)  # beyond any float: OverflowError before
    with pytest.raises(XbmError, match="energy_preset must be a preset name, got"):
        XMA2Config(energy_preset=["a"])
    assert DemoConfig(device=None).device is None


def test_adapt_runs_adding_to_one_bundle_at_once_keep_every_task(tmp_path, capsys, monkeypatch):
    """Two `adapt --bundle B` runs that overlap each read B, train, and save B plus their own
    task: the later save used to drop the earlier one's task. Here a second run starts and
    finishes while the first one trains (train_task is wrapped to launch it): B ends with all
    three tasks, the other run's tensors unchanged, and a clash of task names writes nothing."""
    import xbm.train as xtrain
    from xbm.io import load_safetensors

    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    common = ["--method", "xbm", "--backbone", str(bb), "--rows", "16", "--cols", "16",
              "--train-subset", "40", "--test-subset", "40", "--batch-size", "8",
              "--device", "cpu", "--no-progress", "--json"]
    assert main(["adapt", "--dataset", "digits", "--task", "first", "--bundle", str(bundle),
                 *common]) == 0
    capsys.readouterr()
    real = xtrain.train_task
    inner = {"name": "meanwhile", "tensors": None}

    def train_and_meanwhile(*a, **kw):
        out = real(*a, **kw)
        if inner["name"]:  # once: the inner run itself trains plainly
            name, inner["name"] = inner["name"], None
            assert main(["adapt", "--dataset", "digits", "--task", name, "--bundle",
                         str(bundle), "--seed", "1", *common]) == 0
            inner["tensors"] = load_safetensors(bundle)[0]
        return out

    monkeypatch.setattr(xtrain, "train_task", train_and_meanwhile)
    assert main(["adapt", "--dataset", "digits", "--task", "last", "--bundle", str(bundle),
                 *common]) == 0
    err = capsys.readouterr().err
    assert "kept task(s) meanwhile, added by another command" in err
    final = load_safetensors(bundle)[0]
    assert set(inner["tensors"]) < set(final)  # "first" and "meanwhile", and "last" besides
    assert all(torch.equal(final[k], v) for k, v in inner["tensors"].items())
    assert main(["eval", "--bundle", str(bundle), "--device", "cpu", "--json"]) == 0
    tasks = [t["task"] for t in json.loads(capsys.readouterr().out)["tasks"]]
    assert tasks == ["first", "meanwhile", "last"]

    # the same name added meanwhile: refused, and the bundle stays the other run's
    inner["name"] = "again"
    assert main(["adapt", "--dataset", "digits", "--task", "again", "--bundle", str(bundle),
                 *common]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after --json's dataset lines
    assert last.startswith("xbm: error: ") and "another command added a task named 'again'" \
        in last
    assert load_safetensors(bundle)[0].keys() == inner["tensors"].keys()


def test_adapt_holds_the_folder_lock_while_it_folds_in_and_writes(tmp_path, capsys,
                                                                  monkeypatch):
    """The fold-in only helps if no other run writes between its read and the save: adapt does
    both inside ``folder_lock`` on the bundle's folder."""
    import contextlib

    import xbm.io
    from xbm.multitask import MultiTaskModel

    held = []
    real_lock, real_save = xbm.io.folder_lock, MultiTaskModel.save_bundle

    @contextlib.contextmanager
    def recording_lock(path):
        with real_lock(path):
            held.append(Path(path).resolve().parent)
            try:
                yield
            finally:
                held.pop()

    def checked_save(self, path, tasks=None):
        assert held == [Path(path).resolve().parent], "bundle saved outside the folder lock"
        return real_save(self, path, tasks)

    monkeypatch.setattr(xbm.io, "folder_lock", recording_lock)
    monkeypatch.setattr(MultiTaskModel, "save_bundle", checked_save)
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    out = tmp_path / "sub" / "b.safetensors"  # a folder the write creates
    assert main(["adapt", "--dataset", "digits", "--method", "xbm", "--backbone", str(bb),
                 "--rows", "16", "--cols", "16", "--train-subset", "16", "--test-subset", "16",
                 "--device", "cpu", "--no-progress", "--bundle", str(out)]) == 0
    assert out.exists() and held == []


@pytest.mark.parametrize("meanwhile", ["same-backbone", "other-backbone"])
def test_a_bundle_created_meanwhile(tmp_path, capsys, monkeypatch, meanwhile):
    """Both runs start before the bundle exists. On the same backbone the second save keeps the
    first run's task and does not call itself a new bundle; on another backbone the two cannot
    share a bundle, which the error says in one line, naming what keeps the task."""
    import xbm.train as xtrain
    from xbm.multitask import read_bundle_meta

    bb, other = tmp_path / "bb.safetensors", tmp_path / "other.safetensors"
    _tiny_backbone_file(bb)
    _rgb_backbone_file(other)  # another backbone (3 channels: digits are repeated into RGB)
    bundle = tmp_path / "b.safetensors"
    common = ["--method", "xbm", "--rows", "16", "--cols", "16", "--train-subset", "16",
              "--test-subset", "16", "--device", "cpu", "--no-progress", "--json"]
    real, once = xtrain.train_task, [True]

    def train_and_meanwhile(*a, **kw):
        out = real(*a, **kw)
        if once.pop() if once else False:
            inner_bb = bb if meanwhile == "same-backbone" else other
            assert main(["adapt", "--dataset", "digits", "--task", "other", "--bundle",
                         str(bundle), "--backbone", str(inner_bb), *common]) == 0
            assert json.loads(capsys.readouterr().out)["new_bundle"] is True
        return out

    monkeypatch.setattr(xtrain, "train_task", train_and_meanwhile)
    rc = main(["adapt", "--dataset", "digits", "--task", "mine", "--bundle", str(bundle),
               "--backbone", str(bb), *common])
    if meanwhile == "same-backbone":
        assert rc == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["new_bundle"] is False
        assert [t.name for t in read_bundle_meta(bundle)[2]] == ["other", "mine"]
    else:
        assert rc == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith("xbm: error: ") and "another backbone or crossbar spec" in last \
            and "--out NEW.safetensors" in last, last
        assert [t.name for t in read_bundle_meta(bundle)[2]] == ["other"]  # the other run's


def test_cost_of_a_bundle_whose_tasks_have_different_sides(tmp_path, capsys):
    """One report has one input side: tasks learned at two are refused with the sides listed,
    and --tasks costs those of one side (the hint named --methods before, which cannot pick
    between tasks of one method)."""
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    for task, side in (("small", "16"), ("big", "20")):
        assert main(["adapt", "--dataset", "digits", "--task", task, "--bundle", str(bundle),
                     "--backbone", str(bb), "--image-size", side, "--rows", "16", "--cols",
                     "16", "--train-subset", "16", "--test-subset", "16", "--device", "cpu",
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["cost", "--bundle", str(bundle)]) == 2
    err = _one_line_error(capsys)
    assert "different image sides (16: small; 20: big)" in err and "--tasks" in err, err
    assert main(["cost", "--bundle", str(bundle), "--tasks", "big", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["input_shape"] == [1, 1, 20, 20] and list(rep["tasks"]) == ["big"]
    assert main(["cost", "--bundle", str(bundle), "--tasks", "huge"]) == 2
    assert "--tasks 'huge' has no task 'huge'" in _one_line_error(capsys)
    # a new task has no one side to follow: adapt asks for one (it took the largest before)
    third = ["adapt", "--dataset", "digits", "--task", "third", "--bundle", str(bundle),
             "--backbone", str(bb), "--rows", "16", "--cols", "16", "--train-subset", "16",
             "--test-subset", "16", "--device", "cpu", "--no-progress"]
    assert main(third) == 2
    err = _one_line_error(capsys)
    assert "tasks were learned at different image sides (16: small; 20: big); pass " \
        "--image-size" in err, err
    assert main([*third, "--image-size", "16"]) == 0
    capsys.readouterr()
    assert main(["cost", "--model", "small_cnn", "--tasks", "big"]) == 2
    assert "--tasks picks tasks of a --bundle" in _one_line_error(capsys)


def test_backbone_and_bundle_files_are_not_taken_for_each_other_as_outputs(tmp_path, capsys):
    """adapt --out on a backbone file pointed at --bundle, which then refused the backbone; and
    pretrain --force --out on a task bundle replaced its learned tasks with a backbone."""
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    before = bb.read_bytes()
    assert main(["adapt", "--dataset", "digits", "--backbone", str(bb), "--out", str(bb),
                 "--device", "cpu", "--no-progress"]) == 2
    assert f"{bb} is a backbone file; pass it as --backbone" in _one_line_error(capsys)
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", "digits", "--backbone", str(bb), "--out", str(bundle),
                 "--rows", "16", "--cols", "16", "--train-subset", "16", "--test-subset",
                 "16", "--device", "cpu", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "on 16 test images (a subset; xbm eval scores all by default)" in line, line
    kept = bundle.read_bytes()
    assert main(["pretrain", "--model", "small_cnn", "--dataset", "digits", "--force", "--out",
                 str(bundle), "--device", "cpu", "--no-progress"]) == 2
    assert "is a task bundle, not a backbone" in _one_line_error(capsys)
    assert bundle.read_bytes() == kept and bb.read_bytes() == before


def test_simulate_output_never_lands_on_the_backbone_file_a_bundle_records(tmp_path, capsys):
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    before = bb.read_bytes()
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", "digits", "--backbone", str(bb), "--out", str(bundle),
                 "--rows", "16", "--cols", "16", "--train-subset", "16", "--test-subset", "16",
                 "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["simulate", "--bundle", str(bundle), "--json-out", str(bb), "--device", "cpu",
                 "--no-progress"]) == 2
    assert "is the backbone file the --bundle records" in _one_line_error(capsys)
    assert bb.read_bytes() == before


def test_the_demo_says_up_front_when_fp32_will_take_longer():
    import torch

    from xbm.train.demo import DemoConfig, fp32_time_note

    cpu = torch.device("cpu")
    note = fp32_time_note(DemoConfig(), cpu, "fp32")
    assert note and "no native bf16 units" in note and "--epochs 1 fits in 10" in note
    assert fp32_time_note(DemoConfig(), cpu, "bf16") is None  # native bf16: within budget
    assert fp32_time_note(DemoConfig(epochs=1), cpu, "fp32") is None  # the advice taken
    assert fp32_time_note(DemoConfig(precision="fp32"), cpu, "fp32") is None  # asked for


def test_three_adapt_processes_into_one_bundle_keep_every_task(tmp_path):
    """The real thing, in three processes started together: each reads the bundle, trains and
    saves; every task is in the bundle afterwards (before the fold-in, only the last save's)."""
    import os
    import subprocess
    import sys

    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    common = ["--dataset", "digits", "--method", "xbm", "--backbone", str(bb), "--rows", "16",
              "--cols", "16", "--test-subset", "16", "--batch-size", "8", "--device", "cpu",
              "--no-progress", "--bundle", str(bundle)]
    assert main(["adapt", "--task", "first", "--train-subset", "64", *common]) == 0
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # a few seconds of training each, so that every run reads the bundle before any saves
    procs = [subprocess.Popen([sys.executable, "-m", "xbm", "adapt", "--task", f"t{i}",
                               "--seed", str(i), *common, "--train-subset", "1000",
                               "--epochs", "4"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-2000:]
            errs.append(err)
    finally:
        for p in procs:  # none left running into tmp_path if one failed
            if p.poll() is None:
                p.kill()
                p.wait()
    from xbm.multitask import read_bundle_meta

    names = [t.name for t in read_bundle_meta(bundle)[2]]
    assert names[0] == "first" and sorted(names[1:]) == ["t0", "t1", "t2"], names
    # the runs overlapped (a run read the bundle before another saved and folded that task
    # in); run one after another, they would pass the checks above without any locking
    folded = sum("added by another command while this one trained" in e for e in errs)
    if not folded:
        pytest.skip("the three runs did not overlap on this machine: inconclusive")


def test_outputs_never_replace_another_commands_file_of_another_kind(tmp_path, capsys):
    """A fuzzing review (session 21): `simulate --json-out` wrote JSON over a task bundle or a
    backbone with exit 0, and `pretrain/import-backbone --force --out` replaced a chip's fault
    map; `cost --tasks` took a task twice."""
    from xbm.hardware.faults import FaultMap
    from xbm.hardware.spec import get_spec
    from xbm.io import xbm_file_kind

    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle, other = tmp_path / "b.safetensors", tmp_path / "other.safetensors"
    common = ["--dataset", "digits", "--backbone", str(bb), "--rows", "16", "--cols", "16",
              "--train-subset", "16", "--test-subset", "16", "--device", "cpu", "--no-progress"]
    for out in (bundle, other):
        assert main(["adapt", *common, "--out", str(out)]) == 0
    capsys.readouterr()
    chip = tmp_path / "chip.safetensors"
    assert main(["simulate", "--fault-aware", *common, "--epochs", "1", "--adc-bits", "8",
                 "--backend", "torch", "--save-fault-map", str(chip)]) == 0
    capsys.readouterr()
    assert [xbm_file_kind(p) for p in (bb, bundle, chip, tmp_path / "none")] == \
        ["backbone", "task bundle", "fault map", None]
    bb2 = _rgb_backbone_file(tmp_path / "bb2.safetensors")  # a backbone the bundle does not name
    kept = {p: p.read_bytes() for p in (bb, bb2, bundle, other, chip)}
    for target, kind in ((other, "task bundle"), (bb2, "backbone")):
        assert main(["simulate", "--bundle", str(bundle), "--adc-bits", "8", "--backend",
                     "torch", "--device", "cpu", "--no-progress", "--json-out",
                     str(target)]) == 2
        assert f"--json-out {target} is a {kind}, not a results file" in _one_line_error(capsys)
    assert main(["pretrain", "--model", "small_cnn", "--dataset", "digits", "--force", "--out",
                 str(chip), "--device", "cpu", "--no-progress"]) == 2
    assert "is a fault map, not a backbone" in _one_line_error(capsys)
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert FaultMap.load(chip).spec["rows"] == get_spec(rows=16, cols=16).rows
    assert main(["cost", "--bundle", str(bundle), "--tasks", "digits,digits"]) == 2
    assert "--tasks lists digits twice" in _one_line_error(capsys)
    # a results file of its own is rewritten, as before
    res = tmp_path / "r.json"
    res.write_text('{"mode": "sweep", "rows": []}')
    assert main(["simulate", "--bundle", str(bundle), "--adc-bits", "8", "--backend", "torch",
                 "--device", "cpu", "--no-progress", "--json-out", str(res)]) == 0
    assert json.loads(res.read_text())["rows"]


@needs_data
@pytest.mark.filterwarnings("ignore:the backbone reached")
def test_demo_checks_fail_when_a_method_writes_the_backbone_or_a_task_moves(tmp_path,
                                                                            monkeypatch):
    """The demo's checks can fail: a method that writes one backbone weight at a task's end,
    and a task whose accuracy moves between its evaluations, are both caught."""
    import torch

    from xbm.methods.base import METHODS
    from xbm.methods.xbm import XBM
    from xbm.nn import CrossbarLayer
    from xbm.train import demo

    class Rogue(XBM):
        name = "rogue"

        def on_task_end(self, model, task):
            layer = next(m for m in model.modules() if isinstance(m, CrossbarLayer))
            with torch.no_grad():
                layer.weight.view(-1)[0] += 1.0

    monkeypatch.setitem(METHODS, "rogue", Rogue)
    seen: dict[str, int] = {}
    real = demo.evaluate_task

    def drifting(mtm, task, loader, device):
        seen[task] = seen.get(task, 0) + 1
        acc = real(mtm, task, loader, device)
        return acc + (1.0 if task == "mnist" and seen[task] == 2 else 0.0)

    monkeypatch.setattr(demo, "evaluate_task", drifting)
    cfg = demo.DemoConfig(methods=["rogue"], width=4, pretrain_epochs=1, pretrain_subset=256,
                          train_subset=64, test_subset=64, epochs=1, device="cpu")
    res = demo.run_demo(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert res["checks"]["rogue"]["backbone_bit_identical"] is False
    assert res["checks"]["rogue"]["earlier_tasks_unchanged"] is False
    assert demo.format_table(res).splitlines()[-1].startswith("checks: FAILED rogue:")


@needs_data
@pytest.mark.filterwarnings("ignore:the backbone reached")
def test_demo_check_sees_an_earlier_task_change_that_leaves_its_accuracy(tmp_path,
                                                                         monkeypatch):
    """earlier_tasks_unchanged compared accuracies only: a later task that nudged an earlier
    task's BatchNorm statistics by 1e-6 passed. The tasks' tensors are compared now."""
    import torch

    from xbm.train import demo

    real = demo.train_task

    def nudging(mtm, task, *args, **kwargs):
        out = real(mtm, task, *args, **kwargs)
        for t in mtm.tasks:
            if t not in (task, "base"):
                with torch.no_grad():
                    next(v for k, v in mtm.task_state_dict(t).items()
                         if k.endswith("running_mean")).add_(1e-6)
        return out

    monkeypatch.setattr(demo, "train_task", nudging)
    cfg = demo.DemoConfig(methods=["xbm"], width=4, pretrain_epochs=1, pretrain_subset=256,
                          train_subset=64, test_subset=64, epochs=1, device="cpu")
    res = demo.run_demo(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    runs = [r for r in res["runs"] if not r["base_task"]]
    assert all(r["accuracy"] == r["accuracy_after_training"] for r in runs)  # unmoved
    assert res["checks"]["xbm"]["earlier_tasks_unchanged"] is False
    assert res["checks"]["xbm"]["backbone_bit_identical"] is True


@needs_data
def test_eval_task_base_scores_the_backbone_on_its_pretraining_set(tmp_path, capsys):
    """`xbm eval --task base` scores the backbone's own task on the set it was pretrained on, at
    its side: the figure pretraining recorded (up to the odd image that the channels-last
    layout of pretraining rounds the other way), and unchanged by the bundle's tasks."""
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel
    from xbm.train.pretrain import PretrainConfig, load_backbone, pretrain

    bb = tmp_path / "bb.safetensors"
    pretrain(PretrainConfig(model="small_cnn", width=4, dataset="mnist", epochs=2,
                            train_subset=1024, batch_size=32, lr=1e-2, image_size=16,
                            augment="none", mixup=0.0), torch.device("cpu"), bb,
             progress=False,
             log=lambda *a: None)
    model, meta = load_backbone(bb)
    mtm = MultiTaskModel(model, CrossbarSpec(rows=16, cols=16), arch=meta["arch"],
                         backbone_file=bb)
    mtm.add_task("t", 10, "xbm", dataset="mnist")
    bundle = tmp_path / "b.safetensors"
    mtm.save_bundle(bundle)
    assert main(["eval", "--bundle", str(bundle), "--task", "base", "--json", "--device", "cpu",
                 "--no-progress"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)["tasks"]
    assert rec["task"] == "base" and rec["dataset"] == "mnist" and rec["test_images"] == 10_000
    assert meta["accuracy"] > 50  # a backbone that learned something, not a constant guess
    assert rec["accuracy"] == pytest.approx(meta["accuracy"], abs=0.05)
    assert main(["eval", "--bundle", str(bundle), "--task", "nope", "--device", "cpu"]) == 2
    assert "(and 'base', the backbone's own task)" in capsys.readouterr().err
    # the same weights imported: no recipe, so the side is the one its tasks were learned at
    torch.save(mtm.export_task("base").state_dict(), tmp_path / "w.pth")  # plain weights
    imported = tmp_path / "imp.safetensors"
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint",
                 str(tmp_path / "w.pth"), "--num-classes", "10", "--in-channels", "1",
                 "--width", "4", "--out", str(imported)]) == 0
    model2, meta2 = load_backbone(imported)
    mtm2 = MultiTaskModel(model2, CrossbarSpec(rows=16, cols=16), arch=meta2["arch"],
                          backbone_file=imported)
    mtm2.add_task("t", 10, "xbm", dataset="mnist")
    mtm2.tasks["t"].extra["image_size"] = 16
    bundle2 = tmp_path / "b2.safetensors"
    mtm2.save_bundle(bundle2)
    capsys.readouterr()
    assert main(["eval", "--bundle", str(bundle2), "--task", "base", "--device", "cpu"]) == 2
    assert "records no pretraining dataset" in capsys.readouterr().err
    assert main(["eval", "--bundle", str(bundle2), "--task", "base", "--dataset", "mnist",
                 "--json", "--device", "cpu", "--no-progress"]) == 0
    (rec2,) = json.loads(capsys.readouterr().out)["tasks"]
    assert rec2["accuracy"] == rec["accuracy"]  # the same weights at the same side
    # imported with --dataset imagenet: a name xbm cannot load is named as the backbone's own
    assert main(["import-backbone", "--model", "small_cnn", "--checkpoint",
                 str(tmp_path / "w.pth"), "--num-classes", "10", "--in-channels", "1",
                 "--width", "4", "--dataset", "imagenet", "--out",
                 str(tmp_path / "imp_in.safetensors")]) == 0
    model3, meta3 = load_backbone(tmp_path / "imp_in.safetensors")
    mtm3 = MultiTaskModel(model3, CrossbarSpec(rows=16, cols=16), arch=meta3["arch"],
                          backbone_file=tmp_path / "imp_in.safetensors")
    mtm3.add_task("t", 10, "xbm", dataset="mnist")
    mtm3.save_bundle(tmp_path / "b3.safetensors")
    capsys.readouterr()
    assert main(["eval", "--bundle", str(tmp_path / "b3.safetensors"), "--task", "base",
                 "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert "records its pretraining dataset as 'imagenet', which xbm cannot load" in err
    assert "pass --dataset NAME or folder:PATH" in err


def test_a_folder_named_like_a_module_method_gets_a_task_name_that_works(tmp_path, capsys):
    """A folder called train/ named its task 'train', which torch's module API owns: the
    error blamed a --task that was never passed. It is now named train-task."""
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    imgs = _folder(tmp_path / "train")
    out = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", f"folder:{imgs}", "--backbone", str(bb), "--rows", "16",
                 "--cols", "16", "--batch-size", "4", "--out", str(out), "--device", "cpu",
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "train-task"
    assert main(["adapt", "--dataset", f"folder:{imgs}", "--task", "train", "--backbone",
                 str(bb), "--rows", "16", "--cols", "16", "--out", str(tmp_path / "c.st"),
                 "--device", "cpu", "--no-progress"]) == 2
    assert "--task 'train' is taken by torch's module API" in _one_line_error(capsys)


@pytest.mark.parametrize("line, said", [
    ("pretrain_augment: off", "demo pretrain_augment: unknown augmentation 'off'"),
    ("pretrain_precision: fp16", "demo pretrain_precision: unknown pretraining precision"),
    ("pretrain_mixup: -1", "demo pretrain_mixup: PretrainConfig.mixup must be"),
    ("device: gpu", "demo device: invalid device 'gpu'"),
    ("methods: [xbm, nope]", "demo methods: unknown method 'nope'"),
    ("benchmark: nope", "demo benchmark: unknown benchmark 'nope'"),
    ("model: nope", "demo model: unknown model 'nope'"),
])
def test_a_demo_config_name_error_names_the_field_and_the_file(tmp_path, capsys, monkeypatch,
                                                              line, said):
    """"unknown augmentation 'off'" alone (YAML 1.1 reads `off` as false elsewhere, so the
    docs warn about it) did not say which field or file held it."""
    import xbm.train.pretrain as pt

    monkeypatch.setattr(pt, "get_backbone", lambda *a, **k: pytest.fail("got that far"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(line + "\n")
    assert main(["demo", "--config", str(cfg), "--out", str(tmp_path / "d")]) == 2
    err = _one_line_error(capsys)
    assert said in err and err.endswith(f"(in --config {cfg})")
    if "unknown" in said and "augmentation" not in said and "precision" not in said:
        assert "; one of your own: pass --plugin MODULE" in err  # the registries' hint stays


def test_a_demo_flags_name_error_names_the_flag(tmp_path, capsys):
    """Typed as a flag, the demo field's name gives way to the flag's."""
    out = str(tmp_path / "d")
    assert main(["demo", "--device", "gpu", "--out", out]) == 2
    assert _one_line_error(capsys).startswith("xbm: error: --device: invalid device 'gpu'")
    assert main(["demo", "--methods", "xbm,nope", "--out", out]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("xbm: error: --methods: unknown method 'nope'")
    assert err.endswith("; one of your own: pass --plugin MODULE, the module that registers it")


def test_demo_refuses_a_results_file_it_would_clobber(tmp_path, capsys, monkeypatch):
    """results.json is written through a symbolic link: a link to a bundle was overwritten with
    the results (exit 0); a folder there failed only after the whole run."""
    import os

    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "b.safetensors"
    victim.write_bytes(b"precious")
    (out / "results.json").symlink_to(victim)
    argv = ["demo", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    assert "is a symbolic link" in _one_line_error(capsys)
    assert victim.read_bytes() == b"precious"
    os.unlink(out / "results.json")
    (out / "results.json").mkdir()
    assert main(argv) == 2
    assert "results.json is a folder" in _one_line_error(capsys)
    (out / "results.json").rmdir()
    (out / "results.json").write_text("notes of mine")
    assert main(argv) == 2
    assert "exists and is not an xbm demo results file" in _one_line_error(capsys)
    assert (out / "results.json").read_text() == "notes of mine"
    # an earlier run's results are replaced, as they always were, but not unsaid; and not by
    # a run that refuses its arguments
    (out / "results.json").write_text('{"runs": []}')
    assert main([*argv, "--methods", "nope"]) == 2
    assert "holds an earlier run's results" not in capsys.readouterr().out
    import xbm.data
    from xbm.errors import XbmError

    def stop(*a, **k):
        raise XbmError("stopped at the datasets")

    monkeypatch.setattr(xbm.data, "load_dataset", stop)
    assert main(argv) == 2  # stops right after the note
    assert "holds an earlier run's results; this run replaces them when it ends" in \
        capsys.readouterr().out


@pytest.mark.parametrize("argv,says", [
    (["pretrain", "--model", "small_cnn", "--mixup", "1e308"], "mixup must be a number in [0, "
     "1000]"),
    (["pretrain", "--model", "small_cnn", "--lr", "1e38"], "lr must be a number in (0, 1000]"),
    (["map", "--model", "small_cnn", "--rows", "1099511627776"],
     "CrossbarSpec.rows must be at most 65536"),
    (["map", "--model", "small_cnn", "--width", "99999999999999999999999"],
     "does not fit in memory"),
])
def test_values_far_past_any_run_are_refused(argv, says, capsys, tmp_path, monkeypatch):
    """mixup 1e308 hung pretraining forever (Beta sampling), lr 1e38 overflowed inside Adam,
    2^40 crossbar rows and a 23-digit width ended in tracebacks."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 2
    assert says in _one_line_error(capsys)


def test_method_learning_rates_and_xma_scores_are_bounded():
    from xbm.errors import ConfigError
    from xbm.methods import get_method_class

    with pytest.raises(ConfigError, match="lr must be at most 1e3"):
        get_method_class("xbm").config_class(lr=1e38)
    with pytest.raises(ConfigError, match="score_init must be a finite number within"):
        get_method_class("xma").config_class(score_init=1e308)


@needs_data
def test_demo_checks_subsets_model_and_cache_before_pretraining(tmp_path, capsys, monkeypatch):
    """An oversized --pretrain-subset was refused only inside pretraining and named
    --train-subset; an unwritable cache failed after the minutes of pretraining; a task's
    oversized subset was used whole without a word; an unknown model in the config failed
    after the datasets were read."""
    import xbm.train.pretrain as pt

    def no_pretraining(*a, **k):
        raise AssertionError("pretrained before the checks")

    monkeypatch.setattr(pt, "pretrain", no_pretraining)
    out = tmp_path / "run"
    argv = ["demo", "--out", str(out), *TINY]
    assert main([*argv, "--pretrain-subset", "60001"]) == 2
    err = _one_line_error(capsys)
    assert "pretrain_subset (--pretrain-subset) 60001 exceeds the 60,000 training images of " \
        "fashion-mnist" in err and "--train-subset" not in err
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model: resnet9000\n")
    calls = []
    import xbm.data as xdata

    real = xdata.load_dataset
    monkeypatch.setattr(xdata, "load_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main([*argv, "--config", str(cfg)]) == 2
    assert "unknown model 'resnet9000'" in _one_line_error(capsys) and calls == []
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    monkeypatch.setenv("XBM_CACHE", str(blocker))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the letters cache's warning
    assert err.startswith("xbm: error: ")
    assert "the backbone cache ($XBM_CACHE):" in err and "is a file" in err and \
        err.endswith("set XBM_CACHE to a writable folder")
    assert main(["pretrain", "--model", "small_cnn", "--epochs", "1", "--no-progress"]) == 2
    assert _one_line_error(capsys).endswith("set XBM_CACHE to a writable folder, or pass "
                                            "--out FILE")
    # a subset larger than a task's set: the run says which sets are used whole (checked
    # before the backbone is sought, so the stubbed pretraining shows it came first)
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssertionError, match="pretrained before the checks"):
        main(["demo", "--out", str(out), *TINY, "--train-subset", "9000", "--test-subset",
              "2500"])
    printed = capsys.readouterr().out
    assert "note: --train-subset 9000 is more than animal-mnist's 8,000 training images: all " \
        "of them are used; --test-subset 2500 is more than animal-mnist's 2,000 test images" \
        in printed
    assert "mnist's 60,000" not in printed  # MNIST has that many: not listed


def test_input_files_say_folder_dangling_link_or_missing_and_read_dev_null(tmp_path):
    """A folder given as --checkpoint, a dangling link or /dev/null were all said "does not
    exist". /dev/null is the empty file (a config with no fields), a pipe is read as text."""
    import os

    from xbm.cli import _load_yaml
    from xbm.errors import XbmError
    from xbm.hardware.energy import load_preset_file
    from xbm.models.checkpoint import _read
    from xbm.report.plots import load_results

    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "gone.yaml")
    readers = (_load_yaml, load_preset_file, lambda p: _read(Path(p)), load_results)
    for read in readers:
        for path, says in ((tmp_path, "is a folder"), (tmp_path / "none", "does not exist"),
                           (link, f"is a symbolic link to {tmp_path / 'gone.yaml'}, which does "
                            "not exist")):
            with pytest.raises(XbmError) as info:
                read(str(path))
            msg = str(info.value).replace(repr(str(path)), str(path))  # checkpoint quotes
            assert f"{path} {says}; " in msg, msg
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    with pytest.raises(XbmError, match="is a loop of symbolic links; pass"):
        _load_yaml(str(loop))
    # a ~ path from Python is read as the shell would read it (it raised FileNotFoundError)
    home = tmp_path / "home"
    home.mkdir()
    (home / "c.yaml").write_text("epochs: 2\n")
    import unittest.mock

    with unittest.mock.patch.dict(os.environ, {"HOME": str(home)}):
        assert _load_yaml("~/c.yaml") == {"epochs": 2}
        with pytest.raises(XbmError, match="results file ~/c.yaml is not valid JSON"):
            load_results("~/c.yaml")
    assert _load_yaml(os.devnull) == {}
    with pytest.raises(XbmError, match="is empty"):
        _read(Path(os.devnull))
    r, w = os.pipe()
    os.write(w, b"epochs: 3\n")
    os.close(w)
    try:
        assert _load_yaml(f"/dev/fd/{r}") == {"epochs": 3}
    finally:
        os.close(r)


def test_eval_base_refuses_a_renamed_class_of_the_pretraining_folder(tmp_path, capsys,
                                                                     monkeypatch):
    """A backbone pretrained on an image folder recorded no class names: after cat/ became
    zcat/ the labels swapped and `eval --task base` scored 0% with exit 0."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    imgs = _folder(tmp_path / "imgs", n=8)
    bb = tmp_path / "bb.safetensors"
    run = ["--device", "cpu", "--no-progress"]
    assert main(["pretrain", "--model", "small_cnn", "--width", "2", "--dataset",
                 f"folder:{imgs}", "--epochs", "1", "--batch-size", "4", "--augment", "none",
                 "--mixup", "0", "--out", str(bb), *run]) == 0
    from xbm.train.pretrain import load_backbone

    assert load_backbone(bb)[1]["classes"] == ["cat", "dog"]
    bundle = tmp_path / "b.safetensors"
    assert main(["adapt", "--dataset", f"folder:{imgs}", "--method", "xbm", "--backbone",
                 str(bb), "--out", str(bundle), "--batch-size", "4", "--rows", "16", "--cols",
                 "16", *run]) == 0
    ev = ["eval", "--bundle", str(bundle), "--backbone", str(bb), "--task", "base", *run]
    assert main(ev) == 0
    capsys.readouterr()
    (imgs / "cat").rename(imgs / "zcat")
    assert main(ev) == 2
    err = _one_line_error(capsys)
    assert "the backbone was pretrained on the classes ['cat', 'dog'], but folder:" in err and \
        "has ['dog', 'zcat']; its labels would not match: restore the class names" in err


def test_a_data_root_an_image_folder_never_reads_is_said(tmp_path, capsys, monkeypatch):
    """--data-root beside an image folder was dropped without a word, and a folder named by
    its name inside the root was an "unknown dataset" with no hint."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    imgs = _folder(tmp_path / "root" / "pets")
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    argv = ["adapt", "--method", "xbm", "--backbone", str(bb), "--rows", "16", "--cols", "16",
            "--batch-size", "4", "--device", "cpu", "--no-progress", "--data-root",
            str(tmp_path / "root"), "--out", str(tmp_path / "b.safetensors")]
    assert main([*argv, "--dataset", "pets"]) == 2
    assert "unknown dataset 'pets'; choose one of: " in (err := _one_line_error(capsys)) and \
        f"; {imgs} is a folder: pass folder:{imgs} (a data root holds" in err
    assert main([*argv, "--dataset", f"folder:{imgs}"]) == 0
    assert f"xbm: warning: --data-root {tmp_path / 'root'} is not read: --dataset " \
        f"folder:{imgs} is an image folder, read from its own path" in capsys.readouterr().err
    # eval reads each task's own dataset: the root is said per task (it was dropped silently)
    ev = ["eval", "--bundle", str(tmp_path / "b.safetensors"), "--backbone", str(bb),
          "--device", "cpu", "--no-progress", "--data-root", str(tmp_path / "root")]
    assert main(ev) == 0
    assert f"xbm: warning: --data-root {tmp_path / 'root'} is not read for task 'pets': " \
        f"--dataset folder:{imgs} is an image folder" in capsys.readouterr().err
    assert main([*ev, "--task", "base", "--dataset", "digits"]) == 2  # the tiny head has 3
    assert f"xbm: warning: --data-root {tmp_path / 'root'} is not read for the base task: " \
        "--dataset digits is read from its installed package" in capsys.readouterr().err


def test_adapt_refuses_task_base_before_the_data_and_renames_a_folder_called_base(
        tmp_path, capsys, monkeypatch):
    """--task base was refused by add_task, after the data loaded (and, without --backbone,
    after the default backbone was pretrained); a folder named base/ took the same name."""
    import xbm.data

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    loaded = []
    real = xbm.data.load_dataset
    monkeypatch.setattr(xbm.data, "load_dataset", lambda *a, **k: loaded.append(a) or
                        real(*a, **k))
    assert main(["adapt", "--dataset", "mnist", "--method", "xbm", "--task", "base",
                 "--device", "cpu", "--no-progress"]) == 2
    assert "--task 'base' is reserved for the pretrained backbone's own task" in \
        _one_line_error(capsys) and loaded == []
    imgs = _folder(tmp_path / "base")
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    assert main(["adapt", "--dataset", f"folder:{imgs}", "--method", "xbm", "--backbone",
                 str(bb), "--rows", "16", "--cols", "16", "--batch-size", "4", "--device",
                 "cpu", "--no-progress", "--out", str(tmp_path / "b.safetensors"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "base-task"


def test_eval_base_takes_the_bundles_recipe_for_an_imported_copy_of_its_backbone(
        tmp_path, capsys, monkeypatch):
    """An imported copy of the same weights (same hash) records no recipe: after adapting on
    it, eval --task base said the backbone records no pretraining dataset, although the
    bundle kept the recipe it was learned with."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    run = ["--device", "cpu", "--no-progress"]
    bb = tmp_path / "bb.safetensors"
    assert main(["pretrain", "--model", "small_cnn", "--width", "2", "--dataset", "digits",
                 "--epochs", "1", "--out", str(bb), *run]) == 0
    from xbm.train.pretrain import load_backbone

    model, _ = load_backbone(bb)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    imp = tmp_path / "imp.safetensors"
    assert main(["import-backbone", "--model", "small_cnn", "--width", "2", "--in-channels",
                 "1", "--num-classes", "10", "--checkpoint", str(tmp_path / "w.pth"), "--out",
                 str(imp)]) == 0
    bundle = tmp_path / "b.safetensors"
    common = ["--method", "xbm", "--rows", "16", "--cols", "16", "--train-subset", "64",
              "--test-subset", "32", "--bundle", str(bundle), *run]
    assert main(["adapt", "--dataset", "digits", "--task", "one", "--backbone", str(bb),
                 *common]) == 0
    assert main(["adapt", "--dataset", "digits", "--task", "two", "--backbone", str(imp),
                 *common]) == 0
    capsys.readouterr()
    assert main(["eval", "--bundle", str(bundle), "--backbone", str(imp), "--task", "base",
                 "--test-subset", "32", "--json", *run]) == 0
    row = json.loads(capsys.readouterr().out)["tasks"][0]
    assert row["task"] == "base" and row["dataset"] == "digits"


def test_cli_fuzz_findings_of_session_27(tmp_path, capsys, monkeypatch):
    """weight_decay 1e39 overflowed inside Adam (a traceback); a results.json whose backbone
    is not a mapping crashed cost --plot; --plot naming another output failed after the run;
    --chip-seed took -1; a method-config file holding 0 or [] ran as {}; a dangling link
    given as --bundle was "no such file"."""
    from xbm.errors import XbmError
    from xbm.methods.xbm import XBMConfig

    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(XbmError, match=r"weight_decay must be a number in \[0, 1e3\]"):
        XBMConfig(weight_decay=1e39)
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"backbone": "abc", "runs": [
        {"method": "xbm", "task": "a", "base_task": False, "accuracy": 50.0, "mask_bits": 8}]}))
    assert main(["cost", "--model", "small_cnn", "--plot", str(tmp_path / "p"), "--results",
                 str(res)]) == 2
    assert "backbone is 'abc', not a mapping" in _one_line_error(capsys)
    assert not any((tmp_path / "p").glob("*.png")) if (tmp_path / "p").exists() else True
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    out = tmp_path / "same"
    assert main(["simulate", "--fault-aware", "--dataset", "digits", "--backbone", str(bb),
                 "--json-out", str(out), "--plot", str(out), "--device", "cpu"]) == 2
    assert f"--plot {out} is also the --json-out" in _one_line_error(capsys)
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal, as --seed -1 gets
        main(["simulate", "--bundle", str(bb), "--chip-seed", "-1"])
    assert stop.value.code == 2
    assert "--chip-seed: must be an integer in [0, " in capsys.readouterr().err
    for text in ("0\n", "[]\n", "false\n"):
        mc = tmp_path / "mc.yaml"
        mc.write_text(text)
        assert main(["adapt", "--dataset", "digits", "--method", "xbm", "--backbone", str(bb),
                     "--method-config", str(mc), "--device", "cpu"]) == 2
        assert "must hold a mapping of field: value" in _one_line_error(capsys)
    link = tmp_path / "gone.safetensors"
    link.symlink_to(tmp_path / "nothing.safetensors")
    assert main(["eval", "--bundle", str(link), "--device", "cpu"]) == 2
    assert "is a symbolic link to" in _one_line_error(capsys)
    # --plot with nothing to plot (no ADC axis under --adc-mode ideal, one fault rate) said so
    path, bb2 = _folder_task_bundle(tmp_path, 2, f"folder:{_folder(tmp_path / 'imgs')}")
    assert main(["simulate", "--bundle", str(path), "--backbone", str(bb2), "--adc-mode",
                 "ideal", "--plot", str(tmp_path / "pl"), "--backend", "torch", "--device",
                 "cpu", "--no-progress"]) == 0
    assert f"xbm: warning: --plot {tmp_path / 'pl'}: nothing to plot" in capsys.readouterr().err


def test_simulate_draws_a_tasks_test_subset_as_eval_does(tmp_path, capsys, monkeypatch):
    """adapt --seed 3 and eval scored the same images; simulate drew its --test-subset with
    seed 0, so its ideal row differed from both (12.50% against 11.72% in a review's run)."""
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    bundle = tmp_path / "b.safetensors"
    common = ["--backbone", str(bb), "--device", "cpu", "--test-subset", "60"]
    assert main(["adapt", "--dataset", "digits", "--method", "xbm", "--out", str(bundle),
                 "--seed", "3", "--train-subset", "64", "--batch-size", "16", "--rows", "16",
                 "--cols", "16", "--no-progress", "--json", *common]) == 0
    capsys.readouterr()
    from xbm.data.task import TaskData

    seeds: list[int] = []  # the seed each command draws its 60 test images with
    real = TaskData.subset
    monkeypatch.setattr(TaskData, "subset", lambda self, train=None, test=None, seed=0, **kw: (
        seeds.append(seed) if test == 60 else None) or real(self, train, test, seed, **kw))
    assert main(["eval", "--bundle", str(bundle), "--json", *common]) == 0
    assert main(["simulate", "--bundle", str(bundle), "--adc-mode", "ideal", "--json",
                 "--backend", "torch", "--no-progress", *common]) == 0
    assert seeds == [3, 3]  # adapt's --seed, recorded in the bundle
    assert main(["simulate", "--bundle", str(bundle), "--adc-mode", "ideal", "--json",
                 "--backend", "torch", "--no-progress", "--seed", "5", *common]) == 0
    assert seeds == [3, 3, 5]  # a seed given is the seed used
    capsys.readouterr()


_PLUGIN = '''
from dataclasses import dataclass

from xbm.data import make_fixture_task, register_dataset
from xbm.methods import register_method
from xbm.methods.xbm import XBM, XBMConfig


@dataclass
class HiConfig(XBMConfig):
    threshold: float = 9e-3


@register_method("xbm-hi")
class XBMHi(XBM):
    config_class = HiConfig
    description = "XBM at a higher threshold (a plugin)"


@register_dataset("quadrants", reads_root=False)
def _quadrants(root, seed):
    return make_fixture_task("quadrants", 3, 24, 12, seed)
'''


def test_plugins_register_methods_and_datasets_for_the_cli(tmp_path, capsys, monkeypatch):
    """A method or dataset registered in the user's module could be used from Python only: the
    CLI said "unknown method" and a bundle of it "import the module that registers it", which
    a command-line user had no way to do. --plugin MODULE / XBM_PLUGINS import it first."""
    import sys

    from xbm.data import registry
    from xbm.methods import base

    monkeypatch.setattr(base, "METHODS", dict(base.METHODS))
    monkeypatch.setattr("xbm.methods.METHODS", base.METHODS, raising=False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_NO_ROOT", set(registry._NO_ROOT))
    for name in [m for m in sys.modules if m.startswith(("xbm_plugin_my_methods",
                                                          "my_methods"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_methods.py").write_text(_PLUGIN)
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    assert main(["adapt", "--dataset", "quadrants", "--method", "xbm-hi", "--backbone", str(bb),
                 "--no-progress"]) == 2
    assert "unknown method 'xbm-hi'; choose one of: " in (err := _one_line_error(capsys)) and \
        err.endswith("; one of your own: pass --plugin MODULE, the module that registers it")
    # after the sub-command, as a file's path
    argv = ["adapt", "--dataset", "quadrants", "--method", "xbm-hi", "--backbone", str(bb),
            "--rows", "16", "--cols", "16", "--batch-size", "4", "--device", "cpu",
            "--no-progress", "--out", "b.safetensors", "--json"]
    assert main([*argv, "--plugin", str(tmp_path / "my_methods.py")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert (rec["method"], rec["task"]) == ("xbm-hi", "quadrants")
    # a fresh process would not know the method: XBM_PLUGINS names the module by its name
    del base.METHODS["xbm-hi"], registry._REGISTRY["quadrants"]  # the copies made above
    for name in [m for m in sys.modules if m.startswith("xbm_plugin_my_methods")]:
        monkeypatch.delitem(sys.modules, name)
    ev = ["eval", "--bundle", "b.safetensors", "--backbone", str(bb), "--device", "cpu",
          "--no-progress"]
    assert main(ev) == 2
    assert "which is not registered in this process; pass --plugin MODULE" in \
        _one_line_error(capsys)
    monkeypatch.setenv("XBM_PLUGINS", "my_methods")
    assert main(ev) == 0
    assert "quadrants" in capsys.readouterr().out
    monkeypatch.delenv("XBM_PLUGINS")
    # before the sub-command: `xbm --plugin M methods` lists what it registers
    assert main(["--plugin", "my_methods", "methods"]) == 0
    assert "xbm-hi" in capsys.readouterr().out
    # a plugin that prints when imported: on stderr, so --json output stays one document
    (tmp_path / "loud.py").write_text("print('loud plugin loaded')\n")
    assert main(["--plugin", "loud", "map", "--model", "small_cnn", "--json"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["model"]["name"] == "small_cnn" and "loud plugin" in got.err
    # a missing module, a broken one, a missing file: one line each
    (tmp_path / "broken.py").write_text("raise RuntimeError('oops')\n")
    for plugin, needle in (("nope_mod", "plugin nope_mod: no module named 'nope_mod'; run xbm "
                            "from the folder that holds it"),
                           ("broken", "plugin broken failed to import: RuntimeError: oops"),
                           ("./gone.py", "plugin ./gone.py: no such file")):
        assert main(["--plugin", plugin, "methods"]) == 2
        assert needle in _one_line_error(capsys)
    assert main(["methods", "--plugin"]) == 2
    assert "--plugin needs a module name" in _one_line_error(capsys)
    # a broken XBM_PLUGINS no longer hides the help that would tell how to fix it
    monkeypatch.setenv("XBM_PLUGINS", "nope_mod")
    for argv in (["--help"], ["map", "-h"], ["--version"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        got = capsys.readouterr()
        assert got.out and "xbm: warning: plugin nope_mod: no module named" in got.err
        assert "(ignored for --help and --version" in got.err
    assert main(["methods"]) == 2  # every other command still stops
    assert "plugin nope_mod: no module named" in _one_line_error(capsys)


def test_adapt_says_when_a_datasets_images_are_fed_at_another_side(tmp_path, capsys,
                                                                    monkeypatch):
    """A dataset stored at 20x20 was resized to the backbone's 28 in every batch; only --json
    said image_size 28."""
    from xbm.data import make_fixture_task, register_dataset, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_dataset("small20")(lambda root, seed: make_fixture_task("small20", 3, 24, 12, seed,
                                                                     image_size=20))
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    bb = tmp_path / "bb.safetensors"
    _tiny_backbone_file(bb)
    argv = ["adapt", "--dataset", "small20", "--method", "xbm", "--backbone", str(bb), "--rows",
            "16", "--cols", "16", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a.safetensors")]) == 0
    assert "small20: 24 training and 12 test images, 3 classes (stored 20x20, fed at 28x28; " \
        "--image-size N feeds another side)" in capsys.readouterr().out
    assert main([*argv, "--image-size", "20", "--out", str(tmp_path / "b.safetensors")]) == 0
    assert "3 classes\n" in capsys.readouterr().out  # fed as stored: nothing to say


def test_eval_takes_a_colour_tasks_fingerprint_of_either_form(monkeypatch):
    """Bundles before session 29 recorded the first channel's fingerprint; the full one covers
    every channel. Either recorded form of the same images is quiet, an edit in another
    channel is said."""
    import argparse
    import types
    import warnings

    import torch

    from xbm.cli import _task_data
    from xbm.data import TaskData, register_dataset, registry

    x = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    x[:, 0], x[:, 1:] = 10, 40
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    edited = x.clone()
    edited[0, 2, 0, 0] = 250
    images = {"test": x}
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_dataset("rgb6", reads_root=False)(
        lambda root, seed: TaskData("rgb6", x, y, images["test"], y, ["a", "b"]))
    same = TaskData("rgb6", x, y, x, y, ["a", "b"])
    args = argparse.Namespace(dataset=None, data_root=None)
    for recorded, changed, said in (
            (same.test_fingerprint(), x, False),
            (same.test_fingerprint(first_channel_only=True), x, False),  # a pre-29 bundle
            (same.test_fingerprint(), edited, True)):
        images["test"] = changed
        task = types.SimpleNamespace(name="t", dataset="rgb6", num_classes=2, extra={
            "classes": ["a", "b"], "test_fingerprint": recorded})
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            _task_data(args, task, None, None, 0, channels=3)
        assert any("are not those it was adapted with" in str(w.message) for w in got) is said
