//! The prompted pipelines (`sgp::pipeline`) on real data: a small PNG made here and the
//! bundled breast MR scan of `datasets/demo` (45×120×11, not square, so a swapped axis
//! shows), with the committed reduced SAM2.1 (random weights, S = 64).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sgp::pipeline::{self, Direction, ImagePrompt, VolumePrompt, VolumeRequest};
use sgp::sam2::PromptInput;
use sgp::{load_pretrained, Error, LoadOptions};
use sgp_data::preprocess::IntensityMethod;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The committed reduced SAM2.1 at S = 64 (random, non-trivial weights), real-use settings.
fn reduced_model() -> sgp::Pretrained {
    let case = root().join("fixtures/parity/sam2.1_reduced/s64/track_mask_t4");
    let options = LoadOptions {
        config: Some(case.join("config.json").display().to_string()),
        ..LoadOptions::default()
    };
    load_pretrained(case.join("weights.safetensors").to_str().unwrap(), &options).unwrap()
}

fn write_png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let inside = (10..30).contains(&x) && (8..20).contains(&y);
        if inside {
            image::Rgb([230, 200, 190])
        } else {
            image::Rgb([(x * 3) as u8, (y * 5) as u8, 40])
        }
    });
    img.save(path).unwrap();
}

#[test]
fn image_pipeline_matches_the_model_api_and_writes_the_mask_back() {
    let t = tempfile::tempdir().unwrap();
    let png = t.path().join("photo.png");
    write_png(&png, 40, 30);
    let image = pipeline::read_rgb(&png).unwrap();
    assert_eq!(image.dims(), [3, 30, 40]);
    // ToTensor: channel-first, 0..255 -> 0..1.
    let close = |a: Vec<f32>, b: [f32; 3]| a.iter().zip(b).all(|(x, y)| (x - y / 255.0).abs() < 1e-6);
    assert!(
        close(image.i_px(12, 10), [230.0, 200.0, 190.0]),
        "{:?}",
        image.i_px(12, 10)
    );
    assert!(close(image.i_px(12, 5), [36.0, 25.0, 40.0]), "{:?}", image.i_px(12, 5));

    let loaded = reduced_model();
    let prompt = ImagePrompt {
        boxes: Some([9.0, 7.0, 31.0, 21.0]),
        points: Some((vec![[20.0, 14.0]], vec![1])),
    };
    for multimask in [false, true] {
        let seg = pipeline::segment_image(&loaded.model, &image, &prompt, multimask).unwrap();
        assert_eq!(seg.mask.dims(), [30, 40]);
        assert_eq!(seg.iou_scores.len(), if multimask { 3 } else { 1 });
        // The same prompt through the model's own API: the pipeline adds no transform of
        // its own, and keeps the candidate with the highest predicted IoU.
        let emb = loaded.model.encode_image(&image).unwrap();
        let input = PromptInput {
            points: prompt.points.clone(),
            boxes: prompt.boxes,
            mask_input: None,
        };
        let direct = loaded
            .model
            .predict(&emb, &input, loaded.model.multimask(multimask))
            .unwrap();
        let ious: Vec<f32> = direct.iou_scores.to_vec1().unwrap();
        let best = (0..ious.len()).fold(0, |b, i| if ious[i] > ious[b] { i } else { b });
        assert_eq!(seg.best, best);
        let want: Vec<u8> = direct
            .masks
            .get(best)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<u8> = seg.mask.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want);

        let out = t.path().join(format!("mask{multimask}.png"));
        pipeline::write_mask_png(&seg.mask, &out).unwrap();
        let back = image::open(&out).unwrap().to_luma8();
        assert_eq!(back.dimensions(), (40, 30));
        let back: Vec<u8> = back.into_raw();
        assert_eq!(back, want.iter().map(|&v| v * 255).collect::<Vec<_>>());
        assert_eq!(
            seg.foreground_pixels().unwrap(),
            want.iter().filter(|&&v| v > 0).count()
        );
    }
    // Only the written files are left: no temp files.
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 3);
    assert!(pipeline::write_mask_png(
        &Tensor::zeros((2, 2), DType::U8, &candle_core::Device::Cpu).unwrap(),
        &t.path().join("no/such/dir/m.png")
    )
    .is_err());
}

