//! [`BufferPool`]: reusable, prefaulted, 64-byte-aligned receive buffers.
//!
//! Writing into fresh pages costs a page fault per 4 KiB (on a machine where a
//! memcpy runs at 10 GB/s, filling fresh pages runs near 2 GB/s), so frames are
//! read into buffers that come back to the pool when the last tensor viewing
//! them is dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tensorferry_kernels::cpu::AlignedBuffer;

use crate::buffer::{Backing, HostBuffer, HostBufferMut, ALIGN};

/// A pool of receive buffers, shared by the connections of a node.
#[derive(Clone, Debug)]
pub struct BufferPool {
    inner: Arc<Inner>,
}

struct Inner {
    /// Free buffers by capacity in bytes.
    free: Mutex<BTreeMap<usize, Vec<AlignedBuffer>>>,
    /// Most bytes kept idle in the pool.
    max_idle_bytes: usize,
}

/// Capacity class for `len` bytes, in bytes: powers of two of [`ALIGN`]-byte
/// blocks up to 1 MiB, then whole MiB, so repeated messages of one size
/// always reuse one buffer.
fn class(len: usize) -> usize {
    let blocks = len.div_ceil(ALIGN).max(1);
    let mib = (1 << 20) / ALIGN;
    let blocks = if blocks <= mib {
        blocks.next_power_of_two()
    } else {
        blocks.div_ceil(mib) * mib
    };
    blocks * ALIGN
}

impl BufferPool {
    /// A pool that keeps at most `max_idle_bytes` of free buffers.
    pub fn new(max_idle_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                free: Mutex::new(BTreeMap::new()),
                max_idle_bytes,
            }),
        }
    }

    /// A buffer of `len` bytes: a reused one when the pool has one of its
    /// class, else a new one whose pages are touched now (prefaulted).
    /// Its contents are unspecified.
    pub fn get(&self, len: usize) -> PooledBuffer {
        let cap = class(len);
        let reused = self
            .inner
            .free
            .lock()
            .expect("pool lock is never poisoned")
            .get_mut(&cap)
            .and_then(Vec::pop);
        let mut buf = reused.unwrap_or_else(|| {
            // The faults happen here, once, and not while a frame streams in.
            let mut buf = AlignedBuffer::zeroed(cap);
            buf.prefault();
            buf
        });
        buf.resize(len)
            .expect("a buffer of len's class holds len bytes");
        PooledBuffer {
            buf: Some(HostBufferMut { buf }),
            pool: Arc::clone(&self.inner),
        }
    }

    /// Bytes held idle in the pool.
    pub fn idle_bytes(&self) -> usize {
        let free = self.inner.free.lock().expect("pool lock is never poisoned");
        free.iter().map(|(cap, v)| cap * v.len()).sum()
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufferPool(max idle {} bytes)", self.max_idle_bytes)
    }
}

impl Inner {
    fn give_back(&self, buf: AlignedBuffer) {
        let bytes = buf.capacity();
        let mut free = self.free.lock().expect("pool lock is never poisoned");
        let idle: usize = free.iter().map(|(cap, v)| cap * v.len()).sum();
        if idle + bytes <= self.max_idle_bytes {
            free.entry(bytes).or_default().push(buf);
        }
    }
}

/// A writable buffer from a [`BufferPool`]; frozen, it becomes a
/// [`HostBuffer`] that returns to the pool when its last view is dropped.
#[derive(Debug)]
pub struct PooledBuffer {
    buf: Option<HostBufferMut>,
    pool: Arc<Inner>,
}

impl PooledBuffer {
    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf
            .as_mut()
            .expect("present until frozen")
            .as_mut_slice()
    }

    /// Makes the bytes shareable; they return to the pool when the last view drops.
    pub fn freeze(mut self) -> HostBuffer {
        let buf = self.buf.take().expect("present until frozen");
        HostBuffer::from_backing(Returning {
            buf: Some(buf),
            pool: Arc::clone(&self.pool),
        })
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf.buf);
        }
    }
}

struct Returning {
    buf: Option<HostBufferMut>,
    pool: Arc<Inner>,
}

impl Backing for Returning {
    fn bytes(&self) -> &[u8] {
        self.buf.as_ref().expect("present until dropped").as_slice()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf.buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_when_their_last_view_drops_and_are_reused() {
        let pool = BufferPool::new(64 << 20);
        let mut b = pool.get(5000);
        b.as_mut_slice()[4999] = 7;
        let frozen = b.freeze();
        let view = frozen.slice(4990..5000).expect("in range");
        drop(frozen);
        assert_eq!(pool.idle_bytes(), 0, "a view still holds the buffer");
        assert_eq!(view.as_slice()[9], 7);
        let ptr = view.as_slice().as_ptr() as usize - 4990;
        drop(view);
        assert_eq!(pool.idle_bytes(), class(5000));
        let again = pool.get(6000);
        assert_eq!(
            again.buf.as_ref().map(|b| b.as_slice().as_ptr() as usize),
            Some(ptr),
            "same class reuses"
        );
        assert_eq!(
            pool.get(6000).buf.as_ref().map(HostBufferMut::len),
            Some(6000)
        );
    }

    #[test]
    fn the_pool_keeps_at_most_its_idle_limit() {
        let pool = BufferPool::new(1 << 20);
        let a = pool.get(800 << 10);
        let b = pool.get(800 << 10);
        drop(a);
        drop(b);
        assert!(pool.idle_bytes() <= 1 << 20);
    }
}
