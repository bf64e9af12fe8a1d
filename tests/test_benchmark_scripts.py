"""The benchmark scripts in benchmarks/ run (tiny sizes) and report what they promise, so they do
not rot between the sessions that measure with them."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_methods_tiny(tmp_path, capfd):
    out = tmp_path / "b.json"
    rc = _load("bench_methods").main(
        ["--width", "2", "--batch", "4", "--size", "8", "--reps", "2", "--threads", "1",
         "--methods", "linear-probe,piggyback,xbm", "--count-ops", "--json", str(out)])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"linear-probe", "piggyback", "xbm"}
    # XBM trains one score per crossbar column: far less state than Piggyback's per weight
    assert 0 < rows["xbm"]["state_bytes"] < rows["piggyback"]["state_bytes"] / 10
    assert rows["linear-probe"]["state_bytes"] == 0 and rows["xbm"]["vs_frozen"] > 0
    assert all(r["ops"] > r["compute_ops"] > 0 for r in rows.values())
    # the profiler's own C++ chatter (Kineto's USDT lines) is kept off stderr
    assert "USDT" not in capfd.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_methods_cuda_graph_needs_cuda(capsys):
    with pytest.raises(SystemExit) as info:
        _load("bench_methods").main(["--cuda-graph", "--methods", "xbm"])
    assert info.value.code == 2 and "--cuda-graph needs --device cuda" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run (a GPU runs the check)")
def test_graph_step_check_dry_run(capsys):
    rc = _load("graph_step_check").main(["--device", "cpu", "--methods", "piggyback,xbm",
                                         "--width", "2", "--batch", "4", "--replays", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "xbm:" in out and "replay 2:" in out
    assert "0.000e+00 (bit-identical) on cpu (no CUDA: both ran eagerly)" in out


def test_graph_step_check_dry_run_through_xma2s_warm_up(capsys):
    """XMA2 selects its PEs after its own warm-up (10 steps), which a replay would skip, so the
    script now steps eagerly past it before a capture (checked for graph_ready on CUDA; here the
    dry run only shows the longer schedule runs)."""
    rc = _load("graph_step_check").main(["--device", "cpu", "--methods", "xma2", "--width",
                                         "2", "--batch", "4", "--replays", "1"])
    assert rc == 0 and "xma2:" in capsys.readouterr().out


def test_bench_partial_sums_tiny(capsys):
    mod = _load("bench_partial_sums")
    assert mod.main(["--reps", "2", "--threads", "1", "--batch", "2", "--cin", "4", "--cout",
                     "4", "--size", "5"]) in (0, None)
    out = capsys.readouterr().out
    assert all(name in out for name in ("frozen", "weight-mask", "partial-sums"))
    with pytest.raises(SystemExit):  # an even kernel changes the output size: refused
        mod.main(["--k", "2"])
    assert "--k must be an odd kernel size" in capsys.readouterr().err


def test_bench_simulate_tiny(tmp_path):
    out = tmp_path / "s.json"
    _load("bench_simulate").main(["--batch", "2", "--reps", "1", "--threads", "1",
                                  "--backends", "torch", "--configs", "a", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["ratio_to_plain"]["plain"] == 1.0 and res["ratio_to_plain"]["a/torch"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run (a GPU runs the probe)")
def test_graph_probe_dry_run(tmp_path):
    import subprocess
    import sys

    root = BENCH.parent
    res = subprocess.run([sys.executable, str(BENCH / "graph_probe.py"), "--src",
                          str(root / "src"), "--out", str(tmp_path), "--methods", "xbm",
                          "--variants", "as_test,native"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "graph_probe.json").read_text())["summary"]
    assert set(summary) == {"xbm/as_test", "xbm/native"}
    for v in summary.values():  # without CUDA both sides ran eagerly: nothing may differ
        assert v["end_vs_capturable"][0] == 0 and v["first"] is None


def _fake_results(path: Path, seed: int, acc: dict[str, float], **config) -> Path:
    path.mkdir(parents=True)
    res = {"config": {"seed": seed, "width": 16, "methods": list(acc)} | config,
           "backbone": {"content_hash": f"h{seed}", "accuracy": 88.0},
           "summary": {m: {"mean_new_task_accuracy": a, "new_task_accuracies": {"t": a}}
                       for m, a in acc.items()},
           "checks": {m: {"backbone_bit_identical": True} for m in acc}}
    (path / "results.json").write_text(json.dumps(res))
    return path


def test_demo_seeds_summarizes_gaps_over_seeds(tmp_path, capsys):
    mod = _load("demo_seeds")
    assert mod.parse_seeds("0-2,5") == [0, 1, 2, 5]
    for bad in ("1-0", "x", "-1", "0,0"):
        with pytest.raises(mod.XbmError, match="--seeds"):
            mod.parse_seeds(bad)
    dirs = [_fake_results(tmp_path / f"s{s}", s, {"piggyback": pb, "xbm": x})
            for s, pb, x in [(0, 98.0, 96.5), (1, 98.0, 95.5), (2, 97.0, 96.0)]]
    out = tmp_path / "out"
    assert mod.main(["--summarize", *map(str, dirs), "--out", str(out)]) == 0
    summary = json.loads((out / "seeds.json").read_text())
    gap = summary["stats"]["xbm"]["gap"]
    assert [r["gap"]["xbm"] for r in summary["rows"]] == [-1.5, -2.5, -1.0]
    assert gap["mean"] == pytest.approx(-5 / 3, abs=1e-4)
    assert gap["std"] == pytest.approx(0.7638, abs=1e-4)
    assert (gap["min"], gap["within"], gap["at_least_ref"]) == (-2.5, 2, 0)
    md = (out / "seeds.md").read_text()
    assert "| 1 | seed 1 | 98.00 | 95.50 | -2.50 | all true |" in md
    assert "2 of 3" in md and md == capsys.readouterr().out
    # every row has the header's cell count, with the reference alone too (no gap rows then)
    for table in (md, mod.to_markdown(mod.summarize([
            mod.load_results(_fake_results(tmp_path / f"pb{s}", s, {"piggyback": 97.0 + s}))
            for s in (0, 1)]))):
        counts = {ln.count("|") for ln in table.splitlines() if ln.startswith("|")}
        assert len(counts) == 1, table
    assert "gap ≥ 0" not in table and "| **mean** |" in table
    # runs that differ beyond the seed (here the width) would not be comparable: refused
    other = _fake_results(tmp_path / "w32", 3, {"piggyback": 97.0, "xbm": 96.0}, width=32)
    assert mod.main(["--summarize", str(dirs[0]), str(other)]) == 2
    err = capsys.readouterr().err
    assert "differs from" in err and "in width;" in err and len(err.splitlines()) == 1
    with pytest.raises(mod.XbmError, match="in width"):
        mod.summarize([mod.load_results(dirs[0]), mod.load_results(other)])
    # the device: as given before session 30 (auto), resolved since; compared by its type
    dev = [_fake_results(tmp_path / f"d{s}", s, {"piggyback": 97.0}, device=d)
           for s, d in enumerate(("auto", "cpu", "cuda", "cuda:0"))]
    mod.summarize([mod.load_results(d) for d in dev[:2]])
    mod.summarize([mod.load_results(d) for d in dev[2:]])
    with pytest.raises(mod.XbmError, match="in device"):
        mod.summarize([mod.load_results(d) for d in dev[1:3]])
    assert mod.main(["--summarize", str(dirs[0]), "--methods", "xbm"]) == 2
    assert "--methods cannot apply to --summarize" in capsys.readouterr().err
    with pytest.raises(mod.XbmError, match="--ref finetune was not run"):
        mod.summarize([mod.load_results(d) for d in dirs], ref="finetune")
    with pytest.raises(mod.XbmError, match="not a demo results.json"):
        (tmp_path / "junk.json").write_text("{}")
        mod.load_results(tmp_path / "junk.json")


def test_demo_seeds_runs_missing_seeds_only(tmp_path, monkeypatch):
    """Seeds already in OUT are kept (an interrupted call resumes); the others run with the
    seed (and --pretrain-seed) set, every config checked before the first one trains."""
    mod = _load("demo_seeds")
    import xbm.train.demo as demo

    _fake_results(tmp_path / "seed0", 0, {"piggyback": 98.0, "xbm": 96.0})
    ran = []

    def fake_run_demo(cfg, out, progress=True, log=print):
        ran.append((cfg.seed, cfg.pretrain_seed, cfg.methods))
        _fake_results(Path(out), cfg.seed, {"piggyback": 97.0, "xbm": 96.0},
                      pretrain_seed=cfg.pretrain_seed)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert mod.main(["--out", str(tmp_path), "--seeds", "0-1", "--pretrain-seed", "0",
                     "--methods", "piggyback,xbm"]) == 0
    assert ran == [(1, 0, ["piggyback", "xbm"])]
    assert mod.main(["--out", str(tmp_path / "x"), "--seeds", "0", "--config",
                     str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "x").exists()
    # a kept run of another recipe is refused, not tabulated beside the new ones
    other = tmp_path / "other"
    _fake_results(other / "seed1", 1, {"piggyback": 98.0, "xbm": 96.0})  # its own backbone
    ran.clear()
    with pytest.raises(mod.XbmError, match=r"seed1/results.json was run with another backbone "
                       r"seed \(1, asked 0\)"):
        mod.run_seeds(other, [1, 2], {"pretrain_seed": 0, "methods": "piggyback,xbm"})
    with pytest.raises(mod.XbmError, match="run with another methods"):
        mod.run_seeds(other, [1], {"methods": "piggyback,xbm,xma"})
    assert ran == []  # refused before any seed ran
    # a --ref that is not run: said before the first demo (it was said after all of them)
    assert mod.main(["--out", str(tmp_path / "y"), "--seeds", "0", "--methods", "xbm,xma"]) == 2
    assert ran == [] and not (tmp_path / "y").exists()
    # --summarize runs nothing: a --seeds beside it was dropped without a word
    assert mod.main(["--summarize", str(tmp_path / "seed0"), "--seeds", "5"]) == 2
    # the same run twice (a seed's own backbone, named or not) is refused in a table
    a = mod.load_results(_fake_results(tmp_path / "a", 3, {"piggyback": 1.0, "xbm": 1.0}))
    b = mod.load_results(_fake_results(tmp_path / "b", 3, {"piggyback": 1.0, "xbm": 1.0},
                                       pretrain_seed=3))
    with pytest.raises(mod.XbmError, match="same seed and backbone seed"):
        mod.summarize([a, b])


def test_reprogram_levels_counts_the_cells_whose_level_changes(tmp_path, capsys):
    """Piggyback's masked-off weights go to zero: a cell changes exactly where the weight's
    magnitude has a non-zero digit (one polarity of each differential pair holds it), checked
    here against a digit-by-digit count of each masked weight."""
    from xbm.hardware import CrossbarSpec
    from xbm.hardware.energy import get_preset
    from xbm.models import create_model
    from xbm.multitask import MultiTaskModel

    torch.manual_seed(0)
    mtm = MultiTaskModel(create_model("small_cnn", num_classes=3, in_channels=1, width=4),
                         CrossbarSpec(rows=16, cols=16), arch={"name": "small_cnn"})
    mtm.add_task("pb", 3, "piggyback")
    want_changing = want_steps = 0
    with torch.no_grad():
        for _, layer, st in mtm.layer_states("pb"):
            st.score.copy_(torch.where(torch.rand_like(st.score) < 0.3, 0.0, 1.0))  # 30% off
            w = layer.weight.detach()
            q = torch.round(w / (w.abs().max() / 127)).clamp(-127, 127).long().abs()
            for v in q.reshape(-1)[(st.score.reshape(-1) <= 0.005)].tolist():
                digits = [(v >> (2 * k)) & 3 for k in range(4)]
                want_changing += sum(d != 0 for d in digits)
                want_steps += sum(digits)
    (row,) = _load("reprogram_levels").count_levels(mtm, get_preset("default"))
    assert row["counted"] == mtm.reprogrammed_cells("pb") > 0
    assert (row["changing"], row["level_steps"]) == (want_changing, want_steps)
    assert 0 < row["changing"] < row["counted"] / 2  # at most 4 of a weight's 8 cells hold it
    assert row["pulses_one_per_level"] == pytest.approx(want_steps * 59 / 3)


def test_ablation_xma_tiny_energy_budgets_only(tmp_path, monkeypatch):
    """At a tiny width and with energy budgets alone (no level or PE-budget runs) it runs,
    keeps each task's deploy energy within its budget, and draws the energy panel: that panel
    was drawn only when PE-budget runs existed, which left this documented command's plot
    blank."""
    from xbm.data import load_dataset
    from xbm.errors import DatasetNotFoundError

    try:
        load_dataset("fashion-mnist"), load_dataset("mnist")
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("XBM_CACHE", str(tmp_path / "cache"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn, figs = [], []
    mod = _load("ablation_xma")
    real, close = mod.plot, plt.close
    monkeypatch.setattr(mod, "plot", lambda res, path: (drawn.append(res), real(res, path)))
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    out = tmp_path / "abl"
    assert mod.main(["--out", str(out), "--tasks", "mnist", "--width", "2", "--pretrain-subset",
                     "256", "--pretrain-epochs", "1", "--train-subset", "64", "--test-subset",
                     "32", "--epochs", "1", "--no-baselines", "--levels", "", "--budgets", "",
                     "--energy-budgets", "0.5", "--energy-rank", "score,density",
                     "--device", "cpu"]) == 0
    (res,) = drawn
    assert res["backbone"]["arch"]["width"] == 2
    assert res["config"]["pretrain_precision"] in ("fp32", "bf16")  # resolved, not "auto"
    labels = [r["label"] for r in res["runs"]]
    assert labels == ["xma2-E0.5uJ", "xma2-E0.5uJ-density"]
    for r in res["runs"]:
        assert r["adaption_energy_j"] <= 0.5e-6 + 1e-18
    assert any(p.suffix == ".png" for p in out.iterdir())
    (fig,) = [f for f in figs if f is not None]
    levels, energy = fig.axes
    assert not levels.get_visible()  # no level runs: hidden, not an empty frame
    assert energy.get_visible() and len(energy.get_lines()) == 2  # one marker set per order


def test_reprogram_levels_counts_offset_cells(tmp_path):
    """The isaac preset now stores weights biased (one cell per slice): the script refused such
    bundles. A masked-off weight q -> 0 moves each slice's digit of q + 2^(b-1) to that of 2^(b-1),
    checked digit by digit."""
    from xbm.hardware import CrossbarSpec
    from xbm.hardware.energy import get_preset
    from xbm.models import create_model
    from xbm.multitask import MultiTaskModel

    torch.manual_seed(0)
    spec = CrossbarSpec(rows=16, cols=16, signed="offset")
    mtm = MultiTaskModel(create_model("small_cnn", num_classes=3, in_channels=1, width=4), spec,
                         arch={"name": "small_cnn"})
    mtm.add_task("pb", 3, "piggyback")
    want_changing = want_steps = 0
    zero = [(128 >> (2 * k)) & 3 for k in range(4)]
    with torch.no_grad():
        for _, layer, st in mtm.layer_states("pb"):
            st.score.copy_(torch.where(torch.rand_like(st.score) < 0.3, 0.0, 1.0))
            w = layer.weight.detach()
            q = torch.round(w / (w.abs().max() / 127)).clamp(-127, 127).long()
            for v in q.reshape(-1)[(st.score.reshape(-1) <= 0.005)].tolist():
                digits = [((v + 128) >> (2 * k)) & 3 for k in range(4)]
                want_changing += sum(d != z for d, z in zip(digits, zero, strict=True))
                want_steps += sum(abs(d - z) for d, z in zip(digits, zero, strict=True))
    (row,) = _load("reprogram_levels").count_levels(mtm, get_preset("default"))
    assert row["counted"] == mtm.reprogrammed_cells("pb") > 0
    assert (row["changing"], row["level_steps"]) == (want_changing, want_steps)


@pytest.mark.parametrize("argv,needle", [
    (["--budgets", "abc"], "--budgets: 'abc' is not a comma list of numbers"),
    (["--budgets", "1.5"], "run xma2-1.5: "),
    (["--levels", "9"], "--levels: unknown set '9'"),
    (["--tasks", ""], "--tasks is empty"),
    (["--tasks", "nope"], "--tasks: unknown dataset 'nope'"),
    (["--levels", "5,5"], "xma-5 would run twice"),
    (["--no-baselines", "--levels", "", "--budgets", ""], "nothing to run"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["--device", "bogus"], "invalid device 'bogus'"),
    (["--pretrain-augment", "bogus"], "unknown augmentation 'bogus'"),
    (["--seed", "-1"], "argument --seed: must be an integer in"),
])
def test_ablation_xma_checks_its_plan_before_the_backbone(argv, needle, tmp_path, monkeypatch,
                                                         capsys):
    """A bad --budgets or --levels failed after the backbone was pretrained (minutes) and the
    runs before it had trained, some with a traceback."""
    mod = _load("ablation_xma")

    def no_backbone(*a, **k):
        raise AssertionError("the backbone was reached")

    monkeypatch.setattr(mod, "get_backbone", no_backbone)
    with pytest.raises(SystemExit) as info:
        mod.main(["--out", str(tmp_path / "abl"), *argv])
    assert info.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "abl").exists()


def test_ablation_xma_learns_the_demos_tasks_by_default(tmp_path, monkeypatch):
    """Its default --tasks was MNIST and Animal-MNIST, so the default ablation answered issue
    5's questions on another benchmark than the demo's three tasks."""
    from xbm.data import get_benchmark
    from xbm.train.demo import DemoConfig

    mod = _load("ablation_xma")
    read: list[str] = []

    class _Stop(Exception):
        pass

    def fake_load(name, root=None):
        read.append(name)
        if len(read) == len(get_benchmark(DemoConfig().benchmark).tasks):
            raise _Stop
        return types.SimpleNamespace(subset=lambda *a, **k: None)

    def no_backbone(*a, **k):
        raise AssertionError(f"the backbone was reached after reading {read}")

    monkeypatch.setattr(mod, "load_dataset", fake_load)
    monkeypatch.setattr(mod, "get_backbone", no_backbone)
    with pytest.raises(_Stop):
        mod.main(["--out", str(tmp_path / "abl")])
    assert read == get_benchmark(DemoConfig().benchmark).tasks == ["mnist", "animal-mnist",
                                                                    "letters"]


@pytest.mark.parametrize("script", ["gpu_check", "gpu_graph_check", "gpu_lr_scan",
                                    "gpu_session", "gpu_step_check", "gpu_xma2_graph",
                                    "gpu_graph_diagnose"])
def test_gpu_scripts_say_their_usage_and_start_nothing(script, tmp_path):
    """`--help` became OUT_DIR (mkdir printed its own help), a missing DATA_ROOT was an
    "unbound variable" inside $(...), and the script went on to launch pytest and demos."""
    import os
    import subprocess

    env = dict(os.environ, PYTHON="false", XBM_GPU_DEVICE="cpu")
    for args in (["--help"], []):
        res = subprocess.run(["bash", str(BENCH / f"{script}.sh"), *args],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stderr.startswith("usage: bash "), res
    assert list(tmp_path.iterdir()) == []


def test_ablation_xma_resume_keeps_runs_across_plans(tmp_path, monkeypatch, capsys):
    """--resume was keyed on every flag, the plan's too: one more --levels value reran every
    finished run. The shared options decide now; runs match by label and config, and runs
    of an earlier plan stay in the progress file."""
    mod = _load("ablation_xma")
    ran: list[str] = []

    class _Data:
        def subset(self, *a, **k):
            return self

    def fake_run(label, method, cfg, *a, **k):
        ran.append(label)
        return {"label": label, "method": method, "config": cfg, "mask_bits": 10,
                "mean_accuracy": 50.0, "reprogrammed_cells": 0, "wall_seconds": 0.0,
                "tasks": {"mnist": {"accuracy": 50.0}}}

    bmeta = {"arch": {"name": "small_cnn"}, "dataset": "x", "accuracy": 1.0,
             "content_hash": "h"}
    monkeypatch.setattr(mod, "get_backbone", lambda *a, **k: (None, bmeta, Path("bb")))
    monkeypatch.setattr(mod, "load_dataset", lambda *a, **k: _Data())
    monkeypatch.setattr(mod, "run", fake_run)
    monkeypatch.setattr(mod, "plot", lambda *a, **k: None)
    base = ["--out", str(tmp_path / "abl"), "--tasks", "mnist", "--device", "cpu",
            "--no-baselines", "--budgets", "", "--resume"]
    assert mod.main([*base, "--levels", "2,3"]) == 0 and ran == ["xma-2", "xma-3"]
    ran.clear()
    assert mod.main([*base, "--levels", "2,5"]) == 0 and ran == ["xma-5"]  # xma-2 kept
    ran.clear()
    assert mod.main([*base, "--levels", "3"]) == 0 and ran == []  # the first plan's, still kept
    assert mod.main([*base, "--levels", "3", "--epochs", "3"]) == 0 and ran == ["xma-3"]
    assert "was run with other epochs; running every run again" in capsys.readouterr().out


@pytest.mark.parametrize("script, argv, needle", [
    ("bench_methods", ["--model", "nope"], "unknown model 'nope'"),
    ("bench_methods", ["--device", "bogus"], "invalid device 'bogus'"),
    ("bench_simulate", ["--device", "bogus"], "invalid device 'bogus'"),
    ("bench_simulate", ["--device", "cpu", "--backends", "triton"], "triton runs on CUDA only"),
    ("graph_step_check", ["--methods", "foo"], "unknown method 'foo'"),
    ("graph_step_check", ["--methods", "xbm,"], "has an empty name"),
    ("graph_step_check", ["--model", "nope"], "unknown model 'nope'"),
])
def test_benchmark_scripts_name_a_bad_name_in_one_line(script, argv, needle, capsys):
    """An unknown model, method or device ended these scripts in a traceback."""
    with pytest.raises(SystemExit) as info:
        _load(script).main(argv)
    assert info.value.code == 2 and needle in capsys.readouterr().err
