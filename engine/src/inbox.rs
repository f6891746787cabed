//! [`Inbox`]: the read side of one connection, shared by the connection's
//! reader thread and by requesters waiting for their replies
//! (leader/follower).
//!
//! Whoever holds the inbox is the *leader*: it reads the next frames from the
//! socket and dispatches each as the reader thread would. A requester takes
//! the lead before it writes its request and reads until its reply arrives, so
//! the reply wakes the thread that waits for it and no other, as in a raw
//! ping-pong. The reader thread waits on an epoll and reads only when it can
//! take the lead; a requester switches that wait off while it leads and back
//! on when it leaves, which reports anything left unread. Every thread that
//! switches the wait off while it holds the inbox switches it back on after
//! letting go, so the wait is on whenever no one leads.
//!
//! Reads never block: an [`Assembler`] builds frames across calls, so a leader
//! that gives up mid-frame (its timeout passed) leaves the half-read frame
//! intact for the next one.

use std::io;
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{recv, MsgFlags};

use crate::error::{Error, Result};
use crate::pool::{BufferPool, PooledBuffer};
use crate::wire::{decode_at, Frame, Limits, Prelude, PRELUDE_BYTES};

/// Bytes read ahead of the current frame: a small frame and the prelude of the
/// next one come in one `recv`.
const AHEAD_BYTES: usize = 64 << 10;

/// A socket read without blocking.
pub(crate) trait Source {
    /// Reads what is there now; `WouldBlock` when nothing is.
    fn recv_now(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

impl Source for TcpStream {
    fn recv_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
    }
}

/// What [`Assembler::next`] found.
pub(crate) enum Next {
    /// A whole frame, decoded.
    Frame(Frame),
    /// Nothing more for now; the part of a frame read so far is kept.
    Pending,
    /// The peer closed the stream between frames.
    End,
}

/// Builds frames from a stream read without blocking, across calls.
pub(crate) struct Assembler<S> {
    source: S,
    pool: BufferPool,
    limits: Limits,
    /// Stream offset of the frame being built, for error messages.
    offset: u64,
    ahead: Box<[u8]>,
    /// The unread bytes of `ahead`.
    start: usize,
    end: usize,
    /// The frame being built and how many of its bytes are in.
    partial: Option<(PooledBuffer, usize)>,
}

impl<S: Source> Assembler<S> {
    /// Builds frames read from `source` into buffers from `pool`, within `limits`.
    pub(crate) fn new(source: S, pool: BufferPool, limits: Limits) -> Self {
        Self {
            source,
            pool,
            limits,
            offset: 0,
            ahead: vec![0; AHEAD_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            partial: None,
        }
    }

    /// The next frame if all of it has arrived.
    ///
    /// # Errors
    ///
    /// A stream that ends mid-frame, an I/O error, or a frame the decoder
    /// rejects. Nothing beyond the prelude is allocated for a frame over the limits.
    pub(crate) fn next(&mut self) -> Result<Next> {
        loop {
            if let Some((buf, filled)) = &mut self.partial {
                let bytes = buf.as_mut_slice();
                let n = (bytes.len() - *filled).min(self.end - self.start);
                bytes[*filled..*filled + n]
                    .copy_from_slice(&self.ahead[self.start..self.start + n]);
                self.start += n;
                *filled += n;
                if *filled == bytes.len() {
                    let (buf, _) = self.partial.take().expect("matched above");
                    let frame = decode_at(&buf.freeze(), &self.limits, self.offset)?;
                    self.offset += frame.frame_len;
                    return Ok(Next::Frame(frame));
                }
                // `ahead` is used up; a large rest goes straight into the frame.
                (self.start, self.end) = (0, 0);
                let direct = bytes.len() - *filled >= AHEAD_BYTES;
                let target = if direct {
                    &mut bytes[*filled..]
                } else {
                    &mut self.ahead[..]
                };
                match self.source.recv_now(target) {
                    Ok(0) => return Err(self.cut()),
                    Ok(n) if direct => *filled += n,
                    Ok(n) => self.end = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Pending),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io(self.context(), e)),
                }
                continue;
            }
            let have = self.end - self.start;
            if have >= PRELUDE_BYTES {
                let prelude = &self.ahead[self.start..self.start + PRELUDE_BYTES];
                let p = Prelude::parse(prelude, &self.limits, self.offset)?;
                let len = usize::try_from(p.frame_len).map_err(|_| Error::Limit {
                    what: "frame size",
                    value: p.frame_len,
                    limit: usize::MAX as u64,
                })?;
                self.partial = Some((self.pool.get(len), 0));
                continue;
            }
            self.ahead.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, have);
            match self.source.recv_now(&mut self.ahead[have..]) {
                Ok(0) if have == 0 => return Ok(Next::End),
                Ok(0) => return Err(self.cut()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Pending),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(self.context(), e)),
            }
        }
    }

    /// Whether bytes were read ahead that no frame has taken yet: the socket
    /// no longer reports them, so whoever leads next must not leave them.
    pub(crate) fn holds_bytes(&self) -> bool {
        self.end > self.start || self.partial.is_some()
    }

    fn context(&self) -> String {
        format!("reading the frame at stream byte {}", self.offset)
    }

    fn cut(&self) -> Error {
        Error::io(
            self.context(),
            io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended mid-frame"),
        )
    }
}

