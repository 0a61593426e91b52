//! Masked attention for PMA (probabilistic mask attention), fused and differentiable.
//!
//! Given `q` `[B,H,Lq,D]`, `k`, `v` `[B,H,Lk,D]` and a probability map `p` over the keys
//! (`[B,Lk]`, shared by every query, or `[B,Lq,Lk]`, one row per query; values in `[0,1]`),
//! the attention logits are `q·kᵀ·scale + bias` with `scale = 1/√D` unless overridden and
//!
//! - [`MaskMode::Soft`] (default): `bias = ln(max(p, eps))` — the map grades each key's
//!   importance, and `p = 1` leaves a key's logit unchanged;
//! - [`MaskMode::Hard`] (Mask2Former): keys with `p < 0.5` are excluded (`bias = -inf`). A
//!   query row whose keys are *all* excluded falls back to unmasked attention (no NaN).
//!
//! [`QueryScaling`] optionally multiplies each output row by the query position's `p`
//! (the element-wise product of the paper's eq. 7); see its docs for where that `p` comes
//! from.
//!
//! [`masked_attention`] runs the fused kernel (CPU; CUDA under feature `cuda`): a tiled
//! online softmax whose memory is O(L·D), never materialising the `Lq×Lk` scores.
//! [`naive_masked_attention`] is the exact reference built from candle ops
//! (matmul, add bias, differentiable softmax, matmul); the tests hold the two together.
//!
//! Gradients: `q`, `k`, `v` always. `p` gets a gradient in soft mode (`∂bias/∂p = 1/p` where
//! `p > eps`, else 0) and through query scaling; in hard mode the mask is a step function, so
//! the attention itself passes no gradient to `p`. PMA feeds a detached pseudo-mask, so this
//! is a bonus, not a requirement.
//!
//! Computation is f32; f16/bf16/f64 inputs are converted and the result is returned in
//! `q`'s dtype.
//!
//! Autograd design: one `CustomOp3` over `(q, kv, p)`, where `kv = cat([k, v], -1)` (so a
//! three-input op still sees and differentiates all four tensors; the copy is O(L·D)).
//! When a gradient is needed the op returns `[B,H,Lq,D+1]` whose last column is the row
//! log-sum-exp, which the wrapper narrows away; the backward recomputes the probabilities
//! from it (FlashAttention-2), so nothing O(L²) is ever stored. Query scaling is a plain
//! broadcast multiply outside the op, so its gradient comes from candle.
//!
//! CUDA (feature `cuda`, `kernels/masked_attention.cu`): kernels for D ∈ {32, 64, 128,
//! 256}; other head sizes on a CUDA device take [`naive_masked_attention`]. The CUDA path
//! was compiled to SASS with NVRTC/nvJitLink (`tools/kernels/nvrtc_check.py`) and its
//! kernels emulated lane by lane in numpy (`tools/kernels/cuda_emulate.py`), but it has not
//! yet run on a GPU: `tools/kernels/cuda_check.sh` is the check to run on one.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(target_arch = "x86_64")]
mod plain_avx512;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, D};

use crate::{Error, Result};

/// Keys with `p` below this are excluded in [`MaskMode::Hard`].
pub const HARD_THRESHOLD: f32 = 0.5;

/// Default floor of `p` before the log in [`MaskMode::Soft`]: `ln(1e-6) ≈ -13.8` is enough to
/// silence a key next to typical logits while staying far from f32 underflow.
pub const DEFAULT_EPS: f32 = 1e-6;

/// How the probability map acts on the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskMode {
    /// Add `ln(max(p, eps))` to the logits. `eps` must be finite and `> 0`.
    Soft {
        /// Floor of `p` before the log (bounds the bias of a zero-probability key).
        eps: f32,
    },
    /// Exclude keys with `p < 0.5`; rows with no key left attend to every key.
    Hard,
}

impl Default for MaskMode {
    fn default() -> Self {
        MaskMode::Soft { eps: DEFAULT_EPS }
    }
}

