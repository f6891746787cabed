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
///   marked read-only), on the host or on ``cuda:N``; consumers that only
///   know the older unversioned form, which cannot say read-only, get a copy;
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

    /// The address of the first element: in host memory, or in the device
    /// memory of a tensor on ``cuda:N`` (as ``torch.Tensor.data_ptr()``
    /// reports it). Equal to the address a zero-copy view reports.
    ///
    /// Raises:
    ///     DeviceError: the tensor is on a wgpu adapter.
    #[getter]
    fn data_ptr(&self) -> PyResult<usize> {
        self.tensor
            .data_address()
            .map_err(|e| Kind::Device.err(e.to_string()))
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

    /// ``(device_type, device_id)`` for DLPack: ``(1, 0)`` on the host,
    /// ``(2, N)`` on ``cuda:N``.
    fn __dlpack_device__(&self) -> PyResult<(i32, i32)> {
        let d = dlpack::DlDevice::of(self.tensor.device()).ok_or_else(|| {
            Kind::Device.err(format!(
                "the tensor is on {}, which DLPack has no device type for: take it to the host first (to_host())",
                self.tensor.device()
            ))
        })?;
        Ok((d.device_type, d.device_id))
    }

    /// Exports the tensor as a DLPack capsule, viewing its bytes where they
    /// are: host memory, or the device memory of a tensor on ``cuda:N``
    /// (whose writes are done before it is exported, so any ``stream`` may
    /// read it).
    ///
    /// A consumer that passes ``max_version`` of 1.0 or later gets a
    /// versioned tensor flagged read-only. The older unversioned form cannot
    /// say read-only, so its consumers get a copy they may write.
    /// ``copy=True`` exports a fresh, writable copy; ``dl_device=(1, 0)``
    /// of a device tensor exports a copy on the host (unless ``copy=False``).
    ///
    /// Raises:
    ///     BufferError: a device the tensor cannot be exported to, or
    ///         ``copy=False`` when a copy is needed.
    ///     DeviceError: the tensor is on a wgpu adapter (use to_host()).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // Device memory is exported after its writes are done: no stream
        // of the consumer's needs to wait for anything.
        let _ = stream;
        let here = self.__dlpack_device__()?;
        let versioned = matches!(max_version, Some((major, _)) if major >= 1);
        let to_host = match dl_device {
            Some(want) if want == here => false,
            Some(want) if want == (dlpack::CPU, 0) && copy != Some(false) => true,
            Some(want) => {
                return Err(PyBufferError::new_err(format!(
                    "the tensor is on {} and is exported there, or to the host as a copy (asked for DLPack device {want:?}{})",
                    self.tensor.device(),
                    if copy == Some(false) { " with copy=False" } else { "" }
                )))
            }
            None => false,
        };
        // A copy for those who asked, for a host copy of a device tensor,
        // and for consumers that could not be told the view is read-only.
        let copied = copy == Some(true) || to_host || (!versioned && copy != Some(false));
        if !versioned && copy == Some(false) {
            return Err(PyBufferError::new_err(
                "the unversioned DLPack form cannot mark a view read-only, so it exports copies only: pass max_version=(1, 0) for a view",
            ));
        }
        let tensor = if copied {
            let t = self.tensor.clone();
            py.detach(move || -> tensorferry_engine::Result<Tensor> {
                let on = if to_host { t.to_host()? } else { t };
                let on_host = on.device() == Device::Cpu;
                if on_host {
                    let packed = on.packed()?;
                    Tensor::from_host(
                        on.dtype(),
                        on.shape(),
                        HostBuffer::copy_from(packed.as_slice()),
                    )
                } else {
                    // A copy on the same device, packed.
                    let rt = tensorferry_kernels::runtime::Runtime::open(on.device())?;
                    Tensor::from_device(on.dtype(), on.shape(), on.to_buffer_on(&rt)?)
                }
            })
            .py()?
        } else {
            self.tensor.clone()
        };
        if versioned {
            let flags = if copied {
                dlpack::FLAG_IS_COPIED
            } else {
                dlpack::FLAG_READ_ONLY
            };
            let managed = tensor.to_dlpack(flags).py()?;
            // SAFETY: a ManagedVersioned with its deleter, named VERSIONED.
            unsafe { dlpack::into_capsule(py, managed.as_ptr().cast(), dlpack::VERSIONED) }
        } else {
            let managed = tensor.to_dlpack_legacy().py()?;
            // SAFETY: a Managed with its deleter, named LEGACY.
            unsafe { dlpack::into_capsule(py, managed.as_ptr().cast(), dlpack::LEGACY) }
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
