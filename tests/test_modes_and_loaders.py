"""Train/eval modes and user loaders through the Python API (a newcomer's review, session 20).

Two silent failures: a task added to (or loaded onto) an eval-mode model ran in training
mode, so a plain inference forward rewrote its BatchNorm statistics; and the evaluation
helpers "restored" a wrapper flag that never matched the backbone's, turning an eval-mode
model back to training. Loaders of the wrong shape failed with raw torch errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xbm.errors import XbmError
from xbm.hardware import get_spec
from xbm.models import create_model
from xbm.multitask import MultiTaskModel
from xbm.train import evaluate_task, train_task


def _eval_mtm() -> MultiTaskModel:
    torch.manual_seed(0)
    bb = create_model("small_cnn", num_classes=4, in_channels=1)
    bb.eval()
    return MultiTaskModel(bb, get_spec(rows=16, cols=16))


def _bn_stats(mtm: MultiTaskModel, task: str) -> list[torch.Tensor]:
    return [b.clone() for n, b in mtm.named_buffers()
            if f"xbm_tasks.{task}." in n and "running" in n]


def _batches(n: int = 3, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, classes, (8,), generator=g))
            for _ in range(n)]


def test_the_wrapper_takes_the_backbones_mode_and_new_tasks_follow_it(tmp_path):
    mtm = _eval_mtm()
    assert not mtm.training
    mtm.add_task("a", 3, "xbm")
    assert all(not m.training for m in mtm.modules())  # the new BN copies and head too
    before = _bn_stats(mtm, "a")
    assert before  # the task has its own BatchNorm statistics
    with torch.no_grad(), mtm.use_task("a"):
        mtm(torch.randn(8, 1, 12, 12) * 5 + 3)
    assert all(torch.equal(b, a) for b, a in zip(before, _bn_stats(mtm, "a"), strict=True))
    # a bundle loaded onto an eval-mode model: its saved statistics are kept by a forward
    path = tmp_path / "b.safetensors"
    mtm.save_bundle(path)
    fresh = _eval_mtm()
    fresh.load_bundle(path)
    saved = _bn_stats(fresh, "a")
    with torch.no_grad(), fresh.use_task("a"):
        fresh(torch.randn(8, 1, 12, 12) * 5 + 3)
    assert all(torch.equal(b, a) for b, a in zip(saved, _bn_stats(fresh, "a"), strict=True))
    # and a training-mode model gives its new task training-mode modules, as before
    torch.manual_seed(0)
    train_mtm = MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1),
                               get_spec(rows=16, cols=16))
    train_mtm.add_task("b", 3, "xbm")
    assert train_mtm.training and all(m.training for m in train_mtm.modules())


def test_evaluation_helpers_give_every_submodule_its_own_mode_back():
    mtm = _eval_mtm()
    mtm.add_task("a", 3, "xbm")
    mtm.model.fc.train()  # a mix the user chose: everything in eval but the head
    modes = {n: m.training for n, m in mtm.named_modules()}
    evaluate_task(mtm, "a", _batches())
    assert {n: m.training for n, m in mtm.named_modules()} == modes
    mtm.forward_mixed(torch.randn(4, 1, 12, 12), ["a", "base", "a", "base"])
    assert {n: m.training for n, m in mtm.named_modules()} == modes
    # restored on an error too
    with pytest.raises(XbmError):
        evaluate_task(mtm, "a", [{"image": torch.zeros(1), "label": torch.zeros(1)}])
    assert {n: m.training for n, m in mtm.named_modules()} == modes


def test_the_clis_defaults_from_python_as_the_docs_say():
    """README: precision="auto" and cuda_graph=None give the demo's behaviour on any device
    ("auto" was refused; only True/False were taken for the graph, True failing on a CPU)."""
    mtm = _eval_mtm()
    mtm.add_task("a", 3, "xbm")
    res = train_task(mtm, "a", _batches(), device="cpu", progress=False, precision="auto",
                     cuda_graph=None)
    assert res.steps == 3 and res.cuda_graph is False


@pytest.mark.parametrize("loader,needle", [
    ((b for b in _batches()), "needs a loader with a length"),
    ([{"image": torch.zeros(2, 1, 12, 12), "label": torch.zeros(2, dtype=torch.long)}],
     "a batch must be a pair (images, labels) of tensors, got a dict with keys ['image', "
     "'label']"),
    ([(torch.zeros(2, 1, 12, 12),)], "got a tuple of 1"),
    (_batches(classes=5), "has 3 classes (labels 0 to 2)"),
    # a dataset passed unbatched: single (image, label) samples (a plain int label, or a
    # 0-d tensor as a TensorDataset yields) were told to "wrap the loader" or to reshape
    ([(torch.zeros(1, 12, 12), 2)] * 2, "a batch is (image, int label): it yields single "
     "samples: batch them, e.g. torch.utils.data.DataLoader("),
    ([(torch.zeros(1, 12, 12), torch.tensor(2))] * 2, "a batch's label is one number (shape "
     "()), for images of shape (1, 12, 12): it yields single samples"),
    ([(torch.zeros(2, 1, 12, 12, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))],
     "a batch's images are torch.uint8; the model takes floating-point images"),
])
def test_a_loader_of_the_wrong_shape_gets_a_clear_error(loader, needle):
    mtm = _eval_mtm()
    mtm.add_task("a", 3, "xbm")
    before = {k: v.clone() for k, v in mtm.state_dict().items()}
    with pytest.raises(XbmError) as err:
        train_task(mtm, "a", loader, device="cpu", progress=False)
    assert needle in str(err.value)
    if needle.startswith("has 3"):  # the first batch has labels 3 or 4: nothing was trained
        assert all(torch.equal(v, mtm.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("recorded", [True, False])
def test_images_of_another_channel_count_are_named(recorded):
    """3-channel images on a 1-channel backbone failed inside torch's convolution; the hint
    then named TaskData.with_channels(1), which refuses RGB data. A model that records no
    ``arch`` is named by its first convolution's refusal of this batch."""
    mtm = _eval_mtm()
    if recorded:
        mtm.arch = {"name": "small_cnn", "in_channels": 1}
    mtm.add_task("a", 3, "xbm")
    rgb = [(torch.zeros(2, 3, 12, 12), torch.zeros(2, dtype=torch.long))]
    who = "the backbone takes" if recorded else "the model's first convolution takes"
    for run in (lambda: train_task(mtm, "a", rgb, device="cpu", progress=False),
                lambda: evaluate_task(mtm, "a", rgb)):
        with pytest.raises(XbmError) as err:
            run()
        assert str(err.value) == (
            f"a batch's images have 3 channel(s) (shape (2, 3, 12, 12)), {who} 1: "
            "load_dataset(PATH, channels=1) reads an image folder as grey, or convert the "
            "images (e.g. x.mean(1, keepdim=True)), or a backbone pretrained on 3 channels "
            "(xbm pretrain --channels 3)")
    assert "with_channels" not in str(err.value)


