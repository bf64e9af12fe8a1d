"""Training and evaluation loops shared by pretraining, adaption and the demo."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from xbm.config import check_seed
from xbm.errors import ConfigError, XbmError
from xbm.multitask import MultiTaskModel
from xbm.nn import BASE_TASK
from xbm.nn.modes import eval_mode
from xbm.train import distributed as xdist


def seed_everything(seed: int) -> None:
    """Seed Python, torch (CPU and CUDA): the same seed on the same device gives the same masks.

    On CUDA, seeds alone are not enough: cuDNN's autotuner and its fastest backward kernels
    (and atomics-based ops such as ``index_add``) reorder floating-point sums from run to run.
    So where CUDA is present this also turns off cuDNN benchmarking, asks for cuDNN's
    deterministic kernels and PyTorch's deterministic algorithms (``warn_only``: an op without
    a deterministic version warns rather than fails), and sets ``CUBLAS_WORKSPACE_CONFIG`` if
    the user has not. CPU runs are deterministic as they are and are left alone.
    """
    seed = check_seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.cuda.manual_seed_all(seed)


def resolve_device(device: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when present; an unavailable device is a clear error."""
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if xdist.launched():  # under torchrun: this process's GPU
            gpu = xdist.local_gpu()
            if gpu is None:
                raise XbmError(
                    f"torchrun rank with LOCAL_RANK={os.environ.get('LOCAL_RANK')} has no GPU of "
                    f"its own ({torch.cuda.device_count()} visible); start at most that many "
                    "processes per node, or pass --device cpu")
            return torch.device("cuda", gpu)
        return torch.device("cuda")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise XbmError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N") from None
    _check_supported(dev, device, "--device ")
    return dev


def _check_supported(dev: torch.device, given: object, flag: str) -> None:
    """A device xbm cannot run on, refused in one line (torch's own error was an
    AssertionError for CUDA on a CPU-only build); ``flag`` prefixes the fix (the CLI's)."""
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {given!r} is not supported (xbm runs on cpu and cuda); use "
                          f"{flag}cpu or {flag}cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {given!r} requested but CUDA is not available; use "
                          f"{flag}cpu")


#: Seconds between the plain progress lines written where stderr is not a terminal (a log
#: file, CI, ``| tee``): a bar would fill the log with carriage returns, and nothing at all
#: left minutes of pretraining silent. ``XBM_PROGRESS=1`` forces the bar.
LOG_PROGRESS_SECONDS = 30.0


class ProgressClock:
    """When the last plain progress line of one run was written (or the run began), shared by
    that run's epochs: each epoch is its own loop, and a clock that restarted with every epoch
    let a run of 22-second epochs write no line at all."""

    def __init__(self) -> None:
        self.last: float | None = None


class _LogProgress:
    """Iterate ``iterable``, writing ``desc: i/total (p%), Ns, ~Ms left`` to stderr at most
    every :data:`LOG_PROGRESS_SECONDS` (so a short loop writes nothing), timed by ``clock``
    across a run's epochs when given. With ``later_epochs`` (whole epochs still to come after
    this one) the line also gives the time left in all, so a log reader is not told "11 s
    left" with two epochs to go."""

    def __init__(self, iterable: Iterable, total: int, desc: str,
                 every: float | None = None, later_epochs: int = 0,
                 clock: ProgressClock | None = None) -> None:
        self.iterable, self.total, self.desc = iterable, total, desc
        self.every = LOG_PROGRESS_SECONDS if every is None else every
        self.later_epochs = later_epochs
        self.clock = clock if clock is not None else ProgressClock()

    def __iter__(self):
        t0 = time.perf_counter()
        if self.clock.last is None:
            self.clock.last = t0
        for i, item in enumerate(self.iterable, 1):
            yield item
            now = time.perf_counter()
            if now - self.clock.last >= self.every and i < self.total:
                self.clock.last = now
                per_step = (now - t0) / i
                left = per_step * (self.total - i)
                tail = f"~{left:.0f}s left"
                if self.later_epochs:
                    every_left = left + per_step * self.total * self.later_epochs
                    tail = f"~{left:.0f}s left in this epoch, ~{every_left:.0f}s in all"
                print(f"{self.desc}: {i}/{self.total} ({100 * i / self.total:.0f}%), "
                      f"{now - t0:.0f}s, {tail}", file=sys.stderr, flush=True)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool,
              later_epochs: int = 0, clock: ProgressClock | None = None):
    """A progress bar on a terminal, timed plain lines elsewhere, nothing when disabled.
    ``later_epochs``: whole epochs after this one, for the plain lines' time left in all;
    ``clock``: one per run, so that the plain lines' 30 seconds run on across its epochs."""
    if not enabled:
        return iterable
    if not sys.stderr.isatty() and os.environ.get("XBM_PROGRESS") != "1":
        return _LogProgress(iterable, total, desc, later_epochs=later_epochs, clock=clock)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _shard(loader, world: int, rank: int, per_rank: int):
    """This rank's batches: every ``world``-th of the loader's order, ``per_rank`` of them."""
    if world == 1:
        yield from loader
        return
    for i, batch in enumerate(loader):
        if i >= per_rank * world:
            return
        if i % world == rank:
            yield batch


