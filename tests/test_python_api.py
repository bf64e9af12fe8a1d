"""The Python API as a user meets it: clear errors before any state changes, and the model left
as it was when something fails (found by an audit that used xbm from Python, session 17)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import xbm
from xbm.errors import ConfigError, XbmError
from xbm.hardware.cost import task_costs
from xbm.methods import XBMConfig, create_method, list_methods
from xbm.models import create_model
from xbm.multitask import MultiTaskModel

SPEC = xbm.get_spec(rows=16, cols=16)


def _backbone(seed: int = 0, in_channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=4, in_channels=in_channels)


def _loader(n: int = 16, classes: int = 3, in_channels: int = 1, side: int = 28) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, in_channels, side, side, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_public_names_import() -> None:
    for name in xbm.__all__:
        assert getattr(xbm, name) is not None, name
    from xbm import methods

    for m in list_methods():  # every method's config class is reachable from xbm.methods
        cls = xbm.get_method_class(m).config_class
        assert getattr(methods, cls.__name__) is cls
    assert "XBMConfig(" in repr(create_method("xbm"))


def test_weights_loaded_after_conversion_are_the_ones_a_bundle_records(tmp_path) -> None:
    sd = _backbone(seed=1).state_dict()
    late = MultiTaskModel(_backbone(seed=2), SPEC)
    late.model.load_state_dict(sd)  # same keys after conversion
    late.add_task("t", 3, "xbm")
    late.save_bundle(tmp_path / "b.safetensors")
    early = _backbone(seed=2)
    early.load_state_dict(sd)
    fresh = MultiTaskModel(early, SPEC)
    assert fresh.backbone_hash == late.backbone_hash
    assert fresh.load_bundle(tmp_path / "b.safetensors") == ["t"]


@pytest.mark.parametrize("num_classes,says", [
    (4.0, "a positive integer"), ("4", "a positive integer"), (None, "a positive integer"),
    (True, "a positive integer"), (0, "a positive integer"),
    (1, "at least 2 (with one class every prediction is right and the training loss is "
     "always 0)"),  # it was taken, and training then learned nothing
])
def test_add_task_refuses_a_bad_class_count_before_creating_state(num_classes, says) -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    keys = set(mtm.state_dict())
    with pytest.raises(XbmError, match=re.escape(f"num_classes must be {says}")):
        mtm.add_task("c", num_classes, "xbm")
    assert set(mtm.state_dict()) == keys and mtm.task_names() == []
    mtm.add_task("c", np.int64(4), "xbm")  # a numpy integer is an integer
    assert mtm.tasks["c"].num_classes == 4 and type(mtm.tasks["c"].num_classes) is int


def test_add_task_rolls_back_when_a_layer_fails(monkeypatch) -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    keys = set(mtm.state_dict())
    cls = xbm.get_method_class("xbm")
    real, calls = cls.create_layer_state, []

    def second_fails(self, layer):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self, layer)

    monkeypatch.setattr(cls, "create_layer_state", second_fails)
    with pytest.raises(RuntimeError, match="boom"):
        mtm.add_task("c", 3, "xbm")
    assert set(mtm.state_dict()) == keys and mtm.task_names() == []
    assert mtm.active_task == "base"


def test_add_task_refuses_a_method_object_with_a_config() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    with pytest.raises(XbmError, match="not both"):
        mtm.add_task("c", 3, create_method("xbm"), {"lr": 5.0})


def test_spec_is_a_spec_or_a_preset_name() -> None:
    assert MultiTaskModel(_backbone(), "default").spec == xbm.get_spec("default")
    for bad in (None, 64, {"rows": 64}):
        with pytest.raises(XbmError, match="spec must be a CrossbarSpec"):
            MultiTaskModel(_backbone(), bad)
        with pytest.raises(XbmError, match="spec must be a CrossbarSpec or a preset name"):
            xbm.apply(_backbone(), bad)
    # apply takes a preset name too, as MultiTaskModel does (it refused one before session 19)
    model = xbm.apply(_backbone(), "isaac")
    layer = next(m for m in model.modules() if isinstance(m, xbm.nn.CrossbarLayer))
    assert layer.spec == xbm.get_spec("isaac")


def test_counts_of_an_unknown_task_are_an_error_not_zero() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("t", 3, "xbm")
    for fn in (mtm.mask_bits, mtm.reprogrammed_cells, mtm.masked_off_columns,
               mtm.trainable_params):
        with pytest.raises(XbmError, match="unknown task 'tt'; this model has: base, t"):
            fn("tt")
    # base learns nothing: every count says 0 for it, as the demo's base rows record
    # (trainable_params alone raised)
    assert mtm.mask_bits("base") == mtm.reprogrammed_cells("base") == \
        mtm.masked_off_columns("base") == mtm.trainable_params("base") == 0
    assert mtm.mask_bits("t") > 0 and mtm.trainable_params("t") > 0


def test_train_task_names_its_errors_and_takes_a_device_string() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("t", 3, "xbm")
    with pytest.raises(XbmError, match="unknown task 'nope'; this model has: base, t"):
        xbm.train_task(mtm, "nope", _loader(), 1, "cpu", progress=False)
    with pytest.raises(XbmError, match="cannot be trained"):
        xbm.train_task(mtm, "base", _loader(), 1, "cpu", progress=False)
    with pytest.raises(ConfigError, match="epochs must be a positive integer"):
        xbm.train_task(mtm, "t", _loader(), 0, progress=False)
    with pytest.raises(ConfigError, match="unknown device"):
        xbm.train_task(mtm, "t", _loader(), 1, "gpu0", progress=False)
    res = xbm.train_task(mtm, "t", _loader(), 1, "cpu", progress=False)
    assert res.steps == 2
    xbm.train_task(mtm, "t", _loader(), np.int64(1), progress=False)  # device: the model's
    assert 0.0 <= xbm.evaluate_task(mtm, "t", _loader(), "cpu") <= 100.0


def test_add_task_leaves_only_the_new_task_trainable_and_loading_freezes() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm")
    mtm.add_task("b", 3, "piggyback")
    trainable = {n for n, p in mtm.named_parameters() if p.requires_grad}
    assert trainable and all(".xbm_tasks.b." in n for n in trainable)
    assert all(not p.requires_grad for p in mtm.backbone_state().values())


def test_load_bundle_keeps_the_active_task_and_freezes_what_it_loads(tmp_path) -> None:
    src = MultiTaskModel(_backbone(), SPEC)
    src.add_task("a", 3, "xbm")
    src.save_bundle(tmp_path / "a.safetensors")
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("mine", 3, "xma")
    assert mtm.load_bundle(tmp_path / "a.safetensors") == ["a"]
    assert mtm.active_task == "mine"
    assert not any(p.requires_grad for p in mtm.task_parameters("a")["state"])
    # a failing load (a name this model has) changes nothing, the active task included
    mtm.set_task("a")
    with pytest.raises(XbmError, match="already has a task named 'a'"):
        mtm.load_bundle(tmp_path / "a.safetensors")
    assert mtm.active_task == "a" and mtm.task_names() == ["mine", "a"]


def test_load_bundle_keeps_the_trainable_flags_of_the_tasks_the_model_had(tmp_path) -> None:
    src = MultiTaskModel(_backbone(), SPEC)
    src.add_task("a", 3, "xbm")
    src.save_bundle(tmp_path / "a.safetensors")
    for corrupt in (False, True):
        mtm = MultiTaskModel(_backbone(), SPEC)
        mtm.add_task("mine", 3, "xma")  # trainable, about to be trained by hand
        path = tmp_path / "a.safetensors"
        if corrupt:  # a stray tensor: the load fails after adding the task
            from xbm.io import load_safetensors, metadata_hash, save_safetensors, tensors_hash

            tensors, meta = load_safetensors(path)
            tensors["stray.weight"] = torch.zeros(1)
            meta["content_hash"] = tensors_hash(tensors)
            meta["meta_hash"] = metadata_hash(meta)
            path = tmp_path / "stray.safetensors"
            save_safetensors(path, tensors, meta)
            with pytest.raises(XbmError, match="unexpected tensor stray.weight"):
                mtm.load_bundle(path)
        else:
            mtm.load_bundle(path)
        mine = mtm.task_parameters("mine")
        assert all(p.requires_grad for g in mine.values() for p in g), corrupt
        assert mtm.active_task == "mine"


def test_save_bundle_checks_its_task_list(tmp_path) -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("t_xbm", 3, "xbm")
    with pytest.raises(XbmError, match=r"write tasks=\['t_xbm'\]"):
        mtm.save_bundle(tmp_path / "b.safetensors", tasks="t_xbm")
    with pytest.raises(XbmError, match="'base' is the pretrained backbone's own task"):
        mtm.save_bundle(tmp_path / "b.safetensors", tasks=["base"])
    assert not (tmp_path / "b.safetensors").exists()


def test_predict_mixed_takes_one_name_for_the_whole_batch() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("t", 3, "xbm")
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(mtm.predict_mixed(x, "t"), mtm.predict_mixed(x, ["t"] * 5))


def test_add_task_follows_the_model_dtype() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC).double()
    mtm.add_task("t", 3, "xma")
    assert mtm(torch.randn(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in mtm.parameters())


class _MyLinear(nn.Linear):
    pass


def test_apply_warns_about_weight_layers_it_leaves_digital() -> None:
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), _MyLinear(24, 8), nn.ReLU(),
                          nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"2 layer\(s\).*0 \(Conv1d\), 2 \(_MyLinear\)") as rec:
        mtm = MultiTaskModel(model, SPEC, head_name="5")
    assert rec[0].filename == __file__  # points at the user's line, not xbm's internals
    names = [lm.name for lm in mtm.mapping().layers]
    assert names == ["4"]  # the mapping report and the conversion agree
    assert [lm.name for lm in xbm.map_model(nn.Sequential(_MyLinear(4, 4), nn.Linear(4, 2)),
                                            SPEC, head_name="1").layers] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the registered models convert without a warning
        for name in ("small_cnn", "resnet18_cifar", "vit_tiny"):
            MultiTaskModel(create_model(name, num_classes=4, in_channels=1), SPEC)


def test_apply_warns_about_recurrent_bilinear_and_attention_weights() -> None:
    """An LSTM, a Bilinear and MultiheadAttention's fused input projection stayed digital
    without a word (only convolutions and Linear subclasses were named); an Embedding, a
    lookup and no matrix-vector product, is not named."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.bil = nn.Bilinear(8, 8, 8)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.rnn(self.emb(x))[0]
            h = self.att(h, h, h)[0] + self.bil(h, h)
            return self.fc(self.proj(h).mean(1))

    with pytest.warns(UserWarning) as rec:
        mtm = MultiTaskModel(Mixed(), SPEC)
    (msg,) = [str(w.message) for w in rec if "stay off the crossbars" in str(w.message)]
    for layer in ("rnn (LSTM)", "bil (Bilinear)", "att (MultiheadAttention)",
                  "att.out_proj (NonDynamicallyQuantizableLinear)"):
        assert layer in msg, msg
    assert "emb" not in msg
    assert [lm.name for lm in mtm.mapping().layers] == ["proj"]