/// Optional scaling of each output row by a per-query probability.
#[derive(Clone, Copy, Debug, Default)]
pub enum QueryScaling<'a> {
    /// No scaling.
    #[default]
    Off,
    /// Self-attention: `p` must be `[B,Lk]` with `Lq == Lk`, and output row `i` is multiplied
    /// by `p[b, i]` (the same map that masks the keys). Rejected for `[B,Lq,Lk]` maps, whose
    /// per-query value is ambiguous.
    FromKeyMap,
    /// An explicit query map `[B,Lq]` (cross-attention, or a query map that differs from the
    /// key map). It receives gradients like any input.
    Map(&'a Tensor),
}

/// Options of [`masked_attention`] and [`naive_masked_attention`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MaskedAttentionOptions<'a> {
    /// Soft key bias or hard key mask.
    pub mode: MaskMode,
    /// Logit scale; `None` means `1/√D`.
    pub softmax_scale: Option<f32>,
    /// Whether (and by which map) output rows are scaled.
    pub query_scaling: QueryScaling<'a>,
}

/// Checked sizes of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub p_per_query: bool,
}

fn shape_err(msg: String) -> Error {
    Error::Shape(format!("masked_attention: {msg}"))
}

fn validate(q: &Tensor, k: &Tensor, v: &Tensor, p: &Tensor, opts: &MaskedAttentionOptions) -> Result<Dims> {
    let (b, h, lq, d) = q
        .dims4()
        .map_err(|_| shape_err(format!("q must be [B,H,Lq,D], got {:?}", q.dims())))?;
    let (kb, kh, lk, kd) = k
        .dims4()
        .map_err(|_| shape_err(format!("k must be [B,H,Lk,D], got {:?}", k.dims())))?;
    if (kb, kh, kd) != (b, h, d) {
        return Err(shape_err(format!("k {:?} does not match q {:?}", k.dims(), q.dims())));
    }
    if v.dims() != k.dims() {
        return Err(shape_err(format!(
            "v {:?} must have k's shape {:?}",
            v.dims(),
            k.dims()
        )));
    }
    if d == 0 || lk == 0 {
        return Err(shape_err(format!("D and Lk must be positive, got D={d}, Lk={lk}")));
    }
    let p_per_query = match p.dims() {
        [pb, pl] if (*pb, *pl) == (b, lk) => false,
        [pb, pq, pl] if (*pb, *pq, *pl) == (b, lq, lk) => true,
        other => {
            return Err(shape_err(format!(
                "p must be [B,Lk]=[{b},{lk}] or [B,Lq,Lk]=[{b},{lq},{lk}], got {other:?}"
            )))
        }
    };
    for (name, t) in [("q", q), ("k", k), ("v", v), ("p", p)] {
        if !t.dtype().is_float() {
            return Err(Error::Unsupported(format!(
                "masked_attention: {name} has dtype {:?}, need a float",
                t.dtype()
            )));
        }
        if !t.device().same_device(q.device()) {
            return Err(Error::Unsupported(format!(
                "masked_attention: {name} is on another device than q"
            )));
        }
    }
    if let MaskMode::Soft { eps } = opts.mode {
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::Unsupported(format!(
                "masked_attention: soft-mode eps must be finite and > 0, got {eps}"
            )));
        }
    }
    if let Some(s) = opts.softmax_scale {
        if !s.is_finite() {
            return Err(Error::Unsupported(format!(
                "masked_attention: softmax_scale must be finite, got {s}"
            )));
        }
    }
    match opts.query_scaling {
        QueryScaling::Off => {}
        QueryScaling::FromKeyMap => {
            if p_per_query || lq != lk {
                return Err(shape_err(format!(
                    "QueryScaling::FromKeyMap needs a [B,Lk] map and Lq == Lk (got p {:?}, Lq={lq}, Lk={lk}); pass QueryScaling::Map",
                    p.dims()
                )));
            }
        }
        QueryScaling::Map(m) => {
            if m.dims() != [b, lq] {
                return Err(shape_err(format!(
                    "query map must be [B,Lq]=[{b},{lq}], got {:?}",
                    m.dims()
                )));
            }
            if !m.device().same_device(q.device()) || !m.dtype().is_float() {
                return Err(Error::Unsupported(
                    "masked_attention: query map must be a float tensor on q's device".into(),
                ));
            }
        }
    }
    Ok(Dims {
        b,
        h,
        lq,
        lk,
        d,
        p_per_query,
    })
}

