//! Prompted 3D segmentation of a volume by propagating SAM2's memory through its slices
//! (the semantics of `SAM2VideoPredictor` for one object).
//!
//! The steps, each a function so that commands and tests share them:
//! 1. [`prepare_volume`]: intensities to [0, 1] over the whole volume
//!    ([`sgp_data::preprocess::normalize_intensity`]), slices along an axis, and the prompt
//!    of the prompted slice checked against the slice size. Everything that can fail on
//!    user input fails here, before a model is loaded.
//! 2. [`PreparedVolume::segment`]: propagation ([`VolumePropagator`]); the model's own
//!    transform resizes each slice to S×S and normalises it.
//! 3. [`write_labels`]: the 0/1 label volume, written atomically with the input's header and
//!    affine.
//!
//! Slice geometry: in a slice image, columns run along the lower remaining array axis and
//! rows along the higher one (for axis 2: x → columns, y → rows), so prompt coordinates
//! `x,y` are voxel indices.

use std::path::Path;

use candle_core::{Device, Tensor};
use ndarray::{ArrayD, IxDyn};
use sgp_data::preprocess::{normalize_intensity, IntensityMethod};
use sgp_data::Volume;
use sgp_sam2::Sam2Model;
use sgp_sam2::{Direction, SlicePrompt, VolumePropagator, VolumeSlices};

use crate::{Error, Result};

/// The prompt on the prompted slice.
#[derive(Debug, Clone, PartialEq)]
pub enum VolumePrompt {
    /// `[x0, y0, x1, y1]` in voxels of the slice.
    Box([f32; 4]),
    /// `(x, y)` voxels of the slice with labels (1 foreground, 0 background).
    Points(Vec<[f32; 2]>, Vec<i32>),
    /// A label volume on the volume's grid; its non-zero voxels on the prompted slice are
    /// the object.
    Mask(ArrayD<u16>),
}

/// What to segment and how.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRequest {
    /// Slice axis of the volume array (0, 1 or 2).
    pub axis: usize,
    /// The prompted slice index along `axis`.
    pub slice: usize,
    /// The prompt on that slice.
    pub prompt: VolumePrompt,
    /// Which slices to propagate to.
    pub direction: Direction,
    /// How raw intensities become [0, 1].
    pub intensity: IntensityMethod,
}

/// A volume ready for propagation: normalised slices and the checked prompt.
#[derive(Debug, Clone)]
pub struct PreparedVolume {
    slices: VolumeSlices,
    prompt: SlicePrompt,
    slice: usize,
    direction: Direction,
    /// The array shape as read (a trailing singleton axis is kept for the write-back).
    shape: Vec<usize>,
    shape3: [usize; 3],
    axis: usize,
}

/// The outcome of [`PreparedVolume::segment`].
#[derive(Debug, Clone)]
pub struct VolumeSegmentation {
    /// 0/1 labels with the shape of the input array.
    pub labels: ArrayD<u16>,
    /// Number of foreground voxels.
    pub foreground_voxels: usize,
    /// Number of slices along the axis.
    pub slices: usize,
    /// The largest number of frames the memory bank held at once (memory stays bounded).
    pub peak_bank_len: usize,
}

/// The `(d0, d1, d2)` grid of a 3D volume (a trailing singleton fourth axis is accepted).
pub fn volume_shape3(shape: &[usize]) -> Result<[usize; 3]> {
    match shape {
        [a, b, c] | [a, b, c, 1] => Ok([*a, *b, *c]),
        s => Err(Error::Input(format!("not a 3D volume (shape {s:?})"))),
    }
}

/// Step 1: checks the request against `image` and prepares the slices. Fails with
/// [`Error::Input`] on an axis or slice out of range, a prompt outside the slice, a mask of
/// another shape or an empty mask slice.
pub fn prepare_volume(image: &Volume<f32>, request: &VolumeRequest) -> Result<PreparedVolume> {
    let _span = tracing::info_span!("prepare_volume", axis = request.axis, slice = request.slice).entered();
    let shape3 = volume_shape3(image.shape())?;
    let axis = request.axis;
    if axis > 2 {
        return Err(Error::Input(format!("--axis must be 0, 1 or 2, got {axis}")));
    }
    if request.slice >= shape3[axis] {
        return Err(Error::Input(format!(
            "--slice {} out of range: axis {axis} has {} slices",
            request.slice, shape3[axis]
        )));
    }
    let norm = normalize_intensity(&image.data, request.intensity, None)?;
    let slices = VolumeSlices::new(norm.iter().copied().collect(), shape3, axis)?;
    let prompt = slice_prompt(&request.prompt, image.shape(), request.slice, &slices)?;
    Ok(PreparedVolume {
        slices,
        prompt,
        slice: request.slice,
        direction: request.direction,
        shape: image.shape().to_vec(),
        shape3,
        axis,
    })
}

