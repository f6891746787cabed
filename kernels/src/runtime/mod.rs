//! Device runtimes: what each one finds on this host, and the kernels on
//! whichever device holds the data.
//!
//! [`HostReport::probe`] asks every runtime compiled in; a runtime that is not
//! compiled in, or whose libraries or devices are absent, reports the reason
//! instead of devices. Nothing here panics on a host without GPU libraries.
//!
//! [`Runtime`] is one device (`cpu`, `cuda:N`, `wgpu:N`) and [`DeviceBuffer`]
//! bytes on one; the same calls allocate, move bytes and run the kernels on
//! any of them, and every backend computes the CPU's bits. Each call goes to
//! the device's [`Backend`]: [`cpu::CpuRuntime`], [`cuda::CudaRuntime`] or
//! [`wgpu::WgpuRuntime`], or [`Unavailable`] for a feature this build leaves
//! out.
//!
//! # Examples
//!
//! ```
//! use tensorferry_device_map::Device;
//! use tensorferry_kernels::runtime::Runtime;
//! use tensorferry_kernels::{cpu, DType};
//!
//! let rt = Runtime::open(Device::Cpu)?;
//! let src = rt.upload(&1.5f32.to_le_bytes())?;
//! let mut half = rt.alloc(2)?;
//! rt.cast(&src, DType::F32, &mut half, DType::BF16)?;
//! assert_eq!(rt.to_vec(&half)?, [0xc0, 0x3f]);
//! assert_eq!(rt.checksum(&src)?, cpu::checksum(&1.5f32.to_le_bytes()));
//! # Ok::<(), tensorferry_kernels::Error>(())
//! ```

mod backend;
pub mod cpu;
pub mod cuda;
pub mod pinned;
pub mod wgpu;

use serde::Serialize;
use tensorferry_device_map::{Device, Inventory};

use self::backend::Feed;
pub use self::backend::{Backend, Feature, Packing, Unavailable};
use self::cuda::{CudaBuffer, CudaRuntime};
use self::wgpu::{WgpuBuffer, WgpuRuntime};
use crate::cpu::{AlignedBuffer, Checksum};
use crate::error::{Error, Result};
use crate::{DType, Layout};

/// One device that holds bytes and runs the kernels.
#[derive(Clone, Debug)]
pub enum Runtime {
    /// The host: [`crate::cpu`] kernels on [`AlignedBuffer`]s
    /// ([`cpu::CpuRuntime`]).
    Cpu,
    /// A CUDA device.
    Cuda(CudaRuntime),
    /// A wgpu adapter.
    Wgpu(WgpuRuntime),
}

/// Bytes on one device.
#[derive(Debug)]
pub enum DeviceBuffer {
    /// Host memory.
    Host(AlignedBuffer),
    /// CUDA device memory.
    Cuda(CudaBuffer),
    /// A wgpu storage buffer.
    Wgpu(WgpuBuffer),
}

/// An upload to one device fed piece by piece, across calls and threads:
/// made by [`Runtime::begin_upload`], it owns everything it uses (`Send`,
/// no borrowed lifetimes), so a reader that returns whenever its socket has
/// nothing more can keep it until the next bytes come.
///
/// Write the next bytes into [`Uploading::space`] (a socket is read
/// straight into it) and count them with [`Uploading::advance`]:
///
/// - CUDA: the space is the free part of a pinned chunk from the device's
///   host-to-device pool; a full chunk's copy is enqueued at once and the
///   next chunk taken, by the pool rule of [`pinned`] (a pipeline holding
///   chunks never waits for the pool).
/// - wgpu: the space is a host step of up to 4 MiB; a full step goes to the
///   adapter through a mapped staging buffer, its copy submitted without
///   waiting.
/// - CPU: the space is the rest of the destination buffer itself.
///
/// [`Uploading::finish`] waits for the copies (on their events) and returns
/// the buffer. Dropping it unfinished waits for the copies in flight and
/// returns every chunk.
#[derive(Debug)]
pub struct Uploading {
    device: Device,
    feed: Box<dyn Feed>,
}

impl Uploading {
    /// An upload to `device` through a backend's feed.
    pub(crate) fn new(device: Device, feed: Box<dyn Feed>) -> Self {
        Self { device, feed }
    }

    /// The device the bytes go to.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes the upload takes in all.
    pub fn len(&self) -> usize {
        self.feed.len()
    }