fn softmax_scale(opts: &MaskedAttentionOptions, d: usize) -> f32 {
    opts.softmax_scale.unwrap_or(1.0 / (d as f32).sqrt())
}

/// Multiplies output rows by the query-side probability, if asked (`out`: `[B,H,Lq,D]` f32).
fn apply_query_scaling(out: Tensor, p: &Tensor, dims: &Dims, opts: &MaskedAttentionOptions) -> Result<Tensor> {
    let qp = match opts.query_scaling {
        QueryScaling::Off => return Ok(out),
        QueryScaling::FromKeyMap => p.clone(),
        QueryScaling::Map(m) => m.clone(),
    };
    let qp = qp.to_dtype(out.dtype())?.reshape((dims.b, 1, dims.lq, 1))?;
    Ok(out.broadcast_mul(&qp)?)
}

/// Fused masked attention (see the module docs). Differentiable w.r.t. `q`, `k`, `v`, `p`
/// (soft mode) and the query map.
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &Tensor,
    opts: &MaskedAttentionOptions,
) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    let dims = validate(q, k, v, p, opts)?;
    let _span = tracing::trace_span!(
        "masked_attention",
        b = dims.b,
        h = dims.h,
        lq = dims.lq,
        lk = dims.lk,
        d = dims.d
    )
    .entered();
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && !cuda::SUPPORTED_D.contains(&dims.d) {
        // Kernels exist for the head sizes SAM2/PMA use; others take the exact slow path.
        return naive_masked_attention(q, k, v, p, opts);
    }
    let out_dtype = q.dtype();
    let q32 = q.to_dtype(DType::F32)?.contiguous()?;
    let k32 = k.to_dtype(DType::F32)?;
    let v32 = v.to_dtype(DType::F32)?;
    let p32 = p.to_dtype(DType::F32)?.contiguous()?;
    // K and V travel as one [B,H,Lk,2D] tensor so that one CustomOp3 sees q, k, v *and* p
    // (and hands back gradients for all four); the copy is O(L·D), noise next to O(L²·D).
    let kv = Tensor::cat(&[&k32, &v32], 3)?.contiguous()?;
    let track = q32.track_op() || kv.track_op() || p32.track_op();
    let op = FusedMaskedAttention {
        dims,
        mode: opts.mode,
        scale: softmax_scale(opts, dims.d),
        with_lse: track,
    };
    let out = if track {
        // The op appends the row log-sum-exp as column D for its backward; hide it.
        q32.apply_op3(&kv, &p32, op)?.narrow(3, 0, dims.d)?
    } else {
        q32.apply_op3_no_bwd(&kv, &p32, &op)?
    };
    let out = apply_query_scaling(out, &p32, &dims, opts)?;
    Ok(out.to_dtype(out_dtype)?)
}

