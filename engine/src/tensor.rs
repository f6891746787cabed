//! [`Tensor`]: dtype, shape, strides, device and storage.

use std::fmt;
use std::sync::Arc;

use tensorferry_device_map::Device;
// Re-exported for the wire format, which names the type of a device
// payload but opens no device.
pub(crate) use tensorferry_kernels::runtime::DeviceBuffer;
use tensorferry_kernels::runtime::Runtime;
use tensorferry_kernels::{cpu, element_count, DType, Element, Layout};

use crate::buffer::{HostBuffer, HostBufferMut};
use crate::error::{Error, Result};

/// Where a tensor's bytes are.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Storage {
    /// Host memory: owned, a view into a received frame, or a mapped file or segment.
    Host(HostBuffer),
    /// Memory of a CUDA device or a wgpu adapter, shared by the tensor's clones.
    Device(Arc<DeviceBuffer>),
}

/// A typed, shaped view of storage.
///
/// A tensor may be a strided view (a slice, a transpose) of a larger storage;
/// such a view is first-class, and sending it sends exactly its visible
/// elements, packed. Cloning shares the storage.
///
/// # Examples
///
/// ```
/// use tensorferry_engine::Tensor;
///
/// let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3])?;
/// assert_eq!(t.as_slice::<f32>()?, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// let col = t.narrow(1, 1, 2)?; // the middle column: a strided view
/// assert!(!col.is_contiguous());
/// assert_eq!(col.to_contiguous()?.as_slice::<f32>()?, &[2.0, 5.0]);
/// assert!(t.as_slice::<f64>().is_err()); // wrong dtype
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    layout: Layout,
    device: Device,
    storage: Storage,
}

