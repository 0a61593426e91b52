//! The support pool: labelled examples, encoded lazily through the [`SupportCache`], and
//! the selection of a query's supports from them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::Tensor;
use sgp_sam2::Sam2Model;

use crate::cache::{CacheKey, SupportCache, WeightsId};
use crate::select::{select_supports, Candidate, Query, Selection};
use crate::support::{encode_support, validate_item, EncodedSupport, SupportItem, SupportMemory};
use crate::volume::ClassSupports;
use crate::{Error, Result};

/// Support items with cached encodings.
pub struct SupportPool<'m> {
    model: &'m Sam2Model,
    weights: WeightsId,
    preprocess: String,
    cache: SupportCache,
    items: Vec<SupportItem>,
    keys: Vec<CacheKey>,
    classes: Vec<BTreeSet<u32>>,
    pooled: Vec<Option<Vec<f32>>>,
    encoder_calls: usize,
}

impl<'m> SupportPool<'m> {
    /// An empty pool on `model`. `weights` and `preprocess` (a description of how the
    /// images were turned into model inputs) are part of every cache key.
    pub fn new(model: &'m Sam2Model, weights: WeightsId, preprocess: impl Into<String>, cache: SupportCache) -> Self {
        Self {
            model,
            weights,
            preprocess: preprocess.into(),
            cache,
            items: Vec::new(),
            keys: Vec::new(),
            classes: Vec::new(),
            pooled: Vec::new(),
            encoder_calls: 0,
        }
    }

    /// Adds an item (checked against the model's input size); returns its pool index.
    pub fn push(&mut self, item: SupportItem) -> Result<usize> {
        validate_item(&item, self.model.config().image_size)?;
        let key = CacheKey::new(self.model, &self.weights, &self.preprocess, &item)?;
        self.classes.push(item.masks.keys().copied().collect());
        self.items.push(item);
        self.keys.push(key);
        self.pooled.push(None);
        Ok(self.items.len() - 1)
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the pool holds no item.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Item `i`.
    pub fn item(&self, i: usize) -> Option<&SupportItem> {
        self.items.get(i)
    }

    /// The cache key of item `i`.
    pub fn key(&self, i: usize) -> Option<&CacheKey> {
        self.keys.get(i)
    }

    /// Every class some item holds.
    pub fn classes(&self) -> BTreeSet<u32> {
        self.classes.iter().flatten().copied().collect()
    }

    /// How many times the image encoder ran for supports (cache misses).
    pub fn encoder_calls(&self) -> usize {
        self.encoder_calls
    }

    /// The cache.
    pub fn cache(&self) -> &SupportCache {
        &self.cache
    }

    /// The encoding of item `i` (memory, disk or computed).
    pub fn encoded(&mut self, i: usize) -> Result<Arc<EncodedSupport>> {
        let n = self.items.len();
        let item = self
            .items
            .get(i)
            .ok_or_else(|| Error::Input(format!("support {i} out of range ({n} items)")))?;
        let model = self.model;
        let calls = &mut self.encoder_calls;
        let enc = self.cache.get_or_encode(model, &self.keys[i], || {
            *calls += 1;
            encode_support(model, item)
        })?;
        if self.pooled[i].is_none() {
            self.pooled[i] = Some(enc.pooled.to_dtype(candle_core::DType::F32)?.to_vec1()?);
        }
        Ok(enc)
    }

    /// Encodes every item; `on_item(done, total)` reports progress.
    pub fn encode_all(&mut self, on_item: &mut dyn FnMut(usize, usize)) -> Result<()> {
        let _span = tracing::info_span!("encode_supports", n = self.items.len()).entered();
        let n = self.items.len();
        for i in 0..n {
            self.encoded(i)?;
            on_item(i + 1, n);
        }
        Ok(())
    }

    /// Pooled embeddings of every item, encoding what is missing.
    fn embeddings(&mut self) -> Result<Vec<Vec<f32>>> {
        for i in 0..self.items.len() {
            if self.pooled[i].is_none() {
                self.encoded(i)?;
            }
        }
        Ok(self.pooled.iter().map(|p| p.clone().unwrap_or_default()).collect())
    }

    /// Pool indices of the supports for a query (see [`select_supports`]): `query_pooled`
    /// is the query's `[C]` pooled level-2 embedding, `query_case` its case id.
    pub fn select(
        &mut self,
        query_pooled: &Tensor,
        query_case: Option<&str>,
        class: u32,
        k: usize,
        method: Selection,
    ) -> Result<Vec<usize>> {
        if self.items.is_empty() {
            return Err(Error::EmptyPool);
        }
        let q: Vec<f32> = query_pooled
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let emb = self.embeddings()?;
        let cands: Vec<Candidate> = (0..self.items.len())
            .map(|i| Candidate {
                embedding: &emb[i],
                case_id: &self.items[i].case_id,
                classes: &self.classes[i],
            })
            .collect();
        select_supports(
            &cands,
            &Query {
                embedding: &q,
                case_id: query_case,
                class,
            },
            k,
            method,
        )
    }

    /// The memories of class `class` of the given items, in the given order.
    pub fn memories(&mut self, indices: &[usize], class: u32) -> Result<Vec<SupportMemory>> {
        indices
            .iter()
            .map(|&i| {
                let enc = self.encoded(i)?;
                enc.memory(class)
                    .cloned()
                    .ok_or_else(|| Error::Input(format!("support {i} holds no class {class}")))
            })
            .collect()
    }

    /// Selects and gathers the supports of every class in `classes` for one query (or a
    /// volume, through its embedding), ready for PMG or propagation.
    pub fn class_supports(
        &mut self,
        query_pooled: &Tensor,
        query_case: Option<&str>,
        classes: &[u32],
        k: usize,
        method: Selection,
    ) -> Result<ClassSupports> {
        let mut per_class = BTreeMap::new();
        for &c in classes {
            let idx = self.select(query_pooled, query_case, c, k, method)?;
            per_class.insert(c, self.memories(&idx, c)?);
        }
        ClassSupports::new(per_class)
    }
}