/// Plain attention `softmax(q kᵀ/√D) v` for inference: the tiled online-softmax kernel
/// without a key map, and with values of their own width. `q` `[B,H,Lq,D]`, `k`
/// `[B,H,Lk,D]`, `v` `[B,H,Lk,Dv]`; returns `[B,H,Lq,Dv]`.
///
/// Narrower values are what make it worth having: when `v` is an affine projection of
/// narrow inputs (SAM2's memory attention projects 64-channel memories to 256), attending
/// over the inputs and projecting the output gives the same result, because every
/// softmax row sums to one, in a quarter of the `P·V` work.
///
/// Untracked f32 CPU tensors only (it records no backward); training keeps
/// [`masked_attention`] or candle's ops.
pub fn attention_inference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    crate::require_untracked_cpu_f32("attention_inference", &[(q, "q"), (k, "k"), (v, "v")])?;
    let (b, h, lq, d) = q
        .dims4()
        .map_err(|_| shape_err(format!("q must be [B,H,Lq,D], got {:?}", q.dims())))?;
    let (kb, kh, lk, kd) = k
        .dims4()
        .map_err(|_| shape_err(format!("k must be [B,H,Lk,D], got {:?}", k.dims())))?;
    let (vb, vh, vlk, dv) = v
        .dims4()
        .map_err(|_| shape_err(format!("v must be [B,H,Lk,Dv], got {:?}", v.dims())))?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vlk) != (b, h, lk) {
        return Err(shape_err(format!(
            "q {:?}, k {:?} and v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if lk == 0 {
        return Err(shape_err("attention over zero keys".into()));
    }
    let op = PlainAttention {
        b,
        h,
        lq,
        lk,
        d,
        dv,
        scale: 1.0 / (d as f32).sqrt(),
    };
    #[cfg(target_arch = "x86_64")]
    if crate::math::has_avx512() {
        return Ok(q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?);
    }
    let kv = Tensor::cat(&[k, v], 3)?.contiguous()?;
    Ok(q.contiguous()?.apply_op2_no_bwd(&kv, &op)?)
}

/// The forward-only op of [`attention_inference`]: over `(q, cat(k, v))` through the
/// general kernel, or over `(q, k, v)` on AVX-512 CPUs (`plain_avx512`: no packing, no
/// `cat`).
#[derive(Clone, Copy)]
struct PlainAttention {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f32,
}

impl CustomOp2 for PlainAttention {
    fn name(&self) -> &'static str {
        "sgp-plain-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Self {
            b,
            h,
            lq,
            lk,
            d,
            dv,
            scale,
        } = *self;
        check_shape(l1, &Shape::from((b, h, lq, d)), "q")?;
        check_shape(l2, &Shape::from((b, h, lk, d + dv)), "kv")?;
        // A zero bias per key: plain attention through the masked kernel's tiles.
        let bias = vec![0f32; b * lk];
        let pr = cpu::Problem {
            b,
            h,
            lq,
            lk,
            d,
            dv,
            scale,
            q: cpu_f32(s1, l1, "q")?,
            kv: cpu_f32(s2, l2, "kv")?,
            bias: &bias,
            bias_per_query: false,
        };
        Ok((CpuStorage::F32(cpu::forward(&pr, false)), Shape::from((b, h, lq, dv))))
    }
}

#[cfg(target_arch = "x86_64")]
impl candle_core::CustomOp3 for PlainAttention {
    fn name(&self) -> &'static str {
        "sgp-plain-attention-avx512"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Self {
            b, h, lq, lk, d, dv, ..
        } = *self;
        check_shape(l1, &Shape::from((b, h, lq, d)), "q")?;
        check_shape(l2, &Shape::from((b, h, lk, d)), "k")?;
        check_shape(l3, &Shape::from((b, h, lk, dv)), "v")?;
        let pr = plain_avx512::Plain {
            b,
            h,
            lq,
            lk,
            d,
            dv,
            scale: self.scale,
            q: cpu_f32(s1, l1, "q")?,
            k: cpu_f32(s2, l2, "k")?,
            v: cpu_f32(s3, l3, "v")?,
        };
        let out = plain_avx512::forward(&pr);
        Ok((CpuStorage::F32(out), Shape::from((b, h, lq, dv))))
    }
}

