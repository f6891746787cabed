//! [`BufferPool`]: reusable 64-byte-aligned receive buffers, and the node's
//! budget of received bytes.
//!
//! Writing into fresh pages costs a page fault per 4 KiB (on a machine where a
//! memcpy runs at 10 GB/s, filling fresh pages runs near 2 GB/s), so frames are
//! read into buffers that come back to the pool when the last tensor viewing
//! them is dropped. A new buffer is allocated without touching its pages:
//! memory becomes resident only as a frame's bytes actually arrive, so a
//! peer that announces a frame and sends nothing costs no memory, and a
//! length the system cannot allocate fails that frame, not the process.
//!
//! A frame's buffer is *reserved* against the pool's receive budget before
//! its first byte is read, for its whole length, until the buffer comes back
//! (the last tensor viewing it is dropped): received frames, whether still
//! arriving or waiting in a queue, never hold more than the budget, and a
//! frame that was let in always has room to finish. A reader whose next
//! frame does not fit waits, its connection unread, and is woken when bytes
//! come back.
//!
//! A large frame (up to half the budget) is let in *on probation* instead
//! ([`BufferPool::reserve_on_probation`]): only its first bytes are reserved,
//! and the rest once they have arrived ([`PooledBuffer::admit`]). So a peer
//! that announces gigabytes and sends nothing holds a few megabytes of the
//! budget, not gigabytes, and well-behaved peers keep theirs. Frames on
//! probation hold at most half the budget together, so those waiting to be
//! admitted never hold all of it: admitted frames always finish, and their
//! bytes coming back admit the next.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;

use tensorferry_kernels::cpu::AlignedBuffer;

