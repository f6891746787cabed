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

use std::ffi::{c_int, CStr};

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tensorferry_engine::{Backing, HostBuffer, HostBufferMut, Tensor};
use tensorferry_kernels::{DType, Layout};

use crate::dlpack::{self, Taken};
use crate::errors::{IntoPy, Kind};
use crate::release;
use crate::tensor::PyTensor;

/// What keeps a Python object's memory valid.
enum Owner {
    /// A buffer-protocol view, released with `PyBuffer_Release`.
    Buffer(Box<ffi::Py_buffer>),
    /// A DLPack managed tensor, freed by its deleter.
    DlPack(#[expect(dead_code, reason = "held for its drop, which calls the deleter")] Taken),
}

// SAFETY: the buffer view is only released, once, on a thread holding the
// GIL (`Drop` of `PyBacking` hands it to the release thread); nothing else
// touches it after construction.
unsafe impl Send for Owner {}
// SAFETY: as above; shared access never happens.
unsafe impl Sync for Owner {}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Owner::Buffer(view) = self {
            // SAFETY: the view was filled by a successful PyObject_GetBuffer
            // and is released exactly once, here, with the GIL held (the
            // release thread or a Python thread runs this).
            unsafe { ffi::PyBuffer_Release(&mut **view) };
        }
        // A DLPack tensor's deleter runs in Taken's own drop.
    }
}

/// A Python object's memory as the bytes of a [`HostBuffer`].
struct PyBacking {
    ptr: *const u8,
    len: usize,
    owner: Option<Owner>,
}

// SAFETY: the bytes are plain memory kept valid by `owner` for this value's
// life; the engine only reads them. Writes the Python program makes to the
// object meanwhile are its own race, as with any zero-copy send.
unsafe impl Send for PyBacking {}
// SAFETY: as above.
unsafe impl Sync for PyBacking {}

