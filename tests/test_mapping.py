"""The tiled view and column masks against plain per-column reference loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from xbm.errors import ConfigError, UnknownNameError
from xbm.hardware import CrossbarSpec, get_spec, map_model
from xbm.hardware.mapping import (
    apply_column_mask,
    column_sum_over_tiles,
    from_tile_view,
    layer_matrix_shape,
    tile_view,
)
from xbm.models import create_model
from xbm.multitask import MultiTaskModel

# (module factory, R): rows divisible and not divisible by R, grouped, 1x1, Linear
LAYERS = [
    (lambda: nn.Conv2d(3, 5, 3, padding=1, bias=False), 8),  # rows 27, ragged tiles
    (lambda: nn.Conv2d(4, 6, 3, bias=False), 12),  # rows 36 = 3 full tiles
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), 5),  # grouped, rows 18
    (lambda: nn.Conv2d(6, 7, 1, stride=2, bias=False), 4),  # 1x1, rows 6
    (lambda: nn.Conv2d(3, 4, (3, 2), padding=(1, 0), bias=True), 7),  # bias, non-square kernel
    (lambda: nn.Linear(19, 5), 8),
    (lambda: nn.Linear(16, 3), 16),  # exactly one tile
    (lambda: nn.Linear(5, 4), 64),  # R larger than rows
]


@pytest.mark.parametrize("make,R", LAYERS)
def test_tile_view_round_trips(make, R):
    torch.manual_seed(1)
    w = make().weight.detach()
    tv = tile_view(w, R)
    rows, cols = layer_matrix_shape(make())
    assert tv.shape == (cols, math.ceil(rows / R), R)
    assert torch.equal(from_tile_view(tv, w.shape), w)
    # padding is zero
    assert torch.count_nonzero(tv.reshape(cols, -1)[:, rows:]) == 0
    # tile t holds matrix rows t*R .. t*R+R-1 of every column, in order (a round trip alone
    # would pass a view that permuted rows inside the tiles and back)
    mat = w.reshape(cols, -1)
    for t in range(tv.shape[1]):
        r1 = min(rows, (t + 1) * R)
        assert torch.equal(tv[:, t, : r1 - t * R], mat[:, t * R: r1])


def reference_masked_forward(mod: nn.Module, x: torch.Tensor, mask: torch.Tensor, R: int):
    """Per crossbar column, loop by loop: sum over each row tile's rows, scale, accumulate."""
    w = mod.weight.detach()
    cout = w.shape[0]
    if isinstance(mod, nn.Linear):
        cols_in = x  # (B, rows)
        out = torch.zeros(x.shape[0], cout)
        rows = w.shape[1]
        for c in range(cout):
            for t in range(math.ceil(rows / R)):
                r0, r1 = t * R, min((t + 1) * R, rows)
                out[:, c] += mask[t, c] * (cols_in[:, r0:r1] @ w[c, r0:r1])
        return out + (mod.bias.detach() if mod.bias is not None else 0)
    g = mod.groups
    cin_g = w.shape[1]
    cout_g = cout // g
    xu = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                  stride=mod.stride)  # (B, Cin*kh*kw, L)
    rows = cin_g * mod.kernel_size[0] * mod.kernel_size[1]
    h = (x.shape[2] + 2 * mod.padding[0] - mod.kernel_size[0]) // mod.stride[0] + 1
    wd = (x.shape[3] + 2 * mod.padding[1] - mod.kernel_size[1]) // mod.stride[1] + 1
    out = torch.zeros(x.shape[0], cout, xu.shape[2])
    for c in range(cout):
        grp = c // cout_g
        xg = xu[:, grp * rows:(grp + 1) * rows]
        wc = w[c].reshape(-1)
        for t in range(math.ceil(rows / R)):
            r0, r1 = t * R, min((t + 1) * R, rows)
            out[:, c] += mask[t, c] * torch.einsum("brl,r->bl", xg[:, r0:r1], wc[r0:r1])
    out = out.reshape(x.shape[0], cout, h, wd)
    if mod.bias is not None:
        out = out + mod.bias.detach()[None, :, None, None]
    return out


