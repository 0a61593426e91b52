//! Size of the trainable head (PMA + hierarchical decoder) at the default configuration on
//! each official SAM2.1 model: "a few million parameters at most".
//!
//! Run with `--nocapture` to see the table.

use sgp_pma::{HeadDims, SgpHead, SgpHeadConfig};
use sgp_sam2::{Sam2Config, SamHeadsConfig};

/// The bound ("a few million parameters at most").
const MAX_PARAMS: usize = 5_000_000;

fn counts(dims: HeadDims) -> (usize, usize) {
    let params = SgpHead::expected_parameters(&SgpHeadConfig::default(), dims).unwrap();
    let count = |prefix: &str| {
        params
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum::<usize>()
    };
    assert!(params
        .iter()
        .all(|(n, _)| n.starts_with("pma.") || n.starts_with("decoder.")));
    (count("pma."), count("decoder."))
}

#[test]
fn default_head_has_a_few_million_parameters_at_most_on_every_sam2_1_model() {
    let mut seen = Vec::new();
    for preset in ["sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l"] {
        let cfg = Sam2Config::preset(preset).unwrap();
        let heads = SamHeadsConfig::from_sam2_config(&cfg);
        let dims = HeadDims {
            hidden_dim: heads.hidden_dim,
            num_mask_tokens: heads.mask_decoder_config().num_multimask_outputs + 1,
            use_high_res_features: heads.use_high_res_features_in_sam,
        };
        let (pma, decoder) = counts(dims);
        let total = pma + decoder;
        println!("{preset}: {dims:?}: PMA {pma}, decoder {decoder}, total {total}");
        assert!(pma > 0 && decoder > 0, "{preset}");
        assert!(total < MAX_PARAMS, "{preset}: {total} parameters (bound {MAX_PARAMS})");
        seen.push((preset, dims, total));
    }
    // The head depends on SAM2 only through C = 256, 4 mask tokens and the high-res levels,
    // which all four SAM2.1 sizes share: one count for all.
    assert!(
        seen.iter().all(|(_, d, t)| *d == seen[0].1 && *t == seen[0].2),
        "{seen:?}"
    );
    assert_eq!(seen[0].1.hidden_dim, 256);
    // Pinned (update with the design doc when the default widths change): PMA =
    // 4·256² (q, k, v, out) + 3·256 biases (no key bias) + 2·256 norm + γ.
    assert_eq!(counts(seen[0].1), (263_425, 153_921));
}
