# `make run` and `make test` do all set-up themselves (scripts/setup.sh) on a fresh machine.
.PHONY: setup run test lint format bench

setup:
	scripts/setup.sh

run: setup
	.venv/bin/fedmask simulate --transport mqtt --output-dir runs/quickstart

test:
	scripts/setup.sh --services
	.venv/bin/pytest -q

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

bench:
	.venv/bin/python benchmarks/accuracy.py
