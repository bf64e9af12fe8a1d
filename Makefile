# Convenience targets; each one sets up first, so they work on a fresh clone.
.PHONY: setup demo test lint bench
setup:
	bash scripts/setup.sh --dev
demo:
	bash scripts/setup.sh && .venv/bin/xbm demo
test:
	bash scripts/setup.sh --dev && .venv/bin/python -m pytest
lint:
	.venv/bin/ruff check src tests benchmarks
bench:
	.venv/bin/python benchmarks/bench_methods.py
