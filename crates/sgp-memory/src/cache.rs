//! The support cache: a support is encoded once per model, then read back.
//!
//! * Key: SHA-256 of the weights' id, the model config, the caller's preprocessing key,
//!   the model-input image and every class mask ([`CacheKey`]). Any change to one of them
//!   is a different entry; nothing is ever matched by file name alone.
//! * Memory level: an LRU of at most `max_memory_entries` encodings.
//! * Disk level (optional): one safetensors file per entry, `<key>.safetensors`, written
//!   to a temporary file and renamed into place, so a crash mid-write leaves no partial
//!   entry. The folder is bounded by `max_disk_bytes` (least recently used go first).
//! * Trust: an entry is used only if its metadata names the expected format and key, its
//!   tensors have the shapes the model produces, are finite, and their SHA-256 digest
//!   matches the one stored. Anything else is logged, deleted and recomputed.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sgp_sam2::Sam2Model;
use sha2::{Digest, Sha256};

use crate::support::{encode_support, EncodedSupport, SupportFeatures, SupportItem, SupportMemory};
use crate::{Error, Result};

/// Format tag of a disk entry; bump it when the entry layout or the encoding changes.
pub const ENTRY_FORMAT: &str = "sgp-support-v1";

/// Identifies the weights a support was encoded with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WeightsId(String);

impl WeightsId {
    /// A caller-chosen id (e.g. a checkpoint's own hash, or a training step).
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// SHA-256 of a weights file's bytes.
    pub fn of_file(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(Self(format!("file-sha256:{}", hex(&h.finalize()))))
    }

    /// A fingerprint of the function the model computes on supports: the digest of one
    /// deterministic probe support's encoding. It changes whenever a weight that matters
    /// to supports changes (LoRA merges included), at the cost of one encoding.
    pub fn of_model(model: &Sam2Model) -> Result<Self> {
        let s = model.config().image_size;
        let dev = model.device();
        let img: Vec<f32> = (0..3 * s * s).map(|i| ((i as f32) * 0.618_034).sin() * 1.5).collect();
        let c = s as f32 / 2.0;
        let mask: Vec<f32> = (0..s * s)
            .map(|i| {
                let (y, x) = ((i / s) as f32, (i % s) as f32);
                f32::from(((x - c).powi(2) + (y - c).powi(2)).sqrt() < s as f32 / 4.0)
            })
            .collect();
        let item = SupportItem {
            image: Tensor::from_vec(img, (3, s, s), dev)?,
            masks: BTreeMap::from([(1, Tensor::from_vec(mask, (s, s), dev)?)]),
            case_id: "probe".into(),
        };
        let enc = encode_support(model, &item)?;
        let mut h = Sha256::new();
        for (name, t) in entry_tensors(&enc) {
            h.update(name.as_bytes());
            h.update(le_bytes(&t)?);
        }
        Ok(Self(format!("probe-sha256:{}", hex(&h.finalize()))))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The cache key of one support encoding (hex SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

impl CacheKey {
    /// The key of `item` encoded by `model` (with weights `weights`) after the caller's
    /// preprocessing `preprocess` (e.g. "resize512-imagenet-ct[-1000,1000]").
    pub fn new(model: &Sam2Model, weights: &WeightsId, preprocess: &str, item: &SupportItem) -> Result<Self> {
        let mut h = Sha256::new();
        let field = |h: &mut Sha256, b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(&mut h, ENTRY_FORMAT.as_bytes());
        field(&mut h, weights.as_str().as_bytes());
        let cfg = serde_json::to_string(model.config()).map_err(|e| Error::Cache(format!("config: {e}")))?;
        field(&mut h, cfg.as_bytes());
        field(&mut h, preprocess.as_bytes());
        field(&mut h, format!("{:?}", item.image.dims()).as_bytes());
        field(&mut h, &le_bytes(&item.image)?);
        for (c, m) in &item.masks {
            // Encoding binarises at 0.5, so the key does too.
            let bin = m.to_dtype(DType::F32)?.ge(0.5f32)?.flatten_all()?.to_vec1::<u8>()?;
            field(&mut h, &c.to_le_bytes());
            field(&mut h, format!("{:?}", m.dims()).as_bytes());
            field(&mut h, &bin);
        }
        Ok(Self(hex(&h.finalize())))
    }

    /// The key as text (also the entry's file stem).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Bounds and location of a cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Folder of the disk level; None: memory only.
    pub dir: Option<PathBuf>,
    /// Most encodings held in memory.
    pub max_memory_entries: usize,
    /// Most bytes of entry files in `dir`.
    pub max_disk_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            dir: None,
            max_memory_entries: 256,
            max_disk_bytes: 4 << 30,
        }
    }
}

/// What the cache did (for tests, logs and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Served from memory.
    pub memory_hits: usize,
    /// Served from disk.
    pub disk_hits: usize,
    /// Computed (absent or rejected).
    pub misses: usize,
    /// Disk entries rejected as stale or corrupt.
    pub rejected: usize,
}