/// The read side of a connection: its reading state `R`, held by one leader at a time.
pub(crate) struct Inbox<R> {
    reading: Mutex<R>,
    /// The reader thread's wait: the socket, level-triggered.
    epoll: Epoll,
    /// A duplicate of the socket's descriptor, to wait on.
    watch: OwnedFd,
}

fn armed() -> EpollEvent {
    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, 0)
}

impl<R> Inbox<R> {
    /// An inbox for the socket `watch` (a duplicate of the one `reading` reads).
    ///
    /// # Errors
    ///
    /// When the epoll instance cannot be made.
    pub(crate) fn new(watch: OwnedFd, reading: R) -> Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .and_then(|e| e.add(&watch, armed()).map(|()| e))
            .map_err(|e| Error::io("setting up a connection's reader", e.into()))?;
        Ok(Self {
            reading: Mutex::new(reading),
            epoll,
            watch,
        })
    }

    /// For the reader thread: waits until the socket is readable (or hung up)
    /// while no leader holds the inbox.
    ///
    /// # Errors
    ///
    /// The epoll's errors (`Interrupted` is retried).
    pub(crate) fn wait(&self) -> io::Result<()> {
        let mut events = [EpollEvent::empty()];
        loop {
            match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(0) => {}
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// For the reader thread: the reading state, unless a leader holds it; then
    /// [`wait`](Self::wait) is off until that leader leaves.
    pub(crate) fn read_turn(&self) -> Option<Lead<'_, R>> {
        if let Some(guard) = self.try_read() {
            return Some(Lead {
                inbox: self,
                guard: Some(guard),
                rearm: false,
            });
        }
        // Level-triggered, the wait would fire again at once while the leader
        // reads: switch it off, then look again. If the inbox is still held,
        // its holder switches the wait back on after letting go, which is
        // after this; if not, this thread does, as a leader would.
        self.disarm();
        let guard = self.try_read()?;
        Some(Lead {
            inbox: self,
            guard: Some(guard),
            rearm: true,
        })
    }

    fn try_read(&self) -> Option<MutexGuard<'_, R>> {
        match self.reading.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Takes the lead when no one holds it: the reader thread's wait is off
    /// until the returned lead drops.
    pub(crate) fn try_lead(&self) -> Option<Lead<'_, R>> {
        let guard = self.try_read()?;
        // Off while this thread reads, so the reader thread is not woken for
        // bytes it cannot take.
        self.disarm();
        Some(Lead {
            inbox: self,
            guard: Some(guard),
            rearm: true,
        })
    }

    fn disarm(&self) {
        // It cannot fail for a descriptor this inbox owns and registered.
        let _ = self
            .epoll
            .modify(&self.watch, &mut EpollEvent::new(EpollFlags::empty(), 0));
    }

    /// Waits until the socket is readable, at most until `deadline`; `false` when it passed.
    ///
    /// # Errors
    ///
    /// The poll's errors (`Interrupted` counts as readable: the caller reads and comes back).
    pub(crate) fn wait_readable(&self, deadline: Instant) -> io::Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        // Rounded up: a wait never ends before the deadline, so it never spins.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut fds = [PollFd::new(self.watch.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => Ok(Instant::now() < deadline),
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn rearm(&self) {
        // It cannot fail for a descriptor this inbox owns and registered.
        let _ = self.epoll.modify(&self.watch, &mut armed());
    }
}

/// The lead of an [`Inbox`]: its reading state, held until dropped.
pub(crate) struct Lead<'a, R> {
    inbox: &'a Inbox<R>,
    guard: Option<MutexGuard<'a, R>>,
    /// Switch the reader thread's wait back on when letting go.
    rearm: bool,
}

impl<R> Lead<'_, R> {
    /// The inbox led.
    pub(crate) fn inbox(&self) -> &Inbox<R> {
        self.inbox
    }
}

impl<R> Deref for Lead<'_, R> {
    type Target = R;
    fn deref(&self) -> &R {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl<R> DerefMut for Lead<'_, R> {
    fn deref_mut(&mut self) -> &mut R {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl<R> Drop for Lead<'_, R> {
    fn drop(&mut self) {
        // Unlock first, then re-arm: a reader thread woken by the re-arm finds
        // the inbox free (or held by a new leader, who re-arms in turn).
        drop(self.guard.take());
        if self.rearm {
            self.inbox.rearm();
        }
    }
}
