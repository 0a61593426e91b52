//! Reading and writing medical images and label maps.
//!
//! * NIfTI-1 (`.nii`, `.nii.gz`) through the `nifti` crate. The header is kept whole in
//!   [`NiftiGeometry`] so that a label volume derived from an image is written with the same
//!   affine, sform/qform (and their codes), pixdim, dimensions and units.
//! * PNG, JPEG, BMP and TIFF through `image`, read as grey levels (or RGB with [`read_rgb`]).
//!
//! Array axes are the stored ones: `(x, y, z)` for NIfTI (`data[[i, j, k]]` is voxel `(i, j, k)`,
//! whatever the Fortran order on disk), `(row, col)` for 2D raster images. The arrays are always
//! returned in standard (C) memory layout so that `as_slice()` works.
//!
//! Every reader validates sizes against the file length before allocating, so truncated or
//! random files give a [`DataError`] and never a panic or a huge allocation.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use ndarray::{ArrayD, IxDyn};
use nifti::{IntoNdArray, NiftiHeader, NiftiType};

use crate::error::{DataError, Result};

/// NIfTI-1 headers are 348 bytes, followed by a 4-byte extender in single files.
const NIFTI_HEADER_BYTES: usize = 352;
/// Deflate cannot compress better than about 1032:1; a gzip file claiming more data is corrupt.
const MAX_DEFLATE_RATIO: u64 = 1100;
/// Largest volume this crate agrees to decode (bytes of voxel data), far above any dataset used.
const MAX_VOLUME_BYTES: u64 = 8 << 30;

/// How a path is read, judged from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `.nii` or `.nii.gz`.
    Nifti {
        /// Gzip-compressed (`.nii.gz`).
        gz: bool,
    },
    /// `.png`, `.jpg`/`.jpeg`, `.bmp`, `.tif`/`.tiff`.
    Raster,
}

/// The kind of file a path names, from its (case-insensitive) extension.
pub fn file_kind(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".nii.gz") {
        Some(FileKind::Nifti { gz: true })
    } else if name.ends_with(".nii") {
        Some(FileKind::Nifti { gz: false })
    } else if [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"]
        .iter()
        .any(|e| name.ends_with(e))
    {
        Some(FileKind::Raster)
    } else {
        None
    }
}

/// Whether a path names a file this module reads.
pub fn is_supported(path: &Path) -> bool {
    file_kind(path).is_some()
}

/// The file name without its image extension (`case_001.nii.gz` -> `case_001`).
pub fn file_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    for ext in [".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"] {
        if lower.ends_with(ext) {
            return name[..name.len() - ext.len()].to_string();
        }
    }
    path.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The full NIfTI-1 header of a volume, kept to write derived volumes with identical geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiGeometry {
    /// The header as read (datatype, pixdim, qform/sform and their codes, units, ...).
    pub header: NiftiHeader,
}

impl NiftiGeometry {
    /// A fresh header for data that has no NIfTI source (a PNG, a synthetic volume):
    /// spacing on the diagonal of the sform (code 2, aligned), qform unknown.
    pub fn from_spacing(spacing: &[f64]) -> Self {
        let mut header = NiftiHeader {
            sform_code: 2,
            qform_code: 0,
            ..NiftiHeader::default()
        };
        header.xyzt_units = 2; // millimetres
        for (i, s) in spacing.iter().take(7).enumerate() {
            header.pixdim[i + 1] = *s as f32;
        }
        header.srow_x = [spacing.first().copied().unwrap_or(1.0) as f32, 0.0, 0.0, 0.0];
        header.srow_y = [0.0, spacing.get(1).copied().unwrap_or(1.0) as f32, 0.0, 0.0];
        header.srow_z = [0.0, 0.0, spacing.get(2).copied().unwrap_or(1.0) as f32, 0.0];
        header.pixdim[0] = 1.0;
        NiftiGeometry { header }
    }

    /// The dimensions declared in the header (`dim[1..=dim[0]]`), trailing ones included.
    pub fn stored_dim(&self) -> Vec<usize> {
        let n = (self.header.dim[0] as usize).clamp(1, 7);
        self.header.dim[1..=n].iter().map(|&d| d as usize).collect()
    }

