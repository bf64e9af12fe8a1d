"""The benchmark scripts in benchmarks/ run (tiny sizes) and report what they promise, so they do
not rot between the sessions that measure with them."""

from __future__ import annotations

import importlib.util
import json
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
def test_bench_methods_cuda_graph_needs_cuda():
    with pytest.raises(SystemExit, match="--cuda-graph needs --device cuda"):
        _load("bench_methods").main(["--cuda-graph", "--methods", "xbm"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run (a GPU runs the check)")
def test_graph_step_check_dry_run(capsys):
    rc = _load("graph_step_check").main(["--device", "cpu", "--methods", "piggyback,xbm",
                                         "--width", "2", "--batch", "4", "--replays", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "xbm:" in out and "replay 2:" in out
    assert "0.000e+00 (bit-identical) on cpu (no CUDA: both ran eagerly)" in out


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
