//! The floor under any sleeping hand-off between two processes: a ping-pong
//! of the same bytes through shared memory, each side sleeping on a futex
//! until the other wakes it. `bench --pattern reqrep` measures it beside the
//! raw Unix-socket ping-pong for shm rows, so a round trip can be read
//! against both: what a socket costs, and what waking another process
//! costs at all.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tensorferry::engine::futex;

/// Where the request and the reply lie in the shared region.
const DATA: usize = 4096;
/// Word offsets: requests sent, replies sent, stop.
const REQ: usize = 0;
const REP: usize = 64;
const STOP: usize = 128;

/// A shared region: two sequence words, a stop word, a request and a reply.
pub(crate) struct Region {
    map: memmap2::MmapMut,
    size: usize,
}

impl Region {
    /// A new region for `size`-byte messages in a memfd the child inherits.
    pub(crate) fn create(size: usize) -> Result<(Region, OwnedFd), String> {
        // SAFETY: memfd_create with a valid C string and no flags (no
        // CLOEXEC on purpose: the echo process inherits it); the result is
        // checked before use.
        let fd = unsafe { libc::memfd_create(c"tensorferry-bench-floor".as_ptr(), 0) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor just returned by memfd_create, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = File::from(fd.try_clone().map_err(|e| e.to_string())?);
        file.set_len((DATA + 2 * size.next_multiple_of(64)) as u64)
            .map_err(|e| e.to_string())?;
        Ok((Region::map(&file, size)?, fd))
    }

    /// The region behind an inherited descriptor.
    pub(crate) fn open(fd: i32, size: usize) -> Result<Region, String> {
        if fd < 3 {
            return Err(format!("descriptor {fd} is not a shared region"));
        }
        // SAFETY: the parent passed this descriptor number for a memfd it
        // created and this process inherited; nothing else here owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        Region::map(&file, size)
    }

    fn map(file: &File, size: usize) -> Result<Region, String> {
        let need = (DATA + 2 * size.next_multiple_of(64)) as u64;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len < need {
            return Err(format!("the shared region has {len} bytes, {need} needed"));
        }
        // SAFETY: a memfd of at least `need` bytes that only the two bench
        // processes map; words are touched through atomics, bytes through
        // copies.
        let map = unsafe { memmap2::MmapMut::map_mut(file) }.map_err(|e| e.to_string())?;
        Ok(Region { map, size })
    }

    fn word(&self, at: usize) -> &AtomicU32 {
        // SAFETY: `at` is one of the word offsets, 4-aligned and inside the
        // page-aligned mapping; atomics may be shared between processes.
        unsafe { &*(self.map.as_ptr().add(at).cast::<AtomicU32>()) }
    }

    fn area(&mut self, reply: bool) -> &mut [u8] {
        let start = DATA
            + if reply {
                self.size.next_multiple_of(64)
            } else {
                0
            };
        &mut self.map[start..start + self.size]
    }
}

/// Sleeps until `word` leaves `seen`; `false` when that took longer than `idle`.
fn wait(word: &AtomicU32, seen: u32, idle: Duration) -> bool {
    let until = Instant::now() + idle;
    while word.load(Ordering::SeqCst) == seen {
        if Instant::now() > until {
            return false;
        }
        futex::wait(word, seen, futex::ALL, Some(Duration::from_secs(1)));
    }
    true
}

fn post(word: &AtomicU32) {
    word.fetch_add(1, Ordering::SeqCst);
    futex::wake(word, futex::ALL);
}

/// The echo side: copies each request out and back as the reply, until told
/// to stop (or a minute passes without a request: the asking side is gone).
pub(crate) fn echo(mut region: Region) {
    let mut buf = vec![0u8; region.size];
    let mut seen = 0;
    loop {
        if !wait(region.word(REQ), seen, Duration::from_secs(60)) {
            return;
        }
        seen = region.word(REQ).load(Ordering::SeqCst);
        if region.word(STOP).load(Ordering::SeqCst) != 0 {
            return;
        }
        buf.copy_from_slice(region.area(false));
        region.area(true).copy_from_slice(&buf);
        post(region.word(REP));
    }
}

/// The asking side: round trips for `duration` (at least one), each
/// latency in ns; then tells the echo to stop.
pub(crate) fn ask(mut region: Region, duration: Duration) -> Result<Vec<u64>, String> {
    let out = vec![3u8; region.size];
    let mut back = vec![0u8; region.size];
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration || latencies.is_empty() {
        let t0 = Instant::now();
        let seen = region.word(REP).load(Ordering::SeqCst);
        region.area(false).copy_from_slice(&out);
        post(region.word(REQ));
        if !wait(region.word(REP), seen, Duration::from_secs(60)) {
            return Err("the futex echo process stopped answering".into());
        }
        back.copy_from_slice(region.area(true));
        latencies.push(t0.elapsed().as_nanos() as u64);
    }
    region.word(STOP).store(1, Ordering::SeqCst);
    post(region.word(REQ));
    Ok(latencies)
}

/// The descriptor number to pass to the echo process.
pub(crate) fn fd_arg(fd: &OwnedFd) -> String {
    format!("fd://{}", fd.as_raw_fd())
}