def test_filter_is_never_asked_about_the_head() -> None:
    seen = []
    mtm = MultiTaskModel(_backbone(), SPEC, filter_fn=lambda n, m: seen.append(n) or True)
    assert "fc" not in seen and seen
    assert "fc" not in [lm.name for lm in mtm.mapping().layers]


def test_config_fields_of_the_wrong_type_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"XBMConfig.mask_init must be a number, got 'a'"):
        XBMConfig(mask_init="a")
    with pytest.raises(ConfigError, match=r"XBMConfig.lr must be a number, got '1e-3' \(str\)"):
        XBMConfig(lr="1e-3")
    assert XBMConfig.from_dict({"lr": "1e-3"}).lr == 1e-3  # YAML's text numbers still read
    with pytest.raises(ConfigError, match="warmup_steps must be an integer"):
        xbm.get_method_class("xma2").config_class(warmup_steps=2.5)
    with pytest.raises(ConfigError, match="CrossbarSpec has no field.*rowz.*valid:"):
        xbm.get_spec("default", rowz=32)
    # numpy's scalars are numbers, stored as plain ones (bundle metadata is JSON)
    cfg = xbm.get_method_class("xma2").config_class(pe_budget=np.float32(0.25),
                                                    warmup_steps=np.int64(3))
    assert type(cfg.pe_budget) is float and cfg.pe_budget == 0.25
    assert type(cfg.warmup_steps) is int and cfg.warmup_steps == 3


def test_norms_without_affine_parameters_get_their_own_copies() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 8), nn.LayerNorm(8, bias=False),
                          nn.Linear(8, 3))
    mtm = MultiTaskModel(model, SPEC, head_name="5")
    mtm.add_task("t", 2, "xbm")
    assert mtm(torch.randn(2, 1, 28, 28)).shape == (2, 2)
    own = set(mtm.task_state_dict("t"))  # statistics for the stat-only BN, a weight for LN
    assert {"1.xbm_tasks.t.running_mean", "1.xbm_tasks.t.running_var",
            "4.xbm_tasks.t.weight"} <= own
    before = {k: v.clone() for k, v in mtm.backbone_state().items()}
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 2, (4,))) for _ in range(3)]
    xbm.train_task(mtm, "t", batches, 1, "cpu", progress=False)
    after = mtm.backbone_state()  # the task's copies moved, the programmed ones did not
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(mtm.task_state_dict("t")["1.xbm_tasks.t.running_mean"],
                           before["1.running_mean"])


def test_the_cli_prints_xbm_warnings_as_its_own(tmp_path, capsys) -> None:
    from xbm.cli import _warning_origin

    assert _warning_origin(xbm.XbmWarning, str(tmp_path / "launcher"), 8) == ""
    assert "UserWarning from" in _warning_origin(UserWarning, str(tmp_path / "lib.py"), 8)


