"""Every registered method, table-driven over the registry, on toy models."""

from __future__ import annotations

import math
import re
import warnings
from typing import ClassVar

import pytest
import torch
from torch import nn

from xbm.data import make_fixture_task
from xbm.errors import ConfigError, UnknownNameError, XbmError
from xbm.hardware import get_spec
from xbm.methods import METHODS, create_method, list_methods
from xbm.models import create_model
from xbm.multitask import MultiTaskModel
from xbm.nn import crossbar_layers
from xbm.train import seed_everything, train_task

ALL = list_methods()


def make_mtm(seed: int = 0, model: str = "small_cnn") -> MultiTaskModel:
    torch.manual_seed(seed)
    bb = create_model(model, num_classes=4, in_channels=1)
    return MultiTaskModel(bb, get_spec(rows=16, cols=16))


def snapshot(mtm: MultiTaskModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in mtm.model.state_dict().items()}


@pytest.fixture(scope="module")
def task_a():
    return make_fixture_task("a", num_classes=3, n_train=64, n_test=32, seed=1)


@pytest.fixture(scope="module")
def task_b():
    return make_fixture_task("b", num_classes=5, n_train=64, n_test=32, seed=2)


def test_registry_has_the_issue_methods():
    for name in ("finetune", "linear-probe", "piggyback", "xbm", "xma", "xma2"):
        assert name in METHODS


#: Per-method settings for the table tests: XMA2's default warm-up (10 steps) is longer than the
#: toy tasks, and it would then never reach the PE re-programming it must be checked on.
TABLE_CONFIGS: dict[str, dict] = {"xma2": {"warmup_steps": 1, "pe_budget": 0.25}}


def _switch_some_off(mtm, task: str) -> None:
    """Score a third of a mask method's entries far below any threshold. Short training
    switches nothing off, and a mask of all ones hides a method that writes its mask into
    the backbone, or reads another task's."""
    scored = [st for _, _, st in mtm.layer_states(task) if hasattr(st, "score")]
    with torch.no_grad():
        for st in scored:
            st.score.view(-1)[::3] = -100.0  # off in every method (XMA: log2 space)
    if scored:
        assert mtm.masked_off_columns(task) + mtm.reprogrammed_cells(task) > 0


