//! DICOM series reading against independent converters: the series in `fixtures/dicom` was
//! written by pydicom and converted to NIfTI by dicom2nifti and by dcm2niix
//! (`tools/dicom/gen_series.py`; see its PROVENANCE.md).

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use sgp_data::dicom::{is_dicom_series_dir, read_series};
use sgp_data::{read_image, DataError};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/dicom")
}

fn close(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4], tol: f64) -> bool {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .all(|(x, y)| (x - y).abs() <= tol)
}

fn affine(v: &sgp_data::Volume<f32>) -> [[f64; 4]; 4] {
    v.geometry.as_ref().expect("geometry").affine()
}

/// Copy a series folder into a fresh temporary one, to damage it.
fn copy_series(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn dicom_err(r: sgp_data::Result<sgp_data::Volume<f32>>) -> String {
    match r {
        Err(e @ DataError::Dicom { .. }) => e.to_string(),
        Err(e) => panic!("expected a DICOM error, got {e}"),
        Ok(v) => panic!("expected an error, read {:?}", v.shape()),
    }
}

#[test]
fn same_voxels_and_affine_as_dicom2nifti() {
    let dcm = read_series(&fixtures().join("oblique_ct")).unwrap();
    let nii = read_image(&fixtures().join("oblique_ct_dicom2nifti.nii.gz")).unwrap();
    assert_eq!(dcm.shape(), &[32, 24, 4]);
    assert_eq!(dcm.shape(), nii.shape());
    assert_eq!(dcm.data, nii.data, "voxel values (rescaled) differ");
    assert!(
        close(&affine(&dcm), &affine(&nii), 1e-4),
        "affine {:?} vs dicom2nifti {:?}",
        affine(&dcm),
        affine(&nii)
    );
    for (a, b) in dcm.spacing.iter().zip([0.6, 0.8, 1.5]) {
        assert!((a - b).abs() < 1e-6, "spacing {:?}", dcm.spacing);
    }
    // Rescale: stored 300 at the first voxel of the lowest slice, slope 2, intercept -1024.
    assert_eq!(dcm.data[[0, 0, 0]], 300.0 * 2.0 - 1024.0);
}

/// dcm2niix stores the rows flipped; the same world point must hold the same value.
#[test]
fn same_world_placement_as_dcm2niix() {
    let dcm = read_series(&fixtures().join("oblique_ct")).unwrap();
    let nii = read_image(&fixtures().join("oblique_ct_dcm2niix.nii.gz")).unwrap();
    assert_eq!(dcm.shape(), nii.shape());
    let (a, b) = (affine(&dcm), affine(&nii));
    let shape = dcm.shape().to_vec();
    let mut checked = 0;
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            for k in 0..shape[2] {
                let world: Vec<f64> = (0..3)
                    .map(|r| a[r][0] * i as f64 + a[r][1] * j as f64 + a[r][2] * k as f64 + a[r][3])
                    .collect();
                // dcm2niix's affine is ours with column 1 negated and the origin moved to the
                // last row: solve for its voxel index by the flip it documents.
                let jj = shape[1] - 1 - j;
                let theirs: Vec<f64> = (0..3)
                    .map(|r| b[r][0] * i as f64 + b[r][1] * jj as f64 + b[r][2] * k as f64 + b[r][3])
                    .collect();
                for (x, y) in world.iter().zip(&theirs) {
                    assert!(
                        (x - y).abs() < 1e-3,
                        "voxel ({i},{j},{k}) at {world:?}, dcm2niix's at {theirs:?}"
                    );
                }
                assert_eq!(dcm.data[[i, j, k]], nii.data[[i, jj, k]], "value at ({i},{j},{k})");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 32 * 24 * 4);
}

#[test]
fn rle_lossless_series_decodes_to_the_same_volume() {
    let plain = read_series(&fixtures().join("oblique_ct")).unwrap();
    let rle = read_series(&fixtures().join("oblique_ct_rle")).unwrap();
    assert_eq!(plain, rle);
}

#[test]
fn labels_written_on_a_dicom_grid_keep_its_affine() {
    let dcm = read_series(&fixtures().join("oblique_ct")).unwrap();
    let labels = dcm.data.mapv(|v| u16::from(v > 0.0));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("labels.nii.gz");
    sgp_data::write_labels_like(&out, &labels, &dcm).unwrap();
    let back = sgp_data::read_labels(&out).unwrap();
    assert_eq!(back.data, labels);
    let g = back.geometry.unwrap();
    assert!(close(&g.affine(), &affine(&dcm), 1e-6));
    assert_eq!(g.header.sform_code, 1);
}

#[test]
fn detects_series_folders() {
    assert!(is_dicom_series_dir(&fixtures().join("oblique_ct")));
    assert!(!is_dicom_series_dir(&fixtures()));
    assert!(!is_dicom_series_dir(&fixtures().join("oblique_ct_dicom2nifti.nii.gz")));
}

#[test]
fn single_slice_takes_its_thickness_along_the_normal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("oblique_ct/IM_c.dcm"), dir.path().join("one.dcm")).unwrap();
    let one = read_series(dir.path()).unwrap();
    let full = read_series(&fixtures().join("oblique_ct")).unwrap();
    assert_eq!(one.shape(), &[32, 24, 1]);
    // IM_c is the lowest slice: same first two affine columns and origin; the third is the
    // normal times SliceThickness, which here equals the step between slices.
    assert!(close(&affine(&one), &affine(&full), 1e-4));
    for i in 0..32 {
        for j in 0..24 {
            assert_eq!(one.data[[i, j, 0]], full.data[[i, j, 0]]);
        }
    }
}

