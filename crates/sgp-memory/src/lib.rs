//! Support-set guided prompting (SGP) for SAM2: segmentation from a few labelled
//! examples, without a single click.
//!
//! * [`SupportPool`] holds labelled examples ([`SupportItem`]) and encodes each once per
//!   model through the [`SupportCache`] (memory and disk, keyed by weights, image and
//!   preprocessing).
//! * [`select_supports`] picks a query's K supports: top-k cosine similarity of pooled
//!   level-2 embeddings, class-aware, leave-one-out, ordered least → most similar.
//! * [`Pmg`] turns the supports into SAM2 conditioning frames and gives the query's
//!   memory-conditioned features and pseudo-mask (the `support_pseudo_mask` parity kind).
//! * [`SupportPropagator`] segments a volume from the supports alone, with a bank of the
//!   previous slices' memories ([`Sam2Bank`], [`FifoBank`], [`SimilarityBank`]) and a
//!   caller-supplied refine step (the `support_track` kind with the identity).
//! * [`label_map`] / [`segment_query`]: all classes in one run.
//!
//! This crate depends on sgp-sam2 and sgp-kernels only, so other projects can use it alone.
//!
//! Selection needs only the pooled embeddings:
//!
//! ```rust
//! use std::collections::BTreeSet;
//! use sgp_memory::{select_supports, Candidate, Query, Selection};
//!
//! let lv: BTreeSet<u32> = [3].into();
//! let none = BTreeSet::new();
//! let pool = [
//!     Candidate { embedding: &[1.0, 0.0], case_id: "p1", classes: &lv },
//!     Candidate { embedding: &[0.9, 0.1], case_id: "p2", classes: &lv },
//!     Candidate { embedding: &[0.6, 0.8], case_id: "p3", classes: &lv },
//!     Candidate { embedding: &[1.0, 0.0], case_id: "p4", classes: &none }, // no LV: never chosen
//! ];
//! // The query comes from patient p1, so p1's own slice is left out.
//! let query = Query { embedding: &[1.0, 0.0], case_id: Some("p1"), class: 3 };
//! let chosen = select_supports(&pool, &query, 2, Selection::TopK)?;
//! assert_eq!(chosen, [2, 1]); // least → most similar: the best support sits nearest the query
//! # Ok::<(), sgp_memory::Error>(())
//! ```

#![warn(missing_docs)]

pub mod bank;
pub mod cache;
pub mod error;
pub mod multiclass;
pub mod pmg;
pub mod pool;
pub mod select;
pub mod support;
pub mod volume;

pub use bank::{BankKind, FifoBank, Sam2Bank, SimilarityBank};
pub use cache::{CacheKey, CacheOptions, CacheStats, SupportCache, WeightsId};
pub use error::{Error, Result};
pub use multiclass::{label_map, segment_query, MultiClassPrediction};
pub use pmg::{conditioning_bank, Pmg, PmgOutput};
pub use pool::SupportPool;
pub use select::{select_supports, Candidate, Query, Selection};
pub use support::{encode_support, EncodedSupport, SupportFeatures, SupportItem, SupportMemory};
pub use volume::{
    identity_refine, BankStats, ClassSupports, PropagationOptions, QuerySlices, Refine, SliceContext, SlicePrediction,
    SupportPropagator, SupportTracker, TrackedSlice,
};
