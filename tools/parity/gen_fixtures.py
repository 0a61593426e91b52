#!/usr/bin/env python3
"""Generate SAM2 parity fixture cases (format: docs/parity-format.md).

Each case is a folder with case.json, config.json (the yaml `model:` node as JSON, with
`_target_` kept), weights.safetensors (official key names; or weights.pt for
`"weights_format": "pt"`) and io.safetensors (`in.*` / `out.*`, float32).

The model is built from the config the way hydra builds it from the raw yaml (recursive
`_target_` instantiation, no `build_sam2` post-processing), then every parameter and
buffer gets seeded random values scaled so activations stay O(1). All cases written by
one run share one weight set, so their weight files are byte-identical.

Examples (from the repository root, with the venv active):
  python tools/parity/gen_fixtures.py --out fixtures/parity/sam2.1_reduced --preset reduced
  python tools/parity/gen_fixtures.py --out fixtures/parity/sam2_reduced --preset reduced_sam2.0
  python tools/parity/gen_fixtures.py --out fixtures-local/sam2.1_hiera_t_512 \\
      --preset sam2.1_hiera_t --size 512 --kinds image_encoder sam_heads
  python tools/parity/gen_fixtures.py --out fixtures/parity-transformers --kinds transformers
  python tools/parity/gen_fixtures.py --out fixtures/parity/sgp/sam2.1_reduced/s64 --size 64 \\
      --weights fixtures/parity/sam2.1_reduced/s64/image_encoder_b2/weights.safetensors \\
      --kinds support_pseudo_mask sgp_init support_track
"""
import argparse
import copy
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import sam2
from hydra.utils import instantiate

CONFIG_DIR = os.path.join(os.path.dirname(sam2.__file__), "configs")

ALL_KINDS = ["image_encoder", "sam_heads", "memory_encoder", "memory_attention", "track", "pt"]
# The support-set kinds (spec section "SGP kinds"); not in the default --kinds.
SGP_KINDS = ["support_pseudo_mask", "sgp_init", "support_track"]

# Official yamls by preset name.
YAMLS = {
    "sam2.1_hiera_t": "sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_t": "sam2/sam2_hiera_t.yaml",
    "sam2_hiera_s": "sam2/sam2_hiera_s.yaml",
    "sam2_hiera_b+": "sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_l": "sam2/sam2_hiera_l.yaml",
    "reduced": "sam2.1/sam2.1_hiera_t.yaml",
    "reduced_sam2.0": "sam2/sam2_hiera_t.yaml",
}

# Reduced model: small Hiera whose windows (14 at stage 3, 7 at stage 4) need padding at
# S=128, one global block, hidden_dim 64 (8 two-way heads of 4 channels after the
# downsample_rate=2 cross attention), mem_dim 16 (each object pointer splits into 4 tokens,
# as 256/64 does in the official configs), 2 memory-attention layers.
REDUCED = dict(
    embed_dim=8,
    num_heads=1,
    stages=[1, 2, 3, 2],
    global_att_blocks=[4],
    window_spec=[8, 4, 14, 7],
    window_pos_embed_bkg_spatial_size=[7, 7],
    hidden_dim=32,
    mem_dim=8,
    mem_attn_layers=2,
    mem_attn_ffn=128,
)
# The SAM2.0 variant is smaller still (its cases are few): hidden_dim 16 makes the two-way
# transformer's heads 1 channel wide and splits each object pointer into 2 tokens.
REDUCED_BY_PRESET = {
    "reduced": REDUCED,
    "reduced_sam2.0": dict(REDUCED, hidden_dim=16, mem_dim=8, stages=[1, 1, 3, 1], global_att_blocks=[3]),
}


def load_model_config(preset, size):
    """The `model:` node of the preset's yaml as a plain dict, adapted to image size `size`."""
    raw = OmegaConf.load(os.path.join(CONFIG_DIR, YAMLS[preset]))
    cfg = OmegaConf.to_container(raw.model, resolve=True)
    cfg["image_size"] = size
    if preset.startswith("reduced"):
        r = REDUCED_BY_PRESET[preset]
        trunk = cfg["image_encoder"]["trunk"]
        trunk.update(
            embed_dim=r["embed_dim"],
            num_heads=r["num_heads"],
            stages=r["stages"],
            global_att_blocks=r["global_att_blocks"],
            window_spec=r["window_spec"],
            window_pos_embed_bkg_spatial_size=r["window_pos_embed_bkg_spatial_size"],
        )
        dims = [r["embed_dim"] * 2**i for i in range(len(r["stages"]))]
        c, m = r["hidden_dim"], r["mem_dim"]
        neck = cfg["image_encoder"]["neck"]
        neck["d_model"] = c
        neck["backbone_channel_list"] = dims[::-1]
        neck["position_encoding"]["num_pos_feats"] = c
        e = size // 16
        ma = cfg["memory_attention"]
        ma["d_model"] = c
        ma["num_layers"] = r["mem_attn_layers"]
        layer = ma["layer"]
        layer["d_model"] = c
        layer["dim_feedforward"] = r["mem_attn_ffn"]
        for att in ("self_attention", "cross_attention"):
            layer[att]["embedding_dim"] = c
            layer[att]["feat_sizes"] = [e, e]
        layer["cross_attention"]["kv_in_dim"] = m
        me = cfg["memory_encoder"]
        me["out_dim"] = m
        me["in_dim"] = c
        me["position_encoding"]["num_pos_feats"] = m
        me["mask_downsampler"]["embed_dim"] = c
        me["fuser"]["layer"]["dim"] = c
    return cfg


def build_model(cfg):
    """`SAM2Base(**model)` as hydra builds it from the raw yaml: recursive `_target_`."""
    model = instantiate(OmegaConf.create(cfg), _recursive_=True)
    return model.float().eval()


