//! Exact squared Euclidean distance transform on a C-order grid with anisotropic spacing.
//!
//! Felzenszwalb & Huttenlocher's separable algorithm ("Distance Transforms of Sampled
//! Functions", 2012): one 1-D lower-envelope-of-parabolas pass per axis, each pass weighting
//! index distances by that axis' squared spacing. The result is the exact squared distance in
//! mm² to the nearest site (no chamfer approximation), the quantity SciPy's
//! `distance_transform_edt(..., sampling=spacing)` returns squared.

use rayon::prelude::*;

/// Columns gathered together for strided axes, so that memory is read in whole cache lines.
const TILE: usize = 16;
/// Blocks smaller than this are not worth handing to another thread.
const PARALLEL_MIN_VOXELS: usize = 1 << 16;

/// Squared distance (mm²) from every voxel to the nearest `true` of `sites`; `f64::INFINITY`
/// everywhere when there is no site. `dist` is resized to the grid.
pub(crate) fn squared_edt(sites: &[bool], shape: &[usize], spacing: &[f64], dist: &mut Vec<f64>) {
    debug_assert_eq!(sites.len(), shape.iter().product::<usize>());
    debug_assert_eq!(shape.len(), spacing.len());
    dist.clear();
    dist.par_extend(sites.par_iter().map(|&s| if s { 0.0 } else { f64::INFINITY }));
    if dist.is_empty() {
        return;
    }
    let threads = rayon::current_num_threads();
    // The last axis is contiguous; doing it first makes the later strided passes see
    // finite values in most columns.
    for axis in (0..shape.len()).rev() {
        let n = shape[axis];
        let inner: usize = shape[axis + 1..].iter().product();
        let weight = spacing[axis] * spacing[axis];
        let block_len = n * inner;
        let n_blocks = dist.len() / block_len;
        let big = dist.len() >= PARALLEL_MIN_VOXELS;
        if inner == 1 {
            // Contiguous lines: hand out runs of whole lines.
            let lines_per_task = if big {
                (PARALLEL_MIN_VOXELS / 4).div_ceil(n).max(1)
            } else {
                n_blocks
            };
            dist.par_chunks_mut(lines_per_task * n).for_each(|chunk| {
                let mut scratch = Scratch::new(n);
                for line in chunk.chunks_mut(n) {
                    scratch.transform_in_place(line, weight);
                }
            });
        } else if !big || n_blocks >= 2 * threads {
            // Many independent blocks `[n][inner]`: one task per run of blocks.
            let blocks_per_task = if big {
                (PARALLEL_MIN_VOXELS / 4).div_ceil(block_len).max(1)
            } else {
                n_blocks
            };
            dist.par_chunks_mut(blocks_per_task * block_len).for_each(|chunk| {
                let mut scratch = Scratch::new(n);
                for block in chunk.chunks_mut(block_len) {
                    let mut rows: Vec<&mut [f64]> = block.chunks_mut(inner).collect();
                    transform_columns(&mut rows, weight, &mut scratch);
                }
            });
        } else {
            // Few large blocks (the first axis): split every block's columns between tasks.
            let n_parts = (4 * threads).min(inner.div_ceil(TILE)).max(1);
            let part_width = inner.div_ceil(n_parts).div_ceil(TILE) * TILE;
            let mut parts: Vec<Vec<&mut [f64]>> = Vec::new();
            for block in dist.chunks_mut(block_len) {
                let first = parts.len();
                for row in block.chunks_mut(inner) {
                    let mut rest: &mut [f64] = row;
                    let mut p = first;
                    while !rest.is_empty() {
                        let w = part_width.min(rest.len());
                        let (segment, tail) = std::mem::take(&mut rest).split_at_mut(w);
                        if parts.len() == p {
                            parts.push(Vec::with_capacity(n));
                        }
                        parts[p].push(segment);
                        rest = tail;
                        p += 1;
                    }
                }
            }
            parts.into_par_iter().for_each(|mut rows| {
                let mut scratch = Scratch::new(n);
                transform_columns(&mut rows, weight, &mut scratch);
            });
        }
    }
}

/// One axis pass over columns: `rows[q][i]` is element `q` of column `i` (all rows the same
/// width). Columns are gathered TILE at a time so that memory is read in whole cache lines.
fn transform_columns(rows: &mut [&mut [f64]], weight: f64, scratch: &mut Scratch) {
    let n = rows.len();
    let width_total = rows.first().map_or(0, |r| r.len());
    let mut tile = vec![0.0f64; n * TILE];
    let mut i0 = 0;
    while i0 < width_total {
        let width = TILE.min(width_total - i0);
        for (q, row) in rows.iter().enumerate() {
            tile[q * TILE..q * TILE + width].copy_from_slice(&row[i0..i0 + width]);
        }
        for j in 0..width {
            for q in 0..n {
                scratch.f[q] = tile[q * TILE + j];
            }
            if scratch.transform(weight) {
                for q in 0..n {
                    tile[q * TILE + j] = scratch.d[q];
                }
            }
        }
        for (q, row) in rows.iter_mut().enumerate() {
            row[i0..i0 + width].copy_from_slice(&tile[q * TILE..q * TILE + width]);
        }
        i0 += width;
    }
}

/// Buffers of the 1-D transform, reused across lines.
struct Scratch {
    f: Vec<f64>,
    d: Vec<f64>,
    /// Sites of the parabolas in the lower envelope.
    v: Vec<usize>,
    /// Boundaries between consecutive envelope parabolas.
    z: Vec<f64>,
}

