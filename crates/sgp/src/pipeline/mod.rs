//! The prompted SAM2 pipelines behind `cargo xtask predict-2d` and `predict-3d`: from files
//! to model inputs (intensity mapping, slicing, tensor conversion) and from predictions
//! back to files (atomic write-back on the input's grid). Commands only parse arguments
//! and call these; the tests call them too.
//!
//! * [`prompt`]: `--box`, `--points`, `--window` and `--modality` from text.
//! * [`image`]: one 2D image ([`segment_image`]).
//! * [`volume`]: one 3D volume by propagation through its slices ([`prepare_volume`],
//!   [`PreparedVolume::segment`], [`write_labels`]).

pub mod image;
pub mod prompt;
pub mod volume;

pub use image::{read_rgb, segment_image, write_mask_png, ImagePrompt, ImageSegmentation};
pub use prompt::{intensity_method, parse_box, parse_points, parse_window};
pub use sgp_sam2::Direction;
pub use volume::{prepare_volume, write_labels, PreparedVolume, VolumePrompt, VolumeRequest, VolumeSegmentation};
