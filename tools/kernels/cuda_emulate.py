#!/usr/bin/env python3
"""Line-by-line numpy emulation of kernels/masked_attention.cu, for machines without a GPU.

Each CUDA kernel is transcribed with the same flat buffers, offsets, tiles, shared-memory
strides and per-lane logic (a warp's 32 lanes are a numpy axis; __shfl_sync(v, j) is v[j]).
The emulated forward and backward are compared with a float64 numpy reference. This catches
logic and index errors in the kernels' algorithm; it cannot catch races, bank conflicts or
compiler issues (tools/kernels/cuda_check.sh on a GPU does).

    python3 tools/kernels/cuda_emulate.py
"""

import math
import sys

import numpy as np

WARPS, KT = 4, 32
LANES = np.arange(32)
F = np.float32


def rows_per_warp(d):
    return 4 if d > 128 else 8


def load_rows(dst, dst_stride, src, src_off, src_stride, rows, valid, D):
    for r in range(rows):
        dst[r * dst_stride : r * dst_stride + D] = src[src_off + r * src_stride : src_off + r * src_stride + D] if r < valid else 0


def prepare_bias(p, rows, lk, mode, eps):
    bias = np.empty(rows * lk, F)
    for blk in range(rows):
        prow = p[blk * lk : (blk + 1) * lk]
        if mode == 0:
            bias[blk * lk : (blk + 1) * lk] = np.log(np.maximum(prow, F(eps)))
        else:
            keep_all = not (prow >= 0.5).any()
            bias[blk * lk : (blk + 1) * lk] = np.where(keep_all | (prow >= 0.5), F(0), F(-np.inf))
    return bias


def fwd(q, kv, bias, B, H, Lq, Lk, D, bpq, scale, W):
    R = rows_per_warp(D)
    BM, KS, T = WARPS * R, D + 4, D // 32
    out = np.zeros(B * H * Lq * W, F)
    for bh in range(B * H):
        b = bh // H
        for bx in range(math.ceil(Lq / BM)):
            q0 = bx * BM
            Qs = np.zeros(BM * D, F)
            Ks = np.zeros(KT * KS, F)
            Vs = np.zeros(KT * D, F)
            load_rows(Qs, D, q, (bh * Lq + q0) * D, D, BM, min(BM, Lq - q0), D)
            kvb = bh * Lk * 2 * D
            m = np.full((WARPS, R), -np.inf, F)
            l = np.zeros((WARPS, R, 32), F)
            o = np.zeros((WARPS, R, D), F)  # o[w][r][lane + 32 t]
            for k0 in range(0, Lk, KT):
                nk = min(KT, Lk - k0)
                load_rows(Ks, KS, kv, kvb + k0 * 2 * D, 2 * D, KT, nk, D)
                load_rows(Vs, D, kv, kvb + k0 * 2 * D + D, 2 * D, KT, nk, D)
                key_ok = LANES < nk
                for w in range(WARPS):
                    for r in range(R):
                        row = w * R + r
                        qi = min(q0 + row, Lq - 1)
                        brow = ((b * Lq + qi) * Lk) if bpq else (b * Lk)
                        s = np.full(32, -np.inf, F)
                        for lane in LANES[key_ok]:
                            dot = F(np.dot(Qs[row * D : row * D + D], Ks[lane * KS : lane * KS + D]))
                            s[lane] = dot * F(scale) + bias[brow + k0 + lane]
                        m_new = max(m[w, r], s.max())
                        pj, corr = np.zeros(32, F), F(1)
                        if m_new != -np.inf:
                            corr = F(np.exp(m[w, r] - m_new))
                            pj = np.exp(s - m_new).astype(F)
                        m[w, r] = m_new
                        l[w, r] = l[w, r] * corr + pj
                        o[w, r] *= corr
                        for j in range(nk):
                            o[w, r] += pj[j] * Vs[j * D : j * D + D]
            for w in range(WARPS):
                for r in range(R):
                    qi = q0 + w * R + r
                    lsum = l[w, r].sum()
                    if qi >= Lq:
                        continue
                    inv = 1 / lsum if lsum > 0 else 0
                    base = (bh * Lq + qi) * W
                    out[base : base + D] = o[w, r] * inv
                    if W > D:
                        out[base + D] = m[w, r] + np.log(lsum)
    return out


def bwd_delta(out_lse, dout, rows, D):
    delta, lse = np.zeros(rows, F), np.zeros(rows, F)
    for row in range(rows):
        o = out_lse[row * (D + 1) : (row + 1) * (D + 1)]
        delta[row] = np.dot(o[:D], dout[row * D : row * D + D])
        lse[row] = o[D]
    return delta, lse


