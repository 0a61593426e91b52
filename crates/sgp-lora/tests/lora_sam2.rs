//! LoRA on sgp-sam2's real SAM2.1 model (reduced config, random weights): identity at
//! init, merge parity, gradients through the whole Hiera, and a training smoke test.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use common::demo::lesion_slices;
use common::sam2::{random_vb, tiny_sam2_config};
use common::{assert_bit_identical, snapshot, values, Rng};
use sgp_kernels::testing::max_abs_diff;
use sgp_lora::{count_trainable, HieraDims, Lora, LoraConfig, Target};
use sgp_sam2::AdaptableModel;
use sgp_sam2::ImageEncoder;
use sgp_sam2::{PromptInput, Sam2Model};

fn tiny_model() -> Sam2Model {
    Sam2Model::new(&tiny_sam2_config(), random_vb(11, DType::F32)).expect("tiny SAM2")
}

fn dims_of(model: &Sam2Model) -> HieraDims {
    HieraDims::from(&model.config().image_encoder.trunk)
}

/// Every base tensor LoRA could touch (all adaptable linears) plus the trunk's own.
fn base_tensors(model: &mut Sam2Model) -> Vec<Tensor> {
    let mut ts: Vec<Tensor> = model
        .adaptable_linears_mut()
        .into_iter()
        .flat_map(|(_, l)| [Some(l.weight().clone()), l.bias().cloned()])
        .flatten()
        .collect();
    let trunk = &model.image_encoder().trunk;
    ts.push(trunk.pos_embed.clone());
    ts.push(trunk.patch_embed.weight().clone());
    ts
}

struct Outputs {
    image_embed: Tensor,
    mask_logits: Tensor,
    iou: Tensor,
}

fn run(model: &Sam2Model, image: &Tensor) -> Outputs {
    let emb = model.encode_image(image).unwrap();
    let prompt = PromptInput {
        boxes: Some([8.0, 10.0, 40.0, 38.0]),
        ..Default::default()
    };
    let p = model.predict(&emb, &prompt, model.multimask(true)).unwrap();
    Outputs {
        image_embed: emb.image_embed,
        mask_logits: p.mask_logits,
        iou: p.iou_scores,
    }
}

fn randomise_b(lora: &Lora, seed: u64, scale: f64) {
    let mut rng = Rng::new(seed);
    for a in lora.adapters() {
        for c in a.chunks() {
            c.b.set(&rng.tensor(c.b.dims(), scale, c.b.dtype())).unwrap();
        }
    }
}

fn rgb01(seed: u64) -> Tensor {
    ((Rng::new(seed).tensor(&[3, 64, 64], 0.5, DType::F32) + 0.5).unwrap())
        .clamp(0f32, 1f32)
        .unwrap()
}

#[test]
fn sam2_with_fresh_adapters_is_bit_identical_and_merging_matches() {
    let mut model = tiny_model();
    let image = rgb01(3);
    let plain = run(&model, &image);
    let originals = snapshot(&base_tensors(&mut model));

    let config = LoraConfig::new(4, 8.0);
    let mut lora = Lora::attach(&mut model, config.clone()).unwrap();
    // One qkv per Hiera block, nothing in the SAM heads.
    let paths: Vec<String> = lora.layers().iter().map(|l| l.path.clone()).collect();
    assert_eq!(paths.len(), 6);
    assert!(paths
        .iter()
        .all(|p| p.starts_with("image_encoder.trunk.blocks.") && p.ends_with(".attn.qkv")));
    assert_eq!(
        lora.num_trainable_params(),
        count_trainable(&dims_of(&model), &config).unwrap()
    );

    let fresh = run(&model, &image);
    assert_bit_identical(&fresh.image_embed, &plain.image_embed, "fresh adapters: image_embed");
    assert_bit_identical(&fresh.mask_logits, &plain.mask_logits, "fresh adapters: mask_logits");
    assert_bit_identical(&fresh.iou, &plain.iou, "fresh adapters: iou");

    // In training mode the graph is tracked, so sgp-sam2 switches to its differentiable
    // softmax / layer norm: same function, other rounding.
    lora.set_train(true);
    let tracked = run(&model, &image);
    let err = max_abs_diff(&tracked.mask_logits, &plain.mask_logits).unwrap();
    eprintln!("fresh adapters, training mode: mask logits within {err:.2e} of the base model");
    assert!(err < 1e-4, "training-mode forward differs by {err}");
    lora.set_train(false);

    randomise_b(&lora, 4, 0.2);
    let adapted = run(&model, &image);
    assert!(
        max_abs_diff(&adapted.image_embed, &plain.image_embed).unwrap() > 1e-3,
        "the adapters must matter"
    );

    lora.merge(&mut model).unwrap();
    let merged = run(&model, &image);
    for (name, a, b) in [
        ("image_embed", &merged.image_embed, &adapted.image_embed),
        ("mask_logits", &merged.mask_logits, &adapted.mask_logits),
        ("iou", &merged.iou, &adapted.iou),
    ] {
        let err = max_abs_diff(a, b).unwrap();
        eprintln!("merged vs unmerged {name}: max abs diff {err:.2e}");
        assert!(err < 1e-5, "{name}: merged differs by {err}");
    }

    lora.unmerge(&mut model).unwrap();
    assert_bit_identical(&run(&model, &image).mask_logits, &adapted.mask_logits, "after unmerge");
    lora.detach(&mut model).unwrap();
    assert_eq!(snapshot(&base_tensors(&mut model)), originals);
    assert_bit_identical(&run(&model, &image).mask_logits, &plain.mask_logits, "after detach");
}

