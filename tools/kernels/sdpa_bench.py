#!/usr/bin/env python3
"""PyTorch reference for the masked-attention kernel (crates/sgp-kernels): correctness of a
case dumped by the Rust check, and timing of torch's scaled_dot_product_attention with the
same soft mask at PMA's sizes.

    python3 tools/kernels/sdpa_bench.py [--case DIR/case.safetensors] [--quick] [--hbm-gbps 4800]

Semantics mirrored from sgp_kernels::masked_attention (soft mode, [B,L] key map, query
scaling from the key map): logits = q k^T / sqrt(D) + log(max(p, eps)); softmax;
out = attn @ v, then out[b, :, i, :] *= p[b, i].

Correctness: with --case, recomputes the dumped forward/backward (loss = sum(out * w))
in float64 on the GPU if there is one (else CPU) and prints relative L2 errors of the Rust
out, dq, dk, dv, dp. Timing (CUDA only): SDPA (f32 and bf16, float attn_mask, so torch
picks the memory-efficient backend), and a naive matmul/softmax composition, forward and
forward+backward, with achieved GFLOP/s and bandwidth vs the HBM bound.
"""

import argparse
import math
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the check script treats this as "skipped"
    print("SKIP: torch is not installed")
    sys.exit(0)

EPS = 1e-6


def reference(q, k, v, p, eps=EPS, use_sdpa=True):
    bias = torch.log(torch.clamp(p, min=eps))[:, None, None, :].to(q.dtype)
    if use_sdpa:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        out = torch.softmax(logits, dim=-1) @ v
    return out * p[:, None, :, None].to(q.dtype)


def rel_l2(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def check_case(path):
    try:
        from safetensors.torch import load_file
    except ImportError:
        print("SKIP case check: safetensors is not installed")
        return True
    t = load_file(path)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = {n: t[n].to(dev, torch.float64).requires_grad_(n in ("q", "k", "v", "p")) for n in ("q", "k", "v", "p")}
    w = t["w"].to(dev, torch.float64)
    out = reference(x["q"], x["k"], x["v"], x["p"], use_sdpa=False)
    (out * w).sum().backward()
    worst = 0.0
    for name, ref in [("out", out), ("dq", x["q"].grad), ("dk", x["k"].grad), ("dv", x["v"].grad), ("dp", x["p"].grad)]:
        if name not in t:
            continue
        e = rel_l2(t[name].to(dev), ref.detach())
        worst = max(worst, e)
        print(f"CASE {name}: relative L2 error of the Rust kernel vs torch float64 = {e:.3e}")
    ok = worst < 1e-4
    print(f"CASE {'ok' if ok else 'FAIL'} (worst {worst:.3e}, tolerance 1e-4)")
    return ok


def cuda_time_ms(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def timing(quick, hbm_gbps, iters):
    if not torch.cuda.is_available():
        print("SKIP timing: no CUDA device")
        return
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    batches = [1] if quick else [1, 8]
    for L in (1024, 4096):
        for H in (1, 8):
            for B in batches:
                D = 256 // H
                for dtype in (torch.float32, torch.bfloat16):
                    g = torch.Generator(device="cuda").manual_seed(0)
                    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
                    p = torch.rand(B, L, device="cuda", generator=g)
                    flops = 4.0 * B * H * L * L * D
                    nbytes = q.element_size() * 4 * B * H * L * D + 4 * B * L
                    for name, use_sdpa in (("sdpa", True), ("naive", False)):
                        if not use_sdpa and B * H * L * L * 4 * 6 > 100e9:
                            continue
                        fwd = cuda_time_ms(lambda: reference(q, k, v, p, use_sdpa=use_sdpa), iters)
                        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

                        def fwd_bwd():
                            reference(qg, kg, vg, p, use_sdpa=use_sdpa).sum().backward()

                        fb = cuda_time_ms(fwd_bwd, iters)
                        gbps = nbytes / fwd / 1e6
                        print(
                            f"TORCH {name} {str(dtype).split('.')[-1]} B={B} H={H} L={L} D={D} fwd_ms={fwd:.3f} "
                            f"fwd_bwd_ms={fb:.3f} fwd_GFLOPs={flops / fwd / 1e6:.1f} fwd_GBps={gbps:.1f} "
                            f"({100 * gbps / hbm_gbps:.2f}% of {hbm_gbps:.0f} GB/s HBM)"
                        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hbm-gbps", type=float, default=4800.0)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    ok = check_case(args.case) if args.case else True
    timing(args.quick, args.hbm_gbps, args.iters)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
