#!/usr/bin/env python3
"""Reference outputs of torch.nn.functional.interpolate for sgp-kernels' resize tests.

Writes crates/sgp-kernels/tests/data/resize_refs.safetensors with, for case number K,
`K.<mode>.in` and `K.<mode>.out` (float32, NCHW). The output size is the `out` tensor's
shape. Modes: bicubic, bilinear, bilinear_ac (align_corners=True), bilinear_aa
(antialias=True), nearest, nearest_x2 (scale_factor=2.0, as the FPN neck calls it).

Run with the project's venv:  python tools/kernels/gen_resize_refs.py
"""
import argparse
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

CASES = [
    # (mode, input shape, output (h, w))
    ("bicubic", (1, 3, 7, 7), (32, 32)),  # Hiera pos_embed upsampling
    ("bicubic", (1, 2, 14, 14), (8, 8)),  # downsampling, no antialias
    ("bicubic", (2, 3, 5, 9), (7, 4)),  # non-integer factors, mixed up/down
    ("bicubic", (1, 2, 13, 11), (29, 17)),  # odd sizes
    ("bicubic", (1, 1, 6, 6), (1, 1)),
    ("bicubic", (1, 1, 1, 1), (3, 5)),
    ("bicubic", (1, 2, 9, 9), (9, 9)),  # same size
    ("bilinear", (2, 3, 8, 8), (32, 32)),
    ("bilinear", (1, 1, 32, 32), (128, 128)),  # generic CPU kernel (h+w > 128)
    ("bilinear", (1, 2, 16, 16), (5, 7)),
    ("bilinear", (1, 1, 7, 9), (1, 1)),
    ("bilinear", (1, 1, 1, 5), (4, 3)),
    ("bilinear", (1, 2, 11, 6), (11, 13)),  # one axis unchanged
    ("bilinear_ac", (2, 3, 8, 8), (32, 32)),
    ("bilinear_ac", (1, 1, 32, 32), (50, 77)),
    ("bilinear_ac", (1, 2, 16, 16), (5, 7)),
    ("bilinear_ac", (1, 1, 7, 9), (1, 1)),
    ("bilinear_ac", (1, 1, 1, 5), (4, 3)),
    ("bilinear_aa", (1, 1, 128, 128), (32, 32)),  # mask prompt S -> S/4
    ("bilinear_aa", (2, 2, 17, 23), (5, 7)),
    ("bilinear_aa", (1, 1, 10, 10), (1, 1)),
    ("bilinear_aa", (1, 1, 7, 7), (15, 12)),  # upsampling = plain bilinear
    ("bilinear_aa", (1, 1, 9, 20), (14, 6)),  # up in h, down in w
    ("bilinear_aa", (1, 1, 64, 48), (64, 20)),  # one axis unchanged
    ("bilinear_aa", (1, 1, 100, 75), (32, 32)),  # non-integer factors
    ("nearest", (1, 2, 5, 7), (8, 3)),
    ("nearest", (1, 1, 3, 3), (7, 7)),
    ("nearest", (1, 1, 9, 9), (4, 4)),
    ("nearest", (1, 1, 13, 10), (31, 21)),
    ("nearest_x2", (2, 3, 8, 8), (16, 16)),
    ("nearest_x2", (1, 2, 7, 5), (14, 10)),
]


def run(mode, x, size):
    if mode == "bicubic":
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if mode == "bilinear_ac":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    if mode == "bilinear_aa":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    if mode == "nearest_x2":
        out = F.interpolate(x, scale_factor=2.0, mode="nearest")
        assert tuple(out.shape[-2:]) == tuple(size)
        return out
    raise ValueError(mode)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "..", "crates", "sgp-kernels", "tests", "data", "resize_refs.safetensors")
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.normpath(default_out))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    tensors = {}
    for k, (mode, shape, size) in enumerate(CASES):
        x = torch.randn(*shape, generator=g, dtype=torch.float32)
        y = run(mode, x, size)
        tensors[f"{k:03d}.{mode}.in"] = x.contiguous()
        tensors[f"{k:03d}.{mode}.out"] = y.contiguous()
    tmp = args.out + ".tmp"
    save_file(tensors, tmp, metadata={"generator": "tools/kernels/gen_resize_refs.py", "torch": torch.__version__})
    os.replace(tmp, args.out)
    print(f"wrote {len(CASES)} cases to {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
