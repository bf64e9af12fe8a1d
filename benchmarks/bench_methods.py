"""One training step of every method against the frozen-backbone step and the fine-tune step.

Same model, same batch, one process; each repetition runs every method once, in an order
shuffled per repetition (seeded), and the median of many repetitions is reported, so machine
noise hits every method alike. Ratios are what to read.

    .venv/bin/python benchmarks/bench_methods.py [--width 16] [--batch 128] [--reps 15]
    python benchmarks/bench_methods.py --device cuda     # on a GPU machine

Columns:
  step ms / vs frozen / vs finetune: median wall time of forward + backward + Adam step.
  state: the task's trainable state (parameters) in bytes; + Adam: plus Adam's two moments.
  saved MB: tensors autograd keeps for the backward pass (the step's activation memory).
  peak MB: memory allocated during one step at its highest, above what was held before it. On
      CUDA the allocator's peak; on the CPU the peak of the running sum of every op's own
      allocations minus frees in start order (torch.profiler, profile_memory), so a transient
      buffer an op frees before it returns is not counted: a slight underestimate.
  ops (--count-ops): aten ops one step dispatches at top level, and how many of them compute
      (not views): a proxy for kernel launches, which bound a GPU step at small batches.
Rows 'M+graph' (--cuda-graph, CUDA only): the same step captured once as a CUDA graph (forward,
backward and a capturable Adam step) and replayed, which removes the host's per-op overhead that
bounds an eager step at small batches, leaving the GPU's own time. A method whose step cannot be
captured (host-side logic inside it) is reported and skipped.
The "frozen" step is linear-probe with per-task BN: only BN and the head train. XMA2 runs with a
one-step warm-up, so the warm-up steps below select its PEs and the timed steps train them
(re-programmed weights' gradient and Adam state included), as most of its training does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from xbm.config import positive_int
from xbm.hardware import get_spec
from xbm.methods import get_method_class, list_methods
from xbm.models import create_model
from xbm.multitask import MultiTaskModel
from xbm.nn import layers


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward while running ``fn``."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


#: aten ops that only make views (no kernel)
VIEW_OPS = {"aten::reshape", "aten::view", "aten::t", "aten::transpose", "aten::slice",
            "aten::select", "aten::narrow", "aten::squeeze", "aten::unsqueeze", "aten::expand",
            "aten::permute", "aten::alias", "aten::detach", "aten::as_strided",
            "aten::_unsafe_view", "aten::flatten", "aten::view_as", "aten::expand_as",
            "aten::unflatten"}


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 while the profiler runs: torch's Kineto prints "USDT ...
    profiler_start/stop" and allocator notes there at C++ level, which no log-level variable
    turns off. The profiled steps print nothing of their own; an exception still propagates
    (and is printed after the descriptor is restored)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_ops(fn) -> tuple[int, int]:
    """(top-level aten ops, those that are not views) that ``fn`` dispatches."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top = [e.name for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(top), sum(n not in VIEW_OPS for n in top)