#[test]
fn empty_folder_and_missing_folder_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(dicom_err(read_series(dir.path())).contains("no DICOM files"));
    assert!(matches!(
        read_series(&dir.path().join("nope")),
        Err(DataError::NotFound { .. })
    ));
    let file = fixtures().join("oblique_ct/IM_a.dcm");
    assert!(dicom_err(read_series(&file)).contains("not a folder"));
}

#[test]
fn a_stray_file_is_named_in_the_error() {
    let dir = copy_series(&fixtures().join("oblique_ct"));
    std::fs::write(dir.path().join("notes.txt"), b"not an image").unwrap();
    let msg = dicom_err(read_series(dir.path()));
    assert!(msg.contains("notes.txt") && msg.contains("not a DICOM file"), "{msg}");
}

#[test]
fn truncated_file_is_an_error_not_a_panic() {
    let dir = copy_series(&fixtures().join("oblique_ct"));
    let victim = dir.path().join("IM_b.dcm");
    let bytes = std::fs::read(&victim).unwrap();
    for cut in [140, 600, bytes.len() - 100] {
        std::fs::write(&victim, &bytes[..cut]).unwrap();
        let msg = dicom_err(read_series(dir.path()));
        assert!(msg.contains("IM_b.dcm"), "cut at {cut}: {msg}");
    }
}

fn edit(path: &Path, f: impl FnOnce(&mut dicom_object::DefaultDicomObject)) {
    let mut obj = dicom_object::open_file(path).unwrap();
    f(&mut obj);
    obj.write_to_file(path).unwrap();
}

#[test]
fn mixed_series_uid_is_refused() {
    let dir = copy_series(&fixtures().join("oblique_ct"));
    edit(&dir.path().join("IM_d.dcm"), |o| {
        o.put(DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.3680043.8.498.9999"),
        ));
    });
    let msg = dicom_err(read_series(dir.path()));
    assert!(msg.contains("mixes 2 series"), "{msg}");
}

#[test]
fn mixed_orientation_is_refused() {
    let dir = copy_series(&fixtures().join("oblique_ct"));
    edit(&dir.path().join("IM_a.dcm"), |o| {
        o.put(DataElement::new(
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            PrimitiveValue::from("1\\0\\0\\0\\1\\0"),
        ));
    });
    let msg = dicom_err(read_series(dir.path()));
    assert!(msg.contains("orientation") && msg.contains("IM_a.dcm"), "{msg}");
}

#[test]
fn missing_and_duplicate_slices_are_refused() {
    // IM_a is the second lowest slice (k = 1): without it, one step is twice the others.
    let dir = copy_series(&fixtures().join("oblique_ct"));
    std::fs::remove_file(dir.path().join("IM_a.dcm")).unwrap();
    let msg = dicom_err(read_series(dir.path()));
    assert!(msg.contains("uneven slice positions"), "{msg}");

    let dir = copy_series(&fixtures().join("oblique_ct"));
    std::fs::copy(dir.path().join("IM_a.dcm"), dir.path().join("IM_a_copy.dcm")).unwrap();
    let msg = dicom_err(read_series(dir.path()));
    assert!(msg.contains("same position"), "{msg}");
}

#[test]
fn different_sizes_are_refused() {
    // One slice from another grid: half the columns, with pixel data to match.
    let dir = copy_series(&fixtures().join("oblique_ct"));
    edit(&dir.path().join("IM_b.dcm"), |o| {
        let stored: Vec<u8> = vec![0; 16 * 24 * 2];
        o.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(16u16)));
        o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(stored)));
    });
    let msg = dicom_err(read_series(dir.path()));
    assert!(msg.contains("pixels"), "{msg}");
}