@pytest.mark.parametrize("per_task_bn", [True, False], ids=["task-bn", "frozen-bn"])
@pytest.mark.parametrize("method", ALL)
def test_training_step_touches_only_the_task_state(method, per_task_bn, task_a, task_b):
    """Also with Piggyback's frozen BN (per_task_bn off), where every task runs the shared
    BatchNorm: its statistics are backbone state and must not move."""
    mtm = make_mtm()
    x = torch.randn(4, 1, 28, 28)
    base_out = mtm(x).detach()
    programmed = {k: v.clone() for k, v in mtm.backbone_state().items()}  # before any task
    cfg = {**TABLE_CONFIGS.get(method, {}), "per_task_bn": per_task_bn}
    mtm.add_task("a", task_a.num_classes, method, cfg)
    seed_everything(0)
    loader, test = task_a.loaders(16, seed=0)
    train_task(mtm, "a", loader, 1, torch.device("cpu"), progress=False)
    _switch_some_off(mtm, "a")
    with mtm.use_task("a"):
        out_a = mtm(x).detach()
    before = snapshot(mtm)
    backbone_before = {k: v.clone() for k, v in mtm.backbone_state().items()}

    mtm.add_task("b", task_b.num_classes, method, cfg)
    _switch_some_off(mtm, "b")
    b_init = {k: v.clone() for k, v in mtm.task_state_dict("b").items()}
    # the method's own state in the crossbar layers (scores, levels, weight copies), apart from
    # the head and the per-task BatchNorm every method trains
    own = {(n, k): v.clone() for n, _, st in mtm.layer_states("b")
           for k, v in st.state_dict().items()}
    loader_b, _ = task_b.loaders(16, seed=0)
    train_task(mtm, "b", loader_b, 2, torch.device("cpu"), progress=False)
    after = mtm.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Only task b's state may change; task a and the programmed backbone are bit-identical.
    assert all(".xbm_tasks.b." in k or k.startswith("xbm_tasks.b.") for k in changed), changed
    for k, v in backbone_before.items():
        assert torch.equal(v, mtm.backbone_state()[k]), k
    assert programmed.keys() == mtm.backbone_state().keys()  # as programmed, before task a too
    for k, v in programmed.items():
        assert torch.equal(v, mtm.backbone_state()[k]), k
    with mtm.use_task("a"):
        assert torch.equal(mtm(x).detach(), out_a)
    with mtm.use_task("base"):
        assert torch.equal(mtm(x).detach(), base_out)
    # task b trained something
    b_now = mtm.task_state_dict("b")
    assert any(not torch.equal(b_init[k], b_now[k]) for k in b_init)
    # ...and not only the head: the method's own state learned (linear probe has none)
    now = {(n, k): v for n, _, st in mtm.layer_states("b") for k, v in st.state_dict().items()}
    assert now.keys() == own.keys()
    if any(v.is_floating_point() and v.numel() for v in own.values()):
        assert any(not torch.equal(own[k], now[k]) for k in own), method
    else:
        assert method == "linear-probe", f"{method} has no state of its own to learn"
    if not METHODS[method].reprograms_cells:
        assert mtm.reprogrammed_cells("b") == 0
    if method in TABLE_CONFIGS:  # XMA2 re-programmed PEs here, so the checks above covered it
        assert mtm.reprogrammed_cells("b") > 0


@pytest.mark.parametrize("method", ALL)
def test_every_method_reports_costs(method):
    mtm = make_mtm()
    mtm.add_task("a", 3, method)
    assert mtm.trainable_params("a") > 0
    # each method's mask memory by its formula, over the crossbar layers: Piggyback one bit per
    # weight, XBM one per crossbar column, XMA ceil(log2 levels) per column, XMA2 that plus a
    # bit per PE; the rest none
    layers = [layer for _, layer in crossbar_layers(mtm.model)]
    weights = sum(la.weight.numel() for la in layers)
    columns = sum(math.ceil(la.matrix_rows / 16) * la.matrix_cols for la in layers)
    level_bits = math.ceil(math.log2(len(mtm.methods["a"].config.levels))) \
        if method in ("xma", "xma2") else 0
    # PEs from the mapping report (pe_rows x pe_cols crossbars each), not the method's own mask
    pes = sum(lm.pes for lm in mtm.mapping().layers) if method == "xma2" else 0
    want = {"piggyback": weights, "xbm": columns, "xma": level_bits * columns,
            "xma2": level_bits * columns + pes}.get(method, 0)
    assert mtm.mask_bits("a") == want
    if not METHODS[method].reprograms_cells:
        assert mtm.reprogrammed_cells("a") == 0


def test_xbm_mask_is_one_bit_per_crossbar_column_and_never_reprograms():
    mtm = make_mtm()
    mtm.add_task("x", 3, "xbm")
    mtm.add_task("p", 3, "piggyback")
    expect_x = sum(math.ceil(layer.matrix_rows / 16) * layer.matrix_cols
                   for _, layer in crossbar_layers(mtm.model))
    expect_p = sum(layer.weight.numel() for _, layer in crossbar_layers(mtm.model))
    assert mtm.mask_bits("x") == expect_x
    assert mtm.mask_bits("p") == expect_p
    # switch some masks off: XBM still re-programs nothing, Piggyback counts masked cells.
    # XBM's off columns are scattered over every row tile, not row tile 0 alone (a count of
    # one tile's columns passed then)
    x_off = 0
    for _, _layer, st in mtm.layer_states("x"):
        with torch.no_grad():
            st.score.view(-1)[1::5] = -1.0
        x_off += int((st.score <= 0).sum())
    assert any(st.score.shape[0] > 1 and st.score[1:].le(0).any()
               for _, _, st in mtm.layer_states("x"))  # some off beyond the first row tile
    n_off = 0
    for _, _layer, st in mtm.layer_states("p"):
        with torch.no_grad():
            st.score.view(-1)[:3] = -1.0
        n_off += 3
    assert mtm.reprogrammed_cells("x") == 0
    assert mtm.masked_off_columns("x") == x_off
    assert mtm.reprogrammed_cells("p") == n_off * mtm.spec.cells_per_weight


