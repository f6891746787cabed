//! [`Ring`]: one direction of a `shm://` connection — a ring of bytes in a
//! sealed memfd that one side writes and the other reads.
//!
//! The ring's header holds the two positions (bytes ever written, bytes
//! ever read) and the words each side uses to be woken, each side's in its
//! own cache line, so publishing a frame moves one line between the
//! processes. Everything the peer can write — positions, sizes, bytes — is
//! checked before use: a ring that claims more bytes than it holds ends the
//! connection, never the process.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::fcntl::SealFlag;

use super::slots::{check_seals, sealed_memfd};
use crate::error::{Error, Result};

/// Bytes of a ring's data area (each direction of a connection has one).
pub(crate) const RING_BYTES: usize = 1 << 20;
/// Bytes before the data area: the positions and wake words.
const HEADER: usize = 4096;
/// Offsets in the header: what the writer writes and the reader's sleepers
/// share one cache line, what the reader writes the next.
const HEAD: usize = 0;
const DATA_WORD: usize = 8;
const SLEEPERS: usize = 12;
const TAIL: usize = 64;
const WRITER_WAITS: usize = 76;

/// A ring mapped into this process.
pub(crate) struct Ring {
    _map: memmap2::MmapMut,
    base: *mut u8,
    pub(crate) cap: usize,
}

// SAFETY: the ring's memory is shared with another process on purpose; this
// process touches it only through atomics (the header) and raw copies of
// bytes that are treated as untrusted (the data area), never through
// references that assume nobody else writes.
unsafe impl Send for Ring {}
// SAFETY: as for Send: no method hands out a reference to non-atomic ring memory.
unsafe impl Sync for Ring {}

impl Ring {
    /// A new ring of `cap` bytes in a sealed memfd, and its descriptor to send.
    pub(crate) fn create(cap: usize) -> Result<(Ring, OwnedFd)> {
        let file = sealed_memfd(c"tensorferry-pipe", (HEADER + cap) as u64)?;
        let ring = Ring::map(&file)?;
        Ok((ring, OwnedFd::from(file)))
    }

    /// Maps a ring the peer sent, after checking that it cannot shrink and
    /// that its size is one this side would make.
    pub(crate) fn open(fd: OwnedFd) -> Result<Ring> {
        let file = File::from(fd);
        check_seals(
            &file,
            SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW,
            "a shared-memory pipe",
        )?;
        Ring::map(&file)
    }

    fn map(file: &File) -> Result<Ring> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("sizing a shared-memory pipe", e))?
            .len();
        let cap = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_sub(HEADER))
            .filter(|&c| c.is_power_of_two() && (4096..=1 << 30).contains(&c))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "a shared-memory pipe of {len} bytes; expected {HEADER} plus a power of two from 4 KiB to 1 GiB"
                ))
            })?;
        // SAFETY: a memfd sealed against shrinking and growing (checked by the
        // caller, or set by this process), so the mapping stays valid for its
        // whole length. The peer writes to it too: the header is only touched
        // through atomics and the data area only through raw copies.
        let mut map = unsafe { memmap2::MmapMut::map_mut(file) }
            .map_err(|e| Error::io("mapping a shared-memory pipe", e))?;
        let base = map.as_mut_ptr();
        Ok(Ring {
            _map: map,
            base,
            cap,
        })
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of the header's constants, 8-aligned and
        // inside the mapping (page-aligned base); AtomicU64 may be shared with
        // other writers, which is the point.
        unsafe { &*(self.base.add(offset).cast::<AtomicU64>()) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as for `u64_at`, 4-aligned.
        unsafe { &*(self.base.add(offset).cast::<AtomicU32>()) }
    }

    pub(crate) fn head(&self) -> &AtomicU64 {
        self.u64_at(HEAD)
    }
    pub(crate) fn tail(&self) -> &AtomicU64 {
        self.u64_at(TAIL)
    }
    pub(crate) fn data_word(&self) -> &AtomicU32 {
        self.u32_at(DATA_WORD)
    }
    pub(crate) fn sleepers(&self) -> &AtomicU32 {
        self.u32_at(SLEEPERS)
    }
    pub(crate) fn writer_waits(&self) -> &AtomicU32 {
        self.u32_at(WRITER_WAITS)
    }

    /// Bytes written and not yet read, as the positions say; an error when
    /// they say more than the ring holds (a corrupt or hostile peer).
    pub(crate) fn filled(&self, head: u64, tail: u64) -> io::Result<usize> {
        let n = head.wrapping_sub(tail);
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.cap)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the shared-memory pipe claims {n} unread bytes in a ring of {}",
                        self.cap
                    ),
                )
            })
    }

    /// Copies `src` into the ring at position `at` (wrapping).
    pub(crate) fn copy_in(&self, at: u64, src: &[u8]) {
        let start = (at % self.cap as u64) as usize;
        let first = src.len().min(self.cap - start);
        // SAFETY: both ranges lie inside the data area (start + first <= cap,
        // and the rest starts at 0 with src.len() <= cap); the ring is not a
        // Rust reference, so the peer writing concurrently breaks no aliasing rule.
        unsafe {
            let data = self.base.add(HEADER);
            std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(start), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), data, src.len() - first);
        }
    }

    /// Copies bytes at position `at` (wrapping) out of the ring into `dst`.
    pub(crate) fn copy_out(&self, at: u64, dst: &mut [u8]) {
        let start = (at % self.cap as u64) as usize;
        let first = dst.len().min(self.cap - start);
        // SAFETY: as for `copy_in`; the bytes are data to be checked by the
        // frame decoder, whatever the peer wrote there.
        unsafe {
            let data = self.base.add(HEADER);
            std::ptr::copy_nonoverlapping(data.add(start), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }
}