@pytest.mark.parametrize("recorded", [True, False])
def test_images_without_a_channel_dimension_are_named(recorded):
    """(N, H, W) images failed with torch's "expected input[1, N, H, W] to have 1 channels":
    torch takes a 3-D input as one unbatched image of N channels."""
    mtm = _eval_mtm()
    if recorded:
        mtm.arch = {"name": "small_cnn", "in_channels": 1}
    mtm.add_task("a", 3, "xbm")
    # a batch of one grey image (N = the channel count) ran as one unbatched image and failed
    # later, in torch's words
    for n in (2, 1):
        flat = [(torch.zeros(n, 12, 12), torch.zeros(n, dtype=torch.long))]
        for run in (lambda flat=flat: train_task(mtm, "a", flat, device="cpu", progress=False),
                    lambda flat=flat: evaluate_task(mtm, "a", flat)):
            with pytest.raises(XbmError, match=rf"have shape \({n}, 12, 12\), without a channel "
                               r"dimension .* add it, e.g. x.unsqueeze\(1\)"):
                run()


@pytest.mark.filterwarnings("ignore:xbm.apply")  # its Conv1d stays digital, as said
def test_a_three_d_batch_of_a_model_that_takes_one_runs():
    """The up-front refusal of (N, A, B) batches stopped a Conv1d model (or one of tokens)
    that records in_channels in its arch."""
    class OneD(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv1d(2, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.c(x).mean(2))

    mtm = MultiTaskModel(OneD(), "default", arch={"name": "custom1d", "in_channels": 2})
    mtm.add_task("a", 3, "xbm")
    batch = [(torch.zeros(4, 2, 20), torch.zeros(4, dtype=torch.long))]
    assert 0.0 <= evaluate_task(mtm, "a", batch) <= 100.0  # it runs


def test_the_first_convolution_is_told_by_its_weight():
    """A grey model whose second conv takes 3 channels: an RGB batch refused by its first
    conv is the data's mismatch (the rule "no conv takes 3 channels" missed it)."""
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 3, 3)
            self.c2 = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.c2(self.c1(x)).mean((2, 3)))

    mtm = MultiTaskModel(Two(), "default")
    mtm.add_task("a", 3, "xbm")
    with pytest.raises(XbmError, match=r"have 3 channel\(s\) .*the model's first convolution "
                       r"takes 1"):
        evaluate_task(mtm, "a", [(torch.zeros(2, 3, 12, 12), torch.zeros(2, dtype=torch.long))])


