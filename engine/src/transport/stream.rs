//! [`StreamConn`]: one `tcp://` or `shm://` connection — its [`ByteLink`],
//! the frame [`Assembler`] of its read side and the [`Outbox`] of its write
//! side — as the node's I/O thread and its requesters use it.
//!
//! The read side is held by one reader at a time. Normally that is the I/O
//! thread, when the connection is readable. A requester waiting for its
//! reply takes the *lead* instead ([`StreamConn::lead`]): it writes its
//! request, then reads the connection itself until the reply comes, so the
//! reply wakes the thread that waits for it and no other, as in a raw
//! ping-pong. Meanwhile the I/O thread is kept from being woken for those
//! bytes (a socket is taken out of its wait; a ring stops ringing it), and
//! anything the I/O thread was asked to read meanwhile is handed back to it
//! when the lead ends.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use super::assembler::{Assembler, Next, Router, Source};
use super::outbox::{small_host_frame, Lane, Outbox, Pumped};
use super::stripe::{Join, Stripes};
use super::{ByteLink, Carry, Connection, Flow, Outgoing, ReadStop, Reading};
use crate::pool::BufferPool;
use crate::reactor::Registration;
use crate::wire::{Frame, Limits};
use std::sync::Arc;

/// The read side: frames being built, and whether the stream is over.
struct ReadSide {
    assembler: Assembler,
    ended: Option<End>,
}

/// Why a stream is over.
#[derive(Debug, Clone)]
pub(crate) enum End {
    /// It closed or failed.
    Closed(String),
    /// The peer broke the protocol; the connection was closed.
    Broken(String),
    /// The connection asked to be a stripe of another ([`stripe`]): it is
    /// no frame connection any more, and was left open for that one.
    Joined(Join),
}

impl End {
    fn stop(self) -> ReadStop {
        match self {
            End::Closed(why) => ReadStop::Ended(why),
            End::Broken(what) => ReadStop::Broken(what),
            End::Joined(join) => ReadStop::Joined(join),
        }
    }
}

/// Wakes a connection's I/O thread (a nudge).
struct NudgeConn(Option<Registration>);

impl Wake for NudgeConn {
    fn wake(self: Arc<Self>) {
        if let Some(r) = &self.0 {
            r.nudge();
        }
    }
}

/// A link's reads as the assembler's byte source.
struct LinkSource<'a>(&'a dyn ByteLink);

impl Source for LinkSource<'_> {
    fn recv_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_now(buf)
    }
    fn cheap_reads(&self) -> bool {
        self.0.cheap_reads()
    }
}

/// One byte connection; see the [module docs](self).
pub(crate) struct StreamConn {
    link: Box<dyn ByteLink>,
    read: Mutex<ReadSide>,
    out: Outbox,
    registration: OnceLock<Registration>,
    /// The I/O thread was asked to read while someone else held the read
    /// side: the holder hands the read back when it lets go.
    missed: AtomicBool,
    /// The transport reported the other end closed: its end waits behind
    /// the bytes not read yet, and no later event will report it.
    closed: AtomicBool,
    /// Whether a begun frame keeps arriving.
    watch: Mutex<Watch>,
    /// Its stripes: a link that carries frames (tcp, TLS) may have some.
    stripes: Option<Stripes>,
    /// A subscriber that read this connection itself comes back to it
    /// before then ([`Lead::park`]): until then its I/O thread neither
    /// reads it when nudged nor asks the peer to wake it.
    parked: Mutex<Option<Instant>>,
    /// When the last published message was handed to it, in nanoseconds
    /// since `born` (see [`StreamConn::send`]).
    last_published: std::sync::atomic::AtomicU64,
    born: Instant,
    /// Its I/O thread was asked to write what waits and has not pumped
    /// since.
    write_asked: AtomicBool,
}

/// A published message sent less than this after the last one over a byte
/// stream is written by the I/O thread ([`StreamConn::send`]).
const BEHIND: Duration = Duration::from_micros(50);

/// How soon a progress judgement that fell due while another thread read
/// the connection is looked at again ([`StreamConn::hold_watch`]).
const RETRY_WATCH: Duration = Duration::from_millis(10);

/// How long a subscriber that read its connection itself keeps it between
/// two reads ([`Lead::park`]); past it, the I/O thread reads it again.
const PARK: Duration = Duration::from_millis(1);