impl Backing for PyBacking {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` lies inside the object's memory (checked
        // against its shape and strides when made), non-null for `len > 0`
        // (an empty view uses a dangling pointer), and `owner` keeps it
        // valid while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for PyBacking {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            release::drop_attached(owner);
        }
    }
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

/// The shape, strides (in elements, possibly negative) and first element
/// of a view of host memory, checked.
struct View {
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<isize>,
    first: *const u8,
}

impl View {
    /// A tensor over the view's memory, kept alive by `owner`; a view with
    /// negative strides is gathered into a new buffer instead (the engine's
    /// layouts step forward only).
    fn into_tensor(self, name: &str, owner: Owner) -> PyResult<Tensor> {
        let size = self.dtype.size_bytes();
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| Kind::Invalid.err(format!("tensor `{name}`: its size overflows")))?;
        if numel == 0 {
            // Nothing to view: no memory is held.
            return Tensor::zeros(self.dtype, &self.shape).py();
        }
        if self.first.is_null() {
            return Err(Kind::Invalid.err(format!(
                "tensor `{name}`: the object gave a null data pointer for {numel} elements"
            )));
        }
        if self.strides.iter().any(|&s| s < 0) {
            let mut out = HostBufferMut::zeroed(numel * size);
            gather(
                self.first,
                &self.shape,
                &self.strides,
                size,
                out.as_mut_slice(),
            );
            drop(owner); // the GIL is held here
            return Tensor::from_host(self.dtype, &self.shape, out.freeze()).py();
        }
        let strides: Vec<usize> = self.strides.iter().map(|&s| s as usize).collect();
        let layout = Layout::new(&self.shape, &strides, 0)
            .map_err(|e| Kind::Invalid.err(format!("tensor `{name}`: {e}")))?;
        let reach = layout
            .required_elems()
            .ok()
            .and_then(|n| n.checked_mul(size))
            .ok_or_else(|| Kind::Invalid.err(format!("tensor `{name}`: its reach overflows")))?;
        let buffer = HostBuffer::from_backing(PyBacking {
            ptr: self.first,
            len: reach,
            owner: Some(owner),
        });
        if layout.is_contiguous() {
            return Tensor::from_host(self.dtype, &self.shape, buffer).py();
        }
        Tensor::from_host_strided(self.dtype, layout, buffer).py()
    }
}

/// Copies the elements of a view with any strides into `out`, row-major.
fn gather(first: *const u8, shape: &[usize], strides: &[isize], size: usize, out: &mut [u8]) {
    let mut index = vec![0usize; shape.len()];
    let mut offset: isize = 0;
    for chunk in out.chunks_exact_mut(size) {
        // SAFETY: `offset` is the byte offset of an element of the view,
        // whose every element the owner keeps valid (checked by the exporter,
        // which reported the shape and strides).
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
    let t = if obj.hasattr("__dlpack__")? {
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

/// For a NumPy array of an ml_dtypes type, its dtype and a view of its bits
/// as unsigned integers.
fn ml_dtypes_view<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<(DType, Bound<'py, PyAny>)>> {
    let ty = obj.get_type();
    if !ty.module().is_ok_and(|m| m == "numpy") {
        return Ok(None);
    }
    let Ok(dtype) = obj.getattr("dtype") else {
        return Ok(None);
    };
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

/// Through `__dlpack__`: host memory only.
fn from_dlpack(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Tensor> {
    let py = obj.py();
    if obj.hasattr("__dlpack_device__")? {
        let (kind, id): (i32, i32) = obj.call_method0("__dlpack_device__")?.extract()?;
        if !matches!(kind, dlpack::CPU | dlpack::CUDA_HOST | dlpack::CUDA_MANAGED) {
            let place = if kind == dlpack::CUDA {
                format!("cuda:{id}")
            } else {
                format!("DLPack device type {kind}, index {id}")
            };
            return Err(Kind::Device.err(format!(
                "tensor `{name}` is on {place}; this build of the Python package sends host memory only: move it to the host first (e.g. `.cpu()`)"
            )));
        }
    }
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("max_version", PyTuple::new(py, [1, 0])?)?;
    let capsule = match obj.call_method("__dlpack__", (), Some(&kwargs)) {
        Ok(c) => c,
        // A producer older than DLPack 1.0 takes no max_version.
        Err(e) if e.is_instance_of::<PyTypeError>(py) => obj.call_method0("__dlpack__")?,
        Err(e) => return Err(e),
    };
    let taken = Taken::from_capsule(&capsule)?;
    let t = taken.tensor();
    if t.dtype.lanes != 1 {
        return Err(Kind::Invalid.err(format!(
            "tensor `{name}`: vector elements ({} lanes) are not carried",
            t.dtype.lanes
        )));
    }
    let dtype = DType::from_dlpack(t.dtype.code, t.dtype.bits).ok_or_else(|| {
        Kind::Invalid.err(format!(
            "tensor `{name}`: DLPack type code {} of {} bits is not carried; tensorferry carries {}",
            t.dtype.code,
            t.dtype.bits,
            DType::ACCEPTED
        ))
    })?;
    let ndim = usize::try_from(t.ndim)
        .map_err(|_| Kind::Invalid.err(format!("tensor `{name}`: ndim {}", t.ndim)))?;
    let shape_raw: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: DLPack gives `ndim` sizes at `shape`, valid while the
        // managed tensor lives; `taken` owns it until the end of this call.
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let shape = shape_raw
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Kind::Invalid.err(format!("tensor `{name}`: shape {shape_raw:?}")))?;
    let strides: Vec<isize> = if t.strides.is_null() || ndim == 0 {
        contiguous(&shape)
    } else {
        // SAFETY: a non-null `strides` holds `ndim` entries, valid as `shape` is.
        let s = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        s.iter()
            .map(|&x| isize::try_from(x))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Kind::Invalid.err(format!("tensor `{name}`: strides {s:?}")))?
    };
    let first = (t.data as *const u8).wrapping_add(t.byte_offset as usize);
    View {
        dtype,
        shape,
        strides,
        first,
    }
    .into_tensor(name, Owner::DlPack(taken))
}

fn contiguous(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![1isize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1].saturating_mul(shape[d + 1].max(1) as isize);
    }
    strides
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
    let (shape, strides) = if ndim == 0 {
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
        let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
        let mut elems = Vec::with_capacity(ndim);
        for &s in strides {
            if s % itemsize as isize != 0 {
                return Err(Kind::Invalid.err(format!(
                    "tensor `{name}`: a stride of {s} bytes is not a whole number of {itemsize}-byte elements; copy it first"
                )));
            }
            elems.push(s / itemsize as isize);
        }
        (shape, elems)
    };
    if !v.suboffsets.is_null() {
        return Err(Kind::Invalid.err(format!(
            "tensor `{name}`: indirect buffers (suboffsets) are not carried"
        )));
    }
    let first = v.buf as *const u8;
    View {
        dtype,
        shape,
        strides,
        first,
    }
    .into_tensor(name, owner)
}