def test_grey_images_on_an_rgb_backbone_name_with_channels():
    torch.manual_seed(0)
    backbone = create_model("small_cnn", num_classes=4, in_channels=3)
    mtm = MultiTaskModel(backbone, "default", arch={"name": "small_cnn", "in_channels": 3})
    mtm.add_task("a", 3, "xbm")
    grey = [(torch.zeros(2, 1, 12, 12), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(XbmError, match=r"the backbone takes 3: TaskData.with_channels\(3\) for "
                       r"xbm's datasets, or x.expand\(-1, 3, -1, -1\)$"):
        train_task(mtm, "a", grey, device="cpu", progress=False)


def test_a_models_own_runtime_errors_pass_through():
    """Only torch's refusal of this very batch's channels is rewritten."""
    class Inner(nn.Module):  # its second conv gets the wrong channels: the user's own bug
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3)
            self.c2 = nn.Conv2d(8, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.c2(self.c1(x)).mean((2, 3)))

    class Keeps(Inner):  # its first conv keeps the batch's shape (3 -> 3), the second is wrong
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 3, 3, padding=1)
            self.c2 = nn.Conv2d(1, 4, 3)

    for model, x in ((Inner(), torch.zeros(2, 1, 12, 12)), (Keeps(), torch.zeros(2, 3, 12, 12))):
        mtm = MultiTaskModel(model, "default")
        mtm.add_task("a", 3, "xbm")
        with pytest.raises(RuntimeError, match="expected input") as err:
            evaluate_task(mtm, "a", [(x, torch.zeros(2, dtype=torch.long))])
        assert not isinstance(err.value, XbmError)


def test_evaluation_refuses_labels_the_head_cannot_name():
    """They used to count silently as wrong answers (50% for a task that was right)."""
    mtm = _eval_mtm()
    mtm.add_task("a", 3, "xbm")
    with pytest.raises(XbmError, match="labels 0 to 4, but task 'a' has 3 classes"):
        evaluate_task(mtm, "a", [(torch.zeros(5, 1, 12, 12), torch.arange(5))])
    plain = nn.Sequential(nn.Flatten(), nn.Linear(144, 2))
    from xbm.train import evaluate

    with pytest.raises(XbmError, match="but the model has 2 classes"):
        evaluate(plain, [(torch.zeros(3, 1, 12, 12), torch.tensor([0, 1, 2]))])
