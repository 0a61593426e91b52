//! The transformers library's SAM2 checkpoint format (`Sam2Model` / `Sam2VideoModel`,
//! `model.safetensors` + `config.json`), mapped onto the official key names.
//!
//! The official hub repos now carry this format next to the original `.pt`, and community
//! fine-tunes often ship only it. Rather than keep a second module tree, we rename keys and
//! reshape the few tensors that differ, then load through the one official-name path, so
//! every format runs exactly the same code.
//!
//! What differs (besides names):
//! - `prompt_encoder.point_embed.weight` is one `[4,C]` tensor; the original has four `[1,C]`.
//! - The prompt encoder's Gaussian matrix is stored once, as
//!   `shared_image_embedding.positional_embedding` (a tied copy may also appear).
//! - MLPs are `proj_in`, `layers.*`, `proj_out` where the original numbers every layer.
//! - The memory encoder's mask downsampler numbers its conv/norm pairs; the original uses the
//!   indices of an `nn.Sequential` with activations in between (`3i`, `3i+1`, final `3n`).

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;

use crate::{Error, Result};

/// One renaming step: a key prefix (ending at a module boundary) and its official name.
const PREFIX_RENAMES: &[(&str, &str)] = &[
    ("vision_encoder.backbone.", "image_encoder.trunk."),
    ("vision_encoder.neck.", "image_encoder.neck."),
    ("prompt_encoder.", "sam_prompt_encoder."),
    ("mask_decoder.", "sam_mask_decoder."),
    ("object_pointer_proj.", "obj_ptr_proj."),
    ("temporal_positional_encoding_projection_layer.", "obj_ptr_tpos_proj."),
];

/// Top-level parameters renamed whole.
const PARAM_RENAMES: &[(&str, &str)] = &[
    ("no_memory_embedding", "no_mem_embed"),
    ("no_memory_positional_encoding", "no_mem_pos_enc"),
    ("memory_temporal_positional_encoding", "maskmem_tpos_enc"),
    ("no_object_pointer", "no_obj_ptr"),
    ("occlusion_spatial_embedding_parameter", "no_obj_embed_spatial"),
    (
        "shared_image_embedding.positional_embedding",
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ),
];

/// Module-name segments renamed wherever they appear as a whole segment.
const SEGMENT_RENAMES: &[(&str, &str)] = &[
    ("o_proj", "out_proj"),
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("layer_norm3", "norm3"),
    ("layer_norm4", "norm4"),
    ("layer_norm_final_attn", "norm_final_attn"),
    ("feature_projection", "pix_feat_proj"),
    ("memory_fuser", "fuser"),
    ("depthwise_conv", "dwconv"),
    ("pointwise_conv1", "pwconv1"),
    ("pointwise_conv2", "pwconv2"),
];

/// Result of converting a transformers state dict.
#[derive(Debug)]
pub struct Converted {
    /// Tensors under the official key names.
    pub tensors: HashMap<String, Tensor>,
    /// Keys that were dropped on purpose (tied duplicates).
    pub dropped: Vec<String>,
}

/// True when the key set looks like the transformers naming (used by format detection).
pub fn looks_like_transformers<'a>(mut keys: impl Iterator<Item = &'a str>) -> bool {
    keys.any(|k| {
        k.starts_with("vision_encoder.")
            || k == "shared_image_embedding.positional_embedding"
            || k.starts_with("prompt_encoder.point_embed.")
    })
}