    /// `pixdim[1..=3]` as stored.
    pub fn pixdim(&self) -> [f64; 3] {
        [
            self.header.pixdim[1] as f64,
            self.header.pixdim[2] as f64,
            self.header.pixdim[3] as f64,
        ]
    }

    /// The NIfTI datatype code (2 = uint8, 4 = int16, 16 = float32, 512 = uint16, ...).
    pub fn datatype(&self) -> i16 {
        self.header.datatype
    }

    /// The sform matrix (`srow_x/y/z`), when `sform_code > 0`.
    pub fn sform(&self) -> Option<[[f64; 4]; 4]> {
        if self.header.sform_code <= 0 {
            return None;
        }
        let h = &self.header;
        let r = |row: [f32; 4]| row.map(|v| v as f64);
        Some([r(h.srow_x), r(h.srow_y), r(h.srow_z), [0.0, 0.0, 0.0, 1.0]])
    }

    /// The qform matrix from the quaternion, pixdim and qfac, when `qform_code > 0`
    /// (computed here, following the NIfTI-1 specification, so a bad header cannot panic).
    #[allow(clippy::needless_range_loop)] // matrix indices read like the specification
    pub fn qform(&self) -> Option<[[f64; 4]; 4]> {
        if self.header.qform_code <= 0 {
            return None;
        }
        let h = &self.header;
        let (mut b, mut c, mut d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a2 = 1.0 - (b * b + c * c + d * d);
        let a = if a2 < 1e-7 {
            let n = (b * b + c * c + d * d).sqrt();
            if n > 0.0 {
                b /= n;
                c /= n;
                d /= n;
            }
            0.0
        } else {
            a2.sqrt()
        };
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let dx = [
            h.pixdim[1].abs() as f64,
            h.pixdim[2].abs() as f64,
            qfac * h.pixdim[3].abs() as f64,
        ];
        let t = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
        let mut m = [[0.0; 4]; 4];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] = r[i][j] * dx[j];
            }
            m[i][3] = t[i];
        }
        m[3][3] = 1.0;
        Some(m)
    }

    /// The voxel-to-world affine: sform if set, else qform if set, else the spacing on the
    /// diagonal (the priority nibabel and the `nifti` crate use).
    #[allow(clippy::needless_range_loop)]
    pub fn affine(&self) -> [[f64; 4]; 4] {
        if let Some(s) = self.sform() {
            return s;
        }
        if let Some(q) = self.qform() {
            return q;
        }
        let mut m = [[0.0; 4]; 4];
        for i in 0..3 {
            m[i][i] = sanitize_spacing(self.header.pixdim[i + 1] as f64);
        }
        m[3][3] = 1.0;
        m
    }

    /// Whether two headers describe the same voxel grid in space: same dimensions, pixdim,
    /// xform codes and matrices (to `tol`, absolute).
    pub fn same_grid(&self, other: &NiftiGeometry, tol: f64) -> bool {
        let close = |a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]| {
            a.iter()
                .flatten()
                .zip(b.iter().flatten())
                .all(|(x, y)| (x - y).abs() <= tol)
        };
        trim_ones(&self.stored_dim()) == trim_ones(&other.stored_dim())
            && self
                .pixdim()
                .iter()
                .zip(other.pixdim())
                .all(|(a, b)| (a - b).abs() <= tol)
            && self.header.sform_code == other.header.sform_code
            && self.header.qform_code == other.header.qform_code
            && close(&self.affine(), &other.affine())
    }
}

fn trim_ones(d: &[usize]) -> Vec<usize> {
    let mut v = d.to_vec();
    while v.len() > 1 && v.last() == Some(&1) {
        v.pop();
    }
    v
}

/// A voxel grid with its spacing and, for NIfTI sources, its full header.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T> {
    /// Voxel values; axes as stored: `(x, y, z)` for NIfTI, `(row, col)` for 2D images.
    pub data: ArrayD<T>,
    /// Spacing per array axis in mm (`pixdim`, absolute values); 1.0 for PNG and friends.
    pub spacing: Vec<f64>,
    /// The NIfTI header, to write derived volumes with identical geometry.
    pub geometry: Option<NiftiGeometry>,
}

impl<T> Volume<T> {
    /// Shape of the voxel array.
    pub fn shape(&self) -> &[usize] {
        self.data.shape()
    }