#[test]
fn image_pipeline_refuses_bad_input_with_input_errors() {
    let loaded = reduced_model();
    let image = Tensor::zeros((3, 8, 8), DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = pipeline::segment_image(&loaded.model, &image, &ImagePrompt::default(), false).unwrap_err();
    assert!(
        matches!(e, Error::Input(_)) && e.to_string().contains("give a prompt"),
        "{e}"
    );
    let grey = Tensor::zeros((8, 8), DType::F32, &candle_core::Device::Cpu).unwrap();
    let prompt = ImagePrompt {
        boxes: Some([0.0, 0.0, 4.0, 4.0]),
        points: None,
    };
    assert!(matches!(
        pipeline::segment_image(&loaded.model, &grey, &prompt, false),
        Err(Error::Input(_))
    ));
    let outside = ImagePrompt {
        boxes: Some([-5.0, 0.0, 4.0, 40.0]),
        points: Some((vec![[100.0, 1.0]], vec![0])),
    };
    assert_eq!(outside.check((8, 8)).unwrap().len(), 2, "one warning each");
    assert!(pipeline::read_rgb(Path::new("/no/such/image.png")).is_err());
}

/// `(index of the case image, label volume)` of the bundled breast MR case.
fn breast() -> (sgp_data::Volume<f32>, sgp_data::Volume<u16>) {
    let demo = root().join("datasets/demo");
    let image = sgp_data::read_image(&demo.join("imagesTr/breast1_0000.nii.gz")).unwrap();
    let labels = sgp_data::read_labels(&demo.join("labelsTr/breast1.nii.gz")).unwrap();
    (image, labels)
}

/// The slice along axis 2 holding the most lesion voxels.
fn busiest_slice(labels: &sgp_data::Volume<u16>) -> usize {
    let n = labels.shape()[2];
    (0..n)
        .max_by_key(|&k| {
            labels
                .data
                .iter()
                .enumerate()
                .filter(|(i, &v)| v > 0 && i % n == k)
                .count()
        })
        .unwrap()
}

#[test]
fn volume_pipeline_on_a_real_scan_keeps_geometry_and_the_prompted_mask() {
    let (image, labels) = breast();
    assert_eq!(image.shape(), [45, 120, 11]);
    let k = busiest_slice(&labels);
    let request = VolumeRequest {
        axis: 2,
        slice: k,
        prompt: VolumePrompt::Mask(labels.data.clone()),
        direction: Direction::BothWays,
        intensity: IntensityMethod::Percentile { low: 0.5, high: 99.5 },
    };
    let prepared = pipeline::prepare_volume(&image, &request).unwrap();
    assert_eq!(prepared.num_slices(), 11);
    assert_eq!(prepared.slice_hw(), (120, 45), "axis 2: x -> columns, y -> rows");
    let loaded = reduced_model();
    let mut calls = Vec::new();
    let seg = prepared
        .segment(&loaded.model, &mut |done, total| calls.push((done, total)))
        .unwrap();
    assert_eq!(seg.slices, 11);
    assert_eq!(calls.last(), Some(&(11, 11)), "every slice reported");
    assert_eq!(seg.labels.shape(), image.shape());
    assert!(seg.labels.iter().all(|&v| v <= 1));
    assert_eq!(seg.foreground_voxels, seg.labels.iter().filter(|&&v| v > 0).count());

    // A mask prompt is a conditioning frame whose output is the mask itself (SAM2.1's
    // `use_mask_input_as_output_without_sam`), through S×S and S/4 and back: on the
    // prompted slice the prediction must overlap the prompt well, in the right place. The
    // 16×16 low-res grid of S = 64 blurs an 82-voxel lesion of a 120×45 slice, hence 0.7.
    let (mut inter, mut a, mut b) = (0usize, 0usize, 0usize);
    for x in 0..45 {
        for y in 0..120 {
            let p = seg.labels[[x, y, k]] > 0;
            let g = labels.data[[x, y, k]] > 0;
            inter += usize::from(p && g);
            a += usize::from(p);
            b += usize::from(g);
        }
    }
    let dice = 2.0 * inter as f64 / (a + b) as f64;
    assert!(
        dice > 0.7,
        "Dice on the prompted slice {dice:.3} ({a} predicted, {b} prompted)"
    );

    // Written back on the scan's grid, atomically.
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("pred/breast1.nii.gz");
    pipeline::write_labels(&out, &seg.labels, &image).unwrap();
    let back = sgp_data::read_labels(&out).unwrap();
    assert_eq!(back.data, seg.labels);
    assert_eq!(back.spacing, image.spacing);
    let (g0, g1) = (image.geometry.as_ref().unwrap(), back.geometry.as_ref().unwrap());
    assert_eq!(g0.affine(), g1.affine());
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);
}

#[test]
fn volume_requests_are_checked_before_any_model_runs() {
    let (image, labels) = breast();
    let base = VolumeRequest {
        axis: 2,
        slice: 5,
        prompt: VolumePrompt::Box([2.0, 3.0, 30.0, 60.0]),
        direction: Direction::Forward,
        intensity: IntensityMethod::MinMax,
    };
    assert!(pipeline::prepare_volume(&image, &base).is_ok());
    let bad = |f: &dyn Fn(&mut VolumeRequest), needle: &str| {
        let mut r = base.clone();
        f(&mut r);
        let e = pipeline::prepare_volume(&image, &r).unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e}");
        assert!(e.to_string().contains(needle), "{needle:?} not in {e}");
    };
    bad(&|r| r.slice = 11, "out of range");
    bad(&|r| r.axis = 3, "--axis");
    bad(
        &|r| r.prompt = VolumePrompt::Box([2.0, 3.0, 46.0, 60.0]),
        "outside the 45×120 slice",
    );
    bad(
        &|r| r.prompt = VolumePrompt::Points(vec![[45.0, 1.0]], vec![1]),
        "outside",
    );
    bad(&|r| r.prompt = VolumePrompt::Points(vec![[4.0, 1.0]], vec![]), "labels");
    bad(
        &|r| r.prompt = VolumePrompt::Mask(ndarray::ArrayD::zeros(ndarray::IxDyn(&[45, 120, 10]))),
        "shape",
    );
    let empty_slice = (0..11).find(|&k| (0..45).all(|x| (0..120).all(|y| labels.data[[x, y, k]] == 0)));
    if let Some(k) = empty_slice {
        bad(
            &|r| {
                r.slice = k;
                r.prompt = VolumePrompt::Mask(labels.data.clone())
            },
            "empty on slice",
        );
    }
    let flat = sgp_data::Volume {
        data: ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[4, 5])),
        spacing: vec![1.0, 1.0],
        geometry: None,
    };
    assert!(matches!(pipeline::prepare_volume(&flat, &base), Err(Error::Input(_))));
}

/// Pixel `(x, y)` of a `[3, H, W]` tensor as a vector of channels.
trait Px {
    fn i_px(&self, x: usize, y: usize) -> Vec<f32>;
}

impl Px for Tensor {
    fn i_px(&self, x: usize, y: usize) -> Vec<f32> {
        (0..3)
            .map(|c| {
                self.get(c)
                    .unwrap()
                    .get(y)
                    .unwrap()
                    .get(x)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .collect()
    }
}
