//! CPU kernels: FlashAttention-2-style tiling with an online softmax, rayon-parallel.
//!
//! Memory stays O(L·D) (plus the bias buffer, which is as large as `p`): scores exist only
//! as one `Bq×Bk` tile per task. The two products of a tile (`S = Q·Kᵀ`, `O += P·V`) go
//! through the `gemm` crate (the same single-threaded micro-kernels candle's matmul uses),
//! so they run at matmul speed; the softmax loops use a branch-free `exp` that vectorises.
//!
//! All buffers are contiguous f32 row-major:
//! - `q`: `[B,H,Lq,D]`, `kv`: `[B,H,Lk,D+Dv]` (K in columns `0..D`, V in `D..D+Dv`;
//!   `Dv = D` except in the forward-only plain attention, whose values may be narrower),
//! - `bias`: `[B,Lk]` (one row per batch) or `[B,Lq,Lk]` (one row per query),
//! - forward output `[B,H,Lq,W]` with `W = Dv` or `W = Dv+1` (last column = log-sum-exp).

use std::sync::Mutex;

use rayon::prelude::*;

use crate::SendPtr;

use super::MaskMode;

/// Query rows per forward task, largest first: the `gemm` crate re-packs each K/V tile
/// once per task, so more rows per task amortise the packing (256 rows run the memory
/// attention's 1024×7232 problem 16% faster than 128), while smaller tiles keep every
/// thread busy on short problems.
const FWD_BQ_CHOICES: [usize; 3] = [256, 128, 64];
/// Keys per forward tile.
const FWD_BK: usize = 256;
/// Keys per backward task (the task owns their dK, dV and bias-gradient columns).
const BWD_BK: usize = 128;
/// Query rows per backward tile.
const BWD_BQ: usize = 128;

/// Sizes and inputs shared by the forward and backward kernels.
pub(crate) struct Problem<'a> {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    /// Value width (`d` for the masked op and its backward).
    pub dv: usize,
    pub scale: f32,
    pub q: &'a [f32],
    pub kv: &'a [f32],
    pub bias: &'a [f32],
    pub bias_per_query: bool,
}

impl Problem<'_> {
    /// The bias row (length `lk`) that query `i` of batch `bi` sees.
    #[inline]
    fn bias_row(&self, bi: usize, i: usize) -> &[f32] {
        let row = if self.bias_per_query { bi * self.lq + i } else { bi };
        &self.bias[row * self.lk..(row + 1) * self.lk]
    }

    fn check(&self) {
        let rows = if self.bias_per_query { self.b * self.lq } else { self.b };
        assert_eq!(self.q.len(), self.b * self.h * self.lq * self.d);
        assert_eq!(self.kv.len(), self.b * self.h * self.lk * (self.d + self.dv));
        assert_eq!(self.bias.len(), rows * self.lk);
    }
}

/// Additive logit bias from the probability map: `ln(max(p, eps))` (soft), or `0`/`-inf`
/// (hard, `p < 0.5` excluded; a row with every key excluded gets all zeros, i.e. plain
/// attention, as Mask2Former does).
pub(crate) fn prepare_bias(p: &[f32], lk: usize, mode: MaskMode) -> Vec<f32> {
    let mut bias = vec![0f32; p.len()];
    if lk == 0 {
        return bias;
    }
    bias.par_chunks_mut(lk)
        .zip(p.par_chunks(lk))
        .for_each(|(brow, prow)| match mode {
            MaskMode::Soft { eps } => {
                for (b, &pv) in brow.iter_mut().zip(prow) {
                    *b = pv.max(eps).ln();
                }
            }
            MaskMode::Hard => {
                let any_kept = prow.iter().any(|&pv| pv >= super::HARD_THRESHOLD);
                if any_kept {
                    for (b, &pv) in brow.iter_mut().zip(prow) {
                        *b = if pv >= super::HARD_THRESHOLD {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                }
            }
        });
    bias
}

/// `dst (m×n, row stride dst_rs) = [dst +] beta · lhs · rhs` with arbitrary strides.
///
/// # Safety
/// All index ranges implied by the sizes and strides must lie inside the buffers.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(dst.add(i * dst_rs), 0, n);
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

// The attention's exponentials (logits minus a running max, so `x <= 0`).
use crate::math::exp_f32 as exp_nonpos;

/// `row[j] = exp(row[j] - m)`, returning the sum.
#[inline]
fn exp_shift_sum(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::math::has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { exp_shift_sum_avx512(row, m) };
    }
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (v, a) in c.iter_mut().zip(acc.iter_mut()) {
            *v = exp_nonpos(*v - m);
            *a += *v;
        }
    }
    let mut sum: f32 = 0.0;
    for v in chunks.into_remainder() {
        *v = exp_nonpos(*v - m);
        sum += *v;
    }
    sum + acc.iter().sum::<f32>()
}