def randomize(model, seed):
    """Gives every parameter and buffer seeded, non-trivial values with O(1) activations.

    Weights ~ N(0, 1/fan_in); norm scales 1 + N(0, 0.1²); biases N(0, 0.1²); learned
    embeddings and tokens ~ N(0, 0.5²) (zero-initialised ones included); CXBlock layer
    scales ~ 0.4 + N(0, 0.1²).
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std + mean

    kinds = {}
    for mod_name, mod in model.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            kinds[f"{mod_name}.{pname}" if mod_name else pname] = mod
    sd = model.state_dict()
    new = {}
    for name, t in sd.items():
        mod = kinds.get(name)
        leaf = name.rsplit(".", 1)[-1]
        shape = tuple(t.shape)
        if not t.is_floating_point():
            new[name] = t
            continue
        if isinstance(mod, (nn.LayerNorm,)) or type(mod).__name__ == "LayerNorm2d":
            new[name] = normal(shape, 0.1, 1.0) if leaf == "weight" else normal(shape, 0.1)
        elif isinstance(mod, nn.Embedding):
            new[name] = normal(shape, 0.5)
        elif isinstance(mod, nn.ConvTranspose2d) and leaf == "weight":
            new[name] = normal(shape, 1.0 / math.sqrt(shape[0]))
        elif isinstance(mod, (nn.Linear, nn.Conv2d)) and leaf == "weight":
            fan_in = int(torch.tensor(shape[1:]).prod())
            new[name] = normal(shape, 1.0 / math.sqrt(fan_in))
        elif leaf == "bias":
            new[name] = normal(shape, 0.1)
        elif leaf == "gamma":
            new[name] = normal(shape, 0.1, 0.4)
        elif leaf == "positional_encoding_gaussian_matrix":
            new[name] = normal(shape, 1.0)
        else:
            # pos_embed, pos_embed_window, no_mem_embed, no_mem_pos_enc, maskmem_tpos_enc,
            # no_obj_ptr, no_obj_embed_spatial, ...
            new[name] = normal(shape, 0.5)
    missing, unexpected = model.load_state_dict(new, strict=True)
    assert not missing and not unexpected
    for name, t in model.state_dict().items():
        if t.is_floating_point() and t.numel() > 1:
            assert t.std() > 0, f"{name} is constant"
    return model


@torch.no_grad()
def calibrate(cfg, state_dict, seed, calib_size, mean=1.0, std=1.0):
    """Two data-driven adjustments so that random weights behave like a trained model
    where it matters for coverage, done at a fixed size so that all sizes share weights:

    1. The memory-attention output norm is rescaled per channel so that memory-conditioned
       features have the statistics of first-frame features (`backbone + no_mem_embed`);
       otherwise the mask decoder sees a different distribution on tracked frames.
    2. The object-score head's last layer is rescaled so that, over random images with
       one click (first-frame and tracked frames pooled), scores have about the given mean
       and spread: random weights otherwise give nearly input-independent scores, and the
       sign decides whole code paths (-1024 masks, no_obj_ptr, no_obj_embed_spatial).
    """
    cal_cfg = copy.deepcopy(cfg)
    cal_cfg["image_size"] = calib_size
    for att in ("self_attention", "cross_attention"):
        layer = cal_cfg["memory_attention"]["layer"][att]
        layer["feat_sizes"] = [calib_size // 16, calib_size // 16]
    model = build_model(cal_cfg)
    model.load_state_dict(state_dict, strict=True)
    out = dict(state_dict)
    g = torch.Generator().manual_seed(seed + 7)
    n = 8
    image = make_image(g, n, calib_size)
    pc, pl = make_points(g, n, 1, calib_size, [1])
    clips = [make_clip(g, 3, calib_size) for _ in range(3)]

    def tracked_scores_and_feats():
        captured = []
        hook = model.memory_attention.register_forward_hook(lambda m, i, o: captured.append(o))
        scores = []
        try:
            for k, clip in enumerate(clips):
                res = ref_track(model, clip, pc[k:k + 1], pl[k:k + 1], None)
                scores.append(res["object_score_logits"][1:].flatten())
        finally:
            hook.remove()
        return torch.cat(scores), torch.cat([c.flatten(0, 1) for c in captured], 0)

    # 1. memory-attention output statistics
    nkey_w, nkey_b = "memory_attention.norm.weight", "memory_attention.norm.bias"
    if nkey_w in out:
        bo = model.forward_image(image)
        x0 = bo["backbone_fpn"][-1] + (model.no_mem_embed.view(1, -1, 1, 1) if model.directly_add_no_mem_embed else 0)
        x0 = x0.permute(0, 2, 3, 1).flatten(0, 2)
        m0, s0 = x0.mean(0), x0.std(0)
        _, feats = tracked_scores_and_feats()
        m1, s1 = feats.mean(0), feats.std(0)
        gamma, beta = out[nkey_w], out[nkey_b]
        out[nkey_w] = gamma * s0 / s1
        out[nkey_b] = m0 + (beta - m1) * s0 / s1
        model.load_state_dict(out, strict=True)

    # 2. object-score head
    head = "sam_mask_decoder.pred_obj_score_head"
    wkey = next((k for k in (f"{head}.layers.2.weight", f"{head}.weight") if k in out), None)
    if wkey is not None:
        bkey = wkey[: -len("weight")] + "bias"
        first = ref_sam_heads(model, image, pc, pl, None, False)["object_score_logits"].flatten()
        tracked, _ = tracked_scores_and_feats()
        scores = torch.cat([first, tracked])
        b = out[bkey]
        k = std / float(scores.std())
        out[wkey] = out[wkey] * k
        out[bkey] = torch.full_like(b, mean) - k * (scores.mean() - b)
        print(f"calibration: first-frame scores {first.mean():+.3f}±{first.std():.3f}, "
              f"tracked {tracked.mean():+.3f}±{tracked.std():.3f} (before rescaling)")
    return out


@torch.no_grad()
def calibrate_support_scores(cfg, state_dict, seed, size, k=3, n=8, mean=0.0, std=1.5):
    """For full-size random models, support-conditioned queries all get about the same,
    positive, object score (a spread of ~0.2 around +2.5), so no query takes the no-object
    path. This rescales the object-score head's last layer (as `calibrate` does) so that
    over `n` random queries on one random support set the scores are about N(mean, std²):
    the sign, and with it the -1024 masks / `no_obj_ptr` path, then varies with the input."""
    model = build_model(copy.deepcopy(cfg))
    model.load_state_dict(state_dict, strict=True)
    out = dict(state_dict)
    g = torch.Generator().manual_seed(seed + 11)
    si, sm = make_supports(g, k, size)
    od = support_steps(model, si, sm, k + 1)
    scores = torch.cat([ref_support_pseudo_mask(model, si, sm, make_image(g, 1, size), supports_od=od)
                        ["object_score_logits"].flatten() for _ in range(n)])
    head = "sam_mask_decoder.pred_obj_score_head"
    wkey = next(key for key in (f"{head}.layers.2.weight", f"{head}.weight") if key in out)
    bkey = wkey[: -len("weight")] + "bias"
    scale = std / float(scores.std())
    out[wkey] = out[wkey] * scale
    out[bkey] = torch.full_like(out[bkey], mean) - scale * (scores.mean() - out[bkey])
    print(f"support-score calibration: query scores {scores.mean():+.3f}±{scores.std():.3f} (before rescaling)")
    return out


def official_state_dict(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------
# Inputs


def make_image(g, b, s):
    """Normalised-image-like input: smooth random structure plus pixel noise."""
    low = torch.randn(b, 3, max(s // 16, 2), max(s // 16, 2), generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
    return (smooth + 0.3 * torch.randn(b, 3, s, s, generator=g)).float()


def make_blob_mask(g, b, s):
    """Binary (0/1) ellipse masks at S×S, one per batch item."""
    yy, xx = torch.meshgrid(torch.arange(s).float(), torch.arange(s).float(), indexing="ij")
    masks = []
    for _ in range(b):
        cx, cy = (torch.rand(2, generator=g) * 0.5 + 0.25) * s
        rx, ry = (torch.rand(2, generator=g) * 0.2 + 0.1) * s
        masks.append((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0).float())
    return torch.stack(masks)[:, None]


def make_points(g, b, p, s, labels):
    coords = torch.rand(b, p, 2, generator=g) * (s - 1)
    lab = torch.tensor(labels, dtype=torch.float32).expand(b, p).clone()
    return coords.float(), lab


# ----------------------------------------------------------------------------------------
# References, exactly as the spec writes them


@torch.no_grad()
def ref_image_encoder(model, image):
    bo = model.forward_image(image)
    out = {}
    for i, x in enumerate(bo["backbone_fpn"]):
        out[f"backbone_fpn.{i}"] = x
    for i, x in enumerate(bo["vision_pos_enc"]):
        out[f"vision_pos_enc.{i}"] = x
    return out


@torch.no_grad()
def ref_sam_heads(model, image, point_coords, point_labels, mask_inputs, multimask_output):
    b = image.shape[0]
    c = model.hidden_dim
    bo = model.forward_image(image)
    _, feats, pos, sizes = model._prepare_backbone_features(bo)
    if model.directly_add_no_mem_embed:
        feats[-1] = feats[-1] + model.no_mem_embed
    hi = [x.permute(1, 2, 0).view(b, x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]
    pix = feats[-1].permute(1, 2, 0).view(b, c, *sizes[-1])
    point_inputs = None
    if point_coords is not None:
        point_inputs = {"point_coords": point_coords, "point_labels": point_labels.int()}
    outs = model._forward_sam_heads(pix, point_inputs, mask_inputs, hi, multimask_output)
    names = ["low_res_multimasks", "high_res_multimasks", "ious", "low_res_masks",
             "high_res_masks", "obj_ptr", "object_score_logits"]
    return dict(zip(names, outs))


@torch.no_grad()
def ref_memory_encoder(model, pix_feat, pred_masks_high_res, object_score_logits, is_mask_from_pts):
    e = pix_feat.shape[-1]
    feats, pos = model._encode_new_memory(
        [pix_feat.flatten(2).permute(2, 0, 1)], [(e, e)], pred_masks_high_res,
        object_score_logits, is_mask_from_pts)
    return {"maskmem_features": feats, "maskmem_pos_enc": pos[0]}


@torch.no_grad()
def ref_memory_attention(model, curr, curr_pos, memory, memory_pos, n_ptr):
    out = model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory,
                                 memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr)
    return {"pix_feat_with_mem": out}


@torch.no_grad()
def ref_track(model, frames, point_coords, point_labels, mask_inputs):
    t_frames = frames.shape[0]
    output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    point_inputs = None
    if point_coords is not None:
        point_inputs = {"point_coords": point_coords, "point_labels": point_labels.int()}
    outs = []
    for t in range(t_frames):
        _, feats, pos, sizes = model._prepare_backbone_features(model.forward_image(frames[t:t + 1]))
        out = model.track_step(
            frame_idx=t, is_init_cond_frame=(t == 0), current_vision_feats=feats,
            current_vision_pos_embeds=pos, feat_sizes=sizes,
            point_inputs=point_inputs if t == 0 else None,
            mask_inputs=mask_inputs if t == 0 else None,
            output_dict=output_dict, num_frames=t_frames, track_in_reverse=False,
            run_mem_encoder=True)
        output_dict["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = out
        outs.append(out)
    return {
        "pred_masks": torch.cat([o["pred_masks"] for o in outs], 0),
        "obj_ptr": torch.cat([o["obj_ptr"] for o in outs], 0),
        "object_score_logits": torch.cat([o["object_score_logits"] for o in outs], 0),
        "maskmem_features": torch.cat([o["maskmem_features"] for o in outs], 0),
    }


# ----------------------------------------------------------------------------------------
# SGP kinds (spec section "SGP kinds"): supports are mask-prompted conditioning frames


def _backbone(model, image):
    """`_prepare_backbone_features(forward_image(image))` without the unused first return."""
    _, feats, pos, sizes = model._prepare_backbone_features(model.forward_image(image))
    return feats, pos, sizes


@torch.no_grad()
def support_steps(model, support_images, support_masks, num_frames):
    """A fresh output dict holding the K supports: support k is a conditioning frame at
    frame index k, prompted with its mask (the `use_mask_input_as_output_without_sam` path)."""
    od = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    for k in range(support_images.shape[0]):
        feats, pos, sizes = _backbone(model, support_images[k:k + 1])
        out = model.track_step(
            frame_idx=k, is_init_cond_frame=True, current_vision_feats=feats,
            current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
            mask_inputs=support_masks[k:k + 1], output_dict=od, num_frames=num_frames,
            track_in_reverse=False, run_mem_encoder=True)
        od["cond_frame_outputs"][k] = out
    return od


def _high_res_features(feats, sizes):
    """The two high-resolution levels as [B,C',H,W], as `_track_step` reshapes them."""
    return [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1])]