    /// True for an empty upload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.feed.position()
    }

    /// Bytes still to come.
    pub fn remaining(&self) -> usize {
        self.len() - self.position()
    }

    /// Host memory for the next bytes (see the type's docs for what it is on
    /// each device); never empty while bytes remain, empty once all are in.
    /// It may be shorter than what remains: write, advance, ask again.
    ///
    /// # Errors
    ///
    /// [`Error::PinnedExhausted`]; a backend's errors (an earlier copy's
    /// failure shows here).
    pub fn space(&mut self) -> Result<&mut [u8]> {
        self.feed.space()
    }

    /// Counts `n` bytes written at the start of [`Uploading::space`]; a full
    /// chunk (or step) is copied to the device asynchronously.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] when `n` is more than the space offered
    /// (nothing is counted); a backend's errors.
    pub fn advance(&mut self, n: usize) -> Result<()> {
        self.feed.advance(n)
    }

    /// Copies `bytes` in at the current position.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] past the end (nothing is written, though
    /// earlier pieces of a long write may be); as [`Uploading::advance`].
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.remaining() {
            return Err(Error::SizeMismatch {
                op: "upload: write",
                what: "bytes left to upload",
                expected: bytes.len(),
                actual: self.remaining(),
            });
        }
        while !bytes.is_empty() {
            let space = self.space()?;
            let n = space.len().min(bytes.len());
            space[..n].copy_from_slice(&bytes[..n]);
            self.advance(n)?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// For a caller about to wait for more bytes, perhaps for long: on CUDA
    /// the partly filled chunk is copied now and every copy in flight waited
    /// for (each at most one chunk), so a paused upload holds no pinned
    /// chunk and stalled peers cannot starve the device's pool.
    ///
    /// # Errors
    ///
    /// A backend's errors (a failed copy).
    pub fn pause(&mut self) -> Result<()> {
        self.feed.pause()
    }

    /// Waits for the outstanding copies and returns the buffer on the device.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] when not every byte was written; the first
    /// failed copy's error.
    pub fn finish(self) -> Result<DeviceBuffer> {
        if self.remaining() != 0 {
            return Err(Error::SizeMismatch {
                op: "upload: finish",
                what: "bytes written",
                expected: self.len(),
                actual: self.position(),
            });
        }
        self.feed.finish()
    }
}

/// `Uploading` must stay `Send`: it lives in a connection's reader state,
/// which whichever thread leads the connection drives.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Uploading>();
};

impl DeviceBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            DeviceBuffer::Host(b) => b.len(),
            DeviceBuffer::Cuda(b) => b.len(),
            DeviceBuffer::Wgpu(b) => b.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the bytes are on.
    pub fn device(&self) -> Device {
        match self {
            DeviceBuffer::Host(_) => Device::Cpu,
            DeviceBuffer::Cuda(b) => b.device(),
            DeviceBuffer::Wgpu(b) => b.device(),
        }
    }

    /// The runtime of the device (for CUDA, of the stream) the buffer was
    /// allocated on.
    fn owner(&self) -> Result<Runtime> {
        Ok(match self {
            DeviceBuffer::Host(_) => Runtime::Cpu,
            DeviceBuffer::Cuda(b) => Runtime::Cuda(b.owner()?),
            DeviceBuffer::Wgpu(b) => Runtime::Wgpu(b.owner()?),
        })
    }

    /// Copies all of `src`, on any device, into this buffer of the same
    /// length: directly within a device, peer to peer between CUDA devices
    /// that allow it, through the host otherwise.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] for different lengths; a backend's errors.
    pub fn copy_from(&mut self, src: &DeviceBuffer) -> Result<()> {
        backend::same_len(src.len(), self.len())?;
        if src.is_empty() {
            return Ok(());
        }
        match (src, &mut *self) {
            (s, d) if s.device().kind() == d.device().kind() => d.owner()?.backend().copy(s, d),
            (DeviceBuffer::Host(s), d) => d.owner()?.backend().write(d, 0, s.as_slice()),
            (s, DeviceBuffer::Host(d)) => {
                s.owner()?.backend().download_range(s, 0, d.as_mut_slice())
            }
            (s, d) => {
                let mut host = DeviceBuffer::Host(AlignedBuffer::zeroed(s.len()));
                host.copy_from(s)?;
                d.copy_from(&host)
            }
        }
    }
}

impl Runtime {
    /// Opens `device`: the host always; a CUDA device or wgpu adapter when
    /// this build and host have it.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] or [`Error::NoSuchDevice`] saying why not.
    pub fn open(device: Device) -> Result<Self> {
        Ok(match device {
            Device::Cpu => Runtime::Cpu,
            Device::Cuda(i) => Runtime::Cuda(CudaRuntime::new(i)?),
            Device::Wgpu(i) => Runtime::Wgpu(WgpuRuntime::new(i)?),
        })
    }

    /// The device's backend, which every call below goes to.
    fn backend(&self) -> &dyn Backend {
        match self {
            Runtime::Cpu => &cpu::CpuRuntime,
            Runtime::Cuda(rt) => rt,
            Runtime::Wgpu(rt) => rt,
        }
    }

