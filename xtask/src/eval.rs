//! `cargo xtask eval-folder` (in progress).

#[derive(clap::Args)]
pub struct EvalFolderArgs {}

pub fn run(_args: EvalFolderArgs) -> anyhow::Result<()> {
    anyhow::bail!("`eval-folder` is not available yet")
}
