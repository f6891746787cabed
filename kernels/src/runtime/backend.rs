//! [`Backend`]: what a device runtime does — allocate, move bytes, run the
//! kernels — on the [`DeviceBuffer`]s of its device.
//!
//! The host ([`CpuRuntime`](super::cpu::CpuRuntime)), CUDA
//! ([`CudaRuntime`](super::cuda::CudaRuntime)) and wgpu
//! ([`WgpuRuntime`](super::wgpu::WgpuRuntime)) implement it, and
//! [`Runtime`](super::Runtime) hands every call to the one it holds. A
//! runtime whose feature this build leaves out is [`Unavailable`]: a type
//! with no values, whose constructor says which feature to build with, so
//! [`Runtime`](super::Runtime) and [`DeviceBuffer`] have the same variants in
//! every build.

use std::convert::Infallible;
use std::fmt;
use std::io::{self, Read};
use std::marker::PhantomData;
use std::ops::Range;

use tensorferry_device_map::Device;

use super::cuda::CudaBuffer;
use super::wgpu::WgpuBuffer;
use super::{DeviceBuffer, Uploading};
use crate::cpu::pack::Plan;
use crate::cpu::{AlignedBuffer, Checksum};
use crate::error::{Error, Result};
use crate::{DType, Layout};

/// Bytes per step where a buffer moves through host memory piece by piece
/// (wgpu's uploads fed piece by piece, [`Backend::download_to`] by default):
/// 4 MiB, a multiple of wgpu's 4-byte copy unit.
pub(crate) const STEP_BYTES: usize = 4 << 20;

pub(crate) mod sealed {
    /// Keeps [`Backend`](super::Backend) to the runtimes of this crate:
    /// [`DeviceBuffer`](super::DeviceBuffer) has a variant for each and no other.
    pub trait Sealed {}
}

/// The operations of one device's runtime, on buffers of that device.
///
/// A buffer of another device is [`Error::WrongDevice`], whose message says to
/// copy it first; only [`Backend::copy`] takes buffers of other devices of
/// the same kind (CUDA peer to peer, wgpu through the host). Work may run
/// asynchronously in call order; whatever hands bytes to the host waits for
/// the work queued before it.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::runtime::{cpu::CpuRuntime, Backend};
///
/// let rt = CpuRuntime;
/// let mut buf = rt.upload(b"tensor")?;
/// rt.write(&mut buf, 1, b"E")?;
/// let mut middle = [0u8; 3];
/// rt.download_range(&buf, 1, &mut middle)?;
/// assert_eq!(&middle, b"Ens");
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
pub trait Backend: fmt::Debug + Send + Sync + sealed::Sealed {
    /// The device this runtime runs on.
    fn device(&self) -> Device;

    /// `len` zero bytes on this device.
    ///
    /// # Errors
    ///
    /// The backend's allocation error; on wgpu [`Error::Unsupported`] past
    /// the adapter's largest buffer.
    fn alloc(&self, len: usize) -> Result<DeviceBuffer>;

    /// Copies `src` into `dst` from byte `offset` (CUDA through pinned
    /// chunks, wgpu through a mapped staging buffer); returns once the bytes
    /// are on their way in order with later work.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] past the buffer's end; [`Error::WrongDevice`];
    /// on wgpu [`Error::Unsupported`] for an offset that is not a multiple of
    /// 4, or a length that is not and does not reach the end (wgpu copies
    /// whole words); the backend's errors.
    fn write(&self, dst: &mut DeviceBuffer, offset: usize, src: &[u8]) -> Result<()>;

    /// A copy of `bytes` on this device.
    ///
    /// # Errors
    ///
    /// As [`Backend::alloc`] and [`Backend::write`].
    fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer> {
        let mut buf = self.alloc(bytes.len())?;
        self.write(&mut buf, 0, bytes)?;
        Ok(buf)
    }

    /// An upload of `len` bytes into a new buffer, fed piece by piece across
    /// calls (see [`Uploading`]).
    ///
    /// # Errors
    ///
    /// As [`Backend::alloc`].
    fn begin_upload(&self, len: usize) -> Result<Uploading>;