use crate::buffer::{Backing, HostBuffer, HostBufferMut, ALIGN};
use crate::error::{Error, Result};

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
    /// Most bytes read into buffers and not yet given back.
    budget: u64,
    /// Bytes read into buffers and not yet given back.
    charged: AtomicU64,
    /// Of those, bytes held by frames on probation.
    probation: Mutex<u64>,
    /// Readers waiting for the budget.
    waiting: Mutex<Vec<Waker>>,
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
    /// A pool that keeps at most `max_idle_bytes` of free buffers, with no
    /// receive budget.
    pub fn new(max_idle_bytes: usize) -> Self {
        Self::with_budget(max_idle_bytes, u64::MAX)
    }

    /// A pool that keeps at most `max_idle_bytes` of free buffers and lets
    /// at most `budget` bytes be read into its buffers before they come back.
    pub fn with_budget(max_idle_bytes: usize, budget: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                free: Mutex::new(BTreeMap::new()),
                max_idle_bytes,
                budget,
                charged: AtomicU64::new(0),
                probation: Mutex::new(0),
                waiting: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A buffer of `len` bytes: a reused one when the pool has one of its
    /// class, else a new one whose pages become resident as they are written.
    /// Its contents are unspecified.
    ///
    /// # Errors
    ///
    /// [`Error::Kernels`] (host memory) when a new buffer cannot be allocated.
    pub fn try_get(&self, len: usize) -> Result<PooledBuffer> {
        let cap = class(len);
        let reused = self
            .inner
            .free
            .lock()
            .expect("pool lock is never poisoned")
            .get_mut(&cap)
            .and_then(Vec::pop);
        let mut buf = match reused {
            Some(buf) => buf,
            None => AlignedBuffer::try_zeroed(cap)?,
        };
        buf.resize(len)
            .expect("a buffer of len's class holds len bytes");
        Ok(PooledBuffer {
            buf: Some(HostBufferMut { buf }),
            pool: Arc::clone(&self.inner),
            charged: 0,
            probation: 0,
        })
    }

    /// As [`try_get`](Self::try_get), for a length this process chose.
    ///
    /// # Panics
    ///
    /// When the memory cannot be allocated.
    pub fn get(&self, len: usize) -> PooledBuffer {
        let buf = self
            .try_get(len)
            .unwrap_or_else(|e| panic!("a receive buffer of {len} bytes: {e}"));
        buf.offer_huge_pages();
        buf
    }

    /// A buffer for a frame of `len` bytes, its length reserved against the
    /// receive budget: `Ok(None)` when the budget has no room for it now
    /// (wait with [`wake_when_room`](Self::wake_when_room)).
    ///
    /// # Errors
    ///
    /// [`Error::Limit`] for a frame larger than the whole budget (it could
    /// never be let in); [`Error::Kernels`] (host memory) when the buffer
    /// cannot be allocated.
    pub fn reserve(&self, len: usize) -> Result<Option<PooledBuffer>> {
        let want = len as u64;
        let budget = self.inner.budget;
        if want > budget {
            return Err(Error::Limit {
                what: "frame size against the node's receive budget",
                value: want,
                limit: budget,
            });
        }
        if !self.inner.charge(want) {
            return Ok(None);
        }
        match self.try_get(len) {
            Ok(mut buf) => {
                buf.charged = want;
                buf.offer_huge_pages();
                Ok(Some(buf))
            }
            Err(e) => {
                self.inner.release(want, 0);
                Err(e)
            }
        }
    }

    /// A buffer for a frame of `len` bytes of which only the first `first`
    /// are reserved against the budget for now, *on probation*: the rest is
    /// reserved by [`PooledBuffer::admit`] once those have arrived. `Ok(None)`
    /// when the budget, or the half of it frames on probation may hold, has
    /// no room now (wait with [`wake_when_room`](Self::wake_when_room)).
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve).
    pub fn reserve_on_probation(&self, len: usize, first: usize) -> Result<Option<PooledBuffer>> {
        let want = len as u64;
        if want > self.inner.budget {
            return Err(Error::Limit {
                what: "frame size against the node's receive budget",
                value: want,
                limit: self.inner.budget,
            });
        }
        let first = first.min(len) as u64;
        let mut probation = self.inner.lock_probation();
        if probation.saturating_add(first) > self.inner.budget / 2 || !self.inner.charge(first) {
            return Ok(None);
        }
        *probation += first;
        drop(probation);
        match self.try_get(len) {
            Ok(mut buf) => {
                buf.charged = first;
                buf.probation = first;
                Ok(Some(buf))
            }
            Err(e) => {
                self.inner.release(first, first);
                Err(e)
            }
        }
    }

    /// Bytes reserved by frames and not yet given back.
    pub fn reserved_bytes(&self) -> u64 {
        self.inner.charged.load(Ordering::Acquire)
    }

    /// The receive budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.inner.budget
    }

    /// Wakes `waker` once when the budget has room for `len` more bytes (at
    /// once when it has now), or at least when some comes back; with
    /// `probation`, room among the frames on probation too.
    pub fn wake_when_room(&self, len: usize, probation: bool, waker: &Waker) {
        let mut waiting = self
            .inner
            .waiting
            .lock()
            .expect("pool lock is never poisoned");
        let charged = self.inner.charged.load(Ordering::Acquire);
        let on_probation = *self.inner.lock_probation();
        let fits = charged.saturating_add(len as u64) <= self.inner.budget
            && (!probation || on_probation.saturating_add(len as u64) <= self.inner.budget / 2);
        if fits {
            drop(waiting);
            waker.wake_by_ref();
            return;
        }
        if !waiting.iter().any(|w| w.will_wake(waker)) {
            waiting.push(waker.clone());
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
    fn lock_probation(&self) -> std::sync::MutexGuard<'_, u64> {
        self.probation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `want` bytes of the budget if it has room.
    fn charge(&self, want: u64) -> bool {
        let mut charged = self.charged.load(Ordering::Acquire);
        loop {
            if charged.saturating_add(want) > self.budget {
                return false;
            }
            match self.charged.compare_exchange_weak(
                charged,
                charged + want,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => charged = now,
            }
        }
    }

    /// `bytes` of the budget come back, `probation` of them held on
    /// probation; readers waiting for room are woken.
    fn release(&self, bytes: u64, probation: u64) {
        if probation > 0 {
            *self.lock_probation() -= probation;
        }
        if bytes == 0 {
            return;
        }
        self.charged.fetch_sub(bytes, Ordering::AcqRel);
        self.wake_all();
    }

    fn wake_all(&self) {
        let wakers =
            std::mem::take(&mut *self.waiting.lock().expect("pool lock is never poisoned"));
        for w in wakers {
            w.wake();
        }
    }

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
    /// Bytes of the budget this buffer holds.
    charged: u64,
    /// Of those, bytes held on probation (none once admitted).
    probation: u64,
}

impl PooledBuffer {
    /// Reserves the rest of a buffer taken on probation
    /// ([`BufferPool::reserve_on_probation`]); `false` when the budget has
    /// no room for it now (wait with [`BufferPool::wake_when_room`] for
    /// [`unreserved`](Self::unreserved) bytes). `true` at once for a buffer
    /// reserved whole.
    pub fn admit(&mut self) -> bool {
        if self.probation == 0 {
            return true;
        }
        let rest = self.unreserved();
        if !self.pool.charge(rest) {
            return false;
        }
        self.charged += rest;
        *self.pool.lock_probation() -= std::mem::take(&mut self.probation);
        // Its length is trusted now: the rest may come in huge pages.
        self.offer_huge_pages();
        // Room among the frames on probation came back.
        self.pool.wake_all();
        true
    }

    /// See [`AlignedBuffer::offer_huge_pages`]: a frame on probation gets
    /// them once admitted, so a peer that announces a large frame and
    /// stalls holds no more than the bytes it sent.
    fn offer_huge_pages(&self) {
        if let Some(b) = &self.buf {
            b.buf.offer_huge_pages();
        }
    }

    /// Bytes of the buffer not yet reserved against the budget.
    pub fn unreserved(&self) -> u64 {
        let len = self.buf.as_ref().map_or(0, |b| b.buf.len() as u64);
        len.saturating_sub(self.charged)
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf
            .as_mut()
            .expect("present until frozen")
            .as_mut_slice()
    }

    /// Makes the bytes shareable; they return to the pool (and their bytes
    /// to the budget) when the last view drops.
    pub fn freeze(mut self) -> HostBuffer {
        let buf = self.buf.take().expect("present until frozen");
        HostBuffer::from_backing(Returning {
            buf: Some(buf),
            pool: Arc::clone(&self.pool),
            charged: std::mem::take(&mut self.charged),
            probation: std::mem::take(&mut self.probation),
        })
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool.release(self.charged, self.probation);
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf.buf);
        }
    }
}

