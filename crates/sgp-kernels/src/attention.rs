//! Plain softmax attention on the CPU, reading `q`, `k`, `v` where they lie.
//!
//! Hiera's attention takes q, k and v from one `qkv` linear output `[B, L, 3, H, D]` and
//! hands its result to a projection that wants `[B, L, H·D]`. Going through candle's
//! batched matmul needs three `[B, H, L, D]` copies in, one copy out and a score tensor
//! per op; for the 16- and 64-token windows of Hiera's early stages those copies and the
//! per-op overheads cost several times the arithmetic. Here each (batch, head, query
//! block) task runs two `gemm` calls on strided views, softmaxes its score block in
//! place, and writes straight into the `[B, Lq, H, D]` output. Same function as
//! `softmax(q kᵀ/√d) v` up to float rounding. Tracked inputs get a fused backward.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::math::exp_f32;
use crate::{Error, Result, SendPtr};

/// Score elements per backward task: a query block holds about this many (in L2 with
/// its rows).
const SCORE_BLOCK_ELEMS: usize = 1 << 15;
/// Score elements per forward task (4 MiB). Each task packs all of K and V for its gemm
/// calls, so more query rows per task amortise that: Hiera's global attention (head dim
/// 96) ran at 200 GFLOP/s on 2 cores with 256-row blocks, against 110 (4096 keys) and 135
/// (1024 keys) with the 32 rows that fit L2.
const FWD_SCORE_BLOCK_ELEMS: usize = 1 << 20;

/// A 4-d f32 view with unit stride on its last dim (`[B, L, H, D]` here, `[B, H, W, C]`
/// for pooling): its buffer, offset, the element strides of the first three dims, dims.
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub strides: [usize; 3],
    pub dims: [usize; 4],
}

pub(crate) fn view<'a>(name: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<View<'a>> {
    let CpuStorage::F32(data) = storage else {
        return Err(Error::Unsupported(format!("attention: {name} must be f32")));
    };
    let dims = layout.dims();
    let st = layout.stride();
    if dims.len() != 4 {
        return Err(Error::Shape(format!(
            "attention: {name} must be [B, L, H, D], got {dims:?}"
        )));
    }
    if st[3] != 1 && dims[3] > 1 {
        return Err(Error::Shape(format!(
            "attention: {name} needs unit stride on D, got {st:?}"
        )));
    }
    let v = View {
        data,
        offset: layout.start_offset(),
        strides: [st[0], st[1], st[2]],
        dims: [dims[0], dims[1], dims[2], dims[3]],
    };
    // The furthest element read must lie inside the buffer (the gemm calls below read raw).
    let last = v.offset + (0..3).map(|i| (v.dims[i].max(1) - 1) * v.strides[i]).sum::<usize>() + v.dims[3];
    if v.dims.contains(&0) || last > data.len() {
        return Err(Error::Shape(format!(
            "attention: {name} view {dims:?}/{st:?} is empty or out of its buffer"
        )));
    }
    Ok(v)
}

/// `softmax(q kᵀ / √D) v` for f32 CPU views `q` `[B, Lq, H, D]`, `k`, `v` `[B, Lk, H, D]`
/// (any strides with unit stride on D, e.g. `narrow`s of a `qkv` output). Returns
/// `[B, Lq, H, D]`, contiguous.
///
/// Differentiable: with a tracked input the result carries a fused backward (scores
/// recomputed per query block, as flash attention does, so no `L×L` matrix outlives the
/// forward) that produces the gradients of the tracked inputs only.
pub fn attention_blhd(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    if !q.device().is_cpu() || q.dtype() != DType::F32 || k.dtype() != DType::F32 || v.dtype() != DType::F32 {
        return Err(Error::Unsupported("attention: CPU f32 tensors only".into()));
    }
    if q.track_op() || k.track_op() || v.track_op() {
        // Same checks as below, through the op's forward.
        return q.apply_op3(k, v, AttentionOp).map_err(Error::from);
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        return Err(Error::Unsupported("attention: CPU tensors only".into()));
    };
    let (qv, kv, vv) = checked_views(qs, ql, ks, kl, vs, vl)?;
    let [b, lq, h, d] = qv.dims;
    let out = attention_views(&qv, &kv, &vv);
    Tensor::from_vec(out, (b, lq, h, d), q.device()).map_err(Error::from)
}

