//! `cargo xtask bench <what>`: end-to-end benchmarks, reported beside the official PyTorch
//! code where it applies. Kernel-level benchmarks are criterion benches in their crates.

use clap::Subcommand;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// SAM2 image encoder + mask decoder latency (Rust vs official PyTorch).
    Sam2(crate::bench_sam2::Args),
    /// Volume propagation: ms per slice and peak memory (Rust vs official PyTorch).
    Propagate(crate::bench_propagate::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Sam2(a) => crate::bench_sam2::run(a),
        What::Propagate(a) => crate::bench_propagate::run(a),
    }
}