def test_finetune_counts_changed_weights(task_a):
    mtm = make_mtm()
    mtm.add_task("f", task_a.num_classes, "finetune")
    assert mtm.reprogrammed_cells("f") == 0
    loader, _ = task_a.loaders(16, seed=0)
    train_task(mtm, "f", loader, 1, torch.device("cpu"), progress=False)
    changed = sum(int((st.weight != layer.weight).sum()) for _, layer, st in mtm.layer_states("f"))
    assert changed > 0
    assert mtm.reprogrammed_cells("f") == changed * mtm.spec.cells_per_weight


@pytest.mark.parametrize("method", ["piggyback", "xbm", "xma"])
def test_bf16_adaption_learns_fp32_state_and_leaves_the_backbone(method, task_a):
    """bf16 autocast runs only the forward in bf16: scores, head and Adam's state stay fp32,
    the backbone bit-identical, and the task's state does move; an fp32 run of the same seed
    gives another (but equally shaped) state, so the switch is not a no-op."""
    states = {}
    for precision in ("fp32", "bf16"):
        mtm = make_mtm()
        backbone = {k: v.clone() for k, v in mtm.backbone_state().items()}
        mtm.add_task("a", task_a.num_classes, method)
        init = {k: v.clone() for k, v in mtm.task_state_dict("a").items()}
        seed_everything(0)
        loader, _ = task_a.loaders(16, seed=0)
        tr = train_task(mtm, "a", loader, 1, torch.device("cpu"), progress=False,
                        precision=precision)
        assert math.isfinite(tr.final_loss)
        state = mtm.task_state_dict("a")
        assert all(v.dtype == init[k].dtype for k, v in state.items())
        assert any(not torch.equal(init[k], state[k]) for k in init)
        assert all(torch.equal(v, mtm.backbone_state()[k]) for k, v in backbone.items())
        states[precision] = state
    assert any(not torch.equal(states["fp32"][k], states["bf16"][k]) for k in states["fp32"])


def test_unknown_adaption_precision_is_refused(task_a):
    mtm = make_mtm()
    mtm.add_task("a", task_a.num_classes, "xbm")
    loader, _ = task_a.loaders(16, seed=0)
    with pytest.raises(ConfigError, match="unknown adaption precision 'fp16'"):
        train_task(mtm, "a", loader, 1, torch.device("cpu"), progress=False, precision="fp16")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("method", ["xbm", "piggyback"])
def test_same_seed_gives_same_masks(method, device, task_a):
    """The global RNG is left in another state before each run (the seed must do the work,
    not an RNG that happens to start alike), and another seed gives other scores (the seed
    reaches the run at all)."""
    dev = torch.device(device)
    scores = []
    for i, seed in enumerate((5, 5, 6)):
        mtm = make_mtm(seed=0, model="resnet18_cifar" if device == "cuda" else "small_cnn")
        torch.rand(i + 1)  # another global RNG state before each run
        seed_everything(seed)
        mtm.add_task("a", task_a.num_classes, method)
        mtm.to(dev)
        loader, _ = task_a.loaders(16, seed=0)
        train_task(mtm, "a", loader, 1, dev, progress=False)
        scores.append(torch.cat([st.score.flatten() for _, _, st in mtm.layer_states("a")]))
    assert torch.equal(scores[0], scores[1])
    assert not torch.equal(scores[0], scores[2])