@pytest.mark.parametrize("make,R", LAYERS)
@pytest.mark.parametrize("binary", [True, False])
def test_masked_crossbar_layer_equals_per_column_loop(make, R, binary):
    torch.manual_seed(2)
    mod = make()
    rows, cols = layer_matrix_shape(mod)
    rt = math.ceil(rows / R)
    mask = (torch.rand(rt, cols) > 0.4).float() if binary else torch.rand(rt, cols) * 2
    x = torch.randn(2, mod.in_features) if isinstance(mod, nn.Linear) else \
        torch.randn(2, mod.in_channels, 7, 6)
    ref = reference_masked_forward(mod, x, mask, R)

    # the crossbar layer, through the XBM method with scores set to produce `mask`
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = mod
            self.fc = nn.Linear(1, 1)

        def forward(self, x):
            return self.layer(x)

    mtm = MultiTaskModel(Wrap(), CrossbarSpec(rows=R, cols=max(64, 8)))
    got_fn = apply_column_mask(mod.weight, mask, R)
    if binary:
        mtm.add_task("t", 2, "xbm")
        st = mtm.model.layer.xbm_tasks["t"]
        with torch.no_grad():
            st.score.copy_(torch.where(mask > 0, torch.tensor(1e-2), torch.tensor(0.0)))
        got = mtm(x).detach()
    else:
        w, b = got_fn, mod.bias
        got = F.linear(x, w, b) if isinstance(mod, nn.Linear) else mod._conv_forward(x, w, b)
        got = got.detach()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(cin=st.integers(1, 7), cout=st.integers(1, 6), kh=st.integers(1, 3), kw=st.integers(1, 3),
       stride=st.integers(1, 2), pad=st.integers(0, 1), groups=st.sampled_from([1, 2, 3]),
       R=st.integers(1, 20), linear=st.booleans(), binary=st.booleans(),
       seed=st.integers(0, 10_000))
