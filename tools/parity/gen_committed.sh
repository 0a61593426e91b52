#!/usr/bin/env bash
# Regenerates the committed parity cases in fixtures/parity/ (reduced SAM2.1 and SAM2.0
# models, random weights). Run from the repository root with the venv active.
# Within one family every case holds byte-identical weights (same preset, seed, calib size).
set -euo pipefail
OUT=${1:-fixtures/parity}
GEN="python tools/parity/gen_fixtures.py --seed 0"
rm -rf "$OUT/sam2.1_reduced" "$OUT/sam2_reduced"
# SAM2.1, S=64: everything.
$GEN --out "$OUT/sam2.1_reduced/s64" --preset reduced --size 64 \
     --kinds image_encoder sam_heads memory_encoder memory_attention track
# SAM2.1, S=96 (non-power-of-two grids: 24x24 windows of 8, E=6): a few more.
$GEN --out "$OUT/sam2.1_reduced/s96" --preset reduced --size 96 --few --image-batch 1 \
     --kinds image_encoder sam_heads memory_attention
# SAM2.0 family (no no_obj_embed_spatial, no object-pointer temporal encoding), plus the
# weights_format "pt" case.
$GEN --out "$OUT/sam2_reduced/s64" --preset reduced_sam2.0 --size 64 --few --image-batch 1 \
     --track-frames 3 --kinds image_encoder sam_heads memory_encoder memory_attention track pt
