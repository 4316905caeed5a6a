//! `--device auto|cpu|cuda`.

use anyhow::{bail, Result};
use tch::Device;

/// Resolves a device flag. `auto` picks the first CUDA device when libtorch sees one.
/// `cuda` on a machine without a usable GPU is an error rather than a silent CPU run.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" | "gpu" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                bail!("--device cuda: libtorch sees no CUDA device (is this a GPU machine, and did `make setup` install the CUDA build?)")
            }
        }
        other => {
            if let Some(n) = other.strip_prefix("cuda:") {
                let n: usize = n.parse().map_err(|_| anyhow::anyhow!("--device {other}: bad device index"))?;
                if n < tch::Cuda::device_count() as usize {
                    return Ok(Device::Cuda(n));
                }
                bail!("--device {other}: only {} CUDA devices", tch::Cuda::device_count());
            }
            bail!("--device {other}: expected auto, cpu, cuda or cuda:N")
        }
    }
}
