//! DICOM series (one slice per file, as scanners and PACS export them) read as a volume with
//! its geometry, so that `predict` and `eval` take clinical data directly and write NIfTI
//! outputs that sit exactly on the scan.
//!
//! ```no_run
//! # fn main() -> sgp_data::Result<()> {
//! let volume = sgp_data::dicom::read_series(std::path::Path::new("CT_series/"))?;
//! // volume.data: (column, row, slice) f32, rescale slope/intercept applied;
//! // volume.geometry: a NIfTI header whose sform is the RAS voxel-to-world affine.
//! # Ok(()) }
//! ```
//!
//! # Conventions (the ones nibabel and dicom2nifti use)
//!
//! * Array axes `(i, j, k)` = (column, row, slice), like a NIfTI file converted without
//!   reorientation: `data[[i, j, k]]` is pixel (row `j`, column `i`) of the `k`-th slice.
//! * Slices are ordered by `ImagePositionPatient` projected on the slice normal
//!   (`row cosines × column cosines`), ascending; file names and `InstanceNumber` are ignored,
//!   since neither is reliable.
//! * The affine maps `(i, j, k)` to world millimetres. DICOM's patient space is LPS; NIfTI's is
//!   RAS, so the first two rows of the DICOM affine are negated (what nibabel, dicom2nifti
//!   and dcm2niix all do). Column `i` steps by `PixelSpacing[1]` along the row cosines, row
//!   `j` by `PixelSpacing[0]` along the column cosines, and slice `k` by the mean step between
//!   consecutive slice positions (so a gantry tilt shows as a shear, not a lie). dcm2niix
//!   also flips the row axis on disk; that describes the same voxels in the same places.
//! * Intensities are the stored values times `RescaleSlope` plus `RescaleIntercept` of each
//!   file (Hounsfield units for CT); MONOCHROME1 is not inverted (values keep their meaning).
//! * The header has `sform_code` 1 (scanner) and no qform; pixdim holds the three spacings.
//!
//! # What is refused, with an error naming the file
//!
//! Files that are not DICOM or whose pixel data cannot be decoded (transfer syntaxes: those
//! the pure-Rust `dicom-pixeldata` decoders handle: uncompressed, deflate, RLE, JPEG baseline
//! and lossless), colour or multi-frame images, and folders that are not one series: several
//! `SeriesInstanceUID`s, different orientations, sizes or pixel spacings, two slices at one
//! position (echoes, phases), or uneven slice steps (a missing slice).

use std::path::{Path, PathBuf};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
use ndarray::{ArrayD, IxDyn};
use nifti::NiftiHeader;
use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::io::{NiftiGeometry, Volume};

/// Orientation cosines of two slices agree within this (unitless).
const ORIENTATION_TOL: f64 = 1e-4;
/// Slice steps may differ from their mean by this fraction (or 0.01 mm) before the series is
/// called uneven.
const STEP_REL_TOL: f64 = 0.01;

