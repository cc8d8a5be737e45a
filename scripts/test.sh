#!/usr/bin/env bash
# Set up (once) and run the whole test suite: scripts/test.sh [pytest args]
# scripts/test.sh --gpu-path [pytest args]: the model, golden and end-to-end tests again on the code path GPUs
# (Metal, CUDA) run: compiled sampler steps and the plain MLX ops, no CPU fast paths, on whatever device is here.
# The golden reference data is read from $SA3_REFERENCE_DIR (default ../shared/reference).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
export SA3_REFERENCE_DIR="${SA3_REFERENCE_DIR:-$here/../shared/reference}"
if [ ! -d "$SA3_REFERENCE_DIR/golden" ]; then
  echo "scripts/test.sh: reference data not found at $SA3_REFERENCE_DIR (set SA3_REFERENCE_DIR)" >&2
  exit 2
fi
if [ ! -x .venv/bin/pytest ] || [ "pyproject.toml" -nt .venv/.sa3-install-stamp ]; then
  ./install.sh -y --test -q
fi
if [ "${1:-}" = "--gpu-path" ]; then
  shift
  export SA3_KERNELS=mlx SA3_COMPILE=1
  set -- "$@" tests/test_dit.py tests/test_same.py tests/test_t5gemma.py tests/test_pipeline_golden.py \
    tests/test_guidance_golden.py tests/test_upstream.py tests/test_upstream_cli.py tests/test_lora.py \
    tests/test_kernels.py tests/test_cli.py tests/test_training_golden.py tests/test_quantize.py
fi
exec .venv/bin/python -m pytest "$@"
