"""Data-parallel adaption under torchrun (gloo on CPU, two ranks, loopback rendezvous)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")

WORKER = """
import json
import os
import sys
import torch
from xbm.data import make_fixture_task
from xbm.hardware import get_spec
from xbm.models import create_model
from xbm.multitask import MultiTaskModel
from xbm.train import seed_everything, train_task
from xbm.train import distributed as xdist

out, method, batch, cfg = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
skew = int(sys.argv[5]) if len(sys.argv) > 5 else 0  # a per-rank seed for the task's init
torch.set_num_threads(1)
xdist.init_from_env()
pre_sync = {}
_sync = xdist.sync_task_state


def recording_sync(module, prefix):  # what each rank holds before the end-of-task sync
    pre_sync.update({k: v.clone() for k, v in module.state_dict().items()
                     if prefix in k and k.endswith("pe_mask")})
    _sync(module, prefix)


xdist.sync_task_state = recording_sync
bcast = {}
_bcast = xdist.broadcast_task_state


def recording_bcast(module, prefix):  # each rank's task state before and after the first one
    first = not bcast
    if first:
        bcast["before"] = {k: v.clone() for k, v in module.state_dict().items() if prefix in k}
    _bcast(module, prefix)
    if first:
        bcast["after"] = {k: v.clone() for k, v in module.state_dict().items() if prefix in k}


xdist.broadcast_task_state = recording_bcast
torch.manual_seed(0)
mtm = MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1),
                     get_spec(rows=16, cols=16))
task = make_fixture_task("a", num_classes=3, n_train=64, n_test=32, seed=1)
seed_everything(5 + skew * xdist.rank())
mtm.add_task("a", 3, method, cfg)
loader, _ = task.loaders(batch, seed=0)
res = train_task(mtm, "a", loader, 2, torch.device("cpu"), progress=False)
x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
mtm.eval()
with torch.no_grad(), mtm.use_task("a"):
    logits = mtm(x)
torch.save({"state": mtm.task_state_dict("a"), "steps": res.steps, "logits": logits,
            "pre_sync": pre_sync, "bcast": bcast, "world": xdist.world_size()},
           f"{out}/rank{xdist.rank()}.pt")
me = xdist.rank()
xdist.shutdown()
# the process group's threads (gloo's) must be gone now, not left to interpreter teardown
task_dir = "/proc/self/task"
left = sorted(open(f"{task_dir}/{t}/comm").read().strip() for t in os.listdir(task_dir)
              if "gloo" in open(f"{task_dir}/{t}/comm").read()) if os.path.isdir(task_dir) else None
with open(f"{out}/rank{me}.threads.json", "w") as f:
    json.dump(left, f)
"""


def _env() -> dict[str, str]:
    # CPU ranks even on a GPU machine (it may have fewer GPUs than ranks)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONFAULTHANDLER="1")  # a rank that aborts prints where
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(tmp_path: Path, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    # torchrun makes a torchelastic_* folder under the temp dir and leaves it: in tmp_path,
    # not in /tmp (a thousand of them had gathered there)
    tmp = tmp_path / "torchrun-tmp"
    tmp.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *args], env=dict(_env(), TMPDIR=str(tmp)),
                          cwd=tmp_path, capture_output=True, text=True, timeout=240)


def _train(tmp_path: Path, method: str, cfg: dict, batch: int, nproc: int,
           skew: int = 0) -> list[dict]:
    out = tmp_path / f"{method}-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [str(script), str(out), method, str(batch), json.dumps(cfg), str(skew)]
    if nproc == 1:
        res = subprocess.run([sys.executable, *args], env=_env(), capture_output=True,
                             text=True, timeout=240)
    else:
        res = _torchrun(tmp_path, args, nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    return [{**torch.load(out / f"rank{r}.pt", weights_only=False),
             "threads_after_shutdown": json.loads((out / f"rank{r}.threads.json").read_text())}
            for r in range(nproc)]


@pytest.mark.parametrize("method,cfg", [
    ("xbm", {}),
    # a short warm-up, so PE selection happens during training (8 steps per rank)
    ("xma2", {"warmup_steps": 2, "pe_budget": 0.3}),
])
def test_ranks_end_with_identical_task_state(tmp_path, method, cfg):
    """Per-task BN trains on each rank's own batches; the end-of-task sync (BN statistics
    averaged, rank 0's state broadcast) and the averaged gradients leave the ranks identical,
    outputs included, and each rank took half the steps. XMA2's PEs, chosen from warm-up
    gradients that each rank's hooks see only locally, are the same on both ranks before the
    sync too."""
    r0, r1 = _train(tmp_path, method, {"per_task_bn": True, **cfg}, 8, 2)
    assert r0["world"] == 2 and r0["steps"] == r1["steps"] == 2 * (64 // 8 // 2)
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert torch.equal(r0["logits"], r1["logits"])
    if method == "xma2":
        assert r0["pre_sync"] and r0["pre_sync"].keys() == r1["pre_sync"].keys()
        assert sum(int(v.sum()) for v in r0["pre_sync"].values()) > 0  # some PE was chosen
        for k in r0["pre_sync"]:
            assert torch.equal(r0["pre_sync"][k], r1["pre_sync"][k]), k


def test_shutdown_frees_the_process_group(tmp_path):
    """After training, xdist.shutdown() leaves no gloo thread behind. The first optimizer
    imports torch._dynamo, which imports torch.distributed.nn, whose default arguments bind the
    default group when imported: imported after init_process_group, it kept the group (and its
    threads) alive past destroy_process_group, into interpreter teardown, where a rank aborted
    now and then (SIGABRT, "terminate called without an active exception", in CI)."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux's /proc to list a process's threads")
    ranks = _train(tmp_path, "xbm", {}, 8, 2)
    assert [r["threads_after_shutdown"] for r in ranks] == [[], []]


