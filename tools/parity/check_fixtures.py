#!/usr/bin/env python3
"""Validates parity cases against the spec and, optionally, checks saved outputs.

For every case under DIR (a folder holding case.json):
  * rebuilds the model from config.json alone (recursive `_target_` instantiation), loads
    the weights file strictly, and recomputes the reference from the `in.*` tensors;
  * checks that every output the kind defines is present as `out.*`, with the shape the
    spec gives (derived from the config), finite, and equal to the recomputation;
  * checks that outputs are not constant where that would make a comparison vacuous.
With `--outputs OUT` it also applies the spec's pass rule to `OUT/<case>/outputs.safetensors`
(as written by `cargo xtask parity --save-outputs OUT`), which is an independent check of
the Rust runner's comparison.

  python tools/parity/check_fixtures.py fixtures/parity [--outputs /tmp/ours]
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_fixtures as G  # noqa: E402

KIND_OUTPUTS = {
    "image_encoder": ["backbone_fpn.0", "backbone_fpn.1", "backbone_fpn.2",
                      "vision_pos_enc.0", "vision_pos_enc.1", "vision_pos_enc.2"],
    "sam_heads": ["low_res_multimasks", "high_res_multimasks", "ious", "low_res_masks",
                  "high_res_masks", "obj_ptr", "object_score_logits"],
    "memory_encoder": ["maskmem_features", "maskmem_pos_enc"],
    "memory_attention": ["pix_feat_with_mem"],
    "track": ["pred_masks", "obj_ptr", "object_score_logits", "maskmem_features"],
    "support_pseudo_mask": list(G.PMG_OUTPUTS),
    "sgp_init": list(G.PMG_OUTPUTS) + ["box", "final_logits"],
    "support_track": ["pred_masks", "obj_ptr", "object_score_logits", "maskmem_features"],
}


def expected_shapes(kind, case, cfg, io):
    s = cfg["image_size"]
    c = cfg["image_encoder"]["neck"]["d_model"]
    m = cfg["memory_encoder"].get("out_dim", c)
    e = s // 16
    if kind == "image_encoder":
        b = io["in.image"].shape[0]
        return {"backbone_fpn.0": [b, c // 8, 4 * e, 4 * e], "backbone_fpn.1": [b, c // 4, 2 * e, 2 * e],
                "backbone_fpn.2": [b, c, e, e], "vision_pos_enc.0": [b, c, 4 * e, 4 * e],
                "vision_pos_enc.1": [b, c, 2 * e, 2 * e], "vision_pos_enc.2": [b, c, e, e]}
    if kind == "sam_heads":
        b = io["in.image"].shape[0]
        k = 3 if case.get("multimask_output") else 1
        return {"low_res_multimasks": [b, k, 4 * e, 4 * e], "high_res_multimasks": [b, k, s, s],
                "ious": [b, k], "low_res_masks": [b, 1, 4 * e, 4 * e], "high_res_masks": [b, 1, s, s],
                "obj_ptr": [b, c], "object_score_logits": [b, 1]}
    if kind == "memory_encoder":
        b = io["in.pix_feat"].shape[0]
        return {"maskmem_features": [b, m, e, e], "maskmem_pos_enc": [b, m, e, e]}
    if kind == "memory_attention":
        b = io["in.curr"].shape[1]
        return {"pix_feat_with_mem": [e * e, b, c]}
    if kind in ("track", "support_track"):
        t = io["in.frames"].shape[0]
        return {"pred_masks": [t, 1, 4 * e, 4 * e], "obj_ptr": [t, c], "object_score_logits": [t, 1],
                "maskmem_features": [t, m, e, e]}
    if kind in ("support_pseudo_mask", "sgp_init"):
        q = io["in.query"].shape[0]
        return {"pix_feat_with_mem": [q, c, e, e], "pred_masks": [q, 1, 4 * e, 4 * e],
                "pred_masks_high_res": [q, 1, s, s], "object_score_logits": [q, 1], "obj_ptr": [q, c],
                "box": [q, 4], "final_logits": [q, 1, s, s]}
    raise ValueError(f"unknown kind {kind}")


def sgp_checks(kind, case, model, io):
    """The SGP kinds' own consistency: inputs as the spec says, the outputs recomputed a
    second way (explicit memory selection + memory attention + SAM heads), and for sgp_init
    the PMG outputs equal `support_pseudo_mask` on the same inputs and the boxes are robust."""
    problems = []
    si, sm = io["in.support_images"], io["in.support_masks"]
    if si.shape[0] != sm.shape[0] or list(sm.shape[1:]) != [1, *si.shape[2:]]:
        problems.append(f"support shapes {list(si.shape)} / {list(sm.shape)}")
    if not bool(((sm == 0) | (sm == 1)).all()):
        problems.append("support_masks are not 0/1")
    outs = {k[4:]: v for k, v in io.items() if k.startswith("out.")}
    try:
        if kind == "support_track":
            if case.get("bank") != "sam2":
                problems.append(f'bank {case.get("bank")!r}, only "sam2" has a reference')
            G.self_check_track(model, si, sm, io["in.frames"], outs)
        elif kind == "support_pseudo_mask":
            G.self_check_pseudo_mask(model, si, sm, io["in.query"], outs)
        else:
            G.self_check_sgp_init(model, si, sm, io["in.query"], outs)
            for q in range(io["in.query"].shape[0]):
                hr = outs["pred_masks_high_res"][q, 0]
                if G.box_from_logits(hr) is not None and not G.box_is_robust(hr):
                    problems.append(f"query {q}: its box depends on logits within rounding of 0")
    except AssertionError as e:
        problems.append(str(e))
    return problems


def recompute(kind, case, model, io):
    get = io.get
    if kind == "image_encoder":
        return G.ref_image_encoder(model, io["in.image"])
    if kind == "sam_heads":
        return G.ref_sam_heads(model, io["in.image"], get("in.point_coords"), get("in.point_labels"),
                               get("in.mask_inputs"), bool(case.get("multimask_output", False)))
    if kind == "memory_encoder":
        return G.ref_memory_encoder(model, io["in.pix_feat"], io["in.pred_masks_high_res"],
                                    io["in.object_score_logits"], bool(case["is_mask_from_pts"]))
    if kind == "memory_attention":
        return G.ref_memory_attention(model, io["in.curr"], io["in.curr_pos"], io["in.memory"],
                                      io["in.memory_pos"], int(case["num_obj_ptr_tokens"]))
    if kind == "track":
        return G.ref_track(model, io["in.frames"], get("in.point_coords"), get("in.point_labels"),
                           get("in.mask_inputs"))
    if kind == "support_pseudo_mask":
        return G.ref_support_pseudo_mask(model, io["in.support_images"], io["in.support_masks"], io["in.query"])
    if kind == "sgp_init":
        return G.ref_sgp_init(model, io["in.support_images"], io["in.support_masks"], io["in.query"])
    if kind == "support_track":
        return G.ref_support_track(model, io["in.support_images"], io["in.support_masks"], io["in.frames"])
    raise ValueError(kind)


def rel_err(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def pass_rule(ours, ref, rtol, kind, name):
    """The spec's rule: shape, finiteness, overall and per batch/frame item."""
    if list(ours.shape) != list(ref.shape):
        return False, f"shape {list(ours.shape)} != {list(ref.shape)}"
    if not torch.isfinite(ours).all():
        return False, "NaN/Inf"
    err = rel_err(ours, ref)
    # memory_attention's pix_feat_with_mem is [E*E,B,C]; the SGP kinds' is [Q,C,E,E].
    dim = 1 if (kind == "memory_attention" and name == "pix_feat_with_mem") else 0
    worst = max(rel_err(o, r) for o, r in zip(ours.unbind(dim), ref.unbind(dim)))
    return err <= rtol and worst <= rtol, f"rel {err:.2e} (worst item {worst:.2e})"