PMG_OUTPUTS = ["pix_feat_with_mem", "pred_masks", "pred_masks_high_res", "object_score_logits", "obj_ptr"]


@torch.no_grad()
def ref_support_pseudo_mask(model, support_images, support_masks, query, keep_parts=False, supports_od=None):
    """Kind `support_pseudo_mask`, exactly as the spec writes it, one query at a time.
    With `keep_parts`, also returns per query the backbone features (for `sgp_init` and the
    self-checks). `supports_od` (a `support_steps` result, which this path only reads) saves
    recomputing the supports while searching for inputs; references never pass it."""
    k = support_images.shape[0]
    outs = {n: [] for n in PMG_OUTPUTS}
    parts = []
    for q in range(query.shape[0]):
        od = supports_od if supports_od is not None else support_steps(model, support_images, support_masks, k + 1)
        feats, pos, sizes = _backbone(model, query[q:q + 1])
        pix = model._prepare_memory_conditioned_features(
            frame_idx=k, is_init_cond_frame=False, current_vision_feats=feats[-1:],
            current_vision_pos_embeds=pos[-1:], feat_sizes=sizes[-1:], output_dict=od,
            num_frames=k + 1, track_in_reverse=False)
        out = model.track_step(
            frame_idx=k, is_init_cond_frame=False, current_vision_feats=feats,
            current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
            output_dict=od, num_frames=k + 1, track_in_reverse=False, run_mem_encoder=False)
        outs["pix_feat_with_mem"].append(pix)
        for n in PMG_OUTPUTS[1:]:
            outs[n].append(out[n])
        parts.append({"od": od, "feats": feats, "pos": pos, "sizes": sizes, "pix": pix})
    res = {n: torch.cat(v, 0) for n, v in outs.items()}
    return (res, parts) if keep_parts else res


def box_from_logits(logits):
    """The spec's box of one [S,S] logit map: [x_min, y_min, x_max, y_max] over `logits > 0`
    (inclusive pixel indices, floats), or None without foreground."""
    ys, xs = torch.nonzero(logits > 0, as_tuple=True)
    if xs.numel() == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


@torch.no_grad()
def ref_sgp_init(model, support_images, support_masks, query, keep_box_scores=False, supports_od=None):
    """Kind `sgp_init`: the pseudo-mask, its box, and the box-prompted SAM heads on the
    memory-conditioned features (multimask off); without a box the pseudo-mask itself."""
    pmg, parts = ref_support_pseudo_mask(model, support_images, support_masks, query, keep_parts=True,
                                         supports_od=supports_od)
    boxes, finals, box_scores = [], [], []
    for q, p in enumerate(parts):
        box = box_from_logits(pmg["pred_masks_high_res"][q, 0])
        if box is None:
            boxes.append(torch.full((1, 4), -1.0))
            finals.append(pmg["pred_masks_high_res"][q:q + 1])
            box_scores.append(None)
            continue
        point_inputs = {"point_coords": torch.tensor(box, dtype=torch.float32).view(1, 2, 2),
                        "point_labels": torch.tensor([[2, 3]], dtype=torch.int32)}
        o = model._forward_sam_heads(p["pix"], point_inputs, None, _high_res_features(p["feats"], p["sizes"]),
                                     False)
        boxes.append(torch.tensor([box], dtype=torch.float32))
        finals.append(o[4])
        box_scores.append(float(o[6]))
    res = dict(pmg)
    res["box"] = torch.cat(boxes, 0)
    res["final_logits"] = torch.cat(finals, 0)
    return (res, box_scores) if keep_box_scores else res


