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
//! exactly what the CPU does, f64 casts included.
//!
//! wgpu copies whole 4-byte words: buffers are padded to a multiple of 4
//! bytes, and [`WgpuRuntime::write`] takes offsets and lengths that are
//! multiples of 4 (or that reach the buffer's end).
//!
//! With the `wgpu` feature off these types still exist; [`WgpuRuntime::new`]
//! returns [`Error::Unavailable`](crate::Error::Unavailable) saying how to build with it.

use std::fmt;
use std::io::Read;

use serde::Serialize;
use tensorferry_device_map::Device;

use super::Probe;
use crate::cpu::Checksum;
use crate::error::Result;
use crate::{DType, Layout};

#[cfg(feature = "wgpu")]
#[path = "device.rs"]
mod imp;
#[cfg(not(feature = "wgpu"))]
#[path = "stub.rs"]
mod imp;

/// The WGSL of the cast functions (entry points are generated per cast).
pub const CAST_WGSL: &str = include_str!("cast.wgsl");
/// The WGSL of the checksum kernel.
pub const CHECKSUM_WGSL: &str = include_str!("checksum.wgsl");
/// The WGSL shared by the pack and unpack kernels.
pub const PACK_WGSL: &str = include_str!("pack.wgsl");

/// Bytes per step of [`WgpuRuntime::upload_from`] and
/// [`WgpuRuntime::download_to`] (a multiple of wgpu's 4-byte copy unit).
pub(crate) const STREAM_STEP_BYTES: usize = 4 << 20;

/// One wgpu adapter, opened as a device. Cloning shares it.
///
/// Work is submitted to the device's queue in call order; methods that hand
/// bytes to the host wait for it.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::runtime::wgpu::WgpuRuntime;
///
/// match WgpuRuntime::new(0) {
///     Ok(rt) => {
///         let buf = rt.upload(&[1, 2, 3, 4, 5])?;
///         let mut back = [0u8; 5];
///         rt.read(&buf, 0, &mut back)?;
///         assert_eq!(back, [1, 2, 3, 4, 5]);
///     }
///     Err(why) => println!("no wgpu adapter here: {why}"),
/// }
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
#[derive(Clone)]
pub struct WgpuRuntime {
    inner: imp::Runtime,
}

/// A storage buffer on one wgpu device.
pub struct WgpuBuffer {
    inner: imp::Buffer,
}

/// An upload to one wgpu adapter fed piece by piece, across calls and
/// threads: the caller writes into [`WgpuUpload::space`], a host step of up
/// to 4 MiB, and each full step goes to the adapter through a mapped
/// staging buffer, its copy submitted without waiting, while the next step
/// fills. Made by [`WgpuRuntime::begin_upload`].
pub struct WgpuUpload {
    rt: WgpuRuntime,
    buf: WgpuBuffer,
    step: Vec<u8>,
    /// Where the step lands.
    at: usize,
    filled: usize,
}

impl WgpuUpload {
    /// `wgpu:N`.
    pub fn device(&self) -> Device {
        self.rt.device()
    }

    /// Bytes the upload takes in all.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True for an empty upload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.at + self.filled
    }

    fn cap(&self) -> usize {
        STREAM_STEP_BYTES.min(self.len() - self.at)
    }

    /// Host memory for the next bytes: the free part of the current step;
    /// empty once every byte is in.
    ///
    /// # Errors
    ///
    /// None so far; the signature matches the other backends'.
    pub fn space(&mut self) -> Result<&mut [u8]> {
        let cap = self.cap();
        if self.step.len() < cap {
            self.step.resize(cap, 0);
        }
        Ok(&mut self.step[self.filled..cap])
    }

    /// Counts `n` bytes written at the start of [`WgpuUpload::space`]; a
    /// full step is written to the adapter.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch) for more than the
    /// space offered; as [`WgpuRuntime::write`].
    pub fn advance(&mut self, n: usize) -> Result<()> {
        let cap = self.cap();
        if self.filled + n > cap {
            return Err(crate::Error::SizeMismatch {
                op: "upload: advance",
                what: "free space of the staging step",
                expected: n,
                actual: cap - self.filled,
            });
        }
        self.filled += n;
        if n > 0 && self.filled == cap {
            self.rt.write(&mut self.buf, self.at, &self.step[..cap])?;
            self.at += cap;
            self.filled = 0;
        }
        Ok(())
    }

    /// Returns the buffer. Its copies are submitted: whatever is submitted
    /// to the adapter afterwards (kernels, reads) runs after them, so there
    /// is nothing to wait for (the staging buffers belong to wgpu, not to
    /// the caller).
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch) when bytes are
    /// missing.
    pub fn finish(self) -> Result<WgpuBuffer> {
        if self.position() != self.len() {
            return Err(crate::Error::SizeMismatch {
                op: "upload: finish",
                what: "bytes written",
                expected: self.len(),
                actual: self.position(),
            });
        }
        Ok(self.buf)
    }
}