def cpu_peak_bytes(fn) -> int:
    """Peak of the bytes allocated while ``fn`` runs, above the start, from the profiler's
    per-op memory records (see the module docstring for what it misses)."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    run = peak = 0
    for _, d in deltas:
        run += d
        peak = max(peak, run)
    return peak


#: Per-method configs of the benchmark (see the module docstring).
BENCH_CONFIGS = {"xma2": {"warmup_steps": 1}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18_cifar", help="backbone (default %(default)s)")
    ap.add_argument("--width", type=positive_int, default=16,
                    help="backbone width (default %(default)s, the CPU demo's)")
    ap.add_argument("--batch", type=positive_int, default=128,
                    help="images per step (default %(default)s)")
    ap.add_argument("--size", type=positive_int, default=28,
                    help="image side (default %(default)s)")
    ap.add_argument("--in-channels", type=positive_int, default=1,
                    help="input channels (3 for an ImageNet-layout model such as resnet50)")
    ap.add_argument("--rows", type=positive_int, default=64,
                    help="crossbar rows R (default %(default)s)")
    ap.add_argument("--reps", type=positive_int, default=15,
                    help="timed repetitions of every step; the median is reported "
                    "(default %(default)s)")
    ap.add_argument("--threads", type=positive_int, default=2,
                    help="torch CPU threads (default %(default)s)")
    ap.add_argument("--methods", default=",".join(list_methods()))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the GPU)")
    ap.add_argument("--count-ops", action="store_true",
                    help="also count the aten ops of one step (torch.profiler)")
    ap.add_argument("--fast-path", action="store_true",
                    help="also time xbm and xma with the single-tile fast path on (rows "
                    "'xbm+fast', 'xma+fast'; xbm.nn.layers.SINGLE_TILE_FAST_PATH)")
    ap.add_argument("--bf16", action="store_true",
                    help="also time every method's step under bfloat16 autocast (rows "
                    "'M+bf16'; the demo's adaption precision on CPUs with native bf16)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time every method's step captured as one CUDA graph and replayed "
                         "(rows 'M+graph'; CUDA only): the step without host overhead")
    ap.add_argument("--profile", default="",
                    help="comma list of methods (as named in the table) to profile for 3 steps "
                         "each after the timing: the top ops by self device time (CPU time on a "
                         "CPU), and the step's totals")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    from xbm.errors import XbmError
    from xbm.io import check_output

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:  # all before the timing: a bad --json or method failed after it
        for m in methods:
            get_method_class(m)
        if len(set(methods)) != len(methods) or not methods:
            raise XbmError(f"--methods {args.methods!r}: name each method once")
        if args.json:
            check_output(args.json, "file", "--json")
        from xbm.models.registry import model_defaults
        from xbm.train.loop import resolve_device

        model_defaults(args.model)  # an unknown name: one line, not a traceback
        dev = resolve_device(args.device)  # "bogus", or cuda where there is none; auto
    except XbmError as exc:
        ap.error(str(exc))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.bf16:
        methods += [f"{m}+bf16" for m in methods]
    if args.fast_path:
        if not {"xbm", "xma"} & set(methods):  # it added nothing, silently
            ap.error("--fast-path times xbm's and xma's fast path: add xbm or xma to --methods")
        methods += [f"{m}+fast" for m in ("xbm", "xma") if m in methods]
    cuda = dev.type == "cuda"
    if args.cuda_graph:
        if not cuda:
            ap.error("--cuda-graph needs --device cuda (CUDA graphs are a GPU feature)")
        # not a method with host-side logic in every step (graph_safe false), which a replay
        # would skip; XMA2 is captured after its PE selection (graph_ready)
        methods += [f"{m}+graph" for m in methods
                    if "+" not in m and get_method_class(m).graph_safe]
    for m in filter(None, args.profile.split(",")):  # before the minutes of timing
        if m not in methods:
            raise SystemExit(f"--profile {m}: not a method of this run ({', '.join(methods)})")
    bb = create_model(args.model, num_classes=10, in_channels=args.in_channels, width=args.width)
    mtm = MultiTaskModel(bb, get_spec(rows=args.rows))
    x = torch.randn(args.batch, args.in_channels, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    opts = {}
    for m in methods:
        name = m.replace("-", "_").replace("+", "_")
        base = m.split("+")[0]
        meth = mtm.add_task(name, 10, base, BENCH_CONFIGS.get(base))
        groups = mtm.task_parameters(name)
        pg = meth.param_groups(groups["state"]) + [
            {"params": groups["head"] + groups["norm"], "lr": meth.config.head_lr}]
        opts[m] = (name, pg)
    for _, pg in opts.values():  # add_task leaves only the newest task trainable: all of them
        for g in pg:
            for p in g["params"]:
                p.requires_grad_(True)
    mtm.to(dev).train()
    x, y = x.to(dev), y.to(dev)
    # the optimisers are built after the move, so they hold the device's parameters
    # (a graph's Adam keeps its step count on the GPU: capturable)
    opts = {m: (name, torch.optim.Adam(pg, capturable=m.endswith("+graph")))
            for m, (name, pg) in opts.items()}
    graphs: dict[str, torch.cuda.CUDAGraph] = {}

    def step(m: str) -> None:
        if m in graphs:
            graphs[m].replay()
            return
        name, opt = opts[m]
        layers.SINGLE_TILE_FAST_PATH = m.endswith("+fast")
        mtm.set_task(name)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=m.endswith("+bf16")):
            loss = F.cross_entropy(mtm(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    graph_rows = [m for m in methods if m.endswith("+graph")]
    for m in methods:  # warm-up (and Adam state allocation)
        if m in graph_rows:
            continue
        step(m)
        step(m)
    sync()
    for m in graph_rows:
        # PyTorch's whole-network capture recipe: warm up on a side stream (lazy allocations and
        # Adam's state happen outside the graph), then capture one step with the grads unset
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        try:
            with torch.cuda.stream(side):
                for _ in range(100):  # a method's host-side warm-up first (XMA2's selection)
                    if mtm.methods[opts[m][0]].graph_ready():
                        break
                    step(m)
                for _ in range(3):
                    step(m)
            torch.cuda.current_stream(dev).wait_stream(side)
            opts[m][1].zero_grad(set_to_none=True)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step(m)
            graphs[m] = g
            g.replay()
        except Exception as e:  # noqa: BLE001 - reported, and the row dropped
            print(f"{m}: capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "row dropped", file=sys.stderr)
            methods.remove(m)
    sync()
    peak: dict[str, float] = {}
    if cuda:
        for m in methods:
            held = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            step(m)
            sync()
            peak[m] = (torch.cuda.max_memory_allocated(dev) - held) / 2**20
    else:
        for m in methods:
            peak[m] = cpu_peak_bytes(lambda m=m: step(m)) / 2**20
    ops: dict[str, tuple[int, int]] = {}
    if args.count_ops:
        for m in methods:
            ops[m] = count_ops(lambda m=m: step(m))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args.reps):
        # a fresh seeded order every repetition, so no method mostly follows the same one (the
        # caches and allocator state a step inherits depend on what ran just before it; a
        # rotation kept XBM right after Piggyback in 30 of 36 repetitions)
        order = list(methods)
        random.Random(rep).shuffle(order)
        for m in order:
            sync()
            t0 = time.perf_counter()
            step(m)
            sync()
            times[m].append(time.perf_counter() - t0)
    for m in filter(None, args.profile.split(",")):
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with quiet_stderr(), profile(activities=acts) as prof:
            for _ in range(3):
                step(m)
            sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"--- profile of 3 steps of {m}, by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=40))
    rows = []
    med = {m: statistics.median(v) for m, v in times.items()}
    frozen = med.get("linear-probe")
    ft = med.get("finetune")
    pb_state = None
    for m in methods:
        name, opt = opts[m]
        state = sum(p.numel() * p.element_size() for p in mtm.task_parameters(name)["state"])
        adam = sum(t.numel() * t.element_size() for s in opt.state.values()
                   for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        mtm.set_task(name)
        layers.SINGLE_TILE_FAST_PATH = m.endswith("+fast")
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=m.endswith("+bf16")):
            saved = saved_bytes(lambda: F.cross_entropy(mtm(x), y))
        if m == "piggyback":
            pb_state = state
        rows.append({"method": m, "step_ms": med[m] * 1e3,
                     "vs_frozen": med[m] / frozen if frozen else None,
                     "vs_finetune": med[m] / ft if ft else None,
                     "state_bytes": state,
                     "state_plus_adam_bytes": state + adam - sum(
                         t.numel() * t.element_size() for p in
                         mtm.task_parameters(name)["head"] + mtm.task_parameters(name)["norm"]
                         for t in [opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]
                         if p in opt.state),
                     "saved_mb": saved / 2**20, "peak_mb": peak.get(m),
                     "ops": ops.get(m, (None, None))[0],
                     "compute_ops": ops.get(m, (None, None))[1]})
    for r in rows:
        r["state_vs_piggyback"] = r["state_bytes"] / pb_state if pb_state else None
    where = torch.cuda.get_device_name(dev) if cuda else f"{args.threads} CPU threads"
    print(f"{args.model} width {args.width}, batch {args.batch}x{args.in_channels}x{args.size}"
          f"x{args.size}, "
          f"R={args.rows}, {where}, median of {args.reps}; torch {torch.__version__}")
    print(f"{'method':<18}{'step ms':>9}{'vs frozen':>11}{'vs finetune':>13}{'state B':>12}"
          f"{'state+Adam B':>14}{'vs PB':>9}{'saved MB':>10}{'peak MB':>9}"
          + (f"{'ops':>7}{'compute':>9}" if ops else ""))
    def ratio(v: float | None, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"  # baseline not run

    for r in rows:
        print(f"{r['method']:<18}{r['step_ms']:>9.1f}{ratio(r['vs_frozen'], 11, 2)}"
              f"{ratio(r['vs_finetune'], 13, 2)}{r['state_bytes']:>12,}"
              f"{r['state_plus_adam_bytes']:>14,}"
              f"{ratio(r['state_vs_piggyback'], 9, 4)}{r['saved_mb']:>10.1f}{r['peak_mb']:>9.1f}"
              + (f"{r['ops']:>7}{r['compute_ops']:>9}" if ops else ""))
    if args.json:
        from xbm.io import write_json_atomic

        write_json_atomic(args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