def test_bn_switch_off_uses_frozen_base_bn(task_a):
    mtm = make_mtm()
    mtm.add_task("a", task_a.num_classes, "xbm", {"per_task_bn": False})
    groups = mtm.task_parameters("a")
    assert groups["norm"] == []
    mtm.add_task("b", task_a.num_classes, "xbm")
    assert len(mtm.task_parameters("b")["norm"]) > 0


def test_unknown_method_and_bad_config():
    with pytest.raises(UnknownNameError, match="xbm"):
        create_method("nope")
    with pytest.raises(ConfigError, match="lr"):
        create_method("xbm", {"lr": -1})
    with pytest.raises(ConfigError, match="bogus"):
        create_method("xbm", {"bogus": 1})
    with pytest.raises(ConfigError, match="mask_init"):
        create_method("piggyback", {"mask_init": 1e-3, "threshold": 5e-3})


def test_yaml_exponent_floats_are_read_as_numbers():
    """PyYAML (YAML 1.1) reads ``lr: 5e-4`` as the string '5e-4'; a float field takes it."""
    import yaml

    from xbm.train.demo import DemoConfig

    fields = yaml.safe_load("lr: 5e-4\nthreshold: 4e-3\n")
    assert fields["lr"] == "5e-4"  # the YAML quirk this guards against
    cfg = create_method("xbm", fields).config
    assert cfg.lr == 5e-4 and cfg.threshold == 4e-3
    with pytest.raises(ConfigError, match="lr must be a number, got 'fast'"):
        create_method("xbm", {"lr": "fast"})
    with pytest.raises(ConfigError, match="must be > 0"):
        create_method("xbm", {"lr": "-1e-3"})
    # only float fields are converted: a str field keeps its text
    assert DemoConfig.from_dict({"pretrain_augment": "none"}).pretrain_augment == "none"


def test_task_names_are_validated(tiny_mtm):
    with pytest.raises(XbmError, match="invalid"):
        tiny_mtm.add_task("bad.name", 3)
    tiny_mtm.add_task("ok", 3)
    with pytest.raises(XbmError, match="already exists"):
        tiny_mtm.add_task("ok", 3)
    with pytest.raises(XbmError, match="'base' is reserved for the pretrained backbone"):
        tiny_mtm.add_task("base", 3)
    with pytest.raises(XbmError, match="unknown task"):
        tiny_mtm.set_task("missing")


@pytest.mark.parametrize("model", ["resnet18_cifar", "vit_tiny"])
def test_methods_run_on_real_backbones(model):
    torch.manual_seed(0)
    kw = {"width": 4} if model == "resnet18_cifar" else {"width": 16}
    bb = create_model(model, num_classes=4, in_channels=1, **kw)
    mtm = MultiTaskModel(bb, get_spec(rows=32, cols=32))
    for m in ALL:
        t = m.replace("-", "_")
        mtm.add_task(t, 3, m)
        out = mtm(torch.randn(2, 1, 28, 28))
        out.sum().backward()
        assert out.shape == (2, 3)
        # the gradient reaches the task's own head, and no programmed weight takes one
        head = [p for k, p in mtm.named_parameters() if f"xbm_tasks.{t}." in k and
                k.startswith("model.fc.")]
        assert head and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in head)
        programmed = [p for k, p in mtm.named_parameters() if "xbm_tasks." not in k]
        assert programmed and all(p.grad is None for p in programmed), m
        mtm.zero_grad(set_to_none=True)