@torch.no_grad()
def ref_support_track(model, support_images, support_masks, frames):
    """Kind `support_track` (bank "sam2"): supports at frame indices 0..K-1, then the T query
    slices at K..K+T-1 as non-conditioning frames, each encoded into memory."""
    k, t_frames = support_images.shape[0], frames.shape[0]
    n = k + t_frames
    od = support_steps(model, support_images, support_masks, n)
    outs = []
    for t in range(t_frames):
        feats, pos, sizes = _backbone(model, frames[t:t + 1])
        out = model.track_step(
            frame_idx=k + t, is_init_cond_frame=False, current_vision_feats=feats,
            current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
            output_dict=od, num_frames=n, track_in_reverse=False, run_mem_encoder=True)
        od["non_cond_frame_outputs"][k + t] = out
        outs.append(out)
    return {name: torch.cat([o[name] for o in outs], 0)
            for name in ("pred_masks", "obj_ptr", "object_score_logits", "maskmem_features")}


# Self-checks: the same outputs computed a second way. `explicit_memory` rebuilds SAM2's
# memory selection from the spec's description (cond frames at t_pos 0, the last
# num_maskmem-1 non-cond frames, object pointers with signed temporal distances over a
# window of min(num_frames, max_obj_ptrs_in_encoder)), calls the memory attention directly,
# then `_forward_sam_heads` the way `_track_step` does.


def explicit_memory(model, od, frame_idx, num_frames):
    """(memory, memory_pos, num_obj_ptr_tokens) for a non-conditioning frame at frame_idx."""
    # The settings of the SAM2.1 yamls, which this rebuild assumes.
    assert model.max_cond_frames_in_attn == -1 and model.memory_temporal_stride_for_eval == 1
    assert model.use_obj_ptrs_in_encoder and model.add_tpos_enc_to_obj_ptrs and model.proj_tpos_enc_in_obj_ptrs
    assert model.use_signed_tpos_enc_to_obj_ptrs and model.only_obj_ptrs_in_the_past_for_eval
    assert model.mem_dim < model.hidden_dim
    cond, non_cond = od["cond_frame_outputs"], od["non_cond_frame_outputs"]
    nm = model.num_maskmem
    mem, mem_pos = [], []
    entries = [(0, o) for o in cond.values()]
    entries += [(t_pos, non_cond.get(frame_idx - (nm - t_pos))) for t_pos in range(1, nm)]
    for t_pos, o in entries:
        if o is None:
            continue
        mem.append(o["maskmem_features"].flatten(2).permute(2, 0, 1))
        mem_pos.append(o["maskmem_pos_enc"][-1].flatten(2).permute(2, 0, 1) + model.maskmem_tpos_enc[nm - t_pos - 1])
    window = min(num_frames, model.max_obj_ptrs_in_encoder)
    ptrs = [(frame_idx - t, o["obj_ptr"]) for t, o in cond.items() if t <= frame_idx]
    for d in range(1, window):
        if frame_idx - d < 0:
            break
        if frame_idx - d in non_cond:
            ptrs.append((d, non_cond[frame_idx - d]["obj_ptr"]))
    c, m = model.hidden_dim, model.mem_dim
    from sam2.modeling.sam2_utils import get_1d_sine_pe
    dist = torch.tensor([float(d) for d, _ in ptrs])
    ptr_pos = model.obj_ptr_tpos_proj(get_1d_sine_pe(dist / (window - 1), dim=c))  # [P, m]
    split = c // m
    ptr_tok = torch.stack([p for _, p in ptrs], 0)[:, 0].reshape(len(ptrs), split, m).flatten(0, 1)
    mem.append(ptr_tok[:, None])
    mem_pos.append(ptr_pos.repeat_interleave(split, 0)[:, None])
    return torch.cat(mem, 0), torch.cat(mem_pos, 0), ptr_tok.shape[0]


@torch.no_grad()
def explicit_step(model, od, frame_idx, num_frames, feats, pos, sizes):
    memory, memory_pos, n_ptr = explicit_memory(model, od, frame_idx, num_frames)
    e = sizes[-1]
    x = model.memory_attention(curr=feats[-1:], curr_pos=pos[-1:], memory=memory, memory_pos=memory_pos,
                               num_obj_ptr_tokens=n_ptr)
    pix = x.permute(1, 2, 0).view(1, model.hidden_dim, *e)
    o = model._forward_sam_heads(pix, None, None, _high_res_features(feats, sizes),
                                 model._use_multimask(False, None))
    return pix, o


def _max_rel(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


@torch.no_grad()
def self_check_pseudo_mask(model, support_images, support_masks, query, res, tol=1e-5):
    """Recomputes a PMG result (`support_pseudo_mask` or `sgp_init` outputs) the explicit
    way; returns the worst relative difference (asserted ≤ tol)."""
    k = support_images.shape[0]
    worst = 0.0
    for q in range(query.shape[0]):
        od = support_steps(model, support_images, support_masks, k + 1)
        feats, pos, sizes = _backbone(model, query[q:q + 1])
        pix, o = explicit_step(model, od, k, k + 1, feats, pos, sizes)
        mine = {"pix_feat_with_mem": pix, "pred_masks": o[3], "pred_masks_high_res": o[4], "obj_ptr": o[5],
                "object_score_logits": o[6]}
        for n, v in mine.items():
            worst = max(worst, _max_rel(v, res[n][q:q + 1]))
    assert worst <= tol, f"PMG self-check: explicit path differs by {worst:.3e}"
    return worst


@torch.no_grad()
def self_check_track(model, support_images, support_masks, frames, res, tol=1e-5):
    k, t_frames = support_images.shape[0], frames.shape[0]
    n = k + t_frames
    od = support_steps(model, support_images, support_masks, n)
    worst = 0.0
    for t in range(t_frames):
        feats, pos, sizes = _backbone(model, frames[t:t + 1])
        _, o = explicit_step(model, od, k + t, n, feats, pos, sizes)
        mf, mp = model._encode_new_memory(feats, sizes, o[4], o[6], False)
        od["non_cond_frame_outputs"][k + t] = {"maskmem_features": mf, "maskmem_pos_enc": mp, "obj_ptr": o[5]}
        for name, v in (("pred_masks", o[3]), ("obj_ptr", o[5]), ("object_score_logits", o[6]),
                        ("maskmem_features", mf)):
            worst = max(worst, _max_rel(v, res[name][t:t + 1]))
    assert worst <= tol, f"support_track self-check: explicit path differs by {worst:.3e}"
    return worst


@torch.no_grad()
def self_check_sgp_init(model, support_images, support_masks, query, res, tol=1e-5):
    """sgp_init's PMG outputs equal `support_pseudo_mask` on the same inputs, its PMG part
    passes the explicit check, and its boxes/final logits follow from the pseudo-masks."""
    pmg = ref_support_pseudo_mask(model, support_images, support_masks, query)
    worst = max(_max_rel(res[n], pmg[n]) for n in PMG_OUTPUTS)
    assert worst == 0.0, f"sgp_init PMG outputs differ from support_pseudo_mask by {worst:.3e}"
    worst = max(worst, self_check_pseudo_mask(model, support_images, support_masks, query, res, tol))
    for q in range(query.shape[0]):
        box = box_from_logits(res["pred_masks_high_res"][q, 0])
        if box is None:
            assert bool((res["box"][q] == -1).all()), f"query {q} has no foreground but box {res['box'][q].tolist()}"
            assert bool((res["final_logits"][q] == res["pred_masks_high_res"][q]).all()), \
                f"query {q} has no foreground but final_logits differ from pred_masks_high_res"
        else:
            assert res["box"][q].tolist() == box, f"query {q}: box {res['box'][q].tolist()}, pseudo-mask gives {box}"
    return worst


# ----------------------------------------------------------------------------------------
# Writing


def atomic_save_safetensors(tensors, path):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    save_file({k: v.detach().float().contiguous().clone() for k, v in tensors.items()}, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def atomic_write_text(text, path):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def atomic_copy(src, dst):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), suffix=".tmp")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


