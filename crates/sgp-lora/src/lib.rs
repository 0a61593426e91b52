//! LoRA adapters for SAM2's frozen image encoder.
//!
//! SGP fine-tunes only low-rank adapters on the frozen SAM2.1 Hiera trunk. An adapter
//! adds `alpha/r · B A x` to a linear layer's output; `A` (`[r, in]`) is Kaiming-uniform
//! initialised like PyTorch/peft (`kaiming_uniform_(a=sqrt(5))`) and `B` (`[out, r]`)
//! starts at zero, so a fresh adapter leaves the model's output exactly unchanged.
//!
//! Adapters attach through sgp-sam2's LoRA seam: every targetable layer is an
//! [`sgp_sam2::AdaptableLinear`] and models list them by checkpoint path
//! ([`sgp_sam2::AdaptableModel`]). The base weights are never trainable: only
//! A and B live in the [`candle_nn::VarMap`] returned by [`Lora::varmap`].
//!
//! ```rust
//! use candle_core::{DType, Device};
//! use sgp_lora::{count_trainable, HieraDims, Lora, LoraConfig};
//! use sgp_sam2::{Sam2Config, Sam2Model};
//!
//! // A reduced SAM2.1 (zero weights stand in for a checkpoint).
//! let mut cfg = Sam2Config::preset("sam2.1_hiera_t")?.with_image_size(64)?;
//! let trunk = &mut cfg.image_encoder.trunk;
//! trunk.embed_dim = 16;
//! trunk.stages = vec![1, 2, 2, 1];
//! trunk.global_att_blocks = vec![4];
//! trunk.window_pos_embed_bkg_spatial_size = [5, 5];
//! trunk.window_spec = vec![8, 4, 6, 2];
//! cfg.image_encoder.neck.backbone_channel_list = vec![128, 64, 32, 16];
//! let mut model = Sam2Model::new(&cfg, candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu))?;
//!
//! let mut lora = Lora::attach(&mut model, LoraConfig::new(4, 4.0))?; // q and v of every block
//! let dims = HieraDims::from(&cfg.image_encoder.trunk);
//! assert_eq!(lora.num_trainable_params(), count_trainable(&dims, lora.config())?);
//! lora.set_train(true);
//! // ... AdamW over lora.varmap().all_vars() ...
//! lora.set_train(false);
//! let file = std::env::temp_dir().join(format!("sgp-lora-doc-{}.safetensors", std::process::id()));
//! lora.save(&file, "reduced sam2.1_hiera_t")?;
//! lora.merge(&mut model)?; // inference at the base model's cost
//! # std::fs::remove_file(&file)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Targets
//! See [`Target`] for the pattern syntax. The default ([`Target::hiera_qv`], the
//! paper's) adapts the q and v chunks of every Hiera block's fused `qkv`, including the
//! blocks where the width changes (there `qkv` maps `dim -> 3·dim_out`, and q and v
//! are rows `[0, dim_out)` and `[2·dim_out, 3·dim_out)`). q and v get separate adapters.
//! [`Target::hiera_qkv`], [`Target::hiera_attn_proj`] and [`Target::hiera_mlp`] are
//! the other options.
//!
//! # Trainable parameters (default q/v targets, [`count_trainable`])
//!
//! | model | r = 4 | r = 8 | r = 16 |
//! |---|---:|---:|---:|
//! | hiera_t | 69,888 | 139,776 | 279,552 |
//! | hiera_s | 94,464 | 188,928 | 377,856 |
//! | hiera_b+ | 165,760 | 331,520 | 663,040 |
//! | hiera_l | 429,696 | 859,392 | 1,718,784 |
//!
//! (The seed's code reports 356,352 for hiera_s at r = 16 because it adapts only half of
//! q and v in the three stage-transition blocks.)
//!
//! # Training and eval mode
//! [`Lora::set_train`]`(true)` turns dropout on and lets autograd track A and B; call it
//! before computing a training loss (give `lora.varmap().all_vars()` to
//! `candle_nn::AdamW`). In eval mode (the default) A and B enter the forward pass
//! detached: nothing is tracked, sgp-sam2 keeps its fast inference kernels, and fresh
//! adapters leave SAM2's output bit-identical. In training mode sgp-sam2 switches to
//! its differentiable softmax/layer norm, which round differently (about 1e-7 on the
//! tiny test model).
//!
//! Known limit (candle 0.11.1): the backward of `max_pool2d` scales the gradient by
//! 1/k² (`candle-core/src/backprop.rs`, `Op::MaxPool2D`), and Hiera's query pooling uses
//! it, so gradients that pass the three q-pooling blocks are too small until sgp-sam2's
//! `hiera::max_pool_nhwc` takes a differentiable path (see the ignored test
//! `gradients_through_query_pooling_match_finite_differences`). Without query pooling
//! the LoRA gradients through Hiera match finite differences to 1e-5.
//!
//! # Merging
//! [`Lora::merge`] folds the adapters into the base weights and detaches them;
//! [`Lora::unmerge`] restores the kept original weights bit for bit (no subtraction).
//!
//! # Files
//! [`Lora::save`] / [`Lora::load`]: safetensors with rank, alpha, targets, resolved
//! layers and a hash of the targeted base weights in the metadata ([`read_info`] reads
//! it back without the tensors).

#![warn(missing_docs)]

mod adapters;
mod config;
mod count;
mod error;
mod io;
mod layer;
mod target;

pub use adapters::{base_hash_of, var_name, AOrB, Lora};
pub use config::LoraConfig;
pub use count::{count_trainable, trainable_table, HieraDims};
pub use error::{LoraError, Result};
pub use io::{read_info, AdapterFileInfo};
pub use layer::{LoraChunk, LoraLinear};
pub use target::{resolve, ResolvedLayer, Target};