/// Every option (q/v, all of qkv, proj, MLP) on the real model matches the count.
#[test]
fn counts_match_the_real_model_for_every_target_option() {
    let mut model = tiny_model();
    let dims = dims_of(&model);
    for targets in [
        vec![Target::hiera_qv()],
        vec![Target::hiera_qkv()],
        vec![Target::hiera_attn_proj()],
        vec![Target::hiera_mlp()],
        vec![Target::hiera_qv(), Target::hiera_attn_proj(), Target::hiera_mlp()],
    ] {
        let config = LoraConfig::new(2, 2.0).with_targets(targets);
        let lora = Lora::attach(&mut model, config.clone()).unwrap();
        assert_eq!(lora.num_trainable_params(), count_trainable(&dims, &config).unwrap());
        lora.detach(&mut model).unwrap();
    }
}

fn lora_vars(lora: &Lora) -> Vec<(String, Var)> {
    let data = lora.varmap().data().lock().unwrap();
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Finite-difference check of the LoRA gradients through the image encoder built from
/// `cfg` (f64), on adapters of q/v and both MLP layers of every block.
fn gradcheck_image_encoder(cfg: &sgp_sam2::Sam2Config, through_neck: bool) -> (f64, usize, usize) {
    let mut encoder = ImageEncoder::new(&cfg.image_encoder, random_vb(11, DType::F64).pp("image_encoder")).unwrap();
    let config = LoraConfig::new(2, 4.0).with_targets(vec![Target::hiera_qv(), Target::hiera_mlp()]);
    let lora = Lora::attach(&mut encoder, config).unwrap();
    lora.set_train(true);
    randomise_b(&lora, 5, 0.3);
    // The input is a Var so that every op on the path is tracked: candle's fast
    // layer-norm kernel (used by sgp-sam2 for untracked inputs) has no f64 CPU version.
    let x = Var::from_tensor(&Rng::new(8).tensor(&[1, 3, 32, 32], 1.0, DType::F64)).unwrap();
    // The loss reads a high- and a low-resolution level: of the neck's output, or of
    // the trunk's when the neck cannot take the trunk's maps (no query pooling).
    let loss = || {
        let (hi, lo) = if through_neck {
            let out = encoder.forward(&x).unwrap();
            (out.backbone_fpn[0].clone(), out.vision_features)
        } else {
            let out = encoder.trunk.forward(&x).unwrap();
            (out[0].clone(), out[out.len() - 1].clone())
        };
        let m_hi = Rng::new(9).tensor(hi.dims(), 1.0, DType::F64);
        let m_lo = Rng::new(10).tensor(lo.dims(), 1.0, DType::F64);
        let a = (&hi * &m_hi).unwrap().sum_all().unwrap();
        let b = (&lo * &m_lo).unwrap().sqr().unwrap().sum_all().unwrap();
        (a + b).unwrap()
    };
    let vars = lora_vars(&lora);
    let depth: usize = cfg.image_encoder.trunk.stages.iter().sum();
    assert_eq!(vars.len(), depth * 2 * 2 + depth * 2 * 2);
    let (worst, nonzero) = common::gradcheck::check(&vars, &loss, 1e-5, 2, 1e-7);
    (worst, nonzero, vars.len() * 2)
}

/// Gradients reach every A and B through the whole tiny Hiera (windowed and global
/// attention, width changes with the shortcut projection, layer norms, softmax, GELU)
/// and match central finite differences in f64. Query pooling is off here (so the loss
/// reads the trunk: the FPN neck needs pooled maps); see the next test.
#[test]
fn gradients_through_the_image_encoder_match_finite_differences() {
    let mut cfg = tiny_sam2_config();
    cfg.image_encoder.trunk.q_pool = 0;
    let (worst, nonzero, checked) = gradcheck_image_encoder(&cfg, false);
    eprintln!(
        "image encoder (no q-pool) LoRA gradcheck: worst relative error {worst:.2e}, {nonzero}/{checked} non-zero"
    );
    assert!(worst < 1e-4, "worst relative error {worst:.3e}");
    assert_eq!(nonzero, checked, "every checked LoRA gradient entry must be non-zero");
}

/// The same check with SAM2's query pooling (`MaxPool2d` in the three stage-transition
/// blocks), through the FPN neck too. candle 0.11.1's `max_pool2d` backward scales the
/// gradient by 1/k² (`Op::MaxPool2D` in candle-core `src/backprop.rs`), so
/// `hiera::max_pool_nhwc` pools by reshape + max when its input is tracked; this test
/// guards that.
#[test]
fn gradients_through_query_pooling_match_finite_differences() {
    let (worst, nonzero, checked) = gradcheck_image_encoder(&tiny_sam2_config(), true);
    eprintln!("image encoder LoRA gradcheck: worst relative error {worst:.2e}, {nonzero}/{checked} non-zero");
    assert!(worst < 1e-4, "worst relative error {worst:.3e}");
}

fn dice_bce(logits: &Tensor, target: &Tensor) -> Tensor {
    let p = candle_nn::ops::sigmoid(logits).unwrap();
    let inter = (&p * target).unwrap().sum_all().unwrap();
    let denom = (p.sum_all().unwrap() + target.sum_all().unwrap()).unwrap();
    let dice = (1.0
        - ((inter * 2.0).unwrap() + 1.0)
            .unwrap()
            .div(&(denom + 1.0).unwrap())
            .unwrap())
    .unwrap();
    // Stable BCE with logits: max(x,0) - x·y + log(1 + exp(-|x|)).
    let bce = (logits.relu().unwrap() - (logits * target).unwrap()).unwrap();
    let bce = (bce
        + (logits.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .log()
            .unwrap())
    .unwrap();
    (dice + bce.mean_all().unwrap()).unwrap()
}

/// Box-prompted segmentation of real lesions (demo CT/MR slices), training only the
/// q/v adapters of the tiny Hiera with AdamW: the loss falls and every base weight is
/// byte-identical afterwards.
#[test]
fn training_the_adapters_segments_better_and_leaves_the_base_untouched() {
    let mut model = tiny_model();
    let originals = snapshot(&base_tensors(&mut model));
    // Real lesions: a lung CT, a brain MR and a breast MR slice from the demo scans.
    let samples: Vec<(Tensor, Tensor, [f32; 4])> = ["lung1", "brain1", "breast1"]
        .iter()
        .flat_map(|case| lesion_slices(case, 1, 64))
        .map(|s| (s.image, s.mask, s.bbox))
        .collect();
    assert_eq!(samples.len(), 3);
    let lora = Lora::attach(&mut model, LoraConfig::new(4, 8.0).with_seed(1)).unwrap();
    lora.set_train(true);
    let mut opt = candle_nn::AdamW::new(
        lora.varmap().all_vars(),
        candle_nn::ParamsAdamW {
            lr: 2e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let loss_of = |model: &Sam2Model| {
        let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for (img, mask, bbox) in &samples {
            let emb = model.encode_image(img).unwrap();
            let prompt = PromptInput {
                boxes: Some(*bbox),
                ..Default::default()
            };
            let logits = model
                .predict(&emb, &prompt, model.multimask(false))
                .unwrap()
                .mask_logits
                .squeeze(0)
                .unwrap();
            total = (total + dice_bce(&logits, mask)).unwrap();
        }
        (total / samples.len() as f64).unwrap()
    };

    // The gradient reaches the adapters through the mask decoder and the whole trunk.
    // At init B = 0, so A's gradient is exactly zero and B's must be non-zero.
    let first = loss_of(&model);
    let grads = first.backward().unwrap();
    let grad_max = |v: &Var| {
        grads
            .get(v.as_tensor())
            .map_or(0.0, |g| g.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
    };
    for (name, var) in lora_vars(&lora) {
        if name.contains(".lora_B.") {
            assert!(grad_max(&var) > 0.0, "no gradient reaches {name}");
        } else {
            assert_eq!(grad_max(&var), 0.0, "{name}: with B = 0 the gradient of A is zero");
        }
    }
    let a_before: Vec<Vec<f64>> = lora_vars(&lora).iter().map(|(_, v)| values(v.as_tensor())).collect();

    let first = first.to_scalar::<f32>().unwrap();
    let mut last = first;
    let start = std::time::Instant::now();
    for step in 0..20 {
        let loss = loss_of(&model);
        last = loss.to_scalar::<f32>().unwrap();
        if step % 5 == 0 {
            eprintln!("step {step}: loss {last:.4} ({:.2?} so far)", start.elapsed());
        }
        opt.backward_step(&loss).unwrap();
    }
    lora.set_train(false);
    let end = loss_of(&model).to_scalar::<f32>().unwrap();
    eprintln!("loss {first:.4} -> {end:.4} (last training step {last:.4})");
    assert!(end < 0.7 * first, "loss must fall: {first} -> {end}");
    for ((name, var), before) in lora_vars(&lora).iter().zip(&a_before) {
        assert_ne!(&values(var.as_tensor()), before, "{name} did not train");
    }
    assert_eq!(
        snapshot(&base_tensors(&mut model)),
        originals,
        "base weights must be byte-identical"
    );
}
