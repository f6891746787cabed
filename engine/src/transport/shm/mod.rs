//! `shm://NAME`: frames between processes on one host through shared memory.
//!
//! A connection is an abstract Unix socket (nothing appears in the
//! filesystem) plus two [`Ring`]s, one per direction, each a sealed memfd
//! that its writer creates and passes to the other side when the connection
//! opens. After that:
//!
//! - frames travel through the rings: written in without blocking, made
//!   visible to the reader at the end of a batch ([`ByteLink::flush`]);
//! - the socket carries one-byte messages only: a shared slot's descriptor
//!   (`F`, with the descriptor attached), and wake-ups — *data* (`D`) when
//!   the reader's I/O thread said it sleeps, *space* (`S`) when the writer
//!   waits for room — so the peer's I/O thread, which waits on the socket,
//!   is woken exactly when it has something to do; and its end tells each
//!   side the other has gone;
//! - a requester reading its own reply sleeps on a futex in the ring
//!   instead, and the writer wakes it there, not the I/O thread; so does a
//!   subscriber reading its own connection while its queue is empty
//!   (`node/subscribe.rs`), and a message queued for it from elsewhere ends
//!   that sleep ([`ByteLink::interrupt_wait`]).
//!
//! Published messages larger than 64 KiB travel in shared *slots*
//! ([`slots`]): copied once into a slot that every shm subscriber maps, the
//! ring carrying a small pointer frame; smaller ones go through the ring
//! like any frame. A peer may send at most [`MAX_UNCLAIMED_FDS`]
//! descriptors that no frame has claimed; more ends its connection.

mod ring;
pub(crate) mod slots;

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::sockopt::PeerCredentials;
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr,
};

use std::sync::Arc;

use super::{
    retry, stream_connection, Accepted, ByteLink, Carry, Connection, Context, Handshake, Listener,
    Transport,
};
use crate::address::Address;
use crate::error::{Error, Result};
use crate::futex;
use ring::{Ring, RING_BYTES};
use slots::SlotUse;

/// Sleeper bit: the reader's I/O thread, woken by a `D` on the socket.
const READER: u32 = 1;
/// Sleeper bit: a requester reading its own reply, woken by the futex.
const LEADER: u32 = 2;

/// The byte that opens a connection, sent with the descriptor of the sender's ring.
const HELLO: u8 = b'P';
/// The byte that carries the descriptor of a shared slot.
const SLOT_FD: u8 = b'F';
/// Wake-up: there are bytes to read.
const DATA: u8 = b'D';
/// Wake-up: there is room to write.
const SPACE: u8 = b'S';

/// How long a new connection waits for the other side's ring.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// Most slot descriptors a peer may send ahead of the frames that claim them
/// (a sender announces each slot once, so a well-behaved peer has a few).
pub(crate) const MAX_UNCLAIMED_FDS: usize = 1024;
/// Most shared slots a peer may hold (frames written, not yet released):
/// past it, the next published frames wait in the connection's queue, so a
/// subscriber that keeps its messages slows its publisher instead of making
/// it create slot after slot. It also bounds the descriptors this side
/// sends ahead of the frames that claim them, well below [`MAX_UNCLAIMED_FDS`].
const MAX_SLOTS_HELD: usize = 256;

/// The `shm://` transport.
pub(crate) struct Shm;

/// The abstract socket address of `shm://NAME`.
fn socket_addr(name: &str) -> Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("tensorferry/{name}").as_bytes())
        .map_err(|e| Error::io(format!("naming shm://{name}"), e))
}

