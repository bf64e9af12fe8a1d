"""Training-loop helpers."""


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
