"""Official-PyTorch side of `cargo xtask bench train`: one SGP training step.

The step is the part of SAM2-SGP that the official SAM2 code can run as it is: support-set
guided pseudo-mask generation (PMG), i.e. our `SgpModel` with the `no_pma` ablation, with
the paper's fine-tuning set. Per step, on one query and K supports:

1. each support's image features under `no_grad` (the default `SupportGrad::Detached`:
   LoRA adapts the query's features; the supports' are constants), then the support as a
   SAM2 conditioning frame at index k prompted with its mask (`track_step`, the
   `use_mask_input_as_output_without_sam` path, with gradients: it runs the mask decoder
   for the object pointer and the memory encoder);
2. the query's features through Hiera with LoRA (rank 16, alpha 16, on the q and v parts
   of every block's fused `qkv`; B starts at zero as in the LoRA paper), then `track_step`
   at frame K (memory attention over the K support memories, prompt-free mask decoder);
3. the loss of `crate::loss::sgp_loss` without KL: soft Dice (+1 smoothing) + pixel BCE on
   the S x S pseudo-mask logits clamped to +-32, + BCE of the object score against presence;
4. backward, global gradient-norm clip to 1.0, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8,
   weight decay 0.01).

Trainable: LoRA, memory attention / encoder and the other memory parameters, prompt
encoder, mask decoder. Frozen: the whole image encoder (trunk and neck). The model is in
eval mode (no dropout: ours has none) with gradients on.

`--write DIR`: builds the official model (`build_sam2`, real-use settings, random weights),
writes `weights.safetensors` and `inputs.safetensors` (query [3,S,S], target [S,S], K
support images [K,3,S,S] and masks [K,S,S]: random normalised images, blob masks) and
exits. `--dir DIR`: loads both (a fresh process, so its peak memory is the training
step's), runs `--warmup` + `--iters` steps and prints one JSON line: median ms per step,
the first step's loss terms (LoRA's B is zero then, so they are the base model's and must
match ours), the trainable parameter count and the peak RSS (`ru_maxrss`).
"""
import argparse
import json
import math
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from random_sam2 import build


class LoraQV(torch.nn.Module):
    """A frozen fused `qkv` linear plus rank-r deltas on its q and v thirds."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        out = base.out_features // 3
        self.a = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.empty(rank, base.in_features)) for _ in range(2)])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(out, rank)) for _ in range(2)])
        for a in self.a:
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x):
        y = self.base(x)
        dq = F.linear(F.linear(x, self.a[0]), self.b[0]) * self.scale
        dv = F.linear(F.linear(x, self.a[1]), self.b[1]) * self.scale
        return y + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)


def attach_lora(model, rank, alpha):
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    for blk in model.image_encoder.trunk.blocks:
        blk.attn.qkv = LoraQV(blk.attn.qkv, rank, alpha)


def blob(g, s):
    """A random ellipse mask [S,S] covering roughly 5-20% of the image."""
    cy, cx = (0.3 + 0.4 * torch.rand(2, generator=g)) * s
    ry, rx = (0.12 + 0.12 * torch.rand(2, generator=g)) * s
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float()


def write(a):
    os.makedirs(a.write, exist_ok=True)
    model = build(a.config, a.size, a.seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(a.write, "weights.safetensors"))
    g = torch.Generator().manual_seed(a.seed + 7)
    s, k = a.size, a.supports
    inputs = {
        "query": torch.randn(3, s, s, generator=g),
        "target": blob(g, s),
        "support_images": torch.randn(k, 3, s, s, generator=g),
        "support_masks": torch.stack([blob(g, s) for _ in range(k)]),
    }
    save_file(inputs, os.path.join(a.write, "inputs.safetensors"))
    print(json.dumps({"mode": "write", "dir": a.write}))


def backbone(model, image):
    _, feats, pos, sizes = model._prepare_backbone_features(model.forward_image(image))
    return feats, pos, sizes


def step_loss(model, inp):
    k = inp["support_images"].shape[0]
    od = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    for i in range(k):
        with torch.no_grad():
            feats, pos, sizes = backbone(model, inp["support_images"][i:i + 1])
        out = model.track_step(
            frame_idx=i, is_init_cond_frame=True, current_vision_feats=feats, current_vision_pos_embeds=pos,
            feat_sizes=sizes, point_inputs=None, mask_inputs=inp["support_masks"][i][None, None],
            output_dict=od, num_frames=k + 1, track_in_reverse=False, run_mem_encoder=True)
        od["cond_frame_outputs"][i] = out
    feats, pos, sizes = backbone(model, inp["query"][None])
    out = model.track_step(
        frame_idx=k, is_init_cond_frame=False, current_vision_feats=feats, current_vision_pos_embeds=pos,
        feat_sizes=sizes, point_inputs=None, mask_inputs=None, output_dict=od, num_frames=k + 1,
        track_in_reverse=False, run_mem_encoder=False)
    x = out["pred_masks_high_res"].clamp(-32, 32).flatten(1)
    y = inp["target"].flatten()[None]
    p = torch.sigmoid(x)
    dice = (1 - (2 * (p * y).sum(-1) + 1) / (p.sum(-1) + y.sum(-1) + 1)).mean()
    bce = F.binary_cross_entropy_with_logits(x, y)
    present = (y.amax(-1) > 0.5).float()
    obj = F.binary_cross_entropy_with_logits(out["object_score_logits"].flatten(), present)
    return dice + bce + obj, {"dice": dice.item(), "bce": bce.item(), "object": obj.item()}


def timed(a):
    model = build(a.config, a.size, a.seed)
    model.load_state_dict(load_file(os.path.join(a.dir, "weights.safetensors")))
    torch.manual_seed(a.seed)
    attach_lora(model, a.rank, a.alpha)
    model.eval()
    inp = load_file(os.path.join(a.dir, "inputs.safetensors"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    times, parts, first = [], [], None
    for i in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, terms = step_loss(model, inp)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t3 = time.perf_counter()
        if first is None:
            first = dict(terms, total=loss.item())
        if i >= a.warmup:
            times.append((t3 - t0) * 1e3)
            parts.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3))
    print(json.dumps({
        "mode": "time", "size": a.size, "supports": inp["support_images"].shape[0], "torch": torch.__version__,
        "threads": a.threads, "ms_per_step": statistics.median(times),
        "forward_ms": statistics.median(p[0] for p in parts), "backward_ms": statistics.median(p[1] for p in parts),
        "update_ms": statistics.median(p[2] for p in parts), "first_loss": first,
        "trainable_params": sum(p.numel() for p in params),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="sam2.1_hiera_t")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--supports", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--write", help="write weights.safetensors and inputs.safetensors here and exit")
    ap.add_argument("--dir", help="run the timed steps on the files of a --write")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.write:
        write(a)
    elif a.dir:
        timed(a)
    else:
        ap.error("pass --write DIR or --dir DIR")


if __name__ == "__main__":
    main()
