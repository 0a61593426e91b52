//! A config that passes `validate()` never panics while the model is built or run, and
//! every value that would panic is refused with a clear error, from the official yaml
//! tree and from a transformers `config.json` alike.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{json, Value};
use sgp_sam2::{config_from_transformers_json, FramePrompt, Sam2Config, Sam2Model, TrackRequest};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The reduced SAM2.1 config of the committed parity cases (S = 64, every path on).
fn base_tree() -> Value {
    let p = fixtures().join("parity/sam2.1_reduced/s64/image_encoder_b2/config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn transformers_text() -> String {
    let p = fixtures().join("parity-transformers/transformers_sam_heads_point_multi/config.json");
    std::fs::read_to_string(p).unwrap()
}

/// Sets the value at a JSON pointer whose parent exists (a key may be new: it then
/// overrides the constructor default).
fn set(tree: &mut Value, ptr: &str, v: Value) {
    let (parent, key) = ptr.rsplit_once('/').unwrap();
    match tree.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(key.to_string(), v);
        }
        Some(Value::Array(a)) => a[key.parse::<usize>().unwrap()] = v,
        _ => panic!("no {parent} in the base config"),
    }
}

/// Builds a model (zero weights) from `cfg` without panicking; the error if it fails.
fn build(cfg: &Sam2Config) -> Result<Sam2Model, String> {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    match catch_unwind(AssertUnwindSafe(|| Sam2Model::new(cfg, vb))) {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => panic!("building the model panicked for {cfg:?}"),
    }
}

/// One image through the encoder, the SAM heads and a tracking step with memory; any
/// error is fine, a panic is not.
fn run_once(model: &Sam2Model) {
    let s = model.config().image_size;
    let r = catch_unwind(AssertUnwindSafe(|| -> sgp_sam2::Result<()> {
        let x = Tensor::zeros((1, 3, s, s), DType::F32, &Device::Cpu)?;
        let feats = model.prepare_backbone_features(&model.forward_image(&x)?)?;
        let mask = Tensor::ones((1, 1, s, s), DType::F32, &Device::Cpu)?;
        let mut tracker = sgp_sam2::Tracker::new(model, 2);
        tracker.add_conditioning(0, &feats, &FramePrompt::mask(mask))?;
        tracker.track(1, &feats)?;
        model.track_step(
            &TrackRequest::initial(0, 1),
            &feats,
            &FramePrompt::default(),
            tracker.bank(),
        )?;
        Ok(())
    }));
    assert!(r.is_ok(), "running the model panicked for {:?}", model.config());
}

#[test]
fn the_base_config_builds_and_runs() {
    let cfg = Sam2Config::from_value(base_tree()).unwrap();
    let model = build(&cfg).unwrap();
    run_once(&model);
}

