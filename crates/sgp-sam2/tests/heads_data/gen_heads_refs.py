"""Reference outputs of `SAM2Base._forward_sam_heads` for `tests/heads_parity.rs`.

Builds SAM2Base with stub image/memory modules (only the SAM heads matter here), a tiny
hidden dim (32) and image size (64), perturbs every weight so all paths run, and saves
per-config weights plus inputs/outputs of several prompt cases.

Run: . /work/pyenv/venv/bin/activate && python crates/sgp-sam2/tests/heads_data/gen_heads_refs.py
"""
import json
import os
import zlib

import torch
from safetensors.torch import save_file
from sam2.modeling.sam2_base import SAM2Base

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
C, S = 32, 64
E = S // 16


class Neck(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.d_model = C


class Enc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.neck = Neck()


CONFIGS = {
    # The SAM2.1 yaml's head settings.
    "sam21": dict(
        use_high_res_features_in_sam=True, multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True, use_obj_ptrs_in_encoder=True,
        pred_obj_scores=True, pred_obj_scores_mlp=True, fixed_no_obj_ptr=True,
        use_multimask_token_for_obj_ptr=True, use_mlp_for_obj_ptr_proj=True,
    ),
    # The other branches: no high-res, linear heads, soft no-obj pointer, dynamic stability.
    "alt": dict(
        use_high_res_features_in_sam=False, iou_prediction_use_sigmoid=False,
        use_obj_ptrs_in_encoder=True, pred_obj_scores=True, pred_obj_scores_mlp=False,
        soft_no_obj_ptr=True, use_mlp_for_obj_ptr_proj=False,
        sam_mask_decoder_extra_args=dict(
            dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98,
        ),
    ),
}


def build(name, seed):
    torch.manual_seed(seed)
    m = SAM2Base(Enc(), torch.nn.Identity(), torch.nn.Identity(), image_size=S, **CONFIGS[name]).eval()
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k.startswith(("sam_", "obj_ptr_proj", "no_obj_ptr")):
                if p.dim() == 1:  # biases / norm params: non-trivial around the init
                    p.add_(0.1 * torch.randn_like(p))
                else:
                    p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.contiguous() for k, v in m.state_dict().items()
          if k.startswith(("sam_prompt_encoder", "sam_mask_decoder", "obj_ptr_proj", "no_obj_ptr"))}
    return m, sd


def run_case(m, name, B, points, mask_size, multimask, hi_res):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    ins = {"backbone_features": torch.randn(B, C, E, E, generator=g)}
    pi = None
    if points is not None:
        coords, labels = points
        ins["point_coords"], ins["point_labels"] = coords, labels.float()
        pi = {"point_coords": coords, "point_labels": labels.int()}
    mi = None
    if mask_size is not None:
        mi = torch.randn(B, 1, mask_size, mask_size, generator=g) * 3
        ins["mask_inputs"] = mi
    hi = None
    if hi_res:
        hi = [torch.randn(B, C // 8, 4 * E, 4 * E, generator=g), torch.randn(B, C // 4, 2 * E, 2 * E, generator=g)]
        ins["high_res_0"], ins["high_res_1"] = hi
    with torch.no_grad():
        outs = m._forward_sam_heads(ins["backbone_features"], pi, mi, hi, multimask)
    names = ["low_res_multimasks", "high_res_multimasks", "ious", "low_res_masks",
             "high_res_masks", "obj_ptr", "object_score_logits"]
    t = {f"in.{k}": v.float().contiguous() for k, v in ins.items()}
    t.update({f"out.{k}": v.float().clone().contiguous() for k, v in zip(names, outs)})
    return t, [bool(x) for x in (outs[6] > 0).flatten()]


def main():
    manifest = {}
    for ci, name in enumerate(CONFIGS):
        m, sd = build(name, 100 + ci)
        save_file(sd, os.path.join(HERE, f"{name}_weights.safetensors"))
        hi = CONFIGS[name]["use_high_res_features_in_sam"]
        g = torch.Generator().manual_seed(7 + ci)
        pts = lambda B, P: (torch.rand(B, P, 2, generator=g) * S, torch.randint(0, 2, (B, P), generator=g))
        box = (torch.tensor([[[5.0, 7.5], [40.0, 50.0]], [[20.0, 3.0], [63.0, 33.0]]]), torch.tensor([[2, 3], [2, 3]]))
        cases = {
            "points_multi": (2, pts(2, 3), None, True),
            "points_single": (2, pts(2, 1), None, False),
            "box_multi": (2, box, None, True),
            "box_pad_single": (2, (torch.cat([box[0], torch.zeros(2, 1, 2)], 1),
                                   torch.cat([box[1], torch.tensor([[-1], [1]])], 1)), None, False),
            "mask_S": (2, pts(2, 2), S, False),
            "mask_S4": (2, None, S // 4, True),
            "no_prompt": (2, None, None, False),
            "no_prompt_multi": (1, None, None, True),
        }
        for cname, (B, p, ms, mm) in cases.items():
            t, present = run_case(m, f"{name}/{cname}", B, p, ms, mm, hi)
            save_file(t, os.path.join(HERE, f"{name}_{cname}.safetensors"))
            manifest[f"{name}_{cname}"] = {"config": name, "multimask_output": mm, "object_present": present}
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump({"hidden_dim": C, "image_size": S, "configs": CONFIGS, "cases": manifest}, f, indent=1)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