fn err(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Dicom {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Whether `path` is a file starting with the DICOM Part 10 preamble (`DICM` at byte 128).
pub fn is_dicom_file(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[128..132] == b"DICM"
}

/// Whether `path` is a folder holding at least one DICOM file (a series to [`read_series`]).
pub fn is_dicom_series_dir(path: &Path) -> bool {
    path.is_dir()
        && series_files(path)
            .map(|f| f.iter().any(|p| is_dicom_file(p)))
            .unwrap_or(false)
}

/// The files of a series folder: every regular, non-hidden file except a `DICOMDIR` index,
/// sorted by name (only for deterministic error messages; slices are ordered by position).
fn series_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.eq_ignore_ascii_case("DICOMDIR") || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// One decoded slice with the attributes that place it in space.
struct Slice {
    path: PathBuf,
    series_uid: Option<String>,
    rows: usize,
    cols: usize,
    /// Row cosines (direction of increasing column index), then column cosines (LPS).
    orientation: [f64; 6],
    /// Centre of the first transmitted pixel, LPS mm.
    position: [f64; 3],
    /// (between rows, between columns) in mm.
    pixel_spacing: [f64; 2],
    slice_thickness: Option<f64>,
    spacing_between_slices: Option<f64>,
    /// Rescaled values, row-major (`rows × cols`).
    pixels: Vec<f32>,
}

fn opt_str(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let e = obj.element_opt(tag).ok().flatten()?;
    let s = e.to_str().ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0').to_string();
    (!s.is_empty()).then_some(s)
}

fn opt_f64s(obj: &DefaultDicomObject, tag: Tag) -> Option<Vec<f64>> {
    let e = obj.element_opt(tag).ok().flatten()?;
    e.to_multi_float64().ok().filter(|v| !v.is_empty())
}

fn fixed<const N: usize>(path: &Path, obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<[f64; N]> {
    let v = opt_f64s(obj, tag).ok_or_else(|| err(path, format!("lacks {name}, so the slice has no geometry")))?;
    let arr: [f64; N] = v
        .as_slice()
        .try_into()
        .map_err(|_| err(path, format!("{name} has {} values, expected {N}", v.len())))?;
    if arr.iter().any(|x| !x.is_finite()) {
        return Err(err(path, format!("{name} is not finite: {arr:?}")));
    }
    Ok(arr)
}

fn read_slice(path: &Path) -> Result<Slice> {
    if !is_dicom_file(path) {
        return Err(err(
            path,
            "not a DICOM file (no \"DICM\" preamble); a series folder must hold only its slices",
        ));
    }
    let obj = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| err(path, format!("cannot parse: {e}")))?;
    let frames = opt_f64s(&obj, tags::NUMBER_OF_FRAMES)
        .and_then(|v| v.first().copied())
        .unwrap_or(1.0);
    if frames > 1.0 {
        return Err(err(
            path,
            format!("multi-frame image ({frames} frames); only one slice per file is supported"),
        ));
    }
    let orientation = fixed::<6>(path, &obj, tags::IMAGE_ORIENTATION_PATIENT, "ImageOrientationPatient")?;
    let position = fixed::<3>(path, &obj, tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient")?;
    let pixel_spacing = match opt_f64s(&obj, tags::PIXEL_SPACING) {
        Some(v) if v.len() == 2 && v.iter().all(|s| s.is_finite() && *s > 0.0) => [v[0], v[1]],
        Some(v) => return Err(err(path, format!("bad PixelSpacing {v:?}"))),
        None => return Err(err(path, "lacks PixelSpacing")),
    };
    let first = |tag| opt_f64s(&obj, tag).and_then(|v| v.first().copied());
    let slope = first(tags::RESCALE_SLOPE).unwrap_or(1.0);
    let intercept = first(tags::RESCALE_INTERCEPT).unwrap_or(0.0);
    if !slope.is_finite() || !intercept.is_finite() {
        return Err(err(path, format!("bad rescale slope/intercept {slope}/{intercept}")));
    }
    let positive = |v: Option<f64>| v.filter(|s| s.is_finite() && *s > 0.0);
    let decoded = obj
        .decode_pixel_data()
        .map_err(|e| err(path, format!("cannot decode the pixel data: {e}")))?;
    if decoded.samples_per_pixel() != 1 {
        return Err(err(
            path,
            format!(
                "{} samples per pixel ({}); only greyscale series are volumes",
                decoded.samples_per_pixel(),
                decoded.photometric_interpretation()
            ),
        ));
    }
    let (rows, cols) = (decoded.rows() as usize, decoded.columns() as usize);
    let raw: Vec<f64> = decoded
        .to_vec_with_options(&ConvertOptions::new().with_modality_lut(ModalityLutOption::None))
        .map_err(|e| err(path, format!("cannot convert the pixel data: {e}")))?;
    if rows == 0 || cols == 0 || raw.len() != rows * cols {
        return Err(err(
            path,
            format!("pixel data holds {} values for {rows}×{cols} pixels", raw.len()),
        ));
    }
    let pixels = raw.iter().map(|&v| (v * slope + intercept) as f32).collect();
    Ok(Slice {
        path: path.to_path_buf(),
        series_uid: opt_str(&obj, tags::SERIES_INSTANCE_UID),
        rows,
        cols,
        orientation,
        position,
        pixel_spacing,
        slice_thickness: positive(first(tags::SLICE_THICKNESS)),
        spacing_between_slices: positive(first(tags::SPACING_BETWEEN_SLICES)),
        pixels,
    })
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// Check that every slice belongs with the first one.
fn check_consistent(dir: &Path, slices: &[Slice]) -> Result<()> {
    let Some(first) = slices.first() else {
        return Err(err(dir, "no DICOM files in the folder"));
    };
    let row = [first.orientation[0], first.orientation[1], first.orientation[2]];
    let col = [first.orientation[3], first.orientation[4], first.orientation[5]];
    if (dot(row, row).sqrt() - 1.0).abs() > 1e-3
        || (dot(col, col).sqrt() - 1.0).abs() > 1e-3
        || dot(row, col).abs() > 1e-3
    {
        return Err(err(
            &first.path,
            format!(
                "ImageOrientationPatient {:?} is not two orthonormal cosines",
                first.orientation
            ),
        ));
    }
    let uids: std::collections::BTreeSet<&str> = slices.iter().filter_map(|s| s.series_uid.as_deref()).collect();
    if uids.len() > 1 {
        return Err(err(
            dir,
            format!(
                "the folder mixes {} series (SeriesInstanceUID {}); put each series in its own folder",
                uids.len(),
                uids.iter().take(3).copied().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    for s in &slices[1..] {
        let mixed = |what: String| {
            err(
                dir,
                format!(
                    "not one series: {} has {what} ({} and {} differ)",
                    s.path.display(),
                    first.path.display(),
                    s.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
                ),
            )
        };
        if (s.rows, s.cols) != (first.rows, first.cols) {
            return Err(mixed(format!(
                "{}×{} pixels, the first slice {}×{}",
                s.rows, s.cols, first.rows, first.cols
            )));
        }
        if s.orientation
            .iter()
            .zip(first.orientation)
            .any(|(a, b)| (a - b).abs() > ORIENTATION_TOL)
        {
            return Err(mixed(format!(
                "orientation {:?}, the first slice {:?}",
                s.orientation, first.orientation
            )));
        }
        if s.pixel_spacing
            .iter()
            .zip(first.pixel_spacing)
            .any(|(a, b)| (a - b).abs() > 1e-4 * b.max(1.0))
        {
            return Err(mixed(format!(
                "pixel spacing {:?}, the first slice {:?}",
                s.pixel_spacing, first.pixel_spacing
            )));
        }
    }
    Ok(())
}

/// Read a series folder (one slice per file) as a volume: `(column, row, slice)` f32 with
/// rescale applied, spacing in mm, and a NIfTI header carrying the RAS affine (see the module
/// docs for the conventions and for what is refused).
pub fn read_series(dir: &Path) -> Result<Volume<f32>> {
    let _span = tracing::info_span!("read_dicom_series", dir = %dir.display()).entered();
    if !dir.is_dir() {
        return Err(if dir.exists() {
            err(dir, "not a folder; pass the folder that holds the series' files")
        } else {
            DataError::NotFound {
                path: dir.to_path_buf(),
                hint: String::new(),
            }
        });
    }
    let files = series_files(dir)?;
    if files.is_empty() {
        return Err(err(dir, "no DICOM files in the folder"));
    }
    let mut slices: Vec<Slice> = files.par_iter().map(|p| read_slice(p)).collect::<Result<_>>()?;
    check_consistent(dir, &slices)?;
    let o = slices[0].orientation;
    let (row_cos, col_cos) = ([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
    let normal = cross(row_cos, col_cos);
    let depth = |s: &Slice| dot(s.position, normal);
    slices.sort_by(|a, b| depth(a).total_cmp(&depth(b)));
    let n = slices.len();
    let first = &slices[0];
    let slice_vec = if n > 1 {
        let steps: Vec<f64> = slices.windows(2).map(|w| depth(&w[1]) - depth(&w[0])).collect();
        if let Some((i, _)) = steps.iter().enumerate().find(|(_, d)| d.abs() < 1e-4) {
            return Err(err(
                dir,
                format!(
                    "{} and {} lie at the same position: several echoes, phases or time points \
                     in one series are not a volume",
                    slices[i].path.display(),
                    slices[i + 1].path.display()
                ),
            ));
        }
        let mean = steps.iter().sum::<f64>() / steps.len() as f64;
        if let Some((i, d)) = steps
            .iter()
            .enumerate()
            .find(|(_, d)| (*d - mean).abs() > (STEP_REL_TOL * mean).max(0.01))
        {
            return Err(err(
                dir,
                format!(
                    "uneven slice positions: the step after {} is {d:.4} mm, the mean {mean:.4} mm \
                     (a missing slice?)",
                    slices[i].path.display()
                ),
            ));
        }
        let last = &slices[n - 1];
        let k = (n - 1) as f64;
        [
            (last.position[0] - first.position[0]) / k,
            (last.position[1] - first.position[1]) / k,
            (last.position[2] - first.position[2]) / k,
        ]
    } else {
        let dz = first.spacing_between_slices.or(first.slice_thickness).unwrap_or(1.0);
        normal.map(|v| v * dz)
    };
    let [dy, dx] = first.pixel_spacing;
    let dz = dot(slice_vec, slice_vec).sqrt();
    // LPS affine columns, then LPS -> RAS by negating the first two rows.
    let columns = [
        row_cos.map(|v| v * dx),
        col_cos.map(|v| v * dy),
        slice_vec,
        first.position,
    ];
    let mut rows_ras = [[0f32; 4]; 3];
    for (r, row) in rows_ras.iter_mut().enumerate() {
        let sign = if r < 2 { -1.0 } else { 1.0 };
        for (c, column) in columns.iter().enumerate() {
            row[c] = (sign * column[r]) as f32;
        }
    }
    let (rows, cols) = (first.rows, first.cols);
    let mut header = NiftiHeader {
        sform_code: 1,
        qform_code: 0,
        datatype: 16,
        bitpix: 32,
        xyzt_units: 2,
        srow_x: rows_ras[0],
        srow_y: rows_ras[1],
        srow_z: rows_ras[2],
        ..NiftiHeader::default()
    };
    let dim =
        |v: usize| u16::try_from(v).map_err(|_| err(dir, format!("{cols}×{rows}×{n} exceeds NIfTI-1's dimensions")));
    header.dim = [3, dim(cols)?, dim(rows)?, dim(n)?, 1, 1, 1, 1];
    header.pixdim = [1.0, dx as f32, dy as f32, dz as f32, 0.0, 0.0, 0.0, 0.0];
    let mut data = vec![0f32; cols * rows * n];
    for (k, s) in slices.iter().enumerate() {
        for j in 0..rows {
            for i in 0..cols {
                data[(i * rows + j) * n + k] = s.pixels[j * cols + i];
            }
        }
    }
    let data =
        ArrayD::from_shape_vec(IxDyn(&[cols, rows, n]), data).map_err(|e| err(dir, format!("volume assembly: {e}")))?;
    tracing::debug!(slices = n, cols, rows, "read DICOM series");
    Ok(Volume {
        data,
        spacing: vec![dx, dy, dz],
        geometry: Some(NiftiGeometry { header }),
    })
}