/// The tensor shapes an entry must have for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryShape {
    c: usize,
    mem_dim: usize,
    e: usize,
    s: usize,
    high_res: bool,
}

impl EntryShape {
    fn of(model: &Sam2Model) -> Self {
        let s = model.config().image_size;
        Self {
            c: model.hidden_dim(),
            mem_dim: model.mem_dim(),
            e: s / 16,
            s,
            high_res: model.num_feature_levels() == 3,
        }
    }
}

/// Memory + disk cache of support encodings.
#[derive(Debug)]
pub struct SupportCache {
    opts: CacheOptions,
    memory: HashMap<CacheKey, (Arc<EncodedSupport>, u64)>,
    tick: u64,
    stats: CacheStats,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl SupportCache {
    /// A cache with these bounds; creates the disk folder.
    pub fn new(opts: CacheOptions) -> Result<Self> {
        if let Some(dir) = &opts.dir {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(Self {
            opts,
            memory: HashMap::new(),
            tick: 0,
            stats: CacheStats::default(),
        })
    }

    /// A memory-only cache of at most `max_entries` encodings.
    pub fn in_memory(max_entries: usize) -> Self {
        Self {
            opts: CacheOptions {
                dir: None,
                max_memory_entries: max_entries,
                ..CacheOptions::default()
            },
            memory: HashMap::new(),
            tick: 0,
            stats: CacheStats::default(),
        }
    }

    /// A memory + disk cache in `dir` with default bounds.
    pub fn on_disk(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::new(CacheOptions {
            dir: Some(dir.into()),
            ..CacheOptions::default()
        })
    }

    /// What the cache did so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Encodings held in memory.
    pub fn memory_len(&self) -> usize {
        self.memory.len()
    }

    /// The path of a key's disk entry (None without a disk level).
    pub fn entry_path(&self, key: &CacheKey) -> Option<PathBuf> {
        self.opts
            .dir
            .as_ref()
            .map(|d| d.join(format!("{}.safetensors", key.as_str())))
    }

    /// The encoding for `key`: from memory, else from a trusted disk entry, else from
    /// `encode` (then stored at both levels).
    pub fn get_or_encode(
        &mut self,
        model: &Sam2Model,
        key: &CacheKey,
        encode: impl FnOnce() -> Result<EncodedSupport>,
    ) -> Result<Arc<EncodedSupport>> {
        self.tick += 1;
        if let Some((enc, t)) = self.memory.get_mut(key) {
            *t = self.tick;
            self.stats.memory_hits += 1;
            return Ok(enc.clone());
        }
        let shape = EntryShape::of(model);
        let enc = match self.load_disk(key, shape, model.device()) {
            Some(enc) => {
                self.stats.disk_hits += 1;
                enc
            }
            None => {
                self.stats.misses += 1;
                let enc = encode()?;
                self.store_disk(key, &enc)?;
                enc
            }
        };
        let enc = Arc::new(enc);
        self.insert_memory(key.clone(), enc.clone());
        Ok(enc)
    }

    fn insert_memory(&mut self, key: CacheKey, enc: Arc<EncodedSupport>) {
        if self.opts.max_memory_entries == 0 {
            return;
        }
        while self.memory.len() >= self.opts.max_memory_entries {
            let oldest = self.memory.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.memory.remove(&k);
                }
                None => break,
            }
        }
        self.memory.insert(key, (enc, self.tick));
    }

