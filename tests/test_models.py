"""Tests for the backbone registry, the backbone contract and torchvision checkpoint loading."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from xbm.errors import ArchitectureMismatchError, ConfigError, UnknownNameError, XbmError
from xbm.models import (
    create_model,
    list_models,
    load_torchvision_state_dict,
    model_info,
    register_model,
)

# Per-model build options that keep every forward pass tiny. The ImageNet ResNets get 32x32 input:
# their stride-32 trunk still works there, and key names do not depend on width.
SMALL: dict[str, dict] = {
    "resnet18": {"width": 8},
    "resnet50": {"width": 4},
    "resnet18_cifar": {"width": 8},
    "vgg11_cifar": {"width": 8},
    "vit_tiny": {"width": 32, "depth": 2},
}
INPUT_SIZE = {"resnet18": 32, "resnet50": 32}


def _small(name: str, num_classes: int = 7, in_channels: int = 1) -> nn.Module:
    return create_model(name, num_classes=num_classes, in_channels=in_channels,
                        **SMALL.get(name, {}))


def _resnet50_conv_count() -> int:
    # stem + 3 convs per bottleneck (3+4+6+3 blocks) + one projection shortcut per stage
    return 1 + 3 * (3 + 4 + 6 + 3) + 4


def test_builtin_models_registered_and_sorted():
    names = list_models()
    assert names == sorted(names)
    assert {"resnet18_cifar", "resnet18", "resnet50", "vgg11_cifar", "small_cnn",
            "vit_tiny"} <= set(names)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_head_contract(name):
    torch.manual_seed(0)
    model = _small(name).eval()
    size = INPUT_SIZE.get(name, 28)
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)
    assert model.head_name == "fc"
    assert isinstance(model.fc, nn.Linear)
    assert model.feature_dim == model.fc.in_features
    assert model.fc.out_features == 7
    # The multi-task wrapper swaps the head per task; the trunk must not care.
    model.fc = nn.Linear(model.feature_dim, 3)
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 3)


@pytest.mark.parametrize("name", list_models())
def test_model_info_is_one_line(name):
    info = model_info(name)
    assert info and "\n" not in info


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("vit")])
def test_every_conv_is_bias_free_and_followed_by_its_batchnorm(name):
    layers = [m for m in _small(name).modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert layers and len(layers) % 2 == 0
    for conv, bn in zip(layers[::2], layers[1::2], strict=True):
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.bias is None
        assert bn.num_features == conv.out_channels


def test_resnet18_cifar_layout():
    model = create_model("resnet18_cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 16
    assert isinstance(model.maxpool, nn.Identity)
    assert [model.get_submodule(f"layer{i}.0.conv1").stride for i in range(1, 5)] == [
        (1, 1), (2, 2), (2, 2), (2, 2)]
    assert model.feature_dim == 128 and model.fc.out_features == 10
    keys = model.state_dict()
    assert "layer1.0.conv1.weight" in keys and "layer1.0.downsample.0.weight" not in keys
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_var" in keys


def test_vit_tiny_accepts_other_input_sizes():
    model = create_model("vit_tiny", width=32, depth=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("name", "params"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnet_parameter_counts_match_torchvision(name, params):
    with torch.device("meta"):  # no memory, no init cost
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.fc.out_features == 1000 and model.conv1.in_channels == 3


def test_resnet50_state_dict_keys_match_torchvision_layout():
    with torch.device("meta"):
        keys = list(create_model("resnet50").state_dict())
    convs = _resnet50_conv_count()
    # each conv has one weight, each BN 5 entries (incl. num_batches_tracked), fc weight + bias
    assert len(keys) == convs + 5 * convs + 2 == 320
    for key in ("conv1.weight", "bn1.num_batches_tracked", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_mean", "layer4.2.bn3.running_var",
                "layer3.5.conv3.weight", "fc.weight", "fc.bias"):
        assert key in keys
    assert keys[0] == "conv1.weight" and keys[-1] == "fc.bias"
    assert not any(k.startswith("layer1.1.downsample") for k in keys)


def _torchvision_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """torchvision's ResNet-50 state dict (v1.5: stride on the 3x3 conv), key -> shape, written
    out from the architecture (He et al. 2016, table 1: bottleneck blocks [3, 4, 6, 3], width
    64 * 2^i, expansion 4) independently of xbm's model code, so a renamed or reshaped
    parameter fails here even where the key count still matches."""
    out: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{k}"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    out["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 * 2 ** i
        for b in range(blocks):
            pre = f"layer{i + 1}.{b}"
            out[f"{pre}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{pre}.bn1", planes)
            out[f"{pre}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{pre}.bn2", planes)
            out[f"{pre}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{pre}.bn3", planes * 4)
            if b == 0:
                out[f"{pre}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{pre}.downsample.1", planes * 4)
            inplanes = planes * 4
    out["fc.weight"] = (1000, 2048)
    out["fc.bias"] = (1000,)
    return out


def test_resnet50_state_dict_matches_torchvision_key_for_key():
    with torch.device("meta"):
        state = create_model("resnet50").state_dict()
    expected = _torchvision_resnet50_shapes()
    assert list(state) == list(expected)  # same keys, in torchvision's order
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_resnet50_stride_on_3x3_conv():
    with torch.device("meta"):
        block = create_model("resnet50").layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_state_dict_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    src = _small("resnet50", num_classes=5, in_channels=3)
    src.train()(torch.randn(2, 3, 32, 32))  # move BN running stats off their defaults
    state = src.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    dst = _small("resnet50", num_classes=5, in_channels=3)
    assert load_torchvision_state_dict(dst, path) is dst
    for key, value in dst.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_strips_module_prefix_and_unwraps_checkpoint():
    src, dst = _small("small_cnn"), _small("small_cnn")
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    load_torchvision_state_dict(dst, wrapped)
    assert torch.equal(dst.fc.weight, src.fc.weight)
    compiled = {f"_orig_mod.{k}": v for k, v in _small("small_cnn").state_dict().items()}
    load_torchvision_state_dict(dst, compiled)  # a torch.compile'd model's state dict
    assert torch.equal(dst.fc.weight, compiled["_orig_mod.fc.weight"])


def test_load_strips_a_wrappers_prefix_and_names_what_it_cannot_guess():
    """Lightning saves `model.`-prefixed keys, other trainers a `backbone.` or `net.`
    attribute's: "267 missing, 320 unexpected; build the model with the checkpoint's
    architecture" sent the user after a wrong cause. A prefix of every key is stripped when
    the rest are the model's keys; a model's worth of keys beside other entries (an EMA copy)
    is named, not guessed; a checkpoint without its classifier says so and how to import it."""
    src = _small("small_cnn")
    sd = src.state_dict()
    for prefix in ("model.", "model.backbone."):
        dst = _small("small_cnn")
        load_torchvision_state_dict(dst, {"state_dict": {prefix + k: v for k, v in sd.items()}})
        assert all(torch.equal(v, sd[k]) for k, v in dst.state_dict().items())
    two = {**{f"model.{k}": v for k, v in sd.items()}, **{f"ema.{k}": v for k, v in sd.items()},
           "loss.weight": torch.ones(3)}
    with pytest.raises(XbmError, match=r"the keys under 'ema.' and 'model.' are each this "
                       r"model's, but the checkpoint holds other entries beside them "
                       r"\(loss.\); save only the copy you mean, e.g. \{k\[4:\]"):
        load_torchvision_state_dict(_small("small_cnn"), two)
    headless = {f"model.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    with pytest.raises(XbmError, match=r"has no classifier \(fc.weight, fc.bias\): a feature "
                       r"extractor.*sd\['model.fc.weight'\] = torch.zeros\(N, \d+\) and "
                       r"sd\['model.fc.bias'\] = torch.zeros\(N\).*--num-classes N"):
        load_torchvision_state_dict(_small("small_cnn"), headless)
    headless["model.fc.weight"], headless["model.fc.bias"] = sd["fc.weight"], sd["fc.bias"]
    load_torchvision_state_dict(_small("small_cnn"), headless)  # as the hint says: it loads


def test_a_mismatch_names_the_models_channels_or_the_model_the_keys_belong_to():
    """A grayscale checkpoint for an RGB model names --in-channels, as a 10-class one names
    --num-classes; a ResNet-50 checkpoint given for resnet18 names resnet50, not only the
    hundreds of keys it does not have."""
    grey = create_model("resnet18", num_classes=10, width=8, in_channels=1).state_dict()
    with pytest.raises(ArchitectureMismatchError, match=r"its first convolution conv1.weight "
                       r"takes 1 input channel\(s\): build the model with in_channels=1, or "
                       r"xbm import-backbone --in-channels 1"):
        load_torchvision_state_dict(create_model("resnet18", num_classes=10, width=8), grey)
    r50 = create_model("resnet50", num_classes=10, width=8).state_dict()
    with pytest.raises(ArchitectureMismatchError, match=r"its parameter names are those of the "
                       r"registered model 'resnet50': create_model\('resnet50'\), or xbm "
                       r"import-backbone --model resnet50"):
        load_torchvision_state_dict(create_model("resnet18", num_classes=10, width=8), r50)
    # resnet18 and resnet18_cifar share their names: no model is named for a width mismatch
    with pytest.raises(ArchitectureMismatchError) as exc:
        load_torchvision_state_dict(create_model("resnet18", num_classes=10, width=16),
                                    create_model("resnet18", num_classes=10, width=8).state_dict())
    assert "registered model" not in str(exc.value)


def test_a_model_instead_of_its_weights_is_named():
    """xbm.import_backbone("mine", net, ...) raised "TypeError: expected str, bytes or
    os.PathLike object, not Sequential"."""
    net = _small("small_cnn")
    with pytest.raises(XbmError, match=r"pass the ConvNet's weights, net.state_dict\(\)"):
        load_torchvision_state_dict(_small("small_cnn"), net)
    with pytest.raises(XbmError, match="expected a state dict or the path of a checkpoint, "
                                       "got a list"):
        load_torchvision_state_dict(_small("small_cnn"), [1, 2])


