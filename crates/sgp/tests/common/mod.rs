//! Helpers shared by the facade's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use sgp_memory::WeightsId;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed reduced SAM2.1 model (random weights from the official code) and its id.
pub fn reduced() -> (sgp::Pretrained, WeightsId) {
    let case = root().join("fixtures/parity/sam2.1_reduced/s64/image_encoder_b2");
    let opts = sgp::LoadOptions {
        config: Some(case.join("config.json").display().to_string()),
        ..sgp::LoadOptions::default()
    };
    let weights = case.join("weights.safetensors");
    let loaded = sgp::load_pretrained(weights.to_str().unwrap(), &opts).unwrap();
    let id = WeightsId::of_file(&weights).unwrap();
    (loaded, id)
}

/// A small 2D folder with two classes: a bright square (1) and a dark disc (2) on noise.
pub fn make_2d_folder(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    let (h, w) = (40u32, 48u32);
    for i in 0..n {
        let mut img = image::RgbImage::new(w, h);
        let mut mask = image::GrayImage::new(w, h);
        let (sx, sy) = (4 + (i as u32 * 3) % 10, 5 + (i as u32 * 5) % 8);
        let (cx, cy) = (32.0 - i as f32, 26.0 + (i % 3) as f32);
        for y in 0..h {
            for x in 0..w {
                let noise = ((x * 31 + y * 17 + i as u32 * 7) % 23) as u8;
                let mut v = 90 + noise;
                let mut label = 0u8;
                if (sx..sx + 12).contains(&x) && (sy..sy + 10).contains(&y) {
                    v = 220 + noise / 2;
                    label = 1;
                }
                if ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() < 6.0 {
                    v = 20 + noise;
                    label = 2;
                }
                img.put_pixel(x, y, image::Rgb([v, v / 2 + 40, 255 - v]));
                mask.put_pixel(x, y, image::Luma([label]));
            }
        }
        img.save(dir.join(format!("images/img{i}.png"))).unwrap();
        mask.save(dir.join(format!("masks/img{i}.png"))).unwrap();
    }
}