/// The exact reference: matmul, add bias, softmax, matmul, all candle ops (differentiable
/// through `candle_nn::ops::softmax`). Memory O(Lq·Lk). Same semantics and options as
/// [`masked_attention`]; computes in the inputs' dtype if it is f32/f64, else in f32.
pub fn naive_masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &Tensor,
    opts: &MaskedAttentionOptions,
) -> Result<Tensor> {
    let dims = validate(q, k, v, p, opts)?;
    let out_dtype = q.dtype();
    let dt = if matches!(out_dtype, DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let (q, k, v, pf) = (q.to_dtype(dt)?, k.to_dtype(dt)?, v.to_dtype(dt)?, p.to_dtype(dt)?);
    let scale = softmax_scale(opts, dims.d) as f64;
    let logits = (q.matmul(&k.t()?)? * scale)?;
    // Bias as [B,1,Lq or 1,Lk], broadcast over heads (and queries for a key map).
    let p4 = if dims.p_per_query {
        pf.unsqueeze(1)?
    } else {
        pf.unsqueeze(1)?.unsqueeze(1)?
    };
    let bias = match opts.mode {
        MaskMode::Soft { eps } => p4.maximum(eps as f64)?.log()?,
        MaskMode::Hard => {
            let kept = p4.ge(HARD_THRESHOLD as f64)?;
            let any_kept = kept.to_dtype(dt)?.max_keepdim(D::Minus1)?;
            // Kept, or the whole row is excluded (fallback to plain attention).
            let allowed = kept.to_dtype(dt)?.broadcast_maximum(&any_kept.affine(-1.0, 1.0)?)?;
            let zeros = allowed.zeros_like()?;
            let neg_inf = Tensor::full(f64::NEG_INFINITY, allowed.shape(), allowed.device())?.to_dtype(dt)?;
            allowed.ge(0.5)?.where_cond(&zeros, &neg_inf)?
        }
    };
    let logits = logits.broadcast_add(&bias)?;
    let attn = candle_nn::ops::softmax(&logits, D::Minus1)?;
    let out = attn.matmul(&v.contiguous()?)?;
    let pq = match opts.query_scaling {
        QueryScaling::Map(m) => m.to_dtype(dt)?,
        _ => pf.clone(),
    };
    let out = apply_query_scaling(out, &pq, &dims, opts)?;
    Ok(out.to_dtype(out_dtype)?)
}

/// The fused op over `(q, kv, p)`; see [`masked_attention`].
struct FusedMaskedAttention {
    dims: Dims,
    mode: MaskMode,
    scale: f32,
    /// Append the row log-sum-exp as column `D` (needed by the backward).
    with_lse: bool,
}

impl FusedMaskedAttention {
    fn out_shape(&self) -> Shape {
        let Dims { b, h, lq, d, .. } = self.dims;
        Shape::from((b, h, lq, d + usize::from(self.with_lse)))
    }

    fn kv_shape(&self) -> Shape {
        let Dims { b, h, lk, d, .. } = self.dims;
        Shape::from((b, h, lk, 2 * d))
    }

    fn p_shape(&self) -> Shape {
        let Dims {
            b, lq, lk, p_per_query, ..
        } = self.dims;
        if p_per_query {
            Shape::from((b, lq, lk))
        } else {
            Shape::from((b, lk))
        }
    }
}

/// The contiguous f32 data of a CPU tensor's storage.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("masked_attention: {what} must be contiguous"),
    }
}

fn check_shape(l: &Layout, want: &Shape, what: &str) -> candle_core::Result<()> {
    if l.shape() != want {
        candle_core::bail!(
            "masked_attention: {what} has shape {:?}, expected {:?}",
            l.shape(),
            want
        )
    }
    Ok(())
}

