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

/// Sizes and operands of [`forward`].
pub(crate) struct Plain<'a> {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f32,
    /// `[B,H,Lq,D]`, contiguous.
    pub q: &'a [f32],
    /// `[B,H,Lk,D]`, contiguous.
    pub k: &'a [f32],
    /// `[B,H,Lk,Dv]`, contiguous.
    pub v: &'a [f32],
}

/// The attention of every head, `[B,H,Lq,Dv]`.
///
/// # Panics
/// Without AVX-512F, with `lk == 0`, or with operands of other lengths.
pub(crate) fn forward(pr: &Plain) -> Vec<f32> {
    let (b, h, lq, lk, d, dv) = (pr.b, pr.h, pr.lq, pr.lk, pr.d, pr.dv);
    assert!(lk > 0 && crate::math::has_avx512());
    let total = b * h * lq * dv;
    if total == 0 {
        return Vec::new();
    }
    assert_eq!(pr.q.len(), b * h * lq * d);
    assert_eq!(pr.k.len(), b * h * lk * d);
    assert_eq!(pr.v.len(), b * h * lk * dv);
    let bq = super::cpu::forward_rows_per_task(b * h, lq, rayon::current_num_threads());
    let q_tiles = lq.div_ceil(bq);
    // Every output row is written by exactly one task.
    let mut out = crate::OverwriteBuf::new(total);
    let out_ptr = out.ptr();
    (0..b * h * q_tiles)
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, task| {
            let (bh, qt) = (task / q_tiles, task % q_tiles);
            let q0 = qt * bq;
            let nq = bq.min(lq - q0);
            // SAFETY: AVX-512F is present (asserted above); the rows q0..q0+nq of head bh
            // are this task's alone and lie inside `out`.
            unsafe { tile(pr, bh, q0, nq, out_ptr.get().add((bh * lq + q0) * dv), scratch) }
        });
    // SAFETY: the tasks cover every (batch, head, query) row.
    unsafe { out.assume_init() }
}

/// A task's tiles, kept across the tasks of one thread.
#[derive(Default)]
struct Scratch {
    qp: Vec<f32>,
    s: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

fn reset(v: &mut Vec<f32>, len: usize, value: f32) {
    v.clear();
    v.resize(len, value);
}

/// `dst[c][i] = (or +=) beta · Σ_t lhs[t][i] · rhs[t][c]` for `rows` rows `i` and `cols`
/// columns `c`, through the micro-kernel: the rows in 64-row panels, the columns in groups
/// of 6. `dst` column c starts at `c·ld` (rows contiguous). `lhs` is `(base, panel
/// stride, column stride)`: panel p's 64 rows of depth t start at `base + p·panel + t·cs`
/// (rows past `rows` in a last panel are read, not used). `rhs` is `(base, depth stride,
/// column stride)`.
///
/// # Safety
/// AVX-512F; every element so addressed lies in its buffer.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn panel_product(
    rows: usize,
    cols: usize,
    depth: usize,
    dst: *mut f32,
    ld: usize,
    accumulate: bool,
    (lhs, lhs_panel, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    beta: f32,
) {
    let (alpha, alpha_status) = if accumulate { (1.0, 1) } else { (0.0, 0) };
    for p in 0..rows.div_ceil(MR) {
        let m = MR.min(rows - p * MR);
        for c0 in (0..cols).step_by(NR) {
            let n = NR.min(cols - c0);
            // SAFETY: the caller's bounds; the kernel reads m.div_ceil(16) vectors of each
            // lhs column and writes only the m×n block.
            unsafe {
                let panel = lhs.add(p * lhs_panel);
                UKR[m.div_ceil(16) - 1][n - 1](
                    m,
                    n,
                    depth,
                    dst.add(c0 * ld + p * MR),
                    panel,
                    rhs.add(c0 * rhs_cs),
                    ld as isize,
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
                    panel,
                )
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn tile(pr: &Plain, bh: usize, q0: usize, nq: usize, out: *mut f32, scratch: &mut Scratch) {
    let (lk, d, dv) = (pr.lk, pr.d, pr.dv);
    let panels = nq.div_ceil(MR);
    // Query stride of the score and accumulator tiles (whole panels, so the micro-kernel
    // may read a last panel's unused rows).
    let ld = panels * MR;
    let q = &pr.q[(bh * pr.lq + q0) * d..(bh * pr.lq + q0 + nq) * d];
    let k = &pr.k[bh * lk * d..(bh + 1) * lk * d];
    let v = &pr.v[bh * lk * dv..(bh + 1) * lk * dv];
    let Scratch { qp, s, acc, m, l } = scratch;
    // Q as 64-query panels, one column per channel: qp[panel][c][row].
    reset(qp, panels * d * MR, 0.0);
    for (i, qi) in q.chunks_exact(d).enumerate() {
        let panel = &mut qp[(i / MR) * d * MR..];
        for (c, &x) in qi.iter().enumerate() {
            panel[c * MR + i % MR] = x;
        }
    }
    reset(s, BK * ld, 0.0);
    reset(acc, dv * ld, 0.0);
    reset(m, ld, f32::NEG_INFINITY);
    reset(l, ld, 0.0);
    for k0 in (0..lk).step_by(BK) {
        let nk = BK.min(lk - k0);
        // sᵀ = scale · K Qᵀ: keys down, queries across.
        // SAFETY: s holds BK rows of ld; K rows k0..k0+nk of d values lie in k; qp holds
        // the panels.
        unsafe {
            panel_product(
                nq,
                nk,
                d,
                s.as_mut_ptr(),
                ld,
                false,
                (qp.as_ptr(), d * MR, MR),
                (k.as_ptr().add(k0 * d), 1, d),
                pr.scale,
            )
        };
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
        // SAFETY: acc holds dv rows of ld; s holds nk rows of ld; V rows k0..k0+nk of dv
        // values lie in v.
        unsafe {
            panel_product(
                nq,
                dv,
                nk,
                acc.as_mut_ptr(),
                ld,
                true,
                (s.as_ptr(), MR, ld),
                (v.as_ptr().add(k0 * dv), dv, 1),
                1.0,
            )
        };
    }
    for i in 0..nq {
        // l ≥ 1 for finite scores: the row's maximum contributes exp(0).
        let inv = if l[i] > 0.0 { 1.0 / l[i] } else { 0.0 };
        // SAFETY: the caller gives this task rows 0..nq of dv contiguous values.
        let o = unsafe { std::slice::from_raw_parts_mut(out.add(i * dv), dv) };
        for (c, o) in o.iter_mut().enumerate() {
            *o = acc[c * ld + i] * inv;
        }
    }
}