/// The prompt of the prompted slice, in that slice's pixels.
fn slice_prompt(prompt: &VolumePrompt, shape: &[usize], slice: usize, slices: &VolumeSlices) -> Result<SlicePrompt> {
    let (h, w) = slices.slice_hw();
    match prompt {
        VolumePrompt::Box(b) => {
            if b[0] < 0.0 || b[1] < 0.0 || b[2] > w as f32 || b[3] > h as f32 || b[2] <= b[0] || b[3] <= b[1] {
                return Err(Error::Input(format!(
                    "--box {b:?} lies outside the {w}×{h} slice or is empty"
                )));
            }
            Ok(SlicePrompt::Box(*b))
        }
        VolumePrompt::Points(pts, labels) => {
            if pts.is_empty() || pts.len() != labels.len() {
                return Err(Error::Input(format!(
                    "{} points but {} labels",
                    pts.len(),
                    labels.len()
                )));
            }
            if let Some(bad) = pts
                .iter()
                .find(|q| q[0] < 0.0 || q[1] < 0.0 || q[0] >= w as f32 || q[1] >= h as f32)
            {
                return Err(Error::Input(format!("point {bad:?} lies outside the {w}×{h} slice")));
            }
            Ok(SlicePrompt::Points(pts.clone(), labels.clone()))
        }
        VolumePrompt::Mask(m) => {
            if m.shape() != shape {
                return Err(Error::Input(format!(
                    "the mask has shape {:?}, the volume {shape:?}",
                    m.shape()
                )));
            }
            let flat: Vec<u16> = m.iter().copied().collect();
            let mut mask = vec![0f32; h * w];
            for r in 0..h {
                for c in 0..w {
                    mask[r * w + c] = f32::from(flat[slices.voxel_index(slice, r, c)] > 0);
                }
            }
            if !mask.iter().any(|&v| v > 0.0) {
                return Err(Error::Input(format!("the mask is empty on slice {slice}")));
            }
            Ok(SlicePrompt::Mask(Tensor::from_vec(mask, (h, w), &Device::Cpu)?))
        }
    }
}

impl PreparedVolume {
    /// Number of slices along the axis.
    pub fn num_slices(&self) -> usize {
        self.shape3[self.axis]
    }

    /// `(rows, cols)` of a slice.
    pub fn slice_hw(&self) -> (usize, usize) {
        self.slices.slice_hw()
    }

    /// Step 2: propagates through the slices. `on_slice(done, total)` reports progress
    /// (for a progress bar). The model needs its memory path (not an image-only
    /// transformers `Sam2Model` checkpoint; [`crate::Pretrained::has_memory_path`]).
    pub fn segment(&self, model: &Sam2Model, on_slice: &mut dyn FnMut(usize, usize)) -> Result<VolumeSegmentation> {
        let _span = tracing::info_span!("segment_volume", slices = self.num_slices()).entered();
        let mut prop = VolumePropagator::new(model);
        let labels = prop.segment_volume(
            &self.slices,
            &[(self.slice, self.prompt.clone())],
            self.direction,
            on_slice,
        )?;
        let foreground_voxels = labels.iter().filter(|&&v| v > 0).count();
        let labels = ArrayD::from_shape_vec(IxDyn(&self.shape), labels.into_iter().map(u16::from).collect())
            .map_err(|e| Error::Input(format!("label volume shape {:?}: {e}", self.shape)))?;
        Ok(VolumeSegmentation {
            labels,
            foreground_voxels,
            slices: self.num_slices(),
            peak_bank_len: prop.peak_bank_len,
        })
    }
}

/// Step 3: writes `labels` on the grid of `reference` (same header and affine; the
/// datatype is chosen by [`sgp_data::write_labels_like`]), creating the parent folder.
pub fn write_labels(out: &Path, labels: &ArrayD<u16>, reference: &Volume<f32>) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    sgp_data::write_labels_like(out, labels, reference)?;
    Ok(())
}