fn checked_views<'a>(
    qs: &'a CpuStorage,
    ql: &Layout,
    ks: &'a CpuStorage,
    kl: &Layout,
    vs: &'a CpuStorage,
    vl: &Layout,
) -> Result<(View<'a>, View<'a>, View<'a>)> {
    let (qv, kv, vv) = (view("q", qs, ql)?, view("k", ks, kl)?, view("v", vs, vl)?);
    let [b, _, h, d] = qv.dims;
    let lk = kv.dims[1];
    if kv.dims != [b, lk, h, d] || vv.dims != kv.dims {
        return Err(Error::Shape(format!(
            "attention: q {:?}, k {:?}, v {:?} do not match",
            qv.dims, kv.dims, vv.dims
        )));
    }
    Ok((qv, kv, vv))
}

/// q, k and v views of a packed `[B, L, 3, H, D]` tensor (Hiera's `qkv` output), any
/// strides with unit stride on D.
fn packed_views<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<[View<'a>; 3]> {
    let CpuStorage::F32(data) = storage else {
        return Err(Error::Unsupported("attention: qkv must be f32".into()));
    };
    let (dims, st) = (layout.dims(), layout.stride());
    if dims.len() != 5 || dims[2] != 3 || (st[4] != 1 && dims[4] > 1) {
        return Err(Error::Shape(format!(
            "attention: packed qkv must be [B, L, 3, H, D] with unit stride on D, got {dims:?}/{st:?}"
        )));
    }
    let part = |i: usize| View {
        data,
        offset: layout.start_offset() + i * st[2],
        strides: [st[0], st[1], st[3]],
        dims: [dims[0], dims[1], dims[3], dims[4]],
    };
    let views = [part(0), part(1), part(2)];
    for v in &views {
        let last = v.offset + (0..3).map(|i| (v.dims[i].max(1) - 1) * v.strides[i]).sum::<usize>() + v.dims[3];
        if v.dims.contains(&0) || last > data.len() {
            return Err(Error::Shape(format!(
                "attention: qkv view {dims:?}/{st:?} is empty or out of its buffer"
            )));
        }
    }
    Ok(views)
}

/// `softmax(q kᵀ / √D) v` on a packed `qkv` `[B, L, 3, H, D]` (q, k, v its three parts),
/// or with `pooled_q` `[B, Lq, H, D]` in place of its q part (Hiera's q-pooling blocks).
/// Returns `[B, Lq, H, D]`, contiguous. Differentiable like [`attention_blhd`]; the
/// gradient of `qkv` is written as one packed buffer, where three `narrow`ed views would
/// each cost candle a zero-padded full-size copy and an add in the backward pass.
pub fn attention_qkv(qkv: &Tensor, pooled_q: Option<&Tensor>) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !f32_cpu(qkv) || pooled_q.is_some_and(|q| !f32_cpu(q)) {
        return Err(Error::Unsupported("attention: CPU f32 tensors only".into()));
    }
    let tracked = qkv.track_op() || pooled_q.is_some_and(|q| q.track_op());
    if tracked {
        return match pooled_q {
            None => qkv.apply_op1(PackedAttention),
            Some(q) => q.apply_op2(qkv, PackedAttention),
        }
        .map_err(Error::from);
    }
    let (ps, pl) = qkv.storage_and_layout();
    let Storage::Cpu(ps) = &*ps else {
        return Err(Error::Unsupported("attention: CPU tensors only".into()));
    };
    let [qv, kv, vv] = packed_views(ps, pl)?;
    let out = match pooled_q {
        None => attention_views(&qv, &kv, &vv),
        Some(q) => {
            let (qs, ql) = q.storage_and_layout();
            let Storage::Cpu(qs) = &*qs else {
                return Err(Error::Unsupported("attention: CPU tensors only".into()));
            };
            let qv = pooled_view(qs, ql, &kv)?;
            attention_views(&qv, &kv, &vv)
        }
    };
    let [b, _, h, d] = kv.dims;
    let lq = out.len() / (b * h * d);
    Tensor::from_vec(out, (b, lq, h, d), qkv.device()).map_err(Error::from)
}

