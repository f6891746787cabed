//! Tensors from Python objects, without copying their bytes: anything with
//! `__dlpack__` (NumPy, PyTorch, JAX, CuPy on the host) or the buffer
//! protocol (NumPy, `bytes`, `memoryview`, `array.array`).
//!
//! The object's memory becomes the storage of an engine tensor through a
//! [`Backing`] that keeps the object (or its DLPack capsule's tensor) alive
//! until the last view of it is dropped — after the bytes are written to
//! every peer, or when the last receiver in this process lets go. That drop
//! may happen on an engine thread, so it is handed to the release thread,
//! which holds the GIL (see [`crate::release`]).

use std::ffi::{c_int, c_void, CStr};

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tensorferry_engine::dlpack::{DataType, DlDevice, DlTensor};
use tensorferry_engine::{Error, Tensor};
use tensorferry_kernels::DType;

use crate::dlpack::{self, ManagedTensor};
use crate::errors::{to_py, Kind};
use crate::release;
use crate::tensor::PyTensor;

/// What keeps a Python object's memory valid.
enum Owner {
    /// A buffer-protocol view, released with `PyBuffer_Release`.
    Buffer(Box<ffi::Py_buffer>),
    /// A DLPack managed tensor, freed by its deleter.
    DlPack(
        #[expect(dead_code, reason = "held for its drop, which calls the deleter")] ManagedTensor,
    ),
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Owner::Buffer(view) = self {
            // SAFETY: the view was filled by a successful PyObject_GetBuffer
            // and is released exactly once, here, with the GIL held (the
            // release thread or a Python thread runs this).
            unsafe { ffi::PyBuffer_Release(&mut **view) };
        }
        // A DLPack tensor's deleter runs in ManagedTensor's own drop.
    }
}

// SAFETY: the buffer view is only released, once, on a thread holding the
// GIL (`Drop` of `Held` hands it to the release thread); nothing else
// touches it after construction.
unsafe impl Send for Owner {}
// SAFETY: as above; shared access never happens.
unsafe impl Sync for Owner {}

/// An [`Owner`] as the engine holds it: dropped on the release thread,
/// with the interpreter attached, wherever the engine lets go of it.
struct Held(Option<Owner>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(owner) = self.0.take() {
            release::drop_attached(owner);
        }
    }
}

/// An engine error about tensor `name`, as a Python exception.
fn named(name: &str, e: Error) -> PyErr {
    match e {
        Error::Invalid(what) => Kind::Invalid.err(format!("tensor `{name}`: {what}")),
        Error::Kernels(k) => Kind::Device.err(format!("tensor `{name}`: {k}")),
        other => to_py(other),
    }
}

/// A tensor over the memory `t` describes, kept alive by `owner`.
///
/// # Safety
///
/// `t` must describe memory `owner` keeps valid (and, for CUDA, whose
/// writes were ordered before the engine's import stream).
unsafe fn view_of(t: &DlTensor, owner: Owner, name: &str) -> PyResult<Tensor> {
    // SAFETY: per this function's contract.
    unsafe { Tensor::from_dlpack_parts(t, Box::new(Held(Some(owner)))) }.map_err(|e| named(name, e))
}

/// An element type from a buffer-protocol format string and item size.
fn dtype_from_format(format: &str, itemsize: usize) -> Option<DType> {
    let code = format.trim_start_matches(['@', '=', '<', '!', '>']);
    if format.starts_with(['>', '!']) && itemsize > 1 {
        return None; // big-endian: this is a little-endian host
    }
    let signed = |size| match size {
        1 => Some(DType::I8),
        2 => Some(DType::I16),
        4 => Some(DType::I32),
        8 => Some(DType::I64),
        _ => None,
    };
    let unsigned = |size| match size {
        1 => Some(DType::U8),
        2 => Some(DType::U16),
        4 => Some(DType::U32),
        8 => Some(DType::U64),
        _ => None,
    };
    let d = match code {
        "?" => Some(DType::Bool),
        "b" | "h" | "i" | "l" | "q" | "n" => signed(itemsize),
        "B" | "c" | "H" | "I" | "L" | "Q" | "N" => unsigned(itemsize),
        "e" => Some(DType::F16),
        "f" => Some(DType::F32),
        "d" => Some(DType::F64),
        _ => None,
    }?;
    (d.size_bytes() == itemsize).then_some(d)
}