impl Transport for Shm {
    fn listen(&self, addr: &Address, _public: bool, _ctx: &Context) -> Result<Box<dyn Listener>> {
        let Address::Shm(name) = addr else {
            return Err(Error::Invalid(format!("{addr} is not a shm:// address")));
        };
        let listener = UnixListener::bind_addr(&socket_addr(name)?)
            .map_err(|e| Error::io(format!("binding {addr}"), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring the listener", e))?;
        Ok(Box::new(ShmListening {
            listener,
            address: addr.clone(),
        }))
    }

    fn connect(&self, addr: &Address, ctx: &Context) -> Result<Arc<dyn Connection>> {
        let Address::Shm(name) = addr else {
            return Err(Error::Invalid(format!("{addr} is not a shm:// address")));
        };
        let sock = socket_addr(name)?;
        let stream = retry(addr, ctx.connect_timeout, || {
            UnixStream::connect_addr(&sock)
        })?;
        let label = addr.to_string();
        // Both sides send their ring first, so neither waits for the other to read.
        let (outgoing, fd) = Ring::create(RING_BYTES)?;
        send_fd(&stream, HELLO, fd.as_raw_fd())
            .map_err(|e| Error::io("sending the shared-memory ring", e))?;
        stream
            .set_read_timeout(Some(HANDSHAKE))
            .map_err(|e| Error::io("setting up a shm connection", e))?;
        let answer = recv_fd(&stream).map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe => Error::PeerLost {
                peer: label.clone(),
                reason: format!("the connection closed while it opened: {e}"),
            },
            _ => Error::io(
                "waiting for the peer's shared-memory ring (is it a tensorferry node of this version?)",
                e,
            ),
        })?;
        let (HELLO, Some(fd)) = answer else {
            return Err(Error::Invalid(
                "the peer opened a shm connection without its shared-memory ring".into(),
            ));
        };
        let link = ShmLink::new(stream, Ring::open(fd)?, outgoing, label)?;
        // No router: a message's bytes come in a shared slot that is mapped
        // already, or through the ring, not through a socket, so there is no
        // read to overlap with a copy; landing copies them to their devices.
        let ctx = Context {
            router: None,
            ..ctx.clone()
        };
        Ok(stream_connection(Box::new(link), &ctx))
    }
}

struct ShmListening {
    listener: UnixListener,
    address: Address,
}

impl Listener for ShmListening {
    fn address(&self) -> Address {
        self.address.clone()
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.listener.as_raw_fd())
    }

    fn accept(&self, ctx: &Context) -> io::Result<Option<Accepted>> {
        let stream = loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            // Only processes of this user (or of users the node allows) may
            // share its memory: checked before anything is sent.
            let creds = getsockopt(&stream, PeerCredentials)?;
            // SAFETY: geteuid takes no arguments, cannot fail and touches no memory.
            let own = unsafe { libc::geteuid() };
            if creds.uid() == own || ctx.shm_uids.contains(&creds.uid()) {
                break stream;
            }
            tracing::warn!(
                listener = %self.address,
                uid = creds.uid(),
                pid = creds.pid(),
                "refused a shm connection from another user (allow it with NodeBuilder::shm_peer_uids)"
            );
        };
        stream.set_nonblocking(true)?;
        let (outgoing, fd) = Ring::create(RING_BYTES).map_err(io::Error::other)?;
        send_fd(&stream, HELLO, fd.as_raw_fd())?;
        Ok(Some(Accepted::Handshaking(Box::new(AcceptShake {
            stream: Some(stream),
            outgoing: Some(outgoing),
            label: format!("{} peer", self.address),
            deadline: Instant::now() + HANDSHAKE,
        }))))
    }
}

/// An accepted connection waiting for the peer's ring.
struct AcceptShake {
    stream: Option<UnixStream>,
    outgoing: Option<Ring>,
    label: String,
    deadline: Instant,
}