def test_ranks_start_from_rank_0s_task_state(tmp_path):
    """A script that seeds each rank differently draws another head on rank 1. Each rank then
    trained its own model on averaged gradients, and the end's broadcast hid it: the result
    depended on a state that was thrown away. Rank 0's state is now broadcast before the first
    step, so both ranks start alike and rank 1's seed changes nothing."""
    r0, r1 = _train(tmp_path, "xbm", {}, 8, 2, skew=1)
    before0, before1 = r0["bcast"]["before"], r1["bcast"]["before"]
    assert any(not torch.equal(before0[k], before1[k]) for k in before0)  # the skew took
    for k, v in r0["bcast"]["after"].items():
        assert torch.equal(v, r1["bcast"]["after"][k]) and torch.equal(v, before0[k]), k
    # and the run ends where an unskewed one does (up to float summation order across runs)
    same = _train(tmp_path, "xbm", {}, 8, 2)[0]["state"]
    for k, v in r0["state"].items():
        assert torch.allclose(v.float(), same[k].float(), atol=1e-6), k


def test_two_ranks_equal_one_process_with_the_joint_batch(tmp_path):
    """Without batch statistics (frozen base BN), rank 0's batch i and rank 1's batch i+1 of
    the shared order together are the single process's batch at twice the size: the averaged
    gradient is the same, so the scores agree up to float summation order."""
    two = _train(tmp_path, "xbm", {"per_task_bn": False}, 8, 2)[0]["state"]
    one = _train(tmp_path, "xbm", {"per_task_bn": False}, 16, 1)[0]["state"]
    scores = [k for k in one if k.endswith("score")]
    assert scores
    for k in scores:
        assert torch.allclose(two[k], one[k], atol=1e-6), k
    assert not all(torch.equal(one[k], torch.full_like(one[k], 1e-2)) for k in scores)


def test_cli_under_torchrun_prints_once(tmp_path):
    res = _torchrun(tmp_path, ["-m", "xbm", "map", "--model", "resnet18_cifar", "--json"])
    assert res.returncode == 0, res.stderr[-3000:]
    json.loads(res.stdout)  # one JSON document: rank 1's stdout is silenced


WARM_WORKER = """
import sys
import warnings
import torch
from xbm.data import make_fixture_task
from xbm.hardware import get_spec
from xbm.models import create_model
from xbm.multitask import MultiTaskModel
from xbm.train import seed_everything, train_task
from xbm.train import distributed as xdist

out, mode = sys.argv[1], sys.argv[2]
warnings.simplefilter("ignore")  # the first call ends inside the warm-up, as intended
torch.set_num_threads(1)
xdist.init_from_env()
spec = get_spec(rows=16, cols=16, pe_rows=1, pe_cols=1)
task = make_fixture_task("t", num_classes=4, n_train=64, n_test=32, seed=0)


def model():
    torch.manual_seed(0)
    return MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1), spec)


mtm = model()
seed_everything(0)
mtm.add_task("t", 4, "xma2", {"warmup_steps": 3, "pe_budget": 0.25})
train_task(mtm, "t", task.loaders(16, seed=0)[0], 1, torch.device("cpu"), progress=False)
if mode == "bundle":  # as xbm adapt saves: rank 0 writes, every rank loads
    if xdist.is_main():
        mtm.save_bundle(f"{out}/warm.safetensors")
    xdist.barrier()
    mtm = model()
    mtm.load_bundle(f"{out}/warm.safetensors")
mtm.set_trainable("t")
seed_everything(1)
train_task(mtm, "t", task.loaders(16, seed=1)[0], 1, torch.device("cpu"), progress=False)
assert mtm.methods["t"]._selected
if xdist.is_main():
    torch.save([st.pe_score.clone() for _, _, st in mtm.layer_states("t")],
               f"{out}/{mode}.pt")
xdist.shutdown()
"""


def test_a_warm_up_bundle_saved_under_torchrun_selects_as_training_on(tmp_path):
    """Each rank summed the warm-up gradients of its own batches and rank 0 saved only its
    share, which every rank then loaded: after the load the PEs were chosen from twice rank
    0's share. Now the sums are gathered on rank 0 when a call ends inside the warm-up."""
    script = tmp_path / "warm_worker.py"
    script.write_text(WARM_WORKER)
    for mode in ("direct", "bundle"):
        res = _torchrun(tmp_path, [str(script), str(tmp_path), mode])
        assert res.returncode == 0, res.stderr[-3000:]
    direct, loaded = (torch.load(tmp_path / f"{m}.pt") for m in ("direct", "bundle"))
    assert len(direct) == len(loaded) > 0
    for a, b in zip(direct, loaded, strict=True):
        assert torch.equal(a, b)
