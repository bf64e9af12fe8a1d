"""The docs' generated tables match the registry (a changed default must regenerate them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_method_docs",
                                                  ROOT / "scripts/gen_method_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_method_config_tables_are_current():
    assert _generator().main(["--check"]) == 0, "run: python scripts/gen_method_docs.py"


def test_check_fails_on_a_stale_file(tmp_path):
    gen = _generator()
    stale = tmp_path / "methods.md"
    stale.write_text(f"# Methods\n\n{gen.MARKER}\n\n| old table |\n")
    assert gen.main(["--check", "--path", str(stale)]) == 1
    assert gen.main(["--path", str(stale)]) == 0
    assert gen.main(["--check", "--path", str(stale)]) == 0
    assert "`xbm` (`XBMConfig`)" in stale.read_text()


def test_missing_marker_is_an_error(tmp_path):
    f = tmp_path / "methods.md"
    f.write_text("# no marker\n")
    assert _generator().main(["--check", "--path", str(f)]) == 2


def test_the_own_method_example_runs_and_round_trips_a_bundle(tmp_path):
    """docs/methods.md's "Your own method" example, as written, in this process; then its
    bundle loads in a fresh model, and a process without the method says which is missing."""
    import re
    import subprocess
    import sys

    import torch

    from xbm.methods import METHODS
    from xbm.multitask import MultiTaskModel

    text = (ROOT / "docs/methods.md").read_text()
    section = text.split("## Your own method", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    try:
        exec(compile(code, "methods.md", "exec"), ns)  # noqa: S102 - our own docs
        model = ns["model"]
        assert model.reprogrammed_cells("mine") == 0
        layers = list(model.layer_states("mine"))
        assert model.mask_bits("mine") == 8 * sum(la.row_tiles * la.matrix_cols
                                                  for _, la, _ in layers)
        assert any(not torch.equal(st.scale, torch.ones_like(st.scale)) for _, _, st in layers)
        exec(compile(code.split("\nbackbone =")[0], "methods.md", "exec"), {})  # re-run: fine
        path = tmp_path / "mine.safetensors"
        model.save_bundle(path)
        fresh = MultiTaskModel(_same_backbone(ns), "default")
        assert fresh.load_bundle(path) == ["mine"]
        x = torch.randn(2, 1, 28, 28)
        model.eval(), fresh.eval()
        with torch.no_grad(), model.use_task("mine"), fresh.use_task("mine"):
            assert torch.equal(model(x), fresh(x))
        out = subprocess.run(
            [sys.executable, "-c", "import sys, xbm; from xbm.multitask import read_bundle_meta\n"
             "try:\n read_bundle_meta(sys.argv[1])\nexcept xbm.XbmError as e:\n print(e)",
             str(path)], capture_output=True, text=True, check=True)
        assert "learned by method 'colscale', which is not registered in this process; " \
               "pass --plugin MODULE to xbm (or import, from Python) the module that " \
               "registers it" in out.stdout, out
    finally:
        METHODS.pop("colscale", None)


def _same_backbone(ns):
    """The example's backbone weights in a fresh (unconverted) model."""
    import xbm
    from xbm.multitask import backbone_state

    fresh = xbm.create_model("small_cnn", num_classes=4, in_channels=1)
    fresh.load_state_dict(backbone_state(ns["model"].model), strict=False)
    return fresh