    /// A buffer holding `len` bytes read from `reader`, each read going
    /// straight into [`Uploading::space`] of a [`Backend::begin_upload`], so
    /// the bytes are copied to the device while the next ones are read.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the reader fails or ends before `len` bytes; as
    /// [`Backend::begin_upload`] and [`Uploading::advance`].
    fn upload_from(&self, reader: &mut dyn Read, len: usize) -> Result<DeviceBuffer> {
        let mut upload = self.begin_upload(len)?;
        loop {
            let done = upload.position();
            let space = upload.space()?;
            if space.is_empty() {
                return upload.finish();
            }
            let n = read_some(reader, space, done, len)?;
            upload.advance(n)?;
        }
    }

    /// True when an upload of `len` bytes fed piece by piece overlaps its
    /// copies with the arrival of later bytes (see
    /// [`Runtime::overlaps_upload`](super::Runtime::overlaps_upload)).
    fn overlaps_upload(&self, len: usize) -> bool;

    /// Copies bytes `offset..offset + out.len()` of `src` into `out`, after
    /// the work queued before it.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] for a range past the buffer's end;
    /// [`Error::WrongDevice`]; the backend's errors.
    fn download_range(&self, src: &DeviceBuffer, offset: usize, out: &mut [u8]) -> Result<()>;

