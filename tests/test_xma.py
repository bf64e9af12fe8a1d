"""Tests for XMA (shift-based multi-level column masks) and XMA2 (PE re-programming + XMA).

Toy setting: ``small_cnn`` on the synthetic fixture task, a few optimiser steps. The XMA2 tests use
a 16x16 crossbar with 4-bit cells and 1x1 PEs so that the three convs hold 94 PEs, enough for a
budget to mean something.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings

import pytest
import torch

from xbm.data import make_fixture_task
from xbm.errors import ConfigError, XbmError
from xbm.hardware.cost import task_facts
from xbm.hardware.mapping import apply_column_mask
from xbm.hardware.spec import CrossbarSpec
from xbm.methods import METHODS, create_method
from xbm.methods.xma import XMA, ShiftQuantizeSTE, XMAConfig, level_bits
from xbm.methods.xma2 import XMA2, XMA2Config, chip_without_restore, pe_grid
from xbm.models import create_model
from xbm.multitask import MultiTaskModel
from xbm.train import seed_everything, train_task

SMALL_SPEC = CrossbarSpec(rows=16, cols=16, weight_bits=8, cell_bits=4, pe_rows=1, pe_cols=1)
DEV = torch.device("cpu")


def _mtm(spec: CrossbarSpec | None = None, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    backbone = create_model("small_cnn", num_classes=4, in_channels=1)
    return MultiTaskModel(backbone, spec or CrossbarSpec()).eval()


def _loaders(seed: int = 0, name: str = "fixture"):
    data = make_fixture_task(name, num_classes=4, n_train=64, n_test=32, seed=seed)
    return data.loaders(16, seed=seed)


def _train(mtm: MultiTaskModel, task: str, method: str, config: dict, epochs: int = 2,
           data_seed: int = 0):
    seed_everything(0)
    mtm.add_task(task, 4, method, config)
    train, test = _loaders(data_seed, task)
    train_task(mtm, task, train, epochs, DEV, progress=False)
    return test


def _outputs(mtm: MultiTaskModel, task: str, x: torch.Tensor) -> torch.Tensor:
    mtm.eval()
    with torch.no_grad(), mtm.use_task(task):
        return mtm(x)


def switch_cells(mtm: MultiTaskModel, from_task: str, to_task: str) -> int:
    """Cells a chip rewrites switching tasks (the cost model's count, from backbone_cells)."""
    return sum(f.switch_cells for f in task_facts(mtm, to_task, reference=from_task))


def _x(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# -- config ----------------------------------------------------------------------------------
def test_registered_with_configs():
    assert METHODS["xma"] is XMA and METHODS["xma2"] is XMA2
    assert XMAConfig().levels == [0.0, 0.125, 0.25, 0.5, 1.0]
    assert XMA2Config().pe_budget == 0.10


@pytest.mark.parametrize("levels", [[], [0, 0.3, 1], [0, 1, 3], [1, 0.5], [0, 1, 1], [0, 0.5],
                                    [-1, 1], "0,1", [0, True], [0, float("inf"), 1]])
def test_bad_levels_rejected(levels):
    with pytest.raises(ConfigError):
        XMAConfig(levels=levels)


def test_cli_style_levels_parse():
    # `xbm adapt --set levels=[0,0.25,0.5,1,2]` json-decodes the value and calls from_dict.
    cfg = create_method("xma", {"levels": json.loads("[0,0.125,1,4]")}).config
    assert cfg.levels == [0.0, 0.125, 1.0, 4.0] and cfg.bits_per_column == 2
    assert create_method("xma2", {"pe_budget": 0.25}).config.pe_budget == 0.25


@pytest.mark.parametrize("bad", [{"pe_budget": -0.1}, {"pe_budget": 1.5}, {"pe_budget": True},
                                 {"warmup_steps": -1}, {"warmup_steps": 2.5},
                                 {"warmup_steps": 0}, {"weight_lr": 0},
                                 {"pe_score": "magic"}, {"spare_pes": "yes"},
                                 {"energy_rank": "cheapest"},
                                 {"energy_budget_j": -1.0}, {"energy_budget_j": "1uJ"},
                                 {"energy_budget_j": float("nan")},
                                 {"energy_budget_j": 1e-6, "energy_preset": "nope"}])
def test_bad_xma2_config_rejected(bad):
    with pytest.raises(ConfigError):
        XMA2Config(**bad)


def test_random_score_needs_no_warmup():
    assert XMA2Config(pe_score="random", warmup_steps=0).warmup_steps == 0


# -- the quantiser ---------------------------------------------------------------------------
def _quant(cfg: XMAConfig, s: torch.Tensor) -> torch.Tensor:
    exps = torch.tensor(cfg.exponents, dtype=s.dtype)
    return ShiftQuantizeSTE.apply(s, exps, cfg.zero_below)


@pytest.mark.parametrize("levels", [[0, 1], [0, 0.5, 1], [0, 0.25, 0.5, 1, 2],
                                    [0, 0.125, 0.25, 0.5, 1, 2, 4], [0.5, 1, 2], [1]])
def test_levels_always_from_the_set(levels):
    cfg = XMAConfig(levels=levels)
    s = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 4
    q = _quant(cfg, s)
    assert set(q.unique().tolist()) <= set(cfg.levels)
    # monotone in the score, and score 0 (the init) is level 1
    order = torch.argsort(s)
    assert torch.all(q[order][1:] >= q[order][:-1])
    assert _quant(cfg, torch.zeros(1)).item() == 1.0


def test_quantiser_boundaries():
    cfg = XMAConfig(levels=[0, 0.25, 0.5, 1, 2])  # exponents -2..1, zero below -2.5
    s = torch.tensor([0.0, 0.49, 0.5, 100.0, -0.51, -1.6, -2.49, -2.51, -50.0])
    assert _quant(cfg, s).tolist() == [1, 1, 2, 2, 0.5, 0.25, 0.25, 0, 0]
    assert _quant(cfg, torch.tensor([-2.5])).tolist() == [0.25]  # 0 strictly below the cut
    binary = XMAConfig(levels=[0, 1])
    assert _quant(binary, torch.tensor([-0.49, -0.51, 3.0])).tolist() == [1, 0, 1]
    gap = XMAConfig(levels=[0, 0.125, 1])  # exponents -3, 0: midpoint -1.5; zero below -3.5
    assert _quant(gap, torch.tensor([-1.4, -1.6, -3.4, -3.6])).tolist() == [1, 0.125, 0.125, 0]


def test_ste_gradient_is_identity_even_at_level_zero():
    cfg = XMAConfig()
    s = torch.tensor([0.0, -1.0, -9.0, 2.0], requires_grad=True)
    g = torch.tensor([1.0, -2.0, 3.0, 0.5])
    (_quant(cfg, s) * g).sum().backward()
    assert torch.equal(s.grad, g)  # a level-0 column (s=-9) still gets its gradient


def test_gradient_reaches_scores_through_a_layer():
    mtm = _mtm()
    mtm.add_task("t", 4, "xma")
    mtm.train()
    mtm(_x()).sum().backward()
    grads = [st.score.grad for _, _, st in mtm.layer_states("t")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# -- XMA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,bits", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (7, 3), (8, 3),
                                    (9, 4)])
def test_level_bits(n, bits):
    assert level_bits(n) == bits


@pytest.mark.parametrize("levels", [[0, 1], [0, 0.5, 1], [0, 0.25, 0.5, 1, 2]])
def test_mask_bits_formula(levels):
    mtm = _mtm()
    mtm.add_task("t", 4, "xma", {"levels": levels})
    expect = 0
    for _, layer, st in mtm.layer_states("t"):
        cols = math.ceil(layer.matrix_rows / layer.spec.rows) * layer.matrix_cols
        assert st.score.shape == (layer.row_tiles, layer.matrix_cols)
        assert mtm.methods["t"].mask_bits(layer, st) == math.ceil(math.log2(len(levels))) * cols
        expect += math.ceil(math.log2(len(levels))) * cols
    assert mtm.mask_bits("t") == expect
    assert mtm.reprogrammed_cells("t") == 0 and mtm.masked_off_columns("t") == 0


def test_xma_starts_as_the_backbone():
    mtm = _mtm()
    x = _x()
    base = _outputs(mtm, "base", x)
    mtm.add_task("t", 4, "xma")
    head = mtm.model.fc
    head.xbm_tasks["t"].load_state_dict({"weight": head.weight, "bias": head.bias})
    assert torch.allclose(_outputs(mtm, "t", x), base, atol=1e-6)


def test_xma_trains_keeps_backbone_and_chip_view_contract():
    mtm = _mtm()
    before = {k: v.clone() for k, v in mtm.backbone_state().items()}
    _train(mtm, "t", "xma", {}, epochs=3)
    after = mtm.backbone_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    method = mtm.methods["t"]
    moved = 0
    for _, layer, st in mtm.layer_states("t"):
        lv = method.column_scale(layer, st)
        assert set(lv.unique().tolist()) <= set(method.config.levels)
        moved += int((lv != 1).sum())
        assert method.programmed_weight(layer, st) is layer.weight
        assert torch.equal(method.effective_weight(layer, st),
                           apply_column_mask(layer.weight, lv, layer.spec.rows))
        hist = method.level_histogram(layer, st)
        assert sum(hist.values()) == st.score.numel()
        assert method.masked_off_columns(layer, st) == hist[0.0]
    assert moved > 0  # 12 steps at the default lr move some columns off level 1


def test_a_single_level_learns_only_the_head_and_norms():
    """levels=[1] quantises every score to 1: the scores reach no output, so they are neither
    counted as trainable nor given to the optimizer (they were both)."""
    mtm = _mtm()
    _train(mtm, "one", "xma", {"levels": [1]}, epochs=1)
    _train(mtm, "lp", "linear-probe", {}, epochs=1)
    assert mtm.trainable_params("one") == mtm.trainable_params("lp") > 0
    assert mtm.mask_bits("one") == 0
    for _, _, st in mtm.layer_states("one"):
        assert torch.all(st.score == XMAConfig().score_init)  # untouched by the optimizer
    # XMA2 likewise: its re-programmed PEs' weights learn, its scores reach no output
    _train(mtm, "two", "xma2", {"levels": [1], "pe_budget": 0.25, "warmup_steps": 1},
           epochs=1)
    method = mtm.methods["two"]
    picked = sum(int(sel[1].sum()) for sel in (method._selection(layer, st)
                                               for _, layer, st in mtm.layer_states("two"))
                 if sel is not None)
    assert picked > 0
    assert mtm.trainable_params("two") == mtm.trainable_params("lp") + picked


# -- XMA2: geometry and budget 0 -------------------------------------------------------------
def test_pe_grid_matches_mapping():
    mtm = _mtm(SMALL_SPEC)
    mapping = {lm.name: lm for lm in mtm.mapping().layers}
    assert sum(lm.pes for lm in mapping.values()) == 94
    for name, layer, _ in _states_after_add(mtm):
        npr, npc, col_pe = pe_grid(layer)
        assert npr * npc == mapping[name].pes
        assert col_pe.shape == (layer.row_tiles, layer.matrix_cols)
        assert col_pe.unique().numel() == npr * npc  # no empty PE in this geometry


def _states_after_add(mtm: MultiTaskModel):
    mtm.add_task("probe", 4, "xma2")
    out = list(mtm.layer_states("probe"))
    mtm.remove_task("probe")
    return out


@pytest.mark.parametrize("warmup", [None, 2])
def test_budget_zero_is_xma_exactly(warmup):
    """Both at one score lr, high enough that every level is reached (at XMA's default lr 8
    steps reach only 0.5 and 1, so a level-0 column computed otherwise went unseen). A warm-up
    of 2 steps makes the PE selection run (8 steps train here; the default warm-up of 10 never
    ends), so selecting nothing is checked to change nothing too."""
    runs = {}
    cfg = {"lr": 1.0}
    cfg2 = cfg | {"pe_budget": 0.0} | ({"warmup_steps": warmup} if warmup else {})
    for method, c in (("xma", cfg), ("xma2", cfg2)):
        mtm = _mtm(SMALL_SPEC)
        _train(mtm, "t", method, c, epochs=2)
        runs[method] = mtm
    a, b = runs["xma"], runs["xma2"]
    reached = set()
    for _, layer, st in a.layer_states("t"):
        reached |= {v for v, n in a.methods["t"].level_histogram(layer, st).items() if n}
    assert reached == set(XMAConfig().levels)  # every level is compared below
    if warmup:  # the selection ran during training, not only at the task's end
        assert b.methods["t"]._selected
        assert all(int(st.phase) == 1 for _, _, st in b.layer_states("t"))
        assert max(st._steps for _, _, st in b.layer_states("t")) == warmup
    else:  # still in the warm-up: at budget 0 it gathered no gradient statistics
        assert all(st._grad_acc is None for _, _, st in b.layer_states("t"))
    x = _x()
    assert torch.equal(_outputs(a, "t", x), _outputs(b, "t", x))
    for (_, _, sa), (_, _, sb) in zip(a.layer_states("t"), b.layer_states("t"), strict=True):
        assert torch.equal(sa.score, sb.score)
        assert not hasattr(sb, "weight")  # no weight copy at budget 0
    assert b.reprogrammed_cells("t") == 0
    assert b.mask_bits("t") == a.mask_bits("t")
    assert b.masked_off_columns("t") == a.masked_off_columns("t")


# -- XMA2: selection -------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.05, 0.10, 0.25])
def test_selection_respects_budget_and_picks_top_scores(budget):
    mtm = _mtm(SMALL_SPEC)
    _train(mtm, "t", "xma2", {"pe_budget": budget, "warmup_steps": 2}, epochs=2)
    states = list(mtm.layer_states("t"))
    method = mtm.methods["t"]
    k = math.floor(budget * 94)
    scores = torch.cat([st.pe_score.reshape(-1) for _, _, st in states])
    chosen = torch.cat([st.pe_mask.reshape(-1) for _, _, st in states])
    assert int(chosen.sum()) == k == sum(method.selected_pes(la, st) for _, la, st in states)
    assert scores[chosen].min() >= scores[~chosen].max()
    assert (scores >= 0).all()


def _pe_cells_reference(layer, st) -> torch.Tensor:
    """Independent reference: cells per PE by counting the weights of each PE one by one."""
    inside = torch.zeros(st.pe_mask.numel(), dtype=torch.long)
    spec = layer.spec
    w = layer.weight
    for o in range(w.shape[0]):
        pc = (o // (spec.cols // spec.physical_columns_per_weight)) // spec.pe_cols
        for r in range(w[0].numel()):
            pr = (r // spec.rows) // spec.pe_rows
            inside[pr * st.pe_mask.shape[1] + pc] += 1
    return inside * spec.cells_per_weight


@pytest.mark.parametrize("rank", ["score", "density"])
@pytest.mark.parametrize("budget_uj", [0.0, 0.05, 0.2])
def test_energy_budget_bounds_reprogramming_energy(budget_uj, rank):
    from xbm.hardware.cost import task_costs
    from xbm.hardware.energy import get_preset

    preset = get_preset("default")
    per_cell = preset.write_energy_per_cell_j()
    budget = budget_uj * 1e-6
    mtm = _mtm(SMALL_SPEC)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(mtm, "t", "xma2", {"pe_budget": 1.0, "warmup_steps": 2, "energy_budget_j": budget,
                                  "energy_rank": rank})
    method = mtm.methods["t"]
    states = list(mtm.layer_states("t"))
    for _, layer, st in states:
        assert torch.equal(method.pe_cells(layer, st), _pe_cells_reference(layer, st))
    cells = torch.cat([method.pe_cells(la, st) for _, la, st in states])
    chosen = torch.cat([st.pe_mask.reshape(-1) for _, _, st in states])
    scores = torch.cat([st.pe_score.reshape(-1) for _, _, st in states])
    spent = int(cells[chosen].sum())
    reserve = sum(st.pe_mask.numel() + 3 * st.score.numel() for _, _, st in states) * \
        preset.periphery.mask_bit_write_energy_j
    assert spent * per_cell + reserve <= budget + 1e-18 or spent == 0
    # a budget the mask write alone overruns is said, not silently exceeded
    said = [str(w.message) for w in caught if "below the" in str(w.message)]
    assert len(said) == (1 if budget < reserve else 0), said
    if said:
        assert f"is below the {reserve:.3g} J that writing the task's mask bits takes" in said[0]
        # the budget it suggests is enough: rounded up, not to nearest
        assert float(said[0].rsplit("set at least ", 1)[1].split()[0]) >= reserve
    deploy = task_costs(mtm, "t", "default", input_size=28)["adaption_energy_j"]
    assert deploy <= budget + 1e-18 or budget_uj == 0.0
    # reference greedy walk down the ranking, skipping PEs that would overrun
    left = max(0, math.floor((budget - reserve) / per_cell + 1e-9))
    ref = torch.zeros_like(chosen)

    density = scores / cells.clamp(min=1).to(scores.dtype)  # same float32 rounding as the method
    value = density if rank == "density" else scores

    def key(j: int) -> tuple[float, int]:
        return (-float(value[j]), j)

    for i in sorted(range(scores.numel()), key=key):
        if scores[i] > 0 and int(cells[i]) <= left:
            ref[i] = True
            left -= int(cells[i])
    assert torch.equal(ref, chosen)
    if budget_uj == 0.0:
        assert not chosen.any() and mtm.reprogrammed_cells("t") == 0
    else:
        assert chosen.any()


def test_trainable_params_count_selected_weights_not_the_copy():
    mtm = _mtm(SMALL_SPEC)
    _train(mtm, "t", "xma2", {"pe_budget": 0.10, "warmup_steps": 2})
    method = mtm.methods["t"]
    groups = mtm.task_parameters("t")
    dense = sum(p.numel() for ps in groups.values() for p in ps)
    selected = sum(int(_weight_pe_mask(la, st).sum()) for _, la, st in mtm.layer_states("t"))
    scores = sum(st.score.numel() for _, _, st in mtm.layer_states("t"))
    # a selected PE's columns run at scale 1: their scores learn nothing (session 27)
    dead = sum(int(method._selection(la, st)[0].sum()) for _, la, st in mtm.layer_states("t")
               if method._selection(la, st) is not None)
    head_norm = sum(p.numel() for p in groups["head"] + groups["norm"])
    assert selected > 0 and dead > 0
    assert mtm.trainable_params("t") == head_norm + scores - dead + selected < dense
    assert all(method.trainable_count(la, st) >= st.score.numel()
               for _, la, st in mtm.layer_states("t"))


@pytest.mark.parametrize(("rank", "expected"), [("score", [True, False, False]),
                                                 ("density", [False, True, True])])
def test_energy_rank_orders_the_walk(rank, expected):
    """Scores 10/6/5 on PEs of 100/40/40 cells and room for 100 cells: the score order takes the
    big PE alone (10), the per-cell order the two small ones (11)."""
    from xbm.hardware.energy import get_preset

    per_cell = get_preset("default").write_energy_per_cell_j()
    method = create_method("xma2", {"pe_budget": 1.0, "energy_budget_j": 100.5 * per_cell,
                                    "energy_rank": rank})
    chosen = method._choose(torch.tensor([10.0, 6.0, 5.0]), torch.tensor([100, 40, 40]))
    assert chosen.tolist() == expected


def test_random_selection_respects_budget():
    mtm = _mtm(SMALL_SPEC)
    _train(mtm, "t", "xma2", {"pe_budget": 0.1, "pe_score": "random", "warmup_steps": 0})
    assert sum(int(st.pe_mask.sum()) for _, _, st in mtm.layer_states("t")) == 9


def _weight_pe_mask(layer, st) -> torch.Tensor:
    """Independent reference: per weight, is it inside a selected PE? (explicit index maths)"""
    spec = layer.spec
    w = layer.weight
    cout = w.shape[0]
    rows = w[0].numel()
    r = torch.arange(rows)
    o = torch.arange(cout)
    pe_r = (r // spec.rows) // spec.pe_rows
    pe_c = (o // (spec.cols // spec.physical_columns_per_weight)) // spec.pe_cols
    m = st.pe_mask[pe_r[None, :], pe_c[:, None]]  # (Cout, rows)
    return m.reshape(w.shape)


@pytest.mark.parametrize("pe", [(1, 1), (2, 2), (2, 1)])
def test_cells_outside_selected_pes_bit_identical_and_reprogram_count(pe):
    """Over PE shapes: with 1x1 PEs a PE is one crossbar, and a wrong crossbar-to-PE map would
    go unseen (small_cnn's layers have 1, 5 and 9 row tiles here: none a multiple of 2)."""
    spec = dataclasses.replace(SMALL_SPEC, pe_rows=pe[0], pe_cols=pe[1])
    mtm = _mtm(spec)
    before = {k: v.clone() for k, v in mtm.backbone_state().items()}
    _train(mtm, "t", "xma2", {"pe_budget": 0.25, "warmup_steps": 2}, epochs=2)
    after = mtm.backbone_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    method = mtm.methods["t"]
    expect = 0
    for _, layer, st in mtm.layer_states("t"):
        inside = _weight_pe_mask(layer, st)
        prog = method.programmed_weight(layer, st)
        assert torch.equal(prog[~inside], layer.weight[~inside])
        assert torch.equal(st.weight[~inside], layer.weight[~inside])
        changed = int((prog != layer.weight).sum())
        assert changed == int((prog[inside] != layer.weight[inside]).sum())
        assert method.reprogrammed_cells(layer, st) == changed * layer.spec.cells_per_weight
        expect += changed * layer.spec.cells_per_weight
        # chip-view contract: effective = column scale applied to the programmed cells
        scale = method.column_scale(layer, st)
        assert torch.allclose(method.effective_weight(layer, st),
                              apply_column_mask(prog, scale, layer.spec.rows))
        sel = method.selected_columns(st)
        assert (scale[sel] == 1).all()
        frozen = st.score.numel() - int(sel.sum())
        assert method.mask_bits(layer, st) == st.pe_mask.numel() + 3 * frozen
        hist = method.level_histogram(layer, st)  # selected columns count at level 1
        assert hist[1.0] >= int(sel.sum()) and sum(hist.values()) == st.score.numel()
        assert method.masked_off_columns(layer, st) == hist[0.0] == int((scale == 0).sum())
    assert expect == mtm.reprogrammed_cells("t") > 0
    assert switch_cells(mtm, "base", "t") == expect


@pytest.mark.filterwarnings("ignore:xma2 task:UserWarning")
def test_selection_is_continuous():
    # Folding the warm-up's column levels into the chosen PEs keeps the function unchanged.
    mtm = _mtm(SMALL_SPEC)
    seed_everything(0)
    mtm.add_task("t", 4, "xma2", {"pe_budget": 0.25, "warmup_steps": 50, "lr": 0.3})
    train, _ = _loaders()
    train_task(mtm, "t", train, 3, DEV, progress=False)  # 12 steps: still in warm-up
    method = mtm.methods["t"]
    assert not any(st.pe_mask.any() for _, _, st in mtm.layer_states("t"))
    x = _x()
    y0 = _outputs(mtm, "t", x)
    method._selected = False  # on_task_end closed it; reopen to select by hand
    for _, _, st in mtm.layer_states("t"):
        st.phase.zero_()
        st._grad_acc = torch.ones_like(st.weight)
    method.select()
    assert sum(int(st.pe_mask.sum()) for _, _, st in mtm.layer_states("t")) == 23
    assert torch.allclose(_outputs(mtm, "t", x), y0, atol=1e-5)


def test_short_training_warns_and_selects_nothing():
    mtm = _mtm(SMALL_SPEC)
    with pytest.warns(UserWarning, match="no PE is re-programmed yet"):
        _train(mtm, "t", "xma2", {"warmup_steps": 100}, epochs=1)
    assert mtm.reprogrammed_cells("t") == 0


def test_training_in_chunks_continues_the_warm_up_and_selects():
    """A first train_task call that ended inside the warm-up closed the selection for good
    (the task stayed XMA whatever it trained next); now the next call continues the warm-up
    and selects, as one long call would."""
    mtm = _mtm(SMALL_SPEC)
    with pytest.warns(UserWarning, match="no PE is re-programmed yet"):
        _train(mtm, "t", "xma2", {"warmup_steps": 6, "pe_budget": 0.25}, epochs=1)  # 4 steps
    states = list(mtm.layer_states("t"))
    assert not mtm.methods["t"]._selected and all(int(st.phase) == 0 for _, _, st in states)
    mtm.set_trainable("t")
    train, _ = _loaders(0, "t")
    train_task(mtm, "t", train, 1, DEV, progress=False)  # 4 more: past the warm-up
    assert mtm.methods["t"]._selected and all(int(st.phase) == 1 for _, _, st in states)
    assert mtm.reprogrammed_cells("t") > 0


def _chunked_selection(tmp_path, through_bundle: bool):
    """Train an XMA2 task for 4 steps (inside its 6-step warm-up), optionally save and reload
    it into a fresh model of the same backbone, then train 4 more: the PEs it selects."""
    mtm = _mtm(SMALL_SPEC)
    with pytest.warns(UserWarning, match="no PE is re-programmed yet"):
        _train(mtm, "t", "xma2", {"warmup_steps": 6, "pe_budget": 0.25}, epochs=1)
    if through_bundle:
        path = tmp_path / "warm.safetensors"
        mtm.save_bundle(path)
        mtm = _mtm(SMALL_SPEC)
        assert mtm.load_bundle(path) == ["t"]
    mtm.set_trainable("t")
    seed_everything(1)
    train, _ = _loaders(0, "t")
    train_task(mtm, "t", train, 1, DEV, progress=False)
    assert mtm.methods["t"]._selected and mtm.reprogrammed_cells("t") > 0
    return mtm, [(st.pe_mask.clone(), st.pe_score.clone()) for _, _, st in mtm.layer_states("t")]


def test_a_bundle_saved_inside_the_warm_up_continues_it(tmp_path):
    """A bundle saved inside the warm-up kept no step count or gradient sum, so the loaded
    task started its warm-up again and chose its PEs from the later steps' gradients only; now
    it carries both, and the loaded task selects exactly the PEs that training on would."""
    _, direct = _chunked_selection(tmp_path, through_bundle=False)
    loaded, resumed = _chunked_selection(tmp_path, through_bundle=True)
    for (m0, s0), (m1, s1) in zip(direct, resumed, strict=True):
        assert torch.equal(m0, m1) and torch.equal(s0, s1)
    # a selected task's bundle carries no warm-up state, and loads as before
    path = tmp_path / "done.safetensors"
    loaded.save_bundle(path)
    from xbm.io import load_safetensors

    assert not [k for k in load_safetensors(path)[0] if "warmup" in k]
    assert _mtm(SMALL_SPEC).load_bundle(path) == ["t"]


def test_the_warm_up_sum_follows_the_gradient_to_its_device():
    """The sum is a plain attribute, which model.to() leaves behind: a task loaded from a
    bundle on the CPU and moved to a GPU would add a CUDA gradient into a CPU tensor."""
    state = torch.nn.Module()
    state._grad_acc = torch.ones(2, 3)
    XMA2._accumulate(state, torch.ones(2, 3, device="meta"))
    assert state._grad_acc.device.type == "meta"


def test_a_bundle_with_a_bad_warm_up_count_is_refused(tmp_path):
    from xbm.errors import BundleError
    from xbm.io import load_safetensors, metadata_hash, save_safetensors, tensors_hash

    mtm = _mtm(SMALL_SPEC)
    with pytest.warns(UserWarning, match="no PE is re-programmed yet"):
        _train(mtm, "t", "xma2", {"warmup_steps": 6, "pe_budget": 0.25}, epochs=1)
    path = tmp_path / "warm.safetensors"
    mtm.save_bundle(path)
    tensors, meta = load_safetensors(path)
    key = next(k for k in tensors if k.endswith("warmup_steps_done"))
    assert int(tensors[key]) == 4
    tensors[key] = torch.tensor([7], dtype=torch.int64)

    meta["content_hash"] = tensors_hash(tensors)
    meta.pop("meta_hash")
    meta["meta_hash"] = metadata_hash(meta)
    save_safetensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(BundleError, match="warmup_steps_done is 7, outside 1..warmup_steps=6"):
        _mtm(SMALL_SPEC).load_bundle(tmp_path / "bad.safetensors")
    # a sum that save_bundle would write but load_bundle refuse: refused when saving
    st = next(st for _, _, st in mtm.layer_states("t") if st._grad_acc is not None)
    st._grad_acc[0] = float("inf")
    with pytest.raises(XbmError, match=r"holds NaN or infinite values \(.*warmup_grad_sum\)"):
        mtm.save_bundle(tmp_path / "inf.safetensors")
    assert not (tmp_path / "inf.safetensors").exists()


class _Tied(torch.nn.Module):
    """One conv applied twice per forward (weight tying): its layer forwards twice per step."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("steps,selected", [(3, False), (4, False), (5, True)])
def test_warm_up_counts_optimizer_steps_not_forwards(steps, selected):
    """A layer used twice per forward counted two warm-up steps per training step, so a
    tied model selected its PEs after half the warm-up; gradient checkpointing and
    accumulation would do the same. A step is now a forward after the optimizer moved the
    layer's scores: the selection comes at the first forward after warmup_steps steps."""
    torch.manual_seed(0)
    mtm = MultiTaskModel(_Tied(), SMALL_SPEC)
    m = mtm.add_task("t", 4, "xma2", {"warmup_steps": 4, "pe_budget": 0.25})
    train, _ = _loaders(0, "t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_task(mtm, "t", train, 2, DEV, progress=False, max_steps=steps)  # 4 a epoch
    assert m._selected is selected
    tied = [st for name, _, st in mtm.layer_states("t") if name == "c2"]
    assert [st._steps for st in tied] == [min(steps, 4)]


@pytest.mark.parametrize("fused", [False, True])
def test_warm_up_counts_the_steps_of_a_users_own_loop(fused):
    """A custom loop: a tied layer, two forwards per step, an optimizer of the user's own. A
    fused Adam updates in place without moving the version counter, so the step is also told
    by the scores' values: the PEs are chosen after warmup_steps steps either way."""
    torch.manual_seed(0)
    mtm = MultiTaskModel(_Tied(), SMALL_SPEC)
    m = mtm.add_task("t", 4, "xma2", {"warmup_steps": 3, "pe_budget": 0.25})
    mtm.set_trainable("t")
    params = [p for p in mtm.parameters() if p.requires_grad]
    try:
        opt = torch.optim.Adam(params, lr=0.01, fused=fused)
    except (RuntimeError, TypeError) as exc:  # an older torch without CPU fused Adam
        pytest.skip(str(exc))
    mtm.train()
    x, y = next(iter(_loaders(0, "t")[0]))
    for step in range(1, 4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mtm(x), y).backward()
        opt.step()
        assert not m._selected, step  # 3 steps of warm-up (6 forwards of the tied layer)...
    mtm(x)
    assert m._selected  # ...then the next forward selects


def test_param_groups_split_scores_and_weights():
    mtm = _mtm(SMALL_SPEC)
    m = mtm.add_task("t", 4, "xma2", {"lr": 0.07, "weight_lr": 3e-4})
    groups = m.param_groups(mtm.task_parameters("t")["state"])
    assert [g["lr"] for g in groups] == [0.07, 3e-4]
    assert all(p.dim() == 2 for p in groups[0]["params"])  # (row_tiles, Cout) scores
    assert sum(p.numel() for p in groups[1]["params"]) == sum(
        la.weight.numel() for _, la, _ in mtm.layer_states("t"))


def test_method_object_is_per_task():
    """Refused before training too: one XMA2 object for two tasks made one PE selection over
    both (about twice the budget for the first, none for the second); a removed task's object
    stays refused."""
    mtm = _mtm(SMALL_SPEC)
    m = create_method("xma2", {"pe_budget": 0.1, "warmup_steps": 1})
    mtm.add_task("a", 4, m)
    with pytest.raises(XbmError, match="already serves task 'a'"):
        mtm.add_task("b", 4, m)
    assert mtm.task_names() == ["a"]
    train, _ = _loaders()
    train_task(mtm, "a", train, 1, DEV, progress=False)
    with pytest.raises(XbmError, match="already serves task 'a'"):
        mtm.add_task("b", 4, m)
    other = _mtm(SMALL_SPEC)
    with pytest.raises(XbmError, match="already serves task 'a'"):
        other.add_task("b", 4, m)  # another model: the object still holds a's selection
    fresh = create_method("xma2", {"pe_budget": 0.1, "warmup_steps": 1})
    mtm.add_task("b", 4, fresh)
    mtm.remove_task("b")
    with pytest.raises(XbmError, match="already serves task 'b'"):
        mtm.add_task("c", 4, fresh)  # removed, but its layer states were b's (a stale
        # selection picked every PE of a reused object)


# -- XMA2: earlier tasks, the shared chip, bundles -------------------------------------------
def test_earlier_tasks_unaffected_and_chip_measurements():
    mtm = _mtm(SMALL_SPEC)
    before = {k: v.clone() for k, v in mtm.backbone_state().items()}
    x = _x()
    _train(mtm, "a", "xma2", {"pe_budget": 0.25, "warmup_steps": 2}, data_seed=0)
    ya = _outputs(mtm, "a", x)
    _train(mtm, "b", "xma2", {"pe_budget": 0.25, "warmup_steps": 2}, data_seed=1)
    # Software keeps every task's own view: task a reads exactly what it did before b existed.
    assert torch.equal(_outputs(mtm, "a", x), ya)
    after = mtm.backbone_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # A chip that never restores shows task a task b's PEs: its outputs change, then come back.
    with chip_without_restore(mtm, ["a", "b"]):
        assert not torch.equal(_outputs(mtm, "a", x), ya)
    assert torch.equal(_outputs(mtm, "a", x), ya)
    assert all(torch.equal(before[k], v) for k, v in mtm.backbone_state().items())
    # Switching a -> b restores a's PEs and writes b's: at most both tasks' writes, at least b's.
    ra, rb = mtm.reprogrammed_cells("a"), mtm.reprogrammed_cells("b")
    assert max(ra, rb) <= switch_cells(mtm, "a", "b") <= ra + rb
    assert switch_cells(mtm, "a", "b") == switch_cells(mtm, "b", "a")


def test_spare_pes_leave_the_backbone_cells_alone():
    mtm = _mtm(SMALL_SPEC)
    x = _x()
    cfg = {"pe_budget": 0.25, "warmup_steps": 2, "spare_pes": True}
    _train(mtm, "a", "xma2", cfg, data_seed=0)
    ya = _outputs(mtm, "a", x)
    _train(mtm, "b", "xma2", cfg, data_seed=1)
    assert switch_cells(mtm, "a", "b") == 0
    with chip_without_restore(mtm, ["a", "b"]):
        assert torch.equal(_outputs(mtm, "a", x), ya)
    # a spare PE is written in full: every weight of the selected PEs, not only changed ones
    method = mtm.methods["a"]
    total = sum(int(_weight_pe_mask(la, st).sum()) * la.spec.cells_per_weight
                for _, la, st in mtm.layer_states("a"))
    assert mtm.reprogrammed_cells("a") == total == sum(
        method.reprogrammed_cells(la, st) for _, la, st in mtm.layer_states("a"))


def test_xma2_bundle_with_wrong_selected_count_is_refused(tmp_path):
    from xbm.errors import BundleError
    from xbm.io import load_safetensors, metadata_hash, save_safetensors, tensors_hash

    mtm = _mtm(SMALL_SPEC)
    _train(mtm, "t", "xma2", {"pe_budget": 0.1, "warmup_steps": 2})
    path = tmp_path / "b.safetensors"
    mtm.save_bundle(path)
    tensors, meta = load_safetensors(path)
    key = next(k for k, v in tensors.items() if k.endswith("weight_selected") and v.numel())
    tensors[key] = tensors[key][:-1].clone()
    bad = tmp_path / "bad.safetensors"
    # a consistent content hash, so the structural check is what refuses it
    meta = meta | {"content_hash": tensors_hash(tensors)}
    save_safetensors(bad, tensors, meta | {"meta_hash": metadata_hash(meta)})
    fresh = _mtm(SMALL_SPEC)
    with pytest.raises(BundleError, match="weight_selected"):
        fresh.load_bundle(bad)
    assert fresh.task_names() == []  # rolled back, layer state too
    assert not [k for k in fresh.model.state_dict() if "xbm_tasks." in k]


def test_mixed_with_column_methods_switch_cost_zero():
    mtm = _mtm(SMALL_SPEC)
    _train(mtm, "a", "xma", {}, epochs=1)
    _train(mtm, "b", "xbm", {}, epochs=1)
    assert switch_cells(mtm, "a", "b") == 0 == switch_cells(mtm, "base", "a")


def test_xma2_bundle_roundtrip(tmp_path):
    mtm = _mtm(SMALL_SPEC)
    _train(mtm, "t", "xma2", {"pe_budget": 0.1, "warmup_steps": 2})
    x = _x()
    y = _outputs(mtm, "t", x)
    path = tmp_path / "b.safetensors"
    mtm.save_bundle(path)
    fresh = _mtm(SMALL_SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.load_bundle(path) == ["t"]
    assert torch.equal(_outputs(fresh, "t", x), y)
    for (_, _, s1), (_, _, s2) in zip(mtm.layer_states("t"), fresh.layer_states("t"),
                                      strict=True):
        assert torch.equal(s1.weight, s2.weight)
    # the bundle holds the selected PEs' weights, not the dense copy
    from xbm.io import load_safetensors

    tensors, _ = load_safetensors(path)
    assert not any(k.endswith(".weight") and ".xbm_tasks.t." in k and "fc" not in k
                   and tensors[k].dim() == 4 for k in tensors)
    stored = sum(v.numel() for k, v in tensors.items() if k.endswith("weight_selected"))
    selected = sum(int(_weight_pe_mask(la, st).sum()) for _, la, st in mtm.layer_states("t"))
    assert stored == selected > 0
    assert fresh.reprogrammed_cells("t") == mtm.reprogrammed_cells("t") > 0
    assert fresh.mask_bits("t") == mtm.mask_bits("t")
    # A loaded task's selection is final: a training forward does not select again.
    fresh.train()
    fresh.set_task("t")
    fresh(x)
    for (_, _, s1), (_, _, s2) in zip(mtm.layer_states("t"), fresh.layer_states("t"),
                                      strict=True):
        assert torch.equal(s1.pe_mask, s2.pe_mask)


def test_a_budget_below_one_pe_warns_and_names_the_budget_that_takes_one():
    """small_cnn on the default spec has 6 PEs: the default 10% is floor(0.6) = 0 PEs, which
    re-programmed nothing without a word while the task was called XMA2."""
    mtm = _mtm()
    with pytest.warns(UserWarning, match=r"pe_budget 0.1 of this model's 6 PEs is 0 PEs.*"
                                         r"at least 0.167 to re-program one PE") as rec:
        _train(mtm, "t", "xma2", {"warmup_steps": 2}, epochs=2)
    assert len([w for w in rec if "0 PEs" in str(w.message)]) == 1  # once, at the selection
    assert mtm.reprogrammed_cells("t") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the suggested budget takes one PE, without a warning
        _train(mtm, "u", "xma2", {"warmup_steps": 2, "pe_budget": 0.167}, epochs=2)
    states = list(mtm.layer_states("u"))
    assert sum(mtm.methods["u"].selected_pes(la, st) for _, la, st in states) == 1
    assert mtm.reprogrammed_cells("u") > 0


def _reopen_selection(mtm: MultiTaskModel, task: str) -> XMA2:
    """A trained-in-warm-up XMA2 task whose selection can be made again by hand."""
    method = mtm.methods[task]
    method._selected = False
    for _, _, st in mtm.layer_states(task):
        st.phase.zero_()
    return method


def _warm_task(budget: float) -> MultiTaskModel:
    mtm = _mtm(SMALL_SPEC)
    seed_everything(0)
    mtm.add_task("t", 4, "xma2", {"pe_budget": budget, "warmup_steps": 50})
    train, _ = _loaders()
    train_task(mtm, "t", train, 1, DEV, progress=False)  # 4 steps: still in warm-up
    return mtm


def test_pe_score_sums_the_magnitude_of_each_weight_gradient():
    """A PE's tier-1 score is sum |dL/dw| over its weights, each taken alone: gradients of
    opposite signs in one PE must add up, not cancel (checked against a direct per-PE sum)."""
    mtm = _warm_task(0.25)
    method = _reopen_selection(mtm, "t")
    ref = []
    for _, la, st in mtm.layer_states("t"):
        g = torch.ones_like(st.weight)
        g.view(g.shape[0], -1)[:, 1::2] *= -1  # alternate signs along each column's rows
        g *= torch.arange(1, g.shape[0] + 1, dtype=g.dtype).view(-1, *[1] * (g.dim() - 1))
        st._grad_acc = g
        spec, w = la.spec, la.weight  # each weight's PE, by explicit index maths
        pe_r = (torch.arange(w[0].numel()) // spec.rows) // spec.pe_rows
        pe_c = (torch.arange(w.shape[0]) // (spec.cols // spec.physical_columns_per_weight)
                ) // spec.pe_cols
        pe = (pe_r[None, :] * st.pe_mask.shape[1] + pe_c[:, None]).reshape(-1)
        ref.append(torch.zeros(st.pe_mask.numel(), dtype=g.dtype).index_add_(
            0, pe, g.abs().reshape(g.shape[0], -1).reshape(-1)))
    method.select()
    got = torch.cat([st.pe_score.reshape(-1) for _, _, st in mtm.layer_states("t")])
    torch.testing.assert_close(got, torch.cat(ref))


def test_warm_up_sums_each_steps_gradient_before_the_magnitude(monkeypatch):
    """The tier-1 statistic through the real hook: the warm-up's per-step gradients of each
    layer's effective weight add up signed (sum over steps, then |.| per weight at the
    selection), one term per step. The test above sets the sum by hand; here a hook that took
    |g| per step or kept the last step's only would fail."""
    seen: dict[int, list[torch.Tensor]] = {}
    real = XMA2._accumulate

    def recording(state, grad):
        seen.setdefault(id(state), []).append(grad.detach().clone())
        real(state, grad)

    monkeypatch.setattr(XMA2, "_accumulate", staticmethod(recording))
    mtm = _warm_task(0.25)  # 4 warm-up steps of 50
    states = [st for _, _, st in mtm.layer_states("t")]
    assert all(len(seen[id(st)]) == 4 for st in states)
    for st in states:
        torch.testing.assert_close(st._grad_acc, torch.stack(seen[id(st)]).sum(0))
    method = _reopen_selection(mtm, "t")
    expect = torch.cat([method._importance(la, st) for _, la, st in mtm.layer_states("t")])
    method.select()
    got = torch.cat([st.pe_score.reshape(-1) for st in states])
    torch.testing.assert_close(got, expect)
    signed = torch.stack(seen[id(states[0])]).sum(0).abs().sum()
    unsigned = torch.stack(seen[id(states[0])]).abs().sum(0).sum()
    assert signed < unsigned  # the steps' gradients do cancel somewhere: the order matters


def test_pes_without_gradient_are_never_selected():
    """A PE whose weights got no gradient in the warm-up has score 0 and is never picked, even
    where the budget would allow it: re-programming it could not help the task."""
    mtm = _warm_task(1.0)
    method = _reopen_selection(mtm, "t")
    states = list(mtm.layer_states("t"))
    for i, (_, _, st) in enumerate(states):
        st._grad_acc = torch.zeros_like(st.weight) if i == 0 else torch.ones_like(st.weight)
    method.select()
    assert not states[0][2].pe_mask.any()
    assert all(st.pe_mask[st.pe_score > 0].all() for _, _, st in states[1:])


def test_spare_pes_count_every_cell_of_a_selected_pe_even_unchanged_ones():
    """With spare PEs, a selected PE is written in full into its spare: its weights that the task
    left at the backbone's values cost cells too. Without spare PEs only changed weights do."""
    for spare in (True, False):
        mtm = _mtm(SMALL_SPEC)
        _train(mtm, "a", "xma2", {"pe_budget": 0.25, "warmup_steps": 2, "spare_pes": spare})
        total = 0
        for _, la, st in mtm.layer_states("a"):
            inside = _weight_pe_mask(la, st).bool()
            with torch.no_grad():  # put back half of the selected weights
                keep = inside & (torch.rand(st.weight.shape,
                                            generator=torch.Generator().manual_seed(0)) < 0.5)
                st.weight[keep] = la.weight[keep]
            changed = (st.weight != la.weight) & inside
            total += int((inside if spare else changed).sum()) * la.spec.cells_per_weight
        assert mtm.reprogrammed_cells("a") == total > 0


def test_xma2_selects_its_pes_when_a_loop_trains_in_eval_mode() -> None:
    """A hand-written loop that keeps the model in eval mode (frozen BatchNorm) never counted a
    warm-up step, so the task silently stayed plain XMA: no PE was ever selected."""
    mtm = _mtm()
    mtm.add_task("t", 3, "xma2", {"warmup_steps": 2, "pe_budget": 0.25})
    method = mtm.methods["t"]
    mtm.set_task("t")
    params = [p for g in mtm.task_parameters("t").values() for p in g]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    mtm.eval()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mtm(x), y).backward()
        opt.step()
    assert method._selected
    assert sum(int(st.pe_mask.sum()) for _, st in method._layers) > 0
    # evaluation (no grad) and frozen scores count nothing
    mtm2 = _mtm()
    mtm2.add_task("t", 3, "xma2", {"warmup_steps": 1, "pe_budget": 0.25})
    mtm2.set_task("t")
    mtm2.train()
    with torch.no_grad():
        for _ in range(3):
            mtm2(torch.randn(2, 1, 28, 28))
    for p in mtm2.task_parameters("t")["state"]:
        p.requires_grad_(False)
    for _ in range(3):
        mtm2(torch.randn(2, 1, 28, 28))  # frozen scores: not a training step
    assert not mtm2.methods["t"]._selected
    assert all(st._steps == 0 for _, st in mtm2.methods["t"]._layers)


def test_xma2_energy_budget_needs_a_pe_budget() -> None:
    with pytest.raises(ConfigError, match="energy_budget_j=1e-09 with pe_budget 0"):
        XMA2Config(pe_budget=0.0, energy_budget_j=1e-9)


@pytest.mark.parametrize("levels,msg", [
    ([0, 2.0 ** -200, 1], "2^-200"), ([1, 2.0 ** 17], "2^17"),
])
def test_xma_levels_lie_within_a_shifters_reach(levels, msg) -> None:
    """2^-200 is 0 in float32 and 2^200 inf: a configured level that is not the one applied
    (the model's output was non-finite and the level histogram counted a column twice)."""
    with pytest.raises(ConfigError, match=re.escape(msg)):
        XMAConfig(levels=levels)
    XMAConfig(levels=[0, 2.0 ** -16, 1, 2.0 ** 16])  # the bounds themselves are allowed


@pytest.mark.parametrize("score,ok", [(0.0, True), (0.49, True), (-0.49, True), (-0.6, False),
                                      (-50.0, False), (3.0, True)])
def test_xma_score_init_must_start_at_level_1(score, ok) -> None:
    """score_init=-50 put every column at level 0 (every output the same): the task must start
    as the backbone, as its levels must contain 1."""
    if ok:
        XMAConfig(score_init=score)
    else:
        with pytest.raises(ConfigError, match="not 1, so the task would not start"):
            XMAConfig(score_init=score)


def test_a_nan_xma_score_switches_its_column_off() -> None:
    """bucketize put a NaN score in the top bucket: a diverged column stayed on at full scale,
    where XBM leaves a NaN column off."""
    m = XMA(XMAConfig())
    e = torch.tensor(m.config.exponents)
    scores = torch.tensor([[0.0, float("nan"), -5.0]])
    got = ShiftQuantizeSTE.apply(scores, e, m.config.zero_below)
    assert got.tolist() == [[1.0, 0.0, 0.0]]
    # without a 0 level: the lowest one
    m2 = XMA(XMAConfig(levels=[0.5, 1, 2]))
    got = ShiftQuantizeSTE.apply(scores, torch.tensor(m2.config.exponents), m2.config.zero_below)
    assert got.tolist() == [[1.0, 0.5, 0.5]]


def test_xma_trains_under_torch_compile_from_its_first_forward() -> None:
    """The level tables were built inside the column mask's autograd node on a first forward,
    which Dynamo refuses ("intermediate tensor ... created inside a higher-order op")."""
    pytest.importorskip("torch._dynamo")
    mtm = _mtm()
    mtm.add_task("t", 3, "xma")
    mtm.set_task("t")
    mtm.train()
    for p in mtm.task_parameters("t")["state"]:
        p.requires_grad_(True)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(mtm, backend="aot_eager")
    compiled(x).sum().backward()
    score = next(p for p in mtm.task_parameters("t")["state"])
    assert score.grad is not None and torch.isfinite(score.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_backbone_is_refused(dtype) -> None:
    """Task state takes the backbone's dtype: in float16 Adam's eps and small squared gradients
    underflow (XBM, XMA and Piggyback trained to NaN), in bfloat16 XBM's 5e-3 threshold and
    a 5.001e-3 init round alike (every column started off)."""
    import xbm

    model = create_model("small_cnn", num_classes=4, in_channels=1).to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(XbmError, match=f"the model holds {name} tensors; convert a float32"):
        xbm.apply(model, "default")
    with pytest.raises(XbmError, match="model.float()"):
        MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1).to(dtype),
                       CrossbarSpec())


def test_small_fixes_of_session_27_review():
    """A score_init accepted in float64 started every column at level 2 in the float32
    scores; XMA2's weight_lr had no upper bound (1e38 overflowed inside Adam); XMA2 counted
    the scores of the selected PEs' columns as trainable, which run at scale 1 and learn
    nothing (mask_bits already left them out)."""
    with pytest.raises(ConfigError, match="starts every column at level 2, not 1"):
        XMAConfig(levels=[0.5, 1, 2], score_init=0.4999999999)
    XMAConfig(levels=[0.5, 1, 2], score_init=0.49)  # clear of the tie: level 1
    with pytest.raises(ConfigError, match=r"weight_lr must be in \(0, 1e3\]"):
        XMA2Config(weight_lr=1e38)
    mtm = _mtm(SMALL_SPEC)
    seed_everything(0)
    mtm.add_task("t", 4, "xma2", {"pe_budget": 0.25, "warmup_steps": 1})
    train, _ = _loaders()
    train_task(mtm, "t", train, 1, DEV, progress=False)  # selects after the first step
    method = mtm.methods["t"]
    chosen = 0
    for _, layer, st in mtm.layer_states("t"):
        sel = method._selection(layer, st)
        cols = 0 if sel is None else int(sel[0].sum())
        weights = 0 if sel is None else int(sel[1].sum())
        chosen += cols
        assert method.trainable_count(layer, st) == st.score.numel() - cols + weights
    assert chosen > 0  # some PEs were selected, so the dead scores were there to leave out
