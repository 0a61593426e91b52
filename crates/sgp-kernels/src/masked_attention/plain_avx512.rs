//! Plain attention `softmax(q kᵀ·scale) v` (no bias, forward only) on AVX-512 CPUs, with
//! `gemm`'s 64×6 micro-kernel called directly on the operands as they lie.
//!
//! Through the `gemm` API, each tile product of the general kernel ([`super::cpu`])
//! re-packs its K (or P) operand, once per query task for every key tile, and the op
//! first copies K and V side by side into one buffer. On SAM2's memory attention (1024
//! queries × 7196 keys, one 256-wide head) packing and copying were 16% of the kernel's
//! time. Here the tiles are laid out for the micro-kernel instead:
//!
//! - scores are stored key-major (`s[key][query]`), so `Sᵀ = K·Qᵀ` has the query block as
//!   its 64-row left operand: Q is packed once per task, and the K rows are read in place
//!   as the right operand;
//! - the online softmax then runs 16 queries per vector (max, exp and sum down the keys);
//! - `accᵀ += Vᵀ·Pᵀ` reads the probabilities in place as the left operand (64 queries of
//!   one key are contiguous) and the V rows in place as the right one.
//!
//! The result equals the general kernel's up to float rounding (the same products and
//! exponentials, summed in another order).

use std::arch::x86_64::*;

use rayon::prelude::*;

use crate::math::exp_x16;

/// Rows of the micro-kernel's left operand (four 16-lane vectors).
const MR: usize = 64;
/// Columns of its right operand.
const NR: usize = 6;
/// Keys per tile (the scores of one tile are `BK × rows` floats).
const BK: usize = 256;

/// The micro-kernels, `[mr/16 - 1][nr - 1]` (the `gemm` crate's own dispatch table).
use gemm_f32::microkernel::avx512f::f32::UKR;

/// Inputs of [`forward`], all contiguous row-major f32.
pub(crate) struct Plain<'a> {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f32,
    /// `[B,H,Lq,D]`
    pub q: &'a [f32],
    /// `[B,H,Lk,D]`
    pub k: &'a [f32],
    /// `[B,H,Lk,Dv]`
    pub v: &'a [f32],
}

/// `[B,H,Lq,Dv]`. The caller checks the CPU has AVX-512F, `lk > 0` and the slice lengths.
pub(crate) fn forward(pr: &Plain) -> Vec<f32> {
    let (lq, dv) = (pr.lq, pr.dv);
    assert_eq!(pr.q.len(), pr.b * pr.h * lq * pr.d);
    assert_eq!(pr.k.len(), pr.b * pr.h * pr.lk * pr.d);
    assert_eq!(pr.v.len(), pr.b * pr.h * pr.lk * dv);
    assert!(pr.lk > 0 && crate::math::has_avx512());
    let mut out = vec![0f32; pr.b * pr.h * lq * dv];
    if out.is_empty() {
        return out;
    }
    let bq = super::cpu::forward_rows_per_task(pr.b * pr.h, lq, rayon::current_num_threads());
    out.par_chunks_mut(lq * dv).enumerate().for_each(|(bh, out_bh)| {
        out_bh.par_chunks_mut(bq * dv).enumerate().for_each(|(qt, out_tile)| {
            // SAFETY: AVX-512F is present (asserted above); the tile lies inside head bh.
            unsafe { tile(pr, bh, qt * bq, out_tile) }
        })
    });
    out
}

