# The two commands: `make demo` (set up + fine-tune end to end) and `make test` (set up + whole suite).
.PHONY: setup vllm demo test lint bench docs clean

setup:
	./scripts/setup.sh

vllm:
	./scripts/setup-vllm.sh

demo:
	./scripts/demo.sh

test:
	./scripts/test.sh

lint:
	./scripts/lint.sh

bench: setup
	for f in scripts/bench_*.py; do echo "== $$f"; .venv/bin/python $$f || exit 1; done

docs: setup
	.venv/bin/python -m finetune_engine.config.generate

clean:
	rm -rf .work .venv .venv-vllm .venv-lint
