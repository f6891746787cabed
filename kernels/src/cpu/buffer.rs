//! [`AlignedBuffer`]: host bytes on a 64-byte boundary.

use std::fmt;

use crate::error::{Error, Result};

/// The alignment of an [`AlignedBuffer`]: a cache line, and enough for every dtype.
pub const HOST_ALIGN: usize = 64;

#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; HOST_ALIGN]);

/// Bytes per page: [`AlignedBuffer::prefault`] touches one byte in each.
const PAGE: usize = 4096;

/// Owned host bytes that start on a [`HOST_ALIGN`]-byte boundary, so any
/// dtype can be viewed in place and vector loads never split a cache line.
///
/// The allocation (its [`capacity`](AlignedBuffer::capacity), a multiple of
/// [`HOST_ALIGN`]) may be longer than the bytes, so a buffer can be reused
/// for another length ([`AlignedBuffer::resize`]) without allocating: the
/// engine's receive buffers are these, pooled.
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
///
/// // Reused for 60 bytes: the allocation holds 64, and the bytes are kept.
/// b.resize(60)?;
/// assert_eq!((b.len(), b.capacity(), b.as_slice()[9]), (60, 64, 7));
/// assert!(b.resize(65).is_err(), "past the capacity");
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
#[derive(Default)]
pub struct AlignedBuffer {
    storage: Storage,
    len: usize,
}

/// Where the bytes are: small buffers on the heap; large ones in an
/// anonymous mapping, whose pages the system hands out zeroed as they are
/// first touched (the heap's zeroed allocation at this alignment writes
/// every byte, which would make the whole buffer resident at once).
enum Storage {
    Heap(Vec<Line>),
    Map(memmap2::MmapMut),
}

impl Default for Storage {
    fn default() -> Self {
        Storage::Heap(Vec::new())
    }
}

/// Buffers of at least this many bytes are mapped rather than allocated.
const MAP_BYTES: usize = 1 << 20;

/// Mapped buffers of at least this many bytes are offered huge pages.
const HUGE_BYTES: usize = 4 << 20;

impl Clone for AlignedBuffer {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len);
        copy.as_mut_slice().copy_from_slice(self.as_slice());
        copy
    }
}

impl AlignedBuffer {
    /// `len` zero bytes. The pages of a large buffer cost nothing until
    /// first touched.
    ///
    /// # Panics
    ///
    /// When the memory cannot be had (see [`try_zeroed`](Self::try_zeroed)
    /// for lengths that come from outside).
    pub fn zeroed(len: usize) -> Self {
        let b = Self::try_zeroed(len).unwrap_or_else(|e| panic!("{e}"));
        b.offer_huge_pages();
        b
    }

    /// `len` zero bytes, or an error when the memory cannot be had: for a
    /// length that comes from outside (a peer's frame), where running out
    /// must fail that frame and not abort the process. Like
    /// [`zeroed`](Self::zeroed), the pages of a large buffer cost nothing
    /// until first touched.
    ///
    /// # Errors
    ///
    /// [`Error::HostMemory`] when the memory cannot be had.
    pub fn try_zeroed(len: usize) -> Result<Self> {
        let lines = len.div_ceil(HOST_ALIGN);
        let refused = || Error::HostMemory { bytes: len };
        let storage = if lines * HOST_ALIGN >= MAP_BYTES {
            Storage::Map(memmap2::MmapMut::map_anon(lines * HOST_ALIGN).map_err(|_| refused())?)
        } else {
            let mut v: Vec<Line> = Vec::new();
            v.try_reserve_exact(lines).map_err(|_| refused())?;
            v.resize(lines, Line([0; HOST_ALIGN]));
            Storage::Heap(v)
        };
        Ok(Self { storage, len })
    }

    /// Offers a buffer of at least 4 MiB huge pages, where the system allows
    /// them (advice, not a demand: refused, the buffer works as it is):
    /// pages touched from now on come 2 MiB at a time, fewer faults and TLB
    /// misses while a stream fills it. [`zeroed`](Self::zeroed) does it;
    /// [`try_zeroed`](Self::try_zeroed) leaves it to the caller, whose length
    /// came from outside: a page is then 2 MiB resident for one byte
    /// written, so it waits until the whole length is trusted.
    pub fn offer_huge_pages(&self) {
        if let Storage::Map(map) = &self.storage {
            if map.len() >= HUGE_BYTES {
                let _ = map.advise(memmap2::Advice::HugePage);
            }
        }
    }

    /// An aligned copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    fn all(&self) -> &[u8] {
        match &self.storage {
            Storage::Heap(v) => bytemuck::cast_slice(v),
            Storage::Map(m) => m,
        }
    }

    fn all_mut(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Heap(v) => bytemuck::cast_slice_mut(v),
            Storage::Map(m) => m,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.all()[..self.len]
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.all_mut()[..len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes in the allocation: the length rounded up to [`HOST_ALIGN`], or
    /// more for a buffer made longer and resized down.
    pub fn capacity(&self) -> usize {
        self.all().len()
    }

    /// Makes the buffer `len` bytes long within its capacity, without
    /// allocating: bytes up to the shorter length are kept, and bytes past
    /// the old length hold whatever the allocation held there (zero, unless
    /// the buffer was longer before).
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] when `len` exceeds the capacity (the buffer is
    /// left as it was).
    pub fn resize(&mut self, len: usize) -> Result<()> {
        if len > self.capacity() {
            return Err(Error::SizeMismatch {
                op: "resize",
                what: "aligned buffer's allocation",
                expected: len,
                actual: self.capacity(),
            });
        }
        self.len = len;
        Ok(())
    }

    /// Touches every page of the allocation now, keeping the bytes, so the
    /// page faults happen here, once, and not while the buffer is first
    /// written (a frame streaming in, where each fault stalls the copy).
    pub fn prefault(&mut self) {
        for byte in self.all_mut().iter_mut().step_by(PAGE) {
            // A store the compiler cannot drop as a no-op: the value is
            // opaque to it, so the page is written and made resident.
            *byte = std::hint::black_box(*byte);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_resize_within_their_capacity() {
        for len in [0, 1, 63, 64, 65, 3 * PAGE + 5] {
            let mut b = AlignedBuffer::zeroed(len);
            assert_eq!(b.as_slice().as_ptr() as usize % HOST_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            assert_eq!(b.capacity(), len.div_ceil(HOST_ALIGN) * HOST_ALIGN);
            b.as_mut_slice()
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = i as u8);
            b.prefault();
            assert!(b.as_slice().iter().enumerate().all(|(i, &x)| x == i as u8));
            let cap = b.capacity();
            b.resize(len / 2).expect("shorter");
            assert_eq!((b.len(), b.capacity()), (len / 2, cap));
            b.resize(cap).expect("up to the capacity");
            assert!(b.as_slice()[..len]
                .iter()
                .enumerate()
                .all(|(i, &x)| x == i as u8));
            assert!(b.as_slice()[len..].iter().all(|&x| x == 0));
            let err = b.resize(cap + 1).expect_err("past the capacity");
            assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
            assert_eq!(b.len(), cap, "left as it was");
        }
    }
}
