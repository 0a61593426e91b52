//! PMA + hierarchical decoder cost beside SAM2's decoder alone, at S = 512 and 1024
//! (hiera_t heads, random weights; the trunk is not run: the inputs are PMG-shaped
//! random tensors). Forward (inference: no autograd) and forward + backward (trainable
//! head, gradient also into `F'`), median wall time and peak heap growth per step.
//!
//! `cargo bench -p sgp-pma --bench sgp_head` (`-- --quick` for one timed run per step).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sgp_pma::{HeadDims, PmgParts, SgpHead, SgpHeadConfig};
use sgp_sam2::{PointInputs, Sam2Config, Sam2Model};

/// Counts live heap bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Seeded uniform weights for every tensor SAM2 asks for (norm weights near 1).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        let t = Tensor::rand(-1f32, 1f32, s, dev)?;
        let t = if name.contains("norm") && name.ends_with("weight") {
            ((t * 0.1)? + 1.0)?
        } else {
            (t / (fan_in as f64).sqrt())?
        };
        t.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn head_dims(cfg: &Sam2Config) -> HeadDims {
    HeadDims {
        hidden_dim: cfg.hidden_dim(),
        num_mask_tokens: 4,
        use_high_res_features: cfg.use_high_res_features_in_sam,
    }
}

/// Median seconds and peak heap growth (MiB) of `f` over `runs` runs after one warm-up.
fn measure(runs: usize, f: &mut dyn FnMut()) -> (f64, f64) {
    f();
    let mut times = Vec::with_capacity(runs);
    let mut peak = 0usize;
    for _ in 0..runs {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
        peak = peak.max(PEAK.load(Ordering::Relaxed).saturating_sub(base));
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], peak as f64 / (1024.0 * 1024.0))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dev = Device::Cpu;
    for preset in ["sam2.1_hiera_t", "sam2.1_hiera_b+"] {
        let cfg = Sam2Config::preset(preset).expect("preset");
        let params = SgpHead::expected_parameters(&SgpHeadConfig::default(), head_dims(&cfg)).expect("params");
        let count = |p: &str| -> usize {
            params
                .iter()
                .filter(|(n, _)| n.starts_with(p))
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        println!(
            "{preset}: PMA {} + decoder {} = {} parameters",
            count("pma."),
            count("decoder."),
            count("")
        );
    }
    println!("| S | step | SAM2 decoder alone | SGP head (PMA + SAM2 decoder + stage 2) |");
    println!("|---|---|---|---|");
    for s in [512usize, 1024] {
        let runs = if quick {
            1
        } else if s == 512 {
            5
        } else {
            3
        };
        let cfg = Sam2Config::preset("sam2.1_hiera_t")
            .unwrap()
            .with_image_size(s)
            .unwrap();
        let model = Sam2Model::new(
            &cfg,
            VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone()),
        )
        .expect("model");
        let (e, c) = (s / 16, cfg.hidden_dim());
        let feat = Tensor::randn(0f32, 1.0, (1, c, e, e), &dev).unwrap();
        let f4 = Tensor::randn(0f32, 1.0, (1, c / 8, 4 * e, 4 * e), &dev).unwrap();
        let f8 = Tensor::randn(0f32, 1.0, (1, c / 4, 2 * e, 2 * e), &dev).unwrap();
        let image = Tensor::randn(0f32, 1.0, (1, 3, s, s), &dev).unwrap();
        // A square pseudo-mask covering the middle third.
        let q = s / 4;
        let low: Vec<f32> = (0..q * q)
            .map(|i| {
                let (y, x) = (i / q, i % q);
                if (q / 3..2 * q / 3).contains(&y) && (q / 3..2 * q / 3).contains(&x) {
                    5.0
                } else {
                    -5.0
                }
            })
            .collect();
        let low = Tensor::from_vec(low, (1, 1, q, q), &dev).unwrap();
        let high = sgp_kernels::resize::bilinear(&low, s, s, false).unwrap();
        let parts = |f: &Tensor| PmgParts {
            pix_feat_with_mem: f.clone(),
            pred_masks: low.clone(),
            pred_masks_high_res: high.clone(),
            object_score_logits: Tensor::ones((1, 1), DType::F32, &dev).unwrap(),
            high_res_feats: Some((f4.clone(), f8.clone())),
        };
        let heads = model.sam_heads();
        let (a, b) = (s as f32 / 3.0, 2.0 * s as f32 / 3.0);
        let pts = PointInputs {
            coords: Tensor::new(&[[[a, a], [b, b]]], &dev).unwrap(),
            labels: Tensor::new(&[[2f32, 3.0]], &dev).unwrap(),
        };
        let (trainable, varmap) = SgpHead::init(&SgpHeadConfig::default(), HeadDims::of(&model), &dev, 0).unwrap();
        let inference = trainable.detached().unwrap();
        // Away from the zero start, so the backward does all its work.
        if let Some(g) = varmap.data().lock().unwrap().get("pma.gamma") {
            g.set(&Tensor::new(&[0.5f32], &dev).unwrap()).unwrap();
        }

        let sam_fwd = measure(runs, &mut || {
            let _ = heads
                .forward(&feat, Some(&pts), None, Some((&f4, &f8)), heads.multimask(false))
                .unwrap();
        });
        let head_fwd = measure(runs, &mut || {
            let _ = inference.forward(&model, &parts(&feat), &image).unwrap();
        });
        let fv = Var::from_tensor(&feat).unwrap();
        let sam_bwd = measure(runs, &mut || {
            let o = heads
                .forward(
                    fv.as_tensor(),
                    Some(&pts),
                    None,
                    Some((&f4, &f8)),
                    heads.multimask(false),
                )
                .unwrap();
            let _ = o.high_res_masks.mean_all().unwrap().backward().unwrap();
        });
        let head_bwd = measure(runs, &mut || {
            let o = trainable.forward(&model, &parts(fv.as_tensor()), &image).unwrap();
            let _ = o.final_logits.mean_all().unwrap().backward().unwrap();
        });
        let cell = |(t, m): (f64, f64)| format!("{:.0} ms, peak +{:.0} MiB", t * 1e3, m);
        println!("| {s} | forward | {} | {} |", cell(sam_fwd), cell(head_fwd));
        println!("| {s} | forward + backward | {} | {} |", cell(sam_bwd), cell(head_bwd));
    }
}