/// [`exp_shift_sum`] in 16 AVX-512 lanes (LLVM keeps the portable loop at 8 on CPUs that
/// prefer 256-bit vectors). `m` is finite; a −∞ logit (a hard-masked key) gives 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shift_sum_avx512(row: &mut [f32], m: f32) -> f32 {
    use std::arch::x86_64::*;
    let (p, n) = (row.as_mut_ptr(), row.len());
    let mv = _mm512_set1_ps(m);
    let mut acc = _mm512_setzero_ps();
    for j in (0..n).step_by(16) {
        let k = crate::math::lanes16(j, n);
        // SAFETY: the lanes of `k` lie inside `row`.
        let x = unsafe { _mm512_maskz_loadu_ps(k, p.add(j)) };
        let e = crate::math::exp_x16(_mm512_sub_ps(x, mv));
        unsafe { _mm512_mask_storeu_ps(p.add(j), k, e) };
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    _mm512_reduce_add_ps(acc)
}

/// `row[j] += bias[j]`, returning the new maximum.
#[inline]
fn add_bias_max(row: &mut [f32], bias: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 16];
    let mut rc = row.chunks_exact_mut(16);
    let mut bc = bias.chunks_exact(16);
    for (r, b) in (&mut rc).zip(&mut bc) {
        for ((v, &bv), m) in r.iter_mut().zip(b).zip(mx.iter_mut()) {
            *v += bv;
            *m = m.max(*v);
        }
    }
    let mut out = f32::NEG_INFINITY;
    for (v, &bv) in rc.into_remainder().iter_mut().zip(bc.remainder()) {
        *v += bv;
        out = out.max(*v);
    }
    mx.iter().fold(out, |a, &b| a.max(b))
}

/// Forward pass. Returns `[B,H,Lq,W]`, `W = Dv + with_lse`.
pub(crate) fn forward(pr: &Problem, with_lse: bool) -> Vec<f32> {
    pr.check();
    let lq = pr.lq;
    let w = pr.dv + usize::from(with_lse);
    let mut out = vec![0f32; pr.b * pr.h * lq * w];
    if out.is_empty() {
        return out;
    }
    let bq = forward_rows_per_task(pr.b * pr.h, lq, rayon::current_num_threads());
    out.par_chunks_mut(lq * w).enumerate().for_each(|(bh, out_bh)| {
        out_bh.par_chunks_mut(bq * w).enumerate().for_each(|(qt, out_tile)| {
            forward_tile(pr, bh, qt * bq, out_tile, w);
        })
    });
    out
}

/// The largest row tile that still gives every thread at least two tasks.
pub(crate) fn forward_rows_per_task(heads: usize, lq: usize, threads: usize) -> usize {
    FWD_BQ_CHOICES
        .into_iter()
        .find(|&bq| heads * lq.div_ceil(bq) >= 2 * threads)
        .unwrap_or(FWD_BQ_CHOICES[FWD_BQ_CHOICES.len() - 1])
}