    /// A trusted disk entry, or None (absent; or rejected, deleted and logged).
    fn load_disk(&mut self, key: &CacheKey, shape: EntryShape, dev: &Device) -> Option<EncodedSupport> {
        let path = self.entry_path(key)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "support cache entry unreadable; recomputing");
                return None;
            }
        };
        match parse_entry(&bytes, key, shape, dev) {
            Ok(enc) => {
                // Touch for LRU eviction of the folder.
                if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                Some(enc)
            }
            Err(reason) => {
                self.stats.rejected += 1;
                tracing::warn!(path = %path.display(), %reason, "support cache entry rejected; recomputing");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn store_disk(&self, key: &CacheKey, enc: &EncodedSupport) -> Result<()> {
        let (Some(dir), Some(path)) = (self.opts.dir.as_ref(), self.entry_path(key)) else {
            return Ok(());
        };
        let bytes = serialize_entry(key, enc)?;
        if bytes.len() as u64 > self.opts.max_disk_bytes {
            tracing::warn!(
                bytes = bytes.len(),
                "support entry larger than the disk cache bound; not stored"
            );
            return Ok(());
        }
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.{}.{n}.tmp", key.as_str(), std::process::id()));
        let io = |p: &Path, source| Error::Io {
            path: p.to_path_buf(),
            source,
        };
        {
            let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
            f.write_all(&bytes).map_err(|e| io(&tmp, e))?;
            f.sync_all().map_err(|e| io(&tmp, e))?;
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&path, e));
        }
        self.enforce_disk_bound(dir, &path);
        Ok(())
    }

    /// Deletes least recently used entries (never `keep`) until the folder fits, and
    /// temporary files left by crashed writers.
    fn enforce_disk_bound(&self, dir: &Path, keep: &Path) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        let mut entries = Vec::new();
        let mut total = 0u64;
        let now = std::time::SystemTime::now();
        for e in rd.flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            let modified = meta.modified().unwrap_or(now);
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(".tmp") {
                let old = now
                    .duration_since(modified)
                    .map(|d| d.as_secs() > 3600)
                    .unwrap_or(false);
                if old {
                    let _ = std::fs::remove_file(&p);
                }
                continue;
            }
            if !name.ends_with(".safetensors") {
                continue;
            }
            total += meta.len();
            entries.push((modified, meta.len(), p));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
        for (_, len, p) in entries {
            if total <= self.opts.max_disk_bytes {
                break;
            }
            if p == keep {
                continue;
            }
            if std::fs::remove_file(&p).is_ok() {
                total -= len;
            }
        }
    }
}

/// The tensors of an entry, by name, in a fixed (sorted) order.
fn entry_tensors(enc: &EncodedSupport) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    m.insert("image_embed".to_string(), enc.features.image_embed.clone());
    if let Some((a, b)) = &enc.features.high_res {
        m.insert("high_res.0".to_string(), a.clone());
        m.insert("high_res.1".to_string(), b.clone());
    }
    m.insert("pooled".to_string(), enc.pooled.clone());
    for (c, mem) in &enc.memories {
        let p = format!("class.{c}.");
        m.insert(format!("{p}maskmem_features"), mem.maskmem_features.clone());
        m.insert(format!("{p}maskmem_pos_enc"), mem.maskmem_pos_enc.clone());
        m.insert(format!("{p}obj_ptr"), mem.obj_ptr.clone());
        m.insert(format!("{p}object_score_logits"), mem.object_score_logits.clone());
        m.insert(format!("{p}pred_masks"), mem.pred_masks.clone());
    }
    m
}

fn le_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest<'a>(items: impl Iterator<Item = (&'a str, &'a [usize], &'a [u8])>) -> String {
    let mut h = Sha256::new();
    for (name, shape, data) in items {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    hex(&h.finalize())
}

fn serialize_entry(key: &CacheKey, enc: &EncodedSupport) -> Result<Vec<u8>> {
    let tensors = entry_tensors(enc);
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in &tensors {
        owned.push((name.clone(), t.dims().to_vec(), le_bytes(t)?));
    }
    let dig = digest(owned.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())));
    let classes: Vec<String> = enc.memories.keys().map(|c| c.to_string()).collect();
    let meta = HashMap::from([
        ("format".to_string(), ENTRY_FORMAT.to_string()),
        ("key".to_string(), key.as_str().to_string()),
        ("classes".to_string(), classes.join(",")),
        ("digest".to_string(), dig),
    ]);
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, s, d)| -> Result<(String, TensorView)> {
            let v = TensorView::new(Dtype::F32, s.clone(), d).map_err(|e| Error::Cache(e.to_string()))?;
            Ok((n.clone(), v))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Cache(e.to_string()))
}