def test_mixed_task_batch_equals_per_task_forward(task_a, task_b):
    mtm = make_mtm()
    mtm.add_task("a", task_a.num_classes, "xbm")
    mtm.add_task("b", task_b.num_classes, "xma")
    for t, data in (("a", task_a), ("b", task_b)):
        loader, _ = data.loaders(16, seed=0)
        train_task(mtm, t, loader, 1, torch.device("cpu"), progress=False)
    mtm.set_task("a")
    x = torch.randn(7, 1, 28, 28)
    tasks = ["b", "a", "base", "b", "a", "a", "b"]
    out = mtm.forward_mixed(x, tasks)
    mtm.eval()
    for i, t in enumerate(tasks):
        with mtm.use_task(t):
            ref = mtm(x[i:i + 1])[0]
        assert out[i].shape == ref.shape and torch.allclose(out[i], ref, atol=1e-5), (i, t)
    assert [int(v) for v in mtm.predict_mixed(x, tasks)] == [int(o.argmax()) for o in out]
    assert mtm.active_task == "a"
    with pytest.raises(XbmError, match="one task per sample"):
        mtm.forward_mixed(x, tasks[:3])
    with pytest.raises(XbmError, match="unknown task"):
        mtm.forward_mixed(x[:1], ["nope"])


@pytest.mark.parametrize("method", ["xbm", "xma"])
def test_single_tile_fast_path_matches_the_general_path(method, monkeypatch):
    """Scaling a single-tile layer's output instead of its weight gives the same forward and
    the same gradients (up to summation order), and never touches the backbone."""
    import xbm.nn.layers as layers

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3, padding=1, bias=True)  # 9 rows: one tile
            self.c2 = nn.Conv2d(4, 6, 1, groups=2)  # 2 rows: one tile, grouped
            self.c3 = nn.Conv2d(6, 5, 3)  # 54 rows: four tiles (general path)
            self.l1 = nn.Linear(5, 7)  # 5 rows: one tile
            self.fc = nn.Linear(7, 3)

        def forward(self, x):
            x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
            return self.fc(torch.relu(self.l1(x.mean((2, 3)))))

    torch.manual_seed(0)
    mtm = MultiTaskModel(Net(), get_spec(rows=16, cols=16))
    mtm.add_task("t", 3, method)
    for _, _, st in mtm.layer_states("t"):  # a mix of levels, some columns off
        st.score.data = (torch.randn_like(st.score) * (1e-2 if method == "xbm" else 1.5))
    mtm.set_task("t")
    mtm.train()
    backbone = {k: v.clone() for k, v in mtm.backbone_state().items()}
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    params = [p for g in mtm.task_parameters("t").values() for p in g]

    def run(fast: bool):
        monkeypatch.setattr(layers, "SINGLE_TILE_FAST_PATH", fast)
        assert (mtm.model.c1.output_scale() is not None) == fast
        assert mtm.model.c3.output_scale() is None  # several tiles: never
        out = mtm(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *params], allow_unused=True)
        return out.detach(), grads

    out0, g0 = run(False)
    out1, g1 = run(True)
    # 0, 1 and powers of two scale exactly; only the bias may be added in another place
    torch.testing.assert_close(out0, out1, rtol=1e-6, atol=1e-7)
    for a, b in zip(g0, g1, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, mtm.backbone_state()[k]) for k, v in backbone.items())


@pytest.mark.parametrize("cfg,warns", [({"per_task_bn": False, "lr": 1e-3}, True),
                                         ({"per_task_bn": False, "lr": 7e-4}, True),
                                         ({"per_task_bn": False}, False),  # the default 5e-4
                                         ({"per_task_bn": False, "lr": 3e-4}, False),
                                         ({}, False)])
def test_piggyback_warns_about_a_high_mask_lr_with_frozen_bn_when_training(cfg, warns, task_a):
    """At training, not when the config is built: loading a trained task builds it too, and
    advice about its lr could not be acted on there."""
    mtm = make_mtm()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtm.add_task("a", task_a.num_classes, "piggyback", cfg)
    loader, _ = task_a.loaders(16, seed=0)
    if warns:
        with pytest.warns(UserWarning, match=f"per_task_bn false and lr {cfg['lr']:g}"):
            train_task(mtm, "a", loader, 1, torch.device("cpu"), progress=False, max_steps=1)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train_task(mtm, "a", loader, 1, torch.device("cpu"), progress=False, max_steps=1)