def test_masked_layer_equals_per_column_loop_property(cin, cout, kh, kw, stride, pad, groups, R,
                                                      linear, binary, seed):
    """Random shapes (ragged and exact tiles, grouped, 1x1 and non-square kernels, Linear), a
    random mask: the XBM crossbar layer (binary) and the column-mask function (real levels, as
    XMA uses) both equal the per-column loop."""
    torch.manual_seed(seed)
    if linear:
        mod: nn.Module = nn.Linear(cin * groups + 1, cout, bias=seed % 2 == 0)
        x = torch.randn(2, mod.in_features)
    else:
        mod = nn.Conv2d(cin * groups, cout * groups, (kh, kw), stride, pad, groups=groups,
                        bias=seed % 2 == 0)
        x = torch.randn(2, cin * groups, 6, 5)
    rows, cols = layer_matrix_shape(mod)
    mask = (torch.rand(math.ceil(rows / R), cols) > 0.4).float() if binary else \
        torch.rand(math.ceil(rows / R), cols) * 2
    ref = reference_masked_forward(mod, x, mask, R)
    if binary:
        class Wrap(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer, self.fc = mod, nn.Linear(1, 1)

            def forward(self, x):
                return self.layer(x)

        mtm = MultiTaskModel(Wrap(), CrossbarSpec(rows=R, cols=64))
        mtm.add_task("t", 2, "xbm")
        with torch.no_grad():
            mtm.model.layer.xbm_tasks["t"].score.copy_(torch.where(mask > 0, 1e-2, 0.0))
        got = mtm(x).detach()
    else:
        w = apply_column_mask(mod.weight, mask, R)
        got = (F.linear(x, w, mod.bias) if linear else mod._conv_forward(x, w, mod.bias)).detach()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_column_sum_is_adjoint_of_column_mask():
    torch.manual_seed(3)
    w = torch.randn(6, 4, 3, 3)
    R = 7
    rt = math.ceil(36 / R)
    m = torch.randn(rt, 6)
    g = torch.randn_like(w)
    lhs = (apply_column_mask(w, m, R) * g).sum()
    rhs = (column_sum_over_tiles(w * g, R) * m).sum()
    torch.testing.assert_close(lhs, rhs)


def test_resnet50_mask_bits_match_papers_arithmetic():
    with torch.device("meta"):
        model = create_model("resnet50")
    for R, xbm_bits in ((64, 366_528), (128, 183_936)):
        rep = map_model(model, get_spec(rows=R))
        t = rep.totals()
        assert t["layers"] == 53
        assert t["piggyback_mask_bits"] == 23_454_912
        assert t["xbm_mask_bits"] == xbm_bits
        expect = sum(math.ceil(lm.rows / R) * lm.cols for lm in rep.layers)
        assert t["xbm_mask_bits"] == expect


def test_mapping_counts_tiles_with_slices():
    spec = CrossbarSpec(rows=64, cols=64, weight_bits=8, cell_bits=2)  # 4 slices x 2 = 8 columns
    conv = nn.Conv2d(16, 20, 3, bias=False)  # rows 144 -> 3 row tiles; 20*8=160 cols -> 3 tiles
    from xbm.hardware.mapping import LayerMapping

    lm = LayerMapping.of("c", conv, spec)
    assert (lm.row_tiles, lm.col_tiles, lm.crossbars) == (3, 3, 9)
    assert lm.xbm_mask_bits == 60 and lm.piggyback_mask_bits == 2880
    assert lm.cells == 2880 * 8
    assert spec.logical_cols == 8


def test_weights_never_straddle_crossbars_when_slices_do_not_divide_cols():
    """8-bit weights in 3-bit cells, differential: 3 slices x 2 = 6 bitlines per weight, so a
    64-column crossbar holds 10 whole weights and 4 bitlines stay unused. 64 outputs then need
    7 column tiles (not ceil(384 / 64) = 6), and the mapping, XMA2's PE grid and the simulator
    must agree on which crossbar holds each output."""
    from xbm.hardware.mapping import LayerMapping, column_tile_index
    from xbm.hardware.simulate import _Plan
    from xbm.methods.xma2 import pe_grid
    from xbm.nn import CrossbarLayer, apply

    spec = CrossbarSpec(rows=64, cols=64, weight_bits=8, cell_bits=3, pe_rows=1, pe_cols=2)
    assert (spec.physical_columns_per_weight, spec.logical_cols) == (6, 10)
    conv = nn.Conv2d(8, 64, 3, bias=False)
    lm = LayerMapping.of("c", conv, spec)
    assert (lm.row_tiles, lm.col_tiles, lm.crossbars) == (2, 7, 14)
    tiles = column_tile_index(64, spec)
    assert tiles.tolist() == [o // 10 for o in range(64)]  # outputs 60-63 share crossbar 6
    model = nn.Sequential()
    model.add_module("conv", conv)
    model.add_module("fc", nn.Linear(4, 2))
    apply(model, spec)
    layer = next(m for m in model.modules() if isinstance(m, CrossbarLayer))
    npr, npc, pe_idx = pe_grid(layer)
    assert (npr, npc) == (2, 4) and npr * npc == lm.pes
    assert torch.equal(pe_idx[0], tiles // 2)  # PE column = crossbar column tile // pe_cols
    assert torch.equal(_Plan(layer, spec).col_tile, tiles)  # the simulator's per-tile ADCs


@pytest.mark.parametrize("bad,field", [
    ({"rows": 0}, "rows"), ({"cols": -1}, "cols"), ({"cell_bits": 9}, "cell_bits"),
    ({"signed": "magic"}, "signed"), ({"dac_bits": 16}, "dac_bits"),
    ({"cols": 4, "weight_bits": 8, "cell_bits": 1}, "cols"), ({"rows": 2.5}, "rows"),
    ({"name": None}, "name must be a string"), ({"source": 3}, "source must be a string"),
])
def test_spec_rejects_impossible_values(bad, field):
    with pytest.raises(ConfigError, match=field):
        CrossbarSpec(**bad)


def test_unknown_preset_lists_choices():
    with pytest.raises(UnknownNameError, match="default"):
        get_spec("nope")


@pytest.mark.parametrize("shape,R", [((5, 3, 3, 3), 8), ((4, 16), 4), ((3, 2, 1, 1), 64),
                                     ((6, 7, 3, 3), 16)])
def test_column_mask_gradients_match_autograd_reference(shape, R):
    """The hand-written backward equals float64 finite differences and the padded reference."""
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    rows = w[0].numel()
    mask = torch.randn(-(-rows // R), shape[0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: apply_column_mask(a, b, R), (w, mask))
    g = torch.randn(*shape, dtype=torch.float64)
    ref_w, ref_m = torch.autograd.grad(
        (from_tile_view(tile_view(w, R) * mask.t()[..., None], w.shape) * g).sum(), (w, mask))
    got_w, got_m = torch.autograd.grad((apply_column_mask(w, mask, R) * g).sum(), (w, mask))
    assert torch.allclose(got_w, ref_w) and torch.allclose(got_m, ref_m)



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("shape,R", [((6, 8, 3, 3), 8), ((5, 3, 3, 3), 8), ((4, 16), 4),
                                     ((3, 2, 1, 1), 64), ((6, 7, 3, 3), 16), ((9, 64), 64)])
def test_quantised_column_mask_equals_quantise_then_mask(shape, R, device):
    """XBM's and XMA's fused paths (scores quantised inside the column mask's autograd node)
    give the very same weight and gradients as their straight-through estimators followed by
    the column mask, for whole tiles, one tile and a ragged last tile: fusing them for speed
    changes no result."""
    from xbm.methods import create_method
    from xbm.methods.base import BinarizeSTE

    def binarize(s):
        return (s > 5e-3).to(s.dtype)

    torch.manual_seed(0)
    w = torch.randn(*shape, device=device, requires_grad=True)
    rows = w[0].numel()
    score = (torch.randn(-(-rows // R), shape[0], device=device) * 1e-2).requires_grad_()
    g = torch.randn(*shape, device=device)
    fused = apply_column_mask(w, score, R, quantize=binarize)
    split = apply_column_mask(w, BinarizeSTE.apply(score, 5e-3), R)
    assert fused.is_contiguous() and torch.equal(fused, split)
    # scores held transposed (a view with strides (1, row_tiles)) give the same weight too
    st = score.detach().t().contiguous().t()
    assert torch.equal(apply_column_mask(w, st, R, quantize=binarize), split)
    assert 0 < int((score > 5e-3).sum()) < score.numel()  # both mask values occur
    got = torch.autograd.grad((fused * g).sum(), (w, score))
    want = torch.autograd.grad((split * g).sum(), (w, score))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert got[1].is_contiguous()
    # XBM's own quantiser leaves the mask boolean for the multiply to promote: the same bits
    # (signed zeros included) and the same gradients
    xbm = create_method("xbm")
    assert xbm._binarize(score).dtype == torch.bool
    fused = apply_column_mask(w, score, R, quantize=xbm._binarize)
    assert torch.equal(fused.detach().view(torch.int32), split.detach().view(torch.int32))
    got = torch.autograd.grad((fused * g).sum(), (w, score))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    # XMA: log2-space scores spread over every level, 0 included
    xma = create_method("xma")
    ls = (torch.randn(-(-rows // R), shape[0], device=device) * 1.5 - 1).requires_grad_()
    fused = apply_column_mask(w, ls, R, quantize=xma._quantize)
    state = torch.nn.Module()
    state.score = ls
    split = apply_column_mask(w, xma.levels(state), R)
    assert torch.equal(fused, split) and len(torch.unique(xma.levels(state))) > 2
    got = torch.autograd.grad((fused * g).sum(), (w, ls))
    want = torch.autograd.grad((split * g).sum(), (w, ls))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape,R", [((8, 16, 3, 3), 16), ((5, 3, 3, 3), 8), ((6, 7, 1, 1), 64)])
def test_column_mask_of_a_channels_last_weight(shape, R):
    """A weight or gradient that is not contiguous (channels_last) takes the general path and
    gives the same result as the contiguous one (the fast path's strided views assume a
    contiguous layout)."""
    torch.manual_seed(0)
    w = torch.randn(*shape)
    wl = w.to(memory_format=torch.channels_last).requires_grad_()
    w.requires_grad_()
    mask = torch.randn(-(-w[0].numel() // R), shape[0], requires_grad=True)
    g = torch.randn(*shape).to(memory_format=torch.channels_last)
    outs = [apply_column_mask(x, mask, R) for x in (w, wl)]
    assert torch.equal(outs[0], outs[1])
    grads = [torch.autograd.grad((o * g).sum(), (x, mask)) for o, x in zip(outs, (w, wl),
                                                                          strict=True)]
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


def test_column_mask_of_the_wrong_shape_is_a_clear_error():
    w = torch.randn(4, 3, 3, 3)  # 27 rows: 4 row tiles at R = 8
    with pytest.raises(ValueError, match=r"expected \(4, 4\)"):
        apply_column_mask(w, torch.ones(3, 4), 8)
    with pytest.raises(ValueError, match="does not fit"):
        apply_column_mask(w, torch.ones(4, 5), 8)


def test_map_and_cost_build_every_model_without_importing_torchdynamo():
    """`xbm map` and `xbm cost --model` need no weights: building on the meta device must not
    draw initial values, and cost's shape pass runs on a zero-filled CPU twin, since meta
    kernels import TorchDynamo (a second or two added to every command)."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\n"
            "from xbm.cli import main\n"
            "from xbm.models import list_models\n"
            "for m in list_models():\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main(['map', '--model', m, '--json']) == 0, m\n"
            "        assert main(['cost', '--model', m, '--json']) == 0, m\n"
            "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo'))[:3])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_models_own_head_name_is_used_everywhere():
    """A user's model whose classifier is not ``fc`` said so in ``head_name``: ``xbm cost``
    read it, but ``map_model`` put the classifier on crossbars and ``MultiTaskModel`` refused
    the model (no module named 'fc'); ``map_model`` also refused a preset name."""
    import xbm
    from xbm.hardware.mapping import map_model

    class TinyNet(nn.Module):
        head_name = "classifier"

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.classifier = nn.Linear(4, 3)

        def forward(self, x):
            return self.classifier(self.conv(x).mean((2, 3)))

    report = map_model(TinyNet(), "default")
    assert [lay.name for lay in report.layers] == ["conv"]
    assert [lay.name for lay in map_model(TinyNet(), "default", head_name="fc").layers] == \
        ["conv", "classifier"]  # told otherwise: as told
    mtm = xbm.MultiTaskModel(TinyNet(), "default")
    assert mtm.head_name == "classifier"
    mtm.add_task("t", 5, "xbm")
    assert mtm(torch.randn(2, 1, 8, 8)).shape == (2, 5)


def test_hypothesis_keeps_nothing_in_the_working_directory():
    """Its constants cache went to .hypothesis/ of the repository; conftest moves it."""
    from pathlib import Path

    from hypothesis.configuration import storage_directory

    where = storage_directory("constants", intent_to_write=False).path.resolve()
    assert Path.cwd().resolve() not in where.parents
