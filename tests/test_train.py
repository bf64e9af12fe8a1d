"""Training-loop helpers."""

import re


def test_progress_off_a_terminal_writes_timed_plain_lines(capsys, monkeypatch):
    """Where stderr is no terminal (a log, CI) a long loop still says how far it is, in plain
    lines at most every LOG_PROGRESS_SECONDS, and a short loop says nothing."""
    from xbm.train import loop

    monkeypatch.delenv("XBM_PROGRESS", raising=False)
    assert list(loop._progress(range(5), 5, "quick", True)) == list(range(5))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(loop, "LOG_PROGRESS_SECONDS", 0.0)
    assert list(loop._progress(range(4), 4, "pretrain ep 1/3", True)) == list(range(4))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("pretrain ep 1/3: 1/4 (25%), ") and lines[0].endswith("s left")
    assert len(lines) == 3  # not after the last item: the loop's own summary follows
    assert loop._progress(range(3), 3, "off", False) == range(3)
    # with epochs still to come, the time left in all too (the epoch's alone misled)
    assert list(loop._progress(range(4), 4, "pretrain ep 1/3", True, later_epochs=2)) == \
        list(range(4))
    line = capsys.readouterr().err.splitlines()[0]
    left, every = (float(v) for v in re.findall(r"~(\d+)s", line))
    assert re.search(r"~\d+s left in this epoch, ~\d+s in all$", line) and every >= left


def test_labels_beyond_the_tasks_classes_are_an_xbm_error():
    """A 3-class task trained on 4-class labels raised torch's IndexError ("Target 3 is out of
    bounds"), and evaluation scored the extra class as silently wrong."""
    import pytest
    import torch

    from xbm.data import make_fixture_task
    from xbm.errors import XbmError
    from xbm.hardware import CrossbarSpec
    from xbm.models import create_model
    from xbm.multitask import MultiTaskModel
    from xbm.train import evaluate_task, train_task

    data = make_fixture_task("f", num_classes=4, n_train=16, n_test=8, seed=0)
    mtm = MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1),
                         CrossbarSpec(rows=16, cols=16))
    mtm.add_task("t", 3, "xbm")
    train, test = data.loaders(8, seed=0)
    with pytest.raises(XbmError, match=r"labels run from 0 to 3, but task 't' has 3 classes"):
        train_task(mtm, "t", train, 1, torch.device("cpu"), progress=False)
    with pytest.raises(XbmError, match="task 't' has 3 classes"):
        evaluate_task(mtm, "t", test)
    acc = evaluate_task(mtm, "base", test)  # the backbone's own head has 4: scored
    mtm.eval()
    with torch.no_grad(), mtm.use_task("base"):
        hits = sum(int((mtm(x).argmax(1) == y).sum()) for x, y in test)
    assert acc == pytest.approx(100.0 * hits / data.test_y.numel())


def test_plain_progress_lines_run_on_across_a_runs_epochs(capsys, monkeypatch):
    """Each epoch is its own loop: with the 30 s restarting every epoch, a run of 22-second
    epochs wrote no line at all. One clock per run carries the 30 s across its epochs."""
    import types

    from xbm.train import loop

    monkeypatch.delenv("XBM_PROGRESS", raising=False)
    now = [0.0]

    def tick() -> float:  # 4 s a read: an epoch of 5 steps takes 24 s, under the 30
        now[0] += 4.0
        return now[0]

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=tick))
    for _ in range(2):  # a clock per epoch (the old behaviour): silence
        list(loop._progress(range(5), 5, "alone", True))
    assert capsys.readouterr().err == ""
    clock = loop.ProgressClock()
    for epoch in range(2):
        list(loop._progress(range(5), 5, f"run ep {epoch + 1}/2", True, clock=clock))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run ep 2/2: 2/5 (40%), "), lines


def test_progress_with_max_steps_counts_the_steps_that_run(capsys, monkeypatch):
    """max_steps=3 of 8 batches an epoch, 3 epochs, showed "ep 1/3: 2/8 (25%)" and stopped
    there; the lines now give the epochs and steps that actually run."""
    import torch

    from xbm.data import make_fixture_task
    from xbm.hardware import CrossbarSpec
    from xbm.models import create_model
    from xbm.multitask import MultiTaskModel
    from xbm.train import loop, train_task

    monkeypatch.delenv("XBM_PROGRESS", raising=False)
    monkeypatch.setattr(loop, "LOG_PROGRESS_SECONDS", 0.0)
    data = make_fixture_task("f", num_classes=4, n_train=64, n_test=8, seed=0)
    train, _ = data.loaders(8, seed=0)  # 8 batches an epoch
    for max_steps, want in ((3, ["ep 1/1: 1/3 ", "ep 1/1: 2/3 "]),
                            (11, [f"ep 1/2: {i}/8 " for i in range(1, 8)]
                             + ["ep 2/2: 1/3 ", "ep 2/2: 2/3 "])):
        mtm = MultiTaskModel(create_model("small_cnn", num_classes=4, in_channels=1),
                             CrossbarSpec(rows=16, cols=16))
        mtm.add_task("t", 4, "xbm")
        res = train_task(mtm, "t", train, 3, torch.device("cpu"), max_steps=max_steps)
        lines = capsys.readouterr().err.splitlines()
        assert res.steps == max_steps
        assert [ln.split("] ", 1)[1].split("(")[0] for ln in lines] == want, lines


def test_cache_names_take_a_folder_path_that_is_not_utf8():
    """A folder path with a byte that is not UTF-8 (os.fsdecode gives a surrogate) crashed
    the cache naming with UnicodeEncodeError; --out and adapt worked."""
    from xbm.train.pretrain import _file_safe

    name = "folder:/data/f_\udcffdir"
    safe = _file_safe(name)
    assert safe.startswith("folder_data_f_") and "/" not in safe and safe != _file_safe("folder:/x")
    assert _file_safe(name) == safe  # stable