impl Handshake for AcceptShake {
    fn fd(&self) -> RawFd {
        self.stream.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    fn advance(&mut self, ctx: &Context) -> Result<Option<Arc<dyn Connection>>> {
        let Some(stream) = &self.stream else {
            return Err(Error::Invalid("the handshake is over".into()));
        };
        let answer = match recv_fd(stream) {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => {
                return Err(Error::PeerLost {
                    peer: self.label.clone(),
                    reason: format!("the connection closed while it opened: {e}"),
                })
            }
        };
        let (HELLO, Some(fd)) = answer else {
            return Err(Error::Invalid(format!(
                "{} opened a shm connection without its shared-memory ring",
                self.label
            )));
        };
        let (Some(stream), Some(outgoing)) = (self.stream.take(), self.outgoing.take()) else {
            return Err(Error::Invalid("the handshake is over".into()));
        };
        let link = ShmLink::new(stream, Ring::open(fd)?, outgoing, self.label.clone())?;
        let ctx = Context {
            router: None,
            ..ctx.clone()
        };
        Ok(Some(stream_connection(Box::new(link), &ctx)))
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn stage(&self) -> &'static str {
        "sending its shared-memory ring"
    }
}

/// What the socket brought that the reader has not taken yet.
struct SocketIn {
    fds: VecDeque<OwnedFd>,
}

/// One `shm://` connection's bytes: the socket and both rings.
pub(crate) struct ShmLink {
    label: String,
    stream: UnixStream,
    /// The ring the peer writes and this side reads.
    incoming: Ring,
    /// The ring this side writes.
    outgoing: Ring,
    /// The socket ended: nothing more will be written to `incoming`.
    gone: AtomicBool,
    /// A wait of this process on `incoming` was asked to end
    /// ([`ByteLink::interrupt_wait`]).
    interrupted: AtomicBool,
    /// A wake-up saying the peer made room in `outgoing` was taken off the
    /// socket and not yet acted on (see [`ByteLink::take_room_rung`]).
    room_rung: AtomicBool,
    /// Bytes of `incoming` read (this side is its only reader).
    tail: AtomicU64,
    /// Bytes of `outgoing` written, published or not.
    head: AtomicU64,
    /// Bytes of `outgoing` the reader has been told of.
    published: AtomicU64,
    /// The reader's position when last looked at.
    seen_tail: AtomicU64,
    socket_in: Mutex<SocketIn>,
    /// Holds on shared slots until the peer releases the frame in them.
    awaiting: Mutex<HashMap<(u32, u64), SlotUse>>,
}

impl ShmLink {
    fn new(stream: UnixStream, incoming: Ring, outgoing: Ring, label: String) -> Result<Self> {
        stream
            .set_read_timeout(None)
            .and_then(|()| stream.set_nonblocking(true))
            .map_err(|e| Error::io("setting up a shm connection", e))?;
        let tail = incoming.tail().load(Ordering::SeqCst);
        let head = outgoing.head().load(Ordering::SeqCst);
        let seen_tail = outgoing.tail().load(Ordering::SeqCst);
        Ok(Self {
            label,
            stream,
            incoming,
            outgoing,
            gone: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
            room_rung: AtomicBool::new(false),
            tail: AtomicU64::new(tail),
            head: AtomicU64::new(head),
            published: AtomicU64::new(head),
            seen_tail: AtomicU64::new(seen_tail),
            socket_in: Mutex::new(SocketIn {
                fds: VecDeque::new(),
            }),
            awaiting: Mutex::new(HashMap::new()),
        })
    }

    /// Sends a one-byte wake-up; a full socket means the peer has unread
    /// bytes there already, which wake it as well.
    fn ring(&self, byte: u8) {
        let _ = sendmsg::<UnixAddr>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(&[byte])],
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        );
    }

    fn readable(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
            || self.incoming.head().load(Ordering::SeqCst) != self.tail.load(Ordering::SeqCst)
    }

    /// The connection is over: wakes a requester waiting on the ring.
    fn end(&self, why: &str) {
        if !self.gone.swap(true, Ordering::SeqCst) {
            tracing::debug!(peer = %self.label, why, "shm connection ended");
        }
        self.incoming.data_word().fetch_add(1, Ordering::SeqCst);
        futex::wake(self.incoming.data_word(), futex::ALL);
    }

    /// Takes what the socket brought: descriptors into the queue, wake-ups
    /// dropped (their only job was to wake), the end noted. A read takes a
    /// run of wake-ups at once, and at most one descriptor (the system ends
    /// a read after the message that carries one). It reads until the
    /// socket is empty or ended: a read that comes back short may still be
    /// followed by the peer's end — a peer that wrote and then died wakes
    /// the I/O thread once for both, and an end left unread would never be
    /// reported.
    fn drain_socket(&self, socket_in: &mut SocketIn) -> io::Result<()> {
        let mut bytes = [0u8; 64];
        loop {
            let (n, fd) = match recv_with_fd(&self.stream, &mut bytes) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.end("the socket ended");
                    return Ok(());
                }
                Err(e) => {
                    self.end("the socket failed");
                    return Err(e);
                }
            };
            let mut fd = fd;
            for &byte in &bytes[..n] {
                let offence = match byte {
                    DATA => continue,
                    SPACE => {
                        self.room_rung.store(true, Ordering::SeqCst);
                        continue;
                    }
                    SLOT_FD => match fd.take() {
                        Some(_) if socket_in.fds.len() >= MAX_UNCLAIMED_FDS => format!(
                            "the peer sent more than {MAX_UNCLAIMED_FDS} shared-memory descriptors that no frame claimed"
                        ),
                        Some(fd) => {
                            socket_in.fds.push_back(fd);
                            continue;
                        }
                        None => "the peer announced a descriptor on the shm socket without sending one".into(),
                    },
                    other => format!(
                        "the peer sent byte {other:#04x} on the shm socket, which carries only descriptors and wake-ups"
                    ),
                };
                self.end("the peer broke the socket's protocol");
                return Err(io::Error::new(io::ErrorKind::InvalidData, offence));
            }
            if fd.is_some() {
                self.end("the peer broke the socket's protocol");
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the peer sent a descriptor with a wake-up instead of an `F`",
                ));
            }
        }
    }
}

