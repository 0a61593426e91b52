//! Checkpoint loading: formats detected by content, corrupt files rejected without panics,
//! and ONE error listing every missing / unexpected / mis-shaped key.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sgp_sam2::AdaptableModel;
use sgp_sam2::Error;
use sgp_sam2::Sam2Config;
use sgp_sam2::Sam2Model;
use sgp_sam2::{detect_format, load_state_dict, StrictWeights, WeightsFileFormat};

/// A small SAM2.1 config: a 4-stage Hiera with 1–2 blocks per stage at 64 px.
fn tiny_config() -> Sam2Config {
    let mut c = Sam2Config::preset("sam2.1_hiera_t")
        .unwrap()
        .with_image_size(64)
        .unwrap();
    let t = &mut c.image_encoder.trunk;
    t.embed_dim = 16;
    t.stages = vec![1, 2, 2, 1];
    t.global_att_blocks = vec![4];
    t.window_pos_embed_bkg_spatial_size = [5, 5];
    t.window_spec = vec![8, 4, 6, 2];
    c.image_encoder.neck.backbone_channel_list = vec![128, 64, 32, 16];
    c
}

/// Every key the model requests, with its shape (a build over an empty checkpoint).
fn model_keys(cfg: &Sam2Config) -> BTreeMap<String, Vec<usize>> {
    let w = StrictWeights::new(HashMap::new());
    Sam2Model::new(cfg, w.var_builder(DType::F32, &Device::Cpu)).unwrap();
    w.requested()
}

fn random_state_dict(keys: &BTreeMap<String, Vec<usize>>) -> HashMap<String, Tensor> {
    keys.iter()
        .map(|(k, s)| {
            (
                k.clone(),
                Tensor::randn(0f32, 0.02, s.as_slice(), &Device::Cpu).unwrap(),
            )
        })
        .collect()
}

fn save(path: &Path, sd: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(sd, path).unwrap();
}

