//! `cargo xtask <command>`: the project's commands.

use clap::{Parser, Subcommand};

mod bench;
mod bench_head;
mod bench_matmul;
mod bench_propagate;
mod bench_sam2;
mod bench_support;
mod bench_train;
mod data;
mod eval;
mod evaluate;
mod model_source;
mod parity;
mod predict;
mod predict2d;
mod predict3d;
mod train;

#[derive(Parser)]
#[command(name = "xtask", about = "SAM2-SGP project commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run SAM2 parity cases against the official PyTorch outputs.
    Parity(parity::Args),
    /// Prompt-free segmentation of an image or volume from a support set.
    Predict(predict::Args),
    /// Prompted 2D segmentation of one image.
    #[command(name = "predict-2d")]
    Predict2d(predict2d::Args),
    /// Prompted 3D segmentation of a volume by propagation through slices.
    #[command(name = "predict-3d")]
    Predict3d(predict3d::Args),
    /// Dataset tools (`data verify`).
    Data(data::Args),
    /// Evaluate SAM2-SGP on a dataset split (predictions, metrics, Dice table; resumable).
    Eval(evaluate::Args),
    /// Evaluate a folder of predictions against ground truth.
    #[command(name = "eval-folder")]
    EvalFolder(eval::EvalFolderArgs),
    /// Benchmarks.
    Bench(bench::Args),
    /// Train SAM2-SGP (LoRA + new modules, or from scratch) on a dataset.
    Train(train::Args),
}

fn main() -> anyhow::Result<()> {
    // First, before any thread starts: candle's idle elementwise threads park instead of
    // spinning on the cores rayon's matmuls need (see sgp_kernels::runtime).
    sgp_kernels::runtime::park_idle_candle_threads();
    // Freed activations stay in the heap for the next layer instead of costing a page
    // fault per 4 KiB on reuse.
    sgp_kernels::runtime::retain_freed_memory();
    // `SGP_SPAN_TIMES=1` logs each span's busy/idle time when it closes (with e.g.
    // `RUST_LOG=sgp_sam2=debug`): a per-step profile without a profiler.
    let span_events = if std::env::var_os("SGP_SPAN_TIMES").is_some_and(|v| v == "1") {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    tracing_subscriber::fmt()
        .with_span_events(span_events)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Cmd::Bench(b) = &cli.cmd {
        if let Some(n) = b.threads() {
            // Before the pool starts (below): it reads the count once.
            bench::set_threads(Some(n));
        }
    }
    // The command runs on one of rayon's threads, so each parallel op is forked from
    // inside the pool (see sgp_kernels::runtime::on_pool).
    sgp_kernels::runtime::on_pool(move || match cli.cmd {
        Cmd::Parity(a) => parity::run(a),
        Cmd::Predict(a) => predict::run(a),
        Cmd::Predict2d(a) => predict2d::run(a),
        Cmd::Predict3d(a) => predict3d::run(a),
        Cmd::Data(a) => data::run(a),
        Cmd::Eval(a) => evaluate::run(a),
        Cmd::EvalFolder(a) => eval::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Train(a) => train::run(a),
    })
}
