//! Seeded data augmentation for training: flips, a small rotation and scale (one affine
//! warp), and intensity changes (brightness, contrast, gamma).
//!
//! The geometric part is applied to the image (bilinear) and to the label map (nearest,
//! so labels never blend) with the *same* transform; the intensity part touches the image
//! only. Everything is driven by [`Rng`], a SplitMix64 whose whole state is one `u64`, so
//! a checkpoint can store it and a resumed run draws the same augmentations.

use ndarray::{Array2, Array3, Axis};

/// SplitMix64: tiny, well mixed, stable across dependency versions, and its state is a
/// single `u64` (checkpointed as is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    /// The whole generator state.
    pub state: u64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n.max(1) as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }

    /// A Fisher–Yates shuffle of `v`.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Which augmentations, and how strong.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentConfig {
    /// Probability of a horizontal flip.
    pub hflip: f64,
    /// Probability of a vertical flip.
    pub vflip: f64,
    /// Maximum rotation in degrees (uniform in ±).
    pub max_rotation_deg: f64,
    /// Scale drawn uniformly in `[1 − s, 1 + s]`.
    pub max_scale: f64,
    /// Brightness offset drawn in ±this (on `[0, 1]` intensities).
    pub brightness: f64,
    /// Contrast factor drawn in `[1 − c, 1 + c]` around the mean.
    pub contrast: f64,
    /// Gamma drawn in `[1 − g, 1 + g]`.
    pub gamma: f64,
}

impl Default for AugmentConfig {
    /// Mild settings that keep medical anatomy plausible.
    fn default() -> Self {
        Self {
            hflip: 0.5,
            vflip: 0.5,
            max_rotation_deg: 15.0,
            max_scale: 0.1,
            brightness: 0.1,
            contrast: 0.1,
            gamma: 0.2,
        }
    }
}

impl AugmentConfig {
    /// No augmentation at all (validation, tests).
    pub fn none() -> Self {
        Self {
            hflip: 0.0,
            vflip: 0.0,
            max_rotation_deg: 0.0,
            max_scale: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            gamma: 0.0,
        }
    }
}

/// One drawn set of augmentation parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Mirror left–right.
    pub hflip: bool,
    /// Mirror top–bottom.
    pub vflip: bool,
    /// Rotation in radians (counter-clockwise in image coordinates).
    pub rotation: f64,
    /// Zoom factor (> 1 enlarges the content).
    pub scale: f64,
    /// Added to intensities.
    pub brightness: f64,
    /// Contrast factor around the image mean.
    pub contrast: f64,
    /// Intensity exponent.
    pub gamma: f64,
}

impl AugmentParams {
    /// Draws parameters; always consumes the same number of random values, so the RNG
    /// position does not depend on the outcome.
    pub fn draw(cfg: &AugmentConfig, rng: &mut Rng) -> Self {
        let u: [f64; 7] = std::array::from_fn(|_| rng.uniform());
        let sym = |u: f64, a: f64| (2.0 * u - 1.0) * a;
        Self {
            hflip: u[0] < cfg.hflip,
            vflip: u[1] < cfg.vflip,
            rotation: sym(u[2], cfg.max_rotation_deg).to_radians(),
            scale: 1.0 + sym(u[3], cfg.max_scale),
            brightness: sym(u[4], cfg.brightness),
            contrast: 1.0 + sym(u[5], cfg.contrast),
            gamma: 1.0 + sym(u[6], cfg.gamma),
        }
    }

    /// Whether the warp is the identity (flips aside).
    fn warp_is_identity(&self) -> bool {
        self.rotation == 0.0 && self.scale == 1.0
    }
}

/// Applies `p` to a `[0, 1]` image `(C, H, W)` and its label map `(H, W)`: returns the
/// new pair. Pixels the warp brings in from outside become 0 (image and labels).
pub fn apply(image: &Array3<f32>, labels: &Array2<u16>, p: &AugmentParams) -> (Array3<f32>, Array2<u16>) {
    let (ch, h, w) = image.dim();
    let (mut img, mut lbl) = if p.warp_is_identity() {
        (image.clone(), labels.clone())
    } else {
        let lbl = warp_labels(labels, p.rotation, p.scale);
        let mut img = Array3::<f32>::zeros((ch, h, w));
        for c in 0..ch {
            let plane = warp_image(&image.index_axis(Axis(0), c).to_owned(), p.rotation, p.scale);
            img.index_axis_mut(Axis(0), c).assign(&plane);
        }
        (img, lbl)
    };
    if p.hflip {
        img.invert_axis(Axis(2));
        lbl.invert_axis(Axis(1));
    }
    if p.vflip {
        img.invert_axis(Axis(1));
        lbl.invert_axis(Axis(0));
    }
    if p.brightness != 0.0 || p.contrast != 1.0 || p.gamma != 1.0 {
        let mean = img.iter().map(|&v| v as f64).sum::<f64>() / (ch * h * w).max(1) as f64;
        img.mapv_inplace(|v| {
            let x = (mean + (v as f64 - mean) * p.contrast + p.brightness).clamp(0.0, 1.0);
            x.powf(p.gamma) as f32
        });
    }
    (img.as_standard_layout().to_owned(), lbl.as_standard_layout().to_owned())
}

