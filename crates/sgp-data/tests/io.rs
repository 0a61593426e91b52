//! NIfTI and raster IO: voxel order, geometry round trips, label mapping, bad inputs.

#![allow(clippy::field_reassign_with_default, clippy::excessive_precision)]

use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use sgp_data::{
    read_image, read_labels, read_nifti_header, write_float_like, write_labels_like, DataError, NiftiGeometry, Volume,
};

/// A header with an oblique-ish sform, a different qform, int16 data and mm units.
fn test_header() -> nifti::NiftiHeader {
    let mut h = nifti::NiftiHeader::default();
    h.pixdim = [-1.0, 0.7, 0.8, 2.5, 1.0, 1.0, 1.0, 1.0];
    h.sform_code = 1;
    h.qform_code = 2;
    h.srow_x = [-0.7, 0.0, 0.01, 12.5];
    h.srow_y = [0.0, 0.8, 0.0, -30.25];
    h.srow_z = [0.0, 0.0, 2.5, 7.0];
    h.quatern_b = 0.0;
    h.quatern_c = 1.0;
    h.quatern_d = 0.0;
    h.quatern_x = 1.5;
    h.quatern_y = 2.5;
    h.quatern_z = -3.5;
    h.xyzt_units = 10;
    h
}

fn write_i16(path: &Path, data: &ArrayD<i16>, header: &nifti::NiftiHeader) {
    nifti::writer::WriterOptions::new(path)
        .reference_header(header)
        .write_nifti(data)
        .unwrap();
}

fn ramp(shape: &[usize]) -> ArrayD<i16> {
    ArrayD::from_shape_fn(IxDyn(shape), |ix| (ix[0] + 10 * ix[1] + 100 * ix[2]) as i16)
}

#[test]
fn nifti_voxel_order_is_xyz_with_fortran_storage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ramp.nii");
    let data = ramp(&[4, 3, 2]);
    write_i16(&path, &data, &test_header());
    // On disk x varies fastest (Fortran order): bytes after the 352-byte header.
    let bytes = std::fs::read(&path).unwrap();
    let on_disk: Vec<i16> = bytes[352..]
        .chunks(2)
        .map(|c| i16::from_ne_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(&on_disk[..5], &[0, 1, 2, 3, 10]);
    let vol = read_image(&path).unwrap();
    assert_eq!(vol.shape(), &[4, 3, 2]);
    assert!(vol.data.is_standard_layout());
    assert_eq!(vol.data[[3, 2, 1]], 123.0);
    assert_eq!(vol.data[[1, 0, 1]], 101.0);
    assert_eq!(vol.spacing, vec![0.7, 0.8, 2.5]);
}

#[test]
fn label_round_trip_keeps_geometry_and_datatype() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("image.nii.gz");
    let data = ramp(&[5, 4, 3]);
    write_i16(&src, &data, &test_header());
    let image = read_image(&src).unwrap();
    // Process: threshold into three classes.
    let labels = image.data.mapv(|v| {
        if v > 200.0 {
            2u16
        } else if v > 20.0 {
            1
        } else {
            0
        }
    });
    let out = dir.path().join("pred.nii.gz");
    write_labels_like(&out, &labels, &image).unwrap();
    let back = read_labels(&out).unwrap();
    assert_eq!(back.data, labels);
    let (g0, g1) = (image.geometry.as_ref().unwrap(), back.geometry.as_ref().unwrap());
    assert_eq!(g0.affine(), g1.affine());
    assert_eq!(g0.sform(), g1.sform());
    assert_eq!(g0.qform(), g1.qform());
    assert_eq!(g1.header.sform_code, 1);
    assert_eq!(g1.header.qform_code, 2);
    assert_eq!(g0.header.pixdim, g1.header.pixdim);
    assert_eq!(g1.header.xyzt_units, 10);
    assert_eq!(g1.stored_dim(), vec![5, 4, 3]);
    assert!(g0.same_grid(g1, 0.0));
    // The reference is int16, which holds the labels: the type is kept.
    assert_eq!(g1.datatype(), 4);
    assert_eq!(back.spacing, image.spacing);
    // The qform is the 180 degree rotation about y, with qfac -1 flipping z.
    let q = g0.qform().unwrap();
    assert!((q[0][0] + 0.7).abs() < 1e-6 && (q[1][1] - 0.8).abs() < 1e-6 && (q[2][2] - 2.5).abs() < 1e-6);
    assert_eq!([q[0][3], q[1][3], q[2][3]], [1.5, 2.5, -3.5]);

    // A second round trip from the written labels keeps everything too, and uint8 stays uint8.
    let out2 = dir.path().join("pred2.nii");
    write_labels_like(&out2, &back.data, &back).unwrap();
    let again = read_labels(&out2).unwrap();
    assert_eq!(again.geometry.unwrap().header.srow_x, g0.header.srow_x);
}

