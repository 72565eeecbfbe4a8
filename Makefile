# The two commands of the README: `make demo` and `make test`. Both create .venv/ first.
.PHONY: setup demo test lint bench flower

setup: .venv/.stack-ready

.venv/.stack-ready: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	.venv/bin/omni-tasks demo

lint: setup
	.venv/bin/ruff check omni_tasks workers tests bench scripts
	.venv/bin/ruff format --check omni_tasks workers tests bench scripts

test: lint
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/run_all.py

# Local development only: no auth, so it listens on loopback alone. Anywhere else, add
# --basic-auth=user:pass (compose does, and refuses to start without a password).
flower: setup
	.venv/bin/celery -A omni_tasks flower --address=127.0.0.1 --port=5555