/// How fast a begun frame must keep arriving: every `period`, at least
/// `min_bytes` more of it (or all it still lacks, when that is less).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProgressRule {
    pub(crate) period: Duration,
    pub(crate) min_bytes: u64,
}

/// The progress check of a connection's frame in flight.
#[derive(Debug, Default)]
struct Watch {
    /// When the frame is next judged; `None` when no frame waits on the peer.
    due: Option<Instant>,
    /// Stream bytes received at the last check.
    mark: u64,
    /// What the frame lacked then.
    lacking: u64,
}

/// What one step of a leader's read did.
#[derive(Debug)]
pub(crate) enum Step {
    /// A frame was read and handed on.
    Frame,
    /// Nothing whole is there now.
    Pending,
    /// The handler could not take the frame now (a full queue).
    Stalled,
    /// The stream is over, and why.
    Ended(End),
}

impl StreamConn {
    /// A connection over `link` whose frames are read into buffers from
    /// `pool` within `limits`, tensors bound for devices straight to them
    /// when a `router` is given.
    pub(crate) fn new(
        link: Box<dyn ByteLink>,
        pool: BufferPool,
        limits: Limits,
        router: Option<Router>,
    ) -> Self {
        let stripes = (link.carries() == Carry::Frames).then(Stripes::default);
        let mut assembler = Assembler::new(pool, limits);
        if let Some(router) = router {
            assembler = assembler.with_router(router);
        }
        if let Some(s) = &stripes {
            assembler = assembler.with_stripes(Arc::clone(&s.hub));
        }
        Self {
            link,
            read: Mutex::new(ReadSide {
                assembler,
                ended: None,
            }),
            out: Outbox::new(),
            registration: OnceLock::new(),
            missed: AtomicBool::new(false),
            watch: Mutex::new(Watch::default()),
            closed: AtomicBool::new(false),
            stripes,
            parked: Mutex::new(None),
            last_published: std::sync::atomic::AtomicU64::new(0),
            born: Instant::now(),
            write_asked: AtomicBool::new(false),
        }
    }

    /// Whether a published message handed over now is left to the I/O
    /// thread: over a byte stream its thread drives, when the last one
    /// came less than [`BEHIND`] ago.
    fn write_behind(&self) -> bool {
        if self.link.carries() != Carry::Frames
            || self.registration.get().is_none()
            || crate::reactor::on_io_thread()
        {
            return false;
        }
        let now = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let last = self.last_published.swap(now, Ordering::Relaxed);
        last != 0 && now.saturating_sub(last) < BEHIND.as_nanos() as u64
    }

    /// Its stripes ([`stripe`](super::stripe)), when its link may have some.
    pub(crate) fn stripes(&self) -> Option<&Stripes> {
        self.stripes.as_ref()
    }

    /// Sends `frame` striped over `parts` connections when it can (see
    /// [`Stripes::send`]); `None`: it was not, the caller sends it whole.
    pub(crate) fn send_striped(
        &self,
        frame: &Arc<crate::wire::Encoded>,
        lane: Option<Arc<Lane>>,
        parts: usize,
    ) -> Option<Result<(), String>> {
        let sent = self.stripes.as_ref()?.send(&self.out, frame, lane, parts)?;
        Some(sent.and_then(|()| self.pump()))
    }

    /// Hands the connection over to be a stripe: what its node queued on
    /// it is written first (within `deadline`), then nothing more is taken.
    ///
    /// # Errors
    ///
    /// What was queued could not be written in time.
    pub(crate) fn retire(&self, deadline: Instant) -> Result<(), String> {
        loop {
            self.out.pump(&*self.link);
            if !self.out.pending() {
                break;
            }
            if Instant::now() >= deadline {
                return Err("its queued frames were not written in time".into());
            }
            let _ = self
                .link
                .wait_writable(deadline.min(Instant::now() + Duration::from_millis(50)));
        }
        self.out.close("it became a stripe of another connection");
        Ok(())
    }

