//! The CUDA runtime, through cudarc with the driver loaded at run time.
//!
//! [`probe`] never creates a context: it asks the driver for device count,
//! names and memory, which need `cuInit` alone. A host without libcuda, or a
//! build without the `cuda` feature, reports why instead of devices.
//!
//! [`CudaRuntime::new`] opens one device: its context (one per device per
//! process, shared by every runtime on it), a stream of its own, the kernels
//! (compiled once per process by NVRTC, loaded once per context) and two pools
//! of pinned host chunks for copies to and from the host (see [`super::pinned`]): sized
//! by `TENSORFERRY_PINNED_CHUNK_BYTES` and `TENSORFERRY_PINNED_CHUNKS` when
//! the device is first opened (default 16 × 1 MiB per direction), or by
//! `CudaRuntime::set_pinned`. Every operation binds that
//! device's context to the calling thread first, so nothing runs on — or
//! creates a context on — a device it was not asked for; a buffer from another
//! device is an [`Error::WrongDevice`](crate::Error::WrongDevice) unless the operation is a copy.
//! Its operations are those of [`Backend`](super::Backend); `fork`,
//! `record_event`, `wait_event` and the pinned pool settings are its own.
//!
//! With the `cuda` feature off, [`CudaRuntime`] and [`CudaBuffer`] are
//! [`Unavailable`](super::Unavailable): no value exists, and
//! [`CudaRuntime::new`] returns [`Error::Unavailable`](crate::Error::Unavailable)
//! saying how to build with it.
//!
//! # Examples
//!
//! ```
//! use tensorferry_kernels::runtime::cuda::CudaRuntime;
//! use tensorferry_kernels::runtime::Backend;
//!
//! match CudaRuntime::new(0) {
//!     Ok(rt) => {
//!         let buf = rt.upload(&[1, 2, 3])?;
//!         let mut back = [0u8; 3];
//!         rt.download_range(&buf, 0, &mut back)?;
//!         assert_eq!(back, [1, 2, 3]);
//!     }
//!     Err(why) => println!("no CUDA here: {why}"),
//! }
//! # Ok::<(), tensorferry_kernels::Error>(())
//! ```

use serde::Serialize;

use super::Probe;

#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda")]
pub use driver::{CudaBuffer, CudaEvent, CudaRuntime};

#[cfg(not(feature = "cuda"))]
super::backend::stand_in!("cuda", CudaFeature, CudaRuntime, CudaBuffer);

/// The CUDA C source of the kernels, compiled at run time by NVRTC.
pub const KERNELS_SOURCE: &str = include_str!("kernels.cu");

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