/// Converts a transformers-format state dict to official key names and shapes.
pub fn convert_state_dict(tensors: Vec<(String, Tensor)>) -> Result<Converted> {
    let names: Vec<String> = tensors.iter().map(|(k, _)| k.clone()).collect();
    let mlp_depths = mlp_depths(&names);
    let downsampler_layers = downsampler_layer_count(&names);

    let mut out = HashMap::with_capacity(tensors.len() + 3);
    let mut dropped = Vec::new();
    let has_shared = names.iter().any(|k| k == "shared_image_embedding.positional_embedding");

    for (key, tensor) in tensors {
        // The prompt encoder keeps a tied copy of the shared Gaussian matrix.
        if key == "prompt_encoder.shared_embedding.positional_embedding" {
            if has_shared {
                dropped.push(key);
                continue;
            }
            insert_unique(
                &mut out,
                "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix".into(),
                tensor,
            )?;
            continue;
        }
        if key == "prompt_encoder.point_embed.weight" {
            let n = tensor.dim(0)?;
            for i in 0..n {
                insert_unique(
                    &mut out,
                    format!("sam_prompt_encoder.point_embeddings.{i}.weight"),
                    tensor.narrow(0, i, 1)?,
                )?;
            }
            continue;
        }
        let mapped = map_key(&key, &mlp_depths, downsampler_layers)?;
        insert_unique(&mut out, mapped, tensor)?;
    }
    Ok(Converted { tensors: out, dropped })
}

fn insert_unique(map: &mut HashMap<String, Tensor>, key: String, t: Tensor) -> Result<()> {
    if map.insert(key.clone(), t).is_some() {
        return Err(Error::Config(format!(
            "transformers checkpoint maps two tensors onto `{key}`"
        )));
    }
    Ok(())
}