/// One micro-kernel call: `dst (m×n, rows contiguous, columns dst_cs apart) = or +=
/// beta · lhs · rhs`, where `lhs` holds 64-row columns `lhs_cs` apart (rows past `m` are
/// read but unused) and `rhs` is k×n with strides `rhs_rs`, `rhs_cs`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn micro(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    let (alpha, alpha_status) = if accumulate { (1.0, 1) } else { (0.0, 0) };
    // SAFETY: the caller keeps every pointer inside its buffer for these sizes; the
    // kernel reads m.div_ceil(16) vectors of each lhs column and writes only m×n.
    unsafe {
        UKR[m.div_ceil(16) - 1][n - 1](
            m,
            n,
            k,
            dst,
            lhs,
            rhs,
            dst_cs as isize,
            1,
            lhs_cs as isize,
            rhs_rs as isize,
            rhs_cs as isize,
            alpha,
            beta,
            alpha_status,
            false,
            false,
            false,
            lhs,
        )
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn tile(pr: &Plain, bh: usize, q0: usize, out_tile: &mut [f32]) {
    let (lq, lk, d, dv) = (pr.lq, pr.lk, pr.d, pr.dv);
    let nq = out_tile.len() / dv;
    let panels = nq.div_ceil(MR);
    // Query stride of the score and accumulator tiles (whole panels, so the micro-kernel
    // may read a last panel's unused rows).
    let ld = panels * MR;
    let q = &pr.q[(bh * lq + q0) * d..(bh * lq + q0 + nq) * d];
    let k = &pr.k[bh * lk * d..(bh + 1) * lk * d];
    let v = &pr.v[bh * lk * dv..(bh + 1) * lk * dv];
    // Q as 64-query panels, one column per channel: qp[panel][c][row].
    let mut qp = vec![0f32; panels * d * MR];
    for (i, qi) in q.chunks_exact(d).enumerate() {
        let panel = &mut qp[(i / MR) * d * MR..];
        for (c, &x) in qi.iter().enumerate() {
            panel[c * MR + i % MR] = x;
        }
    }
    let mut s = vec![0f32; BK * ld];
    let mut acc = vec![0f32; dv * ld];
    let mut m = vec![f32::NEG_INFINITY; ld];
    let mut l = vec![0f32; ld];
    for k0 in (0..lk).step_by(BK) {
        let nk = BK.min(lk - k0);
        // sᵀ = scale · K Qᵀ: keys down, queries across.
        for p in 0..panels {
            let rows = MR.min(nq - p * MR);
            for j0 in (0..nk).step_by(NR) {
                // SAFETY: s holds BK rows of ld; K rows k0+j0.. of d values lie in k.
                unsafe {
                    micro(
                        rows,
                        NR.min(nk - j0),
                        d,
                        s.as_mut_ptr().add(j0 * ld + p * MR),
                        ld,
                        false,
                        qp.as_ptr().add(p * d * MR),
                        MR,
                        k.as_ptr().add((k0 + j0) * d),
                        1,
                        d,
                        pr.scale,
                    )
                };
            }
        }
        // Online softmax, 16 queries per vector.
        for g in (0..nq).step_by(16) {
            let (sp, mp, lp) = (s.as_mut_ptr(), m.as_mut_ptr(), l.as_mut_ptr());
            // SAFETY: g + 16 <= ld, and the tile's nk rows of ld lie in s.
            unsafe {
                let mut tile_max = _mm512_set1_ps(f32::NEG_INFINITY);
                for j in 0..nk {
                    tile_max = _mm512_max_ps(tile_max, _mm512_loadu_ps(sp.add(j * ld + g)));
                }
                let m_old = _mm512_loadu_ps(mp.add(g));
                let m_new = _mm512_max_ps(m_old, tile_max);
                // exp(−∞) = 0 on the first tile: nothing accumulated yet.
                let corr = exp_x16(_mm512_sub_ps(m_old, m_new));
                let mut sum = _mm512_setzero_ps();
                for j in 0..nk {
                    let at = sp.add(j * ld + g);
                    let e = exp_x16(_mm512_sub_ps(_mm512_loadu_ps(at), m_new));
                    _mm512_storeu_ps(at, e);
                    sum = _mm512_add_ps(sum, e);
                }
                _mm512_storeu_ps(lp.add(g), _mm512_fmadd_ps(_mm512_loadu_ps(lp.add(g)), corr, sum));
                _mm512_storeu_ps(mp.add(g), m_new);
                let ap = acc.as_mut_ptr();
                for c in 0..dv {
                    let at = ap.add(c * ld + g);
                    _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), corr));
                }
            }
        }
        // accᵀ += Vᵀ Pᵀ: channels across, queries down.
        for p in 0..panels {
            let rows = MR.min(nq - p * MR);
            for c0 in (0..dv).step_by(NR) {
                // SAFETY: acc holds dv rows of ld; V rows k0.. of dv values lie in v.
                unsafe {
                    micro(
                        rows,
                        NR.min(dv - c0),
                        nk,
                        acc.as_mut_ptr().add(c0 * ld + p * MR),
                        ld,
                        true,
                        s.as_ptr().add(p * MR),
                        ld,
                        v.as_ptr().add(k0 * dv + c0),
                        dv,
                        1,
                        1.0,
                    )
                };
            }
        }
    }
    for (i, o) in out_tile.chunks_exact_mut(dv).enumerate() {
        // l ≥ 1 for finite scores: the row's maximum contributes exp(0).
        let inv = if l[i] > 0.0 { 1.0 / l[i] } else { 0.0 };
        for (c, o) in o.iter_mut().enumerate() {
            *o = acc[c * ld + i] * inv;
        }
    }
}
