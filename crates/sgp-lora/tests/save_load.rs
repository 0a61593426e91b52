//! Saving and loading adapters: round trip, metadata, and clear errors on the wrong base.

mod common;

use candle_core::{DType, Tensor};
use common::{assert_bit_identical, Rng, ToyModel};
use sgp_lora::{read_info, Lora, LoraConfig, LoraError, Target};
use sgp_sam2::AdaptableModel;

const DIMS: [(usize, usize); 3] = [(8, 8), (8, 16), (16, 16)];

fn trained_lora(model: &mut ToyModel) -> Lora {
    let config = LoraConfig::new(3, 6.0)
        .with_targets(vec![Target::hiera_qv(), Target::hiera_attn_proj()])
        .with_dropout(0.1)
        .with_seed(42);
    let lora = Lora::attach(model, config).unwrap();
    let mut rng = Rng::new(7);
    for a in lora.adapters() {
        for c in a.chunks() {
            c.b.set(&rng.tensor(c.b.dims(), 0.5, c.b.dtype())).unwrap();
        }
    }
    lora
}

#[test]
fn round_trip_restores_the_adapted_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapters.safetensors");
    let x = Rng::new(1).tensor(&[2, 3, 8], 1.0, DType::F32);

    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    let lora = trained_lora(&mut model);
    let adapted = model.forward(&x).unwrap();
    lora.save(&path, "toy-base").unwrap();
    // Atomic write: only the final file is left in the folder.
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("adapters.safetensors")]);

    let info = read_info(&path).unwrap();
    assert_eq!(info.config, *lora.config());
    assert_eq!(info.config.targets[0].to_string(), "**.trunk.blocks.*.attn.qkv[0,2/3]");
    assert_eq!(info.base_model_id, "toy-base");
    assert_eq!(info.base_hash, lora.base_hash());
    assert!(info.base_hash.starts_with("sha256:"));
    let paths: Vec<_> = info.layers.iter().map(|l| l.path.as_str()).collect();
    assert_eq!(paths, lora.layers().iter().map(|l| l.path.as_str()).collect::<Vec<_>>());
    assert_eq!(info.layers.len(), 6);

    let mut fresh = ToyModel::new(&DIMS, 1, DType::F32);
    let loaded = Lora::load(&path, &mut fresh).unwrap();
    assert_eq!(loaded.num_trainable_params(), lora.num_trainable_params());
    assert_bit_identical(&fresh.forward(&x).unwrap(), &adapted, "loaded");
    assert!(!loaded.is_train());

    // Saving while merged stores the same adapters.
    let mut merged_model = ToyModel::new(&DIMS, 1, DType::F32);
    let mut merged = Lora::load(&path, &mut merged_model).unwrap();
    merged.merge(&mut merged_model).unwrap();
    let path2 = dir.path().join("again.safetensors");
    merged.save(&path2, "toy-base").unwrap();
    let mut third = ToyModel::new(&DIMS, 1, DType::F32);
    Lora::load(&path2, &mut third).unwrap();
    assert_bit_identical(&third.forward(&x).unwrap(), &adapted, "saved while merged, loaded");
}