@dataclass
class TrainResult:
    train_seconds: float
    steps: int
    final_loss: float
    cuda_graph: bool = False
    """Whether steps were replayed from a CUDA graph (see :func:`train_task`): false where the
    method or a ``torchrun`` launch kept training eager, or it ended before a capture."""


def cosine_lambda(total_steps: int):
    """Per-iteration cosine decay to zero (KSM's schedule)."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


#: Steps between two loss read-backs for the progress bar (each read synchronises a GPU).
POSTFIX_EVERY = 10


#: Adaption precisions :func:`train_task` takes; ``auto`` is bf16 on CPUs with native bf16
#: units and fp32 elsewhere (``xbm.train.pretrain.default_precision``), as the demo runs.
TRAIN_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")


class _GraphedStep:
    """Run a training step eagerly a few times, then capture it once as a CUDA graph and replay
    it for every later batch of the same shape (PyTorch's whole-network capture recipe).

    At the demo's batch sizes a GPU step is bound by the host launching a few hundred small
    kernels, not by the GPU; a replay launches them all at once. ``step(x, y)`` must run the
    forward, backward and optimizer step and return the loss, with the optimizer capturable and
    its learning rates device tensors (so a schedule can change them between replays). Batches of
    another shape (an epoch's last, smaller one) run eagerly, and so does every step before
    ``ready()`` is true (a method's own host-side warm-up: XMA2's PE selection).
    """

    #: eager steps before the capture: lazy allocations (Adam's state, cuDNN's plans) must
    #: happen outside the graph
    WARMUP = 3

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 device: torch.device, ready: Callable[[], bool] = lambda: True) -> None:
        self.step, self.device, self.ready = step, device, ready
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0
        self.x = self.y = self.loss = None
        self.full: tuple[torch.Size, torch.Size] | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 zero_grad: Callable[[], None]) -> torch.Tensor:
        shape = (x.shape, y.shape)
        if self.full is None:  # the first batch is a full one: only that shape is captured
            self.full = shape
        if self.graph is not None and shape == self.full:
            self.x.copy_(x, non_blocking=True)
            self.y.copy_(y, non_blocking=True)
            self.graph.replay()
            return self.loss
        zero_grad()
        if self.graph is not None or shape != self.full or not self.ready():
            # another shape (an epoch's last batch), or the method's own warm-up: plain eager
            return self.step(x, y)
        if self.eager_steps < self.WARMUP:  # the warm-up runs on a side stream, as capture needs
            cur = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                loss = self.step(x, y)
            cur.wait_stream(side)
            self.eager_steps += 1
            return loss
        # capture with every grad unset (zeroed above), so the backward allocates them in the
        # graph's pool and each replay writes (not adds) them; a capture records without
        # running: replay once
        self.x, self.y = x.clone(), y.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.loss = self.step(self.x, self.y)
        self.graph = g
        g.replay()
        return self.loss


def resolve_cuda_graph(cuda_graph: bool | None, device: torch.device) -> bool:
    """Whether adaption steps will replay from a CUDA graph. ``None`` (the demo's and ``xbm
    adapt``'s default) means on where ``device`` is CUDA: the replay is checked bit for bit
    against the eager step it records, and took a fifth to a quarter of the eager training time
    at the GPU default (docs/benchmarks.md, "GPU session 4"). ``True`` off CUDA is an error, not
    a silent fallback. Under ``torchrun`` (several processes) the answer is False whatever was
    asked: ``train_task`` then trains eagerly, and a header or record must say so."""
    if cuda_graph and device.type != "cuda":
        raise ConfigError(f"cuda_graph needs a CUDA device, got {device}; drop --cuda-graph "
                          "(cuda_graph=True in Python, cuda_graph: true in a config; None "
                          "means on with CUDA only) or use --device cuda")
    wanted = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    return wanted and xdist.world_size() == 1


def _device_of(mtm: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device; None means where the model's parameters are."""
    if device is None:
        return next(mtm.parameters()).device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r} ({exc}); use 'cpu', 'cuda' or 'cuda:N'"
                          ) from None
    _check_supported(dev, device, "device=")  # what the CLI's --device refuses
    return dev


class BatchSource(Protocol):
    """What :func:`train_task` reads: batches of (images, labels), iterated once per epoch,
    with a length (its cosine schedule spans epochs x len(loader) steps). A torch DataLoader,
    a list of batches and :meth:`xbm.data.TaskData.loaders`' loaders all are; a generator,
    without a length and spent after one pass, is not."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def train_task(mtm: MultiTaskModel, task: str, loader: BatchSource,
               epochs: int = 1, device: torch.device | str | None = None,
               progress: bool = True, max_steps: int | None = None,
               precision: str = "fp32", cuda_graph: bool | None = False,
               capturable: bool | None = None) -> TrainResult:
    """Train one task's state (and only it) on ``loader`` for ``epochs``.

    The optimizer sees only the task's parameters: the programmed backbone gets no gradient and no
    update, whatever the method does in its forward. Adam with the method's learning rates
    (``lr`` for its state, ``head_lr`` for the head and per-task norms) and a cosine schedule
    over all steps; the model is left in ``eval()`` mode with every parameter frozen.

    Args:
        mtm: the multi-task model holding ``task`` (added with :meth:`MultiTaskModel.add_task`).
        task: the learned task to train (not ``base``).
        loader: batches of (images, integer labels), e.g. a ``torch.utils.data.DataLoader``;
            it needs a length (the schedule's step count).
        epochs: passes over ``loader``.
        device: where the batches go (``"cpu"``, ``"cuda"``, a torch.device); default: where
            the model is. The model itself is not moved.
        progress: a progress bar (tqdm) per epoch.
        max_steps: stop after this many steps (the schedule spans them).
        precision: ``"fp32"``, ``"bf16"`` (below) or ``"auto"`` (bf16 on a CPU with native
            bf16 units, else fp32: what ``xbm demo`` and ``xbm adapt`` run).
        cuda_graph: replay each step from a CUDA graph (below); ``None``: where the device
            is CUDA, as ``xbm demo`` and ``xbm adapt`` do.
        capturable: capturable Adam without a graph (below).

    ``precision="bf16"`` runs each step's forward and loss under bfloat16 autocast: the
    parameters, their gradients and Adam's state stay fp32 (the masks and scores are learned in
    fp32), only the convolutions and matmuls run in bf16. On a CPU with native bf16 units it
    took 0.66-0.71x the time of an fp32 step at the same accuracy (docs/benchmarks.md, "Two
    adaption epochs"). Evaluation is always fp32.

    ``cuda_graph=True`` (CUDA only) captures the step once as a CUDA graph after three eager
    steps and replays it: at the demo's batch sizes an eager GPU step is bound by the host
    launching kernels, and a replay took a seventh to a fifth of its time at batch 32, half at
    batch 128 (docs/benchmarks.md, "GPU session 3" and "GPU session 4"). Adam then runs in its
    capturable form with the learning rates (and their cosine schedule) in device tensors. A
    replay computes exactly what that eager step computes (bit for bit on an H200, every method,
    warm-up, capture, replays and the eager steps for a smaller last batch;
    ``tests/test_cuda_graph.py``), but capturable Adam rounds differently
    from plain Adam, and a mask's training amplifies such differences (a score near its
    threshold flips or not), so against plain-Adam training a run agrees in accuracy, not digit
    for digit. A method's host-side warm-up (``graph_ready()`` false: XMA2 until its PE
    selection) runs eagerly before the capture; methods with ``graph_safe = False`` and runs
    under ``torchrun`` train eagerly throughout; ``TrainResult.cuda_graph`` says whether a
    graph was replayed.

    ``capturable`` (CUDA only; default: ``cuda_graph``) picks capturable Adam with device-tensor
    learning rates on its own: ``capturable=True, cuda_graph=False`` trains eagerly on the very
    arithmetic a graph replays, the reference a graphed run is checked against.

    Under ``torchrun`` (``xbm.train.distributed``) each rank takes every ``world``-th batch of
    the same seeded order, gradients are averaged after every backward, and the task's state is
    made identical on all ranks at the end.
    """
    device = _device_of(mtm, device)
    if task == BASE_TASK:
        raise XbmError(f"{BASE_TASK!r} is the pretrained backbone as programmed and cannot be "
                       "trained; add a task with add_task and train that")
    mtm.task_parameters(task)  # an unknown task fails here, naming the model's tasks
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    epochs = int(epochs)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(
            max_steps, numbers.Integral) or max_steps < 1):  # 0 trained a step at full lr
        raise ConfigError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    if precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"unknown adaption precision {precision!r}; choose one of: "
                          f"{', '.join(TRAIN_PRECISIONS)}")
    if precision == "auto":
        from xbm.train.pretrain import default_precision

        precision = default_precision(device)
    bf16 = precision == "bf16"
    if cuda_graph and capturable is False:  # a contradiction, whatever the device
        raise ConfigError("cuda_graph=True replays a capturable Adam step; drop capturable=False, "
                          "or set cuda_graph=False to train eagerly on plain Adam")
    # the device check and the torchrun rule (eager there) are resolve_cuda_graph's
    graphed = resolve_cuda_graph(None if cuda_graph is None else bool(cuda_graph), device)
    if graphed and capturable is False:  # cuda_graph=None on CUDA: plain Adam asked for
        graphed = False
    if capturable and device.type != "cuda":
        raise ConfigError(f"capturable Adam needs a CUDA device, got {device}")
    from xbm.nn.convert import check_float_dtypes

    check_float_dtypes(mtm.model)  # cast to float16/bfloat16 after its tasks were added
    world, rank = xdist.world_size(), xdist.rank()
    progress = progress and xdist.is_main()
    num_classes = mtm.tasks[task].num_classes
    _check_labels(loader, num_classes, task)
    method = mtm.methods[task]
    graphed = graphed and method.graph_safe
    capturable = graphed if capturable is None else bool(capturable)
    cfg = method.config
    prev_task = mtm.active_task
    mtm.set_task(task)
    try:
        method.on_task_start(mtm, task)
        xdist.broadcast_task_state(mtm, f"xbm_tasks.{task}.")  # one starting model for all ranks
        groups = mtm.task_parameters(task)
        param_groups = method.param_groups(groups["state"])
        head_norm = groups["head"] + groups["norm"]
        if head_norm:
            param_groups.append({"params": head_norm, "lr": cfg.head_lr})
        if not hasattr(loader, "__len__"):  # a generator: TypeError "has no len()" otherwise
            raise XbmError(f"train_task needs a loader with a length (the cosine schedule spans "
                           f"epochs x len(loader) steps), got a {type(loader).__name__}; pass a "
                           "torch DataLoader or a list of (images, labels) batches")
        per_epoch = len(loader) // world  # every rank takes the same number of steps
        if per_epoch == 0:
            raise XbmError(f"the loader yields {len(loader)} batch(es), too few for {world} "
                           "process(es); give it more training images or a smaller batch size "
                           "(xbm adapt: --batch-size)")
        for g in param_groups:
            for p in g["params"]:
                p.requires_grad_(True)
        opt = torch.optim.Adam(param_groups, weight_decay=cfg.weight_decay, capturable=capturable)
        trainable = [p for g in param_groups for p in g["params"]]
        total = epochs * per_epoch
        if max_steps is not None:
            total = min(total, max_steps)
        if capturable:
            # the schedule writes into device tensors that the captured Adam step reads
            lam, base_lrs = cosine_lambda(total), [float(g["lr"]) for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), device=device)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))

        def one_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # a fresh autocast context per step: autocast caches its bf16 copies of leaf tensors
            # until the context exits, so one around the loop would keep stale heads (and a graph
            # must not cache at all)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16,
                                cache_enabled=not graphed):
                loss = F.cross_entropy(mtm(x), y)
            loss.backward()
            xdist.all_reduce_grads(trainable)
            opt.step()
            # detached: a loss kept alive keeps its autograd graph, whose cached AccumulateGrad
            # nodes remember the warm-up's side stream; a capture reusing them warns of, and
            # synchronises on, the stale stream
            return loss.detach()

        def zero_grad() -> None:
            opt.zero_grad(set_to_none=True)

        graph_step = _GraphedStep(one_step, device, method.graph_ready) if graphed else None
        mtm.train()
        channels, images = _input_channels(mtm), _takes_images(mtm)
        step, last_loss = 0, None
        t0 = time.perf_counter()
        clock = ProgressClock()  # one per run: the plain lines' 30 s carry across epochs
        # the epochs that run: max_steps may end the run early, inside an epoch
        run_epochs = min(epochs, -(-total // per_epoch))
        for epoch in range(run_epochs):
            it = _progress(_shard(loader, world, rank, per_epoch),
                           min(per_epoch, total - epoch * per_epoch),
                           f"{task} [{method.name}] ep {epoch + 1}/{run_epochs}", progress,
                           later_epochs=run_epochs - epoch - 1, clock=clock)
            for batch in it:
                x, y = _pair(batch, channels, images)
                if step == 0:
                    _record_side(mtm, task, x, images)
                if y.device.type == "cpu":  # checked before the move: no GPU synchronisation
                    _check_label_range(y, num_classes, "a batch has labels", f"task {task!r}",
                                       _ADD_TASK_FIX)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if capturable:
                    for g, base in zip(opt.param_groups, base_lrs, strict=True):
                        g["lr"].fill_(base * lam(step))
                with _channels_named(x, mtm):
                    if graph_step is not None:
                        loss = graph_step(x, y, zero_grad)
                    else:
                        zero_grad()
                        loss = one_step(x, y)
                        if not capturable:
                            sched.step()
                step += 1
                # read back only every POSTFIX_EVERY steps: on a GPU each read waits for the device,
                # which would serialise the host's launches with the GPU's work on every step
                last_loss = loss.detach()
                if (progress and hasattr(it, "set_postfix") and not getattr(it, "disable", False)
                        and step % POSTFIX_EVERY == 0):
                    it.set_postfix(loss=f"{float(last_loss):.3f}")
                if step >= total:
                    break
            if step >= total:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        loss_v = float("nan") if last_loss is None else float(last_loss)
        replayed = graph_step is not None and graph_step.graph is not None
        if graph_step is not None:  # the grads live in the graph's memory pool: let both go
            zero_grad()
            del graph_step
        xdist.sync_task_state(mtm, f"xbm_tasks.{task}.")
        method.on_task_end(mtm, task)
        return TrainResult(train_seconds=secs, steps=step, final_loss=loss_v, cuda_graph=replayed)
    except BaseException:
        # a failed run gives the previously active task back, so that the next plain forward
        # is not the half-trained task's, in training mode (which would move its BatchNorm
        # statistics)
        mtm.set_task(prev_task)
        raise
    finally:
        # success or not, the model is left as documented: eval mode, every parameter frozen
        # (a task made trainable earlier by set_trainable too)
        for p in mtm.parameters():
            p.requires_grad_(False)
        mtm.eval()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (its active task) over ``loader``, in eval mode
    (every submodule's train/eval flag is restored); ``device``: where the batches go, default
    the model's.

    Raises:
        XbmError: a batch is not an (images, labels) pair, or has labels the model's outputs
            cannot name (a label >= the number of logits would silently count as wrong).
    """
    device = _device_of(model, device)
    task = getattr(model, "active_task", None)
    channels, images = _input_channels(model), _takes_images(model)
    correct = total = 0
    with eval_mode(model):  # each submodule's own flag comes back, also on an error
        for batch in loader:
            x, y = _pair(batch, channels, images)
            x, y = x.to(device), y.to(device)
            with _channels_named(x, model):
                logits = model(x)
            _check_label_range(y, logits.shape[1], "a batch has labels",
                               f"task {task!r}" if task else "the model",
                               "evaluate it on its own data, or fix the labels")
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.numel())
    if total == 0:
        raise XbmError("evaluation set is empty; use a larger --test-subset")
    return 100.0 * correct / total


