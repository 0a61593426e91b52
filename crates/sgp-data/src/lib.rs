//! sgp-data: medical image IO, the datasets' own layouts, preprocessing and splits for
//! SAM2-SGP. It hands `ndarray` arrays to the model crates and does not depend on candle.
//!
//! # IO ([`io`], re-exported here)
//!
//! ```no_run
//! use std::path::Path;
//! # fn main() -> sgp_data::Result<()> {
//! let image = sgp_data::read_image(Path::new("datasets/demo/imagesTr/lung1_0000.nii.gz"))?;
//! // image.data: (x, y, z) f32, image.spacing: mm per axis, image.geometry: the NIfTI header.
//! let labels = image.data.mapv(|v| u16::from(v > 0.0));
//! sgp_data::write_labels_like(Path::new("/tmp/lung1_pred.nii.gz"), &labels, &image)?;
//! # Ok(()) }
//! ```
//!
//! * [`Volume<T>`]: `data` (axes as stored: `(x, y, z)` for NIfTI with `data[[i, j, k]]` =
//!   voxel `(i, j, k)`; `(row, col)` for 2D raster images; always C memory layout), `spacing`
//!   (mm per axis; 1.0 for raster images), `geometry` (the whole NIfTI header).
//! * [`read_image`] (f32 intensities; NIfTI slope/intercept applied; raster images as grey),
//!   [`read_rgb`] (`(row, col, 3)`), [`read_labels`] (u16; integral values only; a 0/255 raster
//!   mask becomes 0/1), [`read_raster_grey_levels`] (raw grey levels, for grey-coded masks).
//! * [`write_labels_like`] / [`write_float_like`]: atomic writes on the reference's grid. A
//!   label volume written from a NIfTI image reopens with the same affine, sform/qform and
//!   codes, pixdim, units and dimensions. Labels keep the reference's datatype when it is an
//!   integer type that holds them, otherwise uint8 (or uint16 above 255).
//! * Trailing singleton axes beyond the third are dropped on read (`(x, y, z, 1)` ->
//!   `(x, y, z)`) and restored on write.
//!
//! # Datasets ([`dataset`], [`layouts`], [`labels`])
//!
//! [`load`]`(kind, root)` reads a folder exactly as distributed (ACDC, CAMUS NIfTI, BUSI,
//! REFUGE, WBC, nnU-Net raw, BiomedParse, a generic images+masks pair, the bundled demo) into a
//! [`Dataset`]: [`Case`]s (id, patient, image paths, label sources, modality, metadata), a
//! [`LabelDefinition`] (names plus how masks encode labels: integers, binary, grey levels) and
//! the [`Issue`]s found while scanning. Each layout module documents its folder tree, which
//! sub-folder of the download `root` may be, and its label convention.
//!
//! # Preprocessing ([`preprocess`]) and splits ([`split`])
//!
//! Intensity normalisation per modality (CT/MR: percentiles 0.5/99.5 of the volume, or a CT
//! window; US/photos: min-max), 2D slices along any axis (in-plane convention documented at
//! [`preprocess::slice_2d`]; orientation as stored, or RAS-canonical through
//! [`preprocess::Reorientation`]), array resizing (matching torch's `interpolate`), and
//! deterministic seeded patient-level splits. The model-side transform is
//! `sgp_sam2::Preprocess`.
//!
//! # Integrity check ([`mod@verify`])
//!
//! [`verify()`] opens every case and reports unreadable files, image/label shape and geometry
//! mismatches, label values outside the definition, empty masks and missing pairs
//! (`cargo xtask data verify`).

#![warn(missing_docs)]

pub mod dataset;
pub mod dicom;
pub mod error;
pub mod io;
pub mod labels;
pub mod layouts;
pub mod preprocess;
pub mod split;
pub mod verify;

pub use dataset::{load, load_with, Case, Dataset, DatasetKind, Issue, LabelSource, Modality, ScanOptions};
pub use error::{DataError, Result};
pub use io::{
    file_kind, file_stem, read_image, read_labels, read_nifti_header, read_raster_grey_levels, read_rgb, write_atomic,
    write_float_like, write_labels_like, FileKind, NiftiGeometry, Volume,
};
pub use labels::{LabelCoding, LabelDefinition};
pub use split::{split_by_patient, SplitConfig, Splits};
pub use verify::{verify, VerifyReport};
