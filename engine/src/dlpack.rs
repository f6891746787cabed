//! DLPack: tensors in from and out to other libraries (PyTorch, NumPy, JAX,
//! CuPy) without copying their bytes, on the host or on a CUDA device.
//!
//! The C structures are those of the DLPack 1.0 header (with the fp8 type
//! codes of 1.1). A producer hands over a *managed tensor*: a description
//! ([`DlTensor`]) plus a deleter its new owner calls once when done.
//!
//! - **In**: [`ManagedTensor`] owns a managed tensor a producer handed over;
//!   [`Tensor::from_dlpack`] views its memory, keeping it alive until the
//!   last view is dropped. Host memory (`kDLCPU`, and the host-readable
//!   `kDLCUDAHost` and `kDLCUDAManaged`) becomes host storage; `kDLCUDA`
//!   memory becomes a CUDA buffer of the device it is on, never copied and
//!   never freed by this crate. [`Tensor::from_dlpack_parts`] does the same
//!   for a description whose owner is something else (a Python capsule's
//!   tensor that must be let go with the interpreter attached, say).
//! - **Out**: [`Tensor::to_dlpack`] makes a managed tensor that views this
//!   tensor's storage (host memory, or the CUDA buffer's device memory) and
//!   keeps it alive until the consumer calls the deleter.
//!
//! A view with negative strides (NumPy's `a[::-1]`) is gathered into a new
//! host buffer: this crate's layouts step forward only. On a device, such a
//! view is refused with what to do instead.

use std::any::Any;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Mutex;

use tensorferry_device_map::Device;
use tensorferry_kernels::runtime::cuda::CudaRuntime;
use tensorferry_kernels::runtime::{Backend, DeviceBuffer};
use tensorferry_kernels::{DType, Layout};

use crate::buffer::{Backing, HostBuffer, HostBufferMut};
use crate::error::{Error, Result};
use crate::tensor::{Storage, Tensor};

/// `kDLCPU`.
pub const CPU: i32 = 1;
/// `kDLCUDA`.
pub const CUDA: i32 = 2;
/// `kDLCUDAHost`: pinned host memory, readable by the CPU.
pub const CUDA_HOST: i32 = 3;
/// `kDLCUDAManaged`: unified memory, readable by the CPU.
pub const CUDA_MANAGED: i32 = 13;

/// `DLPACK_FLAG_BITMASK_READ_ONLY`: the consumer must not write.
pub const FLAG_READ_ONLY: u64 = 1;
/// `DLPACK_FLAG_BITMASK_IS_COPIED`: the producer made a copy for this export.
pub const FLAG_IS_COPIED: u64 = 2;

/// `DLPackVersion`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Version {
    /// Major version (1).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// `DLDevice`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DlDevice {
    /// `DLDeviceType`.
    pub device_type: i32,
    /// The device's index.
    pub device_id: i32,
}

impl DlDevice {
    /// Where a tensor on `device` is, in DLPack's terms: `None` for a wgpu
    /// adapter, which DLPack has no type for.
    pub fn of(device: Device) -> Option<DlDevice> {
        match device {
            Device::Cpu => Some(DlDevice {
                device_type: CPU,
                device_id: 0,
            }),
            Device::Cuda(i) => Some(DlDevice {
                device_type: CUDA,
                device_id: i32::try_from(i).ok()?,
            }),
            Device::Wgpu(_) => None,
        }
    }

    /// Whether the CPU can read this memory in place.
    pub fn host_readable(self) -> bool {
        matches!(self.device_type, CPU | CUDA_HOST | CUDA_MANAGED)
    }
}

impl std::fmt::Display for DlDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.device_type {
            CPU => f.write_str("cpu"),
            CUDA => write!(f, "cuda:{}", self.device_id),
            CUDA_HOST => write!(f, "pinned host memory of cuda:{}", self.device_id),
            CUDA_MANAGED => write!(f, "managed memory of cuda:{}", self.device_id),
            t => write!(f, "DLPack device type {t}, index {}", self.device_id),
        }
    }
}

/// `DLDataType`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DataType {
    /// `DLDataTypeCode`.
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes (1 for scalars).
    pub lanes: u16,
}