def bwd_dkv(q, kv, bias, dout, delta, lse, B, H, Lq, Lk, D, bpq, scale, want_dbias):
    R = rows_per_warp(D)
    BK, QS = WARPS * R, D + 4
    dkv = np.zeros(B * H * Lk * 2 * D, F)
    dbias_heads = np.zeros(B * H * Lk, F) if want_dbias else None
    for bh in range(B * H):
        b = bh // H
        for bx in range(math.ceil(Lk / BK)):
            k0 = bx * BK
            kvb = bh * Lk * 2 * D
            nk_blk = min(BK, Lk - k0)
            Ks, Vs = np.zeros(BK * D, F), np.zeros(BK * D, F)
            Qs, dOs = np.zeros(KT * QS, F), np.zeros(KT * QS, F)
            load_rows(Ks, D, kv, kvb + k0 * 2 * D, 2 * D, BK, nk_blk, D)
            load_rows(Vs, D, kv, kvb + k0 * 2 * D + D, 2 * D, BK, nk_blk, D)
            dk = np.zeros((WARPS, R, D), F)
            dv = np.zeros((WARPS, R, D), F)
            dbias_acc = np.zeros((WARPS, R, 32), F)
            for i0 in range(0, Lq, KT):
                nq = min(KT, Lq - i0)
                load_rows(Qs, QS, q, (bh * Lq + i0) * D, D, KT, nq, D)
                load_rows(dOs, QS, dout, (bh * Lq + i0) * D, D, KT, nq, D)
                for w in range(WARPS):
                    for r in range(R):
                        kr = w * R + r
                        kj = k0 + kr
                        pij, dsij = np.zeros(32, F), np.zeros(32, F)
                        for lane in range(32):
                            q_ok = lane < nq
                            qi = i0 + (lane if q_ok else 0)
                            if q_ok and kj < Lk:
                                lse_i = lse[bh * Lq + qi]
                                delta_i = delta[bh * Lq + qi]
                                brow = ((b * Lq + qi) * Lk) if bpq else (b * Lk)
                                s = F(np.dot(Ks[kr * D : kr * D + D], Qs[lane * QS : lane * QS + D])) * F(scale) + bias[brow + kj]
                                pij[lane] = np.exp(s - lse_i)
                                dp = F(np.dot(Vs[kr * D : kr * D + D], dOs[lane * QS : lane * QS + D]))
                                dsij[lane] = pij[lane] * (dp - delta_i)
                        dbias_acc[w, r] += dsij
                        for i in range(nq):
                            dv[w, r] += pij[i] * dOs[i * QS : i * QS + D]
                            dk[w, r] += dsij[i] * Qs[i * QS : i * QS + D]
            for w in range(WARPS):
                for r in range(R):
                    kj = k0 + w * R + r
                    db = dbias_acc[w, r].sum()
                    if kj >= Lk:
                        continue
                    row = (bh * Lk + kj) * 2 * D
                    dkv[row : row + D] = dk[w, r] * F(scale)
                    dkv[row + D : row + 2 * D] = dv[w, r]
                    if dbias_heads is not None and not bpq:
                        dbias_heads[bh * Lk + kj] = db
    return dkv, dbias_heads


def bwd_dq(q, kv, bias, dout, delta, lse, B, H, Lq, Lk, D, bpq, scale, want_dbias):
    R = rows_per_warp(D)
    BM, KS = WARPS * R, D + 4
    dq = np.zeros(B * H * Lq * D, F)
    dbias_rows = np.zeros(B * Lq * Lk, F) if want_dbias else None
    for bh in range(B * H):
        b = bh // H
        for bx in range(math.ceil(Lq / BM)):
            q0 = bx * BM
            kvb = bh * Lk * 2 * D
            nq_blk = min(BM, Lq - q0)
            Qs, dOs = np.zeros(BM * D, F), np.zeros(BM * D, F)
            Ks, Vs = np.zeros(KT * KS, F), np.zeros(KT * KS, F)
            load_rows(Qs, D, q, (bh * Lq + q0) * D, D, BM, nq_blk, D)
            load_rows(dOs, D, dout, (bh * Lq + q0) * D, D, BM, nq_blk, D)
            acc = np.zeros((WARPS, R, D), F)
            lse_r = np.zeros((WARPS, R), F)
            delta_r = np.zeros((WARPS, R), F)
            for w in range(WARPS):
                for r in range(R):
                    qi = min(q0 + w * R + r, Lq - 1)
                    lse_r[w, r] = lse[bh * Lq + qi]
                    delta_r[w, r] = delta[bh * Lq + qi]
            for k0 in range(0, Lk, KT):
                nk = min(KT, Lk - k0)
                load_rows(Ks, KS, kv, kvb + k0 * 2 * D, 2 * D, KT, nk, D)
                load_rows(Vs, KS, kv, kvb + k0 * 2 * D + D, 2 * D, KT, nk, D)
                for w in range(WARPS):
                    for r in range(R):
                        row = w * R + r
                        qi = q0 + row
                        dsij = np.zeros(32, F)
                        for lane in range(32):
                            if lane < nk and qi < Lq:
                                brow = ((b * Lq + qi) * Lk) if bpq else (b * Lk)
                                s = F(np.dot(Qs[row * D : row * D + D], Ks[lane * KS : lane * KS + D])) * F(scale) + bias[brow + k0 + lane]
                                pij = np.exp(s - lse_r[w, r])
                                dp = F(np.dot(dOs[row * D : row * D + D], Vs[lane * KS : lane * KS + D]))
                                dsij[lane] = pij * (dp - delta_r[w, r])
                                if dbias_rows is not None and bpq:
                                    dbias_rows[(b * Lq + qi) * Lk + k0 + lane] += dsij[lane]
                        for j in range(nk):
                            acc[w, r] += dsij[j] * Ks[j * KS : j * KS + D]
            for w in range(WARPS):
                for r in range(R):
                    qi = q0 + w * R + r
                    if qi >= Lq:
                        continue
                    dq[(bh * Lq + qi) * D : (bh * Lq + qi + 1) * D] = acc[w, r] * F(scale)
    return dq, dbias_rows


