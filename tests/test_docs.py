"""The docs' generated tables match the registry (a changed default must regenerate them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