/// Each value that used to panic (or would), with what the error must say.
#[test]
fn every_invalid_value_is_an_error_not_a_panic() {
    let cases: &[(&str, Value, &str)] = &[
        // Hiera: a stage with 0 blocks underflowed `stage_ends` (subtraction overflow).
        ("/image_encoder/trunk/stages", json!([0, 2, 3, 2]), "stages[0] is 0"),
        ("/image_encoder/trunk/stages", json!([1, 0, 3, 2]), "stages[1] is 0"),
        ("/image_encoder/trunk/stages", json!([]), "non-zero length"),
        // Hiera: a head count reaching 0 (remainder by zero).
        ("/image_encoder/trunk/head_mul", json!(0.5), "heads"),
        ("/image_encoder/trunk/num_heads", json!(0), "num_heads"),
        ("/image_encoder/trunk/dim_mul", json!(0.0), "dim_mul"),
        ("/image_encoder/trunk/dim_mul", json!(0.1), "both must stay > 0"),
        ("/image_encoder/trunk/num_heads", json!(3), "not divisible"),
        ("/image_encoder/trunk/embed_dim", json!(0), "embed_dim"),
        ("/image_encoder/trunk/q_stride", json!([0, 2]), "q_stride"),
        ("/image_encoder/trunk/q_pool", json!(4), "q_pool"),
        // Windows: pos_embed_window of size 0 (remainder by zero), an empty pooled window.
        (
            "/image_encoder/trunk/window_spec",
            json!([0, 4, 14, 7]),
            "window_spec[0]",
        ),
        (
            "/image_encoder/trunk/window_spec",
            json!([8, 1, 14, 7]),
            "window_spec[1]",
        ),
        (
            "/image_encoder/trunk/window_pos_embed_bkg_spatial_size",
            json!([0, 7]),
            "bkg_spatial_size",
        ),
        // Neck.
        ("/image_encoder/neck/d_model", json!(12), "multiple of 8"),
        ("/image_encoder/neck/d_model", json!(0), "multiple of 8"),
        (
            "/image_encoder/neck/backbone_channel_list",
            json!([64, 32, 16, 4]),
            "trunk's channels",
        ),
        (
            "/image_encoder/neck/backbone_channel_list",
            json!([64, 32, 16]),
            "levels",
        ),
        ("/image_encoder/neck/kernel_size", json!(0), "keep the map size"),
        ("/image_encoder/neck/stride", json!(0), "keep the map size"),
        ("/image_encoder/neck/padding", json!(1), "keep the map size"),
        ("/image_encoder/neck/position_encoding/num_pos_feats", json!(31), "even"),
        (
            "/image_encoder/neck/position_encoding/num_pos_feats",
            json!(16),
            "must equal neck.d_model",
        ),
        ("/image_encoder/scalp", json!(4), "scalp"),
        // Memory attention: head counts and rates (division / remainder by zero).
        (
            "/memory_attention/layer/self_attention/num_heads",
            json!(0),
            "num_heads",
        ),
        (
            "/memory_attention/layer/cross_attention/num_heads",
            json!(3),
            "multiple of num_heads",
        ),
        (
            "/memory_attention/layer/cross_attention/downsample_rate",
            json!(0),
            "downsample_rate",
        ),
        (
            "/memory_attention/layer/self_attention/downsample_rate",
            json!(64),
            "multiple of num_heads",
        ),
        (
            "/memory_attention/layer/self_attention/num_heads",
            json!(16),
            "divisible by 4",
        ),
        (
            "/memory_attention/layer/cross_attention/kv_in_dim",
            json!(0),
            "kv_in_dim",
        ),
        // Memory encoder.
        ("/memory_encoder/out_dim", json!(0), "out_dim"),
        ("/memory_encoder/out_dim", json!(12), "memory dim 12"),
        ("/memory_encoder/mask_downsampler/stride", json!(1), "stride >= 2"),
        (
            "/memory_encoder/mask_downsampler/kernel_size",
            json!(0),
            "kernel_size > 0",
        ),
        (
            "/memory_encoder/mask_downsampler/total_stride",
            json!(12),
            "must equal backbone_stride",
        ),
        ("/memory_encoder/mask_downsampler/stride", json!(3), "not a power"),
        (
            "/memory_encoder/mask_downsampler/padding",
            json!(0),
            "does not downsample",
        ),
        ("/memory_encoder/fuser/layer/padding", json!(0), "size-keeping"),
        ("/memory_encoder/fuser/layer/dim", json!(0), "fuser"),
        ("/memory_encoder/fuser/layer/kernel_size", json!(0), "fuser"),
        (
            "/memory_encoder/position_encoding/num_pos_feats",
            json!(0),
            "num_pos_feats",
        ),
        // SAM2Base.
        ("/image_size", json!(48), "multiple of 32"),
        ("/backbone_stride", json!(0), "backbone_stride"),
    ];
    for (ptr, v, want) in cases {
        let mut tree = base_tree();
        set(&mut tree, ptr, v.clone());
        let err = Sam2Config::from_value(tree.clone()).expect_err(&format!("{ptr} = {v} must be refused"));
        let msg = err.to_string();
        assert!(msg.contains(want), "{ptr} = {v}: error {msg:?} does not say {want:?}");
        // The model builder validates too: the unvalidated config gets the same error.
        let raw: Sam2Config = serde_json::from_value(tree).unwrap();
        let built = build(&raw).expect_err(&format!("{ptr} = {v}: the model must not build"));
        assert_eq!(built, msg);
    }
}

