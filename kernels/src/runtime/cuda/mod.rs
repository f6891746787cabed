//! The CUDA runtime, through cudarc with the driver loaded at run time.
//!
//! Probing never creates a context: it asks the driver for device count, names
//! and memory, which need `cuInit` alone. A host without libcuda, or a build
//! without the `cuda` feature, reports why instead of devices.

use serde::Serialize;

use super::Probe;

/// A CUDA device the driver reports.
#[derive(Debug, Clone, Serialize)]
pub struct CudaDeviceInfo {
    /// Ordinal (`cuda:N`).
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Total device memory in bytes.
    pub memory_bytes: u64,
}

/// Why CUDA is unavailable in a build without the feature.
pub const NOT_BUILT: &str = "built without the `cuda` feature; rebuild with `--features cuda`";

/// Lists the CUDA devices, or says why there are none.
#[cfg(not(feature = "cuda"))]
pub fn probe() -> Probe<CudaDeviceInfo> {
    Probe::unavailable(NOT_BUILT)
}

/// Lists the CUDA devices, or says why there are none.
#[cfg(feature = "cuda")]
pub fn probe() -> Probe<CudaDeviceInfo> {
    match probe_driver() {
        Ok(devices) => Probe::found(devices, "the CUDA driver reports no devices"),
        Err(reason) => Probe::unavailable(reason),
    }
}

/// True when the CUDA driver library can be loaded; cudarc panics on first use otherwise.
#[cfg(feature = "cuda")]
pub fn driver_present() -> bool {
    // SAFETY: the probe only tries to open the shared library by its known
    // names and closes it again; it runs no code from it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// True when NVRTC (the run-time compiler for kernels) can be loaded.
#[cfg(feature = "cuda")]
pub fn nvrtc_present() -> bool {
    // SAFETY: as in `driver_present`: opening the library by name, nothing else.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

#[cfg(feature = "cuda")]
fn probe_driver() -> Result<Vec<CudaDeviceInfo>, String> {
    use cudarc::driver::result;

    if !driver_present() {
        return Err("libcuda not found (no NVIDIA driver on this host)".to_string());
    }
    result::init().map_err(|e| format!("cuInit failed: {e}"))?;
    let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
    let mut devices = Vec::new();
    for ordinal in 0..count.max(0) {
        let dev = result::device::get(ordinal)
            .map_err(|e| format!("cuDeviceGet({ordinal}) failed: {e}"))?;
        let name =
            result::device::get_name(dev).unwrap_or_else(|e| format!("(name unavailable: {e})"));
        // SAFETY: `dev` is a device handle the driver just returned for a valid ordinal.
        let memory = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
        devices.push(CudaDeviceInfo {
            index: u32::try_from(ordinal).expect("ordinal is non-negative and below count"),
            name,
            memory_bytes: memory as u64,
        });
    }
    Ok(devices)
}