impl Scratch {
    fn new(n: usize) -> Self {
        Scratch {
            f: vec![0.0; n],
            d: vec![0.0; n],
            v: vec![0; n],
            z: vec![0.0; n + 1],
        }
    }

    fn transform_in_place(&mut self, line: &mut [f64], weight: f64) {
        self.f.copy_from_slice(line);
        if self.transform(weight) {
            line.copy_from_slice(&self.d);
        }
    }

    /// `d[q] = min_p weight * (q - p)² + f[p]` over the finite `f[p]`. Returns false (and
    /// leaves `d` untouched) when every `f` is infinite: the line then stays infinite.
    fn transform(&mut self, weight: f64) -> bool {
        let (f, d, v, z) = (&self.f, &mut self.d, &mut self.v, &mut self.z);
        let n = f.len();
        let mut k = 0usize;
        let mut any = false;
        for q in 0..n {
            let fq = f[q];
            if fq == f64::INFINITY {
                continue;
            }
            if !any {
                any = true;
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                continue;
            }
            loop {
                let p = v[k];
                // Where the parabola of q starts to undercut the one of p; the integer part
                // (q² - p²) is exact in f64.
                let s = ((fq - f[p]) + weight * ((q * q) as f64 - (p * p) as f64)) / (2.0 * weight * (q - p) as f64);
                if s <= z[k] {
                    // z[0] is -inf, so k never goes below 0 here.
                    k -= 1;
                    continue;
                }
                k += 1;
                v[k] = q;
                z[k] = s;
                z[k + 1] = f64::INFINITY;
                break;
            }
        }
        if !any {
            return false;
        }
        let mut k = 0usize;
        for (q, dq) in d.iter_mut().enumerate() {
            let qf = q as f64;
            while z[k + 1] < qf {
                k += 1;
            }
            let off = qf - v[k] as f64;
            *dq = weight * off * off + f[v[k]];
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: the minimum over all sites of the spacing-weighted squared distance.
    fn brute(sites: &[bool], shape: &[usize], spacing: &[f64]) -> Vec<f64> {
        let coords = |mut i: usize| {
            let mut c = vec![0usize; shape.len()];
            for k in (0..shape.len()).rev() {
                c[k] = i % shape[k];
                i /= shape[k];
            }
            c
        };
        let site_coords: Vec<Vec<usize>> = (0..sites.len()).filter(|&i| sites[i]).map(coords).collect();
        (0..sites.len())
            .map(|i| {
                let c = coords(i);
                site_coords
                    .iter()
                    .map(|s| {
                        (0..shape.len())
                            .map(|k| ((c[k] as f64 - s[k] as f64) * spacing[k]).powi(2))
                            .sum::<f64>()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn matches_brute_force_on_random_grids() {
        let mut seed = 7u64;
        for (shape, spacing, density) in [
            (vec![17usize], vec![0.7], 0.1),
            (vec![9, 13], vec![1.0, 1.0], 0.05),
            (vec![11, 8], vec![0.3, 2.1], 0.02),
            (vec![7, 9, 20], vec![2.5, 0.8, 1.3], 0.01),
            (vec![5, 40, 3], vec![1.0, 0.5, 3.0], 0.003),
            // Above PARALLEL_MIN_VOXELS: the threaded paths.
            (vec![50, 40, 36], vec![0.9, 1.7, 2.2], 0.0005),
            (vec![300, 260], vec![0.6, 1.1], 0.0003),
        ] {
            let n: usize = shape.iter().product();
            let sites: Vec<bool> = (0..n).map(|_| lcg(&mut seed) < density).collect();
            let mut dist = Vec::new();
            squared_edt(&sites, &shape, &spacing, &mut dist);
            let want = brute(&sites, &shape, &spacing);
            for (i, (a, b)) in dist.iter().zip(&want).enumerate() {
                assert!(
                    (a == b) || (a - b).abs() <= 1e-9 * b.max(1.0),
                    "shape {shape:?} voxel {i}: edt {a} vs brute {b}"
                );
            }
        }
    }

    #[test]
    fn no_site_gives_infinity() {
        let mut dist = Vec::new();
        squared_edt(&[false; 12], &[3, 4], &[1.0, 2.0], &mut dist);
        assert!(dist.iter().all(|d| d.is_infinite()));
    }

    #[test]
    fn large_grid_parallel_path_matches_sequential_logic() {
        // 70x70x20 exceeds PARALLEL_MIN_VOXELS; two sites give a closed-form answer.
        let shape = [70usize, 70, 20];
        let spacing = [0.9, 1.1, 2.5];
        let mut sites = vec![false; 70 * 70 * 20];
        let idx = |c: [usize; 3]| (c[0] * 70 + c[1]) * 20 + c[2];
        sites[idx([3, 60, 2])] = true;
        sites[idx([66, 5, 17])] = true;
        let mut dist = Vec::new();
        squared_edt(&sites, &shape, &spacing, &mut dist);
        for c in [[0usize, 0, 0], [35, 35, 10], [69, 69, 19], [3, 60, 2], [10, 50, 5]] {
            let d = |s: [usize; 3]| {
                (0..3)
                    .map(|k| ((c[k] as f64 - s[k] as f64) * spacing[k]).powi(2))
                    .sum::<f64>()
            };
            let want = d([3, 60, 2]).min(d([66, 5, 17]));
            assert!((dist[idx(c)] - want).abs() < 1e-9, "{c:?}: {} vs {want}", dist[idx(c)]);
        }
    }
}
