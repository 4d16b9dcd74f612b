# The two entry points of the README. Each creates/updates .venv/ first (infra/scripts/setup.sh).
.PHONY: setup demo test bench

setup:
	bash infra/scripts/setup.sh

demo: setup
	.venv/bin/sd2 demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: setup
	.venv/bin/python -m pytest -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

bench: setup
	.venv/bin/python bench/specdec.py
