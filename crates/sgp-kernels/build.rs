//! Compiles `kernels/masked_attention.cu` to PTX with nvcc, only under feature `cuda`
//! (without it this does nothing, so CI needs no CUDA toolkit).
//!
//! Target: `CUDA_COMPUTE_CAP` (e.g. `90`), else `nvidia-smi --query-gpu=compute_cap`, else
//! 80. PTX for an older virtual arch is JIT-compiled by the driver on newer GPUs. `NVCC`
//! overrides the compiler path.

use std::path::PathBuf;
use std::process::Command;

fn compute_cap() -> String {
    if let Ok(cap) = std::env::var("CUDA_COMPUTE_CAP") {
        return cap.replace('.', "");
    }
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output();
    if let Ok(out) = smi {
        if out.status.success() {
            if let Some(line) = String::from_utf8_lossy(&out.stdout).lines().next() {
                let cap = line.trim().replace('.', "");
                if !cap.is_empty() {
                    return cap;
                }
            }
        }
    }
    "80".to_string()
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels/masked_attention.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out_dir.join("masked_attention.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = compute_cap();
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "--std=c++17", "-lineinfo"])
        .arg(format!("--gpu-architecture=compute_{cap}"))
        .arg("kernels/masked_attention.cu")
        .arg("-o")
        .arg(&ptx)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed ({s}) compiling kernels/masked_attention.cu"),
        Err(e) => panic!("feature `cuda` needs nvcc on PATH (or NVCC=...): {e}"),
    }
}