impl Tensor {
    /// A contiguous host tensor copied from `data`.
    ///
    /// # Errors
    ///
    /// When `shape` does not hold exactly `data.len()` elements.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Self> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        Self::from_host(T::DTYPE, shape, HostBuffer::copy_from(bytes))
    }

    /// A contiguous host tensor of zeros.
    ///
    /// # Errors
    ///
    /// When the byte size of `shape` overflows.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Self> {
        let bytes = packed_bytes(dtype, shape)?;
        Self::from_host(dtype, shape, HostBufferMut::zeroed(bytes).freeze())
    }

    /// A contiguous host tensor over `buffer`, which must hold exactly its bytes.
    ///
    /// # Errors
    ///
    /// When the buffer length is not `dtype size × element count`.
    pub fn from_host(dtype: DType, shape: &[usize], buffer: HostBuffer) -> Result<Self> {
        let bytes = packed_bytes(dtype, shape)?;
        if buffer.len() != bytes {
            return Err(Error::Invalid(format!(
                "a {dtype} tensor of shape {shape:?} needs {bytes} bytes, the buffer has {}",
                buffer.len()
            )));
        }
        Ok(Self {
            dtype,
            layout: Layout::contiguous(shape),
            device: Device::Cpu,
            storage: Storage::Host(buffer),
        })
    }

    /// A strided view of host `buffer`.
    ///
    /// # Errors
    ///
    /// When the view reaches past the buffer or its sizes overflow.
    pub fn from_host_strided(dtype: DType, layout: Layout, buffer: HostBuffer) -> Result<Self> {
        check_reach(dtype, &layout, buffer.len(), "the")?;
        Ok(Self {
            dtype,
            layout,
            device: Device::Cpu,
            storage: Storage::Host(buffer),
        })
    }

    /// A contiguous tensor over `buffer` on whichever device holds it (a
    /// host buffer gives a host tensor); the buffer must hold exactly its bytes.
    ///
    /// # Errors
    ///
    /// When the buffer length is not `dtype size × element count`.
    pub fn from_device(dtype: DType, shape: &[usize], buffer: DeviceBuffer) -> Result<Self> {
        let bytes = packed_bytes(dtype, shape)?;
        if buffer.len() != bytes {
            return Err(Error::Invalid(format!(
                "a {dtype} tensor of shape {shape:?} needs {bytes} bytes, the {} buffer has {}",
                buffer.device(),
                buffer.len()
            )));
        }
        if let DeviceBuffer::Host(host) = buffer {
            return Self::from_host(dtype, shape, HostBuffer::from_backing(host));
        }
        Ok(Self {
            dtype,
            layout: Layout::contiguous(shape),
            device: buffer.device(),
            storage: Storage::Device(Arc::new(buffer)),
        })
    }

    /// A strided view of `buffer` on whichever device holds it (a host
    /// buffer gives a host tensor).
    ///
    /// # Errors
    ///
    /// When the view reaches past the buffer or its sizes overflow.
    pub fn from_device_strided(dtype: DType, layout: Layout, buffer: DeviceBuffer) -> Result<Self> {
        if let DeviceBuffer::Host(host) = buffer {
            return Self::from_host_strided(dtype, layout, HostBuffer::from_backing(host));
        }
        check_reach(
            dtype,
            &layout,
            buffer.len(),
            &format!("the {}", buffer.device()),
        )?;
        Ok(Self {
            dtype,
            layout,
            device: buffer.device(),
            storage: Storage::Device(Arc::new(buffer)),
        })
    }

    /// The device buffer behind a device tensor (`None` on the host).
    pub fn device_buffer(&self) -> Option<&Arc<DeviceBuffer>> {
        match &self.storage {
            Storage::Host(_) => None,
            Storage::Device(b) => Some(b),
        }
    }

    /// The visible elements, packed, in a new buffer on `rt`'s device: a
    /// copy across devices (through pinned chunks for CUDA, staging buffers
    /// for wgpu) or, on the same device, a device-side copy or pack.
    ///
    /// # Errors
    ///
    /// A runtime's allocation, copy or pack error.
    pub fn to_buffer_on(&self, rt: &Runtime) -> Result<DeviceBuffer> {
        match &self.storage {
            Storage::Host(_) => {
                let packed = self.packed()?;
                Ok(rt.upload(packed.as_slice())?)
            }
            Storage::Device(src) => {
                let mut out = rt.alloc(self.size_bytes())?;
                if self.is_contiguous() && self.layout.offset() == 0 && src.len() == out.len() {
                    out.copy_from(src)?;
                } else {
                    let owner = Runtime::open(src.device())?;
                    let mut packed = owner.alloc(self.size_bytes())?;
                    owner.pack(src, self.dtype.size_bytes(), &self.layout, &mut packed)?;
                    out.copy_from(&packed)?;
                }
                Ok(out)
            }
        }
    }

    /// This tensor on `rt`'s device: itself (shared, no copy) when it is
    /// already there and contiguous, a packed copy otherwise.
    ///
    /// # Errors
    ///
    /// As [`to_buffer_on`](Self::to_buffer_on).
    pub fn to_runtime(&self, rt: &Runtime) -> Result<Tensor> {
        let here = self.device == rt.device();
        let whole = match &self.storage {
            Storage::Host(_) => true,
            Storage::Device(b) => b.len() == self.size_bytes(),
        };
        // Shared only when the tensor is its whole buffer: device kernels
        // (cast, checksum) and the wire take buffers whole.
        if here && whole && self.is_contiguous() && self.layout.offset() == 0 {
            return Ok(self.clone());
        }
        if rt.device() == Device::Cpu {
            return self.to_host();
        }
        Tensor::from_device(self.dtype, self.shape(), self.to_buffer_on(rt)?)
    }

    /// This tensor on the host: itself when it is there, a packed copy read
    /// back from its device otherwise.
    ///
    /// # Errors
    ///
    /// A runtime's copy error.
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Host(_) => Ok(self.clone()),
            Storage::Device(buf) => {
                let rt = Runtime::open(self.device)?;
                let mut out = HostBufferMut::zeroed(self.size_bytes());
                if self.is_contiguous() && self.layout.offset() == 0 && buf.len() == out.len() {
                    // Read straight back: no copy on the device first.
                    rt.download(buf, out.as_mut_slice())?;
                } else {
                    rt.download(&self.to_buffer_on(&rt)?, out.as_mut_slice())?;
                }
                Tensor::from_host(self.dtype, self.shape(), out.freeze())
            }
        }
    }

    /// The checksum of the visible elements, packed (docs/wire-format.md):
    /// computed on the device that holds the tensor when it is a whole
    /// device buffer (only the sum comes back), on the host otherwise.
    ///
    /// # Errors
    ///
    /// A runtime's checksum or copy error.
    pub fn checksum(&self) -> Result<cpu::Checksum> {
        match &self.storage {
            Storage::Device(buf)
                if self.is_contiguous()
                    && self.layout.offset() == 0
                    && buf.len() == self.size_bytes() =>
            {
                Ok(Runtime::open(self.device)?.checksum(buf)?)
            }
            Storage::Device(_) => self.to_host()?.checksum(),
            Storage::Host(_) => Ok(cpu::checksum(self.packed()?.as_slice())),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dimensions.
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        self.layout.strides()
    }

    /// Shape, strides and offset.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The device that holds the storage.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }

    /// Bytes of the visible elements, packed: what goes on the wire.
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }

    /// True when the visible elements are contiguous row-major in storage.
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    fn host(&self) -> Result<&HostBuffer> {
        match &self.storage {
            Storage::Host(b) => Ok(b),
            Storage::Device(_) => Err(Error::NotOnHost {
                device: self.device,
            }),
        }
    }

    /// The bytes of a contiguous host tensor, exactly its elements.
    ///
    /// # Errors
    ///
    /// When the tensor is strided (use [`to_contiguous`](Self::to_contiguous)) or not on the host.
    pub fn contiguous_bytes(&self) -> Result<&[u8]> {
        if !self.is_contiguous() {
            return Err(Error::Invalid(
                "the tensor is a strided view; call to_contiguous() first".into(),
            ));
        }
        let host = self.host()?;
        let start = self.layout.offset() * self.dtype.size_bytes();
        Ok(&host.as_slice()[start..start + self.size_bytes()])
    }

    /// The visible elements as a contiguous host buffer: shared with the
    /// storage when already contiguous, packed into a new buffer otherwise.
    ///
    /// # Errors
    ///
    /// When the tensor is not on the host.
    pub fn packed(&self) -> Result<HostBuffer> {
        let host = self.host()?;
        if self.is_contiguous() {
            let start = self.layout.offset() * self.dtype.size_bytes();
            return Ok(host
                .slice(start..start + self.size_bytes())
                .expect("the view was checked against its storage"));
        }
        let mut out = HostBufferMut::zeroed(self.size_bytes());
        cpu::pack(
            host.as_slice(),
            self.dtype.size_bytes(),
            &self.layout,
            out.as_mut_slice(),
        )?;
        Ok(out.freeze())
    }

    /// A contiguous copy of a strided view, or the same tensor when already contiguous.
    ///
    /// # Errors
    ///
    /// When the tensor is not on the host.
    pub fn to_contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() && self.layout.offset() == 0 {
            return Ok(self.clone());
        }
        let packed = self.packed()?;
        let mut t = Tensor::from_host(self.dtype, self.shape(), packed)?;
        t.device = self.device;
        Ok(t)
    }

    /// The elements as `&[T]`.
    ///
    /// # Errors
    ///
    /// [`Error::DTypeMismatch`] when `T` is not the tensor's dtype; [`Error::Misaligned`]
    /// when the bytes are not aligned for `T`; an error for strided or device tensors.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::DTypeMismatch {
                actual: self.dtype,
                requested: T::DTYPE,
            });
        }
        let bytes = self.contiguous_bytes()?;
        bytemuck::try_cast_slice(bytes).map_err(|_| Error::Misaligned {
            dtype: self.dtype,
            misalignment: bytes.as_ptr() as usize % self.dtype.size_bytes(),
        })
    }

    /// A view with dimensions `a` and `b` swapped (no copy).
    ///
    /// # Errors
    ///
    /// When a dimension is out of range.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        Ok(Tensor {
            layout: self.layout.transposed(a, b)?,
            ..self.clone()
        })
    }

    /// A view of `start..end` along `dim` (no copy).
    ///
    /// # Errors
    ///
    /// When `dim` or the range is out of bounds.
    pub fn narrow(&self, dim: usize, start: usize, end: usize) -> Result<Tensor> {
        Ok(Tensor {
            layout: self.layout.narrowed(dim, start, end)?,
            ..self.clone()
        })
    }
}

