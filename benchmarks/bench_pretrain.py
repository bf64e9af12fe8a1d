"""One pretraining step in the standard (NCHW) layout against channels-last (NHWC), on the CPU.

``xbm.train.pretrain`` runs channels-last on the CPU because oneDNN's x86 convolutions are faster
on NHWC activations. This measures by how much, as a ratio in one process: both layouts get the
same initial weights and the same augmented, mixed-up batch, and their steps are interleaved
round-robin, so machine noise hits both alike. The median of ``--reps`` rounds is reported.

    .venv/bin/python benchmarks/bench_pretrain.py [--width 16] [--batch 128] [--reps 20]

``--bf16`` adds a channels-last step under bfloat16 autocast: what ``xbm pretrain --precision
bf16`` runs. It is opt-in, not the default, because its speed depends on the CPU having
AMX/AVX512-BF16 and its backbone differs from the fp32 one.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from xbm.config import positive_int
from xbm.data.augment import get_augment
from xbm.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18_cifar", help="backbone (default %(default)s)")
    ap.add_argument("--width", type=positive_int, default=16,
                    help="backbone width (default %(default)s)")
    ap.add_argument("--batch", type=positive_int, default=128,
                    help="images per step (default %(default)s)")
    ap.add_argument("--reps", type=positive_int, default=20,
                    help="timed repetitions; the median is reported (default %(default)s)")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    from xbm.errors import XbmError
    from xbm.models.registry import model_defaults

    try:
        model_defaults(args.model)  # an unknown name: one line, not a traceback
    except XbmError as exc:
        ap.error(str(exc))
    if args.batch % 2:  # xbm.train.pretrain runs such batches in the standard layout
        ap.error(f"--batch {args.batch} is odd: torch 2.13's oneDNN corrupts the heap in a "
                 "channels-last convolution's weight gradient on odd batches; pass an even one")

    torch.manual_seed(0)
    base = create_model(args.model, num_classes=10, in_channels=1, width=args.width)
    x = torch.rand(args.batch, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 10, (args.batch,))
    perm = torch.randperm(args.batch)
    augment = get_augment("affine-flip")
    layouts = {"nchw": (torch.contiguous_format, False),
               "channels-last": (torch.channels_last, False)}
    if args.bf16:
        layouts["channels-last bf16"] = (torch.channels_last, True)
    models, opts = {}, {}
    for name, (fmt, _) in layouts.items():
        models[name] = copy.deepcopy(base).to(memory_format=fmt).train()
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=2e-3)

    def step(name: str) -> float:
        fmt, bf16 = layouts[name]
        t0 = time.perf_counter()
        xa = augment(x, torch.Generator().manual_seed(0))
        xa = (0.7 * xa + 0.3 * xa[perm]).contiguous(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = models[name](xa).float()
        loss = 0.7 * F.cross_entropy(logits, y) + 0.3 * F.cross_entropy(logits, y[perm])
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        return time.perf_counter() - t0

    for name in layouts:  # warm-up: oneDNN picks and caches its kernels
        for _ in range(3):
            step(name)
    times: dict[str, list[float]] = {n: [] for n in layouts}
    for _ in range(args.reps):
        for name in layouts:
            times[name].append(step(name))
    ref = statistics.median(times["nchw"])
    print(f"{args.model} width {args.width}, batch {args.batch}, {torch.get_num_threads()} "
          f"threads, median of {args.reps} interleaved steps (torch {torch.__version__})")
    print(f"{'layout':<20} {'step ms':>8} {'img/s':>7} {'vs nchw':>8}")
    for name in layouts:
        med = statistics.median(times[name])
        print(f"{name:<20} {med * 1e3:8.1f} {args.batch / med:7.0f} {med / ref:8.2f}")


if __name__ == "__main__":
    main()
