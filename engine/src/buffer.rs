//! [`HostBuffer`]: aligned, reference-counted host bytes that may be owned, a
//! view into a received frame, or a mapped file.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use tensorferry_kernels::cpu::{AlignedBuffer, HOST_ALIGN};

/// The alignment of every buffer this crate allocates, and of every tensor
/// payload in a frame.
pub const ALIGN: usize = HOST_ALIGN;

/// Where a [`HostBuffer`]'s bytes live. Implement it to wrap memory the engine
/// does not own (a mapped segment, a foreign allocation, an array of another
/// runtime): the engine reads the bytes in place — a tensor over them is
/// sent without a copy — and keeps the backing alive until the last view
/// of it is dropped.
///
/// That last drop happens on whichever thread lets go last: the caller's, an
/// I/O thread once a frame carrying the bytes has been written, a service
/// worker, or a consumer the tensor was handed to. Such a thread may hold
/// engine locks, so a backing's `Drop` must not wait for anything another
/// thread holds while it calls into the engine (an interpreter lock, say:
/// hand the release to a thread of your own instead).
///
/// # Examples
///
/// A tensor over memory owned elsewhere, kept alive by the tensor:
///
/// ```
/// use std::sync::Arc;
/// use tensorferry_engine::{Backing, DType, HostBuffer, Tensor};
///
/// /// Memory some other library allocated, with what keeps it alive.
/// struct Foreign {
///     owner: Arc<Vec<f32>>,
/// }
///
/// impl Backing for Foreign {
///     fn bytes(&self) -> &[u8] {
///         bytemuck::cast_slice(self.owner.as_slice())
///     }
/// }
///
/// let owner = Arc::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// let buffer = HostBuffer::from_backing(Foreign { owner: Arc::clone(&owner) });
/// let t = Tensor::from_host(DType::F32, &[2, 3], buffer)?;
/// assert_eq!(t.as_slice::<f32>()?.as_ptr(), owner.as_ptr()); // no copy
/// drop(owner);
/// assert_eq!(t.as_slice::<f32>()?[5], 6.0); // the tensor keeps it alive
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
pub trait Backing: Send + Sync + 'static {
    /// The bytes.
    fn bytes(&self) -> &[u8];
}

impl Backing for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl Backing for AlignedBuffer {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Backing for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Immutable host bytes behind a reference count: cloning and slicing never copy.
///
/// # Examples
///
/// ```
/// use tensorferry_engine::{HostBuffer, HostBufferMut};
///
/// let mut b = HostBufferMut::zeroed(8);
/// b.as_mut_slice().copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
/// let b: HostBuffer = b.freeze();
/// let tail = b.slice(4..8).expect("in range");
/// assert_eq!(tail.as_slice(), &[5, 6, 7, 8]);
/// ```
#[derive(Clone)]
pub struct HostBuffer {
    backing: Arc<dyn Backing>,
    start: usize,
    len: usize,
}

impl HostBuffer {
    /// Wraps a backing store whole.
    pub fn from_backing(backing: impl Backing) -> Self {
        let len = backing.bytes().len();
        Self {
            backing: Arc::new(backing),
            start: 0,
            len,
        }
    }

    /// An aligned copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut b = HostBufferMut::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b.freeze()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.backing.bytes()[self.start..self.start + self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A view of `range` of these bytes, sharing the storage; `None` when out of range.
    pub fn slice(&self, range: Range<usize>) -> Option<HostBuffer> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        Some(HostBuffer {
            backing: Arc::clone(&self.backing),
            start: self.start + range.start,
            len: range.end - range.start,
        })
    }
}

impl fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostBuffer({} bytes)", self.len)
    }
}

impl AsRef<[u8]> for HostBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Owned, writable, 64-byte-aligned host bytes; [`freeze`](HostBufferMut::freeze) makes them shareable.
pub struct HostBufferMut {
    pub(crate) buf: AlignedBuffer,
}

impl HostBufferMut {
    /// `len` zero bytes, 64-byte aligned. Large buffers come from the allocator
    /// zeroed, so untouched pages cost nothing until written.
    pub fn zeroed(len: usize) -> Self {
        Self {
            buf: AlignedBuffer::zeroed(len),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.buf.as_slice()
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf.as_mut_slice()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Makes the bytes immutable and shareable, without copying.
    pub fn freeze(self) -> HostBuffer {
        HostBuffer::from_backing(self.buf)
    }
}

impl fmt::Debug for HostBufferMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostBufferMut({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_buffers_are_aligned_and_slices_share_storage() {
        for len in [0, 1, 63, 64, 65, 4096 + 3] {
            let mut b = HostBufferMut::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
            b.as_mut_slice()
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = i as u8);
            let frozen = b.freeze();
            assert_eq!(frozen.len(), len);
            if len > 2 {
                let s = frozen.slice(1..3).expect("in range");
                assert_eq!(s.as_slice(), &[1, 2]);
                assert_eq!(s.as_slice().as_ptr(), frozen.as_slice()[1..].as_ptr());
            }
            assert!(frozen.slice(0..len + 1).is_none());
        }
    }
}
