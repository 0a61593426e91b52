//! The same weights in every format give the same model.
//!
//! - `.pt` and original-name safetensors: the committed reduced sam2 case ships its random
//!   weights in both; the loaded tensors and the encoder outputs must be identical.
//! - transformers naming: a transformers folder is detected from its files (its numbers
//!   are checked against transformers' own forward by `sgp-parity`'s committed cases).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sgp::{load_pretrained, LoadOptions, WeightsFormat};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn opts(config: &Path) -> LoadOptions {
    LoadOptions {
        config: Some(config.display().to_string()),
        real_use_settings: false,
        ..LoadOptions::default()
    }
}

#[test]
fn pt_and_safetensors_load_the_same_model() {
    let dir = fixtures().join("parity/sam2_reduced/s64");
    let pt_case = dir.join("pt_sam_heads_points_multi");
    let st_case = dir.join("image_encoder_b1");
    let cfg = st_case.join("config.json");

    let from_pt = load_pretrained(pt_case.join("weights.pt").to_str().unwrap(), &opts(&cfg)).unwrap();
    let from_st = load_pretrained(st_case.join("weights.safetensors").to_str().unwrap(), &opts(&cfg)).unwrap();
    assert_eq!(from_pt.format, WeightsFormat::OriginalPt);
    assert_eq!(from_st.format, WeightsFormat::OriginalSafetensors);

    let s = from_st.config.image_size;
    let image = Tensor::randn(0f32, 1f32, (1, 3, s, s), &Device::Cpu).unwrap();
    let a = from_pt.model.forward_image(&image).unwrap();
    let b = from_st.model.forward_image(&image).unwrap();
    for (x, y) in a.backbone_fpn.iter().zip(b.backbone_fpn.iter()) {
        let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}

#[test]
fn transformers_folder_is_detected_from_its_files() {
    let case = fixtures().join("parity-transformers/transformers_sam_heads_point_multi");
    let loaded = load_pretrained(case.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(loaded.format, WeightsFormat::Transformers);
    assert!(!loaded.has_memory_path);
}
