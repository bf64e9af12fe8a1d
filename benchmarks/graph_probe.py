"""Where does a replayed XBM/XMA training step first differ from the eager one? (research probe)

    python benchmarks/graph_probe.py [--src src] [--out DIR] [--methods piggyback,xbm,xma]

Written in session 14 after a graphed ``train_task`` (reverted; docs/benchmarks.md, "GPU session
3") disagreed with eager training for XBM and XMA only. Run it from the repository root in one
GPU call, next to ``benchmarks/graph_step_check.py``; it writes DIR/graph_probe.log and .json.

One short GPU call. It rebuilds the failing test's setting (tests/test_cuda_graph.py at abd8e66:
small_cnn, R=16, 100 fixture images at batch 16 -> 6 full batches + 1 of 4 per epoch, 2 epochs,
cosine lr written into device tensors, 3 warm-up steps on fresh side streams, capture, replays,
eager steps for the small batch) and adds:

* a teacher-forced oracle: before every step of the graphed run its parameters and Adam state
  are copied into an identical eager model (capturable Adam too), which takes the same step on
  the same batch; loss, every gradient and every updated parameter are compared. The first
  differing step and its kind (warm-up / capture / replay / eager-small) localise the fault
  without drift;
* variants: A `as_test` (stale AccumulateGrad streams: warm-up on fresh side streams, the last
  loss kept alive across the capture, as train_task did); B `same_stream` (warm-up and capture
  on one stream, loss dropped before capture); C `override` (A plus
  torch.autograd.graph.set_override_stale_capture_stream(True) where it exists);
  D `native` (XBM/XMA through native ops: column_scale() x tile_view, no _ColumnMask);
  E `fn_noq` (_ColumnMask without quantising inside its forward);
* which stream / thread / capture state each Python backward ran on (_ColumnMask, BinarizeSTE);
* free-running end states against eager training with capturable Adam (any difference is the
  graph's) and with plain Adam (the test's comparison), with the magnitude the test's
  ``msg=k`` hid, and XBM mask bits that differ;
* a DOT dump of XBM's and Piggyback's captured graphs (node counts per kernel name).

Without CUDA every "graph" run is eager (dry run: all differences 0).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import re
import sys
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--src", default="src", help="the xbm sources to probe (default %(default)s)")
ap.add_argument("--out", default=os.environ.get("OUT", "runs/graph_probe"),
                help="folder for graph_probe.log, .json and the DOT dumps (default: $OUT, else "
                "runs/graph_probe)")
ap.add_argument("--methods", default="piggyback,xbm,xma",
                help="comma list of piggyback, xbm, xma (default %(default)s)")
ap.add_argument("--variants", default="as_test,same_stream,override,native,fn_noq",
                help="comma list of the variants in the module docstring (default: all)")
args = ap.parse_args()
_KNOWN = ("as_test", "same_stream", "override", "native", "fn_noq")
_bad = [v for v in args.variants.split(",") if v not in _KNOWN]
if _bad:  # an unknown one ran as as_test under the typo's label, in a scarce GPU call
    ap.error(f"--variants: unknown {', '.join(_bad)}; choose from {', '.join(_KNOWN)}")
_bad = [m for m in args.methods.split(",") if m not in ("piggyback", "xbm", "xma")]
if _bad:  # before the log file is opened: no partial log for a typo
    ap.error(f"--methods: unknown {', '.join(_bad)}; choose from piggyback, xbm, xma")
sys.path.insert(0, args.src)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from xbm.data import make_fixture_task  # noqa: E402
from xbm.hardware import get_spec  # noqa: E402
from xbm.hardware import mapping as M  # noqa: E402
from xbm.io import atomic_path  # noqa: E402
from xbm.methods import base as B  # noqa: E402
from xbm.methods import xbm as XBM_MOD  # noqa: E402
from xbm.methods import xma as XMA_MOD  # noqa: E402
from xbm.models import create_model  # noqa: E402
from xbm.multitask import MultiTaskModel  # noqa: E402
from xbm.nn.layers import TASK_KEY  # noqa: E402
from xbm.train import seed_everything  # noqa: E402
from xbm.train.loop import cosine_lambda  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
os.makedirs(args.out, exist_ok=True)
LOG = open(os.path.join(args.out, "graph_probe.log"), "w")  # noqa: SIM115 - open for the run


def say(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


say("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name() if CUDA else "(no CUDA: dry run)",
    "| override flag:", hasattr(torch.autograd.graph, "set_override_stale_capture_stream"),
    "| warn flag:", hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"))

# ---- instrumentation: the stream, thread and capture state of each Python backward -------------
SEEN: dict = {}


def _instrument(cls, tag):
    orig = cls.backward

    def backward(ctx, *grads):
        if CUDA:
            key = (tag, torch.cuda.is_current_stream_capturing())
            SEEN.setdefault(key, (hex(torch.cuda.current_stream().cuda_stream),
                                  threading.current_thread().name))
        return orig(ctx, *grads)

    cls.backward = staticmethod(backward)


_instrument(M._ColumnMask, "_ColumnMask")
_instrument(B.BinarizeSTE, "BinarizeSTE")

# ---- effective-weight variants (patched per run, restored after) ----------------------------
ORIG_EW = {XBM_MOD.XBM: XBM_MOD.XBM.effective_weight, XMA_MOD.XMA: XMA_MOD.XMA.effective_weight}


def ew_native(self, layer, state):  # column_scale() is BinarizeSTE / ShiftQuantizeSTE: native ops
    scale = self.column_scale(layer, state)
    return M.from_tile_view(M.tile_view(layer.weight, layer.spec.rows) * scale.t()[..., None],
                            layer.weight.shape)


def ew_fn_noq(self, layer, state):  # the hand-written Function, quantised outside it
    return M.apply_column_mask(layer.weight, self.column_scale(layer, state), layer.spec.rows)


def set_variant(v):
    for cls, f in ORIG_EW.items():
        cls.effective_weight = {"native": ew_native, "fn_noq": ew_fn_noq}.get(v, f)


# ---- data: the test's batches, built once ----------------------------------------------------
task = make_fixture_task("a", num_classes=3, n_train=100, n_test=32, seed=1)
loader, _ = task.loaders(16, seed=0)
BATCHES = [(x.to(DEV), y.to(DEV)) for _ in range(2) for x, y in loader]
LAM = cosine_lambda(len(BATCHES))
say("steps", len(BATCHES), "batch sizes", [int(x.shape[0]) for x, _ in BATCHES])


def build(method, capturable):
    torch.manual_seed(0)
    mtm = MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1),
                         get_spec(rows=16, cols=16))
    seed_everything(3)
    meth = mtm.add_task("a", task.num_classes, method)
    mtm.to(DEV)
    mtm.set_task("a")
    meth.on_task_start(mtm, "a")
    groups = mtm.task_parameters("a")
    pg = meth.param_groups(groups["state"])
    if groups["head"] + groups["norm"]:
        pg.append({"params": groups["head"] + groups["norm"], "lr": meth.config.head_lr})
    for g in pg:
        for p in g["params"]:
            p.requires_grad_(True)
    opt = torch.optim.Adam(pg, weight_decay=meth.config.weight_decay, capturable=capturable)
    base = [float(g["lr"]) for g in opt.param_groups]
    if capturable:
        for g in opt.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), device=DEV)
    mtm.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in mtm.model.named_parameters()}
    return mtm, opt, base, params, [names[id(p)] for p in params]


def set_lr(opt, base, k):
    for g, b in zip(opt.param_groups, base, strict=True):
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(b * LAM(k))
        else:
            g["lr"] = b * LAM(k)


def step_fn(mtm, opt):
    def step(x, y):
        loss = F.cross_entropy(mtm(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def task_state(mtm):
    return {k: v.detach().clone() for k, v in mtm.model.state_dict().items() if TASK_KEY in k}


def diff(a, b):
    d = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a
         if a[k].is_floating_point()}
    worst = max(d.values(), default=0.0)
    first = next((k for k in a if d.get(k, 0) > 0), "-")
    return worst, first


def xbm_flips(a, b, thr=5e-3):
    ks = [k for k in a if k.endswith(".score")]
    return sum(int(((a[k] > thr) != (b[k] > thr)).sum()) for k in ks)


def run_eager(method, capturable):
    mtm, opt, base, _, _ = build(method, capturable)
    step = step_fn(mtm, opt)
    for k, (x, y) in enumerate(BATCHES):
        set_lr(opt, base, k)
        opt.zero_grad(set_to_none=True)
        step(x, y)
    if CUDA:
        torch.cuda.synchronize()
    return task_state(mtm)


def run_graph(method, variant, oracle=True, dump=None):
    """train_task(cuda_graph=True)'s loop (abd8e66, _GraphedStep), with a teacher-forced oracle."""
    mtm, opt, base, params, pnames = build(method, CUDA)
    step = step_fn(mtm, opt)
    if oracle:
        o_mtm, o_opt, _, o_params, _ = build(method, CUDA)
        o_step = step_fn(o_mtm, o_opt)
    graph = sx = sy = sloss = None
    graph_grads = None  # the grads the graph writes (p.grad is re-pointed by eager steps)
    shared = torch.cuda.Stream(DEV) if CUDA and variant == "same_stream" else None
    rows, loss = [], None
    for k, (x, y) in enumerate(BATCHES):
        set_lr(opt, base, k)
        if oracle:  # the oracle starts this step from the graphed model's exact state
            with torch.no_grad():
                for p, q in zip(params, o_params, strict=True):
                    q.copy_(p)
                for p, q in zip(params, o_params, strict=True):
                    if p in opt.state:
                        o_opt.state[q] = {n: v.clone() for n, v in opt.state[p].items()}
            set_lr(o_opt, base, k)
        if not CUDA:
            kind = "eager(dry)"
            opt.zero_grad(set_to_none=True)
            loss = step(x, y)
        elif graph is not None and x.shape == sx.shape:
            kind = "replay"
            sx.copy_(x)
            sy.copy_(y)
            graph.replay()
            loss = sloss
        elif graph is not None:
            kind = "eager-small"
            opt.zero_grad(set_to_none=True)
            loss = step(x, y)
        elif k < 3:
            kind = "warm-up"
            opt.zero_grad(set_to_none=True)
            side = shared or torch.cuda.Stream(DEV)  # as_test: a fresh side stream per step
            side.wait_stream(torch.cuda.current_stream(DEV))
            with torch.cuda.stream(side):
                loss = step(x, y)
            torch.cuda.current_stream(DEV).wait_stream(side)
        else:
            kind = "capture+replay"
            sx, sy = x.clone(), y.clone()
            opt.zero_grad(set_to_none=True)
            if variant == "same_stream":
                loss = None  # drop the last autograd graph (and its AccumulateGrad streams)
                gc.collect()
            graph = torch.cuda.CUDAGraph()
            if dump:
                graph.enable_debug_mode()
            override = variant == "override" and hasattr(torch.autograd.graph,
                                                          "set_override_stale_capture_stream")
            if override:
                torch.autograd.graph.set_override_stale_capture_stream(True)
            try:
                with torch.cuda.graph(graph, stream=shared):
                    sloss = step(sx, sy)
            finally:
                if override:
                    torch.autograd.graph.set_override_stale_capture_stream(False)
            if dump:
                graph.debug_dump(dump)
            graph_grads = [p.grad for p in params]
            graph.replay()
            loss = sloss
        if oracle:
            o_opt.zero_grad(set_to_none=True)
            o_loss = o_step(x, y)
            if CUDA:
                torch.cuda.synchronize()
            cur = graph_grads if kind in ("replay", "capture+replay") else [p.grad for p in params]
            g = {n: t for n, t in zip(pnames, cur, strict=True) if t is not None}
            og = {n: q.grad for n, q in zip(pnames, o_params, strict=True) if q.grad is not None}
            dl = abs(float(loss) - float(o_loss))
            dg = diff(g, og) if g.keys() == og.keys() else (float("inf"), "grad sets differ")
            dp = diff(dict(zip(pnames, params, strict=True)),
                      dict(zip(pnames, o_params, strict=True)))
            rows.append((k, kind, dl, dg, dp))
    if CUDA:
        torch.cuda.synchronize()
    return task_state(mtm), rows, graph


