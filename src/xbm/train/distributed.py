"""Data-parallel adaption over several processes (``torchrun``), without DDP's wrapper.

A task's trainable state is small (XBM: one score per crossbar column) and the backbone is frozen,
so each rank keeps a full replica and only the task's gradients are averaged after every backward
(one flattened all-reduce). Every rank walks the same seeded batch order and takes every
``world``-th batch, so a step sees ``world`` batches at once (the per-process batch size stays
``--batch-size``; the learning rates are not rescaled). At the end of a task its per-task BatchNorm
statistics are averaged and rank 0's task state is broadcast, so all ranks hold bit-identical
state and every later evaluation agrees. Pretraining is not distributed: rank 0 pretrains and
caches the backbone while the others wait, then they load it.

Launch: ``torchrun --standalone --nproc_per_node=N -m xbm demo ...`` (or
``bash scripts/distributed.sh N demo ...``). NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def launched() -> bool:
    """True in a process that ``torchrun`` started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


#: How long ranks wait at a barrier (rank 0 may be pretraining the backbone meanwhile).
TIMEOUT = timedelta(hours=4)


def local_gpu() -> int | None:
    """This rank's GPU index under torchrun (``LOCAL_RANK``), or None without a GPU for it."""
    if not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return local if local < torch.cuda.device_count() else None


def init_from_env() -> None:
    """Join the process group ``torchrun`` describes (once); a no-op in a single process.

    Gloo carries CPU tensors and NCCL CUDA ones (``cpu:gloo,cuda:nccl``), so ``--device cpu``
    works on a GPU host too. A rank with no GPU of its own (more processes than GPUs) runs on
    CPU when asked to, and gets a clear error from ``resolve_device`` otherwise.
    """
    if not launched() or dist.is_initialized():
        return
    # torch.distributed.nn binds ``group.WORLD`` as default arguments when it is imported.
    # Imported after init_process_group (torch._dynamo imports it, and the first optimizer
    # imports torch._dynamo), it holds the default group for the life of the process:
    # destroy_process_group then cannot free it, gloo's threads outlive shutdown() and die in
    # interpreter teardown, where a rank aborted now and then (SIGABRT, "terminate called
    # without an active exception"). Imported first, its defaults are None.
    import torch.distributed.nn  # noqa: F401
    gpu = local_gpu()
    if gpu is not None:
        torch.cuda.set_device(gpu)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)


def shutdown() -> None:
    """Leave the process group (NCCL warns if a process exits without this).

    A barrier first, so that no rank tears its transport down while another still talks to it.
    The group is freed here, its threads joined, only because ``init_from_env`` imports
    torch.distributed.nn before it creates the group (see there): otherwise the group outlived
    this call and a gloo rank aborted at exit now and then."""
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_world_size() > 1:
                dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: leave all the same
            pass
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints and writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first (it may pretrain and cache), then on the others (they load)."""
    if not active():
        return fn()
    if is_main():
        out = fn()
        barrier()
        return out
    barrier()
    return fn()


def sum_over_ranks(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place (state a method gathers from its own batches)."""
    if active():
        for t in tensors:
            dist.all_reduce(t)


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks, in one flattened all-reduce.

    Assumes every rank has gradients for the same parameters, which holds because every rank
    runs the same model, method and task on same-shaped batches."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def sync_task_state(module: nn.Module, prefix: str) -> None:
    """Average the floating buffers (BatchNorm statistics) under ``prefix`` over ranks, then
    broadcast rank 0's parameters and buffers under it, so every rank holds identical state."""
    if not active():
        return
    named = [(k, t) for k, t in list(module.named_parameters()) + list(module.named_buffers())
             if prefix in k]
    world = world_size()
    with torch.no_grad():
        for k, t in named:
            if k.endswith(("running_mean", "running_var")) and t.is_floating_point():
                dist.all_reduce(t)
                t /= world
    broadcast_task_state(module, prefix)


def broadcast_task_state(module: nn.Module, prefix: str) -> None:
    """Give every rank rank 0's parameters and buffers under ``prefix``: called before a task
    trains, so that ranks whose initial state differs (a head drawn under another seed, in a
    Python script that seeds per rank) compute their gradients on one model, not each on its
    own (the end's broadcast would hide it)."""
    if not active():
        return
    named = [t for k, t in list(module.named_parameters()) + list(module.named_buffers())
             if prefix in k]
    with torch.no_grad():
        for t in named:
            # through a copy_, so the tensor's version counter moves and caches keyed on it
            # (XMA2's PE selection) see the new values
            tmp = t.detach().clone()
            dist.broadcast(tmp, src=0)
            t.detach().copy_(tmp)


__all__ = ["active", "all_reduce_grads", "barrier", "broadcast_task_state", "init_from_env",
           "is_main", "launched", "local_gpu", "main_first", "rank", "shutdown",
           "sum_over_ranks", "sync_task_state", "world_size"]