def test_load_accepts_checkpoints_without_bn_step_counters():
    src, dst = _small("resnet18"), _small("resnet18")
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_torchvision_state_dict(dst, old)
    assert torch.equal(dst.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)
    assert int(dst.bn1.num_batches_tracked) == 0


def test_load_wrong_key_names_it_in_one_line():
    model = _small("resnet50")
    state = dict(model.state_dict())
    state["fc.bias_renamed"] = state.pop("fc.bias")
    # its own type, so a caller names its own arguments without matching the text
    with pytest.raises(ArchitectureMismatchError) as info:
        load_torchvision_state_dict(model, state)
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing key(s): fc.bias" in msg and "unexpected key(s): fc.bias_renamed" in msg


def test_load_wrong_shape_names_the_key():
    state = _small("resnet50", num_classes=1000).state_dict()
    model = _small("resnet50")
    d = model.feature_dim
    expected = rf"shape mismatch.*fc\.weight \(1000, {d}\) vs model \(7, {d}\)"
    with pytest.raises(XbmError, match=expected) as info:
        load_torchvision_state_dict(model, state)
    assert "has 1000 classes: build the model with num_classes=1000, or xbm import-backbone " \
        "--num-classes 1000" in str(info.value)
    # no class-count hint where that would not fix the load
    wide = dict(state)
    wide["fc.weight"] = torch.zeros(7, d + 1)  # the head's input differs, not its classes
    with pytest.raises(XbmError) as info:
        load_torchvision_state_dict(model, wide)
    assert "--num-classes" not in str(info.value)
    gone = dict(state)
    gone.pop("conv1.weight")  # a key missing besides the head's classes
    with pytest.raises(XbmError) as info:
        load_torchvision_state_dict(model, gone)
    assert "missing key(s): conv1.weight" in str(info.value)
    assert "--num-classes" not in str(info.value)


