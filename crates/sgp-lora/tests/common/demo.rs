//! Real lesion slices from the committed demo scans (`datasets/demo`, pyradiomics test
//! cases), cropped around the lesion and resampled to a small square.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets/demo")
}

fn read_volume(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
    let obj = ReaderOptions::new()
        .read_file(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let arr = obj.into_volume().into_ndarray::<f32>().unwrap();
    let shape = arr.shape().to_vec();
    // (x, y, z) indexing; keep a flat copy in x-fastest order.
    let (nx, ny, nz) = (shape[0], shape[1], shape[2]);
    let mut flat = vec![0f32; nx * ny * nz];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                flat[x + nx * (y + ny * z)] = arr[[x, y, z].as_slice()];
            }
        }
    }
    (shape, flat)
}

/// One sample: RGB-like image `[3, s, s]` in [0, 1], its mask `[s, s]` and the lesion's
/// box `[x0, y0, x1, y1]` in pixels.
pub struct Sample {
    pub image: Tensor,
    pub mask: Tensor,
    pub bbox: [f32; 4],
}

/// The `count` slices with the largest lesion area of `case`, each cropped to a square
/// twice the lesion's extent and resampled (nearest) to `s`×`s`; intensities min-max
/// normalised per crop.
pub fn lesion_slices(case: &str, count: usize, s: usize) -> Vec<Sample> {
    let dir = demo_dir();
    let (shape, img) = read_volume(&dir.join(format!("imagesTr/{case}_0000.nii.gz")));
    let (lshape, lbl) = read_volume(&dir.join(format!("labelsTr/{case}.nii.gz")));
    assert_eq!(shape, lshape, "{case}: image and label shapes differ");
    let (nx, ny, nz) = (shape[0], shape[1], shape[2]);
    let at = |v: &[f32], x: usize, y: usize, z: usize| v[x + nx * (y + ny * z)];
    let mut by_area: Vec<(usize, usize)> = (0..nz)
        .map(|z| {
            (
                (0..ny)
                    .flat_map(|y| (0..nx).map(move |x| (x, y)))
                    .filter(|&(x, y)| at(&lbl, x, y, z) > 0.5)
                    .count(),
                z,
            )
        })
        .collect();
    by_area.sort_by(|a, b| b.cmp(a));
    by_area
        .into_iter()
        .take(count)
        .filter(|&(area, _)| area > 0)
        .map(|(_, z)| {
            let (mut x0, mut y0, mut x1, mut y1) = (nx, ny, 0, 0);
            for y in 0..ny {
                for x in 0..nx {
                    if at(&lbl, x, y, z) > 0.5 {
                        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                    }
                }
            }
            let side = (2 * (x1 - x0 + 1).max(y1 - y0 + 1)).max(16) as f64;
            let (cx, cy) = ((x0 + x1) as f64 / 2.0, (y0 + y1) as f64 / 2.0);
            let sample_xy = |i: usize, j: usize| {
                let x = (cx - side / 2.0 + (j as f64 + 0.5) * side / s as f64)
                    .floor()
                    .clamp(0.0, (nx - 1) as f64);
                let y = (cy - side / 2.0 + (i as f64 + 0.5) * side / s as f64)
                    .floor()
                    .clamp(0.0, (ny - 1) as f64);
                (x as usize, y as usize)
            };
            let mut pix = Vec::with_capacity(s * s);
            let mut mask = Vec::with_capacity(s * s);
            for i in 0..s {
                for j in 0..s {
                    let (x, y) = sample_xy(i, j);
                    pix.push(at(&img, x, y, z));
                    mask.push(if at(&lbl, x, y, z) > 0.5 { 1f32 } else { 0f32 });
                }
            }
            let (lo, hi) = pix.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let pix: Vec<f32> = pix.iter().map(|v| (v - lo) / (hi - lo).max(1e-6)).collect();
            let (mut bx0, mut by0, mut bx1, mut by1) = (s as f32, s as f32, 0f32, 0f32);
            for (k, &m) in mask.iter().enumerate() {
                if m > 0.5 {
                    let (x, y) = ((k % s) as f32, (k / s) as f32);
                    (bx0, by0, bx1, by1) = (bx0.min(x), by0.min(y), bx1.max(x + 1.0), by1.max(y + 1.0));
                }
            }
            let gray = Tensor::from_vec(pix, (1, s, s), &Device::Cpu).unwrap();
            Sample {
                image: Tensor::cat(&[&gray, &gray, &gray], 0).unwrap(),
                mask: Tensor::from_vec(mask, (s, s), &Device::Cpu).unwrap(),
                bbox: [bx0, by0, bx1, by1],
            }
        })
        .collect()
}