def test_cost_of_an_arch_less_model_reads_its_channels_and_asks_for_the_size() -> None:
    mtm = MultiTaskModel(_backbone(in_channels=3), SPEC)  # no arch= recorded
    mtm.add_task("t", 3, "xbm")
    with pytest.warns(UserWarning, match="input size is unknown.*pass input_size="):
        at28 = task_costs(mtm, "t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at16 = task_costs(mtm, "t", input_size=16)
    assert at16["inference_energy_j"] < at28["inference_energy_j"]
    with pytest.raises(ConfigError, match="in_channels must be a positive integer"):
        task_costs(mtm, "t", input_size=16, in_channels=0)



def test_task_costs_price_the_side_the_task_records_and_take_preset_as_task_cost_does(
        ) -> None:
    """A task trained on 16 px images (extra image_size, as xbm adapt records it) was priced
    on 28 px ones; task_costs named its preset energy_preset= where task_cost says preset=."""
    mtm = MultiTaskModel(_backbone(in_channels=3), SPEC)
    mtm.add_task("small", 3, "xbm")
    mtm.tasks["small"].extra["image_size"] = 16  # what xbm adapt records
    mtm.add_task("plain", 3, "xbm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recorded side needs no warning
        recorded = task_costs(mtm, "small")
    assert recorded == task_costs(mtm, "small", input_size=16)
    assert recorded["inference_energy_j"] < task_costs(
        mtm, "small", input_size=28)["inference_energy_j"]
    assert task_costs(mtm, "small", preset="isaac")["energy_preset"] == "isaac"
    with pytest.warns(DeprecationWarning, match="now preset="):
        assert task_costs(mtm, "small", energy_preset="isaac") == \
            task_costs(mtm, "small", preset="isaac")
    with pytest.raises(ConfigError, match="pass preset= only"):
        task_costs(mtm, "small", "isaac", energy_preset="isaac")
    # the report's header states the side the tasks were priced at
    from xbm.hardware.cost import Assumptions, bundle_report
    from xbm.hardware.energy import get_preset

    rep = bundle_report(mtm, get_preset(), Assumptions(), ["small"], "m")
    assert rep.input_shape[-2:] == (16, 16)
    for bad in (0, 16.0, "16", True):  # a record that is no side is said, not skipped
        mtm.tasks["small"].extra["image_size"] = bad
        with pytest.raises(ConfigError, match="task 'small' records image_size"):
            task_costs(mtm, "small")

def test_a_batchnorm_without_running_statistics_is_refused_at_conversion() -> None:
    """It converted, and then every forward (even the base task's) failed in torch with
    "running_mean must be defined in evaluation mode"."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    before = [type(m) for m in model.modules()]
    with pytest.raises(xbm.XbmError, match=r"^1 is a BatchNorm without running statistics"):
        MultiTaskModel(model, SPEC, head_name="3")
    assert [type(m) for m in model.modules()] == before  # refused before anything changed


def test_map_model_on_a_converted_model_lists_only_its_crossbar_layers() -> None:
    """It listed a layer the filter had kept digital, and its table cut the kind to 'Crossba'."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 8),
                          nn.ReLU(), nn.Linear(8, 3))
    mtm = MultiTaskModel(model, SPEC, filter_fn=lambda n, m: n != "2", head_name="4")
    report = xbm.map_model(mtm.model, SPEC, head_name="4")
    assert [lm.name for lm in report.layers] == ["0"] == [lm.name for lm in
                                                          mtm.mapping().layers]
    assert report.layers[0].kind == "Conv2d" and " Conv2d " in report.table()
    fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    assert [lm.kind for lm in xbm.map_model(fresh, SPEC, head_name="9").layers] == \
        ["Conv2d", "Linear"]


def _randomise_norms(model: nn.Module, seed: int = 3) -> None:
    """Non-default statistics and affine values in every norm layer: with a fresh layer's (0, 1,
    1, 0) a task's copy made from scratch would look the same as one copied from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                n = m.weight.numel()
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_var.copy_(0.5 + torch.rand(n, generator=g))


@pytest.mark.parametrize("model", ["small_cnn", "vit_tiny"])
def test_a_new_task_starts_from_the_base_task_norms_and_gets_a_head_with_bias(model) -> None:
    """Per-task BatchNorm/LayerNorm copies start as the backbone's trained ones (statistics and
    affine values), so a new XBM task whose masks are all on and whose head is the base head
    computes exactly the base task's function; its head has a bias, as the base head does."""
    torch.manual_seed(0)
    net = create_model(model, num_classes=4, in_channels=1, width=8 if model == "small_cnn"
                       else 16)
    _randomise_norms(net)
    mtm = MultiTaskModel(net, SPEC).eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), mtm.use_task("base"):
        want = mtm(x)
    mtm.add_task("t", 4, "xbm", {"per_task_bn": True})
    head = mtm.model.fc.xbm_tasks["t"]
    assert head.bias is not None
    with torch.no_grad():
        head.weight.copy_(mtm.model.fc.weight)
        head.bias.copy_(mtm.model.fc.bias)
        got = mtm(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward_mixed_runs_in_eval_mode_and_leaves_statistics_and_flags_alone() -> None:
    """forward_mixed is inference: from a model left in training mode it must give the eval-mode
    logits, update no BatchNorm statistics (the base's or a task's), and restore every flag."""
    torch.manual_seed(0)
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm")
    mtm.add_task("b", 5, "piggyback")
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    tasks = ["a", "b", "base", "a", "b", "base"]
    mtm.eval()
    want = []
    with torch.no_grad():
        for i, t in enumerate(tasks):
            with mtm.use_task(t):
                want.append(mtm(x[i:i + 1])[0])
    mtm.train()
    flags = {n: m.training for n, m in mtm.named_modules()}
    stats = {k: v.clone() for k, v in mtm.state_dict().items() if "running" in k}
    got = mtm.forward_mixed(x, tasks)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert {n: m.training for n, m in mtm.named_modules()} == flags
    after = mtm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())


@pytest.mark.parametrize("field,value", [("cell_bits", 2), ("cols", 32), ("weight_bits", 4),
                                         ("pe_rows", 4), ("signed", "offset")])
def test_a_bundle_refuses_a_spec_that_differs_in_any_field(tmp_path, field, value) -> None:
    """Every hardware field of the spec must match to load a bundle (not only rows): one field
    off is refused, naming it, and no task is left behind."""
    spec = xbm.get_spec(rows=16, cols=16, weight_bits=8, cell_bits=4)
    src = MultiTaskModel(_backbone(), spec)
    src.add_task("t", 3, "xbm")
    src.save_bundle(tmp_path / "b.safetensors")
    try:
        other = spec.replace(**{field: value})
    except ConfigError:
        pytest.skip(f"{field}={value!r} is not a valid spec here")
    dst = MultiTaskModel(_backbone(), other)
    with pytest.raises(XbmError, match=field):
        dst.load_bundle(tmp_path / "b.safetensors")
    assert dst.task_names() == []
    assert MultiTaskModel(_backbone(), spec).load_bundle(tmp_path / "b.safetensors") == ["t"]


