//! One loader per dataset layout, each reading the folder exactly as distributed.
//!
//! Every loader accepts the folder the download unpacks to or a documented folder inside it,
//! and returns a [`crate::Dataset`] with cases sorted by id. Missing pairs and unparsable
//! metadata are recorded as [`crate::dataset::Issue`]s rather than aborting the scan, so
//! `data verify` can report all of them at once.

pub mod acdc;
pub mod biomedparse;
pub mod busi;
pub mod camus;
pub mod demo;
pub mod folder;
pub mod nnunet;
pub mod refuge;
pub mod wbc;

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Entries of a folder, sorted by name (file system order is not deterministic).
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

/// Sub-folders of `dir`, sorted.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(list_dir(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

/// Files of `dir` (not recursive), sorted.
pub(crate) fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(list_dir(dir)?.into_iter().filter(|p| p.is_file()).collect())
}

/// The file name as a string ("" when there is none).
pub(crate) fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// All files under `dir`, recursively (depth-limited, hidden entries skipped), sorted.
pub(crate) fn walk(dir: &Path, max_depth: usize) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        for p in list_dir(&d)? {
            if name_of(&p).starts_with('.') {
                continue;
            }
            if p.is_dir() {
                if depth < max_depth {
                    stack.push((p, depth + 1));
                }
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The first of `candidates` (relative to `root`, "" for root itself) that satisfies `accept`.
pub(crate) fn find_root(root: &Path, candidates: &[&str], accept: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    candidates
        .iter()
        .map(|c| if c.is_empty() { root.to_path_buf() } else { root.join(c) })
        .find(|p| p.is_dir() && accept(p))
}
