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
//! [`CudaRuntime::set_pinned`]. Every operation binds that
//! device's context to the calling thread first, so nothing runs on — or
//! creates a context on — a device it was not asked for; a buffer from another
//! device is an [`Error::WrongDevice`](crate::Error::WrongDevice) unless the operation is a copy.
//!
//! With the `cuda` feature off these types still exist; [`CudaRuntime::new`]
//! returns [`Error::Unavailable`](crate::Error::Unavailable) saying how to build with it.

use std::fmt;
use std::io::Read;

use serde::Serialize;
use tensorferry_device_map::Device;

use super::pinned::PinnedConfig;
use super::Probe;
use crate::cpu::Checksum;
use crate::error::Result;
use crate::{DType, Layout};

#[cfg(feature = "cuda")]
#[path = "driver.rs"]
mod imp;
#[cfg(not(feature = "cuda"))]
#[path = "stub.rs"]
mod imp;

/// The CUDA C source of the kernels, compiled at run time by NVRTC.
pub const KERNELS_SOURCE: &str = include_str!("kernels.cu");

/// One CUDA device, with a stream of its own. Cloning shares the stream;
/// [`CudaRuntime::fork`] makes another on the same device.
///
/// Work is queued on the stream in call order and runs asynchronously;
/// methods that hand bytes to the host ([`CudaRuntime::read`],
/// [`CudaRuntime::checksum`]) wait for it.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::runtime::cuda::CudaRuntime;
///
/// match CudaRuntime::new(0) {
///     Ok(rt) => {
///         let buf = rt.upload(&[1, 2, 3])?;
///         let mut back = [0u8; 3];
///         rt.read(&buf, 0, &mut back)?;
///         assert_eq!(back, [1, 2, 3]);
///     }
///     Err(why) => println!("no CUDA here: {why}"),
/// }
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
#[derive(Clone)]
pub struct CudaRuntime {
    inner: imp::Runtime,
}

/// Device memory on one CUDA device.
pub struct CudaBuffer {
    inner: imp::Buffer,
}

/// An upload to one CUDA device fed piece by piece, across calls and
/// threads: the caller writes into [`CudaUpload::space`], the free part of
/// a pinned chunk from the device's host-to-device pool, and each full
/// chunk is copied to the device asynchronously while the next one fills.
/// Made by [`CudaRuntime::begin_upload`]; dropping it unfinished waits for
/// the copies in flight and returns every chunk.
pub struct CudaUpload {
    inner: imp::Feed,
    device: Device,
}

/// A point in a stream's work that other streams and the host can wait for.
pub struct CudaEvent {
    inner: imp::Event,
}

impl CudaRuntime {
    /// Opens `cuda:index`.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`](crate::Error::Unavailable) without the `cuda` feature or without a driver;
    /// [`Error::NoSuchDevice`](crate::Error::NoSuchDevice) for an index the driver does not list;
    /// [`Error::Backend`](crate::Error::Backend) when the driver fails.
    pub fn new(index: u32) -> Result<Self> {
        imp::Runtime::open(index).map(|inner| Self { inner })
    }

    /// A runtime on the same device with a new stream, for work that should
    /// overlap this one's (copies beside kernels).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`](crate::Error::Backend) when the driver cannot create a stream.
    pub fn fork(&self) -> Result<Self> {
        self.inner.fork().map(|inner| Self { inner })
    }

    /// `cuda:N`.
    pub fn device(&self) -> Device {
        Device::cuda(self.inner.index())
    }

    /// `len` bytes of device memory, zeroed.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`](crate::Error::Backend) when the allocation fails.
    pub fn alloc(&self, len: usize) -> Result<CudaBuffer> {
        self.inner.alloc(len).map(|inner| CudaBuffer { inner })
    }

    /// A new buffer holding a copy of `bytes`.
    ///
    /// # Errors
    ///
    /// As [`CudaRuntime::alloc`] and [`CudaRuntime::write`].
    pub fn upload(&self, bytes: &[u8]) -> Result<CudaBuffer> {
        let mut buf = self.alloc(bytes.len())?;
        self.write(&mut buf, 0, bytes)?;
        Ok(buf)
    }

