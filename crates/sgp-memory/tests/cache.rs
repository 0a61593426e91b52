//! The support cache: a second run over the same supports hits the disk cache (no
//! encoder call) and gives bit-identical output; a corrupt or stale entry is recomputed;
//! memory and disk levels stay within their bounds.

mod common;

use std::path::Path;

use candle_core::Tensor;
use common::*;
use sgp_memory::support::image_features;
use sgp_memory::{CacheOptions, Pmg, Selection, SupportCache, SupportPool, WeightsId};
use sgp_sam2::Sam2Model;

/// One full "predict": a pool over `dir`, top-k selection for a query, PMG. Returns the
/// pseudo-mask, the number of encoder calls and the cache statistics.
fn predict(model: &Sam2Model, dir: &Path) -> (Tensor, usize, sgp_memory::CacheStats) {
    let s = model.config().image_size;
    let mut pool = SupportPool::new(
        model,
        WeightsId::new("reduced-s64"),
        "test",
        SupportCache::on_disk(dir).unwrap(),
    );
    for i in 0..3 {
        pool.push(item(i, s, &format!("case{i}"), i != 1)).unwrap();
    }
    let q = image(20, s).unsqueeze(0).unwrap();
    let f = image_features(model, &q).unwrap();
    let pooled = sgp_memory::support::pooled_of(&f).unwrap();
    let sup = pool.class_supports(&pooled, None, &[1], 2, Selection::TopK).unwrap();
    let out = Pmg::new(model).pseudo_mask(&f, &sup.per_item()[0]).unwrap();
    (out.pred_masks_high_res, pool.encoder_calls(), pool.cache().stats())
}

fn entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

#[test]
fn second_run_hits_the_disk_cache_with_bit_identical_output() {
    let model = reduced_model();
    let dir = tempfile::tempdir().unwrap();
    let (first, calls, stats) = predict(&model, dir.path());
    assert_eq!(calls, 3, "every support encoded once");
    assert_eq!((stats.misses, stats.disk_hits), (3, 0));
    assert_eq!(entries(dir.path()).len(), 3);
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0, "no temporary file left behind");

    let (second, calls, stats) = predict(&model, dir.path());
    assert_eq!(calls, 0, "the second run must not encode any support");
    assert_eq!((stats.misses, stats.disk_hits, stats.rejected), (0, 3, 0));
    assert!(bit_equal(&first, &second), "cached supports change the output");

    // Another weights id is another key: nothing is reused.
    let s = model.config().image_size;
    let mut other = SupportPool::new(
        &model,
        WeightsId::new("other"),
        "test",
        SupportCache::on_disk(dir.path()).unwrap(),
    );
    other.push(item(0, s, "case0", true)).unwrap();
    other.encoded(0).unwrap();
    assert_eq!(other.encoder_calls(), 1);
}

#[test]
fn corrupt_and_stale_entries_are_recomputed() {
    let model = reduced_model();
    let dir = tempfile::tempdir().unwrap();
    let (first, _, _) = predict(&model, dir.path());
    let files = entries(dir.path());

    // Flip bytes in the middle of one entry's tensor data (header intact).
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n / 2..n / 2 + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&files[0], &bytes).unwrap();
    // Truncate another.
    let bytes = std::fs::read(&files[1]).unwrap();
    std::fs::write(&files[1], &bytes[..bytes.len() / 3]).unwrap();

    let (again, calls, stats) = predict(&model, dir.path());
    assert_eq!(calls, 2, "exactly the two damaged entries are recomputed");
    assert_eq!((stats.rejected, stats.disk_hits), (2, 1));
    assert!(bit_equal(&first, &again));

    // Stale: a valid entry of another key under this key's name.
    let files = entries(dir.path());
    std::fs::copy(&files[0], &files[1]).unwrap();
    let (again, calls, stats) = predict(&model, dir.path());
    assert_eq!((calls, stats.rejected), (1, 1));
    assert!(bit_equal(&first, &again));

    // Garbage.
    std::fs::write(&files[2], b"not a safetensors file").unwrap();
    let (_, calls, _) = predict(&model, dir.path());
    assert_eq!(calls, 1);
}

#[test]
fn memory_and_disk_levels_are_bounded() {
    let model = reduced_model();
    let s = model.config().image_size;
    let dir = tempfile::tempdir().unwrap();
    let mut pool = SupportPool::new(
        &model,
        WeightsId::new("w"),
        "p",
        SupportCache::on_disk(dir.path()).unwrap(),
    );
    pool.push(item(0, s, "a", true)).unwrap();
    pool.encoded(0).unwrap();
    let one = std::fs::metadata(&entries(dir.path())[0]).unwrap().len();

    let dir = tempfile::tempdir().unwrap();
    let cache = SupportCache::new(CacheOptions {
        dir: Some(dir.path().to_path_buf()),
        max_memory_entries: 2,
        max_disk_bytes: 2 * one + one / 2,
    })
    .unwrap();
    let mut pool = SupportPool::new(&model, WeightsId::new("w"), "p", cache);
    for i in 0..4 {
        pool.push(item(i, s, "a", true)).unwrap();
    }
    pool.encode_all(&mut |_, _| {}).unwrap();
    assert_eq!(pool.cache().memory_len(), 2);
    assert_eq!(entries(dir.path()).len(), 2, "disk bound: two entries fit");
    // The most recent entries survive: item 3 is served without encoding.
    let before = pool.encoder_calls();
    pool.encoded(3).unwrap();
    assert_eq!(pool.encoder_calls(), before);
    // Item 0 was evicted everywhere: encoded again.
    pool.encoded(0).unwrap();
    assert_eq!(pool.encoder_calls(), before + 1);

    // Fingerprints: stable for the same model, and a file hash is a valid id.
    assert_eq!(
        WeightsId::of_model(&model).unwrap(),
        WeightsId::of_model(&model).unwrap()
    );
    let w = fixture_dir().join("weights.safetensors");
    assert!(WeightsId::of_file(&w).unwrap().as_str().starts_with("file-sha256:"));
    // Bad input is an error, not a panic.
    let mut bad = item(0, s, "a", false);
    bad.image = image(0, s + 1);
    assert!(pool.push(bad).is_err());
    assert!(pool.encoded(99).is_err());
}