impl fmt::Debug for WgpuUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WgpuUpload")
            .field("len", &self.len())
            .field("position", &self.position())
            .finish()
    }
}

impl WgpuRuntime {
    /// Opens `wgpu:index`, the index-th adapter of the list [`probe`] shows.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`](crate::Error::Unavailable) without the feature or without adapters;
    /// [`Error::NoSuchDevice`](crate::Error::NoSuchDevice) for an index past the list;
    /// [`Error::Backend`](crate::Error::Backend) when wgpu cannot open the device.
    pub fn new(index: u32) -> Result<Self> {
        imp::Runtime::open(index).map(|inner| Self { inner })
    }

    /// `wgpu:N`.
    pub fn device(&self) -> Device {
        Device::wgpu(self.inner.index())
    }

    /// The adapter: name, backend (`vulkan`, `gl`, …), kind and driver.
    pub fn adapter(&self) -> AdapterInfo {
        self.inner.adapter()
    }

    /// `len` bytes of device memory, zeroed.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`](crate::Error::Unsupported) past the adapter's largest buffer;
    /// [`Error::Backend`](crate::Error::Backend) when wgpu fails.
    pub fn alloc(&self, len: usize) -> Result<WgpuBuffer> {
        self.inner.alloc(len).map(|inner| WgpuBuffer { inner })
    }

    /// A new buffer holding a copy of `bytes`.
    ///
    /// # Errors
    ///
    /// As [`WgpuRuntime::alloc`] and [`WgpuRuntime::write`].
    pub fn upload(&self, bytes: &[u8]) -> Result<WgpuBuffer> {
        let mut buf = self.alloc(bytes.len())?;
        self.write(&mut buf, 0, bytes)?;
        Ok(buf)
    }

    /// A new buffer holding `len` bytes read from `reader`, in steps of
    /// 4 MiB: one step is read while nothing else is held, then written
    /// through a mapped staging buffer.
    ///
    /// # Errors
    ///
    /// As [`WgpuRuntime::alloc`] and [`WgpuRuntime::write`];
    /// [`Error::Io`](crate::Error::Io) when the reader fails or ends early.
    pub fn upload_from(&self, reader: &mut impl Read, len: usize) -> Result<WgpuBuffer> {
        let mut buf = self.alloc(len)?;
        let mut step = vec![0u8; STREAM_STEP_BYTES.min(len)];
        let mut at = 0;
        while at < len {
            let n = STREAM_STEP_BYTES.min(len - at);
            super::pinned::read_full(reader, &mut step[..n])?;
            self.write(&mut buf, at, &step[..n])?;
            at += n;
        }
        Ok(buf)
    }

    /// An upload of `len` bytes into a new buffer, fed piece by piece
    /// through [`WgpuUpload::space`] and [`WgpuUpload::advance`].
    ///
    /// # Errors
    ///
    /// As [`WgpuRuntime::alloc`].
    // Without the feature `self` is uninhabited and rustc sees the literal as unreachable.
    #[cfg_attr(not(feature = "wgpu"), allow(unreachable_code))]
    pub fn begin_upload(&self, len: usize) -> Result<WgpuUpload> {
        let buf = self.alloc(len)?;
        Ok(WgpuUpload {
            buf,
            step: Vec::new(),
            at: 0,
            filled: 0,
            rt: self.clone(),
        })
    }

    /// Hands all of `buf`'s bytes to `sink` in order, read back in steps of
    /// 4 MiB. The sink is never called with no bytes.
    ///
    /// # Errors
    ///
    /// As [`WgpuRuntime::read`]; [`Error::Io`](crate::Error::Io) with the
    /// sink's error.
    pub fn download_to(
        &self,
        buf: &WgpuBuffer,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        let len = buf.len();
        let mut step = vec![0u8; STREAM_STEP_BYTES.min(len)];
        let mut at = 0;
        while at < len {
            let n = STREAM_STEP_BYTES.min(len - at);
            self.read(buf, at, &mut step[..n])?;
            super::pinned::to_sink(sink, &step[..n])?;
            at += n;
        }
        Ok(())
    }

