//! Scalar math shared by the CPU kernels of this crate and its users.

/// ln 2 split in two for an exact reduction `x − n·ln2` (Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `(e^r − 1 − r)/r²` on [−ln2/2, ln2/2], highest power first (Cephes' expf).
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `exp(x)` for f32, branch-free so the loops around it vectorise (the masked-attention
/// softmax, sgp-pma's GELU). Cephes-style: `x = n·ln2 + r`, degree-6 polynomial on `r`,
/// relative error ~2e-7 on [−87, 88]; 0 below −87
/// (`exp(-inf) = 0`), inputs above 88 are clamped.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to nearest integer
    let xc = x.clamp(-87.0, 88.0);
    // t = n + 1.5·2^23 with n = round(xc·log2 e); its low mantissa bits hold n, so 2^n is
    // built with wrapping integer ops (a saturating `as i32` cast would not vectorise).
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut y = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        y = y * r + c;
    }
    y = y * r * r + r + 1.0;
    let biased_exponent = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let pow2n = f32::from_bits(biased_exponent << 23);
    if x < -87.0 {
        0.0
    } else {
        y * pow2n
    }
}

/// `exp(x)` of 16 lanes: [`exp_f32`]'s reduction and polynomial with fused multiply-adds,
/// and `scalef` for the power of two, which flushes to 0 below e^-104 (the scalar form
/// flushes below e^-87; between the two the values are under 2e-38). −∞ gives 0, and
/// inputs above 88 are clamped. LLVM keeps [`exp_f32`] loops at 8 lanes on CPUs tuned to
/// prefer 256-bit vectors (Sapphire Rapids among them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp_x16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let splat = _mm512_set1_ps;
    let xc = _mm512_max_ps(_mm512_min_ps(x, splat(88.0)), splat(-104.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        xc,
        splat(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, splat(LN2_HI), xc);
    let r = _mm512_fnmadd_ps(n, splat(LN2_LO), r);
    let mut y = splat(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        y = _mm512_fmadd_ps(y, r, splat(c));
    }
    y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), splat(1.0));
    _mm512_scalef_ps(y, n)
}

/// The mask of a 16-lane step at `j` of a `len`-long row: all 16 lanes, or the tail's.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn lanes16(j: usize, len: usize) -> u16 {
    let left = len - j;
    if left >= 16 {
        u16::MAX
    } else {
        (1u16 << left) - 1
    }
}

/// Whether the 16-lane kernels can run (AVX-512F, detected once at run time).
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Independent accumulators of [`lane_sum`]: 16 f32, one or two vector registers.
const LANES: usize = 16;

/// `Σ f(x)` over a slice in [`LANES`] independent lanes, so the loop vectorises (a plain
/// iterator sum is one serial chain of adds: a 256-wide LayerNorm row spent most of its
/// time waiting on it). The lanes are combined pairwise at the end; like PyTorch's own
/// vectorised reductions, the order differs from a left-to-right sum by float rounding.
#[inline(always)]
pub fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += f(v);
    }
    reduce_lanes(acc)
}

/// The pairwise sum of the lanes.
#[inline(always)]
fn reduce_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}