    /// A new buffer holding `len` bytes read from `reader` (a socket, a
    /// file): the bytes are read straight into pinned chunks, and each full
    /// chunk is copied to the device while the next one is read. Returns once
    /// the bytes are on the device.
    ///
    /// # Errors
    ///
    /// As [`CudaRuntime::alloc`]; [`Error::Io`](crate::Error::Io) when the
    /// reader fails or ends early; [`Error::PinnedExhausted`](crate::Error::PinnedExhausted)
    /// when this thread holds every chunk in another pipeline;
    /// [`Error::Backend`](crate::Error::Backend).
    pub fn upload_from(&self, reader: &mut impl Read, len: usize) -> Result<CudaBuffer> {
        self.inner
            .upload_from(reader, len)
            .map(|inner| CudaBuffer { inner })
    }

    /// An upload of `len` bytes into a new buffer, fed piece by piece
    /// through [`CudaUpload::space`] and [`CudaUpload::advance`] (see
    /// [`crate::runtime::pinned::OwnedUpload`]).
    ///
    /// # Errors
    ///
    /// As [`CudaRuntime::alloc`].
    pub fn begin_upload(&self, len: usize) -> Result<CudaUpload> {
        self.inner.begin_upload(len).map(|inner| CudaUpload {
            inner,
            device: self.device(),
        })
    }

    /// Hands all of `buf`'s bytes to `sink`, in order, chunk by chunk: while
    /// the sink takes one pinned chunk (a socket write), the device-to-host
    /// copies of the next ones run. The sink is never called with no bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) with the sink's error;
    /// [`Error::WrongDevice`](crate::Error::WrongDevice); [`Error::Backend`](crate::Error::Backend).
    pub fn download_to(
        &self,
        buf: &CudaBuffer,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        self.inner.download_to(&buf.inner, sink)
    }

    /// The size of this device's pinned pools.
    pub fn pinned(&self) -> PinnedConfig {
        self.inner.pinned()
    }

    /// Sizes this device's pinned pools (for every runtime on the device).
    /// Transfers already running finish on the old pools, whose chunks are
    /// freed when they are done; later ones use the new. The default comes
    /// from `TENSORFERRY_PINNED_CHUNK_BYTES` and `TENSORFERRY_PINNED_CHUNKS`,
    /// else 16 × 1 MiB per direction.
    pub fn set_pinned(&self, config: PinnedConfig) {
        self.inner.set_pinned(config);
    }

    /// Copies `src` into `dst` from byte `offset`, staged through pinned
    /// chunks: the host copies into one chunk while earlier ones are on
    /// their way to the device. Returns once the bytes are on the device.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch) when the range is past the buffer's end,
    /// [`Error::WrongDevice`](crate::Error::WrongDevice) for a buffer of another device,
    /// [`Error::Backend`](crate::Error::Backend) when the driver fails.
    pub fn write(&self, dst: &mut CudaBuffer, offset: usize, src: &[u8]) -> Result<()> {
        self.inner.write(&mut dst.inner, offset, src)
    }

    /// Copies bytes from `src`, starting at byte `offset`, into all of `dst`,
    /// staged through pinned chunks (several copies in flight), after the
    /// work queued before it.
    ///
    /// # Errors
    ///
    /// As [`CudaRuntime::write`].
    pub fn read(&self, src: &CudaBuffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.inner.read(&src.inner, offset, dst)
    }

    /// Copies all of `src` into `dst` (the same length). Between devices the
    /// copy goes peer to peer where the hardware allows, else through pinned
    /// host chunks. Either buffer may be on another device than this runtime.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch) for different lengths; [`Error::Backend`](crate::Error::Backend).
    pub fn copy(&self, src: &CudaBuffer, dst: &mut CudaBuffer) -> Result<()> {
        self.inner.copy(&src.inner, &mut dst.inner)
    }

