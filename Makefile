# The README's two commands: `make demo` (main job on the bundled sample) and `make test`.
# Both set up a virtual environment on a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# torch is pinned to the build this machine's pip has on disk (see README, Configuration).
TORCH := torch==2.14.1 torchvision==0.29.1
QUERY ?= water

.PHONY: setup browser demo test export clean-nbs tutorials

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Debian's Chromium + ChromeDriver for the real-browser map test (no browser download).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# demo_out/ is this target's own folder: a second `make demo` replaces it (--overwrite)
demo: setup
	$(BIN)/dofaclip demo --query "$(QUERY)" --out demo_out --overwrite

test: setup browser
	$(PY) tools/run_tests.py

export: setup
	$(BIN)/nbdev-export

clean-nbs: setup
	$(BIN)/nbdev-clean

# Re-execute the tutorials and save their outputs (plots, tables, maps) so they read online, record in each one the
# fingerprint of its code and of the dofaclip modules it imports (`make test` fails on a stale tutorial); then commit them.
tutorials: setup
	DOFACLIP_QUIET=1 $(BIN)/nbdev-test nbs/tutorials --save
	$(PY) tools/run_tests.py --stamp-tutorials
	$(BIN)/nbdev-clean