#: The fix for a loader that yields single samples (a Dataset passed as it is).
_BATCH_IT = ("it yields single samples: batch them, e.g. torch.utils.data.DataLoader(dataset, "
             "batch_size=128, shuffle=True), or xbm.data.load_dataset(name).loaders(128)")


def _pair(batch: object, channels: int | None = None, images: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as (images, labels), checked: a dict batch (a Hugging Face style loader) failed
    with "'str' object has no attribute 'to'"; single samples, integer images and images of
    another channel count (``channels``: what the model takes, where it records it) failed
    inside torch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and \
            isinstance(batch[0], torch.Tensor) and isinstance(batch[1], (int, float)):
        raise XbmError(f"a batch is (image, {type(batch[1]).__name__} label): {_BATCH_IT}")
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and all(isinstance(t, torch.Tensor) for t in batch)):
        what = (f"a dict with keys {sorted(map(str, batch))[:4]}" if isinstance(batch, dict)
                else f"a {type(batch).__name__}" + (f" of {len(batch)}" if
                                                    isinstance(batch, (tuple, list)) else ""))
        raise XbmError(f"a batch must be a pair (images, labels) of tensors, got {what}; wrap "
                       "the loader, e.g. ((b['image'], b['label']) for b in loader) as a list")
    x, y = batch
    if y.dim() == 0:
        raise XbmError(f"a batch's label is one number (shape ()), for images of shape "
                       f"{tuple(x.shape)}: {_BATCH_IT}")
    if not x.is_floating_point():
        raise XbmError(f"a batch's images are {x.dtype}; the model takes floating-point "
                       "images, normalised as it was trained (xbm's loaders give float32 in "
                       "[-1, 1]): e.g. x.float() / 127.5 - 1 for uint8 images")
    if images and x.dim() == 3:  # one unbatched image to torch; N = its channels runs on
        raise XbmError(_no_channel_message(x))
    if channels is not None and x.dim() == 4 and x.shape[1] != channels:
        raise XbmError(_channel_message(x, channels, "the backbone takes"))
    # labels of shape (N, 1) broadcast against (N,) predictions into an N x N table (an accuracy
    # of 400%), and float or one-hot labels fail deep inside the loss
    if y.dim() != 1 or x.dim() == 0 or y.shape[0] != x.shape[0]:
        raise XbmError(f"a batch's labels must be one class index per image, shape "
                       f"({x.shape[0] if x.dim() else '?'},), got shape {tuple(y.shape)} for "
                       f"images of shape {tuple(x.shape)}; e.g. y.reshape(-1), or "
                       "y.argmax(1) for one-hot labels")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise XbmError(f"a batch's labels must be integer class indices, got {y.dtype}; e.g. "
                       "y.long()")
    if y.dtype != torch.int64:  # int32/16/8 labels: the loss takes int64 (or uint8) only
        y = y.long()
    return x, y


