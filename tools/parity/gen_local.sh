#!/usr/bin/env bash
# Regenerates the full-size parity cases in fixtures-local/ (git-ignored, several GB).
# Run from the repository root with the venv active. Takes a while on 2 cores.
#   usage: gen_local.sh [OUT] [all|sam2|sgp]     (default: fixtures-local all)
set -euo pipefail
OUT=${1:-fixtures-local}
WHAT=${2:-all}
GEN="python tools/parity/gen_fixtures.py --seed 0 --image-batch 1 --tries 10"
case "$WHAT" in all|sam2|sgp) ;; *) echo "unknown set $WHAT (all, sam2 or sgp)" >&2; exit 2 ;; esac
if [ "$WHAT" != sgp ]; then
  $GEN --out "$OUT/sam2.1_hiera_t/s512" --preset sam2.1_hiera_t --size 512 --few \
       --kinds image_encoder sam_heads memory_encoder memory_attention track
  $GEN --out "$OUT/sam2.1_hiera_t/s1024" --preset sam2.1_hiera_t --size 1024 --few \
       --kinds image_encoder sam_heads
  $GEN --out "$OUT/sam2.1_hiera_b+/s512" --preset sam2.1_hiera_b+ --size 512 --few \
       --kinds image_encoder sam_heads
  $GEN --out "$OUT/sam2.1_hiera_b+/s1024" --preset sam2.1_hiera_b+ --size 1024 --few \
       --kinds image_encoder sam_heads
fi
if [ "$WHAT" != sam2 ]; then
  # SGP kinds on full-size hiera_t at S=512: the hiera_t weights above (same preset, seed and
  # calibration) with the object-score head rescaled once more (--support-score-calib) so
  # that support-conditioned queries get both signs. Pseudo-mask K=3 Q=2, SGP init, and 3D
  # tracking K=2 T=8 (the 6-frame memory window overflows at slice 7).
  $GEN --out "$OUT/sgp/sam2.1_hiera_t/s512" --preset sam2.1_hiera_t --size 512 --support-score-calib \
       --supports 3 --queries 2 --track-supports 2 --support-track-frames 8 \
       --kinds support_pseudo_mask sgp_init support_track
fi
