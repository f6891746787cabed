//! Transports: how frames travel between nodes. Each scheme — `tcp://`,
//! `shm://`, `inproc://`, and `file://` for record and replay — implements
//! one trait, [`Transport`] (listen, connect), whose connections implement
//! [`Connection`] (write a frame, read frames, close):
//!
//! | scheme | module | a message travels as | read by |
//! |---|---|---|---|
//! | `tcp://` | [`tcp`] | frame bytes on a socket | an I/O thread (or a requester) |
//! | `shm://` | [`shm`] | a frame in a shared slot, or bytes through a shared ring | an I/O thread (or a requester) |
//! | `inproc://` | [`inproc`] | the message itself, by reference | nobody: the sender hands it over |
//! | `file://` | [`file`] | frame bytes appended to a file | a replaying subscription |
//!
//! The two byte transports share one connection, [`stream::StreamConn`]: a
//! frame [`Assembler`](assembler::Assembler) on the read side, an
//! [`Outbox`](outbox::Outbox) that never blocks on the write side, and the
//! lead a requester takes to read its own reply. What differs between them
//! is a [`ByteLink`]: how bytes are read and written without blocking, and
//! how a sleeping reader or writer is woken.

pub(crate) mod assembler;
pub mod auth;
pub mod file;
pub(crate) mod inproc;
pub(crate) mod outbox;
pub(crate) mod shm;
pub(crate) mod stream;
pub(crate) mod stripe;
pub(crate) mod tcp;
pub mod tls;

use std::io::{self, IoSlice};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::address::Address;
use crate::error::Result;
use crate::message::Message;
use crate::pool::BufferPool;
use crate::wire::{Encoded, Frame, FrameMeta, Limits};

use assembler::Router;
pub(crate) use outbox::Lane;
use shm::slots::SlotUse;

/// How a published message travels on a connection, so a publisher
/// prepares each form once for all the connections that need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carry {
    /// The message itself, by reference (inproc).
    Messages,
    /// An encoded frame (tcp, file).
    Frames,
    /// A frame in a shared-memory slot, written once for every such
    /// connection (shm).
    Slots,
}

/// One item a connection writes.
pub(crate) enum Outgoing {
    /// A message handed over by reference (inproc).
    Message {
        /// Channel, sequence number, kind and id.
        meta: FrameMeta,
        /// The message.
        message: Message,
    },
    /// An encoded frame.
    Frame(Arc<Encoded>),
    /// The first part of a frame striped over several connections
    /// ([`stripe`]): its plan, then the frame's bytes up to `end`; the
    /// rest travels on the stripes.
    Part {
        /// The whole frame (host-only).
        frame: Arc<Encoded>,
        /// The plan record written first.
        plan: [u8; 32],
        /// Where this part of the frame ends.
        end: u64,
    },
    /// A frame already in a shared slot (shm): the connection writes a
    /// small pointer frame, and holds the slot until the peer releases it.
    Slot {
        /// The hold on the slot.
        held: SlotUse,
        /// The frame's length in the slot.
        len: u64,
        /// The frame's channel and sequence number.
        meta: FrameMeta,
    },
}

/// What a frame handler tells the reader after each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Go on reading.
    Continue,
    /// Stop: the frame could not be delivered yet (a full queue under
    /// `block`). The reader is run again once there is room.
    Stall,
}

/// How a connection is read (by its I/O thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reading {
    /// Ask the transport to report the next bytes before the read goes
    /// idle; without, the reader polls (busy polling) and arms later.
    pub(crate) arm: bool,
    /// The transport reported readiness (not a nudge): a read side held by
    /// someone else then learns it may have missed something.
    pub(crate) evented: bool,
    /// The transport reported that the other end closed: from now on a read
    /// that comes back short is followed by another, until the end is read.
    pub(crate) closed: bool,
}