def test_load_unreadable_files(tmp_path):
    with pytest.raises(XbmError, match="does not exist"):
        load_torchvision_state_dict(_small("small_cnn"), tmp_path / "missing.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(XbmError, match="cannot read"):
        load_torchvision_state_dict(_small("small_cnn"), bad)


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet1000")
    msg = str(info.value)
    assert "unknown model 'resnet1000'" in msg
    assert all(name in msg for name in list_models())
    with pytest.raises(XbmError, match="choose one of"):
        model_info("nope")


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="depth"):
        create_model("small_cnn", depth=3)
    with pytest.raises(ConfigError, match="width"):
        create_model("small_cnn", width=0)
    with pytest.raises(ConfigError, match="divisible"):
        create_model("vit_tiny", width=30, heads=4)


def test_register_model_rejects_duplicates(monkeypatch):
    with pytest.raises(ValueError, match="already registered by xbm.models.cnn"):
        register_model("small_cnn")(lambda **kw: nn.Identity())
    # the same definition run again (a reloaded module, a notebook cell): replaced, as methods
    from xbm.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def make(first: bool):
        def mine(**kw):
            return nn.Identity() if first else nn.Flatten()
        return mine

    register_model("mine")(make(True))
    register_model("mine")(make(False))  # same module and qualified name
    assert isinstance(registry._REGISTRY["mine"](), nn.Flatten)