/// The input position an output pixel `(r, c)` samples under rotation by `angle` and
/// zoom by `scale` about the centre (inverse mapping).
fn source(r: usize, c: usize, (h, w): (usize, usize), angle: f64, scale: f64) -> (f64, f64) {
    let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
    let (s, co) = angle.sin_cos();
    let (dy, dx) = (r as f64 - cy, c as f64 - cx);
    let sx = (co * dx + s * dy) / scale + cx;
    let sy = (-s * dx + co * dy) / scale + cy;
    (sy, sx)
}

/// Bilinear warp of one image plane.
fn warp_image(image: &Array2<f32>, angle: f64, scale: f64) -> Array2<f32> {
    let (h, w) = image.dim();
    Array2::from_shape_fn((h, w), |(r, c)| {
        let (sy, sx) = source(r, c, (h, w), angle, scale);
        if sx < 0.0 || sy < 0.0 || sx > (w - 1) as f64 || sy > (h - 1) as f64 {
            return 0.0;
        }
        let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (fx, fy) = ((sx - x0 as f64) as f32, (sy - y0 as f64) as f32);
        let top = image[[y0, x0]] * (1.0 - fx) + image[[y0, x1]] * fx;
        let bottom = image[[y1, x0]] * (1.0 - fx) + image[[y1, x1]] * fx;
        top * (1.0 - fy) + bottom * fy
    })
}

/// Nearest-neighbour warp of a label map (labels never blend).
fn warp_labels(labels: &Array2<u16>, angle: f64, scale: f64) -> Array2<u16> {
    let (h, w) = labels.dim();
    Array2::from_shape_fn((h, w), |(r, c)| {
        let (sy, sx) = source(r, c, (h, w), angle, scale);
        let (nr, nc) = (sy.round(), sx.round());
        if nr >= 0.0 && nc >= 0.0 && (nr as usize) < h && (nc as usize) < w {
            labels[[nr as usize, nc as usize]]
        } else {
            0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(h: usize, w: usize) -> (Array3<f32>, Array2<u16>) {
        let img = Array3::from_shape_fn((3, h, w), |(k, r, c)| {
            ((r * w + c) as f32) / (h * w) as f32 * (1.0 - 0.1 * k as f32)
        });
        let lbl = Array2::from_shape_fn((h, w), |(r, c)| u16::from((4..9).contains(&r) && (2..6).contains(&c)));
        (img, lbl)
    }

    #[test]
    fn rng_is_deterministic_and_resumable() {
        let mut a = Rng::new(7);
        let first: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let mut b = Rng::new(7);
        assert_eq!(first, (0..5).map(|_| b.next_u64()).collect::<Vec<_>>());
        let saved = a.clone();
        let mut c = Rng { state: saved.state };
        assert_eq!(a.next_u64(), c.next_u64());
        let mut v: Vec<usize> = (0..10).collect();
        Rng::new(3).shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(v, sorted);
    }

    #[test]
    fn flips_move_image_and_mask_together() {
        let (img, lbl) = pattern(12, 10);
        let p = AugmentParams {
            hflip: true,
            vflip: true,
            rotation: 0.0,
            scale: 1.0,
            brightness: 0.0,
            contrast: 1.0,
            gamma: 1.0,
        };
        let (i2, l2) = apply(&img, &lbl, &p);
        for r in 0..12 {
            for c in 0..10 {
                for k in 0..3 {
                    assert_eq!(i2[[k, r, c]], img[[k, 11 - r, 9 - c]]);
                }
                assert_eq!(l2[[r, c]], lbl[[11 - r, 9 - c]]);
            }
        }
    }

    #[test]
    fn warp_keeps_labels_aligned_with_the_image() {
        // The image is the label map itself (as f32): after any warp, wherever the warped
        // image is exactly 0 or 1 at a pixel centre sampled without blending, labels agree.
        let (_, lbl) = pattern(32, 32);
        let lbl = lbl;
        let img = lbl.mapv(|v| v as f32).insert_axis(Axis(0));
        let p = AugmentParams {
            hflip: false,
            vflip: false,
            rotation: 10f64.to_radians(),
            scale: 1.1,
            brightness: 0.0,
            contrast: 1.0,
            gamma: 1.0,
        };
        let (i2, l2) = apply(&img, &lbl, &p);
        let mut checked = 0;
        for (v, &l) in i2.iter().zip(l2.iter()) {
            if *v > 0.99 {
                assert_eq!(l, 1);
                checked += 1;
            }
            if *v < 0.01 {
                assert_eq!(l, 0);
            }
        }
        assert!(checked > 10, "the object must survive the warp");
        let area: usize = l2.iter().map(|&v| v as usize).sum();
        assert!((20..40).contains(&area), "area {area} should be about 20·1.21");
    }

    #[test]
    fn intensity_stays_in_range_and_draws_are_seeded() {
        let (img, lbl) = pattern(8, 8);
        let cfg = AugmentConfig::default();
        let a = AugmentParams::draw(&cfg, &mut Rng::new(5));
        let b = AugmentParams::draw(&cfg, &mut Rng::new(5));
        assert_eq!(a, b);
        let (i2, l2) = apply(&img, &lbl, &a);
        assert!(i2.iter().all(|v| (0.0..=1.0).contains(v)));
        assert_eq!(l2.iter().filter(|&&v| v > 1).count(), 0);
        let none = AugmentParams::draw(&AugmentConfig::none(), &mut Rng::new(1));
        let (i3, l3) = apply(&img, &lbl, &none);
        assert_eq!(i3, img);
        assert_eq!(l3, lbl);
    }
}