/// Reads and checks an entry; the error says why it is not trusted.
fn parse_entry(
    bytes: &[u8],
    key: &CacheKey,
    shape: EntryShape,
    dev: &Device,
) -> std::result::Result<EncodedSupport, String> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let meta = metadata.metadata().clone().ok_or("no metadata")?;
    let get = |k: &str| meta.get(k).cloned().ok_or(format!("metadata lacks {k:?}"));
    if get("format")? != ENTRY_FORMAT {
        return Err(format!("format {:?}, expected {ENTRY_FORMAT:?}", get("format")?));
    }
    if get("key")? != key.as_str() {
        return Err("entry was written for another key".into());
    }
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("unreadable tensors: {e}"))?;
    let mut views: Vec<(String, TensorView)> = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    let dig = digest(views.iter().map(|(n, v)| (n.as_str(), v.shape(), v.data())));
    if dig != get("digest")? {
        return Err("tensor digest mismatch (corrupt)".into());
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (n, v) in &views {
        if v.dtype() != Dtype::F32 {
            return Err(format!("{n} is {:?}, expected F32", v.dtype()));
        }
        let t = Tensor::from_raw_buffer(v.data(), DType::F32, v.shape(), dev).map_err(|e| e.to_string())?;
        tensors.insert(n.clone(), t);
    }
    let EntryShape {
        c,
        mem_dim,
        e,
        s,
        high_res,
    } = shape;
    let mut take = |name: &str, want: &[usize]| -> std::result::Result<Tensor, String> {
        let t = tensors.remove(name).ok_or(format!("missing tensor {name}"))?;
        if t.dims() != want {
            return Err(format!("{name} is {:?}, expected {want:?}", t.dims()));
        }
        let finite = t
            .flatten_all()
            .and_then(|f| f.to_vec1::<f32>())
            .map(|v| v.iter().all(|x| x.is_finite()))
            .map_err(|e| e.to_string())?;
        if !finite {
            return Err(format!("{name} holds NaN or Inf"));
        }
        Ok(t)
    };
    let image_embed = take("image_embed", &[1, c, e, e])?;
    let high_res = if high_res {
        Some((
            take("high_res.0", &[1, c / 8, 4 * e, 4 * e])?,
            take("high_res.1", &[1, c / 4, 2 * e, 2 * e])?,
        ))
    } else {
        None
    };
    let pooled = take("pooled", &[c])?;
    let classes = get("classes")?;
    let mut memories = BTreeMap::new();
    for cs in classes.split(',').filter(|x| !x.is_empty()) {
        let cl: u32 = cs.parse().map_err(|_| format!("bad class {cs:?}"))?;
        let p = format!("class.{cl}.");
        memories.insert(
            cl,
            SupportMemory {
                maskmem_features: take(&format!("{p}maskmem_features"), &[1, mem_dim, e, e])?,
                maskmem_pos_enc: take(&format!("{p}maskmem_pos_enc"), &[1, mem_dim, e, e])?,
                obj_ptr: take(&format!("{p}obj_ptr"), &[1, c])?,
                object_score_logits: take(&format!("{p}object_score_logits"), &[1, 1])?,
                pred_masks: take(&format!("{p}pred_masks"), &[1, 1, s / 4, s / 4])?,
            },
        );
    }
    if memories.is_empty() {
        return Err("entry holds no class".into());
    }
    if !tensors.is_empty() {
        let extra: Vec<&String> = tensors.keys().collect();
        return Err(format!("unexpected tensors {extra:?}"));
    }
    Ok(EncodedSupport {
        features: SupportFeatures { image_embed, high_res },
        pooled,
        memories,
    })
}
