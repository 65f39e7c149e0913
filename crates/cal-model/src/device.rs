//! Device and dtype as parameters: what `--device` and `--dtype` name, parsed once and
//! turned into candle's types where a model is loaded. Nothing below the command line
//! assumes the CPU.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// `cpu` or `cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {other:?} (cpu, cuda or cuda:N)")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// The candle device; a clear error when this build or machine lacks it.
    pub fn device(&self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => cuda_device(*n),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(n: usize) -> Result<Device> {
    Device::new_cuda(n).map_err(|e| {
        anyhow::anyhow!(
            "device cuda:{n} is not available ({}); `nvidia-smi` should list an NVIDIA GPU \
             and driver on this machine, or use --device cpu",
            e.to_string().trim()
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(n: usize) -> Result<Device> {
    bail!(
        "device cuda:{n}: this build of cal-grpo has no CUDA support; build one with \
         `bash scripts/build-cuda.sh` (`--features cuda`, toolkit from PyPI), or use --device cpu"
    )
}

/// Weights and activations: `f32`, `bf16` or `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum DTypeSpec {
    #[default]
    F32,
    Bf16,
    F16,
}

impl DTypeSpec {
    pub fn dtype(&self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }
}

/// Device and dtype of a model, checked together: the CPU kernels of the training path
/// (row-wise norms, vocabulary log-probs, decoding products) are written for f32, so
/// half precision is for CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Placement {
    pub device: DeviceSpec,
    pub dtype: DTypeSpec,
}

impl Placement {
    pub fn resolve(&self) -> Result<(Device, DType)> {
        if self.device == DeviceSpec::Cpu && self.dtype != DTypeSpec::F32 {
            bail!(
                "--dtype {} is not supported on --device cpu (the CPU kernels are f32); \
                 use --dtype f32, or a CUDA device",
                self.dtype.name()
            );
        }
        Ok((self.device.device()?, self.dtype.dtype()))
    }
}

/// `cuda:0` for the GPU test groups. A build with the `cuda` feature exists to run
/// them, so there a missing device fails the test, unless `CAL_GRPO_SKIP_CUDA=1` asks
/// to skip (`SKIPPED` is printed); a build without the feature returns `None` (its GPU
/// tests are listed as ignored, and run as no-ops with `--include-ignored`).
pub fn cuda_for_tests() -> Option<Device> {
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(d) => return Some(d),
        Err(e) if std::env::var("CAL_GRPO_SKIP_CUDA").is_ok_and(|v| v == "1") => {
            eprintln!("SKIPPED (CAL_GRPO_SKIP_CUDA=1): no CUDA device ({e})")
        }
        Err(e) => panic!(
            "this is a CUDA build but cuda:0 is not available ({e}); run the GPU tests on a \
             GPU machine, or set CAL_GRPO_SKIP_CUDA=1 to skip them"
        ),
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("SKIPPED: built without --features cuda");
    None
}

thread_local! {
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this CPU build's own kernels (row-wise norms and softmax, vocabulary
/// log-probs, decoding products and attention, OpenBLAS) may serve a tensor on `device`.
/// Every other device, CUDA included, takes the differentiable compositions of candle
/// primitives in [`crate::ops`].
pub fn cpu_kernels(device: &Device) -> bool {
    device.is_cpu() && !PORTABLE.with(|p| p.get())
}

/// Runs `f` with this thread's CPU kernels switched off: the CPU then takes exactly the
/// ops a CUDA device takes, which is how the CPU test suite checks the device-generic
/// path (the decision is made where an op is built, on the calling thread).
pub fn portable<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            PORTABLE.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PORTABLE.with(|p| p.replace(true)));
    f()
}

/// The dtype losses, log-probs and optimizer state are computed in: f32 for half
/// precision models (the vocabulary log-softmax in bf16 loses the small probabilities
/// the ratio and KL terms are made of), the model's own dtype otherwise (f64 in the
/// finite-difference tests).
pub fn loss_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_round_trip() {
        for s in ["cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_cuda_is_a_clear_error() {
        let err = DeviceSpec::Cuda(1).device().unwrap_err().to_string();
        assert!(
            err.contains("cuda:1") && err.contains("--features cuda"),
            "{err}"
        );
        let p = Placement {
            device: DeviceSpec::Cpu,
            dtype: DTypeSpec::Bf16,
        };
        assert!(p.resolve().unwrap_err().to_string().contains("bf16"));
    }
}