    /// Casts `src` (dtype `from`) into `dst` (dtype `to`) with the kernel
    /// that computes exactly [`crate::cast::bits`].
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::cast`], plus [`Error::WrongDevice`](crate::Error::WrongDevice) and [`Error::Backend`](crate::Error::Backend).
    pub fn cast(
        &self,
        src: &CudaBuffer,
        from: DType,
        dst: &mut CudaBuffer,
        to: DType,
    ) -> Result<()> {
        self.inner.cast(&src.inner, from, &mut dst.inner, to)
    }

    /// The checksum of the buffer's bytes, equal to [`crate::cpu::checksum`] of them.
    ///
    /// # Errors
    ///
    /// [`Error::WrongDevice`](crate::Error::WrongDevice); [`Error::Backend`](crate::Error::Backend).
    pub fn checksum(&self, buf: &CudaBuffer) -> Result<Checksum> {
        self.inner.checksum(&buf.inner)
    }

    /// Packs the view `layout` of `storage` into `out`, as [`crate::cpu::pack`].
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::pack`], plus [`Error::WrongDevice`](crate::Error::WrongDevice) and [`Error::Backend`](crate::Error::Backend).
    pub fn pack(
        &self,
        storage: &CudaBuffer,
        elem_bytes: usize,
        layout: &Layout,
        out: &mut CudaBuffer,
    ) -> Result<()> {
        self.inner
            .pack(&storage.inner, elem_bytes, layout, &mut out.inner)
    }

    /// Unpacks `packed` into the view `layout` of `storage`, as [`crate::cpu::unpack`].
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::unpack`]; [`Error::Unsupported`](crate::Error::Unsupported) for a view whose
    /// elements may overlap (only the CPU defines an order for those).
    pub fn unpack(
        &self,
        packed: &CudaBuffer,
        elem_bytes: usize,
        layout: &Layout,
        storage: &mut CudaBuffer,
    ) -> Result<()> {
        self.inner
            .unpack(&packed.inner, elem_bytes, layout, &mut storage.inner)
    }

    /// Records the work queued so far.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`](crate::Error::Backend).
    pub fn record_event(&self) -> Result<CudaEvent> {
        self.inner.record_event().map(|inner| CudaEvent { inner })
    }

    /// Makes work queued after this call wait for `event` (on any stream of this device).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`](crate::Error::Backend).
    pub fn wait_event(&self, event: &CudaEvent) -> Result<()> {
        self.inner.wait_event(&event.inner)
    }

    /// Waits for all work queued on this runtime's stream.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`](crate::Error::Backend), including errors of earlier asynchronous work.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
}

impl CudaBuffer {
    /// A runtime on the stream this buffer was allocated on (empty buffers
    /// have none).
    pub(crate) fn owner(&self) -> Result<CudaRuntime> {
        self.inner.owner().map(|inner| CudaRuntime { inner })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `cuda:N`.
    pub fn device(&self) -> Device {
        Device::cuda(self.inner.index())
    }
}

impl CudaUpload {
    /// `cuda:N`.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes the upload takes in all.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True for an empty upload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.inner.position()
    }

    /// Pinned host memory for the next bytes: the free part of the current
    /// chunk; empty once every byte is in.
    ///
    /// # Errors
    ///
    /// [`Error::PinnedExhausted`](crate::Error::PinnedExhausted) when this
    /// thread holds every chunk in another pipeline; [`Error::Backend`](crate::Error::Backend).
    pub fn space(&mut self) -> Result<&mut [u8]> {
        self.inner.space()
    }

    /// Counts `n` bytes written at the start of [`CudaUpload::space`]; a
    /// full chunk's copy is enqueued.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch) for more than the
    /// space offered; [`Error::Backend`](crate::Error::Backend).
    pub fn advance(&mut self, n: usize) -> Result<()> {
        self.inner.advance(n)
    }

    /// For a caller about to wait for more bytes: copies the partly filled
    /// chunk now and waits for the copies in flight, so the paused upload
    /// holds no chunk of the device's pool.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`](crate::Error::Backend) with a copy's error.
    pub fn pause(&mut self) -> Result<()> {
        self.inner.pause()
    }

    /// Waits for the copies (on their events) and returns the buffer.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch) when bytes are
    /// missing; [`Error::Backend`](crate::Error::Backend).
    pub fn finish(self) -> Result<CudaBuffer> {
        self.inner.finish().map(|inner| CudaBuffer { inner })
    }
}

impl fmt::Debug for CudaUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaUpload")
            .field("len", &self.len())
            .field("position", &self.position())
            .finish()
    }
}

impl CudaEvent {
    /// Blocks the calling thread until the recorded work is done.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`](crate::Error::Backend).
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
}

impl fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaRuntime(cuda:{})", self.inner.index())
    }
}

impl fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaBuffer(cuda:{}, {} bytes)",
            self.inner.index(),
            self.len()
        )
    }
}

impl fmt::Debug for CudaEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CudaEvent")
    }
}

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
