//! Shared memory between processes on one host: sealed memfd *slots* holding
//! whole frames, passed once per connection as file descriptors over a Unix
//! socket, then referred to by `(slot, offset, length)`.
//!
//! A sender writes a frame into a slot (one copy, or none through a loan); the
//! receiver maps the slot read-only and decodes the frame in place, with every
//! check of [`wire::decode`](crate::wire::decode), so its tensors view shared
//! memory. When the receiver drops the last view it sends a release, and the
//! slot is reused. A slot whose receiver's connection ends before it released
//! the frame is *retired*: the receiver may still hold views of it (its node
//! closed, its process lives on), so the sender never writes it again and
//! leaves the pool's accounting once no other receiver holds it; its memory
//! goes when the last mapping does. memfds are anonymous, so nothing
//! outlives the processes: no file in /dev/shm or anywhere.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::buffer::{Backing, HostBuffer};
use crate::error::{Error, Result};

/// An anonymous memfd of `len` bytes, sealed so that it can never shrink
/// under a receiver's mapping (which would fault) nor change size at all.
pub(crate) fn sealed_memfd(name: &std::ffi::CStr, len: u64) -> Result<File> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| Error::io("creating shared memory (memfd_create)", e.into()))?;
    let file = File::from(fd);
    file.set_len(len)
        .map_err(|e| Error::io("sizing shared memory", e))?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(|e| Error::io("sealing shared memory", e.into()))?;
    Ok(file)
}

/// Checks that shared memory a peer sent carries the `required` seals.
pub(crate) fn check_seals(file: &File, required: SealFlag, what: &str) -> Result<()> {
    let seals = fcntl(file, FcntlArg::F_GET_SEALS)
        .map_err(|e| Error::io("reading shared-memory seals", e.into()))?;
    if SealFlag::from_bits_truncate(seals) & required != required {
        return Err(Error::Invalid(format!(
            "the peer sent {what} that can change size under our mapping; refusing it"
        )));
    }
    Ok(())
}

/// A shared-memory region that holds one frame at a time.
pub(crate) struct Slot {
    pub(crate) id: u32,
    file: File,
    map: Mutex<memmap2::MmapMut>,
    size: usize,
    /// Holders: the sender while writing, plus one per receiver until it releases.
    users: AtomicUsize,
    /// A receiver went away without releasing it: never written again.
    retired: AtomicBool,
}