def test_load_a_reference_script_checkpoint_says_how(tmp_path):
    """torchvision's reference scripts save {"model", "optimizer", "args": Namespace}: the safe
    loader refuses the Namespace, and the message (cut mid-sentence, with terminal colour
    codes, before) now says what to do."""
    import argparse

    src = _small("small_cnn")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(XbmError) as info:
        load_torchvision_state_dict(_small("small_cnn"), path)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert "holds Python objects besides tensors" in msg and "weights_only=False" in msg
    # the way it names works
    dst = _small("small_cnn")
    load_torchvision_state_dict(dst, torch.load(path, weights_only=False)["model"])
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_load_into_a_converted_model_with_tasks_keeps_the_tasks():
    """docs/architecture.md: a state dict loads before and after conversion; after a task was
    added its keys counted as missing. (Since session 27 only the weights the tasks were
    learned on load then: others are refused, test_python_api.py.)"""
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel

    backbone = _small("small_cnn")
    src = _small("small_cnn")
    src.load_state_dict(backbone.state_dict())
    mtm = MultiTaskModel(backbone, CrossbarSpec(rows=16, cols=16))
    mtm.add_task("t", 3, "xbm")
    task = {k: v.clone() for k, v in mtm.task_state_dict("t").items()}
    load_torchvision_state_dict(mtm.model, src.state_dict())
    shared = [k for k in mtm.backbone_state() if k in src.state_dict()]
    assert len(shared) == len(src.state_dict())  # every backbone tensor, by torchvision's name
    assert all(torch.equal(mtm.backbone_state()[k], src.state_dict()[k]) for k in shared)
    assert all(torch.equal(v, mtm.task_state_dict("t")[k]) for k, v in task.items())