/// Why a read stopped.
#[derive(Debug)]
pub(crate) enum ReadStop {
    /// Nothing whole is left to read now; the transport will report more.
    Idle,
    /// Someone else holds the read side (a requester reading its reply);
    /// it reads what this call would have.
    Busy,
    /// The handler stalled.
    Stalled,
    /// The connection is over, and why.
    Ended(String),
    /// The peer broke the protocol (a frame that cannot be read, a lie about
    /// its lengths): the connection was closed, and what it did.
    Broken(String),
    /// The connection asked to be a stripe of another ([`stripe`]); it was
    /// left open for the node to hand over.
    Joined(stripe::Join),
}

/// What [`Transport::connect`] and a listener need from the node.
#[derive(Clone)]
pub(crate) struct Context {
    /// The node's name, for errors and the peer's records.
    pub(crate) node: String,
    /// How long connecting may retry.
    pub(crate) connect_timeout: Duration,
    /// Receive buffers.
    pub(crate) pool: BufferPool,
    /// Decoder limits for frames from peers.
    pub(crate) limits: Limits,
    /// Where tensors bound for devices go as they are read (tcp).
    pub(crate) router: Option<Router>,
    /// The node, for in-process connections made to it.
    pub(crate) inproc: Option<std::sync::Weak<dyn inproc::Accept>>,
    /// Users (besides this process's own) whose processes may connect over
    /// `shm://`.
    pub(crate) shm_uids: Vec<u32>,
    /// The shared secret every tcp peer must prove it knows.
    pub(crate) secret: Option<auth::Secret>,
    /// TLS for every tcp connection.
    pub(crate) tls: Option<Arc<tls::Tls>>,
}

/// A way to reach other nodes: one per scheme.
pub(crate) trait Transport: Sync {
    /// Starts listening on `addr`.
    ///
    /// # Errors
    ///
    /// An address this transport cannot listen on, or one already taken.
    fn listen(&self, addr: &Address, public: bool, ctx: &Context) -> Result<Box<dyn Listener>>;

    /// Opens a connection to `addr`, retrying until the context's connect
    /// timeout; blocks the calling thread meanwhile.
    ///
    /// # Errors
    ///
    /// An address nobody listens on within the timeout, or a handshake that fails.
    fn connect(&self, addr: &Address, ctx: &Context) -> Result<Arc<dyn Connection>>;
}

/// One connection's frames, whatever carries them: what a node's peer holds.
pub(crate) trait Connection: Send + Sync {
    /// Who is at the other end, as errors and records name it.
    fn label(&self) -> &str;

    /// How a published message travels on it.
    fn carries(&self) -> Carry;

    /// Writes one item, or queues it (counted against `lane` for a
    /// published message) to be written as the peer takes it. Never waits
    /// for the peer.
    ///
    /// # Errors
    ///
    /// Why the connection takes nothing more (it failed or closed).
    fn send(&self, item: Outgoing, lane: Option<Arc<Lane>>) -> std::result::Result<(), String>;

    /// Reads the frames there are now, handing each to `on_frame`.
    fn read(&self, on_frame: &mut dyn FnMut(Frame) -> Flow, how: Reading) -> ReadStop;

    /// Ends the connection: nothing more is written, what waits is dropped.
    fn close(&self, why: &str);

    /// The byte connection underneath, for what only those do: being
    /// watched by an I/O thread, and a requester reading its own reply.
    fn stream(&self) -> Option<&stream::StreamConn> {
        None
    }

    /// The in-process connection underneath, whose frames the node at the
    /// other end hands over.
    fn inproc(&self) -> Option<&inproc::InprocConn> {
        None
    }
}

/// A listening socket, driven by an I/O thread.
pub(crate) trait Listener: Send + Sync {
    /// The address it listens on, with a port picked by the system filled in.
    fn address(&self) -> Address;

    /// The descriptor an I/O thread waits on for new connections; `None`
    /// when connections arrive without one (inproc).
    fn fd(&self) -> Option<RawFd>;

    /// Accepts one waiting connection without blocking: `Ok(None)` when
    /// none waits. What it returns may still need its handshake
    /// ([`Accepted::Handshaking`]).
    ///
    /// # Errors
    ///
    /// The system's accept errors.
    fn accept(&self, ctx: &Context) -> io::Result<Option<Accepted>>;
}