def test_final_loss_is_the_last_steps_loss(task_a, monkeypatch):
    """The loss is read back from the device only every few steps (a GPU would wait on each
    read); the reported final loss is still the last step's."""
    import torch.nn.functional as F

    seen = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    mtm = make_mtm()
    mtm.add_task("a", task_a.num_classes, "xbm")
    loader, _ = task_a.loaders(16, seed=0)
    res = train_task(mtm, "a", loader, 3, torch.device("cpu"), progress=True)
    assert res.steps == len(seen) == 3 * len(loader)
    assert res.final_loss == float(seen[-1].detach()) and math.isfinite(res.final_loss)


@pytest.mark.parametrize("method", ["piggyback", "xbm"])
def test_mask_defaults_are_piggybacks_recipe_and_fresh_scores_start_on(method):
    """Scores start at 1e-2 against a threshold of 5e-3 (Piggyback's and KSM's recipe), so every
    weight or column starts on: a new task starts as the backbone."""
    cfg = create_method(method).config
    assert (cfg.mask_init, cfg.threshold) == (1e-2, 5e-3)
    mtm = make_mtm()
    mtm.add_task("t", 3, method)
    for _, _, st in mtm.layer_states("t"):
        assert torch.equal(st.score, torch.full_like(st.score, 1e-2))
    assert mtm.masked_off_columns("t") == 0 and mtm.reprogrammed_cells("t") == 0


@pytest.mark.parametrize("method", ["piggyback", "xbm"])
def test_a_score_exactly_at_the_threshold_is_off_everywhere(method):
    """mask = score > threshold: a score equal to the threshold is off in the forward (its
    weights read as 0) and counted off by masked_off_columns / reprogrammed_cells alike."""
    mtm = make_mtm()
    mtm.add_task("t", 3, method)
    name, layer, st = next(iter(mtm.layer_states("t")))
    at = torch.tensor(5e-3, dtype=st.score.dtype)
    above = torch.nextafter(at, torch.tensor(1.0, dtype=st.score.dtype))
    out0 = st.score[0] if method == "piggyback" else st.score[:, 0]  # output 0's scores
    out1 = st.score[1] if method == "piggyback" else st.score[:, 1]
    with torch.no_grad():
        out0.fill_(at.item())  # exactly at the threshold
        out1.fill_(above.item())  # the next float above it
    w, _ = layer.effective_weight_and_bias("t")
    assert torch.equal(w[0], torch.zeros_like(w[0]))
    assert torch.equal(w[1], layer.weight[1])
    n_off = out0.numel()
    if method == "xbm":
        assert mtm.masked_off_columns("t") == n_off
    else:
        assert mtm.reprogrammed_cells("t") == n_off * layer.spec.cells_per_weight