#[test]
fn float_reference_gives_uint8_labels_and_float_writer_keeps_grid() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("ct.nii.gz");
    let data = ramp(&[3, 3, 2]).mapv(|v| v as f32 * 0.5);
    nifti::writer::WriterOptions::new(&src)
        .reference_header(&test_header())
        .write_nifti(&data)
        .unwrap();
    let image = read_image(&src).unwrap();
    assert_eq!(image.geometry.as_ref().unwrap().datatype(), 16);
    let labels = image.data.mapv(|v| u16::from(v > 10.0));
    let out = dir.path().join("lab.nii.gz");
    write_labels_like(&out, &labels, &image).unwrap();
    assert_eq!(read_nifti_header(&out).unwrap().datatype(), 2);
    let probs = image.data.mapv(|v| v / 100.0);
    let pout = dir.path().join("prob.nii.gz");
    write_float_like(&pout, &probs, &image).unwrap();
    let p = read_image(&pout).unwrap();
    assert_eq!(p.data, probs);
    assert!(p.geometry.unwrap().same_grid(image.geometry.as_ref().unwrap(), 0.0));
}

#[test]
fn trailing_singleton_axes_are_dropped_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("four_d.nii");
    let data = ramp(&[3, 2, 2]).into_shape_with_order(IxDyn(&[3, 2, 2, 1])).unwrap();
    write_i16(&src, &data, &test_header());
    let image = read_image(&src).unwrap();
    assert_eq!(image.shape(), &[3, 2, 2]);
    let out = dir.path().join("lab.nii");
    write_labels_like(&out, &image.data.mapv(|v| (v > 5.0) as u16), &image).unwrap();
    assert_eq!(read_nifti_header(&out).unwrap().stored_dim(), vec![3, 2, 2, 1]);
}

#[test]
fn png_binary_masks_map_to_one_and_grey_levels_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("mask.png");
    let mut img = image::GrayImage::new(4, 3);
    img.put_pixel(1, 2, image::Luma([255]));
    img.save(&bin).unwrap();
    let labels = read_labels(&bin).unwrap();
    assert_eq!(labels.shape(), &[3, 4]);
    assert_eq!(labels.data[[2, 1]], 1);
    assert_eq!(labels.data.iter().map(|&v| v as u32).sum::<u32>(), 1);

    let grey = dir.path().join("grey.png");
    let mut img = image::GrayImage::new(2, 2);
    img.put_pixel(0, 0, image::Luma([128]));
    img.put_pixel(1, 0, image::Luma([255]));
    img.save(&grey).unwrap();
    let labels = read_labels(&grey).unwrap();
    assert_eq!(labels.data[[0, 0]], 128);
    assert_eq!(labels.data[[0, 1]], 255);

    // Labels written as PNG read back unchanged (values 0..=2 are not a 0/255 mask).
    let out = dir.path().join("pred.png");
    let ref_vol = read_image(&grey).unwrap();
    let pred = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0u16, 1, 2, 1]).unwrap();
    write_labels_like(&out, &pred, &ref_vol).unwrap();
    assert_eq!(read_labels(&out).unwrap().data, pred);
    // And as NIfTI from a PNG reference: spacing 1, a valid header.
    let out_nii = dir.path().join("pred.nii.gz");
    write_labels_like(&out_nii, &pred, &ref_vol).unwrap();
    let back = read_labels(&out_nii).unwrap();
    assert_eq!(back.data, pred);
    assert_eq!(back.spacing, vec![1.0, 1.0]);
}

