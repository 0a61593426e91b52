//! Selection on constructed embeddings: deterministic top-k with ties by pool index,
//! class-aware, leave-one-out, ordered least → most similar; first-k, seeded random-k;
//! the errors and the K-too-large fallback.

use std::collections::BTreeSet;

use sgp_memory::{select_supports, Candidate, Error, Query, Selection};

struct Pool {
    emb: Vec<Vec<f32>>,
    case: Vec<String>,
    classes: Vec<BTreeSet<u32>>,
}

impl Pool {
    fn new(items: &[(&[f32], &str, &[u32])]) -> Self {
        Self {
            emb: items.iter().map(|i| i.0.to_vec()).collect(),
            case: items.iter().map(|i| i.1.to_string()).collect(),
            classes: items.iter().map(|i| i.2.iter().copied().collect()).collect(),
        }
    }
    fn cands(&self) -> Vec<Candidate<'_>> {
        (0..self.emb.len())
            .map(|i| Candidate {
                embedding: &self.emb[i],
                case_id: &self.case[i],
                classes: &self.classes[i],
            })
            .collect()
    }
}

fn q<'a>(e: &'a [f32], case: Option<&'a str>, class: u32) -> Query<'a> {
    Query {
        embedding: e,
        case_id: case,
        class,
    }
}

#[test]
fn top_k_is_ordered_least_to_most_similar_with_ties_by_index() {
    // Query along x. Cosines: 0 → 1.0 (scaled: normalisation must not care), 1 → 0,
    // 2 → 0.707, 3 → 0.707 (tie with 2), 4 → -1, 5 → 0.894.
    let p = Pool::new(&[
        (&[5.0, 0.0], "a", &[1]),
        (&[0.0, 1.0], "b", &[1]),
        (&[1.0, 1.0], "c", &[1]),
        (&[2.0, 2.0], "d", &[1]),
        (&[-1.0, 0.0], "e", &[1]),
        (&[2.0, 1.0], "f", &[1]),
    ]);
    let e = [1.0f32, 0.0];
    let got = select_supports(&p.cands(), &q(&e, None, 1), 3, Selection::TopK).unwrap();
    assert_eq!(got, vec![2, 5, 0], "least → most similar; most similar last");
    // K = 4 takes both tied supports; the lower index ranks higher, so it sits later.
    let got = select_supports(&p.cands(), &q(&e, None, 1), 4, Selection::TopK).unwrap();
    assert_eq!(got, vec![3, 2, 5, 0]);
    // Tie at the cut: index 2 wins over 3.
    let p2 = Pool::new(&[
        (&[1.0, 1.0], "a", &[1]),
        (&[1.0, 1.0], "b", &[1]),
        (&[1.0, 0.0], "c", &[1]),
    ]);
    let got = select_supports(&p2.cands(), &q(&e, None, 1), 2, Selection::TopK).unwrap();
    assert_eq!(got, vec![0, 2]);
    // Deterministic: the same call gives the same answer.
    for _ in 0..3 {
        assert_eq!(
            select_supports(&p.cands(), &q(&e, None, 1), 4, Selection::TopK).unwrap(),
            vec![3, 2, 5, 0]
        );
    }
}

#[test]
fn class_aware_and_leave_one_out() {
    let p = Pool::new(&[
        (&[1.0, 0.0], "pat1", &[1, 2]),
        (&[0.9, 0.1], "pat2", &[2]),
        (&[0.5, 0.5], "pat3", &[1]),
        (&[0.0, 1.0], "pat1", &[1]),
        (&[0.2, 0.8], "pat4", &[1, 2]),
    ]);
    let e = [1.0f32, 0.0];
    // Class 2: only items 0, 1, 4 qualify.
    let got = select_supports(&p.cands(), &q(&e, None, 2), 3, Selection::TopK).unwrap();
    assert_eq!(got, vec![4, 1, 0]);
    // The query is from pat1: items 0 and 3 never appear, whatever their similarity.
    let got = select_supports(&p.cands(), &q(&e, Some("pat1"), 1), 3, Selection::TopK).unwrap();
    assert_eq!(got, vec![4, 2]);
    for m in [Selection::FirstK, Selection::RandomK { seed: 3 }] {
        let got = select_supports(&p.cands(), &q(&e, Some("pat1"), 1), 5, m).unwrap();
        assert!(
            !got.contains(&0) && !got.contains(&3) && !got.contains(&1),
            "{m:?}: {got:?}"
        );
    }
}