    /// Judges a frame that waits on its peer (call when a read found nothing
    /// more): it is first seen, then judged each `rule.period`; one that got
    /// fewer than `rule.min_bytes` since (or than all it lacked) is an
    /// offence, said in the error. Nothing is judged while the read side is
    /// held elsewhere or no frame has begun.
    pub(crate) fn watch_progress(&self, rule: ProgressRule, now: Instant) -> Result<(), String> {
        let mut watch = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        let progress = self
            .try_read()
            .filter(|side| side.ended.is_none())
            .and_then(|side| side.assembler.progress());
        let Some((at, lacking)) = progress else {
            watch.due = None;
            return Ok(());
        };
        match watch.due {
            Some(due) if now >= due => {
                let got = at.saturating_sub(watch.mark);
                let needed = rule.min_bytes.min(watch.lacking).max(1);
                if got < needed {
                    watch.due = None;
                    return Err(format!(
                        "sent {got} byte(s) of a frame in {:.0?} while it lacked {}; at least {needed} were due (a peer must keep a frame it began coming: NodeBuilder::progress_timeout, min_receive_rate)",
                        rule.period, watch.lacking
                    ));
                }
            }
            Some(_) => return Ok(()),
            None => {}
        }
        *watch = Watch {
            due: Some(now + rule.period),
            mark: at,
            lacking,
        };
        Ok(())
    }

    /// Keeps judging the frame in flight while another thread reads the
    /// connection (a requester or subscriber leading it, or holding it
    /// parked): the frame still waits on its peer, but its progress can only
    /// be measured once the read side is free, so a judgement that fell due
    /// meanwhile is looked at again a little later ([`RETRY_WATCH`]).
    pub(crate) fn hold_watch(&self, now: Instant) {
        let mut watch = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        if watch.due.is_some_and(|due| due <= now) {
            watch.due = Some(now + RETRY_WATCH);
        }
    }

    /// Stops judging the frame in flight: it waits on this side (a full
    /// queue, the receive budget), not on its peer.
    pub(crate) fn unwatch(&self) {
        self.watch.lock().unwrap_or_else(|p| p.into_inner()).due = None;
    }

    /// When the frame in flight is next judged, if one is watched.
    pub(crate) fn watch_due(&self) -> Option<Instant> {
        self.watch.lock().unwrap_or_else(|p| p.into_inner()).due
    }

