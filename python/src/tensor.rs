//! [`PyTensor`] (`tensorferry.Tensor`): a tensor as Python sees it, its
//! bytes viewed — never copied — through DLPack and the buffer protocol.

use std::ffi::{c_int, c_void, CStr};

use pyo3::exceptions::{PyBufferError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tensorferry_device_map::Device;
use tensorferry_engine::{HostBuffer, Storage, Tensor};
use tensorferry_kernels::DType;

use crate::dlpack;
use crate::errors::{IntoPy, Kind};

/// A tensor: dtype, shape, strides and bytes on a device (received in a
/// message, or made from an object with :func:`tensorferry.tensor`).
///
/// It is read-only and holds its bytes — for a received tensor, the frame
/// it arrived in — for as long as it or any view of it lives. Hand it to
/// another library without copying:
///
/// * ``np.from_dlpack(t)``, ``torch.from_dlpack(t)``: DLPack 1.0 (versioned,
///   marked read-only) for consumers that ask for it, the older unversioned
///   form for the others;
/// * ``np.asarray(t)``, ``memoryview(t)``: the buffer protocol, read-only.
///
/// bf16 and fp8 have no buffer-protocol format: use DLPack (PyTorch reads
/// them), or ``t.view("u16")`` / ``t.view("u8")`` to see their bits.
#[pyclass(module = "tensorferry", name = "Tensor", frozen)]
pub struct PyTensor {
    tensor: Tensor,
}

impl PyTensor {
    /// Wraps an engine tensor.
    pub fn new(tensor: Tensor) -> Self {
        Self { tensor }
    }

    /// The engine tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The host bytes and the byte offset of the first element.
    fn host(&self) -> PyResult<(&HostBuffer, usize)> {
        match self.tensor.storage() {
            Storage::Host(b) => Ok((
                b,
                self.tensor.layout().offset() * self.tensor.dtype().size_bytes(),
            )),
            _ => Err(Kind::Device.err(format!(
                "the tensor is on {}; copy it to the host first with to_host()",
                self.tensor.device()
            ))),
        }
    }

    /// Address of the first element.
    fn first_ptr(&self) -> PyResult<*const u8> {
        let (host, offset) = self.host()?;
        Ok(host.as_slice().as_ptr().wrapping_add(offset))
    }
}

/// `t` with its elements read as `dtype`, which must be of the same size.
pub fn reinterpret(t: &Tensor, dtype: DType, name: &str) -> PyResult<Tensor> {
    if dtype.size_bytes() != t.dtype().size_bytes() {
        return Err(PyValueError::new_err(format!(
            "tensor `{name}`: {} elements cannot be read as {dtype}: the sizes differ ({} and {} bytes)",
            t.dtype(),
            t.dtype().size_bytes(),
            dtype.size_bytes()
        )));
    }
    match t.storage() {
        Storage::Host(b) => Tensor::from_host_strided(dtype, t.layout().clone(), b.clone()).py(),
        _ => Err(Kind::Device.err(format!(
            "tensor `{name}` is on {}; only host tensors can be reinterpreted",
            t.device()
        ))),
    }
}

/// Parses a dtype name (`f32`, `float32`, `bfloat16`, `torch.float16`, …).
pub fn parse_dtype(text: &str) -> PyResult<DType> {
    text.parse::<DType>()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The buffer-protocol format of a dtype, if it has one.
fn format_of(dtype: DType) -> Option<&'static CStr> {
    Some(match dtype {
        DType::Bool => c"?",
        DType::U8 => c"B",
        DType::U16 => c"H",
        DType::U32 => c"I",
        DType::U64 => c"Q",
        DType::I8 => c"b",
        DType::I16 => c"h",
        DType::I32 => c"i",
        DType::I64 => c"q",
        DType::F16 => c"e",
        DType::F32 => c"f",
        DType::F64 => c"d",
        _ => return None,
    })
}

/// What a DLPack export owns: the tensor (its storage) and the arrays the
/// DLTensor points into.
struct Export {
    _tensor: Tensor,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

unsafe extern "C" fn delete_versioned(m: *mut dlpack::ManagedVersioned) {
    // SAFETY: `m` and its context were made by `Box::into_raw` in
    // `__dlpack__`, and DLPack calls the deleter once.
    unsafe {
        let m = Box::from_raw(m);
        drop(Box::from_raw(m.manager_ctx.cast::<Export>()));
    }
}

unsafe extern "C" fn delete_legacy(m: *mut dlpack::Managed) {
    // SAFETY: as in `delete_versioned`.
    unsafe {
        let m = Box::from_raw(m);
        drop(Box::from_raw(m.manager_ctx.cast::<Export>()));
    }
}

/// Shape and strides kept for a buffer-protocol view, freed on release.
struct BufferDims {
    shape: Vec<ffi::Py_ssize_t>,
    strides: Vec<ffi::Py_ssize_t>,
}

#[pymethods]
impl PyTensor {
    /// The element type's short name: ``"f32"``, ``"bf16"``, ``"f8e4m3"``, ….
    #[getter]
    fn dtype(&self) -> &'static str {
        self.tensor.dtype().name()
    }

    /// The dimensions.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.tensor.shape())
    }

    /// The strides, in elements.
    #[getter]
    fn strides<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.tensor.strides())
    }

    /// Number of dimensions.
    #[getter]
    fn ndim(&self) -> usize {
        self.tensor.shape().len()
    }

    /// Bytes of the elements, packed.
    #[getter]
    fn nbytes(&self) -> usize {
        self.tensor.size_bytes()
    }

    /// The device that holds the bytes: ``"cpu"``, ``"cuda:0"``, ``"wgpu:0"``.
    #[getter]
    fn device(&self) -> String {
        self.tensor.device().to_string()
    }

    /// True when the elements are contiguous, row-major.
    #[getter]
    fn is_contiguous(&self) -> bool {
        self.tensor.is_contiguous()
    }

    /// Always True: received bytes are shared, and are never written.
    #[getter]
    fn readonly(&self) -> bool {
        true
    }

    /// The address of the first element (host tensors): equal to the
    /// address a zero-copy view reports.
    ///
    /// Raises:
    ///     DeviceError: the tensor is on a device.
    #[getter]
    fn data_ptr(&self) -> PyResult<usize> {
        Ok(self.first_ptr()? as usize)
    }

    /// The same bytes read as another dtype of the same size (no copy), e.g.
    /// ``t.view("u16")`` to see bf16 bits, or ``tf.tensor(a, "bf16")`` the other way.
    ///
    /// Raises:
    ///     ValueError: an unknown dtype, or one of another size.
    fn view(&self, dtype: &str) -> PyResult<Self> {
        Ok(Self::new(reinterpret(
            &self.tensor,
            parse_dtype(dtype)?,
            "view",
        )?))
    }

    /// The elements, packed row-major, as ``bytes`` (a copy).
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let t = self.tensor.to_host().py()?;
        let packed = t.packed().py()?;
        Ok(pyo3::types::PyBytes::new(py, packed.as_slice()))
    }

    /// A copy on the host of a tensor on a device (the same tensor when it
    /// is on the host already).
    fn to_host(&self, py: Python<'_>) -> PyResult<Self> {
        let t = self.tensor.clone();
        py.detach(move || t.to_host()).py().map(Self::new)
    }

    /// ``(device_type, device_id)`` for DLPack: ``(1, 0)`` on the host.
    fn __dlpack_device__(&self) -> (i32, i32) {
        match self.tensor.device() {
            Device::Cuda(i) => (dlpack::CUDA, i as i32),
            _ => (dlpack::CPU, 0),
        }
    }

    /// Exports the tensor as a DLPack capsule, viewing its bytes.
    ///
    /// A consumer that passes ``max_version`` of 1.0 or later gets a
    /// versioned tensor flagged read-only; others get the unversioned form
    /// (which cannot say read-only: do not write through it). ``copy=True``
    /// exports a fresh, writable copy.
    ///
    /// Raises:
    ///     BufferError: a device other than the tensor's was asked for.
    ///     DeviceError: the tensor is on a device (use to_host()).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = stream; // host memory: nothing to order against
        if let Some(want) = dl_device {
            if want != self.__dlpack_device__() {
                return Err(PyBufferError::new_err(format!(
                    "the tensor is on {} and is exported there only (asked for DLPack device {want:?})",
                    self.tensor.device()
                )));
            }
        }
        let copied = copy == Some(true);
        let tensor = if copied {
            let packed = self.tensor.to_host().py()?.packed().py()?;
            Tensor::from_host(
                self.tensor.dtype(),
                self.tensor.shape(),
                HostBuffer::copy_from(packed.as_slice()),
            )
            .py()?
        } else {
            self.tensor.clone()
        };
        let view = PyTensor::new(tensor);
        let data = view.first_ptr()? as *mut c_void;
        let (code, bits) = view.tensor.dtype().dlpack();
        let mut export = Box::new(Export {
            shape: view.tensor.shape().iter().map(|&d| d as i64).collect(),
            strides: view.tensor.strides().iter().map(|&s| s as i64).collect(),
            _tensor: view.tensor,
        });
        let dl_tensor = dlpack::DlTensor {
            data,
            device: dlpack::Device {
                device_type: dlpack::CPU,
                device_id: 0,
            },
            ndim: export.shape.len() as i32,
            dtype: dlpack::DataType {
                code,
                bits,
                lanes: 1,
            },
            shape: export.shape.as_mut_ptr(),
            strides: export.strides.as_mut_ptr(),
            byte_offset: 0,
        };
        let ctx = Box::into_raw(export).cast::<c_void>();
        match max_version {
            Some((major, minor)) if major >= 1 => {
                let flags = if copied {
                    dlpack::FLAG_IS_COPIED
                } else {
                    dlpack::FLAG_READ_ONLY
                };
                let managed = Box::new(dlpack::ManagedVersioned {
                    version: dlpack::Version {
                        major: 1,
                        minor: if major > 1 { 1 } else { minor.min(1) },
                    },
                    manager_ctx: ctx,
                    deleter: Some(delete_versioned),
                    flags,
                    dl_tensor,
                });
                // SAFETY: a ManagedVersioned with its deleter, named VERSIONED.
                unsafe {
                    dlpack::into_capsule(py, Box::into_raw(managed).cast(), dlpack::VERSIONED)
                }
            }
            _ => {
                let managed = Box::new(dlpack::Managed {
                    dl_tensor,
                    manager_ctx: ctx,
                    deleter: Some(delete_legacy),
                });
                // SAFETY: a Managed with its deleter, named LEGACY.
                unsafe { dlpack::into_capsule(py, Box::into_raw(managed).cast(), dlpack::LEGACY) }
            }
        }
    }

    /// The buffer protocol: a read-only view of the elements.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        if view.is_null() {
            return Err(PyBufferError::new_err("no buffer view to fill"));
        }
        if flags & ffi::PyBUF_WRITABLE != 0 {
            return Err(PyBufferError::new_err(
                "the tensor is read-only (its bytes are shared with the frame it arrived in); copy it to write",
            ));
        }
        let dtype = this.tensor.dtype();
        let format = format_of(dtype).ok_or_else(|| {
            PyBufferError::new_err(format!(
                "{dtype} has no buffer-protocol format: use DLPack (torch.from_dlpack) or view its bits with .view(\"u{}\")",
                dtype.bits()
            ))
        })?;
        let first = this.first_ptr()?;
        let size = dtype.size_bytes();
        let contiguous = this.tensor.is_contiguous();
        let wants_strides = flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES;
        let wants_nd = flags & ffi::PyBUF_ND == ffi::PyBUF_ND;
        let asks = |f: c_int| flags & f == f;
        let wants_contig = asks(ffi::PyBUF_C_CONTIGUOUS)
            || asks(ffi::PyBUF_F_CONTIGUOUS)
            || asks(ffi::PyBUF_ANY_CONTIGUOUS);
        let ndim = this.tensor.shape().len();
        if !contiguous && (!wants_strides || wants_contig) {
            return Err(PyBufferError::new_err(
                "the tensor is strided and the consumer asked for contiguous memory; use DLPack or tobytes()",
            ));
        }
        if flags & ffi::PyBUF_F_CONTIGUOUS == ffi::PyBUF_F_CONTIGUOUS
            && this.tensor.shape().iter().filter(|&&d| d > 1).count() > 1
        {
            return Err(PyBufferError::new_err(
                "the tensor is row-major, not Fortran-ordered",
            ));
        }
        let dims = Box::new(BufferDims {
            shape: this
                .tensor
                .shape()
                .iter()
                .map(|&d| d as ffi::Py_ssize_t)
                .collect(),
            strides: this
                .tensor
                .strides()
                .iter()
                .map(|&s| (s * size) as ffi::Py_ssize_t)
                .collect(),
        });
        let wants_format = flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT;
        let len = this.tensor.size_bytes();
        // SAFETY: `view` is the struct Python asked to fill; every pointer
        // stored lives until `__releasebuffer__` (the format is static, the
        // dims are boxed in `internal`, the bytes are held by `obj`).
        unsafe {
            let dims = Box::into_raw(dims);
            (*view).buf = first as *mut c_void;
            (*view).obj = slf.into_any().into_ptr();
            (*view).len = len as ffi::Py_ssize_t;
            (*view).readonly = 1;
            (*view).itemsize = if wants_format || wants_nd {
                size as ffi::Py_ssize_t
            } else {
                1
            };
            (*view).format = if wants_format {
                format.as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            if wants_nd {
                (*view).ndim = ndim as c_int;
                (*view).shape = (*dims).shape.as_mut_ptr();
                (*view).strides = if wants_strides {
                    (*dims).strides.as_mut_ptr()
                } else {
                    std::ptr::null_mut()
                };
            } else {
                (*view).ndim = 1;
                (*view).shape = std::ptr::null_mut();
                (*view).strides = std::ptr::null_mut();
            }
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = dims.cast();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, view: *mut ffi::Py_buffer) {
        // SAFETY: `internal` holds the dims boxed by `__getbuffer__`, freed once here.
        unsafe {
            let dims = (*view).internal.cast::<BufferDims>();
            if !dims.is_null() {
                drop(Box::from_raw(dims));
                (*view).internal = std::ptr::null_mut();
            }
        }
    }

    /// NumPy's last resort when the buffer protocol fails (bf16, fp8, a
    /// device tensor): explains why.
    #[pyo3(signature = (dtype=None, copy=None))]
    fn __array__(
        &self,
        dtype: Option<Bound<'_, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Py<PyAny>> {
        let _ = (dtype, copy);
        if self.tensor.device() != Device::Cpu {
            return Err(PyTypeError::new_err(format!(
                "the tensor is on {}; copy it to the host with to_host() first",
                self.tensor.device()
            )));
        }
        Err(PyTypeError::new_err(format!(
            "NumPy has no {} dtype: read it with torch.from_dlpack(t), or its bits with np.asarray(t.view(\"u{}\")) (and ml_dtypes' .view() on the result)",
            self.tensor.dtype(),
            self.tensor.dtype().bits()
        )))
    }

    fn __len__(&self) -> PyResult<usize> {
        self.tensor
            .shape()
            .first()
            .copied()
            .ok_or_else(|| PyTypeError::new_err("len() of a 0-d tensor"))
    }

    fn __repr__(&self) -> String {
        format!(
            "tensorferry.Tensor({}, shape={:?}, device={}{})",
            self.tensor.dtype(),
            self.tensor.shape(),
            self.tensor.device(),
            if self.tensor.is_contiguous() {
                ""
            } else {
                ", strided"
            }
        )
    }
}

/// A tensor viewing `obj`'s memory (anything with ``__dlpack__`` or the
/// buffer protocol), without copying; with ``dtype``, its elements read as
/// that dtype of the same size (e.g. a ``uint16`` array as ``"bf16"``).
///
/// Sending accepts such objects directly; this names the conversion, for a
/// dtype NumPy lacks or to check an object before sending.
///
/// Raises:
///     TypeError: ``obj`` is neither a tensor nor a buffer.
///     ValueError: an unknown dtype, or one of another size.
///     DeviceError: ``obj`` is in device memory.
#[pyfunction]
#[pyo3(signature = (obj, dtype=None))]
pub fn tensor(obj: &Bound<'_, PyAny>, dtype: Option<&str>) -> PyResult<PyTensor> {
    let reinterpret = dtype.map(parse_dtype).transpose()?;
    crate::input::tensor_from_py(obj, "tensor", reinterpret).map(PyTensor::new)
}