def _channel_message(x: torch.Tensor, takes: int, who: str) -> str:
    """A batch whose images have another channel count than the model takes, and the fix:
    grey to RGB can be repeated, RGB to grey is the user's choice of conversion."""
    got = x.shape[1]
    if got == 1:
        fix = (f"TaskData.with_channels({takes}) for xbm's datasets, or "
               f"x.expand(-1, {takes}, -1, -1)" if takes == 3 else
               "a backbone pretrained on 1 channel (xbm pretrain --channels 1)")
    else:
        fix = (f"load_dataset(PATH, channels={takes}) reads an image folder as grey, or "
               "convert the images (e.g. x.mean(1, keepdim=True))" if takes == 1 else
               f"convert the images to {takes} channels")
        fix += f", or a backbone pretrained on {got} channels (xbm pretrain --channels {got})" \
            if got == 3 else ""
    return (f"a batch's images have {got} channel(s) (shape {tuple(x.shape)}), {who} "
            f"{takes}: {fix}")


def _no_channel_message(x: torch.Tensor) -> str:
    return (f"a batch's images have shape {tuple(x.shape)}, without a channel dimension (torch "
            "reads that as one image of that many channels): add it, e.g. x.unsqueeze(1) for "
            "grey images")


#: torch's message for a convolution's input of another channel count, and its weight
_TORCH_CHANNELS = re.compile(r"expected input\[([\d, ]+)\] to have (\d+) channels, but got "
                             r"(\d+) channels")