    /// Until when a subscriber keeps this connection ([`Lead::park`]).
    pub(crate) fn parked_until(&self) -> Option<Instant> {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a subscriber keeps this connection at `now`; once its time
    /// is over, `false` from then on (the I/O thread reads it again).
    pub(crate) fn parked(&self, now: Instant) -> bool {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        match *parked {
            Some(until) if until > now => true,
            Some(_) => {
                *parked = None;
                false
            }
            None => false,
        }
    }

    /// The bytes underneath.
    pub(crate) fn link(&self) -> &dyn ByteLink {
        &*self.link
    }

    /// Records the connection's place on its I/O thread.
    pub(crate) fn set_registration(&self, registration: Registration) {
        let _ = self.registration.set(registration);
        if let Some(s) = &self.stripes {
            s.hub.set_waker(self.waker());
        }
    }

    /// A waker that asks the I/O thread to run the connection.
    fn waker(&self) -> Waker {
        Waker::from(Arc::new(NudgeConn(self.registration.get().cloned())))
    }

    /// Asks the I/O thread to run the connection soon.
    pub(crate) fn nudge(&self) {
        if let Some(r) = self.registration.get() {
            r.nudge();
        }
    }

    fn try_read(&self) -> Option<MutexGuard<'_, ReadSide>> {
        match self.read.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// For the I/O thread: reads every whole frame there is now and hands
    /// each to `on_frame`, unless a requester holds the read side (it reads
    /// them instead).
    /// Only a read the transport reported (`how.evented`) tells a busy read
    /// side it missed something: the lead that holds it looks at what is
    /// left when it ends, and a nudge recorded as missed would only make it
    /// nudge again.
    fn read_all(&self, on_frame: &mut dyn FnMut(Frame) -> Flow, how: Reading) -> ReadStop {
        if how.closed {
            self.closed.store(true, Ordering::SeqCst);
        }
        if let Err(e) = self.link.on_readable() {
            self.link.shutdown();
            let end = if e.kind() == io::ErrorKind::InvalidData {
                End::Broken(e.to_string())
            } else {
                End::Closed(format!("reading {}: {e}", self.label()))
            };
            let mut side = self.read.lock().unwrap_or_else(|p| p.into_inner());
            return side.ended.get_or_insert(end).clone().stop();
        }
        loop {
            let side = match self.try_read() {
                Some(side) => side,
                None if !how.evented => return ReadStop::Busy,
                None => {
                    self.missed.store(true, Ordering::SeqCst);
                    // The holder may have let go between the try and the mark.
                    match self.try_read() {
                        Some(side) => side,
                        None => return ReadStop::Busy,
                    }
                }
            };
            self.missed.store(false, Ordering::SeqCst);
            let mut side = side;
            let stop = self.read_frames(&mut side, on_frame, how.arm);
            drop(side);
            if matches!(stop, ReadStop::Idle) && self.missed.swap(false, Ordering::SeqCst) {
                continue;
            }
            return stop;
        }
    }

    fn read_frames(
        &self,
        side: &mut ReadSide,
        on_frame: &mut dyn FnMut(Frame) -> Flow,
        arm: bool,
    ) -> ReadStop {
        // Called because the transport reported something (or was nudged).
        side.assembler.expect_more();
        loop {
            match self.step(side) {
                Ok(Some(frame)) => {
                    if on_frame(frame) == Flow::Stall {
                        return ReadStop::Stalled;
                    }
                }
                Ok(None) => {
                    if side.assembler.wait_for_budget(&self.waker()) {
                        // The node's receive budget is spent: this connection
                        // waits, unread, until bytes come back.
                        return ReadStop::Stalled;
                    }
                    if arm && self.link.idle_read() {
                        continue;
                    }
                    return ReadStop::Idle;
                }
                Err(end) => return end.stop(),
            }
        }
    }

    /// The next whole frame, if there is one now.
    fn step(&self, side: &mut ReadSide) -> Result<Option<Frame>, End> {
        if let Some(end) = &side.ended {
            return Err(end.clone());
        }
        if self.closed.load(Ordering::SeqCst) {
            side.assembler.peer_closed();
        }
        let outcome = side.assembler.next(&mut LinkSource(&*self.link));
        if self.link.holds_output() {
            // Reading made bytes to send (a TLS alert or key update): the
            // writer sends them, now or when the socket has room.
            let _ = self.pump();
        }
        let end = match outcome {
            Ok(Next::Frame(f)) => return Ok(Some(f)),
            Ok(Next::Pending) => return Ok(None),
            Ok(Next::End) => End::Closed("the peer closed the connection".to_string()),
            // Left open: the connection is a stripe's now.
            Ok(Next::Join(join)) => {
                side.ended = Some(End::Closed("it became a stripe".into()));
                return Err(End::Joined(join));
            }
            // A transport's own rules broken (a ring that claims more than
            // it holds) is the peer's doing too.
            Err(crate::error::Error::Io { context, source })
                if source.kind() == io::ErrorKind::InvalidData =>
            {
                End::Broken(format!("{context}: {source}"))
            }
            // The connection itself failed (reset, cut mid-frame).
            Err(e @ crate::error::Error::Io { .. }) => End::Closed(e.to_string()),
            // What came is not a frame this side may accept.
            Err(e) => End::Broken(e.to_string()),
        };
        self.link.shutdown();
        side.ended = Some(end.clone());
        Err(end)
    }

    /// Writes what waits in the outbox, as far as the link takes it now.
    ///
    /// # Errors
    ///
    /// Why the connection failed; it is shut down (its read side then
    /// reports the end).
    pub(crate) fn pump(&self) -> Result<(), String> {
        // Whatever was queued before this line is written by this pump (or
        // left to the link's writability): a later deferred send asks anew.
        self.write_asked.store(false, Ordering::SeqCst);
        let mut pumped = self.out.pump(&*self.link);
        if self.link.wants_writable() {
            if let Some(r) = self.registration.get() {
                loop {
                    match pumped {
                        // The socket is full: its I/O thread waits for room.
                        Pumped::Full => r.want_writable(true),
                        Pumped::Done => {
                            r.want_writable(false);
                            // Another thread may have found the socket full
                            // and asked for room between this pump and the
                            // line above, which then took the ask back:
                            // whatever waits now is pumped again, so the
                            // last word on writability is a pump's.
                            if self.out.pending() {
                                pumped = self.out.pump(&*self.link);
                                continue;
                            }
                        }
                        Pumped::Later | Pumped::Failed(_) => {}
                    }
                    break;
                }
            }
        }
        match pumped {
            Pumped::Done | Pumped::Later | Pumped::Full => Ok(()),
            Pumped::Failed(why) => {
                self.link.shutdown();
                // The I/O thread reads the end and reports the peer lost.
                self.nudge();
                Err(why)
            }
        }
    }

    /// Takes the read side for a requester, unless someone holds it.
    pub(crate) fn lead(&self) -> Option<Lead<'_>> {
        let Some(side) = self.try_read() else {
            // Whoever holds it hands the connection back to the I/O thread
            // when it lets go (it does not park it): this reader waits on
            // what the connection brings.
            self.missed.store(true, Ordering::SeqCst);
            return None;
        };
        self.link.lead();
        let paused = self.link.pause_while_led() && self.registration.get().is_some();
        if paused {
            if let Some(r) = self.registration.get() {
                r.pause();
            }
        }
        Some(Lead {
            conn: self,
            side: Some(side),
            paused,
            park: false,
        })
    }
}

