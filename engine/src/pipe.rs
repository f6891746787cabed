//! The shared-memory pipe of a `shm://` connection: one ring of bytes per
//! direction in a sealed memfd, with futex wake-ups, so frames between two
//! processes on one host travel without a socket in the loop.
//!
//! Each side creates the ring it writes and passes it to the other side once,
//! when the connection opens (see [`handshake`]). After that the Unix socket
//! carries only the descriptors of shared slots, one byte each, and tells each
//! side when the other has gone: a thread per connection waits on it.
//!
//! A ring's header holds the two positions (bytes ever written, bytes ever
//! read) and two futex words, each in its own cache line. The writer copies a
//! frame in, publishes the new position, and wakes a reader only when one has
//! said it sleeps; the reader copies bytes out, publishes its position, and
//! wakes the writer only when it waits for room. A round trip therefore costs
//! two futex wake-ups, or none when both sides are spinning.
//!
//! Waiters on the read side are told apart with futex bitsets: the
//! connection's reader thread ([`READER`]) and a requester that reads its own
//! reply ([`LEADER`]). While a requester leads, the writer wakes only it, as
//! the socket transports switch the reader thread's epoll off.
//!
//! Everything the peer can write — positions, sizes, bytes — is checked
//! before use: a ring that claims more bytes than it holds ends the
//! connection, never the process.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::SealFlag;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::error::{Error, Result};
use crate::shm::{check_seals, sealed_memfd};

/// Bytes of a ring's data area (each direction of a connection has one).
const RING_BYTES: usize = 1 << 20;
/// Bytes before the data area: the positions and futex words.
const HEADER: usize = 4096;
/// Offsets in the header: what the writer writes and the reader's sleepers
/// share one cache line, what the reader writes the next, so publishing a
/// frame moves one line between the processes.
const HEAD: usize = 0;
const DATA_WORD: usize = 8;
const SLEEPERS: usize = 12;
const TAIL: usize = 64;
const SPACE_WORD: usize = 72;
const WRITER_WAITS: usize = 76;

/// Bitset of the connection's reader thread.
const READER: u32 = 1;
/// Bitset of a requester reading its own reply.
const LEADER: u32 = 2;

/// The byte that opens a connection, sent with the descriptor of the sender's ring.
const HELLO: u8 = b'P';
/// The byte that carries the descriptor of a shared slot.
const SLOT_FD: u8 = b'F';

/// How long a new connection waits for the other side's ring.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// How long a reader waits for a slot descriptor announced in the ring.
const FD_WAIT: Duration = Duration::from_secs(5);
/// Most slot descriptors a peer may send ahead of the frames that claim them
/// (a sender announces each slot once, so a well-behaved peer has a few).
const MAX_UNCLAIMED_FDS: usize = 1024;

/// A ring mapped into this process.
struct Ring {
    _map: memmap2::MmapMut,
    base: *mut u8,
    cap: usize,
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
    fn create(cap: usize) -> Result<(Ring, OwnedFd)> {
        let file = sealed_memfd(c"tensorferry-pipe", (HEADER + cap) as u64)?;
        let ring = Ring::map(&file)?;
        Ok((ring, OwnedFd::from(file)))
    }