/// A pooled q view, checked against the packed k view.
fn pooled_view<'a>(qs: &'a CpuStorage, ql: &Layout, k: &View) -> Result<View<'a>> {
    let qv = view("q", qs, ql)?;
    if qv.dims[0] != k.dims[0] || qv.dims[2..] != k.dims[2..] {
        return Err(Error::Shape(format!(
            "attention: pooled q {:?} for k {:?}",
            qv.dims, k.dims
        )));
    }
    Ok(qv)
}

fn msg(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The tracked [`attention_qkv`]: op1 on `qkv`, op2 on `(pooled_q, qkv)`.
struct PackedAttention;

impl PackedAttention {
    /// The packed gradient `[B, L, 3, H, D]` of `qkv` (q part zero when `q_from_qkv` is
    /// false) and, for a pooled q, its gradient.
    fn grads(
        qkv: &Tensor,
        pooled_q: Option<&Tensor>,
        grad: &Tensor,
        want_qkv: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        let (ps, pl) = qkv.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(ps), Storage::Cpu(gs)) = (&*ps, &*gs) else {
            return Err(Error::Unsupported("attention backward: CPU tensors only".into()));
        };
        let [qp, kv, vv] = packed_views(ps, pl)?;
        let gv = view("grad", gs, gl)?;
        let [b, l, h, d] = kv.dims;
        let row = h * d;
        let mut dqkv = vec![0f32; if want_qkv { b * l * 3 * row } else { 0 }];
        let packed = |buf: &mut Vec<f32>, i: usize| Dest {
            ptr: SendPtr(buf.as_mut_ptr()),
            offset: i * row,
            batch_stride: l * 3 * row,
            row_stride: 3 * row,
        };
        let (dk, dv) = if want_qkv {
            (Some(packed(&mut dqkv, 1)), Some(packed(&mut dqkv, 2)))
        } else {
            (None, None)
        };
        let dq_pooled = match pooled_q {
            None => {
                let dq = want_qkv.then(|| packed(&mut dqkv, 0));
                backward_views(&qp, &kv, &vv, &gv, [dq, dk, dv])?;
                None
            }
            Some(q) => {
                let (qs, ql) = q.storage_and_layout();
                let Storage::Cpu(qs) = &*qs else {
                    return Err(Error::Unsupported("attention backward: CPU tensors only".into()));
                };
                let qv = pooled_view(qs, ql, &kv)?;
                let lq = qv.dims[1];
                let mut dq = vec![0f32; if q.track_op() { b * lq * row } else { 0 }];
                let dest = q.track_op().then(|| Dest::contiguous(&mut dq, lq, row));
                backward_views(&qv, &kv, &vv, &gv, [dest, dk, dv])?;
                if q.track_op() {
                    Some(Tensor::from_vec(dq, (b, lq, h, d), q.device())?)
                } else {
                    None
                }
            }
        };
        let dqkv = if want_qkv {
            Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?)
        } else {
            None
        };
        Ok((dqkv, dq_pooled))
    }
}

impl candle_core::CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "sgp-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [q, k, v] = packed_views(s, l).map_err(msg)?;
        let [b, lq, h, d] = q.dims;
        Ok((CpuStorage::F32(attention_views(&q, &k, &v)), Shape::from((b, lq, h, d))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Self::grads(qkv, None, grad, true).map_err(msg)?.0)
    }
}