def reference(q, k, v, p, mode, eps, w):
    """float64 forward and gradients of loss = sum(out * w) (no query scaling)."""
    D = q.shape[-1]
    if mode == 0:
        bias = np.log(np.maximum(p, eps))
    else:
        kept = p >= 0.5
        kept = kept | ~kept.any(-1, keepdims=True)
        bias = np.where(kept, 0.0, -np.inf)
    bias = bias[:, None, :, :] if p.ndim == 3 else bias[:, None, None, :]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(D) + bias
    s = s - s.max(-1, keepdims=True)
    a = np.exp(s)
    a /= a.sum(-1, keepdims=True)
    out = a @ v
    dv = a.swapaxes(-1, -2) @ w
    da = w @ v.swapaxes(-1, -2)
    ds = a * (da - (da * a).sum(-1, keepdims=True))
    dq = ds @ k / math.sqrt(D)
    dk = ds.swapaxes(-1, -2) @ q / math.sqrt(D)
    dbias = ds.sum(1) if p.ndim == 3 else ds.sum((1, 2))
    dp = np.where(p > eps, dbias / np.maximum(p, eps), 0.0) if mode == 0 else None
    return out, dq, dk, dv, dp


def rel(a, b):
    return float(np.linalg.norm(a.ravel() - b.ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def run_case(rng, B, H, Lq, Lk, D, per_query, mode, eps=1e-6):
    q = rng.standard_normal((B, H, Lq, D))
    k = rng.standard_normal((B, H, Lk, D))
    v = rng.standard_normal((B, H, Lk, D))
    p = rng.uniform(0.05, 1.0, (B, Lq, Lk) if per_query else (B, Lk))
    if mode == 1:  # some fully excluded rows / batches
        p[0] = np.minimum(p[0], 0.3)
    w = rng.standard_normal((B, H, Lq, D))
    scale = 1 / math.sqrt(D)
    kv = np.concatenate([k, v], -1).astype(F).ravel()
    qf, pf, wf = q.astype(F).ravel(), p.astype(F).ravel(), w.astype(F).ravel()
    rows = B * Lq if per_query else B
    bias = prepare_bias(pf, rows, Lk, mode, eps)
    out = fwd(qf, kv, bias, B, H, Lq, Lk, D, int(per_query), scale, D + 1)
    delta, lse = bwd_delta(out, wf, B * H * Lq, D)
    want_dbias = mode == 0
    dkv, dbias_heads = bwd_dkv(qf, kv, bias, wf, delta, lse, B, H, Lq, Lk, D, int(per_query), scale, want_dbias)
    dq, dbias_rows = bwd_dq(qf, kv, bias, wf, delta, lse, B, H, Lq, Lk, D, int(per_query), scale, want_dbias)
    ref = reference(q, k, v, p, mode, eps, w)
    o = out.reshape(B, H, Lq, D + 1)[..., :D]
    dkv = dkv.reshape(B, H, Lk, 2 * D)
    errs = {"out": rel(o, ref[0]), "dq": rel(dq.reshape(B, H, Lq, D), ref[1]), "dk": rel(dkv[..., :D], ref[2]), "dv": rel(dkv[..., D:], ref[3])}
    if want_dbias:
        db = dbias_rows.reshape(B, Lq, Lk) if per_query else dbias_heads.reshape(B, H, Lk).sum(1)
        dp = np.where(p > eps, db / np.maximum(p, eps), 0.0)
        errs["dp"] = rel(dp, ref[4])
    return errs


def main():
    rng = np.random.default_rng(0)
    ok = True
    cases = [(1, 2, 37, 45, 32, False, 0), (2, 1, 20, 70, 32, True, 0), (1, 1, 33, 33, 64, False, 1),
             (1, 1, 17, 40, 256, True, 1), (1, 1, 9, 35, 128, False, 0)]
    for B, H, Lq, Lk, D, pq, mode in cases:
        errs = run_case(rng, B, H, Lq, Lk, D, pq, mode)
        worst = max(errs.values())
        ok &= worst < 1e-4
        print(f"{'ok  ' if worst < 1e-4 else 'FAIL'} B={B} H={H} Lq={Lq} Lk={Lk} D={D} per_query={pq} mode={'soft' if mode == 0 else 'hard'} "
              + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    print("EMULATION OK" if ok else "EMULATION FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