def check_transformers_case(path, case):
    """Reloads the model with `Sam2Model.from_pretrained` and reruns its forward."""
    from transformers import Sam2Model

    problems = []
    model = Sam2Model.from_pretrained(path).float().eval()
    io = load_file(os.path.join(path, "io.safetensors"))
    with torch.no_grad():
        o = model(pixel_values=io["in.image"], input_points=io["in.point_coords"][:, None],
                  input_labels=io["in.point_labels"][:, None].long(),
                  multimask_output=bool(case.get("multimask_output", False)))
    again = {"low_res_multimasks": o.pred_masks.squeeze(1), "ious": o.iou_scores.squeeze(1),
             "object_score_logits": o.object_score_logits.squeeze(1)}
    for out, v in again.items():
        key = f"out.{out}"
        if key not in io:
            problems.append(f"{key} missing")
            continue
        if list(io[key].shape) != list(v.shape):
            problems.append(f"{key} shape {list(io[key].shape)} vs forward {list(v.shape)}")
        elif float((v - io[key]).abs().max()) > 1e-5 * max(1.0, float(io[key].abs().max())):
            problems.append(f"{key} does not reproduce")
    if float(io["out.object_score_logits"].min()) <= 0:
        problems.append("object scores must be positive in transformers cases")
    return problems