impl candle_core::CustomOp2 for PackedAttention {
    fn name(&self) -> &'static str {
        "sgp-attention-pooled-qkv"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [_, k, v] = packed_views(s, l).map_err(msg)?;
        let q = pooled_view(qs, ql, &k).map_err(msg)?;
        let [b, lq, h, d] = q.dims;
        Ok((CpuStorage::F32(attention_views(&q, &k, &v)), Shape::from((b, lq, h, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        qkv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dqkv, dq) = Self::grads(qkv, Some(q), grad, qkv.track_op()).map_err(msg)?;
        Ok((dq, dqkv))
    }
}

/// The tracked attention: forward as [`attention_blhd`], backward by [`attention_backward`].
struct AttentionOp;

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "sgp-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (qv, kv, vv) = checked_views(qs, ql, ks, kl, vs, vl).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let [b, lq, h, d] = qv.dims;
        Ok((
            CpuStorage::F32(attention_views(&qv, &kv, &vv)),
            Shape::from((b, lq, h, d)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = [q.track_op(), k.track_op(), v.track_op()];
        let [dq, dk, dv] =
            attention_backward(q, k, v, grad, want).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((dq, dk, dv))
    }
}

/// Where one gradient goes: element (b, l, h, ·) of a `[B, L, H, D]`-shaped gradient
/// starts at `offset + b·batch_stride + l·row_stride + h·D` of the buffer behind `ptr`.
#[derive(Clone, Copy)]
struct Dest {
    ptr: SendPtr,
    offset: usize,
    batch_stride: usize,
    row_stride: usize,
}

impl Dest {
    /// A contiguous `[B, L, H·D]` buffer.
    fn contiguous(buf: &mut [f32], l: usize, row: usize) -> Self {
        Self {
            ptr: SendPtr(buf.as_mut_ptr()),
            offset: 0,
            batch_stride: l * row,
            row_stride: row,
        }
    }

    #[inline]
    fn at(self, b: usize, l: usize, h: usize, d: usize) -> *mut f32 {
        self.ptr
            .get()
            .wrapping_add(self.offset + b * self.batch_stride + l * self.row_stride + h * d)
    }
}

/// Gradients of `softmax(q kᵀ/√D) v` with respect to q, k, v for the upstream gradient
/// `grad` `[B, Lq, H, D]`, as separate `[B, L, H, D]` tensors (those `want`ed).
fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    want: [bool; 3],
) -> Result<[Option<Tensor>; 3]> {
    let g = grad.detach().contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Storage::Cpu(gs)) = (&*qs, &*ks, &*vs, &*gs) else {
        return Err(Error::Unsupported("attention backward: CPU tensors only".into()));
    };
    let (qv, kv, vv) = checked_views(qs, ql, ks, kl, vs, vl)?;
    let gv = view("grad", gs, gl)?;
    let [b, lq, h, d] = qv.dims;
    let lk = kv.dims[1];
    let row = h * d;
    let mut dq = vec![0f32; if want[0] { b * lq * row } else { 0 }];
    let mut dk = vec![0f32; if want[1] { b * lk * row } else { 0 }];
    let mut dv = vec![0f32; if want[2] { b * lk * row } else { 0 }];
    let dests = [
        want[0].then(|| Dest::contiguous(&mut dq, lq, row)),
        want[1].then(|| Dest::contiguous(&mut dk, lk, row)),
        want[2].then(|| Dest::contiguous(&mut dv, lk, row)),
    ];
    backward_views(&qv, &kv, &vv, &gv, dests)?;
    let dev = q.device();
    let make = |v: Vec<f32>, l: usize, on: bool| -> Result<Option<Tensor>> {
        if on {
            Ok(Some(Tensor::from_vec(v, (b, l, h, d), dev)?))
        } else {
            Ok(None)
        }
    };
    Ok([make(dq, lq, want[0])?, make(dk, lk, want[1])?, make(dv, lk, want[2])?])
}

/// The backward on views: per (batch, head) task and query block of rows i,
/// `P = softmax(s·Q_i Kᵀ)`, `dV += Pᵀ dO_i`, `dP = dO_i Vᵀ`,
/// `dS = P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ_i = s·dS K`, `dK += s·dSᵀ Q_i`, each written to
/// its [`Dest`] (skipped when `None`). Every destination must hold the (b, l, h, ·)
/// elements of its gradient, and no two tasks' elements may overlap.
fn backward_views(qv: &View, kv: &View, vv: &View, gv: &View, dests: [Option<Dest>; 3]) -> Result<()> {
    if gv.dims != qv.dims {
        return Err(Error::Shape(format!(
            "attention backward: grad {:?} for q {:?}",
            gv.dims, qv.dims
        )));
    }
    let [b, lq, h, d] = qv.dims;
    let lk = kv.dims[1];
    let nq_block = (SCORE_BLOCK_ELEMS / lk).clamp(32, 256).min(lq);
    let scale = 1.0 / (d as f32).sqrt();
    // Strided gemm: dst = [beta·]dst + alpha·lhs·rhs, every operand (ptr, col stride, row stride).
    #[allow(clippy::too_many_arguments)]
    unsafe fn mm(
        m: usize,
        n: usize,
        kk: usize,
        dst: (*mut f32, usize, usize),
        accumulate: bool,
        lhs: (*const f32, usize, usize),
        rhs: (*const f32, usize, usize),
        alpha: f32,
    ) {
        gemm::gemm(
            m,
            n,
            kk,
            dst.0,
            dst.1 as isize,
            dst.2 as isize,
            accumulate,
            lhs.0,
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0,
            rhs.1 as isize,
            rhs.2 as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    (0..b * h).into_par_iter().for_each_init(
        || (vec![0f32; nq_block * lk], vec![0f32; nq_block * lk]),
        |(p, dp), bh| {
            let (bi, hi) = (bh / h, bh % h);
            let at = |x: &View, l: usize| {
                x.data[x.offset + bi * x.strides[0] + l * x.strides[1] + hi * x.strides[2]..].as_ptr()
            };
            let k_ptr = at(kv, 0);
            let v_ptr = at(vv, 0);

            let mut q0 = 0;
            while q0 < lq {
                let nq = nq_block.min(lq - q0);
                let (q_ptr, g_ptr) = (at(qv, q0), at(gv, q0));
                let (p, dp) = (&mut p[..nq * lk], &mut dp[..nq * lk]);
                // SAFETY: `checked_views`/`view` bound every (l, d) element of the inputs;
                // p and dp hold nq×lk; each output slice (bi, ·, hi, ·) is this task's alone.
                unsafe {
                    mm(
                        nq,
                        lk,
                        d,
                        (p.as_mut_ptr(), 1, lk),
                        false,
                        (q_ptr, 1, qv.strides[1]),
                        (k_ptr, kv.strides[1], 1),
                        scale,
                    );
                }
                for r in p.chunks_exact_mut(lk) {
                    softmax_in_place(r);
                }
                unsafe {
                    if let Some(dv) = dests[2] {
                        // dV [lk, d] += Pᵀ dO_i
                        mm(
                            lk,
                            d,
                            nq,
                            (dv.at(bi, 0, hi, d), 1, dv.row_stride),
                            q0 > 0,
                            (p.as_ptr(), lk, 1),
                            (g_ptr, 1, gv.strides[1]),
                            1.0,
                        );
                    }
                    // dP = dO_i Vᵀ
                    mm(
                        nq,
                        lk,
                        d,
                        (dp.as_mut_ptr(), 1, lk),
                        false,
                        (g_ptr, 1, gv.strides[1]),
                        (v_ptr, vv.strides[1], 1),
                        1.0,
                    );
                }
                for (pr, dr) in p.chunks_exact(lk).zip(dp.chunks_exact_mut(lk)) {
                    let di: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (x, &pv) in dr.iter_mut().zip(pr) {
                        *x = pv * (*x - di);
                    }
                }
                unsafe {
                    if let Some(dq) = dests[0] {
                        // dQ_i = s·dS K
                        mm(
                            nq,
                            d,
                            lk,
                            (dq.at(bi, q0, hi, d), 1, dq.row_stride),
                            false,
                            (dp.as_ptr(), 1, lk),
                            (k_ptr, 1, kv.strides[1]),
                            scale,
                        );
                    }
                    if let Some(dk) = dests[1] {
                        // dK [lk, d] += s·dSᵀ Q_i
                        mm(
                            lk,
                            d,
                            nq,
                            (dk.at(bi, 0, hi, d), 1, dk.row_stride),
                            q0 > 0,
                            (dp.as_ptr(), lk, 1),
                            (q_ptr, 1, qv.strides[1]),
                            scale,
                        );
                    }
                }
                q0 += nq;
            }
        },
    );
    Ok(())
}

fn attention_views(q: &View, k: &View, v: &View) -> Vec<f32> {
    let [b, lq, h, d] = q.dims;
    let lk = k.dims[1];
    // Balanced blocks: 196 rows go as one block, not as 167 + 29.
    let q_blocks = lq.div_ceil((FWD_SCORE_BLOCK_ELEMS / lk).clamp(32, 256));
    let nq_block = lq.div_ceil(q_blocks);
    let scale = 1.0 / (d as f32).sqrt();
    // Every (batch, query, head) row is written by one task's second gemm (lk > 0).
    let mut buf = crate::OverwriteBuf::new(b * lq * h * d);
    let out_ptr = buf.ptr();
    let tasks = b * h * q_blocks;
    (0..tasks).into_par_iter().with_min_len(4).for_each_init(
        || vec![0f32; nq_block * lk],
        |s, task| {
            let (bh, qb) = (task / q_blocks, task % q_blocks);
            let (bi, hi) = (bh / h, bh % h);
            let q0 = qb * nq_block;
            let nq = nq_block.min(lq - q0);
            let q_ptr = q.data[q.offset + bi * q.strides[0] + q0 * q.strides[1] + hi * q.strides[2]..].as_ptr();
            let k_ptr = k.data[k.offset + bi * k.strides[0] + hi * k.strides[2]..].as_ptr();
            let v_ptr = v.data[v.offset + bi * v.strides[0] + hi * v.strides[2]..].as_ptr();
            // SAFETY: `view` checked that every (l, d) element of each view lies in its
            // buffer; s holds nq×lk; the output block (rows q0.., columns hi·d..) is this
            // task's alone and lies inside `out`.
            unsafe {
                gemm::gemm(
                    nq,
                    lk,
                    d,
                    s.as_mut_ptr(),
                    1,
                    lk as isize,
                    false,
                    q_ptr,
                    1,
                    q.strides[1] as isize,
                    k_ptr,
                    k.strides[1] as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            softmax_rows(&mut s[..nq * lk], lk);
            let o_ptr = out_ptr.get().wrapping_add(((bi * lq + q0) * h + hi) * d);
            unsafe {
                gemm::gemm(
                    nq,
                    d,
                    lk,
                    o_ptr,
                    1,
                    (h * d) as isize,
                    false,
                    s.as_ptr(),
                    1,
                    lk as isize,
                    v_ptr,
                    1,
                    v.strides[1] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    // SAFETY: see above.
    unsafe { buf.assume_init() }
}

/// Softmax of each `lk`-long row of `s`. Rows shorter than a vector (SAM's image-to-token
/// attention has 7 keys) take one exponential pass over the whole block, which
/// vectorises; row by row their exponentials were scalar, 80% of that attention's time.
fn softmax_rows(s: &mut [f32], lk: usize) {
    if lk >= 16 {
        for row in s.chunks_exact_mut(lk) {
            softmax_in_place(row);
        }
        return;
    }
    for row in s.chunks_exact_mut(lk) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        for x in row.iter_mut() {
            *x -= m;
        }
    }
    exp_in_place(s);
    for row in s.chunks_exact_mut(lk) {
        let inv = 1.0 / row.iter().sum::<f32>();
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `v ← exp(v)`, 16 lanes at a time where the CPU has AVX-512.
fn exp_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::math::has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { exp_in_place_avx512(v) };
    }
    for x in v.iter_mut() {
        *x = exp_f32(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_in_place_avx512(v: &mut [f32]) {
    use std::arch::x86_64::*;
    let (p, n) = (v.as_mut_ptr(), v.len());
    for j in (0..n).step_by(16) {
        let k = crate::math::lanes16(j, n);
        // SAFETY: the lanes of `k` lie inside `v`.
        unsafe {
            let x = _mm512_maskz_loadu_ps(k, p.add(j));
            _mm512_mask_storeu_ps(p.add(j), k, crate::math::exp_x16(x));
        }
    }
}

/// `row ← softmax(row)` in 16 AVX-512 lanes: max, exponentials and their sum, scale.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_in_place_avx512(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let (p, n) = (row.as_mut_ptr(), row.len());
    // SAFETY (all blocks): each step's lanes lie inside `row`.
    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
    for j in (0..n).step_by(16) {
        let k = crate::math::lanes16(j, n);
        mx = _mm512_mask_max_ps(mx, k, mx, unsafe { _mm512_maskz_loadu_ps(k, p.add(j)) });
    }
    let m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    let mut acc = _mm512_setzero_ps();
    for j in (0..n).step_by(16) {
        let k = crate::math::lanes16(j, n);
        let e = crate::math::exp_x16(_mm512_sub_ps(unsafe { _mm512_maskz_loadu_ps(k, p.add(j)) }, m));
        unsafe { _mm512_mask_storeu_ps(p.add(j), k, e) };
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(acc));
    for j in (0..n).step_by(16) {
        let k = crate::math::lanes16(j, n);
        unsafe {
            let x = _mm512_maskz_loadu_ps(k, p.add(j));
            _mm512_mask_storeu_ps(p.add(j), k, _mm512_mul_ps(x, inv));
        }
    }
}

/// `row ← softmax(row)`, vectorisable (16 lanes of max and sum).
#[inline]
fn softmax_in_place(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::math::has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { softmax_in_place_avx512(row) };
    }
    let mut mx = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in mx.iter_mut().zip(c) {
            *m = m.max(x);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), |a, &b| a.max(b));
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact_mut(16);
    for c in &mut chunks {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = exp_f32(*x - m);
            *a += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - m);
        sum += *x;
    }
    let inv = 1.0 / (sum + acc.iter().sum::<f32>());
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn softmax_rows_are_accurate_at_every_length() {
        // Short rows (the block pass), full vectors, masked tails, a -inf (masked) key.
        for lk in [1usize, 7, 16, 37, 300, 7172] {
            let rows = 3;
            let mut state = 12345u32 ^ lk as u32;
            let mut s: Vec<f32> = (0..rows * lk)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (state >> 8) as f32 / (1u32 << 24) as f32 * 60.0 - 30.0
                })
                .collect();
            if lk > 1 {
                s[1] = f32::NEG_INFINITY;
            }
            let want: Vec<f64> = s
                .chunks(lk)
                .flat_map(|r| {
                    let m = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                    let e: Vec<f64> = r.iter().map(|&x| (x as f64 - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    e.into_iter().map(move |v| v / sum)
                })
                .collect();
            softmax_rows(&mut s, lk);
            for (i, (g, w)) in s.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= 4e-6 * w + 1e-8, "lk {lk} [{i}]: {g} vs {w}");
            }
            if lk > 1 {
                assert_eq!(s[1], 0.0, "a -inf score gets no weight");
            }
        }
    }

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        // [B, L, H, D] -> [B, H, L, D], plain composition in f64.
        let t = |x: &Tensor| x.transpose(1, 2)?.contiguous()?.to_dtype(DType::F64);
        let (q, k, v) = (t(q)?, t(k)?, t(v)?);
        let d = q.dim(3)? as f64;
        let s = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / d.sqrt())?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        p.matmul(&v)?.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)
    }

    #[test]
    fn strided_views_match_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, lq, lk, heads, d): windows, pooled queries, a long key set over blocks.
        for &(b, lq, lk, h, d) in &[
            (3, 16, 16, 2, 8),
            (2, 16, 64, 1, 12),
            (1, 300, 1100, 2, 16),
            (2, 40, 196, 2, 24),
            (1, 5, 7, 3, 1),
        ] {
            let qkv = Tensor::randn(0f32, 1.0, (b, lk, 3, h, d), &dev)?;
            let k = qkv.narrow(2, 1, 1)?.squeeze(2)?;
            let v = qkv.narrow(2, 2, 1)?.squeeze(2)?;
            let q = if lq == lk {
                qkv.narrow(2, 0, 1)?.squeeze(2)?
            } else {
                (Tensor::randn(0f32, 1.0, (b, lq, h, d), &dev)? * 3.0)?
            };
            let got = attention_blhd(&q, &k, &v)?;
            let want = reference(&q, &k, &v)?;
            let err = crate::testing::max_abs_diff(&got, &want)?;
            assert!(err < 1e-5, "({b},{lq},{lk},{h},{d}): max diff {err}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_the_composition() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        for &(b, lq, lk, h, d) in &[(2, 16, 16, 2, 8), (1, 300, 1100, 2, 16), (2, 9, 40, 3, 5)] {
            let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, lk, 3, h, d), &dev)?)?;
            let qp = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, lq, h, d), &dev)? * 2.0)?)?;
            let up = Tensor::randn(0f32, 1.0, (b, lq, h, d), &dev)?;
            let parts = |t: &Tensor| -> candle_core::Result<(Tensor, Tensor, Tensor)> {
                let k = t.narrow(2, 1, 1)?.squeeze(2)?;
                let v = t.narrow(2, 2, 1)?.squeeze(2)?;
                let q = if lq == lk {
                    t.narrow(2, 0, 1)?.squeeze(2)?
                } else {
                    qp.as_tensor().clone()
                };
                Ok((q, k, v))
            };
            let (q, k, v) = parts(qkv.as_tensor())?;
            let got = (attention_blhd(&q, &k, &v)? * &up)?.sum_all()?.backward()?;
            // The f64 composition on the same variables.
            let q64 = Var::from_tensor(&qp.as_tensor().to_dtype(DType::F64)?)?;
            let qkv64 = Var::from_tensor(&qkv.as_tensor().to_dtype(DType::F64)?)?;
            let k64 = qkv64.as_tensor().narrow(2, 1, 1)?.squeeze(2)?;
            let v64 = qkv64.as_tensor().narrow(2, 2, 1)?.squeeze(2)?;
            let qq64 = if lq == lk {
                qkv64.as_tensor().narrow(2, 0, 1)?.squeeze(2)?
            } else {
                q64.as_tensor().clone()
            };
            let t = |x: &Tensor| x.transpose(1, 2)?.contiguous();
            let s = (t(&qq64)?.matmul(&t(&k64)?.transpose(2, 3)?.contiguous()?)? / (d as f64).sqrt())?;
            let o = candle_nn::ops::softmax(&s, D::Minus1)?
                .matmul(&t(&v64)?)?
                .transpose(1, 2)?;
            let want = (o * up.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
            let pairs = [(qkv.as_tensor(), qkv64.as_tensor()), (qp.as_tensor(), q64.as_tensor())];
            for (ours, theirs) in pairs.iter().take(if lq == lk { 1 } else { 2 }) {
                let g = got.get(ours).expect("gradient");
                let r = want.get(theirs).unwrap().to_dtype(DType::F32)?;
                let err = crate::testing::max_abs_diff(g, &r)?;
                assert!(err < 1e-4, "({b},{lq},{lk},{h},{d}): gradient max diff {err}");
            }
        }
        // Frozen k and v: only dq.
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 8, 2, 4), &dev)?)?;
        let kv = Tensor::randn(0f32, 1.0, (1, 8, 2, 4), &dev)?;
        let g = attention_blhd(q.as_tensor(), &kv, &kv)?.sum_all()?.backward()?;
        assert!(g.get(q.as_tensor()).is_some() && g.get(&kv).is_none());
        Ok(())
    }

    #[test]
    fn packed_qkv_matches_the_views_forward_and_backward() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        for &(b, l, lq, h, d) in &[(3, 16, 16, 2, 8), (2, 64, 16, 1, 12), (1, 300, 300, 2, 16)] {
            let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, l, 3, h, d), &dev)?)?;
            let pooled = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, lq, h, d), &dev)?)?;
            let up = Tensor::randn(0f32, 1.0, (b, lq, h, d), &dev)?;
            let part = |i: usize| qkv.as_tensor().narrow(2, i, 1).and_then(|t| t.squeeze(2));
            let pool = (lq != l).then(|| pooled.as_tensor());
            let q_view = match pool {
                Some(q) => q.clone(),
                None => part(0)?,
            };
            let want_o = attention_blhd(&q_view, &part(1)?, &part(2)?)?;
            let got_o = attention_qkv(qkv.as_tensor(), pool)?;
            assert!(crate::testing::max_abs_diff(&got_o, &want_o)? < 1e-6);
            // Untracked inputs give the same values without a graph.
            let plain = attention_qkv(&qkv.as_tensor().detach(), pool.map(|q| q.detach()).as_ref())?;
            assert!(crate::testing::max_abs_diff(&plain, &want_o)? < 1e-6);
            let want = (want_o * &up)?.sum_all()?.backward()?;
            let got = (got_o * &up)?.sum_all()?.backward()?;
            let mut vars = vec![qkv.as_tensor()];
            if pool.is_some() {
                vars.push(pooled.as_tensor());
            }
            for v in vars {
                let err = crate::testing::max_abs_diff(got.get(v).unwrap(), want.get(v).unwrap())?;
                assert!(err < 1e-5, "({b},{l},{lq},{h},{d}): gradient diff {err}");
            }
        }
        let qkv = Tensor::zeros((1, 4, 2, 2, 8), DType::F32, &dev)?;
        assert!(attention_qkv(&qkv, None).is_err());
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((1, 4, 2, 4), DType::F32, &dev)?;
        assert!(attention_blhd(&q, &k, &k).is_err());
        assert!(attention_blhd(&q.to_dtype(DType::F64)?, &q, &q).is_err());
        assert!(attention_blhd(&q.reshape((4, 2, 8))?, &q, &q).is_err());
        Ok(())
    }
}