@pytest.mark.parametrize("model", ["small_cnn", "vit_tiny"])
def test_every_method_exports_a_plain_torch_model_that_computes_its_task(model, task_a):
    """export_task (PEFT's merge_and_unload): for every registered method, a copy with no xbm
    class left, the backbone's state-dict keys, and the task's function; its state dict loads
    into a freshly built model of the architecture, which then computes the same; the
    converted model and its backbone are left as they were."""
    torch.manual_seed(0)
    kw = {"width": 16} if model == "vit_tiny" else {}
    mtm = MultiTaskModel(create_model(model, num_classes=4, in_channels=1, **kw),
                         get_spec(rows=16, cols=16))
    train, _ = task_a.loaders(16, seed=0)
    for m in ALL:
        seed_everything(0)
        mtm.add_task(m, 3, m, TABLE_CONFIGS.get(m))
        train_task(mtm, m, train, 1, torch.device("cpu"), progress=False)
    before = snapshot(mtm)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    for t in ["base", *ALL]:
        plain = mtm.export_task(t)
        assert not [type(m) for m in plain.modules() if type(m).__module__ == "xbm.nn.layers"]
        mtm.eval()
        with torch.no_grad(), mtm.use_task(t):
            want = mtm(x)
            torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
            fresh = create_model(model, num_classes=want.shape[1], in_channels=1, **kw).eval()
            fresh.load_state_dict(plain.state_dict())  # strict: the same keys and shapes
            torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
    assert sum(int(st.pe_mask.sum()) for _, _, st in mtm.layer_states("xma2")) > 0
    after = mtm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(XbmError, match="unknown task 'nope'"):
        mtm.export_task("nope")


def test_a_users_config_fields_are_checked_by_their_types():
    """A user's config class got no check of its bool and list fields: ``--set frozen=no``
    set the text 'no' (true), and ``--set levels=oops`` failed mid-training with a traceback."""
    from dataclasses import dataclass

    from xbm.errors import ConfigError
    from xbm.methods.xbm import XBMConfig

    @dataclass
    class Mine(XBMConfig):
        frozen: bool = False
        levels: list[float] = None  # None: a common default for a list field
        counts: tuple[int, ...] = (1, 2)

    Mine()
    assert Mine(frozen=True, levels=[0.5, 1], counts=(3,)).levels == [0.5, 1]
    import numpy as np

    as_list = Mine(levels=np.array([0.5, 1.0]))  # kept as a plain list: bundles record JSON
    assert type(as_list.levels) is list and as_list.levels == [0.5, 1.0]
    for kw, needle in (
            ({"frozen": "no"}, "Mine.frozen must be true or false, got 'no' (yes/no/on/off are "
             "text in YAML 1.2 and in --set: write true or false)"),
            ({"frozen": 1}, "Mine.frozen must be true or false, got 1"),
            ({"levels": "oops"}, "Mine.levels must be a list, got 'oops' (str)"),
            ({"levels": [1, "x"]}, "Mine.levels must be a list of finite numbers"),
            ({"levels": [1, float("nan")]}, "Mine.levels must be a list of finite numbers"),
            ({"counts": (1.5,)}, "Mine.counts must be a list of integers"),
            ({"per_task_bn": "yes"}, "Mine.per_task_bn must be true or false, got 'yes' (yes/no")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            Mine(**kw)


def test_register_method_checks_its_config_class():
    """A config class that is no MethodConfig failed at add_task with an AttributeError, and a
    subclass without @dataclass kept its parent's defaults, ignoring the ones it set."""
    from dataclasses import dataclass

    from xbm.methods import register_method
    from xbm.methods.xbm import XBM, XBMConfig

    class Plain:
        lr: float = 1e-3

    class NoDecorator(XBMConfig):
        threshold = 9e-3

    for cfg, needle in ((Plain, "config_class must be a subclass of xbm.methods.MethodConfig"),
                        (NoDecorator, "config_class test_register_method_checks_its_config_"
                         "class.<locals>.NoDecorator sets threshold but is not a @dataclass "
                         "itself")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            register_method("mine")(type("Mine", (XBM,), {"config_class": cfg}))
    assert "mine" not in METHODS

    @dataclass
    class Fine(XBMConfig):
        threshold: float = 9e-3

    class Inherits(XBMConfig):  # adds nothing: its parent's fields, as a dataclass
        """docs only"""

    class WithClassVar(XBMConfig):  # a ClassVar is no field
        note: ClassVar[str] = "x"

    for cfg in (Fine, Inherits, WithClassVar):
        try:
            register_method("mine")(type("Mine", (XBM,), {"config_class": cfg}))
        finally:
            METHODS.pop("mine", None)
