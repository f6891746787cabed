//! Device runtimes: what each one finds on this host, and why not.
//!
//! [`HostReport::probe`] asks every runtime compiled in; a runtime that is not
//! compiled in, or whose libraries or devices are absent, reports the reason
//! instead of devices. Nothing here panics on a host without GPU libraries.

pub mod cpu;
pub mod cuda;
pub mod wgpu;

use serde::Serialize;
use tensorferry_device_map::{Device, Inventory};

/// Devices one runtime found, or the reason it found none.
#[derive(Debug, Clone, Serialize)]
pub struct Probe<T> {
    /// The devices, by index.
    pub devices: Vec<T>,
    /// Why the runtime has no devices, when it has none.
    pub unavailable: Option<String>,
}

impl<T> Probe<T> {
    /// A runtime that cannot be used, with the reason.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self {
            devices: Vec::new(),
            unavailable: Some(reason.into()),
        }
    }

    /// A runtime that found `devices` (a reason is given when the list is empty).
    pub fn found(devices: Vec<T>, if_none: &str) -> Self {
        let unavailable = devices.is_empty().then(|| if_none.to_string());
        Self {
            devices,
            unavailable,
        }
    }
}

/// What this host has: the CPU, CUDA devices and wgpu adapters.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// The host processor and memory.
    pub cpu: cpu::CpuInfo,
    /// CUDA devices, or why there are none.
    pub cuda: Probe<cuda::CudaDeviceInfo>,
    /// wgpu adapters, or why there are none.
    pub wgpu: Probe<wgpu::AdapterInfo>,
}

impl HostReport {
    /// Probes every runtime compiled into this build.
    pub fn probe() -> Self {
        Self {
            cpu: cpu::CpuInfo::probe(),
            cuda: cuda::probe(),
            wgpu: wgpu::probe(),
        }
    }

    /// The devices found, as the inventory device maps resolve against.
    pub fn inventory(&self) -> Inventory {
        Inventory::new(
            self.cuda
                .devices
                .iter()
                .map(|d| Device::cuda(d.index))
                .chain(self.wgpu.devices.iter().map(|a| Device::wgpu(a.index))),
        )
    }
}

/// True when the environment variable `name` is set to `1`: a test that needs
/// that runtime must then fail rather than skip.
pub fn required(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runtime_answers_with_devices_or_a_reason() {
        let host = HostReport::probe();
        assert!(host.cpu.cores >= 1);
        assert!(!host.cuda.devices.is_empty() || host.cuda.unavailable.is_some());
        assert!(!host.wgpu.devices.is_empty() || host.wgpu.unavailable.is_some());
        let inventory = host.inventory();
        for a in &host.wgpu.devices {
            assert!(inventory.contains(Device::wgpu(a.index)));
        }
        for d in &host.cuda.devices {
            assert!(inventory.contains(Device::cuda(d.index)));
        }
    }

    #[test]
    fn required_runtimes_are_found() {
        let host = HostReport::probe();
        if required("TENSORFERRY_REQUIRE_WGPU") {
            assert!(
                !host.wgpu.devices.is_empty(),
                "TENSORFERRY_REQUIRE_WGPU=1 but no wgpu adapter: {:?}",
                host.wgpu.unavailable
            );
        } else if host.wgpu.devices.is_empty() {
            println!("SKIP: wgpu: {:?}", host.wgpu.unavailable);
        }
        if required("TENSORFERRY_REQUIRE_CUDA") {
            assert!(
                !host.cuda.devices.is_empty(),
                "TENSORFERRY_REQUIRE_CUDA=1 but no CUDA device: {:?}",
                host.cuda.unavailable
            );
        } else if host.cuda.devices.is_empty() {
            println!("SKIP: cuda: {:?}", host.cuda.unavailable);
        }
    }
}