impl Connection for StreamConn {
    fn label(&self) -> &str {
        self.link.label()
    }

    fn carries(&self) -> Carry {
        self.link.carries()
    }

    /// Queues `item` and writes what it can now, on this thread; but a
    /// small published host frame that comes hard on the last one
    /// ([`BEHIND`]) over a byte stream (tcp, TLS) is left to the I/O
    /// thread, which writes what gathered meanwhile in one vectored write:
    /// one system call for a batch instead of one per message, and the
    /// publisher goes on encoding while it is written. It is not left
    /// when its lane is half full or more (a publisher would wait, or
    /// `drop_oldest` drop, for the I/O thread's wake-up alone), nor from an
    /// I/O thread (an inline service's sends would wait for it to return).
    /// A sparse message, a large one, a request or a reply is written at
    /// once.
    fn send(&self, item: Outgoing, lane: Option<Arc<Lane>>) -> Result<(), String> {
        let behind = match (&item, &lane) {
            (Outgoing::Frame(frame), Some(lane)) => {
                // Every published message moves the clock, deferred or not.
                let fast = self.write_behind();
                fast && small_host_frame(frame) && lane.half_empty()
            }
            _ => false,
        };
        let writer = self.out.enqueue(item, lane)?;
        if behind {
            // One nudge until the I/O thread pumps: what comes meanwhile
            // is in the queue that pump reads.
            if !writer && !self.write_asked.swap(true, Ordering::SeqCst) {
                self.nudge();
            }
            return Ok(());
        }
        self.pump()
    }

    fn read(&self, on_frame: &mut dyn FnMut(Frame) -> Flow, how: Reading) -> ReadStop {
        self.read_all(on_frame, how)
    }

    /// Nothing more is written, what waits is dropped, and the link is
    /// shut down both ways (the read side then reports the end).
    fn close(&self, why: &str) {
        self.out.close(why);
        self.link.shutdown();
        if let Some(s) = &self.stripes {
            s.close();
        }
    }

    fn stream(&self) -> Option<&StreamConn> {
        Some(self)
    }
}

/// A requester's hold on a connection's read side; dropping it hands the
/// connection back to its I/O thread.
pub(crate) struct Lead<'a> {
    conn: &'a StreamConn,
    side: Option<MutexGuard<'a, ReadSide>>,
    paused: bool,
    /// Keep the connection when letting go ([`Lead::park`]).
    park: bool,
}