/// Checks that a view of `layout` fits a buffer of `len` bytes (`whose`
/// names the buffer in the error: "the", "the cuda:0").
fn check_reach(dtype: DType, layout: &Layout, len: usize, whose: &str) -> Result<()> {
    let reach = layout
        .required_elems()?
        .checked_mul(dtype.size_bytes())
        .ok_or_else(|| Error::Invalid("the view's byte reach overflows".into()))?;
    if reach > len {
        return Err(Error::Invalid(format!(
            "the view reaches byte {reach}, {whose} buffer has {len}"
        )));
    }
    Ok(())
}

/// Bytes of a contiguous `dtype` tensor of `shape`, checked for overflow.
///
/// # Errors
///
/// When the element count or byte size overflows.
pub fn packed_bytes(dtype: DType, shape: &[usize]) -> Result<usize> {
    element_count(shape)
        .and_then(|n| n.checked_mul(dtype.size_bytes()))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "a {dtype} tensor of shape {shape:?} overflows the address space"
            ))
        })
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({} {:?} on {}{})",
            self.dtype,
            self.shape(),
            self.device,
            if self.is_contiguous() {
                ""
            } else {
                ", strided"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_views_check_dtype_alignment_and_contiguity() {
        let t = Tensor::from_slice(&[1u16, 2, 3, 4], &[4]).expect("tensor");
        assert_eq!(t.as_slice::<u16>().expect("u16"), &[1, 2, 3, 4]);
        assert!(matches!(
            t.as_slice::<i16>(),
            Err(Error::DTypeMismatch { .. })
        ));
        // A u32 view starting at byte 2 of its storage is misaligned.
        let raw = HostBuffer::copy_from(&[0u8; 10]);
        let odd = raw.slice(2..10).expect("range");
        let t = Tensor::from_host(DType::U32, &[2], odd).expect("tensor");
        assert!(matches!(t.as_slice::<u32>(), Err(Error::Misaligned { .. })));
        let t = Tensor::from_slice(&[1f32, 2.0, 3.0, 4.0], &[2, 2]).expect("tensor");
        assert!(t.transpose(0, 1).expect("t").as_slice::<f32>().is_err());
    }

    #[test]
    fn strided_views_pack_only_their_elements() {
        let data: Vec<i32> = (0..24).collect();
        let t = Tensor::from_slice(&data, &[2, 3, 4]).expect("tensor");
        let v = t
            .narrow(2, 1, 3)
            .expect("narrow")
            .transpose(0, 1)
            .expect("t");
        assert_eq!(v.shape(), &[3, 2, 2]);
        assert_eq!(v.size_bytes(), 12 * 4);
        let packed = v.to_contiguous().expect("pack");
        assert_eq!(
            packed.as_slice::<i32>().expect("i32"),
            &[1, 2, 13, 14, 5, 6, 17, 18, 9, 10, 21, 22]
        );
        let row = t.narrow(0, 1, 2).expect("narrow");
        assert!(row.is_contiguous());
        assert_eq!(
            row.packed().expect("view").len(),
            48,
            "a contiguous view shares, not copies, its bytes"
        );
    }

    #[test]
    fn constructors_reject_mismatched_sizes() {
        assert!(Tensor::from_slice(&[1f32, 2.0], &[3]).is_err());
        assert!(Tensor::zeros(DType::F64, &[usize::MAX, 2]).is_err());
        let buf = HostBuffer::copy_from(&[0u8; 8]);
        let layout = Layout::new(&[3], &[2], 0).expect("layout");
        assert!(Tensor::from_host_strided(DType::U16, layout, buf).is_err());
    }
}
