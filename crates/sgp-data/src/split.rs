//! Deterministic, seeded, patient-level splits into support pool, train, val and test.
//!
//! Patients (not cases) are shuffled with a fixed pseudo-random generator (SplitMix64, so the
//! result does not change with a dependency's version) and dealt out: test first, then val,
//! then the support pool (the labelled examples SGP draws its support sets from), and the rest
//! to train. All cases of a patient land on the same side.

use std::collections::{BTreeMap, BTreeSet};

use crate::dataset::Case;
use crate::error::{DataError, Result};

/// How many patients go where.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitConfig {
    /// Seed of the shuffle: the same seed and cases give the same split on every machine.
    pub seed: u64,
    /// Number of patients in the support pool.
    pub support_patients: usize,
    /// Fraction of patients for validation (rounded to the nearest count).
    pub val_fraction: f64,
    /// Fraction of patients for testing (rounded to the nearest count).
    pub test_fraction: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            seed: 0,
            support_patients: 1,
            val_fraction: 0.2,
            test_fraction: 0.2,
        }
    }
}

/// Case ids per side, each list in the dataset's case order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Splits {
    /// The support pool (supports are drawn from these cases only).
    pub support: Vec<String>,
    /// Training cases.
    pub train: Vec<String>,
    /// Validation cases.
    pub val: Vec<String>,
    /// Test cases.
    pub test: Vec<String>,
}

impl Splits {
    /// The four sides with their names, for reports.
    pub fn sides(&self) -> [(&'static str, &Vec<String>); 4] {
        [
            ("support", &self.support),
            ("train", &self.train),
            ("val", &self.val),
            ("test", &self.test),
        ]
    }
}

/// SplitMix64: tiny, well-mixed, and stable forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0), without modulo bias.
    fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Split cases by patient. Errors on no cases, fractions outside `[0, 1)`, or more patients
/// requested than exist.
pub fn split_by_patient(cases: &[Case], config: &SplitConfig) -> Result<Splits> {
    if cases.is_empty() {
        return Err(DataError::InvalidArgument("cannot split an empty dataset".into()));
    }
    for (name, f) in [("val", config.val_fraction), ("test", config.test_fraction)] {
        if !(0.0..1.0).contains(&f) {
            return Err(DataError::InvalidArgument(format!(
                "{name} fraction {f} must be in [0, 1)"
            )));
        }
    }
    let patients: Vec<&str> = cases
        .iter()
        .map(|c| c.patient.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let n = patients.len();
    let n_test = (n as f64 * config.test_fraction).round() as usize;
    let n_val = (n as f64 * config.val_fraction).round() as usize;
    let needed = n_test + n_val + config.support_patients;
    if needed > n {
        return Err(DataError::InvalidArgument(format!(
            "{n} patients cannot give {n_test} test + {n_val} val + {} support patients",
            config.support_patients
        )));
    }
    let mut order = patients.clone();
    let mut rng = SplitMix64(config.seed);
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut side_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, p) in order.iter().enumerate() {
        let side = if k < n_test {
            3
        } else if k < n_test + n_val {
            2
        } else if k < needed {
            0
        } else {
            1
        };
        side_of.insert(p, side);
    }
    let mut s = Splits::default();
    for c in cases {
        let list = match side_of.get(c.patient.as_str()) {
            Some(0) => &mut s.support,
            Some(2) => &mut s.val,
            Some(3) => &mut s.test,
            _ => &mut s.train,
        };
        list.push(c.id.clone());
    }
    Ok(s)
}