impl CustomOp3 for FusedMaskedAttention {
    fn name(&self) -> &'static str {
        "sgp-masked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims {
            b,
            h,
            lq,
            lk,
            d,
            p_per_query,
        } = self.dims;
        check_shape(l1, &Shape::from((b, h, lq, d)), "q")?;
        check_shape(l2, &self.kv_shape(), "kv")?;
        check_shape(l3, &self.p_shape(), "p")?;
        let (q, kv, p) = (cpu_f32(s1, l1, "q")?, cpu_f32(s2, l2, "kv")?, cpu_f32(s3, l3, "p")?);
        let bias = cpu::prepare_bias(p, lk, self.mode);
        let pr = cpu::Problem {
            b,
            h,
            lq,
            lk,
            d,
            dv: d,
            scale: self.scale,
            q,
            kv,
            bias: &bias,
            bias_per_query: p_per_query,
        };
        let out = cpu::forward(&pr, self.with_lse);
        Ok((CpuStorage::F32(out), self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let Dims { b, h, lq, d, .. } = self.dims;
        check_shape(l1, &Shape::from((b, h, lq, d)), "q")?;
        check_shape(l2, &self.kv_shape(), "kv")?;
        check_shape(l3, &self.p_shape(), "p")?;
        let out = cuda::forward(self, s1, l1, s2, l2, s3, l3)?;
        Ok((out, self.out_shape()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        p: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !self.with_lse {
            candle_core::bail!("masked_attention: backward needs the forward's log-sum-exp");
        }
        let Dims {
            b,
            h,
            lq,
            lk,
            d,
            p_per_query,
        } = self.dims;
        let want_dp = p.track_op() && matches!(self.mode, MaskMode::Soft { .. });
        let q = q.detach().contiguous()?;
        let kv = kv.detach().contiguous()?;
        let p = p.detach().contiguous()?;
        let res = res.detach().contiguous()?;
        let dout = grad_res.detach().narrow(3, 0, d)?.contiguous()?.to_dtype(DType::F32)?;
        let (dq, dkv, dbias) = match q.device() {
            Device::Cpu => {
                let (qs, ql) = q.storage_and_layout();
                let (kvs, kvl) = kv.storage_and_layout();
                let (ps, pl) = p.storage_and_layout();
                let (rs, rl) = res.storage_and_layout();
                let (gs, gl) = dout.storage_and_layout();
                let (Storage::Cpu(qs), Storage::Cpu(kvs), Storage::Cpu(ps), Storage::Cpu(rs), Storage::Cpu(gs)) =
                    (&*qs, &*kvs, &*ps, &*rs, &*gs)
                else {
                    candle_core::bail!("masked_attention: backward inputs must all be on the CPU");
                };
                let p_data = cpu_f32(ps, pl, "p")?;
                let bias = cpu::prepare_bias(p_data, lk, self.mode);
                let pr = cpu::Problem {
                    b,
                    h,
                    lq,
                    lk,
                    d,
                    dv: d,
                    scale: self.scale,
                    q: cpu_f32(qs, ql, "q")?,
                    kv: cpu_f32(kvs, kvl, "kv")?,
                    bias: &bias,
                    bias_per_query: p_per_query,
                };
                let saved = cpu::Saved {
                    out_lse: cpu_f32(rs, rl, "res")?,
                    dout: cpu_f32(gs, gl, "grad")?,
                };
                let g = cpu::backward(&pr, &saved, want_dp);
                let dq = Tensor::from_vec(g.dq, (b, h, lq, d), &Device::Cpu)?;
                let dkv = Tensor::from_vec(g.dkv, (b, h, lk, 2 * d), &Device::Cpu)?;
                let dbias = match g.dbias {
                    Some(db) => Some(Tensor::from_vec(db, self.p_shape(), &Device::Cpu)?),
                    None => None,
                };
                (dq, dkv, dbias)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => cuda::backward(self, &q, &kv, &p, &res, &dout, want_dp)?,
            other => candle_core::bail!("masked_attention: no kernel for device {other:?}"),
        };
        // ∂ln(max(p, eps))/∂p = 1/p where p > eps (0 below; ties are measure-zero).
        let dp = match (dbias, self.mode) {
            (Some(db), MaskMode::Soft { eps }) => {
                let above = p.gt(eps as f64)?;
                let inv = p.maximum(eps as f64)?.recip()?;
                Some(above.where_cond(&(db * inv)?, &p.zeros_like()?)?)
            }
            _ => None,
        };
        Ok((Some(dq), Some(dkv), dp))
    }
}