/// A tensor viewing a Python object's memory.
///
/// `name` names the tensor in errors. `reinterpret` gives the elements
/// another dtype of the same size (bf16 from a NumPy `uint16` array).
///
/// # Errors
///
/// `TypeError` for an object that is neither a tensor nor a buffer;
/// `tensorferry.DeviceError` for memory on a device; `InvalidArgument` for
/// a dtype tensorferry does not carry.
pub fn tensor_from_py(
    obj: &Bound<'_, PyAny>,
    name: &str,
    reinterpret: Option<DType>,
) -> PyResult<Tensor> {
    if let Ok(t) = obj.cast::<PyTensor>() {
        let t = t.get().tensor().clone();
        return match reinterpret {
            Some(d) => crate::tensor::reinterpret(&t, d, name),
            None => Ok(t),
        };
    }
    // NumPy arrays of ml_dtypes' bf16 and fp8 types export neither DLPack
    // nor a buffer format: take their bits as unsigned integers.
    if let Some((as_dtype, bits_view)) = ml_dtypes_view(obj)? {
        let t = tensor_from_py(&bits_view, name, None)?;
        return crate::tensor::reinterpret(&t, reinterpret.unwrap_or(as_dtype), name);
    }
    let t = if obj.hasattr(intern!(obj.py(), "__dlpack__"))? {
        match from_dlpack(obj, name) {
            Err(e) if e.is_instance_of::<PyBufferError>(obj.py()) && supports_buffer(obj) => {
                from_buffer(obj, name)?
            }
            other => other?,
        }
    } else if supports_buffer(obj) {
        from_buffer(obj, name)?
    } else {
        return Err(PyTypeError::new_err(format!(
            "tensor `{name}`: a `{}` is not a tensor; pass an object with __dlpack__ or the buffer protocol (a NumPy array, a PyTorch tensor, bytes, memoryview)",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into())
        )));
    };
    match reinterpret {
        Some(d) => crate::tensor::reinterpret(&t, d, name),
        None => Ok(t),
    }
}

fn supports_buffer(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: `obj` is a live object; the call only inspects its type.
    unsafe { ffi::PyObject_CheckBuffer(obj.as_ptr()) == 1 }
}

/// NumPy's first type number for types registered by other packages.
const NPY_USERDEF: i64 = 256;

/// For a NumPy array of an ml_dtypes type, its dtype and a view of its bits
/// as unsigned integers.
fn ml_dtypes_view<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<(DType, Bound<'py, PyAny>)>> {
    let ty = obj.get_type();
    if !ty.module().is_ok_and(|m| m == "numpy") {
        return Ok(None);
    }
    let Ok(dtype) = obj.getattr(intern!(obj.py(), "dtype")) else {
        return Ok(None);
    };
    // Types registered outside NumPy are numbered from NPY_USERDEF (256);
    // NumPy's own need no closer look (`dtype.name` runs Python code, a
    // few µs on every tensor sent).
    if dtype
        .getattr(intern!(obj.py(), "num"))
        .and_then(|n| n.extract::<i64>())
        .is_ok_and(|n| n < NPY_USERDEF)
    {
        return Ok(None);
    }
    let Ok(dname) = dtype.getattr("name").and_then(|n| n.extract::<String>()) else {
        return Ok(None);
    };
    let (d, bits) = match dname.as_str() {
        "bfloat16" => (DType::BF16, "uint16"),
        "float8_e4m3fn" => (DType::F8E4M3, "uint8"),
        "float8_e5m2" => (DType::F8E5M2, "uint8"),
        _ => return Ok(None),
    };
    Ok(Some((d, obj.call_method1("view", (bits,))?)))
}

