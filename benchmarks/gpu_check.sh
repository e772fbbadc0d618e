#!/usr/bin/env bash
# The speed check of a GPU machine (benchmarks/gpu_check.py): training images/s of ft and vr_lwf
# with each speed switch, peak memory, evaluation and data-loader images/s, a 50-step `kedro run`
# and the extrapolated time of MTIL order I. No download: random ViT-B-16 weights, synthetic images.
#
#   bash benchmarks/gpu_check.sh                          # full, one GPU, under 8 minutes
#   bash benchmarks/gpu_check.sh --scale small            # the same code on CPU in seconds
#   GPU_CHECK_SCALE=small bash benchmarks/gpu_check.sh    # the same
#   bash benchmarks/gpu_check.sh --out gpu_check.json --mtil-test-images 90000
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python "$here/gpu_check.py" "$@"