#[test]
fn complete_checkpoint_loads_and_roundtrips_through_safetensors() {
    let cfg = tiny_config();
    let keys = model_keys(&cfg);
    assert!(keys.contains_key("image_encoder.trunk.pos_embed"));
    assert!(keys.contains_key("image_encoder.neck.convs.3.conv.weight"));
    assert!(keys.contains_key("maskmem_tpos_enc"));
    assert!(keys.contains_key("no_obj_embed_spatial"));
    assert!(keys.contains_key("obj_ptr_tpos_proj.weight"));
    assert!(keys.contains_key("mask_downsample.weight"));
    let sd = random_state_dict(&keys);
    let dir = tempfile::tempdir().unwrap();
    // A misleading extension: the format is detected from the content.
    let p = dir.path().join("model.pt");
    save(&p, &sd);
    assert_eq!(detect_format(&p).unwrap(), WeightsFileFormat::Safetensors);
    let model = Sam2Model::load(&cfg, &p, &Device::Cpu).unwrap();
    let want = sd["no_mem_embed"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let got = model.no_mem_embed().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(want, got);
}

#[test]
fn all_key_problems_are_reported_at_once() {
    let cfg = tiny_config();
    let keys = model_keys(&cfg);
    let mut sd = random_state_dict(&keys);
    sd.remove("image_encoder.trunk.blocks.0.attn.qkv.bias");
    sd.remove("no_mem_pos_enc");
    sd.insert(
        "image_encoder.trunk.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    sd.insert(
        "no_mem_embed".into(),
        Tensor::zeros((1, 1, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    let w = StrictWeights::new(sd);
    match Sam2Model::from_weights(&cfg, &w, &Device::Cpu) {
        Err(Error::WeightKeys {
            missing,
            unexpected,
            mismatched,
        }) => {
            assert_eq!(
                missing,
                vec![
                    "image_encoder.trunk.blocks.0.attn.qkv.bias".to_string(),
                    "no_mem_pos_enc".into()
                ]
            );
            assert_eq!(unexpected, vec!["image_encoder.trunk.extra.weight".to_string()]);
            assert_eq!(
                mismatched,
                vec![("no_mem_embed".to_string(), vec![1, 1, 256], vec![1, 1, 7])]
            );
        }
        other => panic!("expected WeightKeys, got {other:?}"),
    }
}

#[test]
fn half_precision_is_converted_and_integer_tensors_are_rejected() {
    let cfg = tiny_config();
    let keys = model_keys(&cfg);
    let mut sd = random_state_dict(&keys);
    let f32_val = sd["no_mem_embed"].clone();
    sd.insert("no_mem_embed".into(), f32_val.to_dtype(DType::F16).unwrap());
    let model = Sam2Model::from_weights(&cfg, &StrictWeights::new(sd.clone()), &Device::Cpu).unwrap();
    assert_eq!(model.no_mem_embed().dtype(), DType::F32);
    let want = f32_val.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
    let diff = (model.no_mem_embed() - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);

    sd.insert(
        "no_mem_pos_enc".into(),
        Tensor::zeros((1, 1, 256), DType::U8, &Device::Cpu).unwrap(),
    );
    let err = Sam2Model::from_weights(&cfg, &StrictWeights::new(sd), &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, Error::WeightsFormat { reason, .. } if reason.contains("no_mem_pos_enc")),
        "{err}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = HashMap::new();
    sd.insert(
        "a".to_string(),
        Tensor::ones((64, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let good = dir.path().join("good.safetensors");
    save(&good, &sd);
    let bytes = std::fs::read(&good).unwrap();
    assert_eq!(load_state_dict(&good, &Device::Cpu).unwrap()["a"].dims(), &[64, 64]);

    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(
        load_state_dict(&cut, &Device::Cpu),
        Err(Error::WeightsFormat { .. })
    ));

    let header_only = dir.path().join("header.safetensors");
    std::fs::write(&header_only, &bytes[..20]).unwrap();
    assert!(matches!(
        load_state_dict(&header_only, &Device::Cpu),
        Err(Error::WeightsFormat { .. })
    ));

    let garbage = dir.path().join("garbage.pt");
    std::fs::write(&garbage, b"not a checkpoint at all").unwrap();
    assert!(matches!(
        load_state_dict(&garbage, &Device::Cpu),
        Err(Error::WeightsFormat { .. })
    ));

    // Looks like a zip (torch.save) but is cut after the magic.
    let bad_zip = dir.path().join("bad.pt");
    std::fs::write(&bad_zip, b"PK\x03\x04\x14\x00\x00\x00garbage").unwrap();
    assert_eq!(detect_format(&bad_zip).unwrap(), WeightsFileFormat::TorchZip);
    assert!(matches!(
        load_state_dict(&bad_zip, &Device::Cpu),
        Err(Error::WeightsFormat { .. })
    ));

    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        load_state_dict(&empty, &Device::Cpu),
        Err(Error::WeightsFormat { .. })
    ));

    let missing = dir.path().join("nope.safetensors");
    assert!(matches!(load_state_dict(&missing, &Device::Cpu), Err(Error::Io { .. })));
}

#[test]
fn adaptable_linears_are_named_by_checkpoint_path() {
    let cfg = tiny_config();
    let keys = model_keys(&cfg);
    let mut model = Sam2Model::new(
        &cfg,
        StrictWeights::new(random_state_dict(&keys)).var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let paths: Vec<String> = model.adaptable_linears_mut().into_iter().map(|(p, _)| p).collect();
    for p in [
        "image_encoder.trunk.blocks.0.attn.qkv",
        "image_encoder.trunk.blocks.0.attn.proj",
        "image_encoder.trunk.blocks.0.mlp.layers.0",
        "image_encoder.trunk.blocks.5.mlp.layers.1",
        "image_encoder.trunk.blocks.1.proj",
    ] {
        assert!(paths.iter().any(|x| x == p), "{p} not in {paths:?}");
    }
    for p in &paths {
        assert!(
            keys.contains_key(&format!("{p}.weight")),
            "{p}.weight is not a checkpoint key"
        );
    }
}

/// The full-size SAM2.1 tiny preset requests exactly the official checkpoint's keys and
/// shapes (list dumped from `sam2.1_hiera_tiny.pt`'s model: tests/data).
#[test]
fn preset_requests_exactly_the_official_keys() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sam2.1_hiera_t.original_keys.txt"),
    )
    .unwrap();
    let official: BTreeMap<String, Vec<usize>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (k, shape) = l.split_once(' ').unwrap();
            let dims = shape
                .trim_matches(|c| c == '(' || c == ')' || c == ' ')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().unwrap())
                .collect();
            (k.to_string(), dims)
        })
        .collect();
    let ours = model_keys(&Sam2Config::preset("sam2.1_hiera_t").unwrap());
    let missing: Vec<_> = official.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !official.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "not requested: {missing:?}\nnot in checkpoint: {extra:?}"
    );
    for (k, s) in &official {
        assert_eq!(&ours[k], s, "shape of {k}");
    }
}
