//! [`AlignedBuffer`]: host bytes on a 64-byte boundary.

use std::fmt;

/// The alignment of an [`AlignedBuffer`]: a cache line, and enough for every dtype.
pub const HOST_ALIGN: usize = 64;

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; HOST_ALIGN]);

/// Owned host bytes that start on a [`HOST_ALIGN`]-byte boundary, so any
/// dtype can be viewed in place and vector loads never split a cache line.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::cpu::AlignedBuffer;
///
/// let mut b = AlignedBuffer::zeroed(10);
/// b.as_mut_slice()[9] = 7;
/// assert_eq!(b.len(), 10);
/// assert_eq!(b.as_slice().as_ptr() as usize % 64, 0);
/// let f: &[f32] = bytemuck::cast_slice(&b.as_slice()[..8]);
/// assert_eq!(f, [0.0, 0.0]);
/// ```
#[derive(Clone, Default)]
pub struct AlignedBuffer {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuffer {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; HOST_ALIGN]); len.div_ceil(HOST_ALIGN)],
            len,
        }
    }

    /// An aligned copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuffer({} bytes)", self.len)
    }
}

impl AsRef<[u8]> for AlignedBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for AlignedBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}