/// Through `__dlpack__`: host memory, and CUDA memory when this build and
/// host can open the device (the producer is asked to order its pending
/// writes before the engine's import stream, which the import waits for).
fn from_dlpack(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Tensor> {
    let py = obj.py();
    let mut stream = None;
    if obj.hasattr(intern!(py, "__dlpack_device__"))? {
        let (device_type, device_id): (i32, i32) = obj
            .call_method0(intern!(py, "__dlpack_device__"))?
            .extract()?;
        let device = DlDevice {
            device_type,
            device_id,
        };
        if device_type == dlpack::CUDA {
            let index = u32::try_from(device_id).map_err(|_| {
                Kind::Invalid.err(format!("tensor `{name}`: CUDA device {device_id}"))
            })?;
            let handle = py
                .detach(|| tensorferry_engine::dlpack::cuda_import_stream(index))
                .map_err(|e| {
                    Kind::Device.err(format!(
                        "tensor `{name}` is on {device}, which cannot be opened here ({e}); move it to the host first (e.g. `.cpu()`)"
                    ))
                })?;
            stream = Some(handle);
        } else if !device.host_readable() {
            return Err(Kind::Device.err(format!(
                "tensor `{name}` is on {device}; tensorferry takes host memory and CUDA devices: move it to the host first (e.g. `.cpu()`)"
            )));
        }
    }
    let ask = |versioned: bool| -> PyResult<Bound<'_, PyAny>> {
        let kwargs = pyo3::types::PyDict::new(py);
        if versioned {
            kwargs.set_item(intern!(py, "max_version"), PyTuple::new(py, [1, 0])?)?;
        }
        if let Some(handle) = stream {
            kwargs.set_item("stream", handle)?;
        }
        obj.call_method(intern!(py, "__dlpack__"), (), Some(&kwargs))
    };
    let capsule = match ask(true) {
        Ok(c) => c,
        // A producer older than DLPack 1.0 takes no max_version.
        Err(e) if e.is_instance_of::<PyTypeError>(py) => ask(false)?,
        Err(e) => return Err(e),
    };
    let managed = dlpack::take(&capsule)?;
    let t: *const DlTensor = managed.tensor();
    // SAFETY: the description lives in the producer's allocation, which
    // stays put while `managed` (moved into the owner) lives; a CUDA
    // producer was given the import stream above.
    unsafe { view_of(&*t, Owner::DlPack(managed), name) }
}

/// Through the buffer protocol.
fn from_buffer(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Tensor> {
    let mut view = Box::new(ffi::Py_buffer::new());
    // SAFETY: `obj` is live and `view` is a zeroed Py_buffer to fill.
    let rc = unsafe {
        ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, ffi::PyBUF_RECORDS_RO as c_int)
    };
    if rc != 0 {
        return Err(PyErr::fetch(obj.py()));
    }
    let owner = Owner::Buffer(view);
    let Owner::Buffer(v) = &owner else {
        unreachable!("made above")
    };
    let itemsize = usize::try_from(v.itemsize).unwrap_or(0);
    let format = if v.format.is_null() {
        "B".to_string()
    } else {
        // SAFETY: a filled view's format is a NUL-terminated string owned
        // by the exporter until release.
        unsafe { CStr::from_ptr(v.format) }
            .to_string_lossy()
            .into_owned()
    };
    let dtype = dtype_from_format(&format, itemsize).ok_or_else(|| {
        Kind::Invalid.err(format!(
            "tensor `{name}`: buffer format `{format}` ({itemsize}-byte items) is not carried; tensorferry carries {}",
            DType::ACCEPTED
        ))
    })?;
    let ndim = usize::try_from(v.ndim).unwrap_or(0);
    let (mut shape, mut strides) = if ndim == 0 {
        (Vec::new(), Vec::new())
    } else {
        // SAFETY: with PyBUF_STRIDES requested, a filled view has `ndim`
        // shape and stride entries, valid until release.
        let (shape, strides) = unsafe {
            (
                std::slice::from_raw_parts(v.shape, ndim),
                std::slice::from_raw_parts(v.strides, ndim),
            )
        };
        let mut elems = Vec::with_capacity(ndim);
        for &s in strides {
            if s % itemsize as isize != 0 {
                return Err(Kind::Invalid.err(format!(
                    "tensor `{name}`: a stride of {s} bytes is not a whole number of {itemsize}-byte elements; copy it first"
                )));
            }
            elems.push((s / itemsize as isize) as i64);
        }
        (shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), elems)
    };
    if !v.suboffsets.is_null() {
        return Err(Kind::Invalid.err(format!(
            "tensor `{name}`: indirect buffers (suboffsets) are not carried"
        )));
    }
    let (code, bits) = dtype.dlpack();
    let t = DlTensor {
        data: v.buf.cast::<c_void>(),
        device: DlDevice {
            device_type: dlpack::CPU,
            device_id: 0,
        },
        ndim: v.ndim,
        dtype: DataType {
            code,
            bits,
            lanes: 1,
        },
        shape: shape.as_mut_ptr(),
        strides: strides.as_mut_ptr(),
        byte_offset: 0,
    };
    // SAFETY: the description is of the view's memory, which `owner` keeps
    // valid until released; its shape and strides live until the end of
    // this call.
    unsafe { view_of(&t, owner, name) }
}