fn forward_tile(pr: &Problem, bh: usize, q0: usize, out_tile: &mut [f32], w: usize) {
    let (lq, lk, d, dv) = (pr.lq, pr.lk, pr.d, pr.dv);
    let row = d + dv;
    let bi = bh / pr.h;
    let nq = out_tile.len() / w;
    let q = &pr.q[(bh * lq + q0) * d..(bh * lq + q0 + nq) * d];
    let kv = &pr.kv[bh * lk * row..(bh + 1) * lk * row];
    let mut acc = vec![0f32; nq * dv];
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    let mut s = vec![0f32; nq * FWD_BK];
    for k0 in (0..lk).step_by(FWD_BK) {
        let nk = FWD_BK.min(lk - k0);
        // SAFETY: q is nq×d (rs d), K tile is nk rows of kv from row k0 (rs d + dv, first
        // d columns), s is nq×FWD_BK.
        unsafe {
            gemm_f32(
                nq,
                nk,
                d,
                s.as_mut_ptr(),
                FWD_BK,
                false,
                q.as_ptr(),
                d,
                1,
                kv.as_ptr().add(k0 * row),
                1,
                row,
                pr.scale,
            );
        }
        for i in 0..nq {
            let row = &mut s[i * FWD_BK..i * FWD_BK + nk];
            let bias = &pr.bias_row(bi, q0 + i)[k0..k0 + nk];
            let tile_max = add_bias_max(row, bias);
            let m_new = m[i].max(tile_max);
            if m_new == f32::NEG_INFINITY {
                // Every key so far is excluded for this row: contributes nothing yet.
                row.fill(0.0);
                continue;
            }
            let corr = exp_nonpos(m[i] - m_new);
            let sum = exp_shift_sum(row, m_new);
            l[i] = l[i] * corr + sum;
            if corr != 1.0 {
                for a in &mut acc[i * dv..(i + 1) * dv] {
                    *a *= corr;
                }
            }
            m[i] = m_new;
        }
        // SAFETY: P is nq×nk (rs FWD_BK), V tile is nk rows of kv from row k0, column d
        // (rs d + dv), acc is nq×dv.
        unsafe {
            gemm_f32(
                nq,
                dv,
                nk,
                acc.as_mut_ptr(),
                dv,
                true,
                s.as_ptr(),
                FWD_BK,
                1,
                kv.as_ptr().add(k0 * row + d),
                row,
                1,
                1.0,
            );
        }
    }
    for i in 0..nq {
        // l > 0 whenever lk > 0: the prepared bias leaves at least one finite logit per row.
        let inv = if l[i] > 0.0 { 1.0 / l[i] } else { 0.0 };
        let orow = &mut out_tile[i * w..i * w + dv];
        for (o, &a) in orow.iter_mut().zip(&acc[i * dv..(i + 1) * dv]) {
            *o = a * inv;
        }
        if w > dv {
            out_tile[i * w + dv] = m[i] + l[i].ln();
        }
    }
}

/// Inputs of the backward pass besides the [`Problem`].
pub(crate) struct Saved<'a> {
    /// Forward output with log-sum-exp: `[B,H,Lq,D+1]`.
    pub out_lse: &'a [f32],
    /// Gradient w.r.t. the attention output (before any query-side scaling): `[B,H,Lq,D]`.
    pub dout: &'a [f32],
}

/// Gradients: `dq` `[B,H,Lq,D]`, `dkv` `[B,H,Lk,2D]` and, when asked, the gradient w.r.t.
/// the bias, summed over heads (`[B,Lk]` or `[B,Lq,Lk]`, same layout as the bias).
pub(crate) struct Grads {
    pub dq: Vec<f32>,
    pub dkv: Vec<f32>,
    pub dbias: Option<Vec<f32>>,
}