    /// Maps a ring the peer sent, after checking that it cannot shrink and
    /// that its size is one this side would make.
    fn open(fd: OwnedFd) -> Result<Ring> {
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

    fn head(&self) -> &AtomicU64 {
        self.u64_at(HEAD)
    }
    fn tail(&self) -> &AtomicU64 {
        self.u64_at(TAIL)
    }
    fn data_word(&self) -> &AtomicU32 {
        self.u32_at(DATA_WORD)
    }
    fn sleepers(&self) -> &AtomicU32 {
        self.u32_at(SLEEPERS)
    }
    fn space_word(&self) -> &AtomicU32 {
        self.u32_at(SPACE_WORD)
    }
    fn writer_waits(&self) -> &AtomicU32 {
        self.u32_at(WRITER_WAITS)
    }

    /// Bytes written and not yet read, as the positions say; an error when
    /// they say more than the ring holds (a corrupt or hostile peer).
    fn filled(&self, head: u64, tail: u64) -> io::Result<usize> {
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
    fn copy_in(&self, at: u64, src: &[u8]) {
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
    fn copy_out(&self, at: u64, dst: &mut [u8]) {
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

fn futex_wait(word: &AtomicU32, seen: u32, bits: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| {
        // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time.
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let total = now.tv_nsec as u64 + u64::from(t.subsec_nanos());
        libc::timespec {
            tv_sec: now.tv_sec
                + t.as_secs().min(1 << 31) as libc::time_t
                + (total / 1_000_000_000) as libc::time_t,
            tv_nsec: (total % 1_000_000_000) as libc::c_long,
        }
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: a futex wait on a live, 4-aligned word; the kernel returns at
    // once when the word no longer holds `seen`. Interruptions and timeouts
    // come back as errors the callers do not need: they look again.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT_BITSET,
            seen,
            ts_ptr,
            std::ptr::null::<u32>(),
            bits,
        );
    }
}

fn futex_wake(word: &AtomicU32, bits: u32) {
    // SAFETY: a futex wake on a live, 4-aligned word; it touches no memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE_BITSET,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            bits,
        );
    }
}

/// Both rings of a connection, as this side sees them, and the state the
/// reader thread, requesters and the watching thread share.
pub(crate) struct Pipe {
    /// The ring the peer writes and this side reads.
    incoming: Ring,
    /// The ring this side writes.
    outgoing: Ring,
    /// The socket ended: nothing more will be written to `incoming`.
    gone: AtomicBool,
    /// A requester leads the read side: the reader thread is not to be woken.
    led: AtomicBool,
    /// The reader thread sleeps (or is about to) in [`Pipe::wait_reader`].
    parked: AtomicBool,
    /// Slot descriptors received and not yet claimed.
    fds: Mutex<VecDeque<OwnedFd>>,
    fd_arrived: Condvar,
}

impl Pipe {
    fn new(incoming: Ring, outgoing: Ring) -> Pipe {
        Pipe {
            incoming,
            outgoing,
            gone: AtomicBool::new(false),
            led: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            fds: Mutex::new(VecDeque::new()),
            fd_arrived: Condvar::new(),
        }
    }

    fn readable(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
            || self.incoming.head().load(Ordering::SeqCst)
                != self.incoming.tail().load(Ordering::SeqCst)
    }

    /// For the reader thread: returns when there is something to read (or
    /// the connection ended) and no requester leads.
    pub(crate) fn wait_reader(&self) {
        let ring = &self.incoming;
        loop {
            let seen = ring.data_word().load(Ordering::SeqCst);
            if !self.led.load(Ordering::SeqCst) && self.readable() {
                return;
            }
            self.parked.store(true, Ordering::SeqCst);
            if !self.led.load(Ordering::SeqCst) {
                ring.sleepers().fetch_or(READER, Ordering::SeqCst);
                if !self.led.load(Ordering::SeqCst) && self.readable() {
                    self.parked.store(false, Ordering::SeqCst);
                    ring.sleepers().fetch_and(!READER, Ordering::SeqCst);
                    return;
                }
            }
            futex_wait(ring.data_word(), seen, READER, None);
            self.parked.store(false, Ordering::SeqCst);
            ring.sleepers().fetch_and(!READER, Ordering::SeqCst);
        }
    }

    /// For a requester leading the read side: waits until there is something
    /// to read, at most until `deadline`; `false` when it passed.
    pub(crate) fn wait_leader(&self, deadline: Instant) -> bool {
        let ring = &self.incoming;
        loop {
            let seen = ring.data_word().load(Ordering::SeqCst);
            if self.readable() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            ring.sleepers().fetch_or(LEADER, Ordering::SeqCst);
            if self.readable() {
                ring.sleepers().fetch_and(!LEADER, Ordering::SeqCst);
                return true;
            }
            futex_wait(ring.data_word(), seen, LEADER, Some(left));
            ring.sleepers().fetch_and(!LEADER, Ordering::SeqCst);
        }
    }

    /// A requester takes the read side: the writer stops waking the reader thread.
    pub(crate) fn lead(&self) {
        self.led.store(true, Ordering::SeqCst);
        self.incoming
            .sleepers()
            .fetch_and(!READER, Ordering::SeqCst);
    }

    /// The requester lets go: a sleeping reader thread is woken by the writer
    /// again, and now if something is already there.
    pub(crate) fn unlead(&self) {
        self.led.store(false, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.incoming.sleepers().fetch_or(READER, Ordering::SeqCst);
        }
        if self.readable() {
            self.incoming.data_word().fetch_add(1, Ordering::SeqCst);
            futex_wake(self.incoming.data_word(), READER);
        }
    }

    /// The connection is over: wakes everyone waiting on either ring.
    fn end(&self) {
        self.gone.store(true, Ordering::SeqCst);
        self.incoming.data_word().fetch_add(1, Ordering::SeqCst);
        futex_wake(self.incoming.data_word(), u32::MAX);
        self.outgoing.space_word().fetch_add(1, Ordering::SeqCst);
        futex_wake(self.outgoing.space_word(), u32::MAX);
        let _q = self.fds.lock().expect("fd queue lock is never poisoned");
        self.fd_arrived.notify_all();
    }

    /// The next slot descriptor the peer sent, waiting a little for it: the
    /// peer sends it before the frame that announces it, but through the
    /// socket, which another thread reads.
    pub(crate) fn take_fd(&self) -> Option<OwnedFd> {
        let deadline = Instant::now() + FD_WAIT;
        let mut q = self.fds.lock().expect("fd queue lock is never poisoned");
        loop {
            if let Some(fd) = q.pop_front() {
                return Some(fd);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.gone.load(Ordering::SeqCst) {
                return None;
            }
            q = self
                .fd_arrived
                .wait_timeout(q, left)
                .expect("fd queue lock is never poisoned")
                .0;
        }
    }
}

/// Opens the pipe of a new `shm://` connection: sends this side's ring over
/// `stream` and maps the one the peer sends back. Both sides call it first
/// thing, so neither waits for the other to read.
///
/// # Errors
///
/// When the ring cannot be made or sent, or the peer sends anything but a
/// ring within a few seconds.
pub(crate) fn handshake(stream: &UnixStream) -> Result<Arc<Pipe>> {
    let (outgoing, fd) = Ring::create(RING_BYTES)?;
    send_fd(stream, HELLO, fd.as_raw_fd())
        .map_err(|e| Error::io("sending the shared-memory pipe", e))?;
    stream
        .set_read_timeout(Some(HANDSHAKE))
        .map_err(|e| Error::io("setting up a shm connection", e))?;
    let (byte, fd) = recv_fd(stream).map_err(|e| {
        Error::io(
            "waiting for the peer's shared-memory pipe (is it a tensorferry node of this version?)",
            e,
        )
    })?;
    stream
        .set_read_timeout(None)
        .map_err(|e| Error::io("setting up a shm connection", e))?;
    let (HELLO, Some(fd)) = (byte, fd) else {
        return Err(Error::Invalid(
            "the peer opened a shm connection without its shared-memory pipe".into(),
        ));
    };
    Ok(Arc::new(Pipe::new(Ring::open(fd)?, outgoing)))
}

/// Sends one byte with one descriptor.
fn send_fd(stream: &UnixStream, byte: u8, fd: RawFd) -> io::Result<()> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &[IoSlice::new(&[byte])],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    if n == 1 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the socket took no byte",
        ))
    }
}