    /// Hands all of `src`'s bytes to `sink` in order, never in empty pieces:
    /// by default in steps of 4 MiB through [`Backend::download_range`].
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with the sink's error; as [`Backend::download_range`].
    fn download_to(
        &self,
        src: &DeviceBuffer,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<()> {
        if src.device() != self.device() {
            return Err(wrong_device(
                self.device(),
                "download_to",
                "source",
                src.device(),
            ));
        }
        let len = src.len();
        let mut step = vec![0u8; STEP_BYTES.min(len)];
        let mut at = 0;
        while at < len {
            let n = STEP_BYTES.min(len - at);
            self.download_range(src, at, &mut step[..n])?;
            to_sink(sink, &step[..n])?;
            at += n;
        }
        Ok(())
    }

    /// Copies all of `src` into `dst` (the same length), both buffers of this
    /// runtime's kind, on this device or another.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] for different lengths; [`Error::WrongDevice`]
    /// for a buffer of another kind; the backend's errors.
    fn copy(&self, src: &DeviceBuffer, dst: &mut DeviceBuffer) -> Result<()>;

    /// Casts `src` (dtype `from`) into `dst` (dtype `to`), computing exactly
    /// [`crate::cast::bits`].
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::cast`], plus [`Error::WrongDevice`] and the backend's errors.
    fn cast(
        &self,
        src: &DeviceBuffer,
        from: DType,
        dst: &mut DeviceBuffer,
        to: DType,
    ) -> Result<()>;

    /// The checksum of `buf`'s bytes, equal to [`crate::cpu::checksum`] of them.
    ///
    /// # Errors
    ///
    /// [`Error::WrongDevice`]; the backend's errors.
    fn checksum(&self, buf: &DeviceBuffer) -> Result<Checksum>;

    /// Moves the elements of a strided view: [`Packing::Pack`] gathers the
    /// view `layout` of `src` into the contiguous `dst`, as
    /// [`crate::cpu::pack`]; [`Packing::Unpack`] scatters the contiguous
    /// `src` into the view `layout` of `dst`, as [`crate::cpu::unpack`].
    ///
    /// # Errors
    ///
    /// As [`crate::cpu::pack`] and [`crate::cpu::unpack`], plus
    /// [`Error::WrongDevice`] and the backend's errors; off the CPU
    /// [`Error::Unsupported`] for unpacking into a view whose elements may
    /// overlap (only the CPU defines which write wins); on wgpu
    /// [`Error::Unsupported`] when a buffer exceeds one binding or an index
    /// exceeds 32 bits.
    fn pack(
        &self,
        way: Packing,
        src: &DeviceBuffer,
        elem_bytes: usize,
        layout: &Layout,
        dst: &mut DeviceBuffer,
    ) -> Result<()>;

    /// Waits for the work queued on this runtime.
    ///
    /// # Errors
    ///
    /// The backend's errors, including those of earlier asynchronous work.
    fn synchronize(&self) -> Result<()>;
}

/// Which way [`Backend::pack`] moves the elements of a strided view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// From the view into contiguous bytes.
    Pack,
    /// From contiguous bytes into the view.
    Unpack,
}

impl Packing {
    /// `pack` or `unpack`, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Packing::Pack => "pack",
            Packing::Unpack => "unpack",
        }
    }

    /// Checks a device kernel's arguments: the view fits its buffer and the
    /// contiguous one holds every element, and an unpack does not write one
    /// element twice, which only the CPU orders (last write in row-major
    /// order wins). Returns the number of elements.
    // Used by the device backends only.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub(crate) fn check(
        self,
        backend: &'static str,
        src: usize,
        elem_bytes: usize,
        layout: &Layout,
        dst: usize,
    ) -> Result<usize> {
        let (storage, packed) = match self {
            Packing::Pack => (src, dst),
            Packing::Unpack => (dst, src),
        };
        crate::cpu::pack::check(layout, elem_bytes, storage, packed)?;
        let n = layout.numel();
        if self == Packing::Unpack && n > 1 && crate::cpu::pack::overlaps(&Plan::new(layout)) {
            return Err(Error::Unsupported {
                op: self.name(),
                backend,
                reason: "the view's elements may overlap, and only the CPU defines which write wins; unpack on the CPU".to_string(),
            });
        }
        Ok(n)
    }
}

/// An upload fed piece by piece, behind [`Uploading`]: the backend's host
/// memory for the next bytes, and its copies.
pub(crate) trait Feed: Send + fmt::Debug {
    /// Bytes the upload takes in all.
    fn len(&self) -> usize;
    /// Bytes written so far.
    fn position(&self) -> usize;
    /// Host memory for the next bytes; empty once all are in.
    fn space(&mut self) -> Result<&mut [u8]>;
    /// Counts `n` bytes written at the start of the space.
    fn advance(&mut self, n: usize) -> Result<()>;
    /// Leaves no host chunk of a shared pool held while the caller waits.
    fn pause(&mut self) -> Result<()> {
        Ok(())
    }
    /// Waits for the copies and returns the buffer; called once every byte
    /// is in.
    fn finish(self: Box<Self>) -> Result<DeviceBuffer>;
}

/// A backend's own buffers: one variant of [`DeviceBuffer`].
pub(crate) trait Variant: Sized {
    fn of(buf: &DeviceBuffer) -> Option<&Self>;
    fn of_mut(buf: &mut DeviceBuffer) -> Option<&mut Self>;
}

/// [`Variant`] for each buffer type, by the variant that holds it.
macro_rules! variants {
    ($($buffer:ty => $variant:ident),*) => {$(
        impl Variant for $buffer {
            fn of(buf: &DeviceBuffer) -> Option<&Self> {
                match buf {
                    DeviceBuffer::$variant(b) => Some(b),
                    _ => None,
                }
            }
            fn of_mut(buf: &mut DeviceBuffer) -> Option<&mut Self> {
                match buf {
                    DeviceBuffer::$variant(b) => Some(b),
                    _ => None,
                }
            }
        }
    )*};
}

variants!(AlignedBuffer => Host, CudaBuffer => Cuda, WgpuBuffer => Wgpu);

/// The error for a buffer on `found` handed to the runtime of `runtime`.
fn wrong_device(runtime: Device, op: &'static str, what: &'static str, found: Device) -> Error {
    Error::WrongDevice {
        op,
        what,
        runtime,
        found,
    }
}

impl DeviceBuffer {
    /// This buffer as the buffer type `T` of the runtime of `runtime`, on
    /// that very device; else [`Error::WrongDevice`] naming `op` and `what`
    /// buffer it is.
    pub(crate) fn on<T: Variant>(
        &self,
        runtime: Device,
        op: &'static str,
        what: &'static str,
    ) -> Result<&T> {
        let found = self.device();
        match T::of(self) {
            Some(b) if found == runtime => Ok(b),
            _ => Err(wrong_device(runtime, op, what, found)),
        }
    }

    /// As [`DeviceBuffer::on`], writable.
    pub(crate) fn on_mut<T: Variant>(
        &mut self,
        runtime: Device,
        op: &'static str,
        what: &'static str,
    ) -> Result<&mut T> {
        let found = self.device();
        match T::of_mut(self) {
            Some(b) if found == runtime => Ok(b),
            _ => Err(wrong_device(runtime, op, what, found)),
        }
    }

    /// As [`DeviceBuffer::on`], on any device of the same kind (a copy's).
    // Used by the device backends only.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub(crate) fn of_kind<T: Variant>(
        &self,
        runtime: Device,
        op: &'static str,
        what: &'static str,
    ) -> Result<&T> {
        T::of(self).ok_or_else(|| wrong_device(runtime, op, what, self.device()))
    }

    /// As [`DeviceBuffer::of_kind`], writable.
    // Used by the device backends only.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub(crate) fn of_kind_mut<T: Variant>(
        &mut self,
        runtime: Device,
        op: &'static str,
        what: &'static str,
    ) -> Result<&mut T> {
        let found = self.device();
        T::of_mut(self).ok_or_else(|| wrong_device(runtime, op, what, found))
    }
}

/// Ok when a copy's destination has the source's length.
pub(crate) fn same_len(src: usize, dst: usize) -> Result<()> {
    if src == dst {
        Ok(())
    } else {
        Err(Error::SizeMismatch {
            op: "copy",
            what: "destination",
            expected: src,
            actual: dst,
        })
    }
}

/// `offset..offset + len` when it lies within `buffer` bytes, else
/// [`Error::SizeMismatch`] naming `op`.
pub(crate) fn range(
    op: &'static str,
    offset: usize,
    len: usize,
    buffer: usize,
) -> Result<Range<usize>> {
    match offset.checked_add(len) {
        Some(end) if end <= buffer => Ok(offset..end),
        _ => Err(Error::SizeMismatch {
            op,
            what: "device buffer",
            expected: offset.saturating_add(len),
            actual: buffer,
        }),
    }
}

/// Reads at least one byte into `buf` (non-empty), retrying interruptions;
/// `done` of `total` bytes were read before, for the message.
pub(crate) fn read_some(
    reader: &mut (impl Read + ?Sized),
    buf: &mut [u8],
    done: usize,
    total: usize,
) -> Result<usize> {
    loop {
        match reader.read(buf) {
            Ok(0) => {
                return Err(Error::Io {
                    op: "upload_from: reading the tensor's bytes",
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the source ended after {done} of {total} bytes; it must deliver the whole tensor"),
                    ),
                })
            }
            Ok(n) => return Ok(n.min(buf.len())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Io {
                    op: "upload_from: reading the tensor's bytes",
                    source,
                })
            }
        }
    }
}

/// Hands `bytes` to an I/O sink, naming the failure.
pub(crate) fn to_sink(sink: &mut dyn FnMut(&[u8]) -> io::Result<()>, bytes: &[u8]) -> Result<()> {
    sink(bytes).map_err(|source| Error::Io {
        op: "download_to: handing the bytes to the sink",
        source,
    })
}

/// A feature a build may leave out, named for [`Unavailable`].
pub trait Feature: 'static {
    /// The runtime it brings: `cuda` or `wgpu`.
    const RUNTIME: &'static str;
    /// Why the runtime is missing, and how to get it.
    const NOT_BUILT: &'static str;
}

/// The runtime (and buffer) type of a feature this build leaves out: it has
/// no values, so no code that would use one can run, and
/// [`Unavailable::new`] — what `CudaRuntime::new` or `WgpuRuntime::new` is
/// in such a build, and what [`Runtime::open`](super::Runtime::open) calls —
/// returns [`Error::Unavailable`] naming the feature to build with.
///
/// # Examples
///
/// ```
/// use tensorferry_device_map::Device;
/// use tensorferry_kernels::runtime::Runtime;
///
/// if let Err(why) = Runtime::open(Device::cuda(0)) {
///     // In a build without `cuda`: "... rebuild with `--features cuda`".
///     println!("{why}");
/// }
/// ```
pub struct Unavailable<F: Feature> {
    never: Infallible,
    feature: PhantomData<fn() -> F>,
}

/// Declares what stands in for a runtime whose feature (`"cuda"`,
/// `"wgpu"`) this build leaves out: the feature's marker and the runtime and
/// buffer types, both [`Unavailable`]. The calling module has its
/// `NOT_BUILT` reason.
// Unused in a build with every feature.
#[cfg_attr(all(feature = "cuda", feature = "wgpu"), allow(unused_macros))]
macro_rules! stand_in {
    ($feature:literal, $marker:ident, $runtime:ident, $buffer:ident) => {
        #[doc = concat!("The `", $feature, "` feature, which this build leaves out.")]
        pub enum $marker {}

        impl $crate::runtime::Feature for $marker {
            const RUNTIME: &'static str = $feature;
            const NOT_BUILT: &'static str = NOT_BUILT;
        }

        #[doc = concat!("No ", $feature, " runtime: this build leaves out the `", $feature, "` feature.")]
        pub type $runtime = $crate::runtime::Unavailable<$marker>;

        #[doc = concat!("No ", $feature, " buffer: this build leaves out the `", $feature, "` feature.")]
        pub type $buffer = $crate::runtime::Unavailable<$marker>;
    };
}
#[cfg_attr(all(feature = "cuda", feature = "wgpu"), allow(unused_imports))]
pub(crate) use stand_in;

impl<F: Feature> Unavailable<F> {
    /// Always [`Error::Unavailable`]: the feature is not in this build.
    ///
    /// # Errors
    ///
    /// Always.
    pub fn new(_index: u32) -> Result<Self> {
        Err(Error::Unavailable {
            runtime: F::RUNTIME,
            reason: F::NOT_BUILT.to_string(),
        })
    }

    /// Length in bytes (no value exists to ask).
    pub fn len(&self) -> usize {
        match self.never {}
    }

    /// True when empty (no value exists to ask).
    pub fn is_empty(&self) -> bool {
        match self.never {}
    }

    /// The device (no value exists to ask).
    pub fn device(&self) -> Device {
        match self.never {}
    }

    /// Whether the memory came from another library (no value exists to ask).
    pub fn is_foreign(&self) -> bool {
        match self.never {}
    }

    /// The device address of the first byte (no value exists to ask).
    ///
    /// # Errors
    ///
    /// None: no value exists.
    pub fn device_address(&self) -> Result<u64> {
        match self.never {}
    }

    /// The stream handle a DLPack producer orders its writes before (no
    /// value exists to ask).
    pub fn stream_handle(&self) -> u64 {
        match self.never {}
    }

    /// Foreign device memory as a buffer (no runtime exists to ask).
    ///
    /// # Safety
    ///
    /// None needed: no value exists.
    ///
    /// # Errors
    ///
    /// None: no value exists.
    pub unsafe fn wrap_foreign(
        &self,
        _ptr: u64,
        _len: usize,
        _owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<DeviceBuffer> {
        match self.never {}
    }

    // Called where the stand-in takes a buffer's place: not in a build with
    // every feature.
    #[cfg_attr(all(feature = "cuda", feature = "wgpu"), allow(dead_code))]
    pub(crate) fn owner(&self) -> Result<Self> {
        match self.never {}
    }
}

impl<F: Feature> Clone for Unavailable<F> {
    fn clone(&self) -> Self {
        match self.never {}
    }
}

impl<F: Feature> fmt::Debug for Unavailable<F> {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.never {}
    }
}

impl<F: Feature> sealed::Sealed for Unavailable<F> {}

impl<F: Feature> Backend for Unavailable<F> {
    fn device(&self) -> Device {
        match self.never {}
    }
    fn alloc(&self, _len: usize) -> Result<DeviceBuffer> {
        match self.never {}
    }
    fn write(&self, _dst: &mut DeviceBuffer, _offset: usize, _src: &[u8]) -> Result<()> {
        match self.never {}
    }
    fn begin_upload(&self, _len: usize) -> Result<Uploading> {
        match self.never {}
    }
    fn overlaps_upload(&self, _len: usize) -> bool {
        match self.never {}
    }
    fn download_range(&self, _src: &DeviceBuffer, _offset: usize, _out: &mut [u8]) -> Result<()> {
        match self.never {}
    }
    fn copy(&self, _src: &DeviceBuffer, _dst: &mut DeviceBuffer) -> Result<()> {
        match self.never {}
    }
    fn cast(&self, _s: &DeviceBuffer, _f: DType, _d: &mut DeviceBuffer, _t: DType) -> Result<()> {
        match self.never {}
    }
    fn checksum(&self, _buf: &DeviceBuffer) -> Result<Checksum> {
        match self.never {}
    }
    fn pack(
        &self,
        _: Packing,
        _: &DeviceBuffer,
        _: usize,
        _: &Layout,
        _: &mut DeviceBuffer,
    ) -> Result<()> {
        match self.never {}
    }
    fn synchronize(&self) -> Result<()> {
        match self.never {}
    }
}
