//! The wgpu runtime: adapters on Vulkan, Metal, DX12 or GL.
//!
//! The instance is built from the environment, so `WGPU_BACKEND=gl` (or
//! `vulkan`, …) selects the backends; `wgpu:N` is the N-th adapter listed.

use serde::Serialize;

use super::Probe;

/// A wgpu adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    /// Index (`wgpu:N`).
    pub index: u32,
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Backend: `vulkan`, `gl`, `metal`, `dx12`.
    pub backend: String,
    /// Kind: `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu`, `Other`.
    pub device_type: String,
    /// Driver name and version, when reported.
    pub driver: String,
}

/// Why wgpu is unavailable in a build without the feature.
pub const NOT_BUILT: &str = "built without the `wgpu` feature; rebuild with `--features wgpu`";

/// Lists the wgpu adapters, or says why there are none.
#[cfg(not(feature = "wgpu"))]
pub fn probe() -> Probe<AdapterInfo> {
    Probe::unavailable(NOT_BUILT)
}

/// Lists the wgpu adapters, or says why there are none.
#[cfg(feature = "wgpu")]
pub fn probe() -> Probe<AdapterInfo> {
    let desc = ::wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let backends = desc.backends;
    let instance = ::wgpu::Instance::new(desc);
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    let devices = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let info = a.get_info();
            AdapterInfo {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                name: info.name,
                backend: info.backend.to_string(),
                device_type: format!("{:?}", info.device_type),
                driver: [info.driver, info.driver_info]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" "),
            }
        })
        .collect();
    Probe::found(
        devices,
        "no adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers, or try WGPU_BACKEND=gl)",
    )
}
