//! `cargo xtask data`: dataset tools.
//!
//! * `data verify --dataset KIND [--root DIR]`: open every case and report mismatched
//!   geometry, unexpected label values, empty masks, unreadable files and missing pairs; exits
//!   1 when the dataset is unusable. `--root` defaults to `datasets/demo` for `demo`.
//!   `--allow-unlabelled` accepts the unlabelled images of releases that ship some (ACDC
//!   `testing/`, REFUGE's test images).
//! * `data split --dataset KIND [--root DIR] [--seed N]`: print the patient-level split.

use std::path::{Path, PathBuf};

use anyhow::Context;
use sgp_data::{DatasetKind, SplitConfig};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Check a dataset's integrity (like nnU-Net's --verify_dataset_integrity).
    Verify(Common),
    /// Print the deterministic patient-level split (support pool, train, val, test).
    Split {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Patients in the support pool.
        #[arg(long, default_value_t = 1)]
        support: usize,
        #[arg(long, default_value_t = 0.2)]
        val: f64,
        #[arg(long, default_value_t = 0.2)]
        test: f64,
    },
}

#[derive(clap::Args)]
struct Common {
    /// acdc, camus, busi, refuge, wbc, nnunet, biomedparse, folder or demo.
    #[arg(long, default_value = "demo")]
    dataset: String,
    /// The folder the download unpacks to, or a folder inside it (default for demo:
    /// datasets/demo).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Accept images without their label file as unlabelled cases, where the layout's
    /// official release has such images (ACDC testing/, REFUGE test images); refused for
    /// layouts whose release labels every image.
    #[arg(long)]
    allow_unlabelled: bool,
}

impl Common {
    fn resolve(&self) -> anyhow::Result<(DatasetKind, PathBuf)> {
        let kind: DatasetKind = self.dataset.parse()?;
        let root = match (&self.root, kind) {
            (Some(r), _) => r.clone(),
            (None, DatasetKind::Demo) => demo_root(),
            (None, _) => anyhow::bail!("--root is required for --dataset {kind}"),
        };
        Ok((kind, root))
    }

    fn load(&self) -> anyhow::Result<sgp_data::Dataset> {
        let (kind, root) = self.resolve()?;
        let options = sgp_data::ScanOptions {
            allow_unlabelled: self.allow_unlabelled,
        };
        sgp_data::load_with(kind, &root, &options).with_context(|| format!("loading {kind} from {}", root.display()))
    }
}

/// `datasets/demo` relative to the working directory, else to the workspace root.
fn demo_root() -> PathBuf {
    let local = PathBuf::from(sgp_data::layouts::demo::DEFAULT_ROOT);
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(sgp_data::layouts::demo::DEFAULT_ROOT)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Verify(common) => verify(&common),
        Cmd::Split {
            common,
            seed,
            support,
            val,
            test,
        } => {
            let ds = common.load()?;
            let cfg = SplitConfig {
                seed,
                support_patients: support,
                val_fraction: val,
                test_fraction: test,
            };
            let splits = sgp_data::split_by_patient(&ds.cases, &cfg)?;
            for (name, ids) in splits.sides() {
                println!("{name} ({}): {}", ids.len(), ids.join(" "));
            }
            Ok(())
        }
    }
}

fn verify(common: &Common) -> anyhow::Result<()> {
    let ds = common.load()?;
    let bar = indicatif::ProgressBar::new(ds.cases.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("verify {bar:30} {pos}/{len} cases {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = sgp_data::verify(&ds, &|_| bar.inc(1));
    bar.finish_and_clear();
    println!("{report}");
    if !report.is_usable() {
        anyhow::bail!(
            "dataset {} at {} is unusable ({} error(s))",
            ds.kind,
            ds.root.display(),
            report.errors()
        );
    }
    Ok(())
}
