"""Faithful crossbar simulation vs plain PyTorch inference of the demo backbone, as ratios.

Run: ``.venv/bin/python benchmarks/bench_simulate.py`` (add ``--json out.json``; ``--device cuda``
on a GPU machine). Plain inference and every faithful configuration are timed in one process,
interleaved repetition by repetition, and the median is reported, so that load from other jobs on
a shared machine hits all of them alike.

Configurations (64x64 crossbars, per-tile 8-bit ADC, 8-bit inputs):
  (a) 8-bit inputs in one DAC cycle, unsliced 8-bit weights (cell_bits=8);
  (b) the same with 8-bit weights on 2-bit cells (4 slices);
  (c) the default spec: 2-bit cells and bit-serial inputs (1-bit DAC, 8 cycles), for reference.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time

import torch

from xbm.config import positive_int
from xbm.errors import XbmError
from xbm.hardware import get_spec
from xbm.hardware.simulate import SimConfig, faithful
from xbm.io import check_output, write_json_atomic
from xbm.models import create_model
from xbm.multitask import MultiTaskModel

CONFIGS = {
    "a": dict(rows=64, cols=64, weight_bits=8, cell_bits=8, input_bits=8, dac_bits=8, adc_bits=8),
    "b": dict(rows=64, cols=64, weight_bits=8, cell_bits=2, input_bits=8, dac_bits=8, adc_bits=8),
    "c": dict(rows=64, cols=64, weight_bits=8, cell_bits=2, input_bits=8, dac_bits=1, adc_bits=8),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=positive_int, default=128,
                    help="images per forward (default %(default)s)")
    ap.add_argument("--reps", type=positive_int, default=7,
                    help="timed repetitions; the median is reported (default %(default)s)")
    ap.add_argument("--threads", type=positive_int, default=2,
                    help="torch CPU threads (default %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    ap.add_argument("--backends", default="compile,torch", help="comma list: compile,torch,triton")
    ap.add_argument("--configs", default="a,b", help="comma list of a,b,c")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from xbm.hardware.simulate import BACKENDS

    for flag, known in (("configs", CONFIGS), ("backends", BACKENDS)):
        given = [c.strip() for c in getattr(args, flag).split(",") if c.strip()]
        bad = [c for c in given if c not in known]
        if bad or not given or len(set(given)) != len(given):
            ap.error(f"--{flag}: {getattr(args, flag)!r}: name each of "
                     f"{', '.join(known)} at most once")
        setattr(args, flag, ",".join(given))
    if args.json:  # before the timing, not after it
        try:
            check_output(args.json, "file", "--json")
        except XbmError as exc:
            ap.error(str(exc))
    from xbm.train.loop import resolve_device

    try:  # "bogus", or cuda where there is none; a GPU-only backend on a CPU
        dev = resolve_device(args.device)
        for b in args.backends.split(","):
            if b == "triton" and dev.type != "cuda":
                raise XbmError("--backends triton runs on CUDA only; pass --device cuda or "
                               "leave triton out")
    except XbmError as exc:
        ap.error(str(exc))
    torch.manual_seed(0)
    base = create_model("resnet18_cifar", width=16, in_channels=1).eval()
    plain = copy.deepcopy(base).to(dev).eval()
    plain_cl = copy.deepcopy(base).to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 1, 28, 28, device=dev)
    runs = {}
    for c in args.configs.split(","):
        spec = get_spec(**CONFIGS[c])
        mtm = MultiTaskModel(copy.deepcopy(base), spec).to(dev).eval()
        for be in args.backends.split(","):
            runs[f"{c}/{be}"] = (mtm, SimConfig(backend=be))
    times: dict[str, list[float]] = {"plain": [], "plain_cl": []}
    stack = {}
    with torch.no_grad():
        # warm-up (and calibration / compilation) outside the timed loop
        for key, (mtm, cfg) in runs.items():
            cm = faithful(mtm, cfg, calibration=[x])
            t0 = time.perf_counter()
            sim = cm.__enter__()
            mtm(x)
            _sync(dev)
            print(f"warm-up {key}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            stack[key] = (cm, sim)
            cm.__exit__(None, None, None)
            times[key] = []
        x_cl = x.contiguous(memory_format=torch.channels_last)
        plain(x)
        plain_cl(x_cl)
        for _ in range(args.reps):
            t0 = time.perf_counter()
            plain(x)
            _sync(dev)
            times["plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain_cl(x_cl)
            _sync(dev)
            times["plain_cl"].append(time.perf_counter() - t0)
            for key, (mtm, _cfg) in runs.items():
                sim = stack[key][1]
                sim.install()
                t0 = time.perf_counter()
                mtm(x)
                _sync(dev)
                times[key].append(time.perf_counter() - t0)
                sim.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {dev}, threads {args.threads}, batch {args.batch}x1x28x28, {args.reps} reps "
          f"(median), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'run':<14} {'median ms':>10} {'x plain':>8} {'x plain_cl':>10}")
    for k, v in med.items():
        print(f"{k:<14} {1e3 * v:>10.1f} {v / med['plain']:>8.2f} {v / med['plain_cl']:>10.2f}")
    res = {"median_s": med, "ratio_to_plain": {k: v / med["plain"] for k, v in med.items()},
           "ratio_to_plain_channels_last": {k: v / med["plain_cl"] for k, v in med.items()},
           "all_s": times, "batch": args.batch, "threads": args.threads, "device": str(dev),
           "torch": torch.__version__}
    for be in args.backends.split(","):
        if f"a/{be}" in med and f"b/{be}" in med:
            r = med[f"b/{be}"] / med[f"a/{be}"]
            res.setdefault("b_over_a", {})[be] = r
            print(f"(b)/(a) [{be}]: {r:.2f}")
    if args.json:
        write_json_atomic(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
