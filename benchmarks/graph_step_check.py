"""Does a training step replayed from a CUDA graph compute what the eager step computes?

    python benchmarks/graph_step_check.py --device cuda [--methods piggyback,xbm,xma]

For each method two identical models (same seed) take the same batches: one eagerly, one through
a step captured once with ``torch.cuda.graph`` (the capture recipe of ``bench_methods.py
--cuda-graph``: eager warm-up steps on a side stream, three or, for a method with a warm-up of
its own (XMA2's PE selection, which a replay would skip), until ``graph_ready()``; capture with
the grads unset; replays). Both use Adam in its capturable form at a constant learning rate, so
the kernels are the same and the replayed steps should match the eager ones bit for bit. After
every replay it prints, per method, the largest difference of the loss, of the task state's
gradients and of the task state itself, and the first tensor that differs.

Why it exists: session 14's graphed ``train_task`` disagreed with eager training for XBM and
XMA (not for Piggyback, fine-tuning or the linear probe; docs/benchmarks.md, "GPU session 3"),
and a CPU check ruled out floating-point noise. This isolates the capture of one step from
schedules, partial batches and the data pipeline. Without CUDA both models run eagerly (a dry
run of the script: every difference is 0).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from xbm.config import positive_int
from xbm.hardware import get_spec
from xbm.models import create_model
from xbm.multitask import MultiTaskModel


def build(method: str, args: argparse.Namespace, dev: torch.device):
    torch.manual_seed(0)
    bb = create_model(args.model, num_classes=10, in_channels=1, width=args.width)
    mtm = MultiTaskModel(bb, get_spec(rows=args.rows))
    meth = mtm.add_task("t", 10, method)
    groups = mtm.task_parameters("t")
    pg = meth.param_groups(groups["state"]) + [
        {"params": groups["head"] + groups["norm"], "lr": meth.config.head_lr}]
    for g in pg:
        for p in g["params"]:
            p.requires_grad_(True)
    mtm.to(dev).train()
    mtm.set_task("t")
    named = [(n, p) for n, p in mtm.model.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(pg, capturable=dev.type == "cuda")
    return mtm, opt, named


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="piggyback,xbm,xma")
    ap.add_argument("--model", default="resnet18_cifar")
    ap.add_argument("--width", type=positive_int, default=8)
    ap.add_argument("--rows", type=positive_int, default=64)
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--replays", type=positive_int, default=5)
    args = ap.parse_args(argv)
    from xbm.errors import XbmError
    from xbm.methods import get_method_class
    from xbm.models.registry import model_defaults
    from xbm.train.loop import resolve_device

    try:  # names before any work: one line each, not a traceback
        dev = resolve_device(args.device)
        model_defaults(args.model)
        methods = [m.strip() for m in args.methods.split(",")]
        if not all(methods):
            raise XbmError(f"--methods {args.methods!r} has an empty name; e.g. xbm,xma")
        for m in methods:
            get_method_class(m)
    except XbmError as exc:
        ap.error(str(exc))
    cuda = dev.type == "cuda"
    if cuda:  # as xbm.train.seed_everything does on CUDA
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    def warmup_of(method: str) -> int:
        """Eager steps before the capture: 3, or past the method's own warm-up (XMA2 selects
        its PEs at the first forward after ``warmup_steps`` steps)."""
        own = getattr(get_method_class(method).config_class(), "warmup_steps", 0)
        return max(3, own + 2)

    gen = torch.Generator().manual_seed(1)
    most = max(warmup_of(m) for m in methods)
    batches = [(torch.randn(args.batch, 1, 28, 28, generator=gen).to(dev),
                torch.randint(0, 10, (args.batch,), generator=gen).to(dev))
               for _ in range(most + args.replays)]
    worst_all = 0.0
    for method in methods:
        warmup = warmup_of(method)
        runs = {}
        for mode in ("eager", "graph"):
            mtm, opt, named = build(method, args, dev)
            static: dict[str, torch.Tensor] = {}

            def step(x, y, mtm=mtm, opt=opt):
                loss = F.cross_entropy(mtm(x), y)
                loss.backward()
                opt.step()
                return loss

            record = []
            graph = None
            side = torch.cuda.Stream(dev) if cuda else None
            for i, (x, y) in enumerate(batches):
                if i >= warmup + args.replays:
                    break
                if mode == "graph" and cuda and i >= warmup:
                    if graph is None:
                        if not mtm.methods["t"].graph_ready():
                            raise SystemExit(f"{method}: not ready for a graph after {warmup} "
                                             "eager steps")
                        static["x"], static["y"] = x.clone(), y.clone()
                        opt.zero_grad(set_to_none=True)
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph):
                            static["loss"] = step(static["x"], static["y"])
                    else:
                        static["x"].copy_(x)
                        static["y"].copy_(y)
                    graph.replay()
                    loss = static["loss"]
                elif mode == "graph" and cuda:  # warm-up on a side stream, as capture requires
                    opt.zero_grad(set_to_none=True)
                    side.wait_stream(torch.cuda.current_stream(dev))
                    with torch.cuda.stream(side):
                        loss = step(x, y)
                    torch.cuda.current_stream(dev).wait_stream(side)
                else:
                    opt.zero_grad(set_to_none=True)
                    loss = step(x, y)
                if i >= warmup:
                    record.append((loss.detach().clone(),
                                   {n: p.grad.detach().clone() for n, p in named
                                    if p.grad is not None},
                                   {n: p.detach().clone() for n, p in named}))
            runs[mode] = record
        print(f"{method}:")
        for k, (e, g) in enumerate(zip(runs["eager"], runs["graph"], strict=True)):
            dl = (e[0] - g[0]).abs().item()
            parts = [f"replay {k + 1}: loss {dl:.2e}"]
            for what, a, b in (("grad", e[1], g[1]), ("state", e[2], g[2])):
                if a.keys() != b.keys():
                    parts.append(f"{what}: different tensors ({sorted(a.keys() ^ b.keys())[:3]})")
                    worst_all = float("inf")
                    continue
                diffs = {n: (a[n] - b[n]).abs().max().item() for n in a}
                worst = max(diffs.values(), default=0.0)
                first = next((n for n in a if diffs[n] > 0), "-")
                parts.append(f"{what} max {worst:.2e} (first differing: {first})")
                worst_all = max(worst_all, worst)
            worst_all = max(worst_all, dl)
            print("  " + "; ".join(parts))
    print(f"largest difference over all methods and replays: {worst_all:.3e} "
          f"({'bit-identical' if worst_all == 0 else 'NOT bit-identical'}) on {dev}"
          + ("" if cuda else " (no CUDA: both ran eagerly)"))
    return 0 if worst_all == 0 else 1  # a script (gpu_graph_diagnose.sh) reads the status


if __name__ == "__main__":
    sys.exit(main())