def dot_summary(path):
    if not os.path.exists(path):
        return "no dump"
    with open(path) as f:
        text = f.read()
    types = collections.Counter(re.findall(r"\b(KERNEL|MEMSET|MEMCPY|EMPTY|EVENT_RECORD|WAIT_EVENT"
                                           r"|HOST|MEM_ALLOC|MEM_FREE)\b", text))
    kern = collections.Counter(re.findall(r"(\w*(?:reduce|elementwise|fill|pad|copy|index|"
                                          r"foreach|multi_tensor|conv|gemm|bn_)\w*)", text))
    return f"node types {dict(types)}; kernel-name tokens {kern.most_common(10)}"


summary = {}
t0 = time.time()
for method in args.methods.split(","):
    e_cap = run_eager(method, CUDA)
    e_plain = run_eager(method, False)
    for variant in args.variants.split(","):
        if variant in ("native", "fn_noq") and method not in ("xbm", "xma"):
            continue
        set_variant(variant)
        if variant in ("native", "fn_noq"):  # their own eager references
            e_cap, e_plain = run_eager(method, CUDA), run_eager(method, False)
        dump = (os.path.join(args.out, f"{method}_{variant}.dot")
                if CUDA and variant in ("as_test", "native") else None)
        g_state, rows, _ = run_graph(method, variant, dump=dump)
        set_variant("as_test")
        d_cap, d_plain = diff(g_state, e_cap), diff(g_state, e_plain)
        say(f"\n== {method} / {variant}: end state vs eager(capturable Adam) max {d_cap[0]:.3e} "
            f"(first {d_cap[1]}); vs eager(plain Adam, the test) max {d_plain[0]:.3e} "
            f"(first {d_plain[1]})"
            + (f"; XBM mask bits differing {xbm_flips(g_state, e_cap)} / "
               f"{xbm_flips(g_state, e_plain)}" if method == "xbm" else ""))
        first_bad = next((r for r in rows if r[2] > 0 or r[3][0] > 0 or r[4][0] > 0), None)
        for k, kind, dl, dg, dp in rows:
            say(f"  step {k:2d} {kind:15s} loss {dl:.2e} grad {dg[0]:.2e} ({dg[1]}) "
                f"param {dp[0]:.2e} ({dp[1]})")
        say("  first teacher-forced difference:", first_bad[:2] if first_bad else "none")
        if dump:
            say("  graph:", dot_summary(dump))
        summary[f"{method}/{variant}"] = dict(end_vs_capturable=d_cap, end_vs_plain=d_plain,
                                              first=first_bad[:2] if first_bad else None)
say("\nPython backwards ran on (stream, thread) by (Function, capturing):")
for key, val in sorted(SEEN.items()):
    say("  ", key, val)
say(f"\n{time.time() - t0:.0f} s")
with atomic_path(os.path.join(args.out, "graph_probe.json")) as tmp, open(tmp, "w") as f:
    json.dump({"summary": summary, "seen": {str(k): v for k, v in SEEN.items()}}, f, indent=1,
              default=str)
LOG.close()
