//! The real hub download path (hf-hub 1.0) against a local stand-in for the hub, serving
//! small random-weights repos made from the committed parity fixtures. No network.

#![cfg(feature = "hub")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sgp::hub::HubOptions;
use sgp::{load_pretrained, Error, LoadOptions, WeightsFormat};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn transformers_case() -> PathBuf {
    repo_root().join("fixtures/parity-transformers/transformers_sam_heads_point_multi")
}

fn original_case() -> PathBuf {
    repo_root().join("fixtures/parity/sam2_reduced/s64/image_encoder_b1")
}

/// How the stand-in serves one file.
#[derive(Clone)]
struct Served {
    bytes: Vec<u8>,
    /// Announce the full length but send only half, then hang up.
    cut_transfer: bool,
}

type Files = Arc<Mutex<HashMap<String, Served>>>;

/// A minimal hub: `HEAD|GET /{owner}/{name}/resolve/{rev}/{file}` with the headers hf-hub
/// reads (`ETag`, `X-Repo-Commit`, `Content-Length`); 404 for anything else.
struct StandIn {
    endpoint: String,
    files: Files,
}

impl StandIn {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let files: Files = Arc::default();
        let served = files.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let files = served.clone();
                std::thread::spawn(move || {
                    let _ = handle(stream, &files);
                });
            }
        });
        Self { endpoint, files }
    }

    fn serve(&self, repo: &str, file: &str, bytes: Vec<u8>) {
        self.serve_with(repo, file, bytes, false);
    }

    fn serve_with(&self, repo: &str, file: &str, bytes: Vec<u8>, cut_transfer: bool) {
        self.files
            .lock()
            .unwrap()
            .insert(format!("{repo}/{file}"), Served { bytes, cut_transfer });
    }
}

fn handle(mut stream: TcpStream, files: &Files) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    // /{owner}/{name}/resolve/{rev}/{file}
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let found = if segs.len() == 5 && segs[2] == "resolve" {
        files
            .lock()
            .unwrap()
            .get(&format!("{}/{}/{}", segs[0], segs[1], segs[4]))
            .cloned()
    } else {
        None
    };
    let commit = "0123456789abcdef0123456789abcdef01234567";
    match found {
        None => {
            write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nX-Repo-Commit: {commit}\r\nX-Error-Code: EntryNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
        }
        Some(served) => {
            let etag = format!("{:016x}{:08x}", fnv1a(&served.bytes), served.bytes.len());
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {commit}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                served.bytes.len()
            )?;
            if method == "GET" {
                let body = if served.cut_transfer {
                    &served.bytes[..served.bytes.len() / 2]
                } else {
                    &served.bytes[..]
                };
                stream.write_all(body)?;
            }
        }
    }
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