struct Returning {
    buf: Option<HostBufferMut>,
    pool: Arc<Inner>,
    charged: u64,
    probation: u64,
}

impl Backing for Returning {
    fn bytes(&self) -> &[u8] {
        self.buf.as_ref().expect("present until dropped").as_slice()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        self.pool.release(self.charged, self.probation);
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

    #[test]
    fn frames_on_probation_hold_their_first_bytes_and_half_the_budget_at_most() {
        let pool = BufferPool::with_budget(0, 100 << 20);
        // Announced 40 MiB each, 4 MiB reserved each until admitted.
        let mut held: Vec<PooledBuffer> = (0..12)
            .map(|_| {
                pool.reserve_on_probation(40 << 20, 4 << 20)
                    .expect("within the budget")
                    .expect("room")
            })
            .collect();
        assert_eq!(pool.reserved_bytes(), 48 << 20);
        // Probation holds at most half the budget: a 13th waits.
        assert!(pool
            .reserve_on_probation(40 << 20, 4 << 20)
            .expect("within the budget")
            .is_none());
        // A frame reserved whole still gets in: the rest of the budget is free.
        let whole = pool.reserve(50 << 20).expect("ok").expect("room");
        // Admitting one takes its whole length; with 98 MiB reserved, no
        // other fits until bytes come back.
        assert!(!held[0].admit(), "36 more MiB do not fit");
        drop(whole);
        assert!(held[0].admit());
        assert_eq!(held[0].unreserved(), 0);
        assert_eq!(pool.reserved_bytes(), (11 * 4 + 40) << 20);
        // Its probation share came back: a new frame goes on probation.
        let again = pool
            .reserve_on_probation(40 << 20, 4 << 20)
            .expect("ok")
            .expect("room");
        held.push(again);
        drop(held);
        assert_eq!(pool.reserved_bytes(), 0, "everything came back");
        assert!(pool.reserve(100 << 20).expect("ok").is_some());
    }

    /// Whether the mapping holding `addr` was offered huge pages (its
    /// `VmFlags` in `/proc/self/smaps` say `hg`).
    fn offered_huge_pages(addr: usize) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split(' ').next().and_then(|r| r.split_once('-'));
            if let Some((Ok(start), Ok(end))) =
                range.map(|(a, b)| (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)))
            {
                inside = (start..end).contains(&addr);
            } else if inside && line.starts_with("VmFlags:") {
                return line.split_whitespace().any(|f| f == "hg");
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn a_frame_on_probation_gets_huge_pages_only_once_admitted() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("skipped: this kernel has no transparent huge pages to offer");
            return;
        }
        let pool = BufferPool::with_budget(0, 1 << 30);
        let addr = |b: &PooledBuffer| b.buf.as_ref().map_or(0, |b| b.as_slice().as_ptr() as usize);
        // Announced 64 MiB, 4 MiB reserved: one byte written must not make
        // 2 MiB resident.
        let mut probation = pool
            .reserve_on_probation(64 << 20, 4 << 20)
            .expect("within the budget")
            .expect("room");
        assert!(!offered_huge_pages(addr(&probation)));
        assert!(probation.admit());
        assert!(offered_huge_pages(addr(&probation)));
        // Reserved whole, or a length this process chose: at once.
        let whole = pool.reserve(64 << 20).expect("ok").expect("room");
        assert!(offered_huge_pages(addr(&whole)));
        assert!(offered_huge_pages(addr(&pool.get(8 << 20))));
        // Small buffers are left as they are.
        assert!(!offered_huge_pages(addr(&pool.get(2 << 20))));
    }
}
