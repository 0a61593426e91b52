//! Random bytes never panic the readers (few cases: this is a smoke fuzz, not a campaign).

#![allow(clippy::field_reassign_with_default, clippy::excessive_precision)]

use proptest::prelude::*;
use sgp_data::{read_image, read_labels};

fn nifti_like_header(seed: &[u8]) -> Vec<u8> {
    // A valid-looking header start (sizeof_hdr = 348, magic n+1) with random fields, so the
    // fuzz reaches the size checks instead of failing on the first four bytes.
    let mut h = seed.to_vec();
    h.resize(352, 0);
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    h[344..348].copy_from_slice(b"n+1\0");
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200), tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        let dir = tempfile::tempdir().unwrap();
        for name in ["x.nii", "x.nii.gz", "x.png", "x.bmp", "x.tif", "x.jpg"] {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes).unwrap();
            let _ = read_image(&p);
            let _ = read_labels(&p);
        }
        let mut h = nifti_like_header(&bytes);
        h.extend_from_slice(&tail);
        let p = dir.path().join("h.nii");
        std::fs::write(&p, &h).unwrap();
        let _ = read_image(&p);
        let _ = read_labels(&p);
        // The same, gzipped.
        let gz = dir.path().join("h.nii.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &h).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let _ = read_image(&gz);
        // A PNG signature followed by junk.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&bytes);
        let pp = dir.path().join("s.png");
        std::fs::write(&pp, &png).unwrap();
        let _ = read_labels(&pp);
    }
}

/// A small valid NIfTI file, in memory, to mutate.
fn valid_nifti_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.nii");
    let data = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 3, 2]), |ix| (ix[0] + ix[1] + ix[2]) as i16);
    nifti::writer::WriterOptions::new(&p).write_nifti(&data).unwrap();
    std::fs::read(&p).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Mutations of a valid file reach the size checks and the data decoding.
    #[test]
    fn mutated_nifti_does_not_panic(edits in proptest::collection::vec((0usize..400, any::<u8>()), 1..8), cut in 0usize..420) {
        let mut bytes = valid_nifti_bytes();
        for (pos, val) in edits {
            let n = bytes.len();
            bytes[pos % n] = val;
        }
        bytes.truncate(cut.max(1));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.nii");
        std::fs::write(&p, &bytes).unwrap();
        let _ = read_image(&p);
        let _ = read_labels(&p);
    }
}
