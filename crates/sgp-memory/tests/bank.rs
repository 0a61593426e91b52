//! FIFO and similarity eviction evict the right entry on constructed embeddings, through
//! the `MemoryBankPolicy` trait on a real bank; and their selection attends to every
//! support and held slice with SAM2's temporal slots.

mod common;

use candle_core::{Device, Tensor};
use sgp_memory::{BankKind, FifoBank, SimilarityBank};
use sgp_sam2::{FrameOutput, MemoryBank};
use sgp_sam2::{MemoryBankPolicy, PolicyContext};

fn frame(v: f32) -> FrameOutput {
    let t = |shape: &[usize]| Tensor::full(v, shape, &Device::Cpu).unwrap();
    FrameOutput {
        maskmem_features: Some(t(&[1, 8, 4, 4])),
        maskmem_pos_enc: Some(t(&[1, 8, 4, 4])),
        pred_masks: t(&[1, 1, 16, 16]),
        obj_ptr: t(&[1, 32]),
        object_score_logits: t(&[1, 1]),
    }
}

fn emb(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

/// Supports at frames 0, 1; slices at 2.. with the given pooled embeddings, fed to the
/// policy one by one as the propagator does (insert, observe, evict). Returns the slice
/// frames still held after each step.
fn run(policy: &mut dyn MemoryBankPolicy, embeddings: &[[f32; 2]]) -> Vec<Vec<usize>> {
    let model = common::reduced_model();
    let mut bank = MemoryBank::new();
    bank.cond_frame_outputs.insert(0, frame(0.0));
    bank.cond_frame_outputs.insert(1, frame(1.0));
    let n = 2 + embeddings.len();
    let mut held = Vec::new();
    for (i, e) in embeddings.iter().enumerate() {
        let idx = 2 + i;
        let pooled = emb(e);
        let ctx = PolicyContext {
            frame_idx: idx,
            num_frames: n,
            reverse: false,
            pooled: &pooled,
        };
        let sel = policy.select(&model, &ctx, &bank).unwrap();
        // Every support and every held slice is attended to.
        assert_eq!(sel.spatial.len(), 2 + bank.non_cond_frame_outputs.len());
        bank.non_cond_frame_outputs.insert(idx, frame(idx as f32));
        policy.observe(idx, &pooled, 0.0, false);
        policy.evict(&model, &ctx, &mut bank, &[]);
        assert_eq!(bank.cond_frame_outputs.len(), 2, "supports are never evicted");
        held.push(bank.non_cond_frame_outputs.keys().copied().collect());
    }
    held
}

#[test]
fn fifo_evicts_the_oldest() {
    let mut p = FifoBank::new(2).unwrap();
    let held = run(&mut p, &[[1.0, 0.0]; 5]);
    assert_eq!(held, vec![vec![2], vec![2, 3], vec![3, 4], vec![4, 5], vec![5, 6]]);
    assert_eq!(p.victim(&[7, 3, 9]), Some(3));
    assert_eq!(p.victim(&[7, 3]), None);
    assert!(FifoBank::new(0).is_err());
}

#[test]
fn similarity_evicts_the_least_similar_to_the_current_slice_ties_oldest() {
    let mut p = SimilarityBank::new(2).unwrap();
    // Frame 4 (along x) overflows the bank: 2 (along y, cos 0) goes, 3 (cos 1) stays.
    // Frame 5 (along y): 3 and 4 tie at cos 0, the oldest (3) goes. Frame 6 (along x):
    // 4 (cos 1) stays and 5 (cos 0) goes although it is the newest: not FIFO.
    let held = run(&mut p, &[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]);
    assert_eq!(held[2], vec![3, 4]);
    assert_eq!(held[3], vec![4, 5]);
    assert_eq!(held[4], vec![4, 6]);

    // Ties go to the oldest; the current slice is never evicted; unknown embeddings go first.
    let mut p = SimilarityBank::new(2).unwrap();
    p.remember(10, vec![1.0, 1.0]);
    p.remember(11, vec![2.0, 2.0]);
    p.remember(12, vec![0.0, 1.0]);
    assert_eq!(p.victim(&[10, 11, 12], 12, &[1.0, 0.0]), Some(10), "tie 10/11: oldest");
    assert_eq!(p.victim(&[10, 11, 12], 12, &[0.0, 1.0]), Some(10));
    assert_eq!(p.victim(&[11, 12, 13], 13, &[1.0, 0.0]), Some(12));
    assert_eq!(p.victim(&[10, 11, 14], 10, &[1.0, 1.0]), Some(14), "unknown embedding");
    assert_eq!(p.victim(&[10, 11], 11, &[1.0, 0.0]), None, "not full");
}

#[test]
fn bank_kinds_parse_and_build() {
    assert_eq!("fifo".parse::<BankKind>().unwrap(), BankKind::Fifo);
    assert_eq!("Similarity".parse::<BankKind>().unwrap(), BankKind::Similarity);
    assert_eq!("sam2".parse::<BankKind>().unwrap(), BankKind::Sam2);
    assert!("lru".parse::<BankKind>().is_err());
    assert_eq!(BankKind::default(), BankKind::Similarity);
    assert!(BankKind::Fifo.policy(0).is_err());
    assert!(BankKind::Sam2.policy(0).is_ok());
}