impl Slot {
    fn create(id: u32, size: usize) -> Result<Slot> {
        let file = sealed_memfd(c"tensorferry-slot", size as u64)?;
        // SAFETY: the memfd was just created by this process, sized and sealed
        // against shrinking, so the mapping stays valid for its whole length.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }
            .map_err(|e| Error::io("mapping shared memory", e))?;
        Ok(Slot {
            id,
            file,
            map: Mutex::new(map),
            size,
            users: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` on the slot's bytes (the sender writing a frame).
    pub(crate) fn with_bytes<T>(&self, f: impl FnOnce(&mut [u8]) -> T) -> T {
        let mut map = self.map.lock().expect("slot lock is never poisoned");
        f(&mut map[..])
    }
}

/// One hold on a slot; dropping it gives the hold back.
pub(crate) struct SlotUse(pub(crate) Arc<Slot>);

impl SlotUse {
    fn new(slot: &Arc<Slot>) -> SlotUse {
        slot.users.fetch_add(1, Ordering::AcqRel);
        SlotUse(Arc::clone(slot))
    }

    /// Another hold on the same slot (one per receiver of a frame).
    pub(crate) fn share(&self) -> SlotUse {
        SlotUse::new(&self.0)
    }

    /// Gives the hold back for a receiver that can no longer release the
    /// slot (its connection ended) but may still be reading it: the slot is
    /// never written again.
    pub(crate) fn retire(self) {
        self.0.retired.store(true, Ordering::Release);
    }
}

impl Drop for SlotUse {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The slots of one node, reused once every receiver has released them.
pub(crate) struct SlotPool {
    slots: Mutex<Slots>,
    /// Most bytes of slots the node may create; past it, senders wait for releases.
    max_bytes: usize,
    /// How long a sender waits for a slot to be released.
    wait: std::time::Duration,
}

/// The slots in use or free, and the id the next one gets.
struct Slots {
    list: Vec<Arc<Slot>>,
    /// Ids name slots on the wire (a receiver keeps its mapping of each) and
    /// are never reused, retired slots' included.
    next_id: u32,
}

impl SlotPool {
    pub(crate) fn new(max_bytes: usize, wait: std::time::Duration) -> Self {
        Self {
            slots: Mutex::new(Slots {
                list: Vec::new(),
                next_id: 0,
            }),
            max_bytes,
            wait,
        }
    }

    /// A free slot of at least `len` bytes, held for writing. When every slot
    /// is in use and a new one would pass the byte limit, waits for a receiver
    /// to release one: backpressure instead of unbounded memory.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when no slot is released in time; an error when the
    /// shared memory cannot be created.
    pub(crate) fn take(&self, len: usize) -> Result<SlotUse> {
        // Powers of two up to 1 MiB (a small message takes a small slot),
        // then whole MiB, so messages of one size keep reusing the same slots.
        let size = if len <= 1 << 20 {
            len.max(4096).next_power_of_two()
        } else {
            len.div_ceil(1 << 20) << 20
        };
        let deadline = std::time::Instant::now() + self.wait;
        loop {
            {
                let mut slots = self.slots.lock().expect("pool lock is never poisoned");
                // Retired slots leave once no receiver holds them; a
                // receiver still mapping one keeps its memory alive.
                slots.list.retain(|s| {
                    !(s.retired.load(Ordering::Acquire) && s.users.load(Ordering::Acquire) == 0)
                });
                if let Some(s) = slots
                    .list
                    .iter()
                    .filter(|s| {
                        s.size >= len
                            && s.users.load(Ordering::Acquire) == 0
                            && !s.retired.load(Ordering::Acquire)
                    })
                    .min_by_key(|s| s.size)
                {
                    return Ok(SlotUse::new(s));
                }
                let total: usize = slots.list.iter().map(|s| s.size).sum();
                // A message larger than the limit still gets a slot when none exists.
                if total + size <= self.max_bytes || slots.list.is_empty() {
                    let id = slots.next_id;
                    slots.next_id = id
                        .checked_add(1)
                        .ok_or_else(|| Error::Invalid("too many shared-memory slots".into()))?;
                    let slot = Arc::new(Slot::create(id, size)?);
                    let held = SlotUse::new(&slot);
                    slots.list.push(slot);
                    return Ok(held);
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "waiting for a subscriber to release shared memory (the node's limit is {} MiB; raise it with shm_bytes)",
                        self.max_bytes >> 20
                    ),
                    ms: self.wait.as_millis() as u64,
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
}

/// A slot mapped read-only on the receiving side.
pub(crate) struct MappedSlot {
    map: memmap2::Mmap,
}

impl MappedSlot {
    /// Maps a received slot descriptor after checking its seals.
    pub(crate) fn map(fd: OwnedFd) -> Result<MappedSlot> {
        let file = File::from(fd);
        check_seals(&file, SealFlag::F_SEAL_SHRINK, "shared memory")?;
        // SAFETY: read-only mapping of a memfd sealed against shrinking (checked
        // above), so every page of its current length stays mapped. The peer may
        // still write to it: its bytes are treated as untrusted input.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io("mapping shared memory", e))?;
        Ok(MappedSlot { map })
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// A received frame in a mapped slot; when dropped, tells the sender the slot is free.
pub(crate) struct SlotView {
    pub(crate) slot: Arc<MappedSlot>,
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) release: Box<dyn FnMut() + Send + Sync>,
}

impl Backing for SlotView {
    fn bytes(&self) -> &[u8] {
        &self.slot.map[self.start..self.start + self.len]
    }
}

impl Drop for SlotView {
    fn drop(&mut self) {
        (self.release)();
    }
}

/// The region `start..start+len` of a mapped slot as a [`HostBuffer`], checked.
pub(crate) fn view(
    slot: &Arc<MappedSlot>,
    start: u64,
    len: u64,
    release: Box<dyn FnMut() + Send + Sync>,
) -> Result<HostBuffer> {
    let end = start.checked_add(len).filter(|&e| e <= slot.len() as u64);
    let (Some(_), Ok(start), Ok(len)) = (end, usize::try_from(start), usize::try_from(len)) else {
        return Err(Error::Invalid(format!(
            "the peer referred to bytes {start}..+{len} of a {}-byte shared slot",
            slot.len()
        )));
    };
    Ok(HostBuffer::from_backing(SlotView {
        slot: Arc::clone(slot),
        start,
        len,
        release,
    }))
}