/// Receives one byte and the descriptor that came with it, if any. The end
/// of the stream is an `UnexpectedEof` error.
fn recv_fd(stream: &UnixStream) -> io::Result<(u8, Option<OwnedFd>)> {
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        let msg = match recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if msg.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ));
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let mut got = None;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: SCM_RIGHTS installed this descriptor in our table
                    // for this message; nothing else owns it. Extra ones are
                    // closed when dropped.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    if got.is_none() {
                        got = Some(fd);
                    }
                }
            }
        }
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent more descriptors than a message may carry",
            ));
        }
        return Ok((byte[0], got));
    }
}

/// Starts the thread that reads a connection's socket after the handshake:
/// slot descriptors go to the pipe's queue; the end of the stream, anything
/// that is not a descriptor, or more than [`MAX_UNCLAIMED_FDS`] unclaimed
/// ones end the connection and wake the pipe's waiters.
///
/// # Errors
///
/// When the thread cannot be started (the pipe is ended first).
pub(crate) fn watch(pipe: &Arc<Pipe>, stream: UnixStream) -> Result<()> {
    let p = Arc::clone(pipe);
    let started = std::thread::Builder::new()
        .name("tf-watch-shm".into())
        .spawn(move || {
            while let Ok((SLOT_FD, Some(fd))) = recv_fd(&stream) {
                let mut q = p.fds.lock().expect("fd queue lock is never poisoned");
                if q.len() >= MAX_UNCLAIMED_FDS {
                    // A peer piling up descriptors: it ends its own connection.
                    break;
                }
                q.push_back(fd);
                drop(q);
                p.fd_arrived.notify_all();
            }
            // Ended, or broken by the peer: either way the peer learns it too.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            p.end();
        });
    started.map(|_| ()).map_err(|e| {
        pipe.end();
        Error::io("starting a shm connection's watcher", e)
    })
}