def test_finetune_trains_its_own_bias_and_leaves_the_backbone_bias() -> None:
    """A crossbar layer with a bias (a Linear): finetune's task trains its own copy of the
    bias, which is what its forward uses; the backbone's bias stays as programmed."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.fc = nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.body(x.flatten(1))))

    mtm = MultiTaskModel(Net(), SPEC)
    layer = mtm.model.body
    bias0 = layer.bias.detach().clone()
    mtm.add_task("t", 3, "finetune", {"lr": 1e-2})
    st = layer.xbm_tasks["t"]
    assert layer.effective_weight_and_bias("t")[1] is st.bias
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD([p for p in mtm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(mtm(x), y).backward()
        opt.step()
    assert not torch.equal(st.bias, bias0) and torch.equal(layer.bias, bias0)
    with torch.no_grad():  # the forward reads the task's bias: moving it moves the output
        before = mtm(x).clone()
        st.bias.add_(1.0)
        assert not torch.equal(mtm(x), before)


def test_tensors_hash_covers_names_dtypes_and_values() -> None:
    from xbm.io import tensors_hash

    a, b = torch.arange(4.0), torch.arange(4.0) + 1
    h = tensors_hash({"x": a, "y": b})
    assert h == tensors_hash({"y": b.clone(), "x": a.clone()})  # order-independent
    assert h != tensors_hash({"x": b, "y": a})  # two tensors' names swapped
    assert h != tensors_hash({"x": a, "z": b})
    assert h != tensors_hash({"x": a.double(), "y": b})
    assert h != tensors_hash({"x": a, "y": b.reshape(2, 2)})


def test_a_model_converted_by_apply_becomes_a_multitask_model_on_its_spec() -> None:
    """xbm.apply then MultiTaskModel was a dead end ("already converted"): the converted model
    is taken as it is on the same spec; another spec, a filter_fn, or a model that already
    holds tasks are one-line errors; apply itself still refuses a second conversion."""
    net = _backbone()
    xbm.apply(net, SPEC, lambda n, m: n != "features.0")
    mtm = MultiTaskModel(net, SPEC)
    assert mtm.model is net and "features.0" not in [lm.name for lm in mtm.mapping().layers]
    mtm.add_task("t", 3, "xbm")
    xbm.train_task(mtm, "t", _loader(), 1, torch.device("cpu"), progress=False)
    assert mtm.mask_bits("t") > 0
    with pytest.raises(XbmError, match=r"already holds task\(s\) t"):
        MultiTaskModel(net, SPEC)
    other = _backbone()
    xbm.apply(other, SPEC)
    with pytest.raises(XbmError, match="other crossbars .*rows=16; here rows=32"):
        MultiTaskModel(other, xbm.get_spec(rows=32, cols=16))
    with pytest.raises(XbmError, match="leave filter_fn out"):
        MultiTaskModel(other, SPEC, filter_fn=lambda n, m: True)
    with pytest.raises(XbmError, match="already converted"):
        xbm.apply(other, SPEC)


def test_a_backbone_belongs_to_one_multitask_model_at_a_time() -> None:
    """Two wrappers on one converted backbone, before either had a task, were both accepted,
    and a task name used by the first could be added again through the second, overwriting
    its state on the shared layers. A wrapper that is gone frees the backbone again."""
    import copy
    import gc

    net = _backbone()
    first = MultiTaskModel(net, SPEC)
    with pytest.raises(XbmError, match="already belongs to another MultiTaskModel"):
        MultiTaskModel(net, SPEC)
    assert MultiTaskModel(copy.deepcopy(net), SPEC).model is not net  # a copy is its own
    twin = copy.deepcopy(first)  # a copied wrapper owns its copied backbone, not net
    with pytest.raises(XbmError, match="already belongs"):
        MultiTaskModel(twin.model, SPEC)
    del first, twin
    gc.collect()
    again = MultiTaskModel(net, SPEC)
    again.add_task("t", 3, "xbm")
    assert again.model is net


def test_set_trainable_picks_the_task_a_hand_written_loop_trains() -> None:
    """set_task routes forwards and leaves trainability alone (it also serves evaluation);
    set_trainable makes one task's parameters the only trainable ones, as add_task does."""
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm")
    ids = {t: {id(p) for p in mtm._task_params(t)} for t in ("a",)}
    mtm.add_task("b", 3, "piggyback")
    ids["b"] = {id(p) for p in mtm._task_params("b")}
    trainable = lambda: {id(p) for p in mtm.parameters() if p.requires_grad}  # noqa: E731
    assert trainable() == ids["b"]
    mtm.set_task("a")
    assert trainable() == ids["b"]
    mtm.set_trainable("a")
    assert trainable() == ids["a"] and mtm.active_task == "a"
    with pytest.raises(XbmError, match="pretrained backbone's own task"):
        mtm.set_trainable("base")
    with pytest.raises(XbmError, match="unknown task 'c'"):
        mtm.set_trainable("c")
    assert trainable() == ids["a"]


def test_export_task_keeps_a_shared_layer_shared_and_leaves_hooks_and_other_tasks_behind():
    """A layer used under two names is exported once, as the task's, at both names; no hook
    (a logger's, which may hold a lock that cannot be copied) follows the copy; other tasks'
    state is not copied; given the MultiTaskModel itself, its backbone is exported."""
    import threading

    from xbm.nn import export_task

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a  # the same layer, twice
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    mtm = MultiTaskModel(Shared(), SPEC)
    for t in ("t", "u"):
        mtm.add_task(t, 3, "finetune")
        with torch.no_grad():
            for p in mtm._task_params(t):
                p.add_(torch.randn_like(p) * 0.3)

    class Logger:
        def __init__(self) -> None:
            self.lock, self.calls = threading.Lock(), 0

        def hook(self, *_a) -> None:
            with self.lock:
                self.calls += 1

    log = Logger()
    mtm.model.a.register_forward_hook(log.hook)
    mtm.model.fc.register_forward_hook(log.hook)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    mtm.eval()
    with torch.no_grad(), mtm.use_task("t"):
        want = mtm(x)
    calls = log.calls
    plain = export_task(mtm, "t")  # the MultiTaskModel: its backbone is exported
    assert type(plain) is Shared and plain.a is plain.b
    assert type(plain.a) is nn.Linear and type(plain.fc) is nn.Linear
    torch.testing.assert_close(plain(x), want)
    assert log.calls == calls  # no hook came along
    n_plain = sum(p.numel() for p in plain.parameters())
    assert n_plain == 8 * 8 + 8 + 8 * 3 + 3  # one task's worth, not every task's
    fresh = Shared()
    fresh.load_state_dict(plain.state_dict())
    torch.testing.assert_close(fresh.eval()(x), want)


def test_export_task_unties_a_parameter_shared_by_two_crossbar_layers():
    """Two modules holding one Parameter (tying across modules) were exported with the second
    layer's task weight in both, silently: each crossbar layer now gets its own task weight,
    and a digital module sharing the Parameter keeps the programmed one."""
    from xbm.nn import export_task

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.b.bias = self.a.bias
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    mtm = MultiTaskModel(Tied(), SPEC)
    mtm.add_task("t", 3, "xbm")
    with torch.no_grad():  # a: every column on; b: most off
        mtm.model.a.xbm_tasks["t"].score.fill_(1.0)
        mtm.model.b.xbm_tasks["t"].score.fill_(-1.0)
        mtm.model.b.xbm_tasks["t"].score[0, :3] = 1.0
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    mtm.eval()
    with torch.no_grad(), mtm.use_task("t"):
        want = mtm(x)
    plain = export_task(mtm, "t")
    assert plain.a.weight is not plain.b.weight
    torch.testing.assert_close(plain(x), want)
    assert torch.equal(plain.a.weight, mtm.model.a.weight)  # all on: the programmed weight


