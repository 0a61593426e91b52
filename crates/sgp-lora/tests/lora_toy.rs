//! LoRA on a small Hiera-shaped stack of `AdaptableLinear`s: identity at init, q/v
//! slicing, merge/unmerge, gradients, save/load, training.

mod common;

use candle_core::{DType, Module, Tensor, Var};
use candle_nn::Optimizer;
use common::{assert_bit_identical, snapshot, values, Rng, ToyModel};
use sgp_kernels::testing::max_abs_diff;
use sgp_lora::{count_trainable, HieraDims, Lora, LoraConfig, LoraError, Target};
use sgp_sam2::AdaptableModel;

/// Widths like a mini Hiera: a stage change in block 1 and block 3.
const DIMS: [(usize, usize); 4] = [(8, 8), (8, 16), (16, 16), (16, 32)];

fn input(dtype: DType, seed: u64) -> Tensor {
    Rng::new(seed).tensor(&[2, 5, 8], 1.0, dtype)
}

/// Gives every B random values, so the adapters actually change the model.
fn randomise_b(lora: &Lora, seed: u64, scale: f64) {
    let mut rng = Rng::new(seed);
    for a in lora.adapters() {
        for c in a.chunks() {
            let t = rng.tensor(c.b.dims(), scale, c.b.dtype());
            c.b.set(&t).unwrap();
        }
    }
}