/// `DLTensor`.
#[repr(C)]
#[derive(Debug)]
pub struct DlTensor {
    /// The data (plus `byte_offset`).
    pub data: *mut c_void,
    /// Where the data is.
    pub device: DlDevice,
    /// Number of dimensions.
    pub ndim: i32,
    /// Element type.
    pub dtype: DataType,
    /// `ndim` sizes.
    pub shape: *mut i64,
    /// `ndim` strides in elements, or null for row-major contiguous.
    pub strides: *mut i64,
    /// Bytes from `data` to the first element.
    pub byte_offset: u64,
}

/// `DLManagedTensor` (unversioned).
#[repr(C)]
pub struct Managed {
    /// The tensor.
    pub dl_tensor: DlTensor,
    /// The producer's state.
    pub manager_ctx: *mut c_void,
    /// Frees the tensor; called once by its owner.
    pub deleter: Option<unsafe extern "C" fn(*mut Managed)>,
}

/// `DLManagedTensorVersioned`.
#[repr(C)]
pub struct ManagedVersioned {
    /// The DLPack version the producer wrote.
    pub version: Version,
    /// The producer's state.
    pub manager_ctx: *mut c_void,
    /// Frees the tensor; called once by its owner.
    pub deleter: Option<unsafe extern "C" fn(*mut ManagedVersioned)>,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// The tensor.
    pub dl_tensor: DlTensor,
}

/// A managed tensor a producer handed over, owned: its deleter is called
/// once, when this is dropped.
pub struct ManagedTensor(Raw);

enum Raw {
    Legacy(NonNull<Managed>),
    Versioned(NonNull<ManagedVersioned>),
}

// SAFETY: a managed tensor is a description plus a deleter; DLPack requires
// the deleter to be callable from any thread, and nothing here writes the
// description.
unsafe impl Send for ManagedTensor {}
// SAFETY: shared access only reads the description.
unsafe impl Sync for ManagedTensor {}

impl ManagedTensor {
    /// Takes ownership of an unversioned managed tensor.
    ///
    /// # Safety
    ///
    /// `ptr` must be a valid `DLManagedTensor` nobody else owns (its
    /// deleter is called when the result drops).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a null pointer.
    pub unsafe fn from_legacy(ptr: *mut Managed) -> Result<ManagedTensor> {
        NonNull::new(ptr)
            .map(|p| ManagedTensor(Raw::Legacy(p)))
            .ok_or_else(|| Error::Invalid("a null DLPack managed tensor".into()))
    }

    /// Takes ownership of a versioned managed tensor.
    ///
    /// # Safety
    ///
    /// As [`from_legacy`](Self::from_legacy), for a
    /// `DLManagedTensorVersioned`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a null pointer or a major version other than
    /// 1 (the tensor is freed then, as its owner must).
    pub unsafe fn from_versioned(ptr: *mut ManagedVersioned) -> Result<ManagedTensor> {
        let p = NonNull::new(ptr)
            .ok_or_else(|| Error::Invalid("a null DLPack managed tensor".into()))?;
        let taken = ManagedTensor(Raw::Versioned(p));
        // SAFETY: the caller guarantees a valid versioned tensor, whose
        // version field leads every DLPack version's layout.
        let major = unsafe { p.as_ref().version.major };
        if major != 1 {
            return Err(Error::Invalid(format!(
                "a DLPack {major}.x tensor; this build reads DLPack 1.x"
            )));
        }
        Ok(taken)
    }

    /// The description.
    pub fn tensor(&self) -> &DlTensor {
        // SAFETY: owned and valid until drop (see the constructors).
        unsafe {
            match &self.0 {
                Raw::Legacy(m) => &m.as_ref().dl_tensor,
                Raw::Versioned(m) => &m.as_ref().dl_tensor,
            }
        }
    }

    /// Whether the producer said its consumers must not write (only a
    /// versioned tensor can say so).
    pub fn read_only(&self) -> bool {
        match &self.0 {
            Raw::Legacy(_) => false,
            // SAFETY: as in `tensor`.
            Raw::Versioned(m) => unsafe { m.as_ref().flags & FLAG_READ_ONLY != 0 },
        }
    }
}

impl Drop for ManagedTensor {
    fn drop(&mut self) {
        // SAFETY: this value owns the managed tensor, so its deleter runs
        // exactly once, here.
        unsafe {
            match &self.0 {
                Raw::Legacy(m) => {
                    if let Some(deleter) = m.as_ref().deleter {
                        deleter(m.as_ptr());
                    }
                }
                Raw::Versioned(m) => {
                    if let Some(deleter) = m.as_ref().deleter {
                        deleter(m.as_ptr());
                    }
                }
            }
        }
    }
}