# -- from an audit of the Python API (session 23): each of these was silent or a traceback ---
class _Net(nn.Module):
    """conv -> norm -> pooled Linear head, with the norm and head given."""

    def __init__(self, norm: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = norm
        self.fc = head if head is not None else nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class _BNAct(nn.BatchNorm2d):  # as timm's BatchNormAct2d: a subclass with its own forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _CosineHead(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nn.functional.normalize(self.weight, dim=1)
        return 10 * nn.functional.linear(nn.functional.normalize(x, dim=1), w)


@pytest.mark.parametrize("norm", [
    lambda: _BNAct(4), lambda: nn.SyncBatchNorm(4),
    lambda: nn.InstanceNorm2d(4, track_running_stats=True)],
    ids=["bn-subclass", "syncbn", "instancenorm-tracked"])
def test_norms_with_statistics_that_cannot_be_per_task_are_refused(norm) -> None:
    """They stayed plain, so a mask task's training forwards moved the backbone's statistics
    (and an earlier task's outputs) with no word."""
    net = _Net(norm()).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(XbmError, match="norm with running statistics that xbm cannot make "
                                       "per-task"):
        MultiTaskModel(net, SPEC)
    assert type(net.conv) is nn.Conv2d  # refused before anything was converted
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_a_norm_without_statistics_and_plain_bn_are_taken() -> None:
    MultiTaskModel(_Net(nn.InstanceNorm2d(4)), SPEC)  # no running statistics: nothing to move
    MultiTaskModel(_Net(nn.BatchNorm2d(4)), SPEC)


def test_a_head_with_its_own_forward_is_refused() -> None:
    net = _Net(nn.BatchNorm2d(4), _CosineHead(4, 3))
    with pytest.raises(XbmError, match="classifier 'fc' is a _CosineHead, a subclass of "
                                       "nn.Linear"):
        MultiTaskModel(net, SPEC)
    assert type(net.fc) is _CosineHead and type(net.conv) is nn.Conv2d


@pytest.mark.parametrize("y,needle", [
    (torch.zeros(8, 1, dtype=torch.long), r"one class index per image, shape \(8,\), got shape "
                                          r"\(8, 1\)"),
    (torch.zeros(4, dtype=torch.long), r"shape \(8,\), got shape \(4,\)"),
    (torch.zeros(8), "integer class indices, got torch.float32"),
    (torch.zeros(8, dtype=torch.bool), "integer class indices, got torch.bool"),
])
def test_labels_of_the_wrong_shape_or_type_are_refused(y, needle) -> None:
    """(N, 1) labels scored 400% in evaluate (an N x N comparison table)."""
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("t", 3, "xbm")
    batch = [(torch.randn(8, 1, 28, 28), y)]
    with pytest.raises(XbmError, match=needle):
        xbm.evaluate_task(mtm, "t", batch)
    with pytest.raises(XbmError, match=needle):
        xbm.train_task(mtm, "t", batch, 1, "cpu", progress=False)


def test_a_failed_training_leaves_the_model_as_documented() -> None:
    """A bad batch mid-epoch left the model in training mode with the failed task active and
    trainable: the next no_grad forward moved its BatchNorm statistics."""
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm")
    xbm.train_task(mtm, "a", _loader(), 1, "cpu", progress=False)
    mtm.add_task("b", 3, "piggyback")
    mtm.set_task("a")
    good = next(iter(_loader()))
    bad = (torch.randn(8, 1, 28, 28), torch.full((8,), 7))  # labels beyond b's 3 classes
    with pytest.raises(XbmError, match="task 'b' has 3 classes"):
        xbm.train_task(mtm, "b", [good, bad], 1, "cpu", progress=False)
    assert mtm.active_task == "a" and not mtm.training
    assert not any(p.requires_grad for p in mtm.parameters())


def test_train_task_freezes_every_parameter_and_checks_max_steps_and_device() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm")
    mtm.add_task("b", 3, "xbm")
    mtm.set_trainable("a")
    xbm.train_task(mtm, "b", _loader(), 1, "cpu", progress=False)
    assert not any(p.requires_grad for p in mtm.parameters())  # a's too, as documented
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="max_steps must be a positive integer"):
            xbm.train_task(mtm, "b", _loader(), 1, "cpu", progress=False, max_steps=bad)
    with pytest.raises(ConfigError, match="'meta' is not supported"):
        xbm.train_task(mtm, "b", _loader(), 1, "meta", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            xbm.train_task(mtm, "b", _loader(), 1, "cuda", progress=False)


def test_a_method_takes_exactly_its_config_class_and_a_copy_of_it() -> None:
    from xbm.methods import XMA2Config, XMAConfig

    with pytest.raises(ConfigError, match="takes a XMAConfig, got XMA2Config; its extra fields "
                                          "would be ignored"):
        create_method("xma", XMA2Config(pe_budget=0.2))
    cfg = XBMConfig(threshold=5e-3)
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm", config=cfg)
    cfg.threshold = 9e-3  # reused for the next task: a's config must not follow
    mtm.add_task("b", 3, "xbm", config=cfg)
    assert mtm.methods["a"].config.threshold == 5e-3 == mtm.tasks["a"].config["threshold"]
    assert mtm.methods["b"].config.threshold == 9e-3
    assert isinstance(create_method("xma", XMAConfig()).config, XMAConfig)


def test_xma2_trains_after_a_forward_under_inference_mode(tmp_path) -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xma2", {"warmup_steps": 1, "pe_budget": 0.5})
    xbm.train_task(mtm, "a", _loader(), 1, "cpu", progress=False)
    mtm.save_bundle(tmp_path / "b.safetensors")
    loaded = MultiTaskModel(_backbone(), SPEC)
    loaded.load_bundle(tmp_path / "b.safetensors")
    loaded.set_task("a")
    with torch.inference_mode():  # deployment: builds the selection cache as inference tensors
        loaded(torch.randn(2, 1, 28, 28))
    xbm.train_task(loaded, "a", _loader(), 1, "cpu", progress=False)  # failed in autograd


@pytest.mark.parametrize("name", ["train", "eval", "to", "forward", "training", "keys"])
def test_task_names_taken_by_the_module_api_are_refused(name) -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    with pytest.raises(XbmError, match=f"task name '{name}' is taken by torch's module API"):
        mtm.add_task(name, 3, "xbm")
    assert mtm.task_names() == []


def test_bundle_records_and_arch_are_checked_before_training(tmp_path) -> None:
    from pathlib import Path

    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm", dataset=Path("data/birds"))
    assert mtm.tasks["a"].dataset == "data/birds"  # a path is recorded as its string
    with pytest.raises(XbmError, match="dataset must be a name or a path"):
        mtm.add_task("b", 3, "xbm", dataset=5)
    with pytest.raises(XbmError, match="tasks lists a more than once"):
        mtm.save_bundle(tmp_path / "b.safetensors", tasks=["a", "a"])
    assert not (tmp_path / "b.safetensors").exists()
    with pytest.raises(XbmError, match="arch must hold JSON values"):
        MultiTaskModel(_backbone(), SPEC, arch={"name": "x", "file": Path("w.pt")})


def test_a_method_whose_state_aliases_the_backbone_is_refused() -> None:
    """A custom method that wrapped the programmed weight without copying it would have had
    Adam rewrite the backbone while reporting no re-programmed cell."""
    from xbm.methods import AdaptionMethod, MethodConfig

    class Aliasing(AdaptionMethod):
        name = "aliasing-test"
        config_class = MethodConfig

        def create_layer_state(self, layer: nn.Module) -> nn.Module:
            st = nn.Module()
            st.w = nn.Parameter(layer.weight.detach())  # no .clone(): the same storage
            return st

    net = _backbone()
    mtm = MultiTaskModel(net, SPEC)
    with pytest.raises(XbmError, match="shares memory with the programmed backbone"):
        mtm.add_task("a", 3, Aliasing())
    assert mtm.task_names() == []
    assert not any("a" in m.xbm_tasks for _, m in xbm.nn.task_aware_modules(mtm.model))


def test_a_method_object_is_free_again_once_its_model_is_gone() -> None:
    """From a review of the per-task rule: one object reused over fresh models (a loop) and a
    deep copy of a used object were refused; a shallow copy of a wrapper took over its
    backbone."""
    import copy
    import gc

    meth = create_method("xbm")
    for _ in range(2):  # a fresh model each pass
        mtm = MultiTaskModel(_backbone(), SPEC)
        mtm.add_task("t", 3, meth)
        del mtm
        gc.collect()
    keep = MultiTaskModel(_backbone(), SPEC)
    keep.add_task("t", 3, meth)
    other = MultiTaskModel(_backbone(), SPEC)
    with pytest.raises(XbmError, match=r"already serves task 't' .*add_task\('u', NUM_CLASSES"):
        other.add_task("u", 3, meth)
    other.add_task("u", 3, copy.deepcopy(meth))  # a copy serves no task yet
    keep.remove_task("t")
    with pytest.raises(XbmError, match="already serves task 't'"):
        keep.add_task("t2", 3, meth)  # removed, but its bookkeeping was t's
    twin = copy.deepcopy(keep)  # a whole copy: its methods serve the copy
    twin.add_task("v", 3, "xbm")
    assert twin.methods["v"]._xbm_serves[0]() is twin
    shallow = copy.copy(keep)  # shares keep's backbone, which stays keep's
    del shallow
    gc.collect()
    with pytest.raises(XbmError, match="already belongs"):
        MultiTaskModel(keep.model, SPEC)


def test_a_reused_xma2_object_counts_only_its_current_models_pes() -> None:
    """XMA2 keeps its layers to choose PEs over the whole model: taken again after its first
    model was gone, it still held that model's layers, which doubled K (floor(budget x PEs))
    and so the PEs it re-programmed."""
    import gc

    from xbm.data import make_fixture_task
    from xbm.train import train_task

    def trained(meth) -> int:
        mtm = MultiTaskModel(_backbone(), SPEC)
        mtm.add_task("a", 3, meth)
        data = make_fixture_task("a", num_classes=3, n_train=32, n_test=8, seed=0)
        train_task(mtm, "a", data.loaders(8, seed=0)[0], 1, torch.device("cpu"), progress=False)
        return int(sum(st.pe_mask.sum() for _, _, st in mtm.layer_states("a")))

    cfg = {"warmup_steps": 2, "pe_budget": 0.5}
    fresh = trained(create_method("xma2", cfg))
    meth = create_method("xma2", cfg)
    first = MultiTaskModel(_backbone(), SPEC)
    first.add_task("a", 3, meth)  # never trained
    del first
    gc.collect()
    assert fresh >= 1 and trained(meth) == fresh
    import copy
    import pickle

    used = MultiTaskModel(_backbone(), SPEC)
    used.add_task("a", 3, create_method("xma2", cfg))  # not trained: its copies may serve
    for twin in (copy.deepcopy(used.methods["a"]), pickle.loads(pickle.dumps(used.methods["a"]))):
        assert trained(twin) == fresh  # a copy kept the first model's layers too


def test_a_model_with_tasks_pickles() -> None:
    """torch.save(mtm) failed: a method's weak reference to the model it serves cannot be
    pickled. The copy's methods serve the copy."""
    import pickle

    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm")
    mtm.eval()
    twin = pickle.loads(pickle.dumps(mtm))
    assert twin.methods["a"]._xbm_serves[0]() is twin
    assert mtm.methods["a"]._xbm_serves[0]() is mtm
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(mtm(x), twin(x))


def test_add_task_on_a_weightless_meta_model() -> None:
    """Every meta tensor reports address 0, so the aliasing check took every method's state
    for the backbone's."""
    with torch.device("meta"):
        net = create_model("small_cnn", num_classes=4, in_channels=1)
    mtm = MultiTaskModel(net, SPEC)
    for i, m in enumerate(list_methods()):
        mtm.add_task(f"t{i}", 3, m, {"per_task_bn": False})
    # with per-task norms too: their copies keep the shapes (loading values from meta
    # tensors failed in torch's load_state_dict)
    for i, m in enumerate(list_methods()):
        mtm.add_task(f"n{i}", 3, m)
    bn = next(b for b in mtm.model.modules() if isinstance(b, nn.BatchNorm2d))
    assert bn.xbm_tasks["n0"].running_mean.is_meta
    # no values: no hash and no bundle, said in one line (torch's "Cannot copy out of meta
    # tensor" before)
    for call in (lambda: mtm.backbone_hash, lambda: mtm.save_bundle("never.safetensors")):
        with pytest.raises(XbmError, match="backbone is on the meta device"):
            call()


def test_a_linear_subclass_with_linears_forward_is_a_head() -> None:
    class Named(nn.Linear):  # a subclass for its name alone: nothing of it is lost
        pass

    mtm = MultiTaskModel(_Net(nn.BatchNorm2d(4), Named(4, 3)), SPEC)
    mtm.add_task("t", 3, "xbm")


def test_labels_of_any_integer_type_train_and_evaluate() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("t", 3, "xbm")
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 3, (8,))
    for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        batch = [(x, y.to(dtype))]
        xbm.train_task(mtm, "t", batch, 1, "cpu", progress=False)
        assert xbm.evaluate_task(mtm, "t", batch) == xbm.evaluate_task(mtm, "t", [(x, y)])