/// The read end of a pipe, as a non-blocking byte source.
pub(crate) struct PipeReader {
    pipe: Arc<Pipe>,
    /// Bytes read so far (this side is the ring's only reader).
    tail: u64,
}

impl PipeReader {
    pub(crate) fn new(pipe: Arc<Pipe>) -> Self {
        let tail = pipe.incoming.tail().load(Ordering::SeqCst);
        Self { pipe, tail }
    }
}

impl crate::inbox::Source for PipeReader {
    fn recv_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let ring = &self.pipe.incoming;
        // The end first: bytes written before it are read before it is reported.
        let gone = self.pipe.gone.load(Ordering::SeqCst);
        let head = ring.head().load(Ordering::Acquire);
        let filled = ring.filled(head, self.tail)?;
        if filled == 0 {
            return if gone {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = filled.min(buf.len());
        ring.copy_out(self.tail, &mut buf[..n]);
        self.tail = self.tail.wrapping_add(n as u64);
        ring.tail().store(self.tail, Ordering::SeqCst);
        // The writer says it waits before it looks at `tail` a last time, so
        // either it sees the room made here or this sees it waiting.
        if ring.writer_waits().load(Ordering::SeqCst) != 0 {
            ring.space_word().fetch_add(1, Ordering::SeqCst);
            futex_wake(ring.space_word(), u32::MAX);
        }
        Ok(n)
    }

    fn cheap_reads(&self) -> bool {
        true
    }
}

/// Makes the bytes up to `head` visible to the reader of `ring`, waking it
/// when it sleeps.
fn publish(ring: &Ring, head: u64) {
    ring.head().store(head, Ordering::SeqCst);
    // A reader says it sleeps before it looks at `head` a last time, so
    // either it sees the bytes published here or this sees it sleeping.
    let sleepers = ring.sleepers().load(Ordering::SeqCst);
    if sleepers != 0 {
        ring.data_word().fetch_add(1, Ordering::SeqCst);
        futex_wake(ring.data_word(), sleepers);
    }
}

/// The write end of a pipe. Bytes become visible to the reader at
/// [`flush`](Write::flush) (or when the ring fills), so a frame costs at
/// most one wake-up.
pub(crate) struct PipeWriter {
    pipe: Arc<Pipe>,
    /// The socket, for slot descriptors.
    stream: UnixStream,
    /// Bytes written so far, published or not.
    head: u64,
    /// Bytes the reader has been told of.
    published: u64,
    /// The reader's position when last looked at: room is at least what it
    /// leaves, so the reader's cache line is read only when that runs out.
    seen_tail: u64,
}

impl PipeWriter {
    pub(crate) fn new(pipe: Arc<Pipe>, stream: UnixStream) -> Self {
        let head = pipe.outgoing.head().load(Ordering::SeqCst);
        let seen_tail = pipe.outgoing.tail().load(Ordering::SeqCst);
        Self {
            pipe,
            stream,
            head,
            published: head,
            seen_tail,
        }
    }

