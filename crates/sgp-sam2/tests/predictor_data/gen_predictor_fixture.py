"""Reference outputs of the official `SAM2ImagePredictor` for `Sam2Model::encode_image` /
`Sam2Model::predict` (tests/predictor.rs).

Usage (from the repo root, official `sam2` package installed):
    python crates/sgp-sam2/tests/predictor_data/gen_predictor_fixture.py \
        fixtures/parity/sam2.1_reduced/s64/sam_heads_box_point_single

It copies that case's reduced model (config.json, weights.safetensors) here and writes
io.safetensors: a non-square uint8 image seen as [3,H,W] floats in [0,1], two prompt sets,
and the predictor's outputs (logits at the original size, IoUs, clamped low-res logits).
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from sam2.sam2_image_predictor import SAM2ImagePredictor

torch.set_num_threads(1)
src = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
cfg = json.load(open(os.path.join(src, "config.json")))
model = instantiate(OmegaConf.create(cfg), _recursive_=True).eval()
model.load_state_dict(load_file(os.path.join(src, "weights.safetensors")), strict=True)
shutil.copy(os.path.join(src, "config.json"), os.path.join(here, "config.json"))
shutil.copy(os.path.join(src, "weights.safetensors"), os.path.join(here, "weights.safetensors"))

S = model.image_size
pred = SAM2ImagePredictor(model)
# The official predictor hard-codes the 1024-px feature sizes.
pred._bb_feat_sizes = [(S // 4, S // 4), (S // 8, S // 8), (S // 16, S // 16)]

rng = np.random.default_rng(0)
H, W = 90, 120  # non-square and larger than S: exercises the antialiased resize
img = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
pred.set_image(img)

box = np.array([20.5, 10.0, 100.0, 70.25], dtype=np.float32)
pts = np.array([[60.0, 40.0], [15.0, 80.0]], dtype=np.float32)
lbl = np.array([1, 0], dtype=np.int32)
m1, iou1, low1 = pred.predict(point_coords=pts, point_labels=lbl, box=box,
                              multimask_output=True, return_logits=True)
best = int(np.argmax(iou1))
m2, iou2, low2 = pred.predict(point_coords=pts[:1], point_labels=lbl[:1],
                              mask_input=low1[best:best + 1], multimask_output=False,
                              return_logits=True)
t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()
io = {
    "in.image": t(img).permute(2, 0, 1).contiguous() / 255.0,
    "in.box": t(box),
    "in.point_coords": t(pts),
    "in.point_labels": t(lbl),
    "in.best": torch.tensor([float(best)]),
    "out.first.mask_logits": t(m1), "out.first.iou_scores": t(iou1), "out.first.low_res_logits": t(low1),
    "out.second.mask_logits": t(m2), "out.second.iou_scores": t(iou2), "out.second.low_res_logits": t(low2),
}
save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(here, "io.safetensors"))
print({k: tuple(v.shape) for k, v in io.items()}, "ious", iou1, iou2)