impl Lead<'_> {
    /// Reads the next frame if all of it is there and hands it to `on_frame`.
    pub(crate) fn step(&mut self, on_frame: &mut dyn FnMut(Frame) -> Flow) -> Step {
        let side = self.side.as_mut().expect("held until dropped");
        match self.conn.step(side) {
            Ok(Some(frame)) => match on_frame(frame) {
                Flow::Continue => Step::Frame,
                Flow::Stall => Step::Stalled,
            },
            // Waiting for the receive budget is the I/O thread's to do.
            Ok(None) if side.assembler.wait_for_budget(&self.conn.waker()) => Step::Stalled,
            Ok(None) => Step::Pending,
            Err(end) => Step::Ended(end),
        }
    }

    /// Lets go of the read side but keeps the connection for a short while
    /// ([`PARK`]): a subscriber that read what it needed and will be back
    /// for more as soon as its caller has taken it. Meanwhile frames wait
    /// in the link, the peer does not wake this side's I/O thread, and a
    /// nudge does not make it read (a stalled delivery, an event the
    /// transport reports, or another reader letting go still do); when
    /// the time is over, the I/O thread reads the connection as before.
    /// Links whose wait can be interrupted only (their peer wakes a
    /// leader without the I/O thread).
    pub(crate) fn park(mut self) {
        self.park = self.conn.link.interruptible();
    }

    /// Whether more may be read at once: bytes read ahead that no frame
    /// has taken, or bytes the link says are waiting.
    pub(crate) fn has_more(&self) -> bool {
        self.holds_bytes() || self.conn.link.has_input()
    }

    /// Whether bytes were read ahead that no frame has taken yet.
    pub(crate) fn holds_bytes(&self) -> bool {
        self.side
            .as_ref()
            .is_some_and(|s| s.assembler.holds_bytes())
    }

    /// Waits until there may be something to read, at most until `deadline`.
    ///
    /// # Errors
    ///
    /// The wait's own errors.
    pub(crate) fn wait_readable(&mut self, deadline: Instant) -> io::Result<bool> {
        if let Some(side) = self.side.as_mut() {
            side.assembler.expect_more();
            if side.assembler.waits_on_stripes() {
                // The stripes' last share wakes the I/O thread, not this
                // reader: it looks again shortly instead of waiting on the
                // socket (whose next bytes it cannot take yet).
                std::thread::sleep(
                    Duration::from_millis(1)
                        .min(deadline.saturating_duration_since(Instant::now())),
                );
                return Ok(true);
            }
        }
        self.conn.link.wait_readable(deadline)
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let holds = self.holds_bytes();
        self.conn.link.unlead();
        drop(self.side.take());
        if self.paused {
            // Readiness that came meanwhile is reported by the putting back.
            if let Some(r) = self.conn.registration.get() {
                r.resume();
            }
        }
        let mut parked = self.conn.parked.lock().unwrap_or_else(|p| p.into_inner());
        if self.park && !self.conn.missed.load(Ordering::SeqCst) {
            // Parked: the I/O thread is told when to look again only when
            // the connection was not parked already (a park renewed is seen
            // when the last one's time comes).
            if parked.replace(Instant::now() + PARK).is_none() {
                drop(parked);
                self.conn.nudge();
            }
            return;
        }
        // Any other reader letting go ends a park: what it left is read now.
        *parked = None;
        drop(parked);
        let pending = self.conn.link.idle_read();
        if holds || pending || self.conn.missed.swap(false, Ordering::SeqCst) {
            self.conn.nudge();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tcp::TcpLink;
    use crate::wire::{encode, EncodeOptions, FrameMeta};
    use crate::{pattern, DType, Message};
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};

    /// A connection over one end of a loopback tcp pair, and the other end.
    fn tcp_pair() -> (StreamConn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (ours, _) = listener.accept().expect("accept");
        let link = TcpLink::new(ours, "tcp://peer".into()).expect("link");
        let conn = StreamConn::new(
            Box::new(link),
            BufferPool::new(1 << 30),
            Limits::default(),
            None,
        );
        (conn, peer)
    }

    #[test]
    fn an_end_that_came_with_the_last_bytes_is_read_in_the_same_pass() {
        // A sender killed mid-frame: its last bytes and its end are in the
        // socket before the read, and the one readiness event that reports
        // them is the last. The read that takes the bytes comes back short;
        // it must go on to the end, or the connection stays half-closed
        // forever, holding its frame's reservation.
        let (conn, mut peer) = tcp_pair();
        let t = pattern::tensor(DType::U8, &[1 << 20], 1, 0, "x").expect("tensor");
        let mut frame = Vec::new();
        encode(
            &Message::new().tensor("x", t),
            &FrameMeta::message("/t", 0),
            EncodeOptions::default(),
        )
        .expect("encode")
        .write_to(&mut frame)
        .expect("write");
        peer.write_all(&frame[..200 << 10])
            .expect("part of a frame");
        peer.shutdown(Shutdown::Write).expect("end");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let stop = conn.read(
            &mut |_| panic!("no frame is whole"),
            Reading {
                arm: true,
                evented: true,
                closed: true,
            },
        );
        match stop {
            ReadStop::Ended(why) => assert!(why.contains("mid-frame"), "{why}"),
            other => panic!("the end was left unread: {other:?}"),
        }
    }
}
