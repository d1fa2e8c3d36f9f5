# The two commands: `make demo` (set up + fine-tune end to end) and `make test` (set up + whole suite).
.PHONY: setup vllm demo test test-floors lint bench bench-gpu docs clean

setup:
	./scripts/setup.sh

vllm:
	./scripts/setup-vllm.sh

demo:
	./scripts/demo.sh

test:
	./scripts/test.sh

# The lowest Airflow and provider versions pyproject.toml allows, in a fresh venv (not part of `make test`)
test-floors:
	./scripts/test-floors.sh

lint:
	./scripts/lint.sh

bench: setup
	for f in scripts/bench_*.py; do [ $$f = scripts/bench_gpu.py ] && continue; echo "== $$f"; .venv/bin/python $$f || exit 1; done

# On a machine with a GPU (its Python needs torch, transformers, peft, accelerate; trl/bitsandbytes optional)
bench-gpu:
	python scripts/bench_gpu.py --json bench_gpu.json

docs: setup
	.venv/bin/python -m finetune_engine.config.generate

clean:
	rm -rf .work .venv .venv-vllm .venv-lint
