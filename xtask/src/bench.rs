//! `cargo xtask bench <what>`: end-to-end benchmarks, reported beside the official PyTorch
//! code where it applies. Kernel-level benchmarks are criterion benches in their crates.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// Support-set propagation (SGP 3DM) per slice beside SAM2's propagation and the
    /// official PyTorch `support_track` loop; the support cache's speedup.
    Support(crate::bench_support::Args),
    /// PMA + hierarchical decoder forward and forward+backward beside SAM2's decoder.
    Head(crate::bench_head::Args),
    /// f32 matmul throughput at Hiera's linear shapes (candle vs torch), GFLOP/s.
    Matmul(crate::bench_matmul::Args),
    /// One training step (forward + backward + AdamW) beside the official PyTorch SAM2
    /// doing the same step: ms, images/s, peak memory.
    Train(crate::bench_train::Args),
}

impl Args {
    /// The benchmark's `--threads`, which must be in place before rayon's pool starts.
    pub fn threads(&self) -> Option<usize> {
        match &self.what {
            What::Sam2(a) => a.threads,
            What::Propagate(a) => a.threads,
            What::Support(a) => a.threads,
            What::Head(a) => a.threads,
            What::Matmul(a) => a.threads,
            What::Train(a) => a.threads,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Sam2(a) => crate::bench_sam2::run(a),
        What::Propagate(a) => crate::bench_propagate::run(a),
        What::Support(a) => crate::bench_support::run(a),
        What::Head(a) => crate::bench_head::run(a),
        What::Matmul(a) => crate::bench_matmul::run(a),
        What::Train(a) => crate::bench_train::run(a),
    }
}

/// The PyTorch side of a benchmark, under `tools/bench/`.
pub fn pytorch_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench").join(name)
}

/// The arguments that pick the official model in the PyTorch bench scripts (its random
/// weights follow from them and the scripts' fixed seed).
pub fn pytorch_model_args(config: &str, size: usize, threads: usize) -> Vec<String> {
    [
        "--config",
        config,
        "--size",
        &size.to_string(),
        "--threads",
        &threads.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Has `script` (a PyTorch bench under `tools/bench`, run with `args`) write the official
/// model's weights to `path` in a process of its own, which flushes them to disk before it
/// exits. The timed PyTorch run is a later process: timing beside a 150 MB write-back
/// once made PyTorch's 512-px encode 640 ms instead of 380, a ratio flattering us.
pub fn write_pytorch_weights(python: &str, script: &str, args: &[String], path: &Path) -> anyhow::Result<()> {
    let out = Command::new(python)
        .arg(pytorch_script(script))
        .args(args)
        .arg("--write-weights")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "writing the PyTorch weights failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    anyhow::ensure!(path.is_file(), "{script} wrote no weights to {}", path.display());
    Ok(())
}

/// The thread count of a benchmark (`--threads`, else the machine's cores), set for candle's
/// pool through `RAYON_NUM_THREADS` (read when the pool starts; children inherit it).
pub fn set_threads(threads: Option<usize>) -> usize {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// Whether the PyTorch side can run; says why not on stderr.
pub fn pytorch_available(python: &str) -> bool {
    match python_has_sam2(python) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("PyTorch side skipped: {e}");
            false
        }
    }
}

/// Whether `python` can run the official code; the reason when it cannot.
pub fn python_has_sam2(python: &str) -> Result<(), String> {
    match Command::new(python)
        .args(["-c", "import sam2, torch, safetensors"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{python} cannot import sam2/torch/safetensors: {}",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        )),
        Err(e) => Err(format!("cannot run {python}: {e}")),
    }
}
