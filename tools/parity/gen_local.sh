#!/usr/bin/env bash
# Regenerates the full-size parity cases in fixtures-local/ (git-ignored, several GB).
# Run from the repository root with the venv active. Takes a while on 2 cores.
set -euo pipefail
OUT=${1:-fixtures-local}
GEN="python tools/parity/gen_fixtures.py --seed 0 --image-batch 1 --tries 10"
$GEN --out "$OUT/sam2.1_hiera_t/s512" --preset sam2.1_hiera_t --size 512 --few \
     --kinds image_encoder sam_heads memory_encoder memory_attention track
$GEN --out "$OUT/sam2.1_hiera_t/s1024" --preset sam2.1_hiera_t --size 1024 --few \
     --kinds image_encoder sam_heads
$GEN --out "$OUT/sam2.1_hiera_b+/s512" --preset sam2.1_hiera_b+ --size 512 --few \
     --kinds image_encoder sam_heads
$GEN --out "$OUT/sam2.1_hiera_b+/s1024" --preset sam2.1_hiera_b+ --size 1024 --few \
     --kinds image_encoder sam_heads
