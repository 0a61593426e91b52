//! End-to-end gradient check of the trainable SGP model on the reduced SAM2.1 fixture:
//! FE (Hiera + LoRA) → support memories → PMG → PMA → stage-1 decoder → stage-2 decoder,
//! autograd against central finite differences.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use sgp::augment::Rng;
use sgp::lora::LoraConfig;
use sgp::model::{state_dict_base, Ablation, SgpModel, SgpModelConfig, SupportGrad, TrainableConfig};
use sgp::sam2::Sam2Config;
use sgp_memory::SupportItem;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/sam2.1_reduced/s64/image_encoder_b2")
}

fn random(rng: &mut Rng, shape: &[usize], lo: f64, hi: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.range(lo, hi) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A blob mask `[64, 64]` centred at `(cy, cx)`.
fn blob(cy: f64, cx: f64, r: f64) -> Tensor {
    let v: Vec<f32> = (0..64 * 64)
        .map(|k| {
            let (y, x) = ((k / 64) as f64, (k % 64) as f64);
            f32::from(((y - cy).powi(2) + (x - cx).powi(2)).sqrt() < r)
        })
        .collect();
    Tensor::from_vec(v, (64, 64), &Device::Cpu).unwrap()
}

#[test]
fn gradients_through_the_whole_model_match_finite_differences() {
    let dir = fixture();
    let sam2 = Sam2Config::from_file(&dir.join("config.json")).unwrap();
    let sd = sgp::sam2::load_state_dict(&dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    let mut trainable = TrainableConfig::fine_tune();
    trainable.lora = Some(LoraConfig::new(2, 2.0));
    let cfg = SgpModelConfig {
        sam2,
        trainable,
        head: Default::default(),
        ablation: Ablation::default(),
        support_grad: SupportGrad::Full,
        seed: 3,
    };
    let model = SgpModel::new(cfg, &state_dict_base(sd), &Device::Cpu).unwrap();
    let vars: BTreeMap<String, Var> = model.trainable_vars().into_iter().collect();
    // Wake up every path: LoRA B and the head's zero-initialised γ and R output layer.
    let mut rng = Rng::new(17);
    for (name, v) in &vars {
        if name.contains("lora_B") {
            v.set(&random(&mut rng, v.dims(), -0.3, 0.3)).unwrap();
        }
        if name == "head.pma.gamma" {
            v.set(&Tensor::new(&[0.7f32], &Device::Cpu).unwrap()).unwrap();
        }
        if name.starts_with("head.decoder.out.") {
            v.set(&random(&mut rng, v.dims(), -0.5, 0.5)).unwrap();
        }
    }
    let image = random(&mut rng, &[3, 64, 64], -1.5, 1.5);
    let supports: Vec<SupportItem> = (0..2)
        .map(|k| SupportItem {
            image: random(&mut rng, &[3, 64, 64], -1.5, 1.5),
            masks: BTreeMap::from([(1, blob(24.0 + 8.0 * k as f64, 30.0, 12.0))]),
            case_id: format!("s{k}"),
        })
        .collect();
    let w_final = random(&mut rng, &[1, 1, 64, 64], -1.0, 1.0);
    let w_pseudo = random(&mut rng, &[1, 1, 64, 64], -1.0, 1.0);
    // A smooth scalar of both outputs (the clamps and thresholds of the real loss are
    // tested on their own in `loss`).
    // Also returns what must not change under a finite-difference step: the box (it is
    // discrete) and the signs of the object scores (SAM2 swaps a mask for −1024 at 0).
    let loss = || -> (Tensor, (Option<[f32; 4]>, Vec<bool>)) {
        let f = model.forward(&image, 1, &supports).unwrap();
        let pseudo = f.pseudo_logits.unwrap();
        let pmg_box = sgp_pma::box_from_pseudo_mask(&pseudo).unwrap()[0];
        let signs: Vec<bool> = f
            .object_scores
            .iter()
            .map(|s| s.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] > 0.0)
            .collect();
        let l = ((&f.final_logits * &w_final).unwrap().sum_all().unwrap()
            + (&pseudo * &w_pseudo).unwrap().sum_all().unwrap())
        .unwrap()
            / 64.0;
        (l.unwrap(), (pmg_box, signs))
    };
    let (l0, box0) = loss();
    assert!(
        box0.0.is_some(),
        "the pseudo-mask must give a box so that PMA and the decoder run"
    );
    let grads = l0.backward().unwrap();

    let groups = [
        "lora.image_encoder.trunk.blocks.1.attn.qkv.lora_A",
        "lora.image_encoder.trunk.blocks.0.attn.qkv.lora_B",
        "sam2.memory_encoder.",
        "sam2.memory_attention.layers.0.",
        "sam2.sam_mask_decoder.transformer.",
        "sam2.sam_prompt_encoder.",
        "head.pma.",
        "head.decoder.",
    ];
    let eps = 2e-3f64;
    let mut worst = 0f64;
    let mut checked = 0;
    for g in groups {
        let mut group: Vec<(&String, &Var)> = vars.iter().filter(|(n, _)| n.starts_with(g)).collect();
        assert!(!group.is_empty(), "no variable under {g}");
        // The two entries with the largest gradient in the group.
        let mut best: Vec<(f64, String, usize)> = Vec::new();
        for (n, v) in group.drain(..) {
            let Some(gr) = grads.get(v.as_tensor()) else { continue };
            let gv: Vec<f32> = gr.flatten_all().unwrap().to_vec1().unwrap();
            for (i, x) in gv.iter().enumerate() {
                best.push((x.abs() as f64, n.clone(), i));
            }
        }
        best.sort_by(|a, b| b.0.total_cmp(&a.0));
        assert!(best.first().is_some_and(|b| b.0 > 0.0), "no gradient reaches {g}");
        for (_, name, idx) in best.into_iter().take(2) {
            let v = &vars[&name];
            let g_auto = grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[idx] as f64;
            let orig = v.as_tensor().copy().unwrap();
            let base: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
            let at = |d: f64| {
                let mut p = base.clone();
                p[idx] += d as f32;
                v.set(&Tensor::from_vec(p, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let (l, b) = loss();
                assert_eq!(
                    b, box0,
                    "box or object-score sign changed under a finite-difference step on {name}"
                );
                l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            v.set(&orig).unwrap();
            let err = (g_auto - fd).abs() / g_auto.abs().max(fd.abs()).max(1e-3);
            eprintln!("{name}[{idx}]: autograd {g_auto:.6e}, finite difference {fd:.6e}, rel err {err:.2e}");
            worst = worst.max(err);
            checked += 1;
        }
    }
    eprintln!("end-to-end gradcheck: {checked} entries, worst relative error {worst:.2e}");
    // f32 forward passes with eps = 2e-3: about 1e-3 typical, 2e-2 at worst (memory
    // encoder). A missing or mis-scaled gradient path shows up as errors of order 1.
    assert!(worst < 3e-2, "worst relative error {worst}");
}
