//! The wgpu runtime: adapters on Vulkan, Metal, DX12 or GL.
//!
//! The instance is built from the environment, so `WGPU_BACKEND=gl` (or
//! `vulkan`, …) selects the backends; `wgpu:N` is the N-th adapter listed.
//!
//! [`WgpuRuntime::new`] opens adapter N as a logical device (one per adapter
//! per process, shared by every runtime on it, with the adapter's full
//! limits). Buffers are uploaded and downloaded through mapped staging
//! buffers; the WGSL kernels are built into compute pipelines on first use and
//! cached. WGSL has no 64-bit integers and no f16 without an extension, so the
//! kernels treat every value as `u32` bits (f64 as pairs of words) and compute
//! exactly what the CPU does, f64 casts included. Its operations are those of
//! [`Backend`](super::Backend).
//!
//! wgpu copies whole 4-byte words: buffers are padded to a multiple of 4
//! bytes, and [`Backend::write`](super::Backend::write) takes offsets and
//! lengths that are multiples of 4 (or that reach the buffer's end);
//! [`Backend::download_range`](super::Backend::download_range) takes any range.
//!
//! With the `wgpu` feature off, [`WgpuRuntime`] and [`WgpuBuffer`] are
//! [`Unavailable`](super::Unavailable): no value exists, and
//! [`WgpuRuntime::new`] returns [`Error::Unavailable`](crate::Error::Unavailable)
//! saying how to build with it.
//!
//! # Examples
//!
//! ```
//! use tensorferry_kernels::runtime::wgpu::WgpuRuntime;
//! use tensorferry_kernels::runtime::Backend;
//!
//! match WgpuRuntime::new(0) {
//!     Ok(rt) => {
//!         let buf = rt.upload(&[1, 2, 3, 4, 5])?;
//!         let mut back = [0u8; 3];
//!         rt.download_range(&buf, 1, &mut back)?;
//!         assert_eq!(back, [2, 3, 4]);
//!     }
//!     Err(why) => println!("no wgpu adapter here: {why}"),
//! }
//! # Ok::<(), tensorferry_kernels::Error>(())
//! ```

use serde::Serialize;

use super::Probe;

#[cfg(feature = "wgpu")]
mod device;
#[cfg(feature = "wgpu")]
pub use device::{WgpuBuffer, WgpuRuntime};

#[cfg(not(feature = "wgpu"))]
super::backend::stand_in!("wgpu", WgpuFeature, WgpuRuntime, WgpuBuffer);

/// The WGSL of the cast functions (entry points are generated per cast).
pub const CAST_WGSL: &str = include_str!("cast.wgsl");
/// The WGSL of the checksum kernel.
pub const CHECKSUM_WGSL: &str = include_str!("checksum.wgsl");
/// The WGSL shared by the pack and unpack kernels.
pub const PACK_WGSL: &str = include_str!("pack.wgsl");

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

#[cfg(feature = "wgpu")]
impl AdapterInfo {
    fn new(index: u32, info: ::wgpu::AdapterInfo) -> Self {
        AdapterInfo {
            index,
            name: info.name,
            backend: info.backend.to_string(),
            device_type: format!("{:?}", info.device_type),
            driver: [info.driver, info.driver_info]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
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
        .map(|(i, a)| AdapterInfo::new(u32::try_from(i).unwrap_or(u32::MAX), a.get_info()))
        .collect();
    Probe::found(
        devices,
        "no adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers, or try WGPU_BACKEND=gl)",
    )
}