impl ByteLink for ShmLink {
    fn label(&self) -> &str {
        &self.label
    }

    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn wants_writable(&self) -> bool {
        false
    }

    fn carries(&self) -> Carry {
        Carry::Slots
    }

    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        let ring = &self.incoming;
        // The end first: bytes written before it are read before it is reported.
        let gone = self.gone.load(Ordering::SeqCst);
        let tail = self.tail.load(Ordering::Relaxed);
        let head = ring.head().load(Ordering::Acquire);
        let filled = ring.filled(head, tail)?;
        if filled == 0 {
            return if gone {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = filled.min(buf.len());
        ring.copy_out(tail, &mut buf[..n]);
        let tail = tail.wrapping_add(n as u64);
        self.tail.store(tail, Ordering::Relaxed);
        ring.tail().store(tail, Ordering::SeqCst);
        // The writer says it waits before it looks at `tail` a last time, so
        // either it sees the room made here or this sees it waiting. It is
        // rung once half the ring is free, not at the first free byte: a
        // writer kept waiting by a slower reader then wakes once per half a
        // ring, not once per frame. A reader only stops short of that with
        // a connection stalled by its consumer, when the writer waits anyway.
        if filled - n <= ring.cap / 2
            && ring.writer_waits().load(Ordering::SeqCst) != 0
            && ring.writer_waits().swap(0, Ordering::SeqCst) != 0
        {
            self.ring(SPACE);
        }
        Ok(n)
    }

    fn cheap_reads(&self) -> bool {
        true
    }

    fn take_room_rung(&self) -> bool {
        self.room_rung.swap(false, Ordering::SeqCst)
    }

    fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.gone.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the peer closed the connection",
            ));
        }
        let ring = &self.outgoing;
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let mut head = self.head.load(Ordering::Relaxed);
        let mut room = ring.cap - ring.filled(head, self.seen_tail.load(Ordering::Relaxed))?;
        if room < want {
            // Look at the reader's position only when the room seen runs out.
            let tail = ring.tail().load(Ordering::SeqCst);
            self.seen_tail.store(tail, Ordering::Relaxed);
            room = ring.cap - ring.filled(head, tail)?;
        }
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut written = 0;
        for b in bufs {
            let n = b.len().min(room - written);
            ring.copy_in(head, &b[..n]);
            head = head.wrapping_add(n as u64);
            written += n;
            if written == room {
                break;
            }
        }
        self.head.store(head, Ordering::Relaxed);
        Ok(written)
    }

    fn flush(&self) {
        let head = self.head.load(Ordering::Relaxed);
        if self.published.swap(head, Ordering::Relaxed) == head {
            return;
        }
        let ring = &self.outgoing;
        ring.head().store(head, Ordering::SeqCst);
        // A reader says it sleeps before it looks at `head` a last time, so
        // either it sees the bytes published here or this sees it sleeping.
        let sleepers = ring.sleepers().load(Ordering::SeqCst);
        if sleepers & LEADER != 0 {
            ring.data_word().fetch_add(1, Ordering::SeqCst);
            futex::wake(ring.data_word(), LEADER);
        }
        if sleepers & READER != 0
            && ring.sleepers().fetch_and(!READER, Ordering::SeqCst) & READER != 0
        {
            self.ring(DATA);
        }
    }

    fn on_readable(&self) -> io::Result<()> {
        let mut socket_in = self.socket_in.lock().unwrap_or_else(|p| p.into_inner());
        self.drain_socket(&mut socket_in)
    }

    fn idle_read(&self) -> bool {
        self.incoming.sleepers().fetch_or(READER, Ordering::SeqCst);
        self.readable()
    }

    fn idle_write(&self) -> bool {
        let ring = &self.outgoing;
        ring.writer_waits().store(1, Ordering::SeqCst);
        let tail = ring.tail().load(Ordering::SeqCst);
        self.seen_tail.store(tail, Ordering::Relaxed);
        let head = self.head.load(Ordering::Relaxed);
        let room = ring
            .filled(head, tail)
            .is_ok_and(|filled| filled < ring.cap);
        room || self.gone.load(Ordering::SeqCst)
    }

    fn has_input(&self) -> bool {
        self.readable()
    }

    fn pause_while_led(&self) -> bool {
        false
    }

    fn lead(&self) {
        // The writer stops ringing the I/O thread: the requester reads.
        self.incoming
            .sleepers()
            .fetch_and(!READER, Ordering::SeqCst);
    }

    fn wait_readable(&self, deadline: Instant) -> io::Result<bool> {
        let ring = &self.incoming;
        let ready = || self.readable() || self.interrupted.swap(false, Ordering::SeqCst);
        loop {
            let seen = ring.data_word().load(Ordering::SeqCst);
            if ready() {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            ring.sleepers().fetch_or(LEADER, Ordering::SeqCst);
            if ready() {
                ring.sleepers().fetch_and(!LEADER, Ordering::SeqCst);
                return Ok(true);
            }
            futex::wait(ring.data_word(), seen, LEADER, Some(left));
            ring.sleepers().fetch_and(!LEADER, Ordering::SeqCst);
        }
    }

    fn interruptible(&self) -> bool {
        true
    }

    fn interrupt_wait(&self) {
        // The flag is seen by a wait that has not slept yet; the word's
        // change and the wake-up end one that has (as the writer's do).
        self.interrupted.store(true, Ordering::SeqCst);
        let ring = &self.incoming;
        ring.data_word().fetch_add(1, Ordering::SeqCst);
        if ring.sleepers().load(Ordering::SeqCst) & LEADER != 0 {
            futex::wake(ring.data_word(), LEADER);
        }
    }

    fn send_fd(&self, fd: RawFd) -> io::Result<()> {
        send_fd(&self.stream, SLOT_FD, fd)
    }

    fn take_fd(&self) -> Option<OwnedFd> {
        let mut socket_in = self.socket_in.lock().unwrap_or_else(|p| p.into_inner());
        if socket_in.fds.is_empty() {
            // The peer sends a descriptor before the frame that announces
            // it: when the frame is here, the descriptor is in the socket.
            if self.drain_socket(&mut socket_in).is_err() {
                return None;
            }
        }
        socket_in.fds.pop_front()
    }

    fn keep_until_released(&self, held: SlotUse) {
        let key = (held.0.id, 0);
        self.awaiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, held);
    }

    fn release_slot(&self, slot: u32, offset: u64) {
        self.awaiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(slot, offset));
    }

    fn slot_room(&self) -> bool {
        self.awaiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            < MAX_SLOTS_HELD
    }

    fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.end("shut down here");
        self.retire_unreleased();
    }
}

