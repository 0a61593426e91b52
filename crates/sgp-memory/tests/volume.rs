//! 3D propagation from supports: with SAM2's bank and the identity refine it is the
//! official composition (`support_track`: supports at frames 0..K, slices at K+t through
//! `track_step`); the bank stays flat over a 100-slice volume; both-ways starts at the
//! most confident slice and averages where passes overlap; the refine step feeds memory.

mod common;

use candle_core::Tensor;
use common::*;
use sgp_memory::support::image_features;
use sgp_memory::volume::SupportTracker;
use sgp_memory::{
    encode_support, identity_refine, BankKind, ClassSupports, PmgOutput, PropagationOptions, SliceContext,
    SupportMemory, SupportPropagator,
};
use sgp_sam2::{Direction, FramePrompt, MemoryBank, Sam2Model, TrackRequest};

fn supports(model: &Sam2Model, k: usize, two_classes: bool) -> Vec<sgp_memory::EncodedSupport> {
    let s = model.config().image_size;
    (0..k)
        .map(|i| encode_support(model, &item(i as u64, s, "sup", two_classes)).unwrap())
        .collect()
}

fn class_supports(enc: &[sgp_memory::EncodedSupport], classes: &[u32]) -> ClassSupports {
    ClassSupports::new(
        classes
            .iter()
            .map(|&c| (c, enc.iter().map(|e| e.memory(c).unwrap().clone()).collect()))
            .collect(),
    )
    .unwrap()
}

#[test]
fn sam2_bank_with_identity_refine_is_the_official_composition() {
    let model = reduced_model();
    let s = model.config().image_size;
    let (k, t) = (2usize, 9usize);
    let items: Vec<_> = (0..k).map(|i| item(i as u64, s, "sup", false)).collect();
    let frames: Vec<Tensor> = (0..t).map(|i| image(100 + i as u64, s)).collect();
    let n = k + t;

    // Reference: track_step over supports then slices, nothing ever evicted.
    let mut bank = MemoryBank::new();
    for (i, it) in items.iter().enumerate() {
        let f = image_features(&model, &it.image.unsqueeze(0).unwrap()).unwrap();
        let m = it.masks[&1].reshape((1, 1, s, s)).unwrap();
        let out = model
            .track_step(&TrackRequest::initial(i, n), &f, &FramePrompt::mask(m), &bank)
            .unwrap();
        bank.cond_frame_outputs.insert(i, out.frame);
    }
    let mut reference = Vec::new();
    for (j, fr) in frames.iter().enumerate() {
        let f = image_features(&model, &fr.unsqueeze(0).unwrap()).unwrap();
        let out = model
            .track_step(&TrackRequest::tracked(k + j, n), &f, &FramePrompt::default(), &bank)
            .unwrap();
        bank.non_cond_frame_outputs.insert(k + j, out.frame.clone());
        reference.push(out.frame);
    }

    let enc: Vec<_> = items.iter().map(|it| encode_support(&model, it).unwrap()).collect();
    let sup: Vec<Vec<&SupportMemory>> = vec![enc.iter().map(|e| e.memory(1).unwrap()).collect()];
    let mut tracker = SupportTracker::new(&model, &sup, BankKind::Sam2.policy(k).unwrap(), t).unwrap();
    let mut refine = identity_refine;
    for (j, fr) in frames.iter().enumerate() {
        let f = image_features(&model, &fr.unsqueeze(0).unwrap()).unwrap();
        let ctx = SliceContext {
            index: j,
            pass: 0,
            reverse: false,
            step: j,
        };
        let out = tracker.step(&f, ctx, &mut refine).unwrap();
        let r = &reference[j];
        let pairs = [
            ("pred_masks", &out.frame.pred_masks, &r.pred_masks),
            ("obj_ptr", &out.frame.obj_ptr, &r.obj_ptr),
            ("score", &out.frame.object_score_logits, &r.object_score_logits),
            (
                "maskmem",
                out.frame.maskmem_features.as_ref().unwrap(),
                r.maskmem_features.as_ref().unwrap(),
            ),
        ];
        for (name, a, b) in pairs {
            let e = rel_err(a, b);
            assert!(e < 1e-5, "slice {j} {name}: rel err {e}");
        }
    }
}

fn volume(n: usize, s: usize) -> Vec<Tensor> {
    (0..n)
        .map(|i| image(1000 + (i as u64 % 7) * 13 + i as u64, s))
        .collect()
}

#[test]
fn bank_memory_is_flat_in_the_number_of_slices() {
    let model = reduced_model();
    let s = model.config().image_size;
    let enc = supports(&model, 2, false);
    let cs = class_supports(&enc, &[1]);
    let long = volume(100, s);
    let short = volume(12, s);
    for (bank, size, vol) in [
        (BankKind::Similarity, 2, &long),
        (BankKind::Fifo, 3, &long[..40].to_vec()),
    ] {
        let opts = PropagationOptions {
            bank,
            bank_size: Some(size),
            direction: Direction::Forward,
        };
        let mut p = SupportPropagator::new(&model, opts);
        let preds = p.run_collect(vol, &cs, &mut identity_refine).unwrap();
        assert_eq!(preds.len(), vol.len());
        let long_stats = p.stats();
        // K supports + the bank + the slice just added, before eviction.
        assert_eq!(long_stats.peak_entries, 2 + size + 1, "{bank:?}");
        p.run_collect(&short, &cs, &mut identity_refine).unwrap();
        assert_eq!(p.stats(), long_stats, "{bank:?}: peak grows with the volume");
    }
    // SAM2's bank is bounded by its reach (16 pointers here), not by the volume.
    let opts = PropagationOptions {
        bank: BankKind::Sam2,
        bank_size: None,
        direction: Direction::Forward,
    };
    let mut p = SupportPropagator::new(&model, opts);
    p.run_collect(&long[..50].to_vec(), &cs, &mut identity_refine).unwrap();
    let a = p.stats();
    p.run_collect(&long[..30].to_vec(), &cs, &mut identity_refine).unwrap();
    assert_eq!(p.stats(), a);
    assert!(a.peak_entries <= 2 + model.memory_reach(1000) + 1, "{a:?}");
}