def test_nan_scores_count_as_off_and_a_bundle_with_them_is_refused(tmp_path) -> None:
    """A NaN score switches its column (or weight) off in the forward (score > threshold is
    false) but counted as on (score <= threshold is false too); loading such a bundle was
    silent."""
    from xbm.errors import BundleError

    mtm = MultiTaskModel(_backbone(), SPEC)
    for m in ("xbm", "piggyback"):
        mtm.add_task(m, 3, m)
        _, layer, st = next(iter(mtm.layer_states(m)))
        before = (mtm.methods[m].masked_off_columns(layer, st) if m == "xbm"
                  else mtm.reprogrammed_cells(m))
        with torch.no_grad():
            st.score.view(-1)[0] = float("nan")
        after = (mtm.methods[m].masked_off_columns(layer, st) if m == "xbm"
                 else mtm.reprogrammed_cells(m))
        assert after > before  # counted off, as the forward runs it
    with pytest.raises(XbmError, match="task 'xbm' holds NaN or infinite values"):
        mtm.save_bundle(tmp_path / "b.safetensors")  # it could not be loaded again
    assert not (tmp_path / "b.safetensors").exists()
    # a file that holds one anyway (an older xbm wrote them) is refused on loading
    from xbm.io import load_safetensors, metadata_hash, save_safetensors, tensors_hash

    good = MultiTaskModel(_backbone(), SPEC)
    good.add_task("t", 3, "xbm")
    good.save_bundle(tmp_path / "g.safetensors")
    tensors, meta = load_safetensors(tmp_path / "g.safetensors")
    key = next(k for k in tensors if k.endswith("score"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    meta["content_hash"] = tensors_hash(tensors)
    meta["meta_hash"] = metadata_hash(meta)
    save_safetensors(tmp_path / "n.safetensors", tensors, meta)
    with pytest.raises(BundleError, match="holds NaN or infinite values .*task 't'"):
        MultiTaskModel(_backbone(), SPEC).load_bundle(tmp_path / "n.safetensors")


def test_a_config_edited_after_construction_is_checked_again_by_add_task(tmp_path) -> None:
    """``c.levels = [0, 3]`` after construction passed add_task and save_bundle, and the bundle
    then failed to load as "corrupt"; a NaN lr trained to chance without a word."""
    from xbm.methods.xma import XMAConfig

    mtm = MultiTaskModel(_backbone(), SPEC)
    c = XMAConfig()
    c.levels = [0, 3]
    with pytest.raises(ConfigError, match="levels"):
        mtm.add_task("a", 3, "xma", c)
    c = XMAConfig()
    c.lr = float("nan")
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        mtm.add_task("a", 3, "xma", c)
    assert "a" not in mtm.tasks
    with pytest.raises(ConfigError, match="threshold must be a number, got None"):
        XBMConfig(threshold=None)


def test_energy_constants_that_overflow_are_refused() -> None:
    """Each field finite, but a product overflowing: OverflowError tracebacks, or Infinity
    written into `xbm cost --json`."""
    from xbm.hardware.energy import get_preset

    p = get_preset("default")
    with pytest.raises(ConfigError, match="16-bit ADC energy is not a finite number"):
        p.with_overrides({"periphery.adc_energy_bit_scaling": 1e40})
    with pytest.raises(ConfigError, match="write_pulse_energy_j is not a finite number"):
        p.with_overrides({"device.write_voltage_v": 1e200})
    with pytest.raises(ConfigError, match="r_on_ohm must be a finite number"):
        p.with_overrides({"device.r_on_ohm": 10 ** 400})


# -- from a review of the multi-task core (session 25) -----------------------------------------
def test_a_shallow_copy_of_an_xma2_method_shares_no_layer_list() -> None:
    """copy.copy shared the layer list: the second model's add_task cleared the first's layers
    (its task then never selected a PE) and marked the copy's selection final with none."""
    import copy

    from xbm.data import make_fixture_task

    data = make_fixture_task("f", num_classes=3, n_train=32, n_test=8, seed=0)
    a = MultiTaskModel(_backbone(), SPEC)
    meth = a.add_task("t", 3, "xma2", {"warmup_steps": 1, "pe_budget": 0.25})
    b = MultiTaskModel(_backbone(), SPEC)
    other = b.add_task("u", 3, copy.copy(meth))
    assert other is not meth and other._layers is not meth._layers
    xbm.train_task(a, "t", data.loaders(8, seed=0)[0], 1, "cpu", progress=False)
    assert a.reprogrammed_cells("t") > 0  # a's own layers were selected among
    assert all(int(st.phase) == 0 for _, _, st in b.layer_states("u"))


def test_an_interrupted_load_bundle_leaves_the_model_as_it_was(tmp_path, monkeypatch) -> None:
    """A KeyboardInterrupt (a notebook's stop button) skipped the rollback: half the bundle's
    tasks stayed, one trainable, and loading again was refused."""
    src = MultiTaskModel(_backbone(), SPEC)
    src.add_task("a", 3, "xbm")
    src.add_task("b", 3, "xbm")
    path = tmp_path / "two.safetensors"
    src.save_bundle(path)
    dst = MultiTaskModel(_backbone(), SPEC)
    dst.add_task("mine", 3, "xbm")
    real, calls = MultiTaskModel.add_task, []

    def interrupted(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(MultiTaskModel, "add_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dst.load_bundle(path)
    # not monkeypatch.undo(): that also takes back conftest's XBM_CACHE, the user's cache
    monkeypatch.setattr(MultiTaskModel, "add_task", real)
    assert list(dst.tasks) == ["mine"] and dst.active_task == "mine"
    assert dst.load_bundle(path) == ["a", "b"]  # and it loads when asked again


def test_use_task_restores_base_when_the_block_removed_the_previous_task() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm")
    mtm.add_task("b", 3, "xbm")
    mtm.set_task("a")
    with mtm.use_task("b"):
        mtm.remove_task("a")
    assert mtm.active_task == "base"


def test_predict_mixed_checks_the_length_of_an_empty_task_list() -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    mtm.add_task("a", 3, "xbm")
    with pytest.raises(XbmError, match="7 samples but 0 task names"):
        mtm.predict_mixed(torch.randn(7, 1, 28, 28), [])
    assert mtm.predict_mixed(torch.randn(0, 1, 28, 28), []).shape == (0,)


def test_a_whole_model_state_dict_needs_its_tasks_first() -> None:
    """A strict load_state_dict with task keys this model lacks failed in torch after copying
    the backbone's tensors (changing its hash); strict=False dropped the tasks silently."""
    src = MultiTaskModel(_backbone(), SPEC)
    src.add_task("a", 3, "xbm")
    sd = src.state_dict()
    torch.manual_seed(1)
    dst = MultiTaskModel(_backbone(), SPEC)
    before = dst.backbone_hash
    with pytest.raises(XbmError, match=r"holds task\(s\) a that this model lacks; add_task"):
        dst.load_state_dict(sd)
    assert dst.backbone_hash == before  # nothing copied
    with pytest.warns(xbm.XbmWarning, match="their tensors are not loaded"):
        dst.load_state_dict(sd, strict=False)
    dst.add_task("a", 3, "xbm")
    dst.load_state_dict(sd)  # with the task in place it round-trips
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in sd.items())


def test_a_state_dict_cannot_change_the_backbone_under_tasks_it_leaves() -> None:
    """A state dict lacking one of this model's tasks copied everything (another backbone
    included) before torch failed on the task's keys, and with strict=False it swapped the
    backbone under the task without a word."""
    src = MultiTaskModel(_backbone(seed=1), SPEC)
    src.add_task("a", 3, "xma")
    dst = MultiTaskModel(_backbone(seed=0), SPEC)
    dst.add_task("a", 3, "xma")
    dst.add_task("b", 3, "xbm")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(XbmError, match=r"lacks task\(s\) b that this model has; remove_task"):
        dst.load_state_dict(src.state_dict())
    only_backbone = {f"model.{k}": v for k, v in src.backbone_state().items()}
    with pytest.raises(XbmError, match=r"other backbone weights \(model\..* and \d+ more\) "
                       r"while task\(s\) a, b, learned on this backbone, would stay"):
        dst.load_state_dict(only_backbone, strict=False)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())  # untouched
    same = {f"model.{k}": v.clone() for k, v in dst.backbone_state().items()}
    dst.load_state_dict(same, strict=False)  # its own weights again: harmless, allowed
    dst.remove_task("b")
    dst.load_state_dict(src.state_dict())  # every task replaced too: a whole-model load
    assert dst.backbone_hash == src.backbone_hash
    # a weightless (meta) model takes real weights: nothing to compare (torch's equal failed)
    with torch.device("meta"):
        meta = MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1), SPEC)
    meta.add_task("t", 3, "xbm")
    meta.load_state_dict(only_backbone, strict=False, assign=True)
    assert not any(v.is_meta for v in meta.backbone_state().values())


