//! Compute device selection, one function for every command (`--device cpu|cuda[:N]`).
//!
//! The default ([`DeviceSpec::Auto`]) is the first CUDA device when this build has CUDA
//! support (feature `cuda`) and a device is present, else the CPU. Asking for CUDA
//! explicitly in a build without it is an error that says how to get it, never a silent
//! fall-back to the CPU: a user who asked for the GPU should not wait hours for the CPU.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// Which device a command runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 when compiled in and present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        match l.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match l.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(Error::Device(format!(
                    "--device {s:?}: expected cpu, cuda, cuda:N (N = 0, 1, ...) or auto"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this build has CUDA support (the `cuda` feature of `sgp`).
pub const fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

impl DeviceSpec {
    /// The device this spec names; see the module docs for the rules.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if cuda_compiled() && candle_core::utils::cuda_is_available() {
                    match Device::new_cuda(0) {
                        Ok(d) => return Ok(d),
                        Err(e) => {
                            tracing::warn!("CUDA is compiled in but device 0 cannot be opened ({e}); using the CPU")
                        }
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cuda(n) => {
                if !cuda_compiled() {
                    return Err(Error::Device(format!(
                        "--device cuda:{n}: this build has no CUDA support. Rebuild with \
                         `--features cuda` (needs the CUDA toolkit with nvcc), or pass --device cpu"
                    )));
                }
                Device::new_cuda(n)
                    .map_err(|e| Error::Device(format!("--device cuda:{n}: cannot open the device: {e}")))
            }
        }
    }
}

/// Parses and resolves a `--device` value in one step (`None`: [`DeviceSpec::Auto`]).
pub fn select_device(spec: Option<&str>) -> Result<Device> {
    spec.map(DeviceSpec::from_str)
        .transpose()?
        .unwrap_or_default()
        .resolve()
}

/// A short name for logs and reports: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_the_rest() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!(" CUDA ".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "metal"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.to_string().contains("expected cpu, cuda"), "{bad:?}: {e}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!("cuda:2".parse::<DeviceSpec>().unwrap().to_string(), "cuda:2");
    }

    #[test]
    fn cpu_and_auto_resolve_and_cuda_is_refused_clearly_without_the_feature() {
        assert!(select_device(Some("cpu")).unwrap().is_cpu());
        assert_eq!(device_name(&select_device(Some("cpu")).unwrap()), "cpu");
        let auto = select_device(None).unwrap();
        if !cuda_compiled() {
            assert!(auto.is_cpu(), "auto is the CPU in a CPU build");
            let e = select_device(Some("cuda:1")).unwrap_err().to_string();
            assert!(e.contains("no CUDA support") && e.contains("--features cuda"), "{e}");
        }
    }
}
