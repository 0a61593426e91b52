"""Official-PyTorch side of `cargo xtask bench propagate`.

Builds the official SAM2 model (`build_sam2` with the real-use settings, random weights,
CPU, eval), optionally writes its state dict as safetensors (so the Rust side runs the
very same weights), and runs the `track_step` loop of a volume: slice 0 is a conditioning
frame with a mask prompt, every other slice a tracked frame. Slices are random
[1,3,S,S] tensors made on demand (seeded by index). Like `SAM2VideoPredictor`, each stored
frame output keeps only what later frames use (memory features, position encoding, low-res
masks, object pointer, score).

`--mode time`: prints {"mode": "time", "size", "slices", "ms_per_slice", "first_ms"} where
ms_per_slice averages the tracked slices (image encoder + memory attention + heads +
memory encoder each).
`--mode peak`: runs the loop and prints {"mode": "peak", "size", "slices", "peak_rss_mb"}
(the process's RSS high-water mark, ru_maxrss).

`--supports K` (K > 0): the SGP support-set propagation instead, i.e. the `support_track`
parity kind's computation: K supports are conditioning frames 0..K-1 prompted with their
masks (encoded once, not timed per slice), then every slice is a non-conditioning frame
K+t tracked from the supports and the previous slices' memories (SAM2's own bank).
ms_per_slice then averages all slices; "support_ms" is the K supports' encoding.
"""
import argparse
import json
import os
import resource
import time

import torch

from random_sam2 import build


def frame(size, idx):
    g = torch.Generator().manual_seed(1000 + idx)
    return torch.randn(1, 3, size, size, generator=g)


def compact(out):
    return {k: out[k] for k in ("maskmem_features", "maskmem_pos_enc", "pred_masks", "obj_ptr", "object_score_logits")}


@torch.no_grad()
def run(model, size, slices):
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: size // 2, size // 3: 3 * size // 4] = 1
    od = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    times = []
    for t in range(slices):
        t0 = time.perf_counter()
        _, feats, pos, sizes = model._prepare_backbone_features(model.forward_image(frame(size, t)))
        out = model.track_step(frame_idx=t, is_init_cond_frame=(t == 0), current_vision_feats=feats,
                               current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
                               mask_inputs=mask if t == 0 else None, output_dict=od, num_frames=slices,
                               track_in_reverse=False, run_mem_encoder=True)
        od["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = compact(out)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@torch.no_grad()
def run_supports(model, size, slices, k):
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: size // 2, size // 3: 3 * size // 4] = 1
    od = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    n = k + slices
    t0 = time.perf_counter()
    for i in range(k):
        _, feats, pos, sizes = model._prepare_backbone_features(model.forward_image(frame(size, 500 + i)))
        out = model.track_step(frame_idx=i, is_init_cond_frame=True, current_vision_feats=feats,
                               current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
                               mask_inputs=mask, output_dict=od, num_frames=n, track_in_reverse=False,
                               run_mem_encoder=True)
        od["cond_frame_outputs"][i] = compact(out)
    support_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for t in range(slices):
        t0 = time.perf_counter()
        _, feats, pos, sizes = model._prepare_backbone_features(model.forward_image(frame(size, t)))
        out = model.track_step(frame_idx=k + t, is_init_cond_frame=False, current_vision_feats=feats,
                               current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
                               mask_inputs=None, output_dict=od, num_frames=n, track_in_reverse=False,
                               run_mem_encoder=True)
        od["non_cond_frame_outputs"][k + t] = compact(out)
        times.append((time.perf_counter() - t0) * 1e3)
    return support_ms, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="sam2.1_hiera_t")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["time", "peak"], default="time")
    ap.add_argument("--write-weights", default=None)
    ap.add_argument("--supports", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = build(a.config, a.size, a.seed)
    if a.write_weights:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.write_weights)
        # Exit flushed: timing beside the write-back would slow PyTorch's side.
        with open(a.write_weights, "rb") as f:
            os.fsync(f.fileno())
        return
    if a.supports > 0:
        support_ms, times = run_supports(model, a.size, a.slices, a.supports)
        if a.mode == "time":
            print(json.dumps({"mode": "time", "size": a.size, "slices": a.slices, "supports": a.supports,
                              "torch": torch.__version__, "threads": a.threads,
                              "ms_per_slice": sum(times) / len(times), "support_ms": support_ms}))
            return
    else:
        times = run(model, a.size, a.slices)
    if a.mode == "time":
        tracked = times[1:] or times
        print(json.dumps({"mode": "time", "size": a.size, "slices": a.slices, "torch": torch.__version__,
                          "threads": a.threads, "ms_per_slice": sum(tracked) / len(tracked),
                          "first_ms": times[0]}))
    else:
        print(json.dumps({"mode": "peak", "size": a.size, "slices": a.slices,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))


if __name__ == "__main__":
    main()
