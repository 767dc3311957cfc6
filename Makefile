# One command per job; `run` and `test` create the virtualenv when it is missing, so a newcomer
# needs nothing but `make run` / `make test` on a machine with Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install when pyproject.toml changes, not on every run.
STAMP := $(VENV)/.installed
# Every role (server, discord, slack, playground) and the test tools; a host of one role installs
# only its extra (docs/deployment.md).
EXTRAS ?= all,dev
# The build of torch: CPU unless this machine has an NVIDIA GPU (deploy/torch-index.sh says why and
# how; TORCH_INDEX=URL picks another). Evaluated only when an install runs.
TORCH_PIP_ARGS ?= $(shell PYTHON=$(PYTHON) TORCH_INDEX=$(TORCH_INDEX) sh deploy/torch-index.sh)

.PHONY: setup run test bench lint typecheck format migrate train-model eval-model serve bot docs docs-build clean \
	install-check images deploy-test gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m bot.launcher

serve: setup
	$(PY) -m inference_server

bot: setup
	$(PY) -m bot

migrate: setup
	$(PY) -m bot.migrate

# Two worker processes by default (pytest-xdist; a test file stays on one worker, since its fixtures
# are shared): most tests wait on sockets, subprocesses and sleeps. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The continuous-batching bench is the long one (~15 min on 2 quiet cores: closed-loop saturation,
# open-loop points at 50/70/90% of the request-level engine's saturation, 3 repetitions each, then
# the discrete-event model calibrated on this machine). A smoke run: CONTINUOUS_BENCH_ARGS=--quick.
# The per-family comparison on the tiny pipelines runs short by default (FAMILY_BENCH_ARGS).
CONTINUOUS_BENCH_ARGS ?=
FAMILY_BENCH_ARGS ?= --quick
bench: setup
	$(PY) -m tests.bench.server_bench
	$(PY) -m tests.openai.bench
	$(PY) -m tests.bench.core_bench
	$(PY) -m tests.bench.routing_bench
	$(PY) -m tests.bench.takeover_bench
	$(PY) -m tests.bench.discord_bench
	$(PY) -m tests.bench.lora_bench
	$(PY) -m tests.bench.cache_bench $(CACHE_BENCH_ARGS)
	$(PY) -m tests.bench.continuous_bench $(CONTINUOUS_BENCH_ARGS)
	$(PY) -m tests.bench.family_bench $(FAMILY_BENCH_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# mypy reads [tool.mypy] in pyproject.toml (the embedded model's training scripts are excluded).
typecheck: setup
	$(PY) -m mypy bot inference_server

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The shipped weights came from these two runs: a 9000-step UNet cycle, then a warm restart of the
# learning rate continuing to 18000 steps (about 70 minutes in all on a quiet 2-core CPU).
train-model: setup
	$(PY) -m inference_server.embedded.train --unet-steps 9000 $(ARGS)
	$(PY) -m inference_server.embedded.train --resume --unet-steps 18000 $(ARGS)

eval-model: setup
	$(PY) -m inference_server.embedded.evaluate $(ARGS)
	$(PY) -m tests.bench.cache_quality

# On a machine with an NVIDIA GPU: precisions, attention backends, the OOM split, both engines and
# the benchmark at real sizes (docs/performance.md). Elsewhere it says so and exits with status 2.
gpu-check: setup
	$(PY) deploy/gpu_check.py $(GPU_CHECK_ARGS)

# The documentation site (mkdocs.yml, docs/). The docs extra goes into the same virtualenv, once.
# Never add -q to the build: ProperDocs then drops the warnings and a strict build passes anyway.
DOCS_STAMP := $(VENV)/.docs-installed
DOCS_ADDR ?= 127.0.0.1:8000
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/properdocs serve -f mkdocs.yml -a $(DOCS_ADDR)

docs-build: $(DOCS_STAMP)
	$(VENV)/bin/properdocs build --strict -f mkdocs.yml -d site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info site build

# -- Packaging and deployment (docs/deployment.md) ------------------------------------------------------
# The images of deploy/Containerfile (server, bot) and a PostgreSQL image, with podman; prints the
# image names for deploy/.env.
images:
	PYTHON=$(PYTHON) sh deploy/build-images.sh

# Opt-in, not part of `make test` (about 10 minutes the first time, mostly building the server
# image): deploy/compose.yaml on this machine with podman-compose, a server and a bot killed
# mid-run, every job delivered once. Needs podman (and, where no registry answers, debootstrap).
DEPLOY_TEST_ARGS ?=
deploy-test: setup
	$(PY) -m tests.deploy.compose_check $(DEPLOY_TEST_ARGS)

# Opt-in: a chat host's install in a fresh virtualenv brings no torch, and the bot imports none of
# the server's libraries (tests/deploy/bot_imports.py). Prints what each install weighs.
INSTALL_CHECK_DIR ?= /tmp/imagine-install-check
install-check:
	rm -rf $(INSTALL_CHECK_DIR) && $(PYTHON) -m venv $(INSTALL_CHECK_DIR)
	$(INSTALL_CHECK_DIR)/bin/python -m pip install -q '.[discord]'
	! $(INSTALL_CHECK_DIR)/bin/python -m pip show torch diffusers transformers 2>/dev/null | grep -q '^Name:'
	cd /tmp && $(INSTALL_CHECK_DIR)/bin/python $(CURDIR)/tests/deploy/bot_imports.py --adapters discord
	@echo "install-check: '.[discord]' has no torch; the venv weighs $$(du -sh $(INSTALL_CHECK_DIR) | cut -f1)"
	$(INSTALL_CHECK_DIR)/bin/python -m pip install -q '.[discord,slack,playground]'
	! $(INSTALL_CHECK_DIR)/bin/python -m pip show torch diffusers transformers 2>/dev/null | grep -q '^Name:'
	cd /tmp && $(INSTALL_CHECK_DIR)/bin/python $(CURDIR)/tests/deploy/bot_imports.py
	@echo "install-check: '.[discord,slack,playground]' has no torch; the venv weighs $$(du -sh $(INSTALL_CHECK_DIR) | cut -f1)"
	rm -rf $(INSTALL_CHECK_DIR) build