impl ShmLink {
    /// The peer can no longer release the frames it was sent, and may still
    /// be reading them (its node closed, its process lives on): their slots
    /// are never written again.
    fn retire_unreleased(&self) {
        let held: Vec<SlotUse> = self
            .awaiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, held)| held)
            .collect();
        for h in held {
            h.retire();
        }
    }
}

impl Drop for ShmLink {
    fn drop(&mut self) {
        self.retire_unreleased();
    }
}

/// Sends one byte with one descriptor. A full socket is waited on briefly:
/// a descriptor cannot be dropped (the frame announcing it would find
/// nothing).
fn send_fd(stream: &UnixStream, byte: u8, fd: RawFd) -> io::Result<()> {
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let deadline = Instant::now() + HANDSHAKE;
    loop {
        match sendmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &[IoSlice::new(&[byte])],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(1) => return Ok(()),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the socket took no byte",
                ))
            }
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one byte and the descriptor that came with it, if any, without
/// blocking on a non-blocking socket. The end of the stream is an
/// `UnexpectedEof` error.
fn recv_fd(stream: &UnixStream) -> io::Result<(u8, Option<OwnedFd>)> {
    let mut byte = [0u8; 1];
    let (_, fd) = recv_with_fd(stream, &mut byte)?;
    Ok((byte[0], fd))
}

