#!/usr/bin/env bash
# Regenerates the committed parity cases in fixtures/parity/ (reduced SAM2.1 and SAM2.0
# models, random weights). Run from the repository root with the venv active.
#   usage: gen_committed.sh [OUT] [all|sam2|sgp]     (default: fixtures/parity all)
# Within one family every case holds byte-identical weights (same preset, seed, calib size);
# the SGP cases reuse the SAM2.1 family's weights file byte for byte (--weights), so `sgp`
# alone regenerates them on the committed weights.
set -euo pipefail
OUT=${1:-fixtures/parity}
WHAT=${2:-all}
GEN="python tools/parity/gen_fixtures.py --seed 0"
case "$WHAT" in all|sam2|sgp) ;; *) echo "unknown set $WHAT (all, sam2 or sgp)" >&2; exit 2 ;; esac
if [ "$WHAT" != sgp ]; then
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
fi
if [ "$WHAT" != sam2 ]; then
  # SGP kinds (support sets, docs/parity-format.md, "SGP kinds") on the SAM2.1
  # family's weights. One thread: the reference then matches a rerun bit for bit.
  W="$OUT/sam2.1_reduced/s64/image_encoder_b2/weights.safetensors"
  [ -f "$W" ] || { echo "$W missing: generate the sam2 set first" >&2; exit 1; }
  rm -rf "$OUT/sgp"
  # S=64: pseudo-mask (K=3, Q=2, one negative object score), SGP init (no-foreground query +
  # boxed query), 3D tracking (K=2, T=17: both the memory and the object-pointer windows overflow).
  $GEN --threads 1 --weights "$W" --out "$OUT/sgp/sam2.1_reduced/s64" --preset reduced --size 64 \
       --supports 3 --queries 2 --track-supports 2 --support-track-frames 17 \
       --kinds support_pseudo_mask sgp_init support_track
  # S=96 (E=6): pseudo-mask with an empty support mask (an object-absent conditioning frame).
  $GEN --threads 1 --weights "$W" --out "$OUT/sgp/sam2.1_reduced/s96" --preset reduced --size 96 \
       --supports 3 --queries 2 --empty-support 1 --kinds support_pseudo_mask
fi