def test_check_input_side_names_the_smallest_side_and_judges_only_too_small_inputs(monkeypatch):
    """A side is refused only where torch says a layer's output would be empty, with the
    smallest side that is not (found by bisection, checked here against a linear scan); a
    model that fails for another reason (a fixed-size head) is left to its own run, not called
    unable to take any side, and a data-dependent step is no obstacle (real tensors)."""
    from xbm.models import registry
    from xbm.models.registry import MAX_IMAGE_SIDE, check_input_side

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class LeNet(nn.Module):  # its head fits 32x32 inputs only
        def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 6):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(in_channels, width, 5), nn.MaxPool2d(2),
                                      nn.Conv2d(width, 16, 5), nn.MaxPool2d(2), nn.Flatten())
            self.fc = nn.Linear(16 * 5 * 5, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x))

    class Scaling(LeNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # data-dependent: no answer on the meta device
                x = x / 255
            return super().forward(x)

    registry.register_model("lenet_test")(LeNet)
    registry.register_model("scaling_test")(Scaling)
    check_input_side("lenet_test", 32)  # runs
    check_input_side("lenet_test", 20)  # the head's mismatch: not judged here
    with pytest.raises(ConfigError, match=r"--image-size 12: lenet_test cannot take 12x12 "
                                          r"images .*pass --image-size 16 or more"):
        check_input_side("lenet_test", 12)
    with pytest.raises(ConfigError, match="pass --image-size 16 or more"):  # values: fine
        check_input_side("scaling_test", 4)
    with pytest.raises(ConfigError, match=rf"must be an integer in \[1, {MAX_IMAGE_SIDE}\]"):
        check_input_side("vgg11_cifar", MAX_IMAGE_SIDE + 1)
    # bisection against a linear scan: VGG's smallest side
    smallest = next(s for s in range(1, 64) if _vgg_runs(s))
    with pytest.raises(ConfigError, match=f"pass --image-size {smallest} or more"):
        check_input_side("vgg11_cifar", smallest - 1)
    check_input_side("vgg11_cifar", smallest)


def _vgg_runs(side: int) -> bool:
    try:
        create_model("vgg11_cifar", width=2).eval()(torch.zeros(1, 1, side, side))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("make,says", [
    (lambda v: torch.empty_like(v, device="meta"), "is a meta tensor"),
    (lambda v: v.to_sparse(), "is a sparse tensor"),
    (lambda v: v.to(torch.complex64), "is a torch.complex64 tensor"),
    (lambda v: v > 0, "is a torch.bool tensor"),
])
def test_checkpoint_tensors_that_hold_no_weights_are_refused_by_name(make, says, tmp_path):
    """A meta-device state dict (shapes without data) failed inside load_state_dict, one
    traceback line per entry; sparse, complex and bool tensors are not a backbone's weights."""
    model = _small("small_cnn")
    sd = dict(model.state_dict())
    key = next(iter(sd))
    sd[key] = make(sd[key])
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    with pytest.raises(XbmError, match=f"entry '{re.escape(key)}' {says}"):
        load_torchvision_state_dict(_small("small_cnn"), path)


def test_a_converted_models_state_dict_loads_its_backbone_and_leaves_its_tasks(tmp_path):
    """import-backbone of a converted model's state_dict() failed on a task's bool pe_mask
    ("save them with .to_dense() / a float dtype"), or with only float task tensors as dozens
    of unexpected keys and a hint to rebuild the model with another width."""
    from xbm.errors import XbmWarning
    from xbm.hardware import CrossbarSpec
    from xbm.multitask import MultiTaskModel

    mtm = MultiTaskModel(_small("small_cnn"), CrossbarSpec(rows=16, cols=16))
    mtm.add_task("x2", 3, "xma2", {"pe_budget": 0.1})
    mtm.add_task("x", 3, "xbm")
    path = tmp_path / "converted.pth"
    torch.save(mtm.model.state_dict(), path)
    fresh = _small("small_cnn")
    with pytest.warns(XbmWarning, match="a converted xbm model's state dict: its backbone "
                      "weights load, the state of its task\\(s\\) x, x2 is left out"):
        load_torchvision_state_dict(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in mtm.backbone_state().items())
