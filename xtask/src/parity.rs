//! `cargo xtask parity --dir DIR [--save-outputs OUT]`: runs SAM2 parity cases
//! (format: `docs/parity-format.md`); exits non-zero on any failure.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Folder of cases (folders holding case.json), searched recursively.
    #[arg(long)]
    dir: PathBuf,
    /// Write every computed output to `OUT/<case>/outputs.safetensors`.
    #[arg(long = "save-outputs", value_name = "OUT")]
    save_outputs: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let summary = sgp_parity::run_dir(&args.dir, args.save_outputs.as_deref())?;
    if summary.failed > 0 {
        anyhow::bail!(
            "{} of {} parity cases failed",
            summary.failed,
            summary.failed + summary.passed
        );
    }
    Ok(())
}