fn options(endpoint: &str, cache: &Path, offline: bool) -> LoadOptions {
    LoadOptions {
        config: None,
        real_use_settings: false,
        image_size: None,
        device: candle_core::Device::Cpu,
        hub: HubOptions {
            endpoint: Some(endpoint.to_string()),
            cache_dir: Some(cache.to_path_buf()),
            offline,
            max_attempts: Some(1),
        },
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

/// Every file below `dir` (the cache), as paths relative to it.
fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn downloads_transformers_repo_then_works_offline_from_cache() {
    let hub = StandIn::start();
    let case = transformers_case();
    hub.serve("test/sam2-hf", "config.json", read(&case.join("config.json")));
    hub.serve(
        "test/sam2-hf",
        "model.safetensors",
        read(&case.join("model.safetensors")),
    );
    let cache = tempfile::tempdir().unwrap();

    let online =
        load_pretrained("test/sam2-hf", &options(&hub.endpoint, cache.path(), false)).expect("download and load");
    assert_eq!(online.format, WeightsFormat::Transformers);
    assert!(!online.has_memory_path, "Sam2Model checkpoints are image-only");
    assert!(online.weights_path.starts_with(cache.path()));

    // Offline: served from the cache, even with the stand-in gone from the options.
    let offline =
        load_pretrained("test/sam2-hf", &options("http://127.0.0.1:9", cache.path(), true)).expect("cached load");
    assert_eq!(offline.format, WeightsFormat::Transformers);
}

#[test]
fn downloads_original_safetensors_with_a_config() {
    let hub = StandIn::start();
    let case = original_case();
    hub.serve(
        "test/sam2-orig",
        "model.safetensors",
        read(&case.join("weights.safetensors")),
    );
    let cache = tempfile::tempdir().unwrap();
    let mut opts = options(&hub.endpoint, cache.path(), false);
    // Without a config the repo cannot be interpreted: a clear error, not a guess.
    let err = load_pretrained("test/sam2-orig", &opts).unwrap_err();
    assert!(matches!(err, Error::NeedConfig(_)), "{err}");
    opts.config = Some(case.join("config.json").display().to_string());
    let loaded = load_pretrained("test/sam2-orig", &opts).expect("load with config");
    assert_eq!(loaded.format, WeightsFormat::OriginalSafetensors);
    assert!(loaded.has_memory_path);
}

#[test]
fn offline_with_empty_cache_says_so() {
    let cache = tempfile::tempdir().unwrap();
    let err = load_pretrained(
        "facebook/sam2.1-hiera-tiny",
        &options("http://127.0.0.1:9", cache.path(), true),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NotCached { .. }), "{err}");
    assert!(err.to_string().contains("offline"), "{err}");
}

#[test]
fn unreachable_hub_with_empty_cache_says_so() {
    // Bind then drop a listener: nothing answers on that port.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cache = tempfile::tempdir().unwrap();
    let err = load_pretrained(
        "facebook/sam2.1-hiera-tiny",
        &options(&format!("http://127.0.0.1:{port}"), cache.path(), false),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
}

#[test]
fn cut_transfer_leaves_nothing_in_the_cache() {
    let hub = StandIn::start();
    let case = transformers_case();
    hub.serve("test/cut", "config.json", read(&case.join("config.json")));
    hub.serve_with(
        "test/cut",
        "model.safetensors",
        read(&case.join("model.safetensors")),
        true,
    );
    let cache = tempfile::tempdir().unwrap();
    let err = load_pretrained("test/cut", &options(&hub.endpoint, cache.path(), false)).unwrap_err();
    assert!(!matches!(err, Error::Sam2(_)), "the transfer itself must fail: {err}");
    let left: Vec<String> = files_below(cache.path())
        .into_iter()
        .filter(|f| f.contains("blobs") && !f.ends_with(".lock"))
        .collect();
    // Only config.json's blob may remain; no partial weights.
    assert!(
        left.iter().all(|f| !f.contains("incomplete")) && left.len() <= 1,
        "partial files left in the cache: {left:?}"
    );
}

#[test]
fn truncated_file_is_a_clear_error_and_is_evicted() {
    let hub = StandIn::start();
    let case = transformers_case();
    let mut bytes = read(&case.join("model.safetensors"));
    bytes.truncate(bytes.len() * 2 / 3);
    hub.serve("test/trunc", "config.json", read(&case.join("config.json")));
    hub.serve("test/trunc", "model.safetensors", bytes);
    let cache = tempfile::tempdir().unwrap();
    let err = load_pretrained("test/trunc", &options(&hub.endpoint, cache.path(), false)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Sam2(sgp::sam2::Error::WeightsFormat { .. })),
        "{msg}"
    );
    let snapshots: Vec<String> = files_below(cache.path())
        .into_iter()
        .filter(|f| f.ends_with("model.safetensors"))
        .collect();
    assert!(snapshots.is_empty(), "corrupt file kept in the cache: {snapshots:?}");
}

/// Rewrites a safetensors file: drop keys matching `drop`, and store keys matching
/// `as_i64` as int64.
fn rewrite_safetensors(src: &Path, drop: &str, as_i64: &str) -> Vec<u8> {
    let bytes = read(src);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if !drop.is_empty() && name.contains(drop) {
            continue;
        }
        if !as_i64.is_empty() && name.contains(as_i64) {
            let vals: Vec<u8> = view
                .data()
                .chunks_exact(4)
                .flat_map(|c| (f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).to_le_bytes())
                .collect();
            owned.push((name, safetensors::Dtype::I64, view.shape().to_vec(), vals));
        } else {
            owned.push((name, view.dtype(), view.shape().to_vec(), view.data().to_vec()));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn missing_keys_and_wrong_dtype_are_listed() {
    let case = original_case();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options("http://127.0.0.1:9", dir.path(), true);
    opts.config = Some(case.join("config.json").display().to_string());

    let missing = dir.path().join("missing.safetensors");
    std::fs::write(
        &missing,
        rewrite_safetensors(&case.join("weights.safetensors"), "sam_mask_decoder.iou_token", ""),
    )
    .unwrap();
    let err = load_pretrained(missing.to_str().unwrap(), &opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("sam_mask_decoder.iou_token.weight"), "{msg}");

    let wrong = dir.path().join("wrong_dtype.safetensors");
    std::fs::write(
        &wrong,
        rewrite_safetensors(&case.join("weights.safetensors"), "", "no_mem_embed"),
    )
    .unwrap();
    let err = load_pretrained(wrong.to_str().unwrap(), &opts).unwrap_err();
    assert!(err.to_string().contains("no_mem_embed"), "{err}");
}

#[test]
fn unknown_format_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("model.onnx");
    std::fs::write(&junk, b"\x08\x07\x12\x04junk that is no checkpoint").unwrap();
    let opts = options("http://127.0.0.1:9", dir.path(), true);
    let err = load_pretrained(junk.to_str().unwrap(), &opts).unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = load_pretrained(empty.path().to_str().unwrap(), &opts).unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err}");
}