#[test]
fn fresh_adapters_leave_the_output_exactly_unchanged() {
    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    let x = input(DType::F32, 2);
    let before = model.forward(&x).unwrap();
    let config =
        LoraConfig::new(4, 8.0).with_targets(vec![Target::hiera_qv(), Target::hiera_attn_proj(), Target::hiera_mlp()]);
    let lora = Lora::attach(&mut model, config).unwrap();
    assert_eq!(lora.layers().len(), 4 * 4);
    let after = model.forward(&x).unwrap();
    assert_bit_identical(&before, &after, "fresh adapters vs none");

    // A is U(-1/sqrt(in), 1/sqrt(in)) and not degenerate; B is zero.
    for a in lora.adapters() {
        let bound = 1.0 / (a.layer().in_dim as f64).sqrt();
        for c in a.chunks() {
            let av = values(c.a.as_tensor());
            assert!(av.iter().all(|v| v.abs() <= bound));
            assert!(av.iter().map(|v| v.abs()).fold(0.0, f64::max) > 0.5 * bound);
            assert!(values(c.b.as_tensor()).iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn initialisation_is_reproducible_by_seed() {
    let a_of = |seed| {
        let mut model = ToyModel::new(&DIMS, 1, DType::F32);
        let lora = Lora::attach(&mut model, LoraConfig::new(2, 2.0).with_seed(seed)).unwrap();
        lora.adapters()
            .flat_map(|a| a.chunks().iter().map(|c| values(c.a.as_tensor())).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    assert_eq!(a_of(5), a_of(5));
    assert_ne!(a_of(5), a_of(6));
}

#[test]
fn qv_targets_change_q_and_v_rows_only_including_width_changes() {
    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    let lora = Lora::attach(&mut model, LoraConfig::new(3, 3.0)).unwrap();
    // Only the qkv layers, each with a q and a v adapter of [3, dim] and [dim_out, 3].
    assert_eq!(lora.layers().len(), DIMS.len());
    let expected: usize = DIMS.iter().map(|(d, o)| 2 * 3 * (d + o)).sum();
    assert_eq!(lora.num_trainable_params(), expected);
    randomise_b(&lora, 3, 0.5);
    for (i, &(dim, dim_out)) in DIMS.iter().enumerate() {
        let layer = &model.blocks[i].qkv;
        let x = Rng::new(10 + i as u64).tensor(&[1, 4, dim], 1.0, DType::F32);
        let delta = (layer.forward(&x).unwrap() - layer.forward_base(&x).unwrap()).unwrap();
        let part = |c: usize| values(&delta.narrow(2, c * dim_out, dim_out).unwrap());
        assert!(part(0).iter().any(|&v| v != 0.0), "block {i}: q unchanged");
        assert!(part(1).iter().all(|&v| v == 0.0), "block {i}: k must not change");
        assert!(part(2).iter().any(|&v| v != 0.0), "block {i}: v unchanged");
    }
}

#[test]
fn merge_matches_the_adapted_model_and_unmerge_restores_exactly() {
    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    let original = snapshot(&model.weights());
    let x = input(DType::F32, 2);
    let config = LoraConfig::new(4, 8.0).with_targets(vec![Target::hiera_qv(), Target::hiera_mlp()]);
    let mut lora = Lora::attach(&mut model, config).unwrap();
    randomise_b(&lora, 4, 0.3);
    let adapted = model.forward(&x).unwrap();
    // The same base model without adapters.
    let base_out = ToyModel::new(&DIMS, 1, DType::F32).forward(&x).unwrap();
    assert!(
        max_abs_diff(&adapted, &base_out).unwrap() > 1e-3,
        "the randomised adapters must matter"
    );

    lora.merge(&mut model).unwrap();
    assert!(lora.is_merged());
    assert!(model.adaptable_linears_mut().iter().all(|(_, l)| l.adapter().is_none()));
    let merged = model.forward(&x).unwrap();
    let err = max_abs_diff(&merged, &adapted).unwrap();
    assert!(err < 1e-5, "merged vs adapted: {err}");
    assert!(matches!(lora.merge(&mut model), Err(LoraError::AlreadyMerged)));

    lora.unmerge(&mut model).unwrap();
    assert_eq!(
        snapshot(&model.weights()),
        original,
        "unmerge must restore the exact base weights"
    );
    assert_bit_identical(&model.forward(&x).unwrap(), &adapted, "after unmerge");
    assert!(matches!(lora.unmerge(&mut model), Err(LoraError::NotMerged)));

    // Merge, then detach: back to the plain base model.
    lora.merge(&mut model).unwrap();
    lora.detach(&mut model).unwrap();
    assert_eq!(snapshot(&model.weights()), original);
    assert!(model.adaptable_linears_mut().iter().all(|(_, l)| l.adapter().is_none()));
    assert_bit_identical(&model.forward(&x).unwrap(), &base_out, "after detach");
}

#[test]
fn attaching_twice_or_matching_nothing_are_errors() {
    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    let _lora = Lora::attach(&mut model, LoraConfig::new(2, 2.0)).unwrap();
    assert!(matches!(
        Lora::attach(&mut model, LoraConfig::new(2, 2.0)),
        Err(LoraError::AlreadyAdapted { .. })
    ));
    let mut fresh = ToyModel::new(&DIMS, 1, DType::F32);
    let typo = LoraConfig::new(2, 2.0).with_targets(vec!["**.atn.qkv[q,v]".parse().unwrap()]);
    assert!(matches!(
        Lora::attach(&mut fresh, typo),
        Err(LoraError::NoMatchingLayer { .. })
    ));
    assert!(matches!(
        Lora::attach(&mut fresh, LoraConfig::new(0, 2.0)),
        Err(LoraError::InvalidConfig(_))
    ));
    assert!(matches!(
        Lora::attach(&mut fresh, LoraConfig::new(2, 2.0).with_dropout(1.0)),
        Err(LoraError::InvalidConfig(_))
    ));
    // A failed attach leaves the model without adapters.
    assert!(fresh.adaptable_linears_mut().iter().all(|(_, l)| l.adapter().is_none()));
}

#[test]
fn dropout_acts_in_training_mode_only() {
    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    let lora = Lora::attach(&mut model, LoraConfig::new(4, 4.0).with_dropout(0.5)).unwrap();
    randomise_b(&lora, 5, 0.5);
    let x = input(DType::F32, 2);
    assert!(!lora.is_train());
    let eval1 = values(&model.forward(&x).unwrap());
    assert_eq!(eval1, values(&model.forward(&x).unwrap()), "eval mode is deterministic");
    lora.set_train(true);
    let t1 = values(&model.forward(&x).unwrap());
    let t2 = values(&model.forward(&x).unwrap());
    assert_ne!(t1, t2, "dropout must act in training mode");
    lora.set_train(false);
    assert_eq!(eval1, values(&model.forward(&x).unwrap()));
}

/// Autograd gradients of A and B match central differences (f64).
#[test]
fn gradients_match_finite_differences_on_a_linear_stack() {
    let mut model = ToyModel::new(&DIMS, 1, DType::F64);
    let config = LoraConfig::new(2, 4.0).with_targets(vec![Target::hiera_qv(), Target::hiera_mlp()]);
    let lora = Lora::attach(&mut model, config).unwrap();
    lora.set_train(true);
    // With B = 0 the gradient of A is exactly 0; give B values so both are tested.
    randomise_b(&lora, 6, 0.3);
    let x = input(DType::F64, 2);
    let weights = Rng::new(9).tensor(&[2, 5, 32], 1.0, DType::F64);
    let loss = || {
        (model.forward(&x).unwrap() * &weights)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let vars: Vec<(String, Var)> = {
        let data = lora.varmap().data().lock().unwrap();
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(vars.len(), 4 * 2 * 2 + 4 * 2 * 2);
    let (worst, nonzero) = common::gradcheck::check(&vars, &loss, 1e-6, 3, 1e-6);
    eprintln!("linear stack LoRA gradcheck: worst relative error {worst:.2e}, {nonzero} non-zero");
    assert!(worst < 1e-4, "worst relative error {worst:.3e}");
    assert!(
        nonzero == vars.len() * 3,
        "every checked gradient entry must be non-zero ({nonzero})"
    );
    // The base weights get no gradient: they are constants, not variables.
    let grads = loss().backward().unwrap();
    for w in model.weights() {
        assert!(grads.get(&w).is_none());
    }
}

/// Fits a regression target with AdamW on the adapters only; the base stays byte-identical.
#[test]
fn training_lowers_the_loss_and_leaves_the_base_untouched() {
    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    let base = snapshot(&model.weights());
    let x = Rng::new(20).tensor(&[4, 6, 8], 1.0, DType::F32);
    // The target: another model's output (a different base), so a fit is possible only
    // through the adapters.
    let target = ToyModel::new(&DIMS, 2, DType::F32).forward(&x).unwrap();
    let config = LoraConfig::new(4, 8.0).with_targets(vec![Target::hiera_qv(), Target::hiera_mlp()]);
    let lora = Lora::attach(&mut model, config).unwrap();
    lora.set_train(true);
    let mut opt = candle_nn::AdamW::new(
        lora.varmap().all_vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mse = || {
        (model.forward(&x).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let first = mse().to_scalar::<f32>().unwrap();
    for _ in 0..100 {
        opt.backward_step(&mse()).unwrap();
    }
    let last = mse().to_scalar::<f32>().unwrap();
    eprintln!("toy regression: loss {first:.4} -> {last:.4}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert_eq!(
        snapshot(&model.weights()),
        base,
        "base weights must be byte-identical after training"
    );
}

/// `count_trainable` agrees with what `attach` creates on a model of the same shape.
#[test]
fn count_trainable_matches_an_attached_model() {
    let dims = HieraDims {
        embed_dim: 8,
        stages: vec![1, 2, 2],
        dim_mul: 2.0,
        mlp_ratio: 2.0,
    };
    let mut model = ToyModel::new(&dims.block_dims(), 3, DType::F32);
    for targets in [
        vec![Target::hiera_qv()],
        vec![Target::hiera_qkv()],
        vec![Target::hiera_qv(), Target::hiera_attn_proj(), Target::hiera_mlp()],
    ] {
        let config = LoraConfig::new(4, 4.0).with_targets(targets);
        let lora = Lora::attach(&mut model, config.clone()).unwrap();
        assert_eq!(lora.num_trainable_params(), count_trainable(&dims, &config).unwrap());
        lora.detach(&mut model).unwrap();
    }
}