/// The runtime CUDA imports on `cuda:index` are ordered on: one per device
/// per process, kept while the process lives.
fn import_runtime(index: u32) -> Result<CudaRuntime> {
    static RUNTIMES: Mutex<Vec<(u32, CudaRuntime)>> = Mutex::new(Vec::new());
    let mut runtimes = RUNTIMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, rt)) = runtimes.iter().find(|(i, _)| *i == index) {
        return Ok(rt.clone());
    }
    let rt = CudaRuntime::new(index)?;
    runtimes.push((index, rt.clone()));
    Ok(rt)
}

/// The stream a DLPack producer on `cuda:index` orders its pending writes
/// before: the handle to give `__dlpack__(stream=…)` when importing its
/// tensor with [`Tensor::from_dlpack_parts`], which waits for that stream.
///
/// # Errors
///
/// A kernels error when this build or host cannot open `cuda:index`.
pub fn cuda_import_stream(index: u32) -> Result<u64> {
    Ok(import_runtime(index)?.stream_handle())
}

/// What keeps foreign host memory valid, as the bytes of a [`HostBuffer`].
struct ForeignHost {
    ptr: *const u8,
    len: usize,
    _owner: Box<dyn Any + Send + Sync>,
}

// SAFETY: plain memory kept valid by the owner for this value's life; this
// crate only reads it.
unsafe impl Send for ForeignHost {}
// SAFETY: as above.
unsafe impl Sync for ForeignHost {}