    /// A volume on the same grid with other values; errors when the shapes differ.
    pub fn with_data<U>(&self, data: ArrayD<U>) -> Result<Volume<U>> {
        if data.shape() != self.data.shape() {
            return Err(DataError::Shape(format!(
                "new data {:?} vs volume {:?}",
                data.shape(),
                self.data.shape()
            )));
        }
        Ok(Volume {
            data,
            spacing: self.spacing.clone(),
            geometry: self.geometry.clone(),
        })
    }

    /// Apply a function to every voxel, keeping the grid.
    pub fn map<U>(&self, f: impl FnMut(&T) -> U) -> Volume<U> {
        Volume {
            data: self.data.map(f),
            spacing: self.spacing.clone(),
            geometry: self.geometry.clone(),
        }
    }

    /// The volume seen as a 2D image, when it is one: 2 axes, or 3 with a single slice last
    /// (2D NIfTI files are often stored as `(x, y, 1)`).
    pub fn as_2d(&self) -> Option<ndarray::ArrayView2<'_, T>> {
        let v = self.data.view();
        match v.ndim() {
            2 => v.into_dimensionality().ok(),
            3 if v.shape()[2] == 1 => v.index_axis_move(ndarray::Axis(2), 0).into_dimensionality().ok(),
            _ => None,
        }
    }
}