    /// The device this runtime runs on.
    pub fn device(&self) -> Device {
        self.backend().device()
    }

    /// `len` zero bytes on this device.
    ///
    /// # Errors
    ///
    /// A backend's allocation error.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        self.backend().alloc(len)
    }

    /// A copy of `bytes` on this device.
    ///
    /// # Errors
    ///
    /// A backend's allocation or copy error.
    pub fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer> {
        self.backend().upload(bytes)
    }

    /// A buffer on this device holding `len` bytes read from `reader` (a
    /// socket, a file), without a whole host copy first: on the CPU straight
    /// into the aligned buffer; on CUDA into pinned chunks, each copied to
    /// the device while the next is read (see [`pinned`]); on wgpu in 4 MiB
    /// steps through staging buffers.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the reader fails or ends before `len` bytes;
    /// [`Error::PinnedExhausted`]; a backend's allocation or copy error.
    ///
    /// # Examples
    ///
    /// ```
    /// use tensorferry_kernels::runtime::Runtime;
    ///
    /// let rt = Runtime::Cpu;
    /// let mut socket: &[u8] = &[1, 2, 3, 4, 5, 6];
    /// let buf = rt.upload_from(&mut socket, 4)?;
    /// assert_eq!(rt.to_vec(&buf)?, [1, 2, 3, 4]);
    /// assert!(rt.upload_from(&mut socket, 4).is_err(), "only 2 bytes left");
    /// # Ok::<(), tensorferry_kernels::Error>(())
    /// ```
    pub fn upload_from(&self, reader: &mut impl std::io::Read, len: usize) -> Result<DeviceBuffer> {
        self.backend().upload_from(reader, len)
    }

    /// An upload of `len` bytes to this device fed piece by piece across
    /// calls (see [`Uploading`]): for a reader that must not block, such as
    /// a socket read whenever it has bytes.
    ///
    /// # Errors
    ///
    /// A backend's allocation error.
    ///
    /// # Examples
    ///
    /// ```
    /// use tensorferry_kernels::runtime::Runtime;
    ///
    /// let rt = Runtime::Cpu;
    /// let mut up = rt.begin_upload(6)?;
    /// for piece in [&b"ten"[..], b"s", b"or"] {
    ///     let space = up.space()?;
    ///     space[..piece.len()].copy_from_slice(piece);
    ///     up.advance(piece.len())?;
    /// }
    /// assert_eq!(rt.to_vec(&up.finish()?)?, b"tensor");
    /// # Ok::<(), tensorferry_kernels::Error>(())
    /// ```
    pub fn begin_upload(&self, len: usize) -> Result<Uploading> {
        self.backend().begin_upload(len)
    }

    /// True when an upload of `len` bytes fed piece by piece
    /// ([`Runtime::begin_upload`]) overlaps its copies with the arrival of
    /// later bytes, so reading a socket straight into it beats reading the
    /// bytes to memory and uploading them afterwards: on CUDA always (each
    /// pinned chunk is copied while the next fills, and the bytes skip a host
    /// copy); on wgpu past one 4 MiB staging step; never on the CPU.
    pub fn overlaps_upload(&self, len: usize) -> bool {
        self.backend().overlaps_upload(len)
    }

    /// Hands all of `buf`'s bytes (on this device) to `sink` in order, in one
    /// or more pieces, never empty ones: on the CPU the buffer itself; on
    /// CUDA pinned chunk by chunk while the next chunks' copies run; on wgpu
    /// in 4 MiB steps.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with the sink's error; [`Error::WrongDevice`]; a
    /// backend's errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::io::Write;
    /// use tensorferry_kernels::runtime::Runtime;
    ///
    /// let rt = Runtime::Cpu;
    /// let buf = rt.upload(b"tensor")?;
    /// let mut socket = Vec::new();
    /// rt.download_to(&buf, &mut |bytes| socket.write_all(bytes))?;
    /// assert_eq!(socket, b"tensor");
    /// # Ok::<(), tensorferry_kernels::Error>(())
    /// ```
    pub fn download_to(
        &self,
        buf: &DeviceBuffer,
        sink: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<()> {
        self.backend().download_to(buf, sink)
    }

    /// Copies all of `buf` (on this device) into `out`, which must be as long.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`], [`Error::WrongDevice`], a backend's errors.
    pub fn download(&self, buf: &DeviceBuffer, out: &mut [u8]) -> Result<()> {
        if out.len() != buf.len() {
            return Err(Error::SizeMismatch {
                op: "download",
                what: "host destination",
                expected: buf.len(),
                actual: out.len(),
            });
        }
        self.backend().download_range(buf, 0, out)
    }

    /// Copies bytes `offset..offset + out.len()` of `buf` (on this device)
    /// into `out`: on CUDA through the device's pinned chunks, several in
    /// flight, each copied into `out` while later ones run; on wgpu through
    /// mapped staging buffers (whole words around the range, any offset and
    /// length); on the CPU by slicing. To read a device tensor back piece by
    /// piece, e.g. while writing a frame, call it per piece.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] when the range reaches past the buffer's end
    /// (nothing is copied); [`Error::WrongDevice`]; a backend's errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use tensorferry_kernels::runtime::Runtime;
    ///
    /// let rt = Runtime::Cpu;
    /// let buf = rt.upload(b"a tensor's bytes")?;
    /// let mut piece = [0u8; 6];
    /// rt.download_range(&buf, 2, &mut piece)?;
    /// assert_eq!(&piece, b"tensor");
    /// assert!(rt.download_range(&buf, 12, &mut piece).is_err(), "past the end");
    /// # Ok::<(), tensorferry_kernels::Error>(())
    /// ```
    pub fn download_range(&self, buf: &DeviceBuffer, offset: usize, out: &mut [u8]) -> Result<()> {
        self.backend().download_range(buf, offset, out)
    }

    /// All of `buf`'s bytes, in a new vector.
    ///
    /// # Errors
    ///
    /// As [`Runtime::download`].
    pub fn to_vec(&self, buf: &DeviceBuffer) -> Result<Vec<u8>> {
        let mut out = vec![0; buf.len()];
        self.download(buf, &mut out)?;
        Ok(out)
    }

    /// Casts `src` (dtype `from`) into `dst` (dtype `to`); see [`crate::cast`].
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::cast`], plus [`Error::WrongDevice`] and a backend's errors.
    pub fn cast(
        &self,
        src: &DeviceBuffer,
        from: DType,
        dst: &mut DeviceBuffer,
        to: DType,
    ) -> Result<()> {
        self.backend().cast(src, from, dst, to)
    }

    /// The checksum of `buf`'s bytes (see `docs/wire-format.md`).
    ///
    /// # Errors
    ///
    /// [`Error::WrongDevice`]; a backend's errors.
    pub fn checksum(&self, buf: &DeviceBuffer) -> Result<Checksum> {
        self.backend().checksum(buf)
    }

    /// Packs the view `layout` of `storage` into `out` (see [`crate::cpu::pack`]).
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::pack`], plus [`Error::WrongDevice`] and a backend's errors.
    pub fn pack(
        &self,
        storage: &DeviceBuffer,
        elem_bytes: usize,
        layout: &Layout,
        out: &mut DeviceBuffer,
    ) -> Result<()> {
        self.backend()
            .pack(Packing::Pack, storage, elem_bytes, layout, out)
    }

    /// Unpacks `packed` into the view `layout` of `storage` (see [`crate::cpu::unpack`]).
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::unpack`]; on CUDA and wgpu also
    /// [`Error::Unsupported`] for views whose elements may overlap.
    pub fn unpack(
        &self,
        packed: &DeviceBuffer,
        elem_bytes: usize,
        layout: &Layout,
        storage: &mut DeviceBuffer,
    ) -> Result<()> {
        self.backend()
            .pack(Packing::Unpack, packed, elem_bytes, layout, storage)
    }

    /// Waits for the work queued on this runtime.
    ///
    /// # Errors
    ///
    /// A backend's errors, including those of earlier asynchronous work.
    pub fn synchronize(&self) -> Result<()> {
        self.backend().synchronize()
    }
}

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

/// Locks `m`, ignoring poisoning: every critical section in the runtimes is a
/// single push, pop, insert or read, so a panic cannot leave the data half-updated.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One shared state per device index in this process, kept while anything
/// holds it: a context or device is opened once, however many runtimes use it.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) struct PerDevice<T>(std::sync::Mutex<Vec<(u32, std::sync::Weak<T>)>>);

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl<T> PerDevice<T> {
    /// An empty registry.
    pub(crate) const fn new() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }

    /// The live state of device `index`, or a new one made by `open`. `open`
    /// runs with the registry locked, so two threads never open one device twice.
    pub(crate) fn get_or_open(
        &self,
        index: u32,
        open: impl FnOnce() -> Result<T>,
    ) -> Result<std::sync::Arc<T>> {
        let mut devices = lock(&self.0);
        devices.retain(|(_, weak)| weak.strong_count() > 0);
        if let Some(state) = devices
            .iter()
            .find(|(i, _)| *i == index)
            .and_then(|(_, weak)| weak.upgrade())
        {
            return Ok(state);
        }
        let state = std::sync::Arc::new(open()?);
        devices.push((index, std::sync::Arc::downgrade(&state)));
        Ok(state)
    }
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