def test_per_task_norms_are_exact_copies_in_float64() -> None:
    """The copies were built in float32 and cast after loading, so a fresh task's float64
    statistics were rounded: it did not compute what the base task does."""
    bb = _backbone().double()
    with torch.no_grad():
        for mod in bb.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_var.add_(1 / 3)
                mod.weight.add_(1 / 3)
    mtm = MultiTaskModel(bb, SPEC).eval()
    mtm.add_task("t", 4, "xbm")
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        with mtm.use_task("base"):
            base = mtm.model.features(x)
        with mtm.use_task("t"):
            task = mtm.model.features(x)
    assert torch.equal(base, task)


def test_a_cumulative_batchnorm_copy_averages_its_own_batches() -> None:
    """With momentum=None the copy inherited the backbone's count of pretraining batches, so
    its statistics stayed ~96% the backbone's after a task's training."""
    bb = _backbone()
    for mod in bb.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None
            mod.num_batches_tracked.fill_(500)
    mtm = MultiTaskModel(bb, SPEC)
    mtm.add_task("t", 3, "linear-probe")
    first_bn = next(m for m in mtm.model.modules() if isinstance(m, nn.BatchNorm2d))
    copy = first_bn.xbm_tasks["t"]
    assert int(copy.num_batches_tracked) == 0 and int(first_bn.num_batches_tracked) == 500
    x = torch.randn(8, 1, 28, 28) * 3 + 2
    mtm.set_task("t")
    mtm.train()
    with torch.no_grad():
        mtm(x)
    conv = mtm.model.features[0]
    with torch.no_grad(), mtm.use_task("t"):
        batch_mean = conv(x).mean((0, 2, 3))
    assert torch.allclose(copy.running_mean, batch_mean, atol=1e-4)  # one batch: its mean


