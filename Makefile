# Two entry points: `make demo` (the main job on the bundled fixture) and `make test` (the whole suite);
# `make test-fast` leaves out the tests marked slow (soak, interrupts, memory bounds; see tests/conftest.py).
# Each creates .venv with the Python it finds and installs what it needs (torch from the CPU build, for
# the HF transformers cross-checks); nothing else is required.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?= demo-out

.PHONY: demo test test-fast test-ui lint clean bench-quant bench-convert bench-decode bench-beyond-ram

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,reference]'
	touch $@

demo: $(BIN)/.installed
	# the random-weight fixture as HF + GGUF: both convert to the same layout
	$(BIN)/python -m fixtures.tiny_mixtral $(OUT)/fixture
	$(BIN)/mertools convert $(OUT)/fixture/tiny-mixtral-f16.gguf $(OUT)/layout-from-gguf --dtype q4_0 --force
	# the trained fixture (fixtures/trained): convert, inspect, verify, then generate with a 1 MiB
	# expert cache (9 of its 32 experts), so experts really stream from disk
	$(BIN)/mertools convert fixtures/trained/tiny-shakespeare-moe $(OUT)/shakespeare-q4_0 --dtype q4_0 --force
	$(BIN)/mertools inspect $(OUT)/shakespeare-q4_0
	$(BIN)/mertools verify $(OUT)/shakespeare-q4_0 --reference fixtures/trained/tiny-shakespeare-moe
	$(BIN)/mertools run $(OUT)/shakespeare-q4_0 -p "ROMEO:" -n 64 --cache-mb 1

test: $(BIN)/.installed
	$(BIN)/ruff check mertools tests fixtures benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

test-fast: $(BIN)/.installed
	$(BIN)/ruff check mertools tests fixtures benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder -m "not slow"

# the web page's browser test (tests/test_ui.py): headless Chromium and its driver from the system's packages
# (Debian/Ubuntu; sudo when not root), Selenium in the venv; `make test` runs it too wherever Chromium is found
test-ui: $(BIN)/.installed
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }
	$(BIN)/python -m pip install -q 'selenium>=4.10'
	$(BIN)/python -m pytest -q tests/test_ui.py -rs

bench-quant: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_quant.py

bench-convert: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_convert.py

bench-decode: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_decode.py

bench-beyond-ram: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_beyond_ram.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