/// Receives what fits in `buf` and the one descriptor that came with it,
/// if any. The end of the stream is an `UnexpectedEof` error.
fn recv_with_fd(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
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
        return Ok((msg.bytes, got));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first byte waiting on `link`'s socket, left there.
    fn peek(link: &ShmLink) -> io::Result<u8> {
        let mut byte = [0u8; 1];
        nix::sys::socket::recv(
            link.stream.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(byte[0])
    }

    /// Both ends of one connection.
    fn pair() -> (ShmLink, ShmLink) {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let (ra, fa) = Ring::create(RING_BYTES).expect("ring");
        let (rb, fb) = Ring::create(RING_BYTES).expect("ring");
        let a_in = Ring::open(fb).expect("open");
        let b_in = Ring::open(fa).expect("open");
        (
            ShmLink::new(a, a_in, ra, "a".into()).expect("a"),
            ShmLink::new(b, b_in, rb, "b".into()).expect("b"),
        )
    }

    #[test]
    fn a_peer_that_wakes_and_dies_at_once_is_seen_ended_by_one_drain() {
        // A peer killed right after it rang: its wake-up and its end come
        // with one readiness event, and one drain must see both, or the
        // end is never reported (the I/O thread is not woken again).
        let (a, b) = pair();
        b.ring(DATA);
        b.ring(SPACE);
        drop(b);
        a.on_readable().expect("drain");
        assert!(a.gone.load(Ordering::SeqCst), "the end was left unread");
        let mut buf = [0u8; 8];
        assert_eq!(a.read_now(&mut buf).expect("the end"), 0);
    }

    #[test]
    fn room_reported_on_the_socket_is_kept_for_the_writer_when_a_read_drains_it() {
        // A writer waits for room; the reader makes some and rings. If the
        // writer's I/O thread had pumped just before, the drain of its next
        // read takes that wake-up off the socket: the drain must say so, or
        // the writer waits for a wake-up that already came and went.
        let (a, b) = pair();
        let chunk = vec![7u8; RING_BYTES];
        let wrote = a.write_now(&[IoSlice::new(&chunk)]).expect("fill the ring");
        assert_eq!(wrote, RING_BYTES);
        a.flush();
        assert!(!a.idle_write(), "the ring is full: the writer waits");
        assert!(!a.take_room_rung());
        // Half the ring read: the reader rings.
        let _ = read_exactly(&b, RING_BYTES / 2);
        a.on_readable().expect("drain");
        assert!(a.take_room_rung(), "the drained wake-up reported room");
        assert!(!a.take_room_rung(), "taken once");
    }

    fn read_exactly(link: &ShmLink, n: usize) -> Vec<u8> {
        let mut out = vec![0xAA; n];
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while got < n {
            match link.read_now(&mut out[got..]) {
                Ok(0) => panic!("ended after {got} of {n} bytes"),
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "stuck after {got} of {n}");
                    link.wait_readable(Instant::now() + Duration::from_millis(50))
                        .expect("wait");
                }
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    /// Writes all of `data`, waiting (by polling) for room when the ring is full.
    fn write_all(link: &ShmLink, data: &[u8]) {
        let mut at = 0;
        while at < data.len() {
            match link.write_now(&[IoSlice::new(&data[at..])]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    link.flush();
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => panic!("{e}"),
            }
        }
        link.flush();
    }

    #[test]
    fn bytes_cross_in_order_through_many_wraps() {
        let (a, b) = pair();
        let total = 5 * RING_BYTES + 12_345;
        let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            // Odd piece sizes, so writes straddle the ring's end.
            for piece in sent.chunks(77_777) {
                write_all(&a, piece);
            }
            a
        });
        let got = read_exactly(&b, total);
        drop(writer.join().expect("writer"));
        assert!(got == data, "bytes differ after crossing the ring");
    }

    #[test]
    fn nothing_is_visible_before_flush() {
        let (a, b) = pair();
        a.write_now(&[IoSlice::new(b"frame")]).expect("write");
        let mut buf = [0u8; 8];
        assert_eq!(
            b.read_now(&mut buf).expect_err("not yet").kind(),
            io::ErrorKind::WouldBlock
        );
        a.flush();
        assert_eq!(b.read_now(&mut buf).expect("read"), 5);
        assert_eq!(&buf[..5], b"frame");
    }

    #[test]
    fn the_end_of_the_socket_ends_the_ring_after_its_bytes() {
        let (a, b) = pair();
        write_all(&a, b"last words");
        a.shutdown();
        drop(a);
        b.on_readable().expect("the end is not an error");
        assert_eq!(read_exactly(&b, 10), b"last words");
        let mut buf = [0u8; 4];
        assert_eq!(b.read_now(&mut buf).expect("end"), 0);
    }

    #[test]
    fn a_full_ring_takes_nothing_and_asks_for_a_space_wake_up() {
        let (a, b) = pair();
        let big = vec![1u8; RING_BYTES + 10];
        let n = a.write_now(&[IoSlice::new(&big)]).expect("write");
        assert_eq!(n, RING_BYTES);
        assert_eq!(
            a.write_now(&[IoSlice::new(&big)]).expect_err("full").kind(),
            io::ErrorKind::WouldBlock
        );
        a.flush();
        assert!(!a.idle_write(), "no room yet");
        // The reader rings once half the ring is free, not at each read:
        // the writer's socket has one `S` after the read that crossed half.
        let mut buf = vec![0u8; 4096];
        let mut read = 0;
        while read < RING_BYTES / 2 - 4096 {
            assert_eq!(b.read_now(&mut buf).expect("read"), 4096);
            read += 4096;
            assert_eq!(
                peek(&a).expect_err("no wake-up yet").kind(),
                io::ErrorKind::WouldBlock,
                "rung after {read} bytes read"
            );
        }
        assert_eq!(b.read_now(&mut buf).expect("read"), 4096);
        assert_eq!(peek(&a).expect("a wake-up"), SPACE);
        a.on_readable().expect("drain");
        assert!(a.idle_write(), "room now");
    }

    #[test]
    fn a_ring_claiming_more_than_it_holds_is_an_error_not_a_read() {
        let (a, b) = pair();
        // A hostile peer's position: far past what the ring can hold.
        a.outgoing
            .head()
            .store(3 * RING_BYTES as u64, Ordering::SeqCst);
        let mut buf = [0u8; 16];
        let err = b.read_now(&mut buf).expect_err("corrupt positions");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn slot_descriptors_arrive_through_the_socket() {
        let (a, b) = pair();
        let (_ring, fd) = Ring::create(4096).expect("ring");
        a.send_fd(fd.as_raw_fd()).expect("send fd");
        let got = b.take_fd().expect("a descriptor");
        // The received descriptor is the same memory: it maps with the same size.
        let ring = Ring::open(got).expect("open");
        assert_eq!(ring.cap, 4096);
    }

    #[test]
    fn a_peer_piling_up_descriptors_ends_its_connection() {
        let (a, b) = pair();
        let (_ring, fd) = Ring::create(4096).expect("ring");
        // The socket holds only so many descriptors in flight: send from
        // another thread while this one takes them.
        let sender = std::thread::spawn(move || {
            let mut sent = 0;
            while sent <= MAX_UNCLAIMED_FDS && a.send_fd(fd.as_raw_fd()).is_ok() {
                sent += 1;
            }
            sent
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let err = loop {
            match b.on_readable() {
                Err(e) => break e,
                Ok(()) => {
                    assert!(Instant::now() < deadline, "still open");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(b.gone.load(Ordering::SeqCst));
        drop(b);
        assert!(sender.join().expect("sender") > MAX_UNCLAIMED_FDS);
    }

    #[test]
    fn a_sleeping_reader_is_rung_once_and_a_leader_is_woken_instead() {
        let (a, b) = pair();
        let b = Arc::new(b);
        // The I/O thread goes idle: the next frame rings it, once.
        assert!(!b.idle_read());
        write_all(&a, b"one");
        write_all(&a, b"two");
        assert_eq!(peek(&b).expect("a wake-up"), DATA);
        b.on_readable().expect("drain");
        assert_eq!(
            peek(&b).expect_err("one wake-up, not two").kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(read_exactly(&b, 6), b"onetwo");
        // A requester leads: the writer wakes it on the futex, and does not ring.
        b.lead();
        let waiter = std::thread::spawn({
            let b = Arc::clone(&b);
            move || b.wait_readable(Instant::now() + Duration::from_secs(10))
        });
        std::thread::sleep(Duration::from_millis(20));
        write_all(&a, b"reply");
        assert!(waiter.join().expect("waiter").expect("wait"));
        assert_eq!(
            peek(&b).expect_err("no ring").kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