_TORCH_WEIGHT = re.compile(r"weight of size \[([\d, ]+)\]")


def _ints(text: str) -> list[int]:
    """"2, 3, 12, 12" (a shape in torch's message) as [2, 3, 12, 12]."""
    return [int(v) for v in text.split(",")]


def _first_conv_weight_shape(model: nn.Module) -> list[int] | None:
    """The weight shape of the model's first convolution (in module order: its stem; 4-D for
    a 2-D convolution, 3-D for a Conv1d)."""
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(getattr(mod, "in_channels", None), int) and isinstance(w, torch.Tensor):
            return list(w.shape)
    return None


def _record_side(mtm: MultiTaskModel, task: str, x: torch.Tensor, images: bool) -> None:
    """Record the side of square images a task is trained on (``extra["image_size"]``), where
    nothing recorded one: ``xbm eval`` and ``xbm cost`` feed a bundle's task at it. ``xbm
    adapt`` records it itself; a task trained from Python recorded none, and the CLI fed it
    28x28 whatever it had learned at."""
    extra = mtm.tasks[task].extra
    if images and x.dim() == 4 and x.shape[-1] == x.shape[-2] and "image_size" not in extra:
        extra["image_size"] = int(x.shape[-1])


def _takes_images(model: nn.Module) -> bool:
    """Whether the model's first convolution is a 2-D one, so a batch is (N, C, H, W)."""
    shape = _first_conv_weight_shape(model)
    return shape is not None and len(shape) == 4