/// Backward pass, FlashAttention-2 style: `P` is recomputed from the saved log-sum-exp.
///
/// One pass, parallel over (batch, key tile) with the heads inside, so each task owns its
/// rows of dK, dV and its columns of dbias; dQ, which every task touches, is accumulated in
/// one buffer per rayon thread (O(threads·L·D) memory) and summed at the end.
pub(crate) fn backward(pr: &Problem, saved: &Saved, want_dbias: bool) -> Grads {
    assert_eq!(pr.dv, pr.d, "the backward pass needs values as wide as the keys");
    pr.check();
    let (b, h, lq, lk, d) = (pr.b, pr.h, pr.lq, pr.lk, pr.d);
    let bh_n = b * h;
    assert_eq!(saved.out_lse.len(), bh_n * lq * (d + 1));
    assert_eq!(saved.dout.len(), bh_n * lq * d);

    // delta_i = rowsum(dO_i ⊙ O_i); lse_i from the saved column.
    let mut delta = vec![0f32; bh_n * lq];
    let mut lse = vec![0f32; bh_n * lq];
    delta
        .par_iter_mut()
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(r, (dl, ls))| {
            let o = &saved.out_lse[r * (d + 1)..(r + 1) * (d + 1)];
            let g = &saved.dout[r * d..(r + 1) * d];
            *dl = o[..d].iter().zip(g).map(|(a, b)| a * b).sum();
            *ls = o[d];
        });

    let dq_len = bh_n * lq * d;
    let mut dkv = vec![0f32; bh_n * lk * 2 * d];
    let dbias_len = if !want_dbias {
        0
    } else if pr.bias_per_query {
        b * lq * lk
    } else {
        b * lk
    };
    let mut dbias = vec![0f32; dbias_len];
    let n_threads = rayon::current_num_threads().max(1);
    let dq_bufs: Vec<Mutex<Vec<f32>>> = (0..n_threads).map(|_| Mutex::new(Vec::new())).collect();
    if dq_len > 0 && !dkv.is_empty() {
        let dkv_ptr = SendPtr(dkv.as_mut_ptr());
        let dbias_ptr = SendPtr(dbias.as_mut_ptr());
        let n_kt = lk.div_ceil(BWD_BK);
        (0..b * n_kt).into_par_iter().for_each(|task| {
            let (bi, kt) = (task / n_kt, task % n_kt);
            let k0 = kt * BWD_BK;
            let nk = BWD_BK.min(lk - k0);
            // Tasks on one thread run one after another, so this lock is uncontended.
            let slot = rayon::current_thread_index().unwrap_or(0) % n_threads;
            let mut dq_acc = dq_bufs[slot].lock().unwrap_or_else(|e| e.into_inner());
            if dq_acc.is_empty() {
                dq_acc.resize(dq_len, 0.0);
            }
            let mut scratch = Scratch::new(nk, d);
            for hi in 0..h {
                let bh = bi * h + hi;
                // SAFETY: task (bi, kt) alone writes dkv rows [bi, every head, k0..k0+nk] and
                // the dbias entries of keys k0..k0+nk of batch bi (every query row).
                let dkv_rows =
                    unsafe { std::slice::from_raw_parts_mut(dkv_ptr.get().add((bh * lk + k0) * 2 * d), nk * 2 * d) };
                let dbias_view = if want_dbias {
                    Some(DbiasView {
                        ptr: dbias_ptr,
                        bi,
                        k0,
                        nk,
                    })
                } else {
                    None
                };
                key_tile_backward(
                    pr,
                    saved,
                    &delta,
                    &lse,
                    bh,
                    k0,
                    dkv_rows,
                    &mut dq_acc,
                    dbias_view,
                    &mut scratch,
                );
            }
        });
    }
    let mut bufs: Vec<Vec<f32>> = dq_bufs
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .filter(|v| !v.is_empty())
        .collect();
    let mut dq = bufs.pop().unwrap_or_else(|| vec![0f32; dq_len]);
    for other in &bufs {
        dq.par_chunks_mut(1 << 14)
            .zip(other.par_chunks(1 << 14))
            .for_each(|(a, b)| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            });
    }
    Grads {
        dq,
        dkv,
        dbias: want_dbias.then_some(dbias),
    }
}

/// Where a key-tile task adds its bias gradient: keys `k0..k0+nk` of batch `bi`.
struct DbiasView {
    ptr: SendPtr,
    bi: usize,
    k0: usize,
    nk: usize,
}

/// Per-task buffers of the backward.
struct Scratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl Scratch {
    fn new(nk: usize, d: usize) -> Self {
        Scratch {
            p: vec![0f32; BWD_BQ * BWD_BK],
            ds: vec![0f32; BWD_BQ * BWD_BK],
            dk: vec![0f32; nk * d],
            dv: vec![0f32; nk * d],
        }
    }
}