#[test]
fn both_ways_starts_at_the_most_confident_slice_and_emits_each_slice_once() {
    let model = reduced_model();
    let s = model.config().image_size;
    let enc = supports(&model, 2, true);
    let cs = class_supports(&enc, &[1, 2]);
    let vol = volume(7, s);
    let mut p = SupportPropagator::new(&model, PropagationOptions::default());
    let start = p.most_confident_slice(&vol, &cs).unwrap();
    let mut seen = vec![0usize; vol.len()];
    let mut contexts = Vec::new();
    let mut refine = |pmg: &PmgOutput, ctx: &SliceContext| {
        contexts.push(*ctx);
        Ok(pmg.pred_masks_high_res.clone())
    };
    let mut preds = Vec::new();
    p.run(
        &vol,
        &cs,
        &mut refine,
        &mut |pr| {
            seen[pr.index] += 1;
            preds.push(pr);
            Ok(())
        },
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(seen, vec![1; vol.len()], "every slice exactly once");
    // Pass 0 forward from the start, pass 1 backward from it.
    let pass0: Vec<usize> = contexts.iter().filter(|c| c.pass == 0).map(|c| c.index).collect();
    let pass1: Vec<usize> = contexts.iter().filter(|c| c.pass == 1).map(|c| c.index).collect();
    assert_eq!(pass0, (start..vol.len()).collect::<Vec<_>>());
    assert_eq!(pass1, (0..=start).rev().collect::<Vec<_>>());
    for pr in &preds {
        assert_eq!(pr.passes, if pr.index == start { 2 } else { 1 });
        assert_eq!(pr.probabilities.dims(), [2, 1, s, s]);
        assert_eq!(pr.object_scores.len(), 2);
    }
    // Features once per slice and pass, plus the confidence scan.
    assert_eq!(p.encoder_calls(), vol.len() + (vol.len() - start) + (start + 1));

    // The start slice's confidence really is the maximum of the support-only pseudo-masks.
    let per_item = cs.per_item();
    let scores: Vec<f32> = vol
        .iter()
        .map(|v| {
            let f = sgp_memory::support::repeat_features(&image_features(&model, &v.unsqueeze(0).unwrap()).unwrap(), 2)
                .unwrap();
            let o = sgp_memory::Pmg::new(&model)
                .pseudo_mask_per_item(&f, &per_item)
                .unwrap();
            o.object_score_logits
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .collect();
    let best = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(scores[start], best);
    assert!(scores[..start].iter().all(|&x| x < best), "ties go to the lower index");

    // Backward alone covers every slice, from the last.
    let mut p = SupportPropagator::new(
        &model,
        PropagationOptions {
            direction: Direction::Backward,
            ..Default::default()
        },
    );
    assert_eq!(p.run_collect(&vol, &cs, &mut identity_refine).unwrap().len(), vol.len());
}

#[test]
fn the_refine_step_feeds_the_slice_memory() {
    let model = reduced_model();
    let s = model.config().image_size;
    let enc = supports(&model, 2, false);
    let cs = class_supports(&enc, &[1]);
    let vol = volume(3, s);
    let opts = PropagationOptions {
        direction: Direction::Forward,
        ..Default::default()
    };
    let ident = SupportPropagator::new(&model, opts)
        .run_collect(&vol, &cs, &mut identity_refine)
        .unwrap();
    let mut empty = |pmg: &PmgOutput, _: &SliceContext| Ok((pmg.pred_masks_high_res.zeros_like()? - 10.0)?);
    let refined = SupportPropagator::new(&model, opts)
        .run_collect(&vol, &cs, &mut empty)
        .unwrap();
    // Slice 0's PMG saw no slice memory: same object score; its output is the refine's.
    assert_eq!(ident[0].object_scores, refined[0].object_scores);
    let p0: f32 = refined[0].probabilities.max_all().unwrap().to_scalar().unwrap();
    assert!(p0 < 1e-4);
    // Slice 1 attends to slice 0's memory, which the refine changed.
    assert_ne!(ident[1].object_scores, refined[1].object_scores);

    // A refine step of the wrong shape is an error.
    let mut bad = |pmg: &PmgOutput, _: &SliceContext| Ok(pmg.pred_masks.clone());
    assert!(SupportPropagator::new(&model, opts)
        .run_collect(&vol, &cs, &mut bad)
        .is_err());
    // So is an empty volume, or slices of the wrong size.
    let none: Vec<Tensor> = Vec::new();
    assert!(SupportPropagator::new(&model, opts)
        .run_collect(&none, &cs, &mut identity_refine)
        .is_err());
    let wrong = vec![image(1, s / 2)];
    assert!(SupportPropagator::new(&model, opts)
        .run_collect(&wrong, &cs, &mut identity_refine)
        .is_err());
}