@contextlib.contextmanager
def _channels_named(x: torch.Tensor, model: nn.Module) -> Iterator[None]:
    """Name the fix when the model's first convolution refuses the batch: a model without a
    recorded ``arch`` (a user's own, a backbone built without ``arch=``) is not checked up
    front, and failed with torch's bare RuntimeError. Only torch's refusal of this very batch
    (its full shape, or the batch taken as one unbatched image: images without a channel
    dimension) by the model's first convolution (its weight's shape) is rewritten: a later
    convolution's refusal is the model's own bug, and passes through as it is."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        m, w = _TORCH_CHANNELS.search(text), _TORCH_WEIGHT.search(text)
        if m is None or w is None or _ints(w.group(1)) != _first_conv_weight_shape(model):
            raise
        seen = _ints(m.group(1))  # the input torch refused
        if x.dim() == 3 and seen == [1, *x.shape]:  # unbatched, as torch took it
            raise XbmError(_no_channel_message(x)) from exc
        if x.dim() == 4 and seen == list(x.shape) and int(m.group(3)) == x.shape[1]:
            raise XbmError(_channel_message(x, int(m.group(2)),
                                            "the model's first convolution takes")) from exc
        raise


def _input_channels(model: nn.Module) -> int | None:
    """The image channels a multi-task model records it takes (``arch``); None otherwise."""
    c = (getattr(model, "arch", None) or {}).get("in_channels") \
        if isinstance(getattr(model, "arch", None), dict) else None
    return c if isinstance(c, int) and not isinstance(c, bool) else None


#: The fix a training-side label error names.
_ADD_TASK_FIX = "add the task with the data's number of classes, or fix the labels"


def _check_label_range(y: torch.Tensor, num_classes: int, what: str, who: str,
                       fix: str) -> None:
    """Labels outside ``[0, num_classes)``: training failed with torch's "Target 9 is out of
    bounds" (on a GPU a device-side assert that ends the process), and evaluation silently
    scored them wrong. ``what`` opens the message ("a batch has labels"), ``who`` owns the
    classes."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise XbmError(f"{what} {lo} to {hi}, but {who} has {num_classes} classes (labels 0 "
                       f"to {num_classes - 1}); {fix}")


def _check_labels(loader: object, num_classes: int | None, task: str) -> None:
    """Checked once where the loader holds its labels (``BatchLoader``: xbm's own datasets);
    other loaders' batches are checked one by one."""
    y = getattr(loader, "y", None)
    if num_classes is not None and isinstance(y, torch.Tensor):
        _check_label_range(y, num_classes, "the loader's labels run from", f"task {task!r}",
                           _ADD_TASK_FIX)


def evaluate_task(mtm: MultiTaskModel, task: str,
                  loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  device: torch.device | str | None = None) -> float:
    """Top-1 accuracy in percent of ``task`` (``base`` allowed) over ``loader``; the active
    task is restored afterwards."""
    if task in mtm.tasks:
        _check_labels(loader, mtm.tasks[task].num_classes, task)
    with mtm.use_task(task):
        return evaluate(mtm, loader, device)