/// Recomputes `P = exp(scale·Q Kᵀ + bias − lse)` for an `nq×nk` tile into `s` (row stride
/// `ld`).
#[allow(clippy::too_many_arguments)]
fn recompute_probs(
    pr: &Problem,
    lse: &[f32],
    bh: usize,
    q0: usize,
    nq: usize,
    k0: usize,
    nk: usize,
    s: &mut [f32],
    ld: usize,
) {
    let (lq, lk, d) = (pr.lq, pr.lk, pr.d);
    let bi = bh / pr.h;
    let q = &pr.q[(bh * lq + q0) * d..(bh * lq + q0 + nq) * d];
    let kv = &pr.kv[bh * lk * 2 * d..(bh + 1) * lk * 2 * d];
    assert!(s.len() >= nq * ld && nk <= ld);
    // SAFETY: see forward_tile; s holds nq rows of ld >= nk.
    unsafe {
        gemm_f32(
            nq,
            nk,
            d,
            s.as_mut_ptr(),
            ld,
            false,
            q.as_ptr(),
            d,
            1,
            kv.as_ptr().add(k0 * 2 * d),
            1,
            2 * d,
            pr.scale,
        );
    }
    for i in 0..nq {
        let row = &mut s[i * ld..i * ld + nk];
        let bias = &pr.bias_row(bi, q0 + i)[k0..k0 + nk];
        let m = lse[bh * lq + q0 + i];
        for (v, &bv) in row.iter_mut().zip(bias) {
            *v = exp_nonpos(*v + bv - m);
        }
    }
}

/// dK, dV of keys `k0..k0+nk` of head `bh` over all queries, plus this tile's share of dQ
/// (into `dq_acc`, `[B,H,Lq,D]`) and of the bias gradient.
#[allow(clippy::too_many_arguments)]
fn key_tile_backward(
    pr: &Problem,
    saved: &Saved,
    delta: &[f32],
    lse: &[f32],
    bh: usize,
    k0: usize,
    dkv_rows: &mut [f32],
    dq_acc: &mut [f32],
    dbias: Option<DbiasView>,
    sc: &mut Scratch,
) {
    let (lq, lk, d) = (pr.lq, pr.lk, pr.d);
    let nk = dkv_rows.len() / (2 * d);
    let ld = BWD_BK;
    let kv = &pr.kv[bh * lk * 2 * d..(bh + 1) * lk * 2 * d];
    sc.dk.fill(0.0);
    sc.dv.fill(0.0);
    for q0 in (0..lq).step_by(BWD_BQ) {
        let nq = BWD_BQ.min(lq - q0);
        recompute_probs(pr, lse, bh, q0, nq, k0, nk, &mut sc.p, ld);
        let q = &pr.q[(bh * lq + q0) * d..(bh * lq + q0 + nq) * d];
        let dout = &saved.dout[(bh * lq + q0) * d..(bh * lq + q0 + nq) * d];
        let (p, ds) = (&sc.p, &mut sc.ds);
        // SAFETY: every operand lies inside its buffer: P/dS are nq×nk (rs ld), dO and Q
        // nq×d (rs d), the K/V tiles nk rows of kv (rs 2d), dk/dv nk×d, and dq_acc holds
        // rows [bh, q0..q0+nq] (rs d).
        unsafe {
            // dV += Pᵀ dO
            gemm_f32(
                nk,
                d,
                nq,
                sc.dv.as_mut_ptr(),
                d,
                true,
                p.as_ptr(),
                1,
                ld,
                dout.as_ptr(),
                d,
                1,
                1.0,
            );
            // dP = dO Vᵀ
            gemm_f32(
                nq,
                nk,
                d,
                ds.as_mut_ptr(),
                ld,
                false,
                dout.as_ptr(),
                d,
                1,
                kv.as_ptr().add(k0 * 2 * d + d),
                1,
                2 * d,
                1.0,
            );
        }
        softmax_grad(p, ds, &delta[bh * lq + q0..bh * lq + q0 + nq], nq, nk, ld);
        if let Some(v) = &dbias {
            debug_assert_eq!((v.k0, v.nk), (k0, nk));
            for i in 0..nq {
                let row = if pr.bias_per_query { v.bi * lq + q0 + i } else { v.bi };
                // SAFETY: see DbiasView: this task alone writes keys k0..k0+nk of batch bi.
                let out = unsafe { std::slice::from_raw_parts_mut(v.ptr.get().add(row * lk + k0), nk) };
                for (o, &g) in out.iter_mut().zip(&ds[i * ld..i * ld + nk]) {
                    *o += g;
                }
            }
        }
        unsafe {
            // dK += scale · dSᵀ Q
            gemm_f32(
                nk,
                d,
                nq,
                sc.dk.as_mut_ptr(),
                d,
                true,
                ds.as_ptr(),
                1,
                ld,
                q.as_ptr(),
                d,
                1,
                pr.scale,
            );
            // dQ += scale · dS K
            gemm_f32(
                nq,
                d,
                nk,
                dq_acc.as_mut_ptr().add((bh * lq + q0) * d),
                d,
                true,
                ds.as_ptr(),
                ld,
                1,
                kv.as_ptr().add(k0 * 2 * d),
                2 * d,
                1,
                pr.scale,
            );
        }
    }
    for j in 0..nk {
        dkv_rows[j * 2 * d..j * 2 * d + d].copy_from_slice(&sc.dk[j * d..(j + 1) * d]);
        dkv_rows[j * 2 * d + d..(j + 1) * 2 * d].copy_from_slice(&sc.dv[j * d..(j + 1) * d]);
    }
}