def _cli_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts/gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_current_and_names_every_flag():
    """docs/cli.md is the parser's own account: every sub-command and every flag, so a flag
    added without docs fails here (run: python scripts/gen_cli_docs.py)."""
    import argparse

    from xbm.cli import build_parser

    gen = _cli_generator()
    assert gen.main(["--check"]) == 0, "run: python scripts/gen_cli_docs.py"
    text = (ROOT / "docs/cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        section = text.split(f"## `xbm {name}`\n")[1].split("\n## ")[0]
        for a in sp._actions:
            for flag in a.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in section, (name, flag)


def test_cli_reference_check_fails_on_a_stale_file(tmp_path):
    gen = _cli_generator()
    stale = tmp_path / "cli.md"
    stale.write_text(f"# mine\n\n{gen.MARKER}\n\n| old |\n")
    assert gen.main(["--check", "--path", str(stale)]) == 1
    assert gen.main(["--path", str(stale)]) == 0
    assert stale.read_text().startswith("# mine\n")  # the hand-written head is kept
    assert gen.main(["--check", "--path", str(stale)]) == 0


def test_cli_reference_ignores_what_this_process_registered(monkeypatch):
    """A method registered in this process (a test's, a notebook's) must not enter the
    reference, which renders in a fresh interpreter."""
    from xbm.methods.base import METHODS
    from xbm.methods.xbm import XBM

    monkeypatch.setitem(METHODS, "mine-only-here", XBM)
    assert _cli_generator().main(["--check"]) == 0


def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch):
    """The README's "From Python" block, run with tiny sizes: it named loaders and an input
    that it never defined, so no user could run it as copied."""
    import re

    import torch

    from xbm.data import load_dataset
    from xbm.errors import DatasetNotFoundError
    from xbm.models import create_model
    from xbm.train.pretrain import import_backbone

    try:
        load_dataset("mnist"), load_dataset("animal-mnist")
    except DatasetNotFoundError:
        pytest.skip("offline datasets not installed (bash scripts/setup.sh)")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for big, small in (("train=6000, test=2000", "train=64, test=32"), ("epochs=2", "epochs=1")):
        assert big in code, big  # the sizes the test shrinks are still the README's
        code = code.replace(big, small)
    monkeypatch.chdir(tmp_path)
    torch.save(create_model("small_cnn", num_classes=10, in_channels=1).state_dict(), "w.pth")
    import_backbone("small_cnn", "w.pth", "bb.safetensors", num_classes=10, in_channels=1)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "tasks.safetensors").is_file()


def test_the_extending_pages_plugin_and_commands_run(tmp_path):
    """docs/extending.md's plugin module, written to a file as the page shows, and each of its
    commands in a process of its own through the installed ``xbm`` script (whose working
    directory is not on sys.path, as a user's is not): a method, dataset, model and both
    presets of one's own reach pretrain, adapt, eval, map and cost through --plugin and
    XBM_PLUGINS."""
    import os
    import re
    import subprocess
    import sys

    script = Path(sys.executable).parent / "xbm"
    if not script.is_file():
        pytest.skip("the xbm console script is not installed beside this Python")
    text = (ROOT / "docs/extending.md").read_text()
    (tmp_path / "my_xbm.py").write_text(re.search(r"```python\n(.*?)```", text, re.S).group(1))
    lines = [ln for ln in re.search(r"```bash\n(.*?)```", text, re.S).group(1).splitlines()
             if ln.strip()]
    env = dict(os.environ, XBM_CACHE=str(tmp_path / "cache"),
               PATH=str(script.parent) + os.pathsep + os.environ.get("PATH", ""))
    for k in ("XBM_PLUGINS", "PYTHONPATH"):
        env.pop(k, None)
    out = ""
    for line in lines:
        res = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, (line, res.stdout[-2000:], res.stderr[-3000:])
        out += res.stdout
    assert "xbm-strict" in out and "XBM at threshold 9e-3 (a plugin)" in out
    assert "crossbar 32x32, 8-bit weights on 2-bit cells" in out  # the preset's geometry
    assert "stripes: xbm-strict accuracy" in out and "re-programmed cells 0" in out
    assert "energy preset 'my-chip-energy'" in out and "32x32 crossbars" in out
    assert "is for crossbars with" not in out  # the energy preset is for the bundle's chip
    assert "(1x28x28, stored 20x20)" in out and "(stored 20x20, fed at 28x28" in out
    assert not list(ROOT.glob("my_xbm*")) and (tmp_path / "stripes.safetensors").is_file()
