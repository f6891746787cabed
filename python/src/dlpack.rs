//! The DLPack C structures (DLPack 1.0 header; the fp8 type codes of 1.1)
//! and the capsules that carry them between Python libraries.
//!
//! A producer puts a managed tensor in a capsule named `dltensor`
//! (unversioned) or `dltensor_versioned`; a consumer takes it by renaming
//! the capsule `used_dltensor` / `used_dltensor_versioned` and then owns it,
//! calling its deleter once when done. A capsule that was never consumed
//! calls the deleter from its own destructor.

use std::ffi::{c_void, CStr};

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// Capsule name of an unversioned managed tensor.
pub const LEGACY: &CStr = c"dltensor";
/// Capsule name of an unversioned managed tensor once consumed.
pub const LEGACY_USED: &CStr = c"used_dltensor";
/// Capsule name of a versioned managed tensor.
pub const VERSIONED: &CStr = c"dltensor_versioned";
/// Capsule name of a versioned managed tensor once consumed.
pub const VERSIONED_USED: &CStr = c"used_dltensor_versioned";

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
#[derive(Debug, Clone, Copy)]
pub struct Device {
    /// `DLDeviceType`.
    pub device_type: i32,
    /// The device's index.
    pub device_id: i32,
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
    pub device: Device,
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

/// A managed tensor taken from a capsule: its owner now, calling the
/// deleter once when dropped.
pub enum Taken {
    /// From a `dltensor` capsule.
    Legacy(*mut Managed),
    /// From a `dltensor_versioned` capsule.
    Versioned(*mut ManagedVersioned),
}

// SAFETY: a managed tensor is plain data plus a deleter; DLPack requires the
// deleter to be callable from any thread, and this crate calls it with the
// interpreter attached (see `release`), which every producer accepts.
unsafe impl Send for Taken {}
// SAFETY: shared access only reads the tensor description.
unsafe impl Sync for Taken {}

impl Taken {
    /// Takes the managed tensor out of `capsule` (a `dltensor` or
    /// `dltensor_versioned` capsule, not yet consumed), marking the capsule used.
    ///
    /// # Errors
    ///
    /// `BufferError` when `capsule` is not an unconsumed DLPack capsule.
    pub fn from_capsule(capsule: &Bound<'_, PyAny>) -> PyResult<Self> {
        let ptr = capsule.as_ptr();
        // SAFETY: `ptr` is a live object (borrowed from `capsule`);
        // PyCapsule_IsValid accepts any object and sets no exception.
        let versioned = unsafe { ffi::PyCapsule_IsValid(ptr, VERSIONED.as_ptr()) } == 1;
        // SAFETY: as above.
        let legacy = unsafe { ffi::PyCapsule_IsValid(ptr, LEGACY.as_ptr()) } == 1;
        let (name, used) = match (versioned, legacy) {
            (true, _) => (VERSIONED, VERSIONED_USED),
            (false, true) => (LEGACY, LEGACY_USED),
            _ => {
                return Err(PyBufferError::new_err(
                    "__dlpack__ returned something that is not an unused DLPack capsule",
                ))
            }
        };
        // SAFETY: the capsule was checked above to be valid under `name`.
        let raw = unsafe { ffi::PyCapsule_GetPointer(ptr, name.as_ptr()) };
        if raw.is_null() {
            return Err(PyErr::fetch(capsule.py()));
        }
        // SAFETY: renaming a valid capsule; `used` is a static C string, as
        // the capsule keeps the pointer.
        if unsafe { ffi::PyCapsule_SetName(ptr, used.as_ptr()) } != 0 {
            return Err(PyErr::fetch(capsule.py()));
        }
        let taken = if versioned {
            Taken::Versioned(raw.cast())
        } else {
            Taken::Legacy(raw.cast())
        };
        if let Taken::Versioned(m) = taken {
            // SAFETY: the pointer came from a valid versioned capsule, whose
            // version field leads every DLPack version's layout.
            let major = unsafe { (*m).version.major };
            if major != 1 {
                // Dropping `taken` calls the deleter, as an owner must.
                return Err(PyBufferError::new_err(format!(
                    "__dlpack__ returned a DLPack {major}.x tensor after being asked for 1.x at most"
                )));
            }
        }
        Ok(taken)
    }

    /// The tensor description.
    pub fn tensor(&self) -> &DlTensor {
        // SAFETY: the pointer came from a valid capsule and is owned by this
        // value until drop, which frees it.
        unsafe {
            match self {
                Taken::Legacy(m) => &(**m).dl_tensor,
                Taken::Versioned(m) => &(**m).dl_tensor,
            }
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        // SAFETY: this value owns the managed tensor (its capsule was marked
        // used), so the deleter runs exactly once, here.
        unsafe {
            match *self {
                Taken::Legacy(m) => {
                    if let Some(deleter) = (*m).deleter {
                        deleter(m);
                    }
                }
                Taken::Versioned(m) => {
                    if let Some(deleter) = (*m).deleter {
                        deleter(m);
                    }
                }
            }
        }
    }
}

/// Wraps a managed tensor this crate made in a capsule named `name`
/// (`LEGACY` or `VERSIONED`), whose destructor frees it unless a consumer
/// took it.
///
/// # Safety
///
/// `raw` must point to a `Managed` when `name` is `LEGACY`, a
/// `ManagedVersioned` when it is `VERSIONED`, with a deleter that frees it.
pub unsafe fn into_capsule<'py>(
    py: Python<'py>,
    raw: *mut c_void,
    name: &'static CStr,
) -> PyResult<Bound<'py, PyAny>> {
    let destructor: ffi::PyCapsule_Destructor = if name == VERSIONED {
        drop_versioned_capsule
    } else {
        drop_legacy_capsule
    };
    // SAFETY: `raw` is non-null and owned by the new capsule; `name` is static.
    let cap = unsafe { ffi::PyCapsule_New(raw, name.as_ptr(), Some(destructor)) };
    if cap.is_null() {
        // SAFETY: per this function's contract the pointer can be freed by its deleter.
        unsafe { free_raw(raw, name) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: PyCapsule_New returned a new, non-null reference.
    Ok(unsafe { Bound::from_owned_ptr(py, cap) })
}

/// Calls the deleter of a managed tensor named by `name`.
///
/// # Safety
///
/// As [`into_capsule`].
unsafe fn free_raw(raw: *mut c_void, name: &CStr) {
    // SAFETY: the caller guarantees the type behind `raw`.
    unsafe {
        if name == VERSIONED {
            let m = raw.cast::<ManagedVersioned>();
            if let Some(d) = (*m).deleter {
                d(m);
            }
        } else {
            let m = raw.cast::<Managed>();
            if let Some(d) = (*m).deleter {
                d(m);
            }
        }
    }
}

unsafe extern "C" fn drop_legacy_capsule(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the capsule being destroyed. A consumer
    // renamed it if it took the tensor; only an untaken one is freed here.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, LEGACY.as_ptr()) == 1 {
            let raw = ffi::PyCapsule_GetPointer(capsule, LEGACY.as_ptr());
            free_raw(raw, LEGACY);
        }
    }
}

unsafe extern "C" fn drop_versioned_capsule(capsule: *mut ffi::PyObject) {
    // SAFETY: as in `drop_legacy_capsule`.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, VERSIONED.as_ptr()) == 1 {
            let raw = ffi::PyCapsule_GetPointer(capsule, VERSIONED.as_ptr());
            free_raw(raw, VERSIONED);
        }
    }
}