@pytest.mark.parametrize("bad,said", [
    (xbm.methods.XMAConfig(lr=0.3), "got XMAConfig XMAConfig(lr=0.3"),
    ({"lr": 0.3}, "got dict {'lr': 0.3}: a config goes in config="),
    (["xma"], "got list ['xma']: pass a registered name"),
])
def test_a_config_in_the_methods_place_is_named(bad, said) -> None:
    mtm = MultiTaskModel(_backbone(), SPEC)
    with pytest.raises(ConfigError, match=re.escape(said)):
        mtm.add_task("b", 4, bad)
    assert mtm.task_names() == []
    with pytest.raises(ConfigError, match="pass its registered name, 'xma'"):
        mtm.add_task("b", 4, xbm.methods.get_method_class("xma"))


def test_numpy_numbers_are_numbers_for_levels_and_the_spec() -> None:
    """``levels=np.array(...)`` or float32 levels, and ``rows=np.int64(64)``, were refused as
    not numbers, although every other field takes numpy's scalars (made plain for JSON)."""
    from xbm.methods.xma import XMAConfig

    assert XMAConfig(levels=np.array([0, 0.5, 1.0], dtype=np.float32)).levels == [0.0, 0.5, 1.0]
    assert XMAConfig(levels=[np.float32(0), np.float32(1)]).levels == [0.0, 1.0]
    spec = xbm.CrossbarSpec(rows=np.int64(32))
    assert spec.rows == 32 and type(spec.rows) is int
    with pytest.raises(ConfigError, match="levels holds"):
        XMAConfig(levels=np.array([0, 0.3, 1.0]))  # still a power of two or 0


def test_a_model_cast_to_half_after_conversion_is_refused() -> None:
    """mtm.half() after a task was added trained to NaN (and save_bundle then blamed the lr);
    bfloat16 trained silently with rounded scores."""
    for dtype in (torch.float16, torch.bfloat16):
        mtm = MultiTaskModel(_backbone(), SPEC)
        mtm.add_task("a", 3, "xbm")
        mtm.to(dtype)
        with pytest.raises(XbmError, match="the model holds .* tensors; convert a float32"):
            mtm.add_task("b", 3, "xbm")
        x, y = torch.randn(8, 1, 28, 28).to(dtype), torch.randint(0, 3, (8,))
        with pytest.raises(XbmError, match="model.float()"):
            xbm.train_task(mtm, "a", [(x, y)], 1, torch.device("cpu"), progress=False)


def test_forward_passes_every_argument_through() -> None:
    """Only one tensor reached the wrapped model: forward(x, mask=...) raised a TypeError."""
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x, mask=None):
            h = self.body(x)
            return self.fc(h if mask is None else h * mask)

    mtm = MultiTaskModel(Masked(), SPEC).eval()
    x, mask = torch.randn(2, 6), torch.zeros(2, 8)
    assert torch.equal(mtm(x, mask=mask), mtm(x, mask))
    assert not torch.equal(mtm(x), mtm(x, mask))


def test_a_bias_free_head_gives_bias_free_task_heads() -> None:
    """Task heads always had a bias, so an exported task did not load into a fresh model of a
    bias-free architecture ("Unexpected key(s): fc.bias")."""
    class NoBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(6, 8)
            self.fc = nn.Linear(8, 3, bias=False)

        def forward(self, x):
            return self.fc(self.body(x))

    mtm = MultiTaskModel(NoBias(), SPEC)
    mtm.add_task("a", 3, "xbm")
    NoBias().load_state_dict(mtm.export_task("a").state_dict())


def test_method_names_follow_the_task_name_rule() -> None:
    from xbm.methods import register_method

    for bad in ("My Method/1", "base", ""):
        with pytest.raises(ValueError, match="is invalid"):
            register_method(bad)


def test_head_name_errors_say_what_the_module_is() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    with pytest.raises(XbmError, match=r"'2' is a Sequential, not an nn.Linear; .* \(its last "
                       r"Linear is '2.0'\)"):
        xbm.apply(model, SPEC, head_name="2")
    with pytest.raises(XbmError, match="model has no module named 'head'"):
        xbm.apply(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4)), SPEC, head_name="head")


def test_hardware_submodules_are_attributes() -> None:
    """usage.md writes xbm.hardware.cost.task_costs: an AttributeError after `import xbm`
    (in a fresh process: this file has imported the submodule already)."""
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    code = ("import xbm; assert callable(xbm.hardware.cost.task_costs); "
            "assert callable(xbm.hardware.energy.get_preset)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": src, "PATH": ""}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_model_name_or_a_one_argument_filter_is_refused_before_converting() -> None:
    """MultiTaskModel("small_cnn", ...) failed with "'str' object has no attribute
    'named_modules'", apply(m, spec, lambda n: ...) with a TypeError deep in the mapping."""
    with pytest.raises(XbmError, match=r"the backbone must be a torch nn.Module, got str "
                       r"'small_cnn'; build it first, e.g. xbm.create_model\('small_cnn'"):
        MultiTaskModel("small_cnn", SPEC)
    model = _backbone()
    before = [type(m) for m in model.modules()]
    with pytest.raises(XbmError, match=r"filter_fn must take two arguments, \(name, module\)"):
        xbm.apply(model, SPEC, lambda name: True)
    with pytest.raises(XbmError, match="filter_fn must be a function"):
        MultiTaskModel(model, SPEC, filter_fn=True)
    assert [type(m) for m in model.modules()] == before  # nothing converted
    xbm.apply(model, SPEC, lambda *args: True)  # any callable that takes two arguments


def test_backbone_weights_are_refused_once_tasks_were_learned_on_the_old_ones(tmp_path
                                                                               ) -> None:
    """usage.md said loading weights after the conversion works: after add_task it ran the
    tasks on weights they were not learned on, and save_bundle recorded the new hash."""
    donor = _backbone()
    with torch.no_grad():
        next(donor.parameters()).add_(1.0)  # other weights
    path = tmp_path / "w.pth"
    torch.save(donor.state_dict(), path)
    backbone = _backbone()
    same = {k: v.clone() for k, v in backbone.state_dict().items()}
    mtm = MultiTaskModel(backbone, SPEC)
    mtm.add_task("a", 3, "xbm")
    before = mtm.backbone_hash
    with pytest.raises(XbmError, match="the model holds learned task\\(s\\) a, whose masks.*"
                       "these weights differ"):
        xbm.load_torchvision_state_dict(backbone, path)
    assert mtm.backbone_hash == before
    xbm.load_torchvision_state_dict(backbone, same)  # its own weights again: harmless
    fresh = _backbone()
    mtm2 = MultiTaskModel(fresh, SPEC)
    xbm.load_torchvision_state_dict(fresh, path)  # converted, no task yet: fine
    assert mtm2.backbone_hash != before
