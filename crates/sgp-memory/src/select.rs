//! Support selection: which K supports a query gets, and in which order.
//!
//! * Only supports holding the target class qualify, and never one from the query's own
//!   case or patient (leave-one-out).
//! * [`Selection::TopK`] (the default, as the paper says): the K most similar by cosine
//!   similarity of L2-normalised, mean-pooled level-2 embeddings; a deterministic top-k,
//!   ties broken by pool index (the lower index ranks higher).
//! * [`Selection::FirstK`] and [`Selection::RandomK`] choose the set differently, for
//!   ablations; `RandomK` is a seeded shuffle with our own generator, so a seed gives the
//!   same supports on every machine and version.
//! * Whatever chose the set, the result is ordered **least to most similar** (ties: the
//!   lower pool index later), so the most similar support becomes frame K−1, nearest the
//!   query in SAM2's temporal encoding.
//!
//! Similarities are computed in f64 from the f32 embeddings, in a fixed order, so the
//! ranking is reproducible.

use std::collections::BTreeSet;

use crate::{Error, Result};

/// How the support set is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Selection {
    /// The K most similar (default).
    #[default]
    TopK,
    /// The first K qualifying supports in pool order.
    FirstK,
    /// K qualifying supports drawn uniformly without replacement, seeded.
    RandomK {
        /// The generator's seed.
        seed: u64,
    },
}

impl std::str::FromStr for Selection {
    type Err = Error;
    /// `top-k`, `first-k`, `random-k` (seed 0) or `random-k:SEED`.
    fn from_str(s: &str) -> Result<Self> {
        let l = s.to_ascii_lowercase().replace('_', "-");
        match l.as_str() {
            "top-k" | "topk" | "top" => Ok(Self::TopK),
            "first-k" | "firstk" | "first" => Ok(Self::FirstK),
            "random-k" | "randomk" | "random" => Ok(Self::RandomK { seed: 0 }),
            _ => {
                if let Some(seed) = l.strip_prefix("random-k:").or_else(|| l.strip_prefix("random:")) {
                    let seed = seed
                        .parse()
                        .map_err(|_| Error::Input(format!("bad random-k seed in {s:?}")))?;
                    return Ok(Self::RandomK { seed });
                }
                Err(Error::Input(format!(
                    "unknown selection {s:?} (top-k, first-k, random-k[:SEED])"
                )))
            }
        }
    }
}

/// What selection needs to know about one pool item.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Its pooled embedding (any scale; it is normalised here).
    pub embedding: &'a [f32],
    /// Its case / patient id.
    pub case_id: &'a str,
    /// The classes its masks hold.
    pub classes: &'a BTreeSet<u32>,
}

/// The query side of a selection.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// Its pooled embedding.
    pub embedding: &'a [f32],
    /// Its case / patient id; supports of the same case are excluded. None: no exclusion.
    pub case_id: Option<&'a str>,
    /// The target class.
    pub class: u32,
}

/// Cosine similarity of two vectors after L2 normalisation (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    let d = aa.sqrt() * bb.sqrt();
    if d > 0.0 && d.is_finite() {
        ab / d
    } else {
        0.0
    }
}

/// Chooses up to `k` supports for `query` from `pool`, returning pool indices ordered
/// least → most similar. Errors: an empty pool, `k == 0`, a class no support holds, and
/// a class only the query's own case holds. When fewer than `k` qualify, a warning is
/// logged and all qualifying supports are returned.
pub fn select_supports(pool: &[Candidate], query: &Query, k: usize, method: Selection) -> Result<Vec<usize>> {
    if pool.is_empty() {
        return Err(Error::EmptyPool);
    }
    if k == 0 {
        return Err(Error::Input("the support size K must be at least 1".into()));
    }
    let with_class: Vec<usize> = (0..pool.len())
        .filter(|&i| pool[i].classes.contains(&query.class))
        .collect();
    if with_class.is_empty() {
        let present: BTreeSet<u32> = pool.iter().flat_map(|c| c.classes.iter().copied()).collect();
        return Err(Error::ClassAbsent {
            class: query.class,
            present: present.into_iter().collect(),
        });
    }
    let qualifying: Vec<usize> = with_class
        .iter()
        .copied()
        .filter(|&i| query.case_id != Some(pool[i].case_id))
        .collect();
    if qualifying.is_empty() {
        return Err(Error::NoQualifying {
            class: query.class,
            reason: format!(
                "all {} supports holding it come from the query's own case {:?}",
                with_class.len(),
                query.case_id.unwrap_or_default()
            ),
        });
    }
    for &i in &qualifying {
        if pool[i].embedding.len() != query.embedding.len() {
            return Err(Error::Input(format!(
                "support {i} has a {}-dim embedding, the query {}",
                pool[i].embedding.len(),
                query.embedding.len()
            )));
        }
    }
    if qualifying.len() < k {
        tracing::warn!(
            class = query.class,
            requested = k,
            available = qualifying.len(),
            "fewer qualifying supports than the support size; using all of them"
        );
    }
    let sims: Vec<(usize, f64)> = qualifying
        .iter()
        .map(|&i| (i, cosine(pool[i].embedding, query.embedding)))
        .collect();
    // Rank: most similar first, ties by lower pool index.
    let rank = |v: &mut Vec<(usize, f64)>| {
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    };
    let mut chosen: Vec<(usize, f64)> = match method {
        Selection::TopK => {
            let mut v = sims;
            rank(&mut v);
            v.truncate(k);
            v
        }
        Selection::FirstK => sims.into_iter().take(k).collect(),
        Selection::RandomK { seed } => {
            let mut v = sims;
            let mut rng = SplitMix64(seed);
            // Fisher–Yates over the qualifying supports in pool order.
            for i in (1..v.len()).rev() {
                let j = (rng.next() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
            v.truncate(k);
            v
        }
    };
    rank(&mut chosen);
    Ok(chosen.into_iter().rev().map(|(i, _)| i).collect())
}

/// SplitMix64: tiny, fixed, and reproducible across platforms and crate versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