    /// Sends a slot's descriptor, ahead of the frame that announces it.
    pub(crate) fn send_fd(&mut self, fd: RawFd) -> io::Result<()> {
        send_fd(&self.stream, SLOT_FD, fd)
    }

    fn publish(&mut self) {
        if self.head != self.published {
            publish(&self.pipe.outgoing, self.head);
            self.published = self.head;
        }
    }

    /// Room in the ring now; waits for some when there is none.
    fn room(&mut self) -> io::Result<usize> {
        let ring = &self.pipe.outgoing;
        if self.pipe.gone.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the peer closed the connection",
            ));
        }
        let filled = ring.filled(self.head, self.seen_tail)?;
        if filled < ring.cap {
            return Ok(ring.cap - filled);
        }
        loop {
            let seen = ring.space_word().load(Ordering::SeqCst);
            if self.pipe.gone.load(Ordering::SeqCst) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the peer closed the connection",
                ));
            }
            self.seen_tail = ring.tail().load(Ordering::SeqCst);
            let filled = ring.filled(self.head, self.seen_tail)?;
            if filled < ring.cap {
                return Ok(ring.cap - filled);
            }
            // Full: let the reader see what is there, then sleep until it reads.
            if self.head != self.published {
                publish(ring, self.head);
                self.published = self.head;
            }
            ring.writer_waits().store(1, Ordering::SeqCst);
            self.seen_tail = ring.tail().load(Ordering::SeqCst);
            let filled = ring.filled(self.head, self.seen_tail)?;
            if filled == ring.cap && !self.pipe.gone.load(Ordering::SeqCst) {
                futex_wait(ring.space_word(), seen, u32::MAX, None);
            }
            ring.writer_waits().store(0, Ordering::SeqCst);
        }
    }
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.room()?.min(buf.len());
        self.pipe.outgoing.copy_in(self.head, &buf[..n]);
        self.head = self.head.wrapping_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.publish();
        Ok(())
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::Source;

    /// Two connected pipes, as the two sides of one connection would hold them.
    fn pair() -> (Arc<Pipe>, Arc<Pipe>, UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let hb = std::thread::spawn({
            let b = b.try_clone().expect("clone");
            move || handshake(&b).expect("handshake b")
        });
        let pa = handshake(&a).expect("handshake a");
        let pb = hb.join().expect("join");
        (pa, pb, a, b)
    }

    fn read_exactly(r: &mut PipeReader, pipe: &Pipe, n: usize) -> Vec<u8> {
        let mut out = vec![0xAA; n];
        let mut got = 0;
        while got < n {
            match r.recv_now(&mut out[got..]) {
                Ok(0) => panic!("ended after {got} of {n} bytes"),
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipe.wait_reader();
                }
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    #[test]
    fn bytes_cross_in_order_through_many_wraps() {
        let (pa, pb, a, _b) = pair();
        let total = 5 * RING_BYTES + 12_345;
        let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            let mut w = PipeWriter::new(pa, a);
            // Odd piece sizes, so writes straddle the ring's end.
            for piece in sent.chunks(77_777) {
                w.write_all(piece).expect("write");
                w.flush().expect("flush");
            }
        });
        let mut r = PipeReader::new(Arc::clone(&pb));
        let got = read_exactly(&mut r, &pb, total);
        writer.join().expect("writer");
        assert!(got == data, "bytes differ after crossing the pipe");
    }

    #[test]
    fn nothing_is_visible_before_flush() {
        let (pa, pb, a, _b) = pair();
        let mut w = PipeWriter::new(pa, a);
        w.write_all(b"frame").expect("write");
        let mut r = PipeReader::new(Arc::clone(&pb));
        let mut buf = [0u8; 8];
        assert_eq!(
            r.recv_now(&mut buf).expect_err("not yet").kind(),
            io::ErrorKind::WouldBlock
        );
        w.flush().expect("flush");
        assert_eq!(r.recv_now(&mut buf).expect("read"), 5);
        assert_eq!(&buf[..5], b"frame");
    }

    #[test]
    fn the_end_of_the_socket_ends_the_pipe_after_its_bytes() {
        let (pa, pb, a, b) = pair();
        watch(&pb, b.try_clone().expect("clone")).expect("watch");
        let mut w = PipeWriter::new(pa, a.try_clone().expect("clone"));
        w.write_all(b"last words").expect("write");
        w.flush().expect("flush");
        drop(w);
        drop(a);
        let mut r = PipeReader::new(Arc::clone(&pb));
        assert_eq!(read_exactly(&mut r, &pb, 10), b"last words");
        // The reader is woken by the end and then reads it.
        pb.wait_reader();
        let mut buf = [0u8; 4];
        assert_eq!(r.recv_now(&mut buf).expect("end"), 0);
    }

    #[test]
    fn a_writer_waiting_for_room_is_released_when_the_peer_goes() {
        let (pa, pb, a, b) = pair();
        watch(&pa, a.try_clone().expect("clone")).expect("watch");
        let writer = std::thread::spawn(move || {
            let mut w = PipeWriter::new(pa, a);
            // More than the ring holds, and nobody reads.
            w.write_all(&vec![1u8; RING_BYTES + 1])
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(pb);
        drop(b);
        let err = writer.join().expect("writer").expect_err("broken pipe");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn a_ring_claiming_more_than_it_holds_is_an_error_not_a_read() {
        let (pa, pb, _a, _b) = pair();
        // A hostile peer's position: far past what the ring can hold.
        pa.outgoing
            .head()
            .store(3 * RING_BYTES as u64, Ordering::SeqCst);
        let mut r = PipeReader::new(Arc::clone(&pb));
        let mut buf = [0u8; 16];
        let err = r.recv_now(&mut buf).expect_err("corrupt positions");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn slot_descriptors_arrive_through_the_socket() {
        let (pa, pb, a, b) = pair();
        watch(&pb, b).expect("watch");
        let (_ring, fd) = Ring::create(4096).expect("ring");
        let mut w = PipeWriter::new(pa, a);
        w.send_fd(fd.as_raw_fd()).expect("send fd");
        let got = pb.take_fd().expect("a descriptor");
        // The received descriptor is the same memory: it maps with the same size.
        let ring = Ring::open(got).expect("open");
        assert_eq!(ring.cap, 4096);
    }

    #[test]
    fn a_peer_piling_up_descriptors_ends_its_connection() {
        let (pa, pb, a, b) = pair();
        watch(&pb, b).expect("watch");
        let (_ring, fd) = Ring::create(4096).expect("ring");
        let mut w = PipeWriter::new(pa, a);
        let mut sent = 0;
        // Sends fail once the receiving side has ended the connection.
        while sent <= MAX_UNCLAIMED_FDS && w.send_fd(fd.as_raw_fd()).is_ok() {
            sent += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pb.gone.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            pb.gone.load(Ordering::SeqCst),
            "still open after {sent} descriptors"
        );
    }

    #[test]
    fn a_leader_is_woken_and_the_reader_thread_is_not() {
        let (pa, pb, a, _b) = pair();
        let woke = Arc::new(AtomicBool::new(false));
        let reader = std::thread::spawn({
            let pb = Arc::clone(&pb);
            let woke = Arc::clone(&woke);
            move || {
                pb.wait_reader();
                woke.store(true, Ordering::SeqCst);
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        pb.lead();
        let mut w = PipeWriter::new(pa, a);
        w.write_all(b"reply").expect("write");
        w.flush().expect("flush");
        assert!(pb.wait_leader(Instant::now() + Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !woke.load(Ordering::SeqCst),
            "the reader thread woke while a requester led"
        );
        // The leader leaves the bytes unread: the reader thread gets them.
        pb.unlead();
        reader.join().expect("reader");
        assert!(woke.load(Ordering::SeqCst));
    }
}