impl Backing for ForeignHost {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` lies inside the producer's memory (checked
        // against its shape and strides when made), non-null for `len > 0`,
        // and the owner keeps it valid while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A DLPack description, read and checked.
struct Described {
    dtype: DType,
    shape: Vec<usize>,
    /// In elements, possibly negative.
    strides: Vec<isize>,
    /// The address of the first element.
    first: usize,
    device: DlDevice,
}

/// Reads `t`.
///
/// # Safety
///
/// `t` must be a valid description: `shape` (and a non-null `strides`)
/// holding `ndim` entries.
unsafe fn describe(t: &DlTensor) -> Result<Described> {
    if t.dtype.lanes != 1 {
        return Err(Error::Invalid(format!(
            "vector elements ({} lanes) are not carried",
            t.dtype.lanes
        )));
    }
    let dtype = DType::from_dlpack(t.dtype.code, t.dtype.bits).ok_or_else(|| {
        Error::Invalid(format!(
            "DLPack type code {} of {} bits is not carried; tensorferry carries {}",
            t.dtype.code,
            t.dtype.bits,
            DType::ACCEPTED
        ))
    })?;
    let ndim = usize::try_from(t.ndim)
        .map_err(|_| Error::Invalid(format!("a DLPack tensor of {} dimensions", t.ndim)))?;
    let shape_raw: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: the caller guarantees `ndim` sizes at `shape`.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let shape = shape_raw
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| Error::Invalid(format!("a DLPack shape of {shape_raw:?}")))?;
    let strides: Vec<isize> = if t.strides.is_null() || ndim == 0 {
        contiguous(&shape)
    } else {
        // SAFETY: a non-null `strides` holds `ndim` entries (caller).
        let s = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        s.iter()
            .map(|&x| isize::try_from(x))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::Invalid(format!("DLPack strides of {s:?}")))?
    };
    let offset = usize::try_from(t.byte_offset)
        .map_err(|_| Error::Invalid(format!("a DLPack byte offset of {}", t.byte_offset)))?;
    Ok(Described {
        dtype,
        shape,
        strides,
        first: (t.data as usize).wrapping_add(offset),
        device: t.device,
    })
}

/// Row-major strides (in elements) of `shape`.
fn contiguous(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![1isize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1].saturating_mul(shape[d + 1].max(1) as isize);
    }
    strides
}

/// Copies the elements of a host view with any strides into `out`, row-major.
///
/// # Safety
///
/// Every element of the view (`first` plus any in-bounds index times the
/// strides) must be readable.
unsafe fn gather(
    first: *const u8,
    shape: &[usize],
    strides: &[isize],
    size: usize,
    out: &mut [u8],
) {
    let mut index = vec![0usize; shape.len()];
    let mut offset: isize = 0;
    for chunk in out.chunks_exact_mut(size) {
        // SAFETY: `offset` is the byte offset of an element of the view,
        // readable per the caller.
        let src = unsafe { std::slice::from_raw_parts(first.offset(offset), size) };
        chunk.copy_from_slice(src);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            offset += strides[d] * size as isize;
            if index[d] < shape[d] {
                break;
            }
            offset -= strides[d] * size as isize * shape[d] as isize;
            index[d] = 0;
        }
    }
}

impl Tensor {
    /// A tensor viewing the memory a DLPack producer handed over, kept
    /// alive until the last view of it is dropped; see the
    /// [module docs](crate::dlpack).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a dtype, shape or strides this crate does not
    /// carry; a kernels error when the tensor is on a CUDA device this build
    /// or host cannot open.
    pub fn from_dlpack(managed: ManagedTensor) -> Result<Tensor> {
        let t: *const DlTensor = managed.tensor();
        // SAFETY: `managed` owns a valid description, and keeps its memory
        // valid while it lives; it becomes the owner below (moving the box
        // does not move the description, which the producer allocated).
        unsafe { Tensor::from_dlpack_parts(&*t, Box::new(managed)) }
    }

    /// As [`from_dlpack`](Self::from_dlpack), for a description whose
    /// memory `owner` keeps valid: `owner` is dropped when the last view is
    /// (or at once, when the elements had to be copied).
    ///
    /// # Safety
    ///
    /// `t` must be a valid DLPack description whose memory (and, until this
    /// returns, whose shape and strides) stay valid while `owner` lives, and
    /// which nobody writes meanwhile. For CUDA memory, the producer's writes
    /// must be done or ordered before the stream [`cuda_import_stream`]
    /// names (which is waited for here).
    ///
    /// # Errors
    ///
    /// As [`from_dlpack`](Self::from_dlpack).
    pub unsafe fn from_dlpack_parts(
        t: &DlTensor,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Result<Tensor> {
        // SAFETY: the caller guarantees a valid description.
        let d = unsafe { describe(t) }?;
        let size = d.dtype.size_bytes();
        let numel = d
            .shape
            .iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .ok_or_else(|| Error::Invalid(format!("a DLPack shape of {:?} overflows", d.shape)))?;
        if numel == 0 {
            // Nothing to view: no memory is held.
            return Tensor::zeros(d.dtype, &d.shape);
        }
        if d.first == 0 {
            return Err(Error::Invalid(format!(
                "a null data pointer for {numel} elements"
            )));
        }
        let on_cuda = d.device.device_type == CUDA;
        if !on_cuda && !d.device.host_readable() {
            return Err(Error::Invalid(format!(
                "a tensor on {}: tensorferry takes host memory and CUDA devices; move it to one of those first",
                d.device
            )));
        }
        if d.strides.iter().any(|&s| s < 0) {
            if on_cuda {
                return Err(Error::Invalid(format!(
                    "a view with negative strides {:?} on {}: make it contiguous first (`.contiguous()`)",
                    d.strides, d.device
                )));
            }
            let mut out = HostBufferMut::zeroed(numel * size);
            // SAFETY: the caller guarantees every element of the view is
            // readable host memory while `owner` lives (it does until the
            // end of this call).
            unsafe {
                gather(
                    d.first as *const u8,
                    &d.shape,
                    &d.strides,
                    size,
                    out.as_mut_slice(),
                )
            };
            drop(owner);
            return Tensor::from_host(d.dtype, &d.shape, out.freeze());
        }
        let strides: Vec<usize> = d.strides.iter().map(|&s| s as usize).collect();
        let layout = Layout::new(&d.shape, &strides, 0)?;
        let reach = layout
            .required_elems()
            .ok()
            .and_then(|n| n.checked_mul(size))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "a DLPack view of {:?} reaches past the address space",
                    d.shape
                ))
            })?;
        if on_cuda {
            let index = u32::try_from(d.device.device_id)
                .map_err(|_| Error::Invalid(format!("CUDA device index {}", d.device.device_id)))?;
            let rt = import_runtime(index)?;
            // The producer's writes were ordered before this stream: once
            // it is done, any stream may read the memory.
            rt.synchronize()?;
            // SAFETY: the caller guarantees the memory is valid device memory
            // of this device while `owner` lives.
            let buffer = unsafe { rt.wrap_foreign(d.first as u64, reach, owner) }?;
            return Tensor::from_device_strided(d.dtype, layout, buffer);
        }
        let buffer = HostBuffer::from_backing(ForeignHost {
            ptr: d.first as *const u8,
            len: reach,
            _owner: owner,
        });
        if layout.is_contiguous() {
            return Tensor::from_host(d.dtype, &d.shape, buffer);
        }
        Tensor::from_host_strided(d.dtype, layout, buffer)
    }

    /// A managed tensor viewing this tensor's storage (host memory, or the
    /// device memory of a CUDA buffer), which it keeps alive until the
    /// consumer calls its deleter. `flags` are DLPack's (`FLAG_READ_ONLY`
    /// for a view consumers must not write).
    ///
    /// The result is the consumer's to free, through its deleter.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a tensor on a wgpu adapter (DLPack has no such
    /// device: take [`to_host`](Self::to_host) first); a kernels error when
    /// the device's pending work on the buffer fails.
    pub fn to_dlpack(&self, flags: u64) -> Result<NonNull<ManagedVersioned>> {
        let (dl_tensor, export) = self.export()?;
        let managed = Box::new(ManagedVersioned {
            version: Version { major: 1, minor: 1 },
            manager_ctx: Box::into_raw(export).cast(),
            deleter: Some(delete_export::<ManagedVersioned>),
            flags,
            dl_tensor,
        });
        Ok(NonNull::from(Box::leak(managed)))
    }

    /// As [`to_dlpack`](Self::to_dlpack), in the unversioned form (which
    /// cannot say read-only: give such consumers a copy of what they must
    /// not write).
    ///
    /// # Errors
    ///
    /// As [`to_dlpack`](Self::to_dlpack).
    pub fn to_dlpack_legacy(&self) -> Result<NonNull<Managed>> {
        let (dl_tensor, export) = self.export()?;
        let managed = Box::new(Managed {
            dl_tensor,
            manager_ctx: Box::into_raw(export).cast(),
            deleter: Some(delete_export::<Managed>),
        });
        Ok(NonNull::from(Box::leak(managed)))
    }

    /// The address of the first element: in host memory, or in a CUDA
    /// device's memory (after the work queued on its buffer is done).
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] on a wgpu adapter, whose memory has no address; a
    /// kernels error when waiting for the device fails.
    pub fn data_address(&self) -> Result<usize> {
        let base = match self.storage() {
            Storage::Host(h) => h.as_slice().as_ptr() as usize,
            Storage::Device(b) => match &**b {
                DeviceBuffer::Cuda(c) => usize::try_from(c.device_address()?)
                    .map_err(|_| Error::Invalid("a device address past this host's".into()))?,
                DeviceBuffer::Host(h) => h.as_slice().as_ptr() as usize,
                DeviceBuffer::Wgpu(_) => {
                    return Err(Error::Invalid(format!(
                        "a tensor on {} has no address another library can read: take it to the host first",
                        self.device()
                    )))
                }
            },
        };
        Ok(base.wrapping_add(self.layout().offset() * self.dtype().size_bytes()))
    }

    /// The description of this tensor's view and what keeps it valid.
    fn export(&self) -> Result<(DlTensor, Box<Export>)> {
        let device = DlDevice::of(self.device()).ok_or_else(|| {
            Error::Invalid(format!(
                "a tensor on {} cannot be exported through DLPack, which has no such device: take it to the host first",
                self.device()
            ))
        })?;
        let data = self.data_address()? as *mut c_void;
        let mut export = Box::new(Export {
            shape: self.shape().iter().map(|&d| d as i64).collect(),
            strides: self.strides().iter().map(|&s| s as i64).collect(),
            _storage: self.storage().clone(),
        });
        let dl_tensor = DlTensor {
            data,
            device,
            ndim: i32::try_from(export.shape.len())
                .map_err(|_| Error::Invalid("too many dimensions for DLPack".into()))?,
            dtype: {
                let (code, bits) = self.dtype().dlpack();
                DataType {
                    code,
                    bits,
                    lanes: 1,
                }
            },
            shape: export.shape.as_mut_ptr(),
            strides: export.strides.as_mut_ptr(),
            byte_offset: 0,
        };
        Ok((dl_tensor, export))
    }
}

/// What an export owns: the storage and the arrays its description points into.
struct Export {
    _storage: Storage,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

/// Either managed form, for their one deleter.
trait WithContext {
    fn context(&self) -> *mut c_void;
}

impl WithContext for Managed {
    fn context(&self) -> *mut c_void {
        self.manager_ctx
    }
}

impl WithContext for ManagedVersioned {
    fn context(&self) -> *mut c_void {
        self.manager_ctx
    }
}

/// The deleter of what [`Tensor::to_dlpack`] and
/// [`Tensor::to_dlpack_legacy`] make.
unsafe extern "C" fn delete_export<M: WithContext>(m: *mut M) {
    // SAFETY: `m` and its context (an `Export`) were made by `Box` in the
    // export, and DLPack calls the deleter once.
    unsafe {
        let m = Box::from_raw(m);
        drop(Box::from_raw(m.context().cast::<Export>()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static FREED: AtomicUsize = AtomicUsize::new(0);

    /// Tests that count frees take turns: each counts only its own.
    fn freeing_turn() -> std::sync::MutexGuard<'static, ()> {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        TURN.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A producer's managed tensor over `data` (kept in the context).
    struct Produced {
        data: Vec<f32>,
        shape: Vec<i64>,
        strides: Vec<i64>,
    }

    unsafe extern "C" fn free_produced(m: *mut ManagedVersioned) {
        // SAFETY: made by `produce` below with Box, freed once.
        unsafe {
            let m = Box::from_raw(m);
            drop(Box::from_raw(m.manager_ctx.cast::<Produced>()));
        }
        FREED.fetch_add(1, Ordering::SeqCst);
    }

    fn produce(
        data: Vec<f32>,
        shape: &[i64],
        strides: &[i64],
        first: usize,
    ) -> *mut ManagedVersioned {
        let mut p = Box::new(Produced {
            data,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        });
        let dl_tensor = DlTensor {
            data: p.data.as_mut_ptr().cast(),
            device: DlDevice {
                device_type: CPU,
                device_id: 0,
            },
            ndim: shape.len() as i32,
            dtype: DataType {
                code: 2,
                bits: 32,
                lanes: 1,
            },
            shape: p.shape.as_mut_ptr(),
            strides: p.strides.as_mut_ptr(),
            byte_offset: (first * 4) as u64,
        };
        Box::into_raw(Box::new(ManagedVersioned {
            version: Version { major: 1, minor: 0 },
            manager_ctx: Box::into_raw(p).cast(),
            deleter: Some(free_produced),
            flags: 0,
            dl_tensor,
        }))
    }

    #[test]
    fn host_memory_comes_in_without_a_copy_and_is_freed_with_its_last_view() {
        let _turn = freeing_turn();
        let before = FREED.load(Ordering::SeqCst);
        let raw = produce((0..12).map(|x| x as f32).collect(), &[3, 2], &[4, 2], 1);
        // SAFETY: `raw` is a fresh managed tensor nobody else owns.
        let managed = unsafe { ManagedTensor::from_versioned(raw) }.expect("take");
        let data = managed.tensor().data as usize;
        let t = Tensor::from_dlpack(managed).expect("import");
        assert_eq!(t.shape(), &[3, 2]);
        assert_eq!(t.strides(), &[4, 2]);
        let Storage::Host(h) = t.storage() else {
            panic!("host storage")
        };
        assert_eq!(h.as_slice().as_ptr() as usize, data + 4, "viewed in place");
        assert_eq!(
            t.to_contiguous()
                .expect("pack")
                .as_slice::<f32>()
                .expect("f32"),
            &[1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
        );
        let view = t.narrow(0, 1, 3).expect("narrow");
        drop(t);
        assert_eq!(
            FREED.load(Ordering::SeqCst),
            before,
            "a view still holds it"
        );
        drop(view);
        assert_eq!(FREED.load(Ordering::SeqCst), before + 1);
    }

    #[test]
    fn negative_strides_are_gathered_and_the_producer_freed_at_once() {
        let _turn = freeing_turn();
        let before = FREED.load(Ordering::SeqCst);
        // The reversed rows of a 2×3 matrix: first element at row 1.
        let raw = produce((0..6).map(|x| x as f32).collect(), &[2, 3], &[-3, 1], 3);
        // SAFETY: as above.
        let managed = unsafe { ManagedTensor::from_versioned(raw) }.expect("take");
        let t = Tensor::from_dlpack(managed).expect("import");
        assert_eq!(FREED.load(Ordering::SeqCst), before + 1);
        assert_eq!(
            t.as_slice::<f32>().expect("f32"),
            &[3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
        );
    }

    #[test]
    fn an_export_views_the_storage_and_comes_back_in_as_the_same_bytes() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).expect("tensor");
        let col = t.narrow(1, 1, 3).expect("narrow");
        let out = col.to_dlpack(FLAG_READ_ONLY).expect("export");
        // SAFETY: a managed tensor just made, owned here.
        let back = unsafe { ManagedTensor::from_versioned(out.as_ptr()) }.expect("take");
        assert!(back.read_only());
        assert_eq!(
            back.tensor().device,
            DlDevice::of(Device::Cpu).expect("cpu")
        );
        let t2 = Tensor::from_dlpack(back).expect("import");
        assert_eq!(t2.strides(), &[3, 1]);
        assert_eq!(
            t2.to_contiguous()
                .expect("pack")
                .as_slice::<f32>()
                .expect("f32"),
            &[2.0, 3.0, 5.0, 6.0]
        );
        let Storage::Host(h) = t2.storage() else {
            panic!("host storage")
        };
        let Storage::Host(orig) = t.storage() else {
            panic!("host storage")
        };
        assert_eq!(h.as_slice().as_ptr(), orig.as_slice()[4..].as_ptr());
    }

    #[test]
    fn what_cannot_be_carried_is_refused_saying_why() {
        for (dtype, shape, strides, want) in [
            (
                DataType {
                    code: 2,
                    bits: 32,
                    lanes: 4,
                },
                vec![2i64],
                vec![1i64],
                "lanes",
            ),
            (
                DataType {
                    code: 5,
                    bits: 64,
                    lanes: 1,
                },
                vec![2],
                vec![1],
                "type code 5",
            ),
            (
                DataType {
                    code: 2,
                    bits: 32,
                    lanes: 1,
                },
                vec![-2],
                vec![1],
                "shape",
            ),
        ] {
            let mut data = [0f32; 4];
            let (mut shape, mut strides) = (shape, strides);
            let t = DlTensor {
                data: data.as_mut_ptr().cast(),
                device: DlDevice {
                    device_type: CPU,
                    device_id: 0,
                },
                ndim: 1,
                dtype,
                shape: shape.as_mut_ptr(),
                strides: strides.as_mut_ptr(),
                byte_offset: 0,
            };
            // SAFETY: a valid description of `data`, alive for the call.
            let e = unsafe { Tensor::from_dlpack_parts(&t, Box::new(())) }.expect_err(want);
            assert!(e.to_string().contains(want), "{e}");
        }
        let mut data = [0f32; 4];
        let mut shape = [4i64];
        let t = one_dim_f32(data.as_mut_ptr().cast(), 4, &mut shape);
        // SAFETY: as above.
        let e = unsafe { Tensor::from_dlpack_parts(&t, Box::new(())) }.expect_err("opencl");
        assert!(e.to_string().contains("DLPack device type 4"), "{e}");
    }

    #[test]
    fn cuda_memory_without_a_cuda_device_is_refused_and_its_owner_let_go() {
        if CudaRuntime::new(0).is_ok() {
            eprintln!("skipped: cuda:0 is present; the GPU check covers importing device memory");
            return;
        }
        let owner = std::sync::Arc::new(());
        let mut shape = [4i64];
        let t = one_dim_f32(0x7f00_0000_0000usize as *mut c_void, CUDA, &mut shape);
        // SAFETY: the memory is never touched: opening cuda:0 fails first.
        let e = unsafe { Tensor::from_dlpack_parts(&t, Box::new(std::sync::Arc::clone(&owner))) }
            .expect_err("no CUDA here");
        assert!(e.to_string().contains("cuda"), "{e}");
        assert_eq!(
            std::sync::Arc::strong_count(&owner),
            1,
            "the owner was let go"
        );
    }

    /// A contiguous one-dimensional f32 description of `shape[0]` elements
    /// at `data` on DLPack device type `device_type`, index 0.
    fn one_dim_f32(data: *mut c_void, device_type: i32, shape: &mut [i64; 1]) -> DlTensor {
        DlTensor {
            data,
            device: DlDevice {
                device_type,
                device_id: 0,
            },
            ndim: 1,
            dtype: DataType {
                code: 2,
                bits: 32,
                lanes: 1,
            },
            shape: shape.as_mut_ptr(),
            strides: std::ptr::null_mut(),
            byte_offset: 0,
        }
    }
}
