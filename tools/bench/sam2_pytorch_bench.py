"""Official-PyTorch side of `cargo xtask bench sam2`.

Builds the official SAM2 model (`sam2` package, `build_sam2` with the real-use settings,
random weights, CPU, eval), optionally writes its state dict as safetensors (so the Rust
side runs the very same weights), and times the two image-predictor stages:

- encode: `forward_image` + `_prepare_backbone_features` + `no_mem_embed` (what
  `SAM2ImagePredictor.set_image` does after its transforms), on a [1,3,S,S] input;
- decode: `_forward_sam_heads` with a box prompt (two corner points), multimask output,
  masks upsampled to S×S.

`--write-weights` writes, flushes to disk and exits: timing in the process (or the
seconds) of a 150 MB write-back once made the 512-px encode 640 ms instead of 380.

Each stage: `--warmup` untimed runs, then `--iters` timed runs; prints one JSON object
{"threads", "torch", "results": [{"stage", "size", "median_ms", "min_ms", "iters"}]}.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from random_sam2 import build


def inputs(size, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, size, size, generator=g)
    s = float(size)
    coords = torch.tensor([[[0.2 * s, 0.25 * s], [0.7 * s, 0.8 * s]]])
    labels = torch.tensor([[2, 3]], dtype=torch.int32)
    return image, {"point_coords": coords, "point_labels": labels}


def encode(model, image):
    bo = model.forward_image(image)
    _, feats, _, sizes = model._prepare_backbone_features(bo)
    if model.directly_add_no_mem_embed:
        feats[-1] = feats[-1] + model.no_mem_embed
    b = image.shape[0]
    maps = [x.permute(1, 2, 0).reshape(b, x.size(2), *s) for x, s in zip(feats, sizes)]
    return maps[-1], maps[:-1]


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ts), min(ts)


def profile(model, image, pix, hi, points, a):
    """The parts of encode and decode, run one after the other as the model runs them.
    Names match the Rust side's."""
    from sam2.modeling.backbones.utils import window_partition

    size, out = a.size, []

    def add(name, fn):
        med, _ = timed(fn, a.warmup, a.iters)
        out.append({"stage": name, "size": size, "median_ms": med})
        return fn()

    trunk = model.image_encoder.trunk

    def patch():
        x = trunk.patch_embed(image)
        return x + trunk._get_pos_embed(x.shape[1:3])

    x = add("  hiera.patch+pos", patch)
    starts = [0] + [e + 1 for e in trunk.stage_ends[:-1]]
    trunk_outs = []
    for k, (s, e) in enumerate(zip(starts, trunk.stage_ends)):
        def stage(x=x, s=s, e=e):
            for blk in trunk.blocks[s:e + 1]:
                x = blk(x)
            return x
        x_in = x
        x = add(f"  hiera.stage{k + 1}", stage)
        # Inside the blocks (same shapes as the Rust side; values do not matter).
        parts = {"attn": 0.0, "attn.qkv": 0.0, "attn.proj": 0.0, "mlp": 0.0}
        y = x_in
        for blk in trunk.blocks[s:e + 1]:
            b_, h_, w_, _ = y.shape
            normed = torch.randn(b_, h_, w_, blk.dim)
            win = window_partition(normed, blk.window_size)[0] if blk.window_size > 0 else normed
            parts["attn"] += timed(lambda: blk.attn(win), a.warmup, a.iters)[0]
            parts["attn.qkv"] += timed(lambda: blk.attn.qkv(win), a.warmup, a.iters)[0]
            attn_out = blk.attn(win)
            parts["attn.proj"] += timed(lambda: blk.attn.proj(attn_out), a.warmup, a.iters)[0]
            y = blk(y)
            m = torch.randn_like(y)
            parts["mlp"] += timed(lambda: blk.mlp(m), a.warmup, a.iters)[0]
        for name, ms in parts.items():
            out.append({"stage": f"  hiera.stage{k + 1}.{name}", "size": size, "median_ms": ms})
        trunk_outs.append(x.permute(0, 3, 1, 2))
    add("  neck (FPN + pos enc)", lambda: model.image_encoder.neck(trunk_outs))

    pe, dec = model.sam_prompt_encoder, model.sam_mask_decoder
    labels = points["point_labels"]
    sparse, dense = add("  dec.prompt_encoder", lambda: pe((points["point_coords"], labels), None, None))
    toks = [dec.obj_score_token.weight] if dec.pred_obj_scores else []
    toks = torch.cat(toks + [dec.iou_token.weight, dec.mask_tokens.weight], 0)[None]
    tokens = torch.cat([toks, sparse], 1)
    src = pix + dense
    dense_pe = pe.get_dense_pe()
    _, keys = add("  dec.two_way_transformer", lambda: dec.transformer(src, dense_pe, tokens))
    b, c, h, w = src.shape
    src2 = keys.transpose(1, 2).reshape(b, c, h, w)
    dc1, ln1, act1, dc2, act2 = dec.output_upscaling

    def up():
        if hi is None:
            return dec.output_upscaling(src2)
        y = act1(ln1(dc1(src2) + hi[1]))
        return act2(dc2(y) + hi[0])

    add("  dec.upscaling (2x convT 2x2)", up)
    low = torch.randn(1, 3, size // 4, size // 4)
    add("  dec.upsample masks to S",
        lambda: torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="sam2.1_hiera_t")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-weights", help="write the model's state dict (safetensors) here and exit")
    ap.add_argument("--no-time", action="store_true", help="only build (and write weights)")
    ap.add_argument("--profile", action="store_true", help="also time the parts (Hiera stages, neck, decoder)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    model = build(a.config, a.size, a.seed)
    if a.write_weights:
        from safetensors.torch import save_file

        sd = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(sd, a.write_weights)
        with open(a.write_weights, "rb") as f:
            os.fsync(f.fileno())
    if a.no_time or a.write_weights:
        return
    image, points = inputs(a.size, a.seed)
    results = []
    with torch.inference_mode():
        med, mn = timed(lambda: encode(model, image), a.warmup, a.iters)
        results.append({"stage": "encode", "size": a.size, "median_ms": med, "min_ms": mn, "iters": a.iters})
        pix, hi = encode(model, image)
        hi = hi if model.use_high_res_features_in_sam else None
        med, mn = timed(lambda: model._forward_sam_heads(pix, points, None, hi, True), a.warmup, a.iters)
        results.append({"stage": "decode", "size": a.size, "median_ms": med, "min_ms": mn, "iters": a.iters})
        prof = profile(model, image, pix, hi, points, a) if a.profile else []
    json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results,
               "profile": prof}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