def check_case(path, name, outputs_dir):
    problems = []
    case = json.load(open(os.path.join(path, "case.json")))
    kind = case["kind"]
    fmt = case.get("weights_format", "original")
    if fmt == "transformers":
        return check_transformers_case(path, case), False
    cfg = json.load(open(os.path.join(path, "config.json")))
    if fmt == "pt":
        sd = torch.load(os.path.join(path, "weights.pt"), map_location="cpu", weights_only=True)["model"]
    else:
        sd = load_file(os.path.join(path, "weights.safetensors"))
    for k, v in sd.items():
        if v.dtype != torch.float32:
            problems.append(f"weight {k} is {v.dtype}")
    model = G.build_model(cfg)
    model.load_state_dict(sd, strict=True)
    io = load_file(os.path.join(path, "io.safetensors"))
    for k, v in io.items():
        if v.dtype != torch.float32:
            problems.append(f"{k} is {v.dtype}")
        if not (k.startswith("in.") or k.startswith("out.")):
            problems.append(f"unexpected tensor name {k}")
    shapes = expected_shapes(kind, case, cfg, io)
    with torch.no_grad():
        again = recompute(kind, case, model, io)
    for out in KIND_OUTPUTS[kind]:
        key = f"out.{out}"
        if key not in io:
            problems.append(f"{key} missing")
            continue
        ref = io[key]
        if list(ref.shape) != shapes[out]:
            problems.append(f"{key} shape {list(ref.shape)}, spec {shapes[out]}")
        if not torch.isfinite(ref).all():
            problems.append(f"{key} not finite")
        diff = float((again[out].float() - ref).abs().max())
        if diff > 1e-5 * max(1.0, float(ref.abs().max())):
            problems.append(f"{key} does not reproduce: max abs diff {diff:.3e}")
        if ref.numel() > 1 and out not in ("object_score_logits", "ious") and float(ref.std()) == 0.0:
            problems.append(f"{key} is constant")
    if kind in G.SGP_KINDS:
        problems += sgp_checks(kind, case, model, io)
    if outputs_dir is not None:
        f = os.path.join(outputs_dir, name, "outputs.safetensors")
        if not os.path.exists(f):
            problems.append(f"no saved outputs at {f}")
        else:
            ours = load_file(f)
            rtol = float(case.get("rtol", 1e-4))
            for out in KIND_OUTPUTS[kind]:
                key = f"out.{out}"
                if key not in ours:
                    problems.append(f"saved outputs lack {key}")
                    continue
                ok, msg = pass_rule(ours[key].float(), io[key], rtol, kind, out)
                print(f"    {name} {out}: {msg}{'' if ok else '  FAIL'}")
                if not ok:
                    problems.append(f"{key}: {msg}")
    return problems, False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--outputs", default=None, help="folder written by `cargo xtask parity --save-outputs`")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = sorted(root for root, _, files in os.walk(args.dir) if "case.json" in files)
    if not cases:
        sys.exit(f"no case under {args.dir}")
    failed = 0
    for path in cases:
        name = os.path.relpath(path, args.dir)
        problems, skipped = check_case(path, name, args.outputs)
        status = "skip" if skipped else ("ok" if not problems else "FAIL")
        print(f"{status:4} {name}" + "".join(f"\n       {p}" for p in problems if not skipped))
        failed += bool(problems) and not skipped
    print(f"{len(cases) - failed} ok, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