#[test]
fn loading_onto_another_base_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    trained_lora(&mut model).save(&path, "toy-base").unwrap();

    // Same architecture, other weights.
    let mut other = ToyModel::new(&DIMS, 2, DType::F32);
    let err = Lora::load(&path, &mut other).unwrap_err();
    assert!(matches!(err, LoraError::BaseMismatch { .. }), "{err}");
    assert!(other.adaptable_linears_mut().iter().all(|(_, l)| l.adapter().is_none()));

    // One targeted weight nudged by one ulp is another base too.
    let mut nudged = ToyModel::new(&DIMS, 1, DType::F32);
    let w = nudged.blocks[1].qkv.weight().clone();
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[5] = f32::from_bits(v[5].to_bits() + 1);
    nudged.blocks[1]
        .qkv
        .set_weight(Tensor::from_vec(v, w.shape(), w.device()).unwrap())
        .unwrap();
    assert!(matches!(
        Lora::load(&path, &mut nudged),
        Err(LoraError::BaseMismatch { .. })
    ));

    // Other widths.
    let mut wider = ToyModel::new(&[(8, 8), (8, 24), (24, 24)], 1, DType::F32);
    let err = Lora::load(&path, &mut wider).unwrap_err();
    assert!(matches!(err, LoraError::ShapeMismatch { .. }), "{err}");

    // Fewer blocks: the targets resolve to other layers.
    let mut shorter = ToyModel::new(&DIMS[..2], 1, DType::F32);
    let err = Lora::load(&path, &mut shorter).unwrap_err();
    assert!(matches!(err, LoraError::TargetMismatch { .. }), "{err}");

    // A model that already carries adapters.
    let mut adapted = ToyModel::new(&DIMS, 1, DType::F32);
    let _first = Lora::attach(&mut adapted, LoraConfig::new(2, 2.0)).unwrap();
    assert!(matches!(
        Lora::load(&path, &mut adapted),
        Err(LoraError::AlreadyAdapted { .. })
    ));
}

#[test]
fn broken_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.safetensors");
    let mut model = ToyModel::new(&DIMS, 1, DType::F32);
    let lora = trained_lora(&mut model);
    lora.save(&path, "toy-base").unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut base = ToyModel::new(&DIMS, 1, DType::F32);

    assert!(matches!(
        Lora::load(dir.path().join("missing.safetensors"), &mut base),
        Err(LoraError::Io { .. })
    ));

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(Lora::load(&truncated, &mut base).is_err());
    std::fs::write(&truncated, &bytes[..4]).unwrap();
    assert!(Lora::load(&truncated, &mut base).is_err());

    // A plain safetensors file without our metadata.
    let plain = dir.path().join("plain.safetensors");
    let t = Tensor::zeros((2, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("x", t)].into_iter().collect(), &plain).unwrap();
    assert!(matches!(Lora::load(&plain, &mut base), Err(LoraError::BadMetadata(_))));

    // A tensor of the wrong shape, and a missing one, under valid metadata.
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file
        .names()
        .into_iter()
        .map(|n| {
            let view = file.tensor(n).unwrap();
            (
                n.to_string(),
                candle_core::safetensors::Load::load(&view, &candle_core::Device::Cpu).unwrap(),
            )
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let write = |ts: &[(String, Tensor)], name: &str| {
        let p = dir.path().join(name);
        let data = safetensors::serialize(ts.iter().map(|(n, t)| (n.as_str(), t)), meta.clone()).unwrap();
        std::fs::write(&p, data).unwrap();
        p
    };
    let mut bad_shape = tensors.clone();
    bad_shape[0].1 = Tensor::zeros((1, 1), DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = Lora::load(write(&bad_shape, "shape.safetensors"), &mut base).unwrap_err();
    assert!(matches!(err, LoraError::ShapeMismatch { .. }), "{err}");
    let missing = tensors[1..].to_vec();
    let err = Lora::load(write(&missing, "missing_tensor.safetensors"), &mut base).unwrap_err();
    assert!(matches!(err, LoraError::MissingTensor(_)), "{err}");
    let mut extra = tensors.clone();
    extra.push((
        "stray".into(),
        Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap(),
    ));
    let err = Lora::load(write(&extra, "extra.safetensors"), &mut base).unwrap_err();
    assert!(matches!(err, LoraError::UnexpectedTensor(_)), "{err}");
    // None of the failures attached anything.
    assert!(base.adaptable_linears_mut().iter().all(|(_, l)| l.adapter().is_none()));
    // And the intact file still loads.
    Lora::load(write(&tensors, "intact.safetensors"), &mut base).unwrap();
}