    /// Copies `src` into `dst` from byte `offset` through a mapped staging buffer.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch) past the buffer's end;
    /// [`Error::Unsupported`](crate::Error::Unsupported) for an offset that is not a
    /// multiple of 4, or a length that is not and does not reach the end.
    pub fn write(&self, dst: &mut WgpuBuffer, offset: usize, src: &[u8]) -> Result<()> {
        self.inner.write(&mut dst.inner, offset, src)
    }

    /// Copies bytes from `src`, starting at byte `offset`, into all of `dst`,
    /// after the work submitted before it.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch) past the buffer's end;
    /// [`Error::Backend`](crate::Error::Backend).
    pub fn read(&self, src: &WgpuBuffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.inner.read(&src.inner, offset, dst)
    }

    /// Copies all of `src` into `dst` (the same length); between adapters,
    /// through the host.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`](crate::Error::SizeMismatch); [`Error::Backend`](crate::Error::Backend).
    pub fn copy(&self, src: &WgpuBuffer, dst: &mut WgpuBuffer) -> Result<()> {
        self.inner.copy(&src.inner, &mut dst.inner)
    }

    /// Casts `src` (dtype `from`) into `dst` (dtype `to`), computing exactly
    /// [`crate::cast::bits`].
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::cast`], plus [`Error::WrongDevice`](crate::Error::WrongDevice)
    /// and [`Error::Backend`](crate::Error::Backend).
    pub fn cast(
        &self,
        src: &WgpuBuffer,
        from: DType,
        dst: &mut WgpuBuffer,
        to: DType,
    ) -> Result<()> {
        self.inner.cast(&src.inner, from, &mut dst.inner, to)
    }

    /// The checksum of the buffer's bytes, equal to [`crate::cpu::checksum`] of them.
    ///
    /// # Errors
    ///
    /// [`Error::WrongDevice`](crate::Error::WrongDevice); [`Error::Backend`](crate::Error::Backend).
    pub fn checksum(&self, buf: &WgpuBuffer) -> Result<Checksum> {
        self.inner.checksum(&buf.inner)
    }

    /// Packs the view `layout` of `storage` into `out`, as [`crate::cpu::pack`].
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::pack`]; [`Error::Unsupported`](crate::Error::Unsupported) when a
    /// buffer exceeds one binding or an index exceeds 32 bits.
    pub fn pack(
        &self,
        storage: &WgpuBuffer,
        elem_bytes: usize,
        layout: &Layout,
        out: &mut WgpuBuffer,
    ) -> Result<()> {
        self.inner
            .pack(&storage.inner, elem_bytes, layout, &mut out.inner)
    }

    /// Unpacks `packed` into the view `layout` of `storage`, as [`crate::cpu::unpack`].
    ///
    /// # Errors
    ///
    /// As [`WgpuRuntime::pack`]; [`Error::Unsupported`](crate::Error::Unsupported) for a
    /// view whose elements may overlap (only the CPU defines which write wins).
    pub fn unpack(
        &self,
        packed: &WgpuBuffer,
        elem_bytes: usize,
        layout: &Layout,
        storage: &mut WgpuBuffer,
    ) -> Result<()> {
        self.inner
            .unpack(&packed.inner, elem_bytes, layout, &mut storage.inner)
    }

    /// Waits for all submitted work.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`](crate::Error::Backend).
    pub fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
}

impl WgpuBuffer {
    /// The runtime of the device this buffer lives on.
    pub(crate) fn owner(&self) -> Result<WgpuRuntime> {
        self.inner.owner().map(|inner| WgpuRuntime { inner })
    }

    /// Length in bytes (the allocation is padded to a multiple of 4).
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `wgpu:N`.
    pub fn device(&self) -> Device {
        Device::wgpu(self.inner.index())
    }
}

impl fmt::Debug for WgpuRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgpuRuntime(wgpu:{})", self.inner.index())
    }
}

impl fmt::Debug for WgpuBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WgpuBuffer(wgpu:{}, {} bytes)",
            self.inner.index(),
            self.len()
        )
    }
}

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