class Writer:
    def __init__(self, out_dir, cfg, state_dict, verbose=True, weights_src=None):
        self.out_dir = out_dir
        self.weights_src = weights_src
        self.cfg_json = json.dumps(cfg, indent=2) + "\n"
        self.state_dict = state_dict
        self.verbose = verbose
        self.weights_cache = None
        self.pt_cache = None
        os.makedirs(out_dir, exist_ok=True)

    def _weights_file(self):
        # Written once, then copied, so every case holds byte-identical weights.
        if self.weights_src is not None:
            return self.weights_src
        if self.weights_cache is None:
            self.weights_cache = os.path.join(self.out_dir, ".weights.safetensors.cache")
            atomic_save_safetensors(self.state_dict, self.weights_cache)
        return self.weights_cache

    def _pt_file(self):
        if self.pt_cache is None:
            self.pt_cache = os.path.join(self.out_dir, ".weights.pt.cache")
            torch.save({"model": self.state_dict}, self.pt_cache)
        return self.pt_cache

    def write(self, name, case, inputs, outputs, weights_format="original"):
        d = os.path.join(self.out_dir, name)
        os.makedirs(d, exist_ok=True)
        for stale in ("weights.safetensors", "weights.pt"):
            if os.path.exists(os.path.join(d, stale)):
                os.remove(os.path.join(d, stale))
        case = dict(case)
        if weights_format != "original":
            case["weights_format"] = weights_format
            atomic_copy(self._pt_file(), os.path.join(d, "weights.pt"))
        else:
            atomic_copy(self._weights_file(), os.path.join(d, "weights.safetensors"))
        atomic_write_text(json.dumps(case, indent=2) + "\n", os.path.join(d, "case.json"))
        atomic_write_text(self.cfg_json, os.path.join(d, "config.json"))
        io = {f"in.{k}": v for k, v in inputs.items()}
        io.update({f"out.{k}": v for k, v in outputs.items()})
        for k, v in io.items():
            assert torch.isfinite(v).all(), f"{name}: {k} has NaN/Inf"
        atomic_save_safetensors(io, os.path.join(d, "io.safetensors"))
        if self.verbose:
            print(f"  {name}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in outputs.items()))
            report_stats(name, outputs)

    def finish(self):
        for p in (self.weights_cache, self.pt_cache):
            if p and os.path.exists(p):
                os.remove(p)


def report_stats(name, outputs):
    for k, v in outputs.items():
        if v.numel() > 1:
            flag = "  <-- CONSTANT" if float(v.std()) == 0.0 else ""
            print(f"      {k}: mean {v.mean():+.3f} std {v.std():.3f} min {v.min():+.3f} max {v.max():+.3f}{flag}")
    if "object_score_logits" in outputs:
        print(f"      object_score_logits = {outputs['object_score_logits'].flatten().tolist()}")


# ----------------------------------------------------------------------------------------
# Case sets


def gen_image_encoder(w, model, g, s, batch):
    image = make_image(g, batch, s)
    w.write(f"image_encoder_b{batch}", {"kind": "image_encoder", "rtol": 1e-4,
            "description": f"forward_image on a batch of {batch}"},
            {"image": image}, ref_image_encoder(model, image))


def sam_heads_variants(g, s, few):
    """(name, description, B, point_coords, point_labels, mask_inputs, multimask)."""
    v = []
    c, l = make_points(g, 1, 1, s, [1])
    v.append(("sam_heads_point_pos_multi", "one positive click, multimask", 1, c, l, None, True))
    if not few:
        c, l = make_points(g, 2, 3, s, [1, 0, 1])
        v.append(("sam_heads_points_b2_single", "batch 2, clicks labelled 1/0/1, single mask", 2, c, l, None, False))
    # Box as two corners (labels 2, 3) plus a positive click.
    x0y0 = torch.rand(1, 1, 2, generator=g) * s * 0.4
    x1y1 = x0y0 + torch.rand(1, 1, 2, generator=g) * s * 0.5 + s * 0.1
    pc = torch.cat([x0y0, x1y1, torch.rand(1, 1, 2, generator=g) * (s - 1)], 1).float()
    v.append(("sam_heads_box_point_single", "box (labels 2,3) and a positive click, single mask",
              1, pc, torch.tensor([[2.0, 3.0, 1.0]]), None, False))
    if few:
        return v
    c, l = make_points(g, 1, 3, s, [1, -1, 0])
    v.append(("sam_heads_padding_point_multi", "clicks 1 / -1 (padding) / 0, multimask", 1, c, l, None, True))
    v.append(("sam_heads_no_prompt_multi", "no prompt at all (a single -1 point inside)", 1, None, None, None, True))
    v.append(("sam_heads_no_prompt_single", "no prompt at all, single mask", 1, None, None, None, False))
    m = make_blob_mask(g, 1, s)
    v.append(("sam_heads_mask_s_only", "binary mask prompt at S (antialiased resize to S/4), no points",
              1, None, None, m, True))
    c, l = make_points(g, 2, 1, s, [1])
    m = make_blob_mask(g, 2, s)
    v.append(("sam_heads_mask_s_point_b2", "batch 2, mask prompt at S plus a positive click, single mask",
              2, c, l, m, False))
    m4 = 4.0 * torch.nn.functional.interpolate(torch.randn(1, 1, s // 32, s // 32, generator=g),
                                               size=(s // 4, s // 4), mode="bilinear")
    c, l = make_points(g, 1, 1, s, [0])
    v.append(("sam_heads_mask_s4_point_multi", "logit mask prompt already at S/4 plus a negative click, multimask",
              1, c, l, m4.float(), True))
    return v


def signs_ok(scores, want, margin=0.3):
    """`want`: "pos" = every score > 0; "mixed" = both signs present; None = anything.
    Every score must also be at least `margin` away from 0: a score near 0 is a sign that
    rounding could flip (a different code path), and its per-item relative error is huge."""
    scores = scores.flatten()
    if bool((scores.abs() < margin).any()):
        return False
    pos = scores > 0
    if want == "pos":
        return bool(pos.all())
    if want == "mixed":
        return bool(pos.any()) and not bool(pos.all())
    return True


MAX_TRIES = 60


def set_max_tries(n):
    global MAX_TRIES
    MAX_TRIES = n


def draw_until(draw, want, what):
    """Redraws random inputs until the object scores have the wanted signs."""
    for _ in range(MAX_TRIES):
        result = draw()
        if signs_ok(result[-1]["object_score_logits"], want):
            return result
    print(f"  WARNING: {what}: no draw gave object scores {want}; keeping the last one")
    return result


def gen_sam_heads(w, model, g, s, few=False):
    for name, desc, b, pc, pl, mask, mm in sam_heads_variants(g, s, few):
        # Batch-2 point case: one item with and one without an object (the -1024 path).
        want = "mixed" if name == "sam_heads_points_b2_single" else "pos"
        image, outs = draw_until(
            lambda: (lambda im: (im, ref_sam_heads(model, im, pc, pl, mask, mm)))(make_image(g, b, s)),
            want, name)
        inputs = {"image": image}
        if pc is not None:
            inputs["point_coords"] = pc
            inputs["point_labels"] = pl
        if mask is not None:
            inputs["mask_inputs"] = mask
        w.write(name, {"kind": "sam_heads", "rtol": 1e-4, "multimask_output": mm, "description": desc},
                inputs, outs)


def gen_pt(w, model, g, s):
    c, l = make_points(g, 1, 2, s, [1, 0])
    image, outs = draw_until(lambda: (lambda im: (im, ref_sam_heads(model, im, c, l, None, True)))(
        make_image(g, 1, s)), "pos", "pt case")
    w.write("pt_sam_heads_points_multi", {"kind": "sam_heads", "rtol": 1e-4, "multimask_output": True,
            "description": "weights as an official-style .pt checkpoint"},
            {"image": image, "point_coords": c, "point_labels": l}, outs, weights_format="pt")


@torch.no_grad()
def pix_feat_for(model, g, s, b):
    """A realistic pix_feat: the top-level backbone feature of a random image."""
    bo = model.forward_image(make_image(g, b, s))
    return bo["backbone_fpn"][-1]


def gen_memory_encoder(w, model, g, s):
    b = 2
    pix_feat = pix_feat_for(model, g, s, b)
    masks = 8.0 * torch.nn.functional.interpolate(
        torch.randn(b, 1, s // 16, s // 16, generator=g), size=(s, s), mode="bilinear") + 1.0
    scores = torch.tensor([[2.5], [-1.5]])  # one visible object, one occluded
    for from_pts in (True, False):
        name = f"memory_encoder_from_pts_{str(from_pts).lower()}"
        w.write(name, {"kind": "memory_encoder", "rtol": 1e-4, "is_mask_from_pts": from_pts,
                       "description": "batch 2, object scores of both signs"},
                {"pix_feat": pix_feat, "pred_masks_high_res": masks.float(), "object_score_logits": scores},
                ref_memory_encoder(model, pix_feat, masks.float(), scores, from_pts))


def gen_memory_attention(w, model, g, s):
    e = s // 16
    c = model.hidden_dim
    mem = model.mem_dim
    b = 2
    for frames, ptrs in ((3, 3), (2, 0)):
        n_ptr = ptrs * (c // mem)
        m = frames * e * e + n_ptr
        curr = torch.randn(e * e, b, c, generator=g)
        curr_pos = 0.5 * torch.randn(e * e, b, c, generator=g)
        memory = torch.randn(m, b, mem, generator=g)
        memory_pos = 0.5 * torch.randn(m, b, mem, generator=g)
        name = f"memory_attention_f{frames}_ptr{n_ptr}"
        w.write(name, {"kind": "memory_attention", "rtol": 1e-4, "num_obj_ptr_tokens": n_ptr,
                       "description": f"{frames} memory frames of {e}x{e} tokens and {n_ptr} object-pointer tokens"},
                {"curr": curr, "curr_pos": curr_pos, "memory": memory, "memory_pos": memory_pos},
                ref_memory_attention(model, curr, curr_pos, memory, memory_pos, n_ptr))


def make_clip(g, t, s):
    """Frames that drift slowly, like a video."""
    base = make_image(g, 1, s)
    frames = [base]
    for _ in range(t - 1):
        frames.append(frames[-1] + 0.3 * make_image(g, 1, s))
    return torch.cat(frames, 0)


def gen_track(w, model, g, s, t=4, which=("mask", "points")):
    if "mask" in which:
        mask = make_blob_mask(g, 1, s)
        # Some later frame without the object exercises no_obj_ptr / no_obj_embed_spatial.
        frames, outs = draw_until(
            lambda: (lambda f: (f, ref_track(model, f, None, None, mask)))(make_clip(g, t, s)),
            "mixed", "track_mask")
        w.write(f"track_mask_t{t}", {"kind": "track", "rtol": 1e-4,
                "description": f"{t} frames, binary mask prompt on frame 0"},
                {"frames": frames, "mask_inputs": mask}, outs)
    if "points" in which:
        c, l = make_points(g, 1, 1, s, [1])
        frames, outs = draw_until(
            lambda: (lambda f: (f, ref_track(model, f, c, l, None)))(make_clip(g, t, s)),
            "pos", "track_points")
        w.write(f"track_points_t{t}", {"kind": "track", "rtol": 1e-4,
                "description": f"{t} frames, one positive click on frame 0"},
                {"frames": frames, "point_coords": c, "point_labels": l}, outs)


# ----------------------------------------------------------------------------------------
# SGP cases


def generator_versions():
    return {"script": "tools/parity/gen_fixtures.py", "torch": torch.__version__,
            "sam2": importlib.metadata.version("sam2")}


def make_supports(g, k, s, empty=()):
    """K support images with one blob mask each; supports listed in `empty` get an empty
    mask (object absent: score -10, `no_obj_ptr`, `no_obj_embed_spatial` in memory)."""
    images = make_image(g, k, s)
    masks = make_blob_mask(g, k, s)
    for i in empty:
        masks[i] = 0.0
    return images, masks


def score_ok(x, sign, margin=0.3):
    x = float(x)
    return x * sign > margin


def box_is_robust(logits, rel=1e-3):
    """The box must not depend on pixels whose logit is within rel·std of the threshold 0
    (a rounding difference would move the box, and the whole final mask with it)."""
    d = rel * max(1.0, float(logits.std()))
    tight, loose = box_from_logits(logits - d), box_from_logits(logits + d)
    return tight is not None and tight == loose


def make_coarse_image(g, b, s, amp=10.0):
    """High-contrast images with only coarse (2x2 or 3x3-cell) structure: with random
    weights these are the inputs whose masks are compact enough to give a box inside the
    frame (finer inputs give scattered foreground, whose box is the whole frame)."""
    cells = int(torch.randint(2, 4, (1,), generator=g))
    low = amp * torch.randn(b, 3, cells, cells, generator=g)
    return torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False).float()


def pick_queries(g, s, slots, evaluate, what, make=make_image):
    """Draws query images one at a time and files each into the first open slot whose
    predicate accepts `evaluate(image)`; returns the images in slot order."""
    chosen = [None] * len(slots)
    for _ in range(5 * MAX_TRIES * len(slots)):
        image = make(g, 1, s)
        r = evaluate(image)
        for i, ok in enumerate(slots):
            if chosen[i] is None and ok(r):
                chosen[i] = image
                break
        if all(c is not None for c in chosen):
            return torch.cat(chosen, 0)
    sys.exit(f"{what}: no query draw filled every slot ({[c is not None for c in chosen]}); "
             "raise --tries")


def gen_support_pseudo_mask(w, model, g, s, k, q, empty=()):
    si, sm = make_supports(g, k, s, empty)
    od = support_steps(model, si, sm, k + 1)

    def evaluate(image):
        return ref_support_pseudo_mask(model, si, sm, image, supports_od=od)["object_score_logits"]

    slots = [lambda r: score_ok(r, +1), lambda r: score_ok(r, -1)]
    slots += [lambda r: score_ok(r, +1) or score_ok(r, -1)] * (q - 2)
    query = pick_queries(g, s, slots, evaluate, "support_pseudo_mask")
    outs = ref_support_pseudo_mask(model, si, sm, query)
    worst = self_check_pseudo_mask(model, si, sm, query, outs)
    print(f"  self-check (explicit memory + _forward_sam_heads): max rel diff {worst:.2e}")
    scores = outs["object_score_logits"].flatten().tolist()
    neg = [i for i, x in enumerate(scores) if x < 0]
    name = f"support_pseudo_mask_k{k}_q{q}" + ("_empty" if empty else "")
    desc = (f"{k} mask-prompted supports (frames 0..{k - 1}), {q} queries at frame {k}; "
            f"query {neg} has a negative object score (-1024 masks, no_obj_ptr)")
    if empty:
        desc += f"; support {list(empty)} has an empty mask"
    w.write(name, {"kind": "support_pseudo_mask", "rtol": 1e-4, "description": desc,
                   "negative_object_score_queries": neg, "generator": generator_versions()},
            {"support_images": si, "support_masks": sm, "query": query}, outs)


def gen_sgp_init(w, model, g, s, k):
    si, sm = make_supports(g, k, s)
    od = support_steps(model, si, sm, k + 1)

    def evaluate(image):
        res, box_scores = ref_sgp_init(model, si, sm, image, keep_box_scores=True, supports_od=od)
        return res, box_scores[0]

    def no_fg(r):
        res, _ = r
        return score_ok(res["object_score_logits"], -1) and bool(res["box"][0, 0] == -1)

    def boxed(r):
        res, box_score = r
        hr = res["pred_masks_high_res"][0, 0]
        frac = float((hr > 0).float().mean())
        if box_score is None:
            return False
        x0, y0, x1, y1 = res["box"][0].tolist()
        inner_edges = (x0 > 0) + (y0 > 0) + (x1 < s - 1) + (y1 < s - 1)
        # A box with at least two edges inside the frame, away from rounding trouble.
        return (score_ok(res["object_score_logits"], +1) and score_ok(box_score, +1) and 0.02 < frac < 0.5
                and inner_edges >= 2 and box_is_robust(hr) and box_is_robust(res["final_logits"][0, 0]))

    query = pick_queries(g, s, [no_fg, boxed], evaluate, "sgp_init", make=make_coarse_image)
    outs = ref_sgp_init(model, si, sm, query)
    worst = self_check_sgp_init(model, si, sm, query, outs)
    print(f"  self-check (PMG = support_pseudo_mask, explicit path): max rel diff {worst:.2e}")
    box = outs["box"][1].tolist()
    w.write(f"sgp_init_k{k}_q2", {
        "kind": "sgp_init", "rtol": 1e-4,
        "description": (f"{k} supports; query 0 has a negative object score, so no foreground: box -1s and "
                        f"final_logits = pred_masks_high_res; query 1 gets the box {box} (labels 2,3, "
                        "single mask) on its memory-conditioned features"),
        "negative_object_score_queries": [0], "generator": generator_versions()},
        {"support_images": si, "support_masks": sm, "query": query}, outs)


def gen_support_track(w, model, g, s, k, t):
    si, sm = make_supports(g, k, s)
    frames, outs = draw_until(
        lambda: (lambda f: (f, ref_support_track(model, si, sm, f)))(make_clip(g, t, s)),
        "mixed", "support_track")
    worst = self_check_track(model, si, sm, frames, outs)
    print(f"  self-check (explicit bank): max rel diff {worst:.2e}")
    scores = outs["object_score_logits"].flatten().tolist()
    window = min(k + t, model.max_obj_ptrs_in_encoder)
    desc = (f"{k} supports (frames 0..{k - 1}) then {t} slices (frames {k}..{k + t - 1}); the "
            f"{model.num_maskmem - 1}-frame memory window overflows from slice {model.num_maskmem}")
    if t > window:
        desc += f", the object-pointer window ({window - 1} past slices) from slice {window}"
    w.write(f"support_track_k{k}_t{t}", {
        "kind": "support_track", "bank": "sam2", "rtol": 1e-4, "description": desc,
        "negative_object_score_frames": [i for i, x in enumerate(scores) if x < 0],
        "generator": generator_versions()},
        {"support_images": si, "support_masks": sm, "frames": frames}, outs)


# ----------------------------------------------------------------------------------------
# transformers format (Sam2Model, transformers 4.57)


def gen_transformers(out_dir, seed, s):
    """Cases of weights_format "transformers": a reduced transformers `Sam2Model` with
    random weights, saved with `save_pretrained`; the reference is its own forward."""
    from transformers import Sam2Config, Sam2Model
    from transformers.models.sam2.configuration_sam2 import (
        Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2PromptEncoderConfig, Sam2VisionConfig)

    torch.manual_seed(seed)
    r = REDUCED
    dims = [r["embed_dim"] * 2**i for i in range(len(r["stages"]))]
    backbone = Sam2HieraDetConfig(
        hidden_size=r["embed_dim"], num_attention_heads=r["num_heads"], blocks_per_stage=r["stages"],
        global_attention_blocks=r["global_att_blocks"], window_size_per_stage=r["window_spec"],
        window_positional_embedding_background_size=r["window_pos_embed_bkg_spatial_size"],
        image_size=[s, s], embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[r["num_heads"] * 2**i for i in range(len(dims))])
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=dims[::-1],
                              backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
                              fpn_hidden_size=r["hidden_dim"])
    prompt = Sam2PromptEncoderConfig(hidden_size=r["hidden_dim"], image_size=s)
    decoder = Sam2MaskDecoderConfig(hidden_size=r["hidden_dim"], dynamic_multimask_via_stability=True)
    config = Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    model = Sam2Model(config).float().eval()

    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    new = {}
    for name, t in sd.items():
        if not t.is_floating_point():
            new[name] = t
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name.split(".")[-2] if "." in name else False
        if is_norm and leaf == "weight":
            new[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif leaf == "bias":
            new[name] = 0.1 * torch.randn(t.shape, generator=g)
        elif t.dim() >= 2 and leaf == "weight" and "embed" not in name and "token" not in name:
            fan_in = int(torch.tensor(t.shape[1:]).prod())
            if "upscale_conv" in name:  # ConvTranspose2d: [in, out, k, k]
                fan_in = t.shape[0]
            new[name] = torch.randn(t.shape, generator=g) / math.sqrt(fan_in)
        elif "positional_embedding" in name:
            new[name] = torch.randn(t.shape, generator=g)
        else:
            new[name] = 0.5 * torch.randn(t.shape, generator=g)
    # Larger single-mask (token 0) logits put its stability score around the 0.98
    # threshold, so that dynamic_multimask_via_stability can go either way.
    for key in ("mask_decoder.output_hypernetworks_mlps.0.proj_out.weight",
                "mask_decoder.output_hypernetworks_mlps.0.proj_out.bias"):
        new[key] = new[key] * 8.0
    model.load_state_dict(new, strict=True)
    print(f"transformers Sam2Model: {sum(v.numel() for v in new.values())} weights")

    @torch.no_grad()
    def forward(image, pc, pl, mm):
        o = model(pixel_values=image, input_points=pc[:, None], input_labels=pl[:, None].long(),
                  multimask_output=mm)
        return {"low_res_multimasks": o.pred_masks.squeeze(1), "ious": o.iou_scores.squeeze(1),
                "object_score_logits": o.object_score_logits.squeeze(1)}

    def fell_back(image, pc, pl):
        """Per item: did the single-mask output fall back to the best multimask?"""
        single = forward(image, pc, pl, False)["low_res_multimasks"][:, 0]
        multi = forward(image, pc, pl, True)["low_res_multimasks"]
        return [bool((multi[b] - single[b]).abs().amax((-1, -2)).min() == 0) for b in range(single.shape[0])]

    variants = [
        ("transformers_sam_heads_b2_single", 2, [1, 0], False,
         "batch 2, clicks 1/0, single mask: one item keeps the stable token-0 mask, the other "
         "falls back to the best multimask (dynamic multimask via stability)"),
        ("transformers_sam_heads_point_multi", 1, [1], True, "one positive click, multimask"),
    ]
    ig = torch.Generator().manual_seed(seed * 1000 + 99)
    cases = []
    for name, b, labels, mm, desc in variants:
        for _ in range(MAX_TRIES):
            image = make_image(ig, b, s)
            pc, pl = make_points(ig, b, len(labels), s, labels)
            if mm or len(set(fell_back(image, pc, pl))) == 2:
                break
        else:
            print(f"  WARNING: {name}: no draw mixed the stability branches")
        cases.append((name, image, pc, pl, mm, desc))

    # Keep object scores positive (transformers has no -1024 no-object masking) by shifting
    # the last bias of the object-score head.
    head_bias = [k for k in new if "pred_obj_score_head" in k and k.endswith("bias")]
    last = sorted(head_bias)[-1]
    lowest = min(float(forward(im, pc, pl, mm)["object_score_logits"].min()) for _, im, pc, pl, mm, _ in cases)
    if lowest < 1.0:
        new[last] = new[last] + (1.5 - lowest)
        model.load_state_dict(new, strict=True)

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name, image, pc, pl, mm, desc in cases:
            d = os.path.join(out_dir, name)
            os.makedirs(d, exist_ok=True)
            atomic_copy(os.path.join(tmp, "config.json"), os.path.join(d, "config.json"))
            atomic_copy(os.path.join(tmp, "model.safetensors"), os.path.join(d, "model.safetensors"))
            outs = forward(image, pc, pl, mm)
            assert float(outs["object_score_logits"].min()) > 0
            case = {"kind": "sam_heads", "weights_format": "transformers", "rtol": 1e-4,
                    "multimask_output": mm, "description": desc}
            atomic_write_text(json.dumps(case, indent=2) + "\n", os.path.join(d, "case.json"))
            io = {"in.image": image, "in.point_coords": pc, "in.point_labels": pl}
            io.update({f"out.{k}": v for k, v in outs.items()})
            atomic_save_safetensors(io, os.path.join(d, "io.safetensors"))
            print(f"  {name}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in outs.items()))
            report_stats(name, outs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (one folder per case inside)")
    ap.add_argument("--preset", default="reduced", choices=sorted(YAMLS))
    ap.add_argument("--size", type=int, default=128, help="image_size S (a multiple of 32)")
    ap.add_argument("--kinds", nargs="+", default=ALL_KINDS, choices=ALL_KINDS + SGP_KINDS + ["transformers"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--few", action="store_true",
                    help="only a few sam_heads cases (for full-size models or extra sizes)")
    ap.add_argument("--track-frames", type=int, default=4)
    ap.add_argument("--image-batch", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=0,
                    help="image size for the calibration (default 64 for reduced presets, else 256); "
                         "runs with equal preset, seed and calib size write identical weights")
    ap.add_argument("--supports", type=int, default=3, help="K for support_pseudo_mask / sgp_init")
    ap.add_argument("--queries", type=int, default=2, help="Q for support_pseudo_mask (at least 2)")
    ap.add_argument("--empty-support", type=int, nargs="*", default=[],
                    help="support_pseudo_mask: indices of supports whose mask is empty")
    ap.add_argument("--track-supports", type=int, default=2, help="K for support_track")
    ap.add_argument("--support-track-frames", type=int, default=8, help="T for support_track")
    ap.add_argument("--support-score-calib", action="store_true",
                    help="rescale the object-score head so that support-conditioned query scores "
                         "have both signs (needed for full-size models; see calibrate_support_scores)")
    ap.add_argument("--weights", default=None,
                    help="reuse this weights.safetensors (byte for byte) instead of drawing and "
                         "calibrating new weights; it must fit the preset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tries", type=int, default=60,
                    help="redraws of a case's random inputs to get the wanted object-score signs")
    args = ap.parse_args()
    if args.size % 32 != 0:
        sys.exit("--size must be a multiple of 32")
    torch.set_num_threads(args.threads)
    set_max_tries(args.tries)

    if args.kinds == ["transformers"]:
        gen_transformers(args.out, args.seed, args.size)
        return

    cfg = load_model_config(args.preset, args.size)
    torch.manual_seed(args.seed)
    model = build_model(copy.deepcopy(cfg))
    if args.weights:
        sd = load_file(args.weights)
        model.load_state_dict(sd, strict=True)
        print(f"weights from {args.weights}")
    else:
        randomize(model, args.seed)
        calib = args.calib_size or (64 if args.preset.startswith("reduced") else 256)
        sd = calibrate(cfg, official_state_dict(model), args.seed, calib)
        model.load_state_dict(sd, strict=True)
    weights_src = args.weights
    if args.support_score_calib:
        sd = calibrate_support_scores(cfg, sd, args.seed, args.size)
        model.load_state_dict(sd, strict=True)
        weights_src = None
    print(f"preset {args.preset} S={args.size}: {sum(v.numel() for v in sd.values())} weights")
    w = Writer(args.out, cfg, sd, weights_src=weights_src)
    g = torch.Generator().manual_seed(args.seed + 1)
    s = args.size
    try:
        for kind in args.kinds:
            # Each kind draws its inputs from its own stream, so subsets regenerate identically.
            g = torch.Generator().manual_seed(args.seed * 1000 + (ALL_KINDS + SGP_KINDS).index(kind) + 1)
            if kind == "image_encoder":
                gen_image_encoder(w, model, g, s, args.image_batch)
            elif kind == "sam_heads":
                gen_sam_heads(w, model, g, s, few=args.few)
            elif kind == "memory_encoder":
                gen_memory_encoder(w, model, g, s)
            elif kind == "memory_attention":
                gen_memory_attention(w, model, g, s)
            elif kind == "track":
                gen_track(w, model, g, s, t=args.track_frames)
            elif kind == "pt":
                gen_pt(w, model, g, s)
            elif kind == "support_pseudo_mask":
                if args.queries < 2:
                    sys.exit("--queries must be at least 2 (one positive, one negative object score)")
                gen_support_pseudo_mask(w, model, g, s, args.supports, args.queries, tuple(args.empty_support))
            elif kind == "sgp_init":
                gen_sgp_init(w, model, g, s, args.supports)
            elif kind == "support_track":
                gen_support_track(w, model, g, s, args.track_supports, args.support_track_frames)
    finally:
        w.finish()


if __name__ == "__main__":
    main()