/// `0.7f32` as `0.7f64` rather than `0.699999988...`: the header stores decimal millimetres.
fn f32_to_f64_shortest(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

fn sanitize_spacing(s: f64) -> f64 {
    let s = s.abs();
    if s.is_finite() && s > 0.0 {
        s
    } else {
        1.0
    }
}

/// Read an image (NIfTI or raster) as `f32` intensities. NIfTI slope/intercept are applied;
/// raster images are converted to grey (luma) with their native range (0..255 for 8-bit).
pub fn read_image(path: &Path) -> Result<Volume<f32>> {
    match file_kind(path) {
        Some(FileKind::Nifti { .. }) => read_nifti::<f32>(path),
        Some(FileKind::Raster) => {
            let img = decode_raster(path)?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            let data: Vec<f32> = match &img {
                image::DynamicImage::ImageLuma8(_)
                | image::DynamicImage::ImageLumaA8(_)
                | image::DynamicImage::ImageRgb8(_)
                | image::DynamicImage::ImageRgba8(_) => img.to_luma8().into_raw().into_iter().map(f32::from).collect(),
                image::DynamicImage::ImageLuma16(_)
                | image::DynamicImage::ImageLumaA16(_)
                | image::DynamicImage::ImageRgb16(_)
                | image::DynamicImage::ImageRgba16(_) => {
                    img.to_luma16().into_raw().into_iter().map(f32::from).collect()
                }
                _ => img.to_luma32f().into_raw(),
            };
            raster_volume(path, data, h, w, &[])
        }
        None => Err(DataError::UnsupportedFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Read a raster image as RGB, shape `(row, col, 3)`, values 0..255. Grey images are
/// replicated to three channels. NIfTI files are refused (they are grey).
pub fn read_rgb(path: &Path) -> Result<Volume<f32>> {
    match file_kind(path) {
        Some(FileKind::Raster) => {
            let img = decode_raster(path)?;
            let (w, h) = (img.width() as usize, img.height() as usize);
            let data: Vec<f32> = img.to_rgb8().into_raw().into_iter().map(f32::from).collect();
            raster_volume(path, data, h, w, &[3])
        }
        _ => Err(DataError::UnsupportedFormat {
            path: path.to_path_buf(),
        }),
    }
}

fn raster_volume(path: &Path, data: Vec<f32>, h: usize, w: usize, extra: &[usize]) -> Result<Volume<f32>> {
    let mut shape = vec![h, w];
    shape.extend_from_slice(extra);
    let data = ArrayD::from_shape_vec(IxDyn(&shape), data)
        .map_err(|e| DataError::image(path, format!("decoded size mismatch: {e}")))?;
    Ok(Volume {
        data,
        spacing: vec![1.0, 1.0],
        geometry: None,
    })
}

fn decode_raster(path: &Path) -> Result<image::DynamicImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    // The default limits (512 MiB) protect against absurd declared sizes.
    reader.decode().map_err(|e| DataError::image(path, e.to_string()))
}

/// Read an integer label map. NIfTI values must be integers in `0..=65535` (float storage is
/// accepted when the values are integral). Raster masks are read as grey levels; a binary mask
/// stored as 0/255 (or 0/65535) becomes 0/1. Masks coded by other grey levels keep their grey
/// values here: map them with the dataset's [`crate::labels::LabelCoding`].
pub fn read_labels(path: &Path) -> Result<Volume<u16>> {
    match file_kind(path) {
        Some(FileKind::Nifti { .. }) => {
            let v = read_nifti::<f64>(path)?;
            let mut bad = None;
            let data = v.data.mapv(|x| {
                let r = x.round();
                if !(0.0..=65535.0).contains(&r) || (x - r).abs() > 1e-3 {
                    bad.get_or_insert(x);
                    0
                } else {
                    r as u16
                }
            });
            if let Some(x) = bad {
                return Err(DataError::labels(
                    path,
                    format!("value {x} is not an integer label in 0..=65535"),
                ));
            }
            Ok(Volume {
                data,
                spacing: v.spacing,
                geometry: v.geometry,
            })
        }
        Some(FileKind::Raster) => {
            let grey = read_raster_grey_levels(path)?;
            let max = grey.data.iter().copied().max().unwrap_or(0);
            let binary_top = if max == 255 || max == 65535 { Some(max) } else { None };
            let data = match binary_top {
                Some(top) if grey.data.iter().all(|&v| v == 0 || v == top) => grey.data.mapv(|v| u16::from(v == top)),
                _ => grey.data,
            };
            Ok(Volume {
                data,
                spacing: grey.spacing,
                geometry: None,
            })
        }
        None => Err(DataError::UnsupportedFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Read a raster mask's grey levels as they are (no 0/255 mapping): 8-bit images give
/// 0..=255, 16-bit ones 0..=65535. Colour masks are converted to luma.
pub fn read_raster_grey_levels(path: &Path) -> Result<Volume<u16>> {
    let img = decode_raster(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let sixteen = matches!(
        img,
        image::DynamicImage::ImageLuma16(_)
            | image::DynamicImage::ImageLumaA16(_)
            | image::DynamicImage::ImageRgb16(_)
            | image::DynamicImage::ImageRgba16(_)
    );
    let raw: Vec<u16> = if sixteen {
        img.to_luma16().into_raw()
    } else {
        img.to_luma8().into_raw().into_iter().map(u16::from).collect()
    };
    let data = ArrayD::from_shape_vec(IxDyn(&[h, w]), raw)
        .map_err(|e| DataError::image(path, format!("decoded size mismatch: {e}")))?;
    Ok(Volume {
        data,
        spacing: vec![1.0, 1.0],
        geometry: None,
    })
}

/// Read only the header of a NIfTI file (cheap geometry checks).
pub fn read_nifti_header(path: &Path) -> Result<NiftiGeometry> {
    let mut reader = open_maybe_gz(path)?;
    let mut head = vec![0u8; 348];
    reader
        .read_exact(&mut head)
        .map_err(|e| DataError::nifti(path, format!("header: {e}")))?;
    let header = NiftiHeader::from_reader(&head[..]).map_err(|e| DataError::nifti(path, e.to_string()))?;
    Ok(NiftiGeometry { header })
}

fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::new(file);
    // Judge compression from the content, not the name: misnamed files are common.
    let is_gz = {
        use std::io::BufRead;
        let buf = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
        buf.len() >= 2 && buf[0] == 0x1f && buf[1] == 0x8b
    };
    Ok(if is_gz {
        Box::new(MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    })
}

/// Read a NIfTI-1 single file (`.nii` or `.nii.gz`) into an array of `T`, with its header.
fn read_nifti<T: nifti::DataElement>(path: &Path) -> Result<Volume<T>> {
    let file_len = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
    let mut reader = open_maybe_gz(path)?;
    let mut head = vec![0u8; NIFTI_HEADER_BYTES];
    reader
        .read_exact(&mut head[..348])
        .map_err(|e| DataError::nifti(path, format!("truncated or corrupt header: {e}")))?;
    let header = NiftiHeader::from_reader(&head[..348]).map_err(|e| DataError::nifti(path, e.to_string()))?;
    if &header.magic != nifti::header::MAGIC_CODE_NIP1 {
        return Err(DataError::nifti(
            path,
            "not a single-file NIfTI-1 (magic is not \"n+1\"; .hdr/.img pairs are not supported)",
        ));
    }
    let datatype = header.data_type().map_err(|e| DataError::nifti(path, e.to_string()))?;
    if matches!(
        datatype,
        NiftiType::Rgb24
            | NiftiType::Rgba32
            | NiftiType::Complex64
            | NiftiType::Complex128
            | NiftiType::Complex256
            | NiftiType::Float128
    ) {
        return Err(DataError::nifti(path, format!("unsupported voxel type {datatype:?}")));
    }
    let dims = header
        .dim()
        .map_err(|e| DataError::nifti(path, e.to_string()))?
        .to_vec();
    let voxels = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
    let nbytes = voxels
        .and_then(|v| v.checked_mul(datatype.size_of() as u64))
        .filter(|&b| b <= MAX_VOLUME_BYTES)
        .ok_or_else(|| DataError::nifti(path, format!("absurd dimensions {dims:?}")))?;
    let vox_offset = header.vox_offset;
    if !vox_offset.is_finite() || vox_offset < 0.0 || vox_offset > (1u32 << 30) as f32 {
        return Err(DataError::nifti(path, format!("bad vox_offset {vox_offset}")));
    }
    let vox_offset = (vox_offset as u64).max(NIFTI_HEADER_BYTES as u64);
    let needed = vox_offset + nbytes;
    let bound = if file_len >= 2 && is_gz_content(path) {
        file_len.saturating_mul(MAX_DEFLATE_RATIO)
    } else {
        file_len
    };
    if needed > bound {
        return Err(DataError::nifti(
            path,
            format!("truncated: the header declares {needed} bytes (dims {dims:?}, {datatype:?}) but the file cannot hold them"),
        ));
    }
    // Skip the extender and extensions, then read exactly the voxel bytes.
    let mut skip = vec![0u8; (vox_offset - 348) as usize];
    reader
        .read_exact(&mut skip)
        .map_err(|e| DataError::nifti(path, format!("truncated before the data: {e}")))?;
    let mut raw = Vec::new();
    raw.try_reserve_exact(nbytes as usize)
        .map_err(|e| DataError::nifti(path, format!("cannot allocate {nbytes} bytes: {e}")))?;
    let got = reader
        .take(nbytes)
        .read_to_end(&mut raw)
        .map_err(|e| DataError::nifti(path, format!("corrupt data: {e}")))?;
    if got as u64 != nbytes {
        return Err(DataError::nifti(
            path,
            format!("truncated: {got} of {nbytes} data bytes present"),
        ));
    }
    // bitpix is redundant with the datatype and sometimes wrong in the wild: trust the datatype.
    let mut volume_header = header.clone();
    volume_header.bitpix = (datatype.size_of() * 8) as i16;
    let volume = nifti::InMemNiftiVolume::from_raw_data(&volume_header, raw)
        .map_err(|e| DataError::nifti(path, e.to_string()))?;
    let arr: ArrayD<T> = volume
        .into_ndarray::<T>()
        .map_err(|e| DataError::nifti(path, e.to_string()))?;
    // Drop trailing singleton axes beyond the third ((x, y, z, 1) -> (x, y, z)).
    let mut shape: Vec<usize> = arr.shape().to_vec();
    while shape.len() > 3 && shape.last() == Some(&1) {
        shape.pop();
    }
    let arr = arr.as_standard_layout().into_owned();
    let arr = arr
        .into_shape_with_order(IxDyn(&shape))
        .map_err(|e| DataError::nifti(path, format!("reshape: {e}")))?;
    let spacing = (0..shape.len())
        .map(|i| sanitize_spacing(f32_to_f64_shortest(header.pixdim.get(i + 1).copied().unwrap_or(1.0))))
        .collect();
    Ok(Volume {
        data: arr,
        spacing,
        geometry: Some(NiftiGeometry { header }),
    })
}

fn is_gz_content(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == [0x1f, 0x8b]
}

/// Write a label map on the grid of `reference`, atomically.
///
/// * `.nii`/`.nii.gz`: the reference's header is copied (affine, sform/qform and codes, pixdim,
///   units, dimensions including trailing ones); without a NIfTI reference, a header is built
///   from its spacing. The datatype is the reference's when it is an integer type that holds
///   every label (so a ground-truth-like file keeps its type), otherwise uint8 when the labels
///   fit, else uint16. Slope/intercept are reset to 1/0 and cal_min/cal_max to 0.
/// * `.png`/`.bmp`/`.tif`: 2D labels only, written as 8-bit grey (16-bit for labels > 255 in
///   PNG/TIFF), label values as grey levels; array axis 0 is image rows.
pub fn write_labels_like<T>(path: &Path, labels: &ArrayD<u16>, reference: &Volume<T>) -> Result<()> {
    if labels.shape() != reference.data.shape() {
        return Err(DataError::Shape(format!(
            "labels {:?} vs reference {:?} (for {})",
            labels.shape(),
            reference.data.shape(),
            path.display()
        )));
    }
    match file_kind(path) {
        Some(FileKind::Nifti { .. }) => {
            let geometry = reference
                .geometry
                .clone()
                .unwrap_or_else(|| NiftiGeometry::from_spacing(&reference.spacing));
            write_nifti_labels(path, labels, &geometry)
        }
        Some(FileKind::Raster) => write_raster_labels(path, labels),
        None => Err(DataError::UnsupportedFormat {
            path: path.to_path_buf(),
        }),
    }
}

/// Write `f32` values (probabilities, preprocessed intensities) on the grid of `reference`,
/// atomically, as NIfTI float32 with the reference's geometry.
pub fn write_float_like<T>(path: &Path, values: &ArrayD<f32>, reference: &Volume<T>) -> Result<()> {
    if values.shape() != reference.data.shape() {
        return Err(DataError::Shape(format!(
            "values {:?} vs reference {:?}",
            values.shape(),
            reference.data.shape()
        )));
    }
    if !matches!(file_kind(path), Some(FileKind::Nifti { .. })) {
        return Err(DataError::UnsupportedFormat {
            path: path.to_path_buf(),
        });
    }
    let geometry = reference
        .geometry
        .clone()
        .unwrap_or_else(|| NiftiGeometry::from_spacing(&reference.spacing));
    let data = reshape_to_stored(values, &geometry)?;
    write_nifti_atomic(path, &geometry, |opts| opts.write_nifti(&data))
}

fn reshape_to_stored<A: Clone>(data: &ArrayD<A>, geometry: &NiftiGeometry) -> Result<ArrayD<A>> {
    let stored = geometry.stored_dim();
    let target: Vec<usize> =
        if stored.iter().product::<usize>() == data.len() && trim_ones(&stored) == trim_ones(data.shape()) {
            stored
        } else {
            data.shape().to_vec()
        };
    data.to_owned()
        .into_shape_with_order(IxDyn(&target))
        .map_err(|e| DataError::Shape(format!("reshape to {target:?}: {e}")))
}

/// Pick the on-disk type of a label volume; see [`write_labels_like`].
fn label_datatype(reference_type: i16, max_label: u16) -> NiftiType {
    let fits = |t: NiftiType| -> bool {
        let cap: u64 = match t {
            NiftiType::Uint8 => 255,
            NiftiType::Int8 => 127,
            NiftiType::Int16 => 32767,
            NiftiType::Uint16 | NiftiType::Int32 | NiftiType::Uint32 | NiftiType::Int64 | NiftiType::Uint64 => 65535,
            _ => 0,
        };
        cap >= max_label as u64
    };
    let reference = nifti_type_from_code(reference_type);
    match reference {
        Some(t) if fits(t) => t,
        _ if max_label <= 255 => NiftiType::Uint8,
        _ => NiftiType::Uint16,
    }
}

/// The integer and float NIfTI types by code (`NiftiType` has no public constructor from one).
fn nifti_type_from_code(code: i16) -> Option<NiftiType> {
    Some(match code {
        2 => NiftiType::Uint8,
        4 => NiftiType::Int16,
        8 => NiftiType::Int32,
        16 => NiftiType::Float32,
        64 => NiftiType::Float64,
        256 => NiftiType::Int8,
        512 => NiftiType::Uint16,
        768 => NiftiType::Uint32,
        1024 => NiftiType::Int64,
        1280 => NiftiType::Uint64,
        _ => return None,
    })
}

fn write_nifti_labels(path: &Path, labels: &ArrayD<u16>, geometry: &NiftiGeometry) -> Result<()> {
    let max = labels.iter().copied().max().unwrap_or(0);
    let dt = label_datatype(geometry.header.datatype, max);
    let data = reshape_to_stored(labels, geometry)?;
    let mut geometry = geometry.clone();
    geometry.header.cal_min = 0.0;
    geometry.header.cal_max = 0.0;
    write_nifti_atomic(path, &geometry, |opts| match dt {
        NiftiType::Uint8 => opts.write_nifti(&data.mapv(|v| v as u8)),
        NiftiType::Int8 => opts.write_nifti(&data.mapv(|v| v as i8)),
        NiftiType::Int16 => opts.write_nifti(&data.mapv(|v| v as i16)),
        NiftiType::Int32 => opts.write_nifti(&data.mapv(|v| v as i32)),
        NiftiType::Uint32 => opts.write_nifti(&data.mapv(|v| v as u32)),
        NiftiType::Int64 => opts.write_nifti(&data.mapv(|v| v as i64)),
        NiftiType::Uint64 => opts.write_nifti(&data.mapv(|v| v as u64)),
        _ => opts.write_nifti(&data),
    })
}

/// Write through a temporary file in the destination folder, then rename: readers never see
/// a half-written file.
fn write_nifti_atomic(
    path: &Path,
    geometry: &NiftiGeometry,
    write: impl FnOnce(nifti::writer::WriterOptions<'_>) -> nifti::Result<()>,
) -> Result<()> {
    let gz = matches!(file_kind(path), Some(FileKind::Nifti { gz: true }));
    let tmp = temp_in_dir(path, if gz { ".nii.gz" } else { ".nii" })?;
    let opts = nifti::writer::WriterOptions::new(tmp.path()).reference_header(&geometry.header);
    write(opts).map_err(|e| DataError::nifti(path, format!("write failed: {e}")))?;
    tmp.persist(path).map_err(|e| DataError::io(path, e.error))?;
    Ok(())
}

fn temp_in_dir(path: &Path, suffix: &str) -> Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".sgp-tmp-").suffix(suffix);
    // Temporary files are private (0600); outputs are for everyone who may read the folder.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    builder.tempfile_in(&dir).map_err(|e| DataError::io(&dir, e))
}

/// Writes `bytes` to `path` through a temporary file in the same folder, then renames it:
/// readers never see a half-written file, and a failure leaves the old file intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp = temp_in_dir(path, ".part")?;
    tmp.write_all(bytes).map_err(|e| DataError::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| DataError::io(path, e))?;
    tmp.persist(path).map_err(|e| DataError::io(path, e.error))?;
    Ok(())
}

fn write_raster_labels(path: &Path, labels: &ArrayD<u16>) -> Result<()> {
    if labels.ndim() != 2 {
        return Err(DataError::Shape(format!(
            "raster output needs 2D labels, got {:?}",
            labels.shape()
        )));
    }
    let (h, w) = (labels.shape()[0] as u32, labels.shape()[1] as u32);
    let max = labels.iter().copied().max().unwrap_or(0);
    let std = labels.as_standard_layout();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let ext = name.rsplit('.').next().unwrap_or("png").to_string();
    let format = image::ImageFormat::from_extension(&ext).ok_or_else(|| DataError::UnsupportedFormat {
        path: path.to_path_buf(),
    })?;
    if matches!(format, image::ImageFormat::Jpeg) {
        return Err(DataError::InvalidArgument(format!(
            "{}: JPEG is lossy; labels need PNG, BMP or TIFF",
            path.display()
        )));
    }
    let tmp = temp_in_dir(path, &format!(".{ext}"))?;
    let result = if max <= 255 {
        let raw: Vec<u8> = std.iter().map(|&v| v as u8).collect();
        image::GrayImage::from_raw(w, h, raw)
            .ok_or_else(|| DataError::Shape("label buffer size".into()))?
            .save_with_format(tmp.path(), format)
    } else {
        let raw: Vec<u16> = std.iter().copied().collect();
        image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_raw(w, h, raw)
            .ok_or_else(|| DataError::Shape("label buffer size".into()))?
            .save_with_format(tmp.path(), format)
    };
    result.map_err(|e| DataError::image(path, format!("write failed: {e}")))?;
    tmp.persist(path).map_err(|e| DataError::io(path, e.error))?;
    Ok(())
}
