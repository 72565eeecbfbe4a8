# The two commands of the README: `make demo` and `make test`. Both create .venv/ first.
.PHONY: setup demo test test-fast lint bench flower

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

# The unit tests: no worker process, no real model (those are marked slow), in about a minute.
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow" --ignore=tests/integration

bench: setup
	.venv/bin/python bench/run_all.py

# Basic auth always: FLOWER_USER (default admin) and FLOWER_PASSWORD, or a generated
# password, printed once. Loopback only: Flower's /metrics answers without auth.
flower: setup
	@user="$${FLOWER_USER:-admin}"; pass="$${FLOWER_PASSWORD:-}"; \
	if [ -z "$$pass" ]; then \
		pass="$$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(16))')"; \
		echo "Flower: http://127.0.0.1:5555  user $$user  password $$pass"; \
	fi; \
	exec .venv/bin/celery -A omni_tasks flower --address=127.0.0.1 --port=5555 \
		--basic-auth="$$user:$$pass"