#[test]
fn enumerations_are_typed_and_unknown_names_are_refused() {
    let cfg = Sam2Config::from_value(base_tree()).unwrap();
    assert_eq!(cfg.image_encoder.neck.fpn_interp_model, sgp_sam2::FpnInterp::Nearest);
    assert_eq!(cfg.image_encoder.neck.fuse_type, sgp_sam2::FuseType::Sum);
    for (ptr, v) in [
        ("/image_encoder/neck/fpn_interp_model", "bicubic"),
        ("/image_encoder/neck/fuse_type", "max"),
    ] {
        let mut tree = base_tree();
        set(&mut tree, ptr, json!(v));
        let e = Sam2Config::from_value(tree).unwrap_err().to_string();
        assert!(e.contains(v), "{e}");
    }
    let mut tree = base_tree();
    set(&mut tree, "/image_encoder/neck/fpn_interp_model", json!("bilinear"));
    set(&mut tree, "/image_encoder/neck/fuse_type", json!("avg"));
    let cfg = Sam2Config::from_value(tree).unwrap();
    assert_eq!(cfg.image_encoder.neck.fuse_type, sgp_sam2::FuseType::Avg);
    run_once(&build(&cfg).unwrap());
}

#[test]
fn invalid_transformers_config_values_are_errors() {
    let base: Value = serde_json::from_str(&transformers_text()).unwrap();
    assert!(config_from_transformers_json(&transformers_text()).is_ok());
    let cases: &[(&str, Value, &str)] = &[
        (
            "/vision_config/backbone_config/blocks_per_stage",
            json!([0, 2, 3, 2]),
            "stages[0] is 0",
        ),
        ("/vision_config/backbone_config/query_stride", json!([0, 0]), "q_stride"),
        (
            "/vision_config/backbone_config/window_size_per_stage",
            json!([0, 4, 14, 7]),
            "window_spec[0]",
        ),
        (
            "/vision_config/backbone_config/num_query_pool_stages",
            json!(4),
            "q_pool",
        ),
        ("/vision_config/backbone_config/hidden_size", json!(0), "doubling"),
        ("/vision_config/fpn_hidden_size", json!(12), "multiple of 8"),
        (
            "/vision_config/backbone_channel_list",
            json!([64, 32, 16, 4]),
            "trunk's channels",
        ),
        ("/prompt_encoder_config/image_size", json!(48), "multiple of 32"),
    ];
    for (ptr, v, want) in cases {
        let mut tree = base.clone();
        set(&mut tree, ptr, v.clone());
        let e = config_from_transformers_json(&tree.to_string())
            .expect_err(&format!("{ptr} = {v} must be refused"))
            .to_string();
        assert!(e.contains(want), "{ptr} = {v}: error {e:?} does not say {want:?}");
    }
}

/// Every numeric value of the config set to 0, 1 or 3: either the config is refused, or
/// the model builds and runs without a panic. This is what finds values nobody listed.
#[test]
fn no_numeric_value_makes_a_valid_config_panic() {
    fn leaves(v: &Value, ptr: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, x)| leaves(x, format!("{ptr}/{k}"), out)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, x)| leaves(x, format!("{ptr}/{i}"), out)),
            Value::Number(_) => out.push(ptr),
            _ => {}
        }
    }
    let base = base_tree();
    let mut ptrs = Vec::new();
    leaves(&base, String::new(), &mut ptrs);
    assert!(ptrs.len() > 40, "{}", ptrs.len());
    let (mut refused, mut ran) = (0, 0);
    for ptr in &ptrs {
        for v in [0, 1, 3] {
            let mut tree = base.clone();
            set(&mut tree, ptr, json!(v));
            let Ok(cfg) = Sam2Config::from_value(tree) else {
                refused += 1;
                continue;
            };
            if let Ok(model) = build(&cfg) {
                run_once(&model);
                ran += 1;
            }
        }
    }
    println!("{} values: {refused} refused, {ran} built and ran", ptrs.len() * 3);
    assert!(refused > 0 && ran > 0);
}
