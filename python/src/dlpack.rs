//! The capsules that carry DLPack managed tensors between Python libraries
//! (the structures and the import and export themselves are the engine's:
//! `tensorferry_engine::dlpack`).
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

pub use tensorferry_engine::dlpack::{
    DlDevice, Managed, ManagedTensor, ManagedVersioned, CPU, CUDA, FLAG_IS_COPIED, FLAG_READ_ONLY,
};

/// Takes the managed tensor out of `capsule` (a `dltensor` or
/// `dltensor_versioned` capsule, not yet consumed), marking the capsule
/// used: the result owns it now and calls its deleter once when dropped.
///
/// # Errors
///
/// `BufferError` when `capsule` is not an unconsumed DLPack capsule, or
/// holds a DLPack version other than 1.x (freed then).
pub fn take(capsule: &Bound<'_, PyAny>) -> PyResult<ManagedTensor> {
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
    // SAFETY: renaming a valid capsule; `used` is a static C string, as the
    // capsule keeps the pointer.
    if unsafe { ffi::PyCapsule_SetName(ptr, used.as_ptr()) } != 0 {
        return Err(PyErr::fetch(capsule.py()));
    }
    // SAFETY: the capsule held a managed tensor of the kind its name says,
    // and renaming it made this call its only owner.
    let taken = unsafe {
        if versioned {
            ManagedTensor::from_versioned(raw.cast())
        } else {
            ManagedTensor::from_legacy(raw.cast())
        }
    };
    taken.map_err(|e| PyBufferError::new_err(format!("__dlpack__ returned {e}")))
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