/// One step of the key mapping. [`RULES`] applies them in order to every key that is not
/// a special case of [`convert_state_dict`]; a scoped rule acts only on keys that start
/// with its scope at that point (after the renames above it).
#[derive(Debug, Clone, Copy)]
pub enum Rule {
    /// Whole keys renamed; a key renamed here is final.
    Exact(&'static [(&'static str, &'static str)]),
    /// Key prefixes (ending at a module boundary) renamed; the first match applies.
    Prefix(&'static [(&'static str, &'static str)]),
    /// Under `scope`, every occurrence of `from` becomes `to`.
    Replace {
        /// Keys this rule applies to.
        scope: &'static str,
        /// Text replaced.
        from: &'static str,
        /// Its replacement.
        to: &'static str,
    },
    /// Under `scope`, the segment right after it is renamed by `table`, and `scope`
    /// becomes `into` (`nn.Sequential` indices of the official modules).
    FirstSegment {
        /// Keys this rule applies to.
        scope: &'static str,
        /// What replaces the scope.
        into: &'static str,
        /// Segment renames.
        table: &'static [(&'static str, &'static str)],
    },
    /// Under `scope`, `segment` is inserted after the index that follows the scope
    /// (`convs.i.weight` → `convs.i.conv.weight`).
    InsertAfterIndex {
        /// Keys this rule applies to.
        scope: &'static str,
        /// The inserted segment.
        segment: &'static str,
    },
    /// Module-name segments renamed wherever they appear as a whole segment.
    Segments(&'static [(&'static str, &'static str)]),
    /// Under `scope`, the mask downsampler's numbered conv/norm pairs become the indices of
    /// the official `nn.Sequential` (`3i`, `3i+1`, final conv `3n`); needs the layer count.
    Downsampler {
        /// Keys this rule applies to.
        scope: &'static str,
    },
    /// MLP linears renumbered: `proj_in` → `layers.0`, `layers.i` → `layers.{i+1}`,
    /// `proj_out` → `layers.{depth-1}`; needs each MLP's depth.
    Mlp,
}

/// The transformers → official key mapping, as data. The existing tests prove it maps the
/// transformers key set of a whole model one-to-one onto the official key set.
pub const RULES: &[Rule] = &[
    Rule::Exact(PARAM_RENAMES),
    Rule::Prefix(PREFIX_RENAMES),
    Rule::Replace {
        scope: "image_encoder.trunk.",
        from: "patch_embed.projection.",
        to: "patch_embed.proj.",
    },
    Rule::InsertAfterIndex {
        scope: "image_encoder.neck.convs.",
        segment: "conv",
    },
    Rule::FirstSegment {
        scope: "sam_prompt_encoder.mask_embed.",
        into: "sam_prompt_encoder.mask_downscaling.",
        table: &[
            ("conv1", "0"),
            ("layer_norm1", "1"),
            ("conv2", "3"),
            ("layer_norm2", "4"),
            ("conv3", "6"),
        ],
    },
    Rule::FirstSegment {
        scope: "sam_mask_decoder.",
        into: "sam_mask_decoder.",
        table: &[
            ("upscale_conv1", "output_upscaling.0"),
            ("upscale_layer_norm", "output_upscaling.1"),
            ("upscale_conv2", "output_upscaling.3"),
        ],
    },
    Rule::Downsampler {
        scope: "memory_encoder.mask_downsampler.",
    },
    Rule::Prefix(&[
        ("memory_encoder.projection.", "memory_encoder.out_proj."),
        ("memory_attention.layer_norm.", "memory_attention.norm."),
    ]),
    // CXBlock layer scale and norm.
    Rule::Replace {
        scope: "memory_encoder.",
        from: ".scale",
        to: ".gamma",
    },
    Rule::Replace {
        scope: "memory_encoder.",
        from: ".layer_norm.",
        to: ".norm.",
    },
    Rule::Segments(SEGMENT_RENAMES),
    Rule::Mlp,
];

/// Maps one transformers key (other than the special cases) to its official name by
/// applying [`RULES`]. `mlp_depths` and `downsampler_layers` are statistics of the whole
/// key set that the renumbering rules need.
pub fn map_key(key: &str, mlp_depths: &BTreeMap<String, usize>, downsampler_layers: usize) -> Result<String> {
    map_key_with(RULES, key, mlp_depths, downsampler_layers)
}

fn map_key_with(
    rules: &[Rule],
    key: &str,
    mlp_depths: &BTreeMap<String, usize>,
    downsampler_layers: usize,
) -> Result<String> {
    let mut k = key.to_string();
    for rule in rules {
        match *rule {
            Rule::Exact(table) => {
                if let Some((_, to)) = table.iter().find(|(from, _)| *from == k) {
                    return Ok((*to).to_string());
                }
            }
            Rule::Prefix(table) => {
                if let Some((from, to)) = table.iter().find(|(from, _)| k.starts_with(from)) {
                    k = format!("{to}{}", &k[from.len()..]);
                }
            }
            Rule::Replace { scope, from, to } => {
                if k.starts_with(scope) {
                    k = k.replace(from, to);
                }
            }
            Rule::FirstSegment { scope, into, table } => {
                if let Some(rest) = k.strip_prefix(scope) {
                    k = format!("{into}{}", replace_first_segment(rest, table));
                }
            }
            Rule::InsertAfterIndex { scope, segment } => {
                if let Some(rest) = k.strip_prefix(scope) {
                    let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
                    k = format!("{scope}{idx}.{segment}.{tail}");
                }
            }
            Rule::Segments(table) => k = rename_segments(&k, table),
            Rule::Downsampler { scope } => {
                if let Some(rest) = k.strip_prefix(scope) {
                    k = format!("{scope}{}", map_downsampler(rest, downsampler_layers, key)?);
                }
            }
            Rule::Mlp => k = map_mlp(&k, mlp_depths),
        }
    }
    Ok(k)
}

fn replace_first_segment(rest: &str, table: &[(&str, &str)]) -> String {
    let (head, tail) = rest.split_once('.').unwrap_or((rest, ""));
    for (from, to) in table {
        if head == *from {
            return if tail.is_empty() {
                (*to).to_string()
            } else {
                format!("{to}.{tail}")
            };
        }
    }
    rest.to_string()
}

fn rename_segments(key: &str, table: &[(&str, &str)]) -> String {
    key.split('.')
        .map(|seg| {
            table
                .iter()
                .find(|(from, _)| *from == seg)
                .map(|(_, to)| *to)
                .unwrap_or(seg)
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// `layers.i.conv` -> `encoder.{3i}`, `layers.i.layer_norm` -> `encoder.{3i+1}`,
/// `final_conv` -> `encoder.{3n}`.
fn map_downsampler(rest: &str, n_layers: usize, original: &str) -> Result<String> {
    let bad = || Error::Config(format!("unrecognised mask downsampler key `{original}`"));
    if let Some(tail) = rest.strip_prefix("final_conv.") {
        return Ok(format!("encoder.{}.{tail}", 3 * n_layers));
    }
    let tail = rest.strip_prefix("layers.").ok_or_else(bad)?;
    let mut parts = tail.splitn(3, '.');
    let i: usize = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let module = parts.next().ok_or_else(bad)?;
    let param = parts.next().ok_or_else(bad)?;
    let idx = match module {
        "conv" => 3 * i,
        "layer_norm" => 3 * i + 1,
        _ => return Err(bad()),
    };
    Ok(format!("encoder.{idx}.{param}"))
}

/// Number of `proj_in`/`layers.*`/`proj_out` linears per MLP prefix.
fn mlp_depths(names: &[String]) -> BTreeMap<String, usize> {
    let mut depth: BTreeMap<String, usize> = BTreeMap::new();
    for n in names {
        if let Some(pos) = n.find(".proj_in.") {
            depth.entry(n[..pos].to_string()).or_insert(2);
        }
    }
    for n in names {
        for (prefix, d) in depth.iter_mut() {
            if let Some(rest) = n.strip_prefix(&format!("{prefix}.layers.")) {
                if let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                    *d = (*d).max(i + 3);
                }
            }
        }
    }
    depth
}

fn downsampler_layer_count(names: &[String]) -> usize {
    names
        .iter()
        .filter_map(|n| n.strip_prefix("memory_encoder.mask_downsampler.layers."))
        .filter_map(|r| r.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Renumbers MLP linears: `proj_in` -> `layers.0`, `layers.i` -> `layers.{i+1}`,
/// `proj_out` -> `layers.{depth-1}`. Prefixes are already in official naming here, so we
/// translate the prefix back to look up the depth computed on transformers names.
fn map_mlp(key: &str, depths: &BTreeMap<String, usize>) -> String {
    let (prefix, linear, param) = if let Some(pos) = key.find(".proj_in.") {
        (&key[..pos], "in", &key[pos + ".proj_in.".len()..])
    } else if let Some(pos) = key.find(".proj_out.") {
        (&key[..pos], "out", &key[pos + ".proj_out.".len()..])
    } else if let Some(pos) = key.find(".layers.") {
        // Only MLPs that also have a proj_in are renumbered.
        let prefix = &key[..pos];
        if depth_for(prefix, depths).is_none() {
            return key.to_string();
        }
        let rest = &key[pos + ".layers.".len()..];
        let (i, param) = match rest.split_once('.') {
            Some((i, p)) => match i.parse::<usize>() {
                Ok(i) => (i, p),
                Err(_) => return key.to_string(),
            },
            None => return key.to_string(),
        };
        return format!("{prefix}.layers.{}.{param}", i + 1);
    } else {
        return key.to_string();
    };
    let depth = depth_for(prefix, depths).unwrap_or(2);
    let idx = if linear == "in" { 0 } else { depth - 1 };
    format!("{prefix}.layers.{idx}.{param}")
}

fn depth_for(official_prefix: &str, depths: &BTreeMap<String, usize>) -> Option<usize> {
    depths.iter().find_map(|(hf_prefix, d)| {
        let mapped = rename_segments(&apply_prefix_renames(hf_prefix), SEGMENT_RENAMES);
        (mapped == official_prefix).then_some(*d)
    })
}

fn apply_prefix_renames(k: &str) -> String {
    // Compare with a trailing dot so a top-level module name (`object_pointer_proj`) matches.
    let dotted = format!("{k}.");
    for (from, to) in PREFIX_RENAMES {
        if let Some(rest) = dotted.strip_prefix(from) {
            let mapped = format!("{to}{rest}");
            return mapped.trim_end_matches('.').to_string();
        }
    }
    k.to_string()
}

/// Which transformers class a checkpoint was saved from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransformersModel {
    /// `Sam2Model`: image encoder, prompt encoder and mask decoder only.
    Image,
    /// `Sam2VideoModel`: the full model with the memory path.
    Video,
}

/// Reads a transformers `config.json` (`model_type` `sam2` or `sam2_video`) into our
/// [`Sam2Config`](crate::config::Sam2Config).
///
/// The transformers model is SAM2.1 with fixed choices for everything its config does not
/// carry (object-score MLP, signed object-pointer positions, ...), so we start from the
/// `sam2.1_hiera_t` preset and overwrite what the file says. Per the format spec,
/// `mask_decoder_config.dynamic_multimask_via_stability` is honoured. Hiera variants that
/// the official code cannot express (per-stage dims other than doubling) are refused.
pub fn config_from_transformers_json(text: &str) -> Result<(crate::config::Sam2Config, TransformersModel)> {
    use serde_json::Value;
    let src: Value =
        serde_json::from_str(text).map_err(|e| Error::Config(format!("transformers config.json is not JSON: {e}")))?;
    let kind = match src.get("model_type").and_then(Value::as_str) {
        Some("sam2") => TransformersModel::Image,
        Some("sam2_video") => TransformersModel::Video,
        other => {
            return Err(Error::Config(format!(
                "config.json has model_type {other:?}; expected \"sam2\" or \"sam2_video\""
            )))
        }
    };
    let base = crate::config::Sam2Config::preset("sam2.1_hiera_t")?;
    let mut tree =
        serde_json::to_value(&base).map_err(|e| Error::Config(format!("cannot serialise base config: {e}")))?;

    let vision = src.get("vision_config").unwrap_or(&Value::Null);
    let backbone = vision.get("backbone_config").unwrap_or(&Value::Null);
    let trunk_map = [
        ("hidden_size", "/image_encoder/trunk/embed_dim"),
        ("num_attention_heads", "/image_encoder/trunk/num_heads"),
        ("blocks_per_stage", "/image_encoder/trunk/stages"),
        ("window_size_per_stage", "/image_encoder/trunk/window_spec"),
        ("global_attention_blocks", "/image_encoder/trunk/global_att_blocks"),
        (
            "window_positional_embedding_background_size",
            "/image_encoder/trunk/window_pos_embed_bkg_spatial_size",
        ),
        ("query_stride", "/image_encoder/trunk/q_stride"),
        ("num_query_pool_stages", "/image_encoder/trunk/q_pool"),
    ];
    copy_fields(backbone, &mut tree, &trunk_map)?;
    check_hiera_progression(backbone)?;
    copy_fields(
        vision,
        &mut tree,
        &[
            ("backbone_channel_list", "/image_encoder/neck/backbone_channel_list"),
            ("fpn_hidden_size", "/image_encoder/neck/d_model"),
            ("fpn_hidden_size", "/image_encoder/neck/position_encoding/num_pos_feats"),
            ("fpn_top_down_levels", "/image_encoder/neck/fpn_top_down_levels"),
        ],
    )?;
    if let Some(levels) = vision.get("num_feature_levels").and_then(Value::as_u64) {
        let n_stages = backbone
            .get("blocks_per_stage")
            .and_then(Value::as_array)
            .map(|a| a.len() as u64)
            .unwrap_or(4);
        set_path(
            &mut tree,
            "/image_encoder/scalp",
            Value::from(n_stages.saturating_sub(levels)),
        )?;
    }
    if let Some(size) = src
        .pointer("/prompt_encoder_config/image_size")
        .or_else(|| src.get("image_size"))
    {
        set_path(&mut tree, "/image_size", size.clone())?;
    }
    if let Some(md) = src.get("mask_decoder_config") {
        let mut extra = serde_json::Map::new();
        for k in [
            "dynamic_multimask_via_stability",
            "dynamic_multimask_stability_delta",
            "dynamic_multimask_stability_thresh",
        ] {
            if let Some(v) = md.get(k) {
                extra.insert(k.to_string(), v.clone());
            }
        }
        if !extra.is_empty() {
            set_path(&mut tree, "/sam_mask_decoder_extra_args", Value::Object(extra))?;
        }
    }
    if kind == TransformersModel::Video {
        copy_fields(
            &src,
            &mut tree,
            &[
                ("num_maskmem", "/num_maskmem"),
                ("sigmoid_scale_for_mem_enc", "/sigmoid_scale_for_mem_enc"),
                ("sigmoid_bias_for_mem_enc", "/sigmoid_bias_for_mem_enc"),
                ("multimask_output_in_sam", "/multimask_output_in_sam"),
                ("multimask_min_pt_num", "/multimask_min_pt_num"),
                ("multimask_max_pt_num", "/multimask_max_pt_num"),
                ("multimask_output_for_tracking", "/multimask_output_for_tracking"),
                ("max_object_pointers_in_encoder", "/max_obj_ptrs_in_encoder"),
                ("enable_occlusion_spatial_embedding", "/no_obj_embed_spatial"),
                (
                    "enable_temporal_pos_encoding_for_object_pointers",
                    "/add_tpos_enc_to_obj_ptrs",
                ),
                ("memory_attention_hidden_size", "/memory_attention/d_model"),
                ("memory_attention_hidden_size", "/memory_attention/layer/d_model"),
                (
                    "memory_attention_hidden_size",
                    "/memory_attention/layer/self_attention/embedding_dim",
                ),
                (
                    "memory_attention_hidden_size",
                    "/memory_attention/layer/cross_attention/embedding_dim",
                ),
                ("memory_attention_num_layers", "/memory_attention/num_layers"),
                (
                    "memory_attention_num_attention_heads",
                    "/memory_attention/layer/self_attention/num_heads",
                ),
                (
                    "memory_attention_num_attention_heads",
                    "/memory_attention/layer/cross_attention/num_heads",
                ),
                (
                    "memory_attention_downsample_rate",
                    "/memory_attention/layer/self_attention/downsample_rate",
                ),
                (
                    "memory_attention_downsample_rate",
                    "/memory_attention/layer/cross_attention/downsample_rate",
                ),
                (
                    "memory_attention_feed_forward_hidden_size",
                    "/memory_attention/layer/dim_feedforward",
                ),
                (
                    "memory_attention_rope_theta",
                    "/memory_attention/layer/self_attention/rope_theta",
                ),
                (
                    "memory_attention_rope_theta",
                    "/memory_attention/layer/cross_attention/rope_theta",
                ),
                (
                    "memory_encoder_output_channels",
                    "/memory_attention/layer/cross_attention/kv_in_dim",
                ),
                ("memory_encoder_output_channels", "/memory_encoder/out_dim"),
                (
                    "memory_encoder_output_channels",
                    "/memory_encoder/position_encoding/num_pos_feats",
                ),
                (
                    "mask_downsampler_kernel_size",
                    "/memory_encoder/mask_downsampler/kernel_size",
                ),
                ("mask_downsampler_stride", "/memory_encoder/mask_downsampler/stride"),
                ("mask_downsampler_padding", "/memory_encoder/mask_downsampler/padding"),
                (
                    "mask_downsampler_total_stride",
                    "/memory_encoder/mask_downsampler/total_stride",
                ),
                ("memory_fuser_num_layers", "/memory_encoder/fuser/num_layers"),
                ("memory_fuser_embed_dim", "/memory_encoder/fuser/layer/dim"),
                ("memory_fuser_kernel_size", "/memory_encoder/fuser/layer/kernel_size"),
                ("memory_fuser_padding", "/memory_encoder/fuser/layer/padding"),
            ],
        )?;
    }
    let config: crate::config::Sam2Config = serde_json::from_value(tree)
        .map_err(|e| Error::Config(format!("transformers config.json does not map onto SAM2: {e}")))?;
    config.validate()?;
    Ok((config, kind))
}

/// Copies `src[key]` to the JSON pointer `dst` for each pair whose key is present.
fn copy_fields(src: &serde_json::Value, tree: &mut serde_json::Value, pairs: &[(&str, &str)]) -> Result<()> {
    for (key, ptr) in pairs {
        if let Some(v) = src.get(*key) {
            set_path(tree, ptr, v.clone())?;
        }
    }
    Ok(())
}

/// Sets a JSON pointer, creating intermediate objects.
fn set_path(tree: &mut serde_json::Value, ptr: &str, value: serde_json::Value) -> Result<()> {
    let mut cur = tree;
    let parts: Vec<&str> = ptr.trim_start_matches('/').split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let obj = cur
            .as_object_mut()
            .ok_or_else(|| Error::Config(format!("cannot set {ptr}: not an object")))?;
        if i + 1 == parts.len() {
            obj.insert((*part).to_string(), value);
            return Ok(());
        }
        cur = obj
            .entry((*part).to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
    Ok(())
}

/// The official Hiera doubles dim and heads per stage (`dim_mul = head_mul = 2`) and uses
/// an MLP ratio of 4; a transformers config that says otherwise cannot be represented.
fn check_hiera_progression(backbone: &serde_json::Value) -> Result<()> {
    use serde_json::Value;
    let as_vec = |k: &str| -> Option<Vec<u64>> {
        backbone
            .get(k)?
            .as_array()?
            .iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<_>>>()
    };
    let check = |k: &str, first: Option<u64>| -> Result<()> {
        if let (Some(v), Some(first)) = (as_vec(k), first) {
            for (i, d) in v.iter().enumerate() {
                if *d != first << i {
                    return Err(Error::Config(format!(
                        "transformers config `{k}` = {v:?} is not a doubling progression from {first}; \
                         the official Hiera cannot express it"
                    )));
                }
            }
        }
        Ok(())
    };
    check(
        "embed_dim_per_stage",
        backbone.get("hidden_size").and_then(Value::as_u64),
    )?;
    check(
        "num_attention_heads_per_stage",
        backbone.get("num_attention_heads").and_then(Value::as_u64),
    )?;
    if let Some(r) = backbone.get("mlp_ratio").and_then(Value::as_f64) {
        if (r - 4.0).abs() > 1e-9 {
            return Err(Error::Config(format!(
                "transformers Hiera mlp_ratio {r} is not supported (official Hiera uses 4.0)"
            )));
        }
    }
    Ok(())
}

/// Keys of the memory path (absent from an image-only `Sam2Model` checkpoint).
pub const MEMORY_PATH_PREFIXES: &[&str] = &[
    "memory_attention.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "mask_downsample.",
    "no_obj_embed_spatial",
];

/// A model loaded from the transformers format.
#[derive(Debug)]
pub struct LoadedTransformers {
    /// The equivalent official config.
    pub config: crate::config::Sam2Config,
    /// The model, under official key names.
    pub model: crate::model::Sam2Model,
    /// Which transformers class the checkpoint came from.
    pub kind: TransformersModel,
}

/// Loads `config.json` + `model.safetensors` saved by transformers' `Sam2Model` or
/// `Sam2VideoModel`.
///
/// An image-only checkpoint has no memory path: those parameters are zero-filled so the
/// image path (encoder, prompt encoder, mask decoder) runs, and [`LoadedTransformers::kind`]
/// tells callers that tracking is unavailable. Every other key is checked strictly.
pub fn load_transformers(
    config_json: &std::path::Path,
    weights: &std::path::Path,
    image_size: Option<usize>,
    device: &candle_core::Device,
) -> Result<LoadedTransformers> {
    use crate::weights::{load_state_dict, StrictWeights};
    let _span = tracing::info_span!("load_transformers", path = %weights.display()).entered();
    let text = std::fs::read_to_string(config_json).map_err(|source| Error::Io {
        path: config_json.to_path_buf(),
        source,
    })?;
    let (mut config, kind) = config_from_transformers_json(&text)?;
    if let Some(s) = image_size {
        config = config.with_image_size(s)?;
    }
    let raw: Vec<(String, Tensor)> = load_state_dict(weights, device)?.into_iter().collect();
    let mut tensors = convert_state_dict(raw)?.tensors;

    if kind == TransformersModel::Image {
        // Learn the memory path's parameter shapes from a dry build, then zero-fill them.
        let probe = StrictWeights::new(tensors.clone());
        let _ = crate::model::Sam2Model::new(&config, probe.var_builder(candle_core::DType::F32, device));
        for (key, shape) in probe.requested() {
            let is_memory = MEMORY_PATH_PREFIXES.iter().any(|p| key.starts_with(p));
            if is_memory && !tensors.contains_key(&key) {
                let zeros = Tensor::zeros(shape.as_slice(), candle_core::DType::F32, device)?;
                tensors.insert(key, zeros);
            }
        }
    }
    let strict = StrictWeights::new(tensors);
    let model = crate::model::Sam2Model::from_weights(&config, &strict, device)?;
    Ok(LoadedTransformers { config, model, kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_keys(name: &str) -> Vec<(String, Vec<usize>)> {
        let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("test data present");
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let (k, shape) = l.split_once(' ').expect("key shape");
                let dims = shape
                    .trim_matches(|c| c == '(' || c == ')')
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect();
                (k.to_string(), dims)
            })
            .collect()
    }

    fn convert_keys(keys: &[(String, Vec<usize>)]) -> BTreeMap<String, Vec<usize>> {
        let dev = candle_core::Device::Cpu;
        let tensors = keys
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    Tensor::zeros(s.as_slice(), candle_core::DType::F32, &dev).unwrap(),
                )
            })
            .collect();
        let conv = convert_state_dict(tensors).unwrap();
        conv.tensors.into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect()
    }

    /// The transformers `Sam2VideoModel` key set of hiera_t maps exactly onto the official
    /// `SAM2Base` key set of sam2.1_hiera_t, with the same shapes (both dumped from the
    /// Python packages by the fixture tooling).
    #[test]
    fn video_model_keys_map_onto_official_keys() {
        let official: BTreeMap<_, _> = read_keys("sam2.1_hiera_t.original_keys.txt").into_iter().collect();
        let mapped = convert_keys(&read_keys("sam2.1_hiera_t.transformers_video_keys.txt"));
        let missing: Vec<_> = official.keys().filter(|k| !mapped.contains_key(*k)).collect();
        let extra: Vec<_> = mapped.keys().filter(|k| !official.contains_key(*k)).collect();
        assert!(missing.is_empty(), "missing after mapping: {missing:?}");
        assert!(extra.is_empty(), "unexpected after mapping: {extra:?}");
        for (k, shape) in &official {
            assert_eq!(&mapped[k], shape, "shape of {k}");
        }
    }

    /// The image-only `Sam2Model` maps onto the subset the image path needs.
    #[test]
    fn image_model_keys_map_into_official_keys() {
        let official: BTreeMap<_, _> = read_keys("sam2.1_hiera_t.original_keys.txt").into_iter().collect();
        let mapped = convert_keys(&read_keys("sam2.1_hiera_t.transformers_image_keys.txt"));
        for (k, shape) in &mapped {
            assert_eq!(official.get(k), Some(shape), "{k} has no official counterpart");
        }
        assert!(mapped.contains_key("sam_mask_decoder.pred_obj_score_head.layers.2.weight"));
        assert!(mapped.contains_key("sam_prompt_encoder.point_embeddings.3.weight"));
        assert!(mapped.contains_key("no_mem_embed"));
    }

    /// Every rule of the table is needed: without any one of them, some key of the full
    /// video model maps elsewhere.
    #[test]
    fn every_rule_is_used() {
        let keys: Vec<String> = read_keys("sam2.1_hiera_t.transformers_video_keys.txt")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let depths = mlp_depths(&keys);
        let n = downsampler_layer_count(&keys);
        let map_all = |rules: &[Rule]| -> Vec<Option<String>> {
            keys.iter().map(|k| map_key_with(rules, k, &depths, n).ok()).collect()
        };
        let full = map_all(RULES);
        for (i, rule) in RULES.iter().enumerate() {
            let mut without = RULES.to_vec();
            without.remove(i);
            assert_ne!(map_all(&without), full, "rule {i} ({rule:?}) changes no key");
        }
    }

    #[test]
    fn unknown_downsampler_key_is_an_error() {
        let depths = BTreeMap::new();
        assert!(map_key("memory_encoder.mask_downsampler.layers.x.conv.weight", &depths, 4).is_err());
    }
}