#[test]
fn first_k_and_seeded_random_k() {
    let emb: Vec<[f32; 2]> = (0..12)
        .map(|i| [(i as f32 * 0.5).cos(), (i as f32 * 0.5).sin()])
        .collect();
    let items: Vec<(&[f32], &str, &[u32])> = emb.iter().map(|e| (&e[..], "x", &[1u32][..])).collect();
    let p = Pool::new(&items);
    let e = [1.0f32, 0.0];
    // First-k takes indices 0..4, then orders them least → most similar.
    let got = select_supports(&p.cands(), &q(&e, None, 1), 4, Selection::FirstK).unwrap();
    let mut set = got.clone();
    set.sort_unstable();
    assert_eq!(set, vec![0, 1, 2, 3]);
    assert_eq!(got, vec![3, 2, 1, 0]);
    // Random-k: reproducible per seed, different across seeds, always k distinct items.
    let r1 = select_supports(&p.cands(), &q(&e, None, 1), 4, Selection::RandomK { seed: 1 }).unwrap();
    assert_eq!(
        r1,
        select_supports(&p.cands(), &q(&e, None, 1), 4, Selection::RandomK { seed: 1 }).unwrap()
    );
    let sets: BTreeSet<Vec<usize>> = (0..6)
        .map(|seed| {
            let mut v = select_supports(&p.cands(), &q(&e, None, 1), 4, Selection::RandomK { seed }).unwrap();
            let distinct: BTreeSet<usize> = v.iter().copied().collect();
            assert_eq!(distinct.len(), 4);
            v.sort_unstable();
            v
        })
        .collect();
    assert!(sets.len() > 1, "every seed drew the same supports");
    assert_ne!(
        sets.iter().next().unwrap(),
        &vec![0, 1, 2, 3],
        "random-k is not first-k"
    );
    assert_eq!(
        "random-k:7".parse::<Selection>().unwrap(),
        Selection::RandomK { seed: 7 }
    );
    assert_eq!("top-k".parse::<Selection>().unwrap(), Selection::TopK);
    assert!("best".parse::<Selection>().is_err());
}

#[test]
fn errors_and_k_larger_than_the_pool() {
    let e = [1.0f32, 0.0];
    let empty = Pool::new(&[]);
    assert!(matches!(
        select_supports(&empty.cands(), &q(&e, None, 1), 2, Selection::TopK),
        Err(Error::EmptyPool)
    ));
    let p = Pool::new(&[(&[1.0, 0.0], "a", &[1]), (&[0.0, 1.0], "b", &[1, 3])]);
    match select_supports(&p.cands(), &q(&e, None, 2), 2, Selection::TopK) {
        Err(Error::ClassAbsent { class: 2, present }) => assert_eq!(present, vec![1, 3]),
        other => panic!("expected ClassAbsent, got {other:?}"),
    }
    assert!(matches!(
        select_supports(&p.cands(), &q(&e, Some("b"), 3), 2, Selection::TopK),
        Err(Error::NoQualifying { class: 3, .. })
    ));
    assert!(select_supports(&p.cands(), &q(&e, None, 1), 0, Selection::TopK).is_err());
    // K = 5 with 2 qualifying: all of them, ordered.
    assert_eq!(
        select_supports(&p.cands(), &q(&e, None, 1), 5, Selection::TopK).unwrap(),
        vec![1, 0]
    );
    // A mismatched embedding size is an error, not a panic.
    let short = [1.0f32];
    assert!(select_supports(&p.cands(), &q(&short, None, 1), 1, Selection::TopK).is_err());
}
