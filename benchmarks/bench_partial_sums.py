"""Three exact ways to train a column mask on one conv layer, against the frozen layer.

The exact gradient of XBM's mask m[t, c] (row tile t, output column c) is

    dL/dm[t, c] = sum over the tile's rows r of W[r, c] * dL/dW_eff[r, c]       (a)
                = sum over outputs of dL/dy[c] * P_t[c]                          (b)

where P_t is the partial sum the tile's rows contribute to output c. ``xbm`` uses (a): the forward
multiplies the weight by the expanded mask, so autograd forms the layer's full weight gradient,
which the frozen layer (BN and head training only) never computes. (b) needs no weight gradient,
but the forward must keep every tile's partial sums: row_tiles x the output activations. This
times, in one process and interleaved (median of ``--reps``), forward + backward of:

* ``frozen``: the plain conv, gradient to the input only (the floor);
* ``weight-mask`` (a): conv with W ⊙ expand(m), gradients to the input and to m;
* ``partial-sums`` (b): unfold the input, one batched matmul per tile into (B, T, Cout, L)
  partial sums, scale by m and sum over tiles; gradients to the input and to m;
* ``output-scale``: for reference, what (b) costs where it is cheap, i.e. with a single tile:
  conv(x, W) * m[c] (the single-tile fast path, ``xbm.nn.layers.SINGLE_TILE_FAST_PATH``).

    .venv/bin/python benchmarks/bench_partial_sums.py [--cin 64 --cout 64 --size 7 --batch 32]

The default is a width-16 CIFAR ResNet-18's layer-3 conv (64 -> 64, 3x3, on 7x7 maps: 9 tiles);
its layer-4 conv is ``--cin 128 --cout 128 --size 4`` (18 tiles), layer 1's ``--cin 16 --cout 16
--size 28`` (3 tiles).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

import torch
import torch.nn.functional as F

from xbm.config import positive_int
from xbm.hardware.mapping import apply_column_mask


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cin", type=positive_int, default=64,
                    help="input channels (default %(default)s)")
    ap.add_argument("--cout", type=positive_int, default=64,
                    help="output channels (default %(default)s)")
    ap.add_argument("--k", type=positive_int, default=3,
                    help="kernel side (default %(default)s)")
    ap.add_argument("--size", type=positive_int, default=7, help="input height = width")
    ap.add_argument("--batch", type=positive_int, default=32,
                    help="images per step (default %(default)s)")
    ap.add_argument("--rows", type=positive_int, default=64, help="crossbar rows R")
    ap.add_argument("--reps", type=positive_int, default=30,
                    help="timed repetitions; the median is reported (default %(default)s)")
    ap.add_argument("--threads", type=positive_int, default=2,
                    help="torch CPU threads (default %(default)s)")
    args = ap.parse_args(argv)
    if args.k < 1 or args.k % 2 == 0:  # the conv pads k // 2: only an odd k keeps the size
        ap.error(f"--k must be an odd kernel size (1, 3, 5, ...), got {args.k}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, R = args.k, args.rows
    w = torch.randn(args.cout, args.cin, k, k) / math.sqrt(args.cin * k * k)
    rows = args.cin * k * k
    tiles = math.ceil(rows / R)
    x0 = torch.randn(args.batch, args.cin, args.size, args.size)
    m = torch.ones(tiles, args.cout, requires_grad=True)
    m1 = torch.ones(args.cout, requires_grad=True)
    # (T, R, Cout) tiles of the (rows, Cout) matrix, zero-padded to whole tiles
    wt = F.pad(w.reshape(args.cout, rows).t(), (0, 0, 0, tiles * R - rows)).reshape(
        tiles, R, args.cout)

    def frozen():
        x = x0.clone().requires_grad_(True)
        F.conv2d(x, w, padding=k // 2).square().mean().backward()

    def weight_mask():
        x = x0.clone().requires_grad_(True)
        F.conv2d(x, apply_column_mask(w, m, R), padding=k // 2).square().mean().backward()

    def partial_sums():
        x = x0.clone().requires_grad_(True)
        cols = F.unfold(x, k, padding=k // 2)  # (B, rows, L)
        cols = F.pad(cols, (0, 0, 0, tiles * R - rows)).reshape(args.batch, tiles, R, -1)
        part = torch.einsum("btrl,trc->btcl", cols, wt)  # (B, T, Cout, L)
        y = (part * m[None, :, :, None]).sum(1)
        y.reshape(args.batch, args.cout, args.size, args.size).square().mean().backward()

    def output_scale():
        x = x0.clone().requires_grad_(True)
        (F.conv2d(x, w, padding=k // 2) * m1[:, None, None]).square().mean().backward()

    fns = {"frozen": frozen, "weight-mask": weight_mask, "partial-sums": partial_sums,
           "output-scale": output_scale}
    # (a) and (b) give the same mask gradient (a check, not a timing)
    grads = []
    for fn in (weight_mask, partial_sums):
        m.grad = None
        fn()
        grads.append(m.grad.clone())
    if not torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6):
        raise SystemExit("partial-sums mask gradient differs from the weight-mask one")
    times: dict[str, list[float]] = {n: [] for n in fns}
    for fn in fns.values():
        fn()
    names = list(fns)
    for rep in range(args.reps):
        order = list(names)
        random.Random(rep).shuffle(order)  # no variant mostly after the same one
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    out_mb = args.batch * args.cout * args.size ** 2 * 4 / 2**20
    print(f"conv {args.cin}->{args.cout} {k}x{k} on {args.size}x{args.size}, batch {args.batch}, "
          f"R={R}: {rows} rows = {tiles} tiles; partial sums {tiles * out_mb:.1f} MB vs output "
          f"{out_mb:.2f} MB; {args.threads} threads, median of {args.reps}, torch "
          f"{torch.__version__}")
    print(f"{'path':<14}{'ms':>9}{'vs frozen':>11}")
    for n in names:
        print(f"{n:<14}{med[n] * 1e3:>9.2f}{med[n] / med['frozen']:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