/// A connection a listener accepted.
pub(crate) enum Accepted {
    /// Ready to carry frames.
    Open(Arc<dyn Connection>),
    /// Still exchanging what the transport needs before frames (shm: the
    /// rings); an I/O thread drives it until it is open or fails.
    Handshaking(Box<dyn Handshake>),
}

/// A connection still opening, driven without blocking by an I/O thread.
pub(crate) trait Handshake: Send {
    /// The descriptor to wait on.
    fn fd(&self) -> RawFd;

    /// Goes as far as it can now: `Ok(Some(connection))` when open,
    /// `Ok(None)` when it must wait for the peer.
    ///
    /// # Errors
    ///
    /// The peer closed, or sent something else than the handshake.
    fn advance(&mut self, ctx: &Context) -> Result<Option<Arc<dyn Connection>>>;

    /// When the peer must have answered.
    fn deadline(&self) -> Instant;

    /// Whether the last [`advance`](Self::advance) stopped for room in the
    /// socket (a TLS handshake's flight): the I/O thread then waits for
    /// writability too.
    fn wants_writable(&self) -> bool {
        false
    }

    /// What the peer has yet to do, for the log of one that ran out of time.
    fn stage(&self) -> &'static str;
}

/// The bytes of one `tcp://` or `shm://` connection: the part of a
/// connection that differs per transport. Every call is non-blocking but
/// [`wait_readable`](Self::wait_readable). The read calls are made by one
/// thread at a time (whoever holds the read side), and so are the write
/// calls (whoever holds the write turn).
pub(crate) trait ByteLink: Send + Sync + 'static {
    /// Who is at the other end, as errors and records name it.
    fn label(&self) -> &str;

    /// The descriptor an I/O thread waits on.
    fn fd(&self) -> RawFd;

    /// Whether the I/O thread waits for writability too (a socket whose
    /// send buffer fills), besides readability.
    fn wants_writable(&self) -> bool;

    /// How a published message travels on it.
    fn carries(&self) -> Carry;

    /// Reads what is there now; `WouldBlock` when nothing is, `Ok(0)` at the end.
    ///
    /// # Errors
    ///
    /// The transport's read errors; a peer that broke the transport's rules.
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// Whether a read costs no system call (a shared-memory ring).
    fn cheap_reads(&self) -> bool {
        false
    }

    /// Whether a wake-up saying the peer made room to write was taken in
    /// since the last call (a shared-memory ring rings one on its socket).
    /// Whoever takes such a wake-up off the socket (a read that drained it)
    /// must pump the writer: the wake-up that reported the room is gone.
    fn take_room_rung(&self) -> bool {
        false
    }

    /// Writes what fits now of `bufs`; `WouldBlock` when nothing does.
    ///
    /// # Errors
    ///
    /// The transport's write errors (a closed peer among them).
    fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Makes what was written visible to the peer (a ring publishes its
    /// position and wakes a sleeping reader; a socket has sent it already).
    fn flush(&self) {}

    /// Writes, as far as the socket takes them now, bytes the link took
    /// from [`write_now`](Self::write_now) but still holds (TLS records the
    /// socket had no room for): `Ok(true)` when some still wait for room.
    ///
    /// # Errors
    ///
    /// The transport's write errors.
    fn send_held(&self) -> io::Result<bool> {
        Ok(false)
    }

    /// Whether the link holds bytes to send that no writer handed it (a TLS
    /// alert or key update made while reading): its writer must run.
    fn holds_output(&self) -> bool {
        false
    }

    /// Runs on the I/O thread when the descriptor is readable, before any
    /// read: a shm connection takes slot descriptors, wake-ups and the end
    /// from its socket here.
    ///
    /// # Errors
    ///
    /// A peer that broke the transport's rules; the connection ends.
    fn on_readable(&self) -> io::Result<()> {
        Ok(())
    }

    /// The read side is going idle: arranges for the I/O thread to be told
    /// of the next bytes. `true` when bytes came meanwhile (read again).
    fn idle_read(&self) -> bool {
        false
    }

    /// Whether bytes wait that no readiness event reports (a ring): what a
    /// busy-polling I/O thread looks at. Costs no system call.
    fn has_input(&self) -> bool {
        false
    }

    /// A write could not finish: arranges for the I/O thread to be told
    /// when there is room. `true` when room came meanwhile (write again).
    fn idle_write(&self) -> bool {
        false
    }

    /// Whether a requester reading its own reply takes the descriptor out
    /// of the I/O thread's wait meanwhile (a socket), or the transport
    /// keeps the I/O thread from being woken itself (a ring).
    fn pause_while_led(&self) -> bool {
        true
    }

    /// A requester takes the read side.
    fn lead(&self) {}

    /// The requester leaves the read side.
    fn unlead(&self) {}

    /// Ends a [`wait_readable`](Self::wait_readable) of this process at
    /// once (it returns `Ok(true)`; its caller finds nothing new to read and
    /// looks elsewhere); one that starts later returns at once too. Does
    /// nothing on links that are not [`interruptible`](Self::interruptible).
    fn interrupt_wait(&self) {}

    /// Whether [`interrupt_wait`](Self::interrupt_wait) ends a wait here, so
    /// that a subscriber, whose messages may come from elsewhere too, can
    /// lead the read side and wait on it.
    fn interruptible(&self) -> bool {
        false
    }

    /// For the requester leading the read side: waits until there may be
    /// something to read, at most until `deadline`; `false` when it passed.
    ///
    /// # Errors
    ///
    /// The wait's own errors.
    fn wait_readable(&self, deadline: Instant) -> io::Result<bool>;

    /// For a dialer opening the link: waits until it may take more writes,
    /// at most until `deadline`; `false` when it passed.
    ///
    /// # Errors
    ///
    /// The wait's own errors; a transport whose dialers never wait to write.
    fn wait_writable(&self, _deadline: Instant) -> io::Result<bool> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this transport's dialers do not wait to write",
        ))
    }

    /// Sends a descriptor ahead of the frame that announces it (shm slots).
    ///
    /// # Errors
    ///
    /// On a transport that carries no descriptors, or the socket's errors.
    fn send_fd(&self, _fd: RawFd) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this transport carries no descriptors",
        ))
    }

    /// The next descriptor the peer sent.
    fn take_fd(&self) -> Option<OwnedFd> {
        None
    }

    /// Keeps a hold on a shared slot whose pointer frame was written, until
    /// the peer says it is done with the slot (shm).
    fn keep_until_released(&self, _held: SlotUse) {}

    /// The peer is done with the frame at `offset` in shared slot `slot`.
    fn release_slot(&self, _slot: u32, _offset: u64) {}

    /// Whether the peer may be sent another shared slot now: it holds
    /// fewer than the transport allows (shm). A slot that must wait is
    /// written once the peer releases one.
    fn slot_room(&self) -> bool {
        true
    }

    /// Ends the connection both ways; the read side then reports the end.
    fn shutdown(&self);
}

/// The transport that serves `addr`'s scheme.
pub(crate) fn for_address(addr: &Address) -> &'static dyn Transport {
    match addr {
        Address::Tcp(_) => &tcp::Tcp,
        Address::Shm(_) => &shm::Shm,
        Address::Inproc(_) => &inproc::Inproc,
        Address::File(_) => &file::File,
    }
}

/// Wraps an open byte link in a connection, read with the context's pool,
/// limits and router.
pub(crate) fn stream_connection(link: Box<dyn ByteLink>, ctx: &Context) -> Arc<dyn Connection> {
    Arc::new(stream::StreamConn::new(
        link,
        ctx.pool.clone(),
        ctx.limits,
        ctx.router.clone(),
    ))
}

/// Retries `connect` with exponential backoff until it succeeds or `timeout` passes.
pub(crate) fn retry<T>(
    what: &Address,
    timeout: Duration,
    mut connect: impl FnMut() -> io::Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(10);
    loop {
        let last = match connect() {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if Instant::now() + wait > deadline {
            return Err(crate::error::Error::io(
                format!(
                    "connecting to {what} (retried for {} ms)",
                    timeout.as_millis()
                ),
                last,
            ));
        }
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(500));
    }
}