/// `dS = P ⊙ (dP − delta)` in place in `dp` (row stride `ld`).
fn softmax_grad(p: &[f32], dp: &mut [f32], delta: &[f32], nq: usize, nk: usize, ld: usize) {
    for i in 0..nq {
        let di = delta[i];
        for (g, &pv) in dp[i * ld..i * ld + nk].iter_mut().zip(&p[i * ld..i * ld + nk]) {
            *g = pv * (*g - di);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{exp_nonpos, exp_shift_sum, forward_rows_per_task};

    #[test]
    fn shifted_exponentials_and_their_sum_match_f64() {
        // Lengths around the 16-lane vectors (masked tails), a −∞ (hard-masked) logit, and
        // logits far below the max.
        for n in [1usize, 15, 16, 21, 300] {
            let logits: Vec<f32> = (0..n)
                .map(|j| match j % 7 {
                    3 => f32::NEG_INFINITY,
                    5 => -90.0,
                    _ => (j as f32 * 0.37).sin() * 6.0,
                })
                .collect();
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max).max(0.5);
            let mut row = logits.clone();
            let sum = exp_shift_sum(&mut row, m);
            // Against exp of the f32 difference: its rounding is the caller's, not exp's.
            let want: Vec<f64> = logits.iter().map(|&x| ((x - m) as f64).exp()).collect();
            for (j, (&got, &w)) in row.iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - w).abs() <= 4e-7 * w.max(1e-30),
                    "n {n}, key {j}: {got} vs {w}"
                );
            }
            let want_sum: f64 = want.iter().sum();
            assert!(
                (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                "n {n}: {sum} vs {want_sum}"
            );
        }
    }

    #[test]
    fn forward_tiles_shrink_until_every_thread_has_two_tasks() {
        assert_eq!(forward_rows_per_task(1, 1024, 2), 256);
        assert_eq!(forward_rows_per_task(1, 1024, 4), 128);
        assert_eq!(forward_rows_per_task(1, 1024, 16), 64);
        assert_eq!(forward_rows_per_task(8, 4096, 16), 256);
        assert_eq!(forward_rows_per_task(1, 10, 2), 64);
    }

    #[test]
    fn fast_exp_matches_std() {
        let mut worst: f32 = 0.0;
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (a, b) = (exp_nonpos(x), x.exp());
            if b > 1e-37 {
                worst = worst.max(((a - b) / b).abs());
            } else {
                assert!(a < 1e-36, "exp({x}) = {a}");
            }
            x += 0.001_3;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(0.0), 1.0);
    }
}