#[test]
fn rgb_png_is_read_as_grey_and_as_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("photo.png");
    let mut img = image::RgbImage::new(3, 2);
    img.put_pixel(2, 1, image::Rgb([10, 200, 30]));
    img.save(&p).unwrap();
    let grey = read_image(&p).unwrap();
    assert_eq!(grey.shape(), &[2, 3]);
    assert!(grey.data[[1, 2]] > 100.0);
    let rgb = sgp_data::read_rgb(&p).unwrap();
    assert_eq!(rgb.shape(), &[2, 3, 3]);
    assert_eq!(rgb.data[[1, 2, 1]], 200.0);
}

#[test]
fn bad_inputs_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Missing file.
    let missing = dir.path().join("nope.nii.gz");
    assert!(matches!(read_image(&missing), Err(DataError::NotFound { .. })));
    // Truncated .nii.gz: cut a valid file in half.
    let good = dir.path().join("good.nii.gz");
    write_i16(&good, &ramp(&[20, 20, 20]), &test_header());
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.nii.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_image(&cut).unwrap_err();
    assert!(matches!(err, DataError::Nifti { .. }), "{err}");
    // Truncated uncompressed .nii.
    let good = dir.path().join("good.nii");
    write_i16(&good, &ramp(&[5, 5, 5]), &test_header());
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.nii");
    std::fs::write(&cut, &bytes[..400]).unwrap();
    assert!(read_image(&cut).unwrap_err().to_string().contains("truncated"));
    // Non-integer labels in NIfTI.
    let frac = dir.path().join("frac.nii");
    let f = ArrayD::from_elem(IxDyn(&[2, 2, 2]), 0.5f32);
    nifti::writer::WriterOptions::new(&frac).write_nifti(&f).unwrap();
    assert!(matches!(read_labels(&frac), Err(DataError::InvalidLabels { .. })));
    // Negative labels.
    let neg = dir.path().join("neg.nii");
    write_i16(&neg, &ArrayD::from_elem(IxDyn(&[2, 2, 2]), -1i16), &test_header());
    assert!(matches!(read_labels(&neg), Err(DataError::InvalidLabels { .. })));
    // Wrong-size labels for writing.
    let vol = Volume {
        data: ArrayD::<f32>::zeros(IxDyn(&[2, 2])),
        spacing: vec![1.0, 1.0],
        geometry: None,
    };
    let wrong = ArrayD::<u16>::zeros(IxDyn(&[3, 2]));
    assert!(matches!(
        write_labels_like(&dir.path().join("w.png"), &wrong, &vol),
        Err(DataError::Shape(_))
    ));
    // Unsupported extension.
    assert!(matches!(
        read_image(&dir.path().join("x.dcm")),
        Err(DataError::UnsupportedFormat { .. })
    ));
    // A PNG that is not one.
    let fake = dir.path().join("fake.png");
    std::fs::write(&fake, b"definitely not a png").unwrap();
    assert!(matches!(read_image(&fake), Err(DataError::Image { .. })));
    // Geometry from spacing is valid.
    let g = NiftiGeometry::from_spacing(&[0.5, 0.5, 3.0]);
    assert_eq!(g.affine()[2][2], 3.0);
}

#[test]
fn demo_scan_written_by_nibabel_round_trips_header_fields() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/demo/imagesTr/breast1_0000.nii.gz");
    let image = read_image(&src).unwrap();
    let labels = image.data.mapv(|v| u16::from(v > 100.0));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("breast1.nii.gz");
    write_labels_like(&out, &labels, &image).unwrap();
    let back = read_labels(&out).unwrap();
    assert_eq!(back.data, labels);
    let (a, b) = (
        &image.geometry.as_ref().unwrap().header,
        &back.geometry.as_ref().unwrap().header,
    );
    assert_eq!((a.srow_x, a.srow_y, a.srow_z), (b.srow_x, b.srow_y, b.srow_z));
    assert_eq!(
        (a.quatern_b, a.quatern_c, a.quatern_d),
        (b.quatern_b, b.quatern_c, b.quatern_d)
    );
    assert_eq!(
        (a.quatern_x, a.quatern_y, a.quatern_z),
        (b.quatern_x, b.quatern_y, b.quatern_z)
    );
    assert_eq!(
        (a.sform_code, a.qform_code, a.xyzt_units),
        (b.sform_code, b.qform_code, b.xyzt_units)
    );
    assert_eq!(a.pixdim, b.pixdim);
    assert_eq!(a.dim, b.dim);
    assert_eq!(b.datatype, 4, "int16 reference holds the labels, so the type is kept");
}
