//! [`Outbox`]: the write side of a byte connection. Items wait in one queue
//! in the order they were sent; whoever holds the *write turn* writes them
//! without blocking, as far as the transport takes them now. A thread that
//! sends writes at once when nobody else is writing (a request, a reply or a
//! small message leaves on the sender's own thread, with no hand-off); what
//! does not fit is left where it stopped, and the connection's I/O thread
//! goes on when the transport has room. Nothing here ever waits for a peer.
//!
//! Published messages count against their channel's [`Lane`] on this
//! connection (`queue_depth` and `overflow`): under `block` a publisher waits
//! for room in the lane, under `drop_oldest` the lane's oldest item that has
//! not started is dropped and counted.
//!
//! A frame whose tensors are still on a device (CUDA, wgpu) is read back
//! chunk by chunk as it is written ([`FrameWriter`]), so a device buffer
//! never needs a host copy of its whole size.

use std::collections::{HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tensorferry_device_map::Overflow;

use super::{ByteLink, Outgoing};
use crate::outbound::{write_frame, FrameWriter};
use crate::wire::{encode, EncodeOptions, FrameMeta, Kind};
use crate::Message;

/// How a node encodes the frames it makes itself (control frames, pointers
/// to shared slots, errors): compact headers.
pub(crate) const LINK_ENCODING: EncodeOptions = EncodeOptions {
    checksums: false,
    compact: true,
};

/// One channel's share of a connection's outbox: how many of its published
/// messages wait there, against the channel's depth and overflow policy.
pub(crate) struct Lane {
    depth: usize,
    /// Most bytes of frames queued, when bounded.
    max_bytes: Option<u64>,
    overflow: Overflow,
    state: Mutex<LaneState>,
    room: Condvar,
    dropped: AtomicU64,
    /// Messages written whole to the connection.
    written: AtomicU64,
}

struct LaneState {
    /// Items queued or being written.
    queued: usize,
    /// Their bytes.
    bytes: u64,
    /// Parts of its striped frames that wait on (or are being written to)
    /// the connection's stripes: not counted as messages, but they take
    /// places (a stripe slower than the connection slows its publisher
    /// instead of piling up parts), and a flush waits for them too.
    striping: usize,
    /// Threads blocked on `room` (a notify is a system call: made only for them).
    blocked: usize,
    /// The connection is gone: nothing more is taken.
    closed: bool,
    wakers: Vec<Waker>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lane(depth {}, {:?})", self.depth, self.overflow)
    }
}

impl Lane {
    /// A lane of at most `depth` messages (and `max_bytes` bytes of frames,
    /// when given) with `overflow`.
    pub(crate) fn new(depth: usize, max_bytes: Option<u64>, overflow: Overflow) -> Self {
        Self {
            depth: depth.max(1),
            max_bytes,
            overflow,
            state: Mutex::new(LaneState {
                queued: 0,
                striping: 0,
                bytes: 0,
                blocked: 0,
                closed: false,
                wakers: Vec::new(),
            }),
            room: Condvar::new(),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages queued or being written.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queued
    }

    /// Shares of striped messages still to be written on stripes.
    pub(crate) fn parts_on_stripes(&self) -> usize {
        self.lock().striping
    }

    /// Messages dropped under `drop_oldest`.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Messages written whole to the connection.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The overflow policy.
    pub(crate) fn overflow(&self) -> Overflow {
        self.overflow
    }

    /// Whether one more message fits: a place is free, and (when bounded)
    /// bytes are, or the lane is empty (a single large frame passes).
    fn full(&self, s: &LaneState) -> bool {
        s.queued + s.striping >= self.depth
            || self
                .max_bytes
                .is_some_and(|max| s.queued > 0 && s.bytes >= max)
    }

    /// Waits until the lane has room, or `deadline` passes (`false`), or
    /// the connection closes (`true`: the send then finds it closed).
    pub(crate) fn wait_room(&self, deadline: Option<Instant>) -> bool {
        let mut s = self.lock();
        while !s.closed && self.full(&s) {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return false;
            }
            s = self.block(s, left);
        }
        true
    }

    /// Waits on `room` once, at most `left`, counted as blocked meanwhile.
    fn block<'a>(
        &self,
        mut s: MutexGuard<'a, LaneState>,
        left: Option<std::time::Duration>,
    ) -> MutexGuard<'a, LaneState> {
        s.blocked += 1;
        let mut s = match left {
            None => self.room.wait(s).unwrap_or_else(|p| p.into_inner()),
            Some(left) => {
                self.room
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
        s.blocked -= 1;
        s
    }

    /// The async form of [`wait_room`](Self::wait_room).
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.closed || !self.full(&s) {
            return Poll::Ready(());
        }
        if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            s.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Waits until nothing is queued (nor waits on a stripe), or
    /// `deadline` passes (`false`).
    pub(crate) fn wait_empty(&self, deadline: Instant) -> bool {
        let mut s = self.lock();
        while !s.closed && (s.queued > 0 || s.striping > 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.block(s, Some(left));
        }
        true
    }

    /// Whether the lane is at most half full (items and bytes): a message
    /// queued for its I/O thread to write then leaves room, so waiting for
    /// that thread makes no publisher wait nor `drop_oldest` drop.
    pub(crate) fn half_empty(&self) -> bool {
        let s = self.lock();
        let items = s.queued + s.striping;
        items < self.depth / 2 && self.max_bytes.is_none_or(|max| s.bytes < max / 2)
    }

    /// A part of a striped frame was handed to a stripe.
    pub(crate) fn part_queued(&self) {
        self.lock().striping += 1;
    }

    /// A part handed to a stripe was written, or given up with it.
    pub(crate) fn part_done(&self) {
        let mut s = self.lock();
        s.striping = s.striping.saturating_sub(1);
        self.released(s);
    }

    fn add(&self, bytes: u64) {
        let mut s = self.lock();
        s.queued += 1;
        s.bytes += bytes;
    }

    fn done(&self, bytes: u64) {
        let mut s = self.lock();
        s.queued = s.queued.saturating_sub(1);
        s.bytes = s.bytes.saturating_sub(bytes);
        self.released(s);
    }

    /// Something left the lane: wakes who waits for room (or for it to empty).
    fn released(&self, mut s: MutexGuard<'_, LaneState>) {
        // Publishers waiting for room are woken once the lane has drained
        // to half its depth (and bytes), not at each message written.
        let items = s.queued + s.striping;
        if !crate::queue::half_drained(items, self.depth, s.bytes, self.max_bytes) {
            return;
        }
        let wakers = std::mem::take(&mut s.wakers);
        let blocked = s.blocked > 0;
        drop(s);
        if blocked {
            self.room.notify_all();
        }
        for w in wakers {
            w.wake();
        }
    }

    /// The connection is gone: every waiter goes on (and finds it closed).
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        let wakers = std::mem::take(&mut s.wakers);
        drop(s);
        self.room.notify_all();
        for w in wakers {
            w.wake();
        }
    }
}

/// An item and the lane it counts against.
struct Queued {
    item: Outgoing,
    lane: Option<Arc<Lane>>,
    /// Bytes it counts for in its lane.
    bytes: u64,
}

impl Drop for Queued {
    fn drop(&mut self) {
        // Written, dropped by the policy, or dropped with the connection:
        // either way it no longer waits.
        if let Some(lane) = &self.lane {
            lane.done(self.bytes);
        }
    }
}

/// Bytes an item takes on its connection.
fn weight(item: &Outgoing) -> u64 {
    match item {
        Outgoing::Frame(f) | Outgoing::Part { frame: f, .. } => f.frame_len(),
        Outgoing::Slot { len, .. } => *len,
        Outgoing::Message { message, .. } => message.payload_bytes(),
    }
}

/// An item being written, and how far.
enum Writing {
    Frame(FrameWriter),
    /// A shm pointer frame (its descriptor sent first on first use).
    Bytes {
        bytes: Vec<u8>,
        at: usize,
    },
}

struct OutState {
    queue: VecDeque<Queued>,
    /// The item being written, with the queue entry it came from.
    current: Option<(Writing, Queued)>,
    /// A thread holds the write turn.
    turn: bool,
    /// Someone asked for a write while the turn was held: the holder looks
    /// again before letting go.
    again: bool,
    /// Why the connection can take no more (it failed or closed).
    closed: Option<String>,
    /// Shared slots whose descriptor the peer has (shm).
    known_slots: HashSet<u32>,
}

/// The write side of one byte connection; see the [module docs](self).
pub(crate) struct Outbox {
    state: Mutex<OutState>,
}

/// The end of a write attempt.
#[derive(Debug)]
pub(crate) enum Pumped {
    /// Everything queued is written.
    Done,
    /// Someone else writes (and goes on), or the rest waits for a slot release.
    Later,
    /// The rest waits for room in the transport, which it was asked to report.
    Full,
    /// The connection failed: it must be shut down and reported lost.
    Failed(String),
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    /// An empty outbox.
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(OutState {
                queue: VecDeque::new(),
                current: None,
                turn: false,
                again: false,
                closed: None,
                known_slots: HashSet::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` (counted against `lane` when given; under
    /// `drop_oldest` a full lane first drops its oldest item not yet
    /// started). The caller writes with [`pump`](Self::pump) next.
    ///
    /// # Errors
    ///
    /// Why the connection takes nothing more, when it is closed.
    pub(crate) fn push(&self, item: Outgoing, lane: Option<Arc<Lane>>) -> Result<(), String> {
        self.enqueue(item, lane).map(|_| ())
    }

    /// [`push`](Self::push), saying whether a thread held the write turn
    /// when the item was queued: that thread then writes it before it lets
    /// go (it looks at the queue again under the same lock), or, when the
    /// link is full, leaves it to the link's writability.
    pub(crate) fn enqueue(&self, item: Outgoing, lane: Option<Arc<Lane>>) -> Result<bool, String> {
        let mut s = self.lock();
        if let Some(why) = &s.closed {
            return Err(why.clone());
        }
        let bytes = weight(&item);
        if let Some(lane) = &lane {
            while lane.overflow == Overflow::DropOldest && lane.full(&lane.lock()) {
                let oldest = s.queue.iter().position(|q| {
                    // A striped frame's first part is never dropped:
                    // its other parts are on their stripes already.
                    !matches!(q.item, Outgoing::Part { .. })
                        && q.lane.as_ref().is_some_and(|l| Arc::ptr_eq(l, lane))
                });
                let Some(i) = oldest else { break };
                // Dropped after the lock is let go (its lane is told then).
                let dropped = s.queue.remove(i);
                lane.dropped.fetch_add(1, Ordering::Relaxed);
                drop(s);
                drop(dropped);
                s = self.lock();
            }
            lane.add(bytes);
        }
        s.queue.push_back(Queued { item, lane, bytes });
        Ok(s.turn)
    }

    /// Writes what is queued, as far as `link` takes it now, unless another
    /// thread holds the write turn (then that one goes on, this returns
    /// [`Pumped::Later`]).
    pub(crate) fn pump(&self, link: &dyn ByteLink) -> Pumped {
        let mut s = self.lock();
        if s.turn {
            s.again = true;
            return Pumped::Later;
        }
        if s.closed.is_some() {
            return Pumped::Done;
        }
        s.turn = true;
        s.again = false;
        loop {
            let slot_waits = s.current.is_none()
                && matches!(s.queue.front(), Some(q) if matches!(q.item, Outgoing::Slot { .. }))
                && !link.slot_room();
            if slot_waits {
                // The peer holds as many slots as it may: the rest waits
                // for a release, which pumps again. What was written is
                // published while the turn is still held: two threads
                // publishing at once could move the position back.
                drop(s);
                link.flush();
                s = self.lock();
                s.turn = false;
                if std::mem::take(&mut s.again) && link.slot_room() {
                    drop(s);
                    return self.pump(link);
                }
                return Pumped::Later;
            }
            let (mut writing, queued) = match s.current.take() {
                Some(c) => c,
                None => match s.queue.pop_front() {
                    Some(q) => match start(&q.item, link, &mut s.known_slots) {
                        Ok(w) => (w, q),
                        Err(NotStarted::Item(e)) => {
                            // This item cannot be written (a device that
                            // cannot be opened): it is dropped, with its
                            // reason, and the connection goes on.
                            tracing::warn!(peer = link.label(), error = %e, "a frame was dropped before its first byte");
                            drop(s);
                            drop(q);
                            s = self.lock();
                            continue;
                        }
                        Err(NotStarted::Link(e)) => {
                            // The link itself failed (a slot's descriptor
                            // could not be sent): the connection is over,
                            // as when a write fails.
                            drop(s);
                            return self.failed(link, e, Some(q));
                        }
                    },
                    None => {
                        // Published while the turn is held (see above).
                        drop(s);
                        link.flush();
                        // What the link took may still wait for the socket
                        // (TLS records): written now, or when there is room.
                        let held = match link.send_held() {
                            Ok(held) => held,
                            Err(e) => return self.failed(link, e, None),
                        };
                        s = self.lock();
                        if !s.queue.is_empty() {
                            continue;
                        }
                        if held {
                            let room = link.idle_write();
                            if room || std::mem::take(&mut s.again) {
                                continue;
                            }
                            s.turn = false;
                            return Pumped::Full;
                        }
                        // Someone asked while the turn was held: bytes the
                        // link made meanwhile (a reader's TLS alert) go too.
                        if std::mem::take(&mut s.again) && link.holds_output() {
                            continue;
                        }
                        s.turn = false;
                        return Pumped::Done;
                    }
                },
            };
            // Small host frames queued behind a fresh one leave with it, in
            // one vectored write (one system call for many messages).
            let batch = match &writing {
                Writing::Frame(w) if w.at_start() && !s.queue.is_empty() && batchable(w) => {
                    take_batch(&mut s.queue)
                }
                _ => Vec::new(),
            };
            drop(s);
            if !batch.is_empty() {
                let Writing::Frame(first) = writing else {
                    unreachable!("only frames are batched")
                };
                match self.write_batch(link, (first, queued), batch) {
                    Ok(true) => {
                        s = self.lock();
                        continue;
                    }
                    Ok(false) => {
                        // The link is full: as for a frame cut short below.
                        link.flush();
                        let room = link.idle_write();
                        s = self.lock();
                        if room || s.again {
                            s.again = false;
                            continue;
                        }
                        s.turn = false;
                        return Pumped::Full;
                    }
                    Err(failed) => return failed,
                }
            }
            let outcome = match &mut writing {
                Writing::Frame(w) => w.write_some(&mut |bufs| link.write_now(bufs)),
                Writing::Bytes { bytes, at } => write_bytes(link, bytes, at),
            };
            match outcome {
                Ok(true) => {
                    if let Some(lane) = &queued.lane {
                        lane.written.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(queued);
                    s = self.lock();
                }
                Ok(false) => {
                    link.flush();
                    let room = link.idle_write();
                    s = self.lock();
                    s.current = Some((writing, queued));
                    if room || s.again {
                        s.again = false;
                        continue;
                    }
                    s.turn = false;
                    return Pumped::Full;
                }
                Err(e) => return self.failed(link, e, Some(queued)),
            }
        }
    }

    /// Writes `first` and `batch` (small host frames, in queue order) in one
    /// vectored write; `Ok(true)` when the link took them all. What was
    /// written whole is done; when the link took less, the frame it stopped
    /// in becomes the current one and the frames after it go back to the
    /// queue's front, in order (`Ok(false)`: the link is full). A failed
    /// write closes the outbox (`Err`, what `pump` returns). Called without
    /// the lock, by the turn's holder.
    fn write_batch(
        &self,
        link: &dyn ByteLink,
        first: (crate::outbound::FrameWriter, Queued),
        batch: Vec<(crate::outbound::FrameWriter, Queued)>,
    ) -> Result<bool, Pumped> {
        let mut frames: VecDeque<_> = std::iter::once(first).chain(batch).collect();
        let written = loop {
            let mut slices = Vec::with_capacity(frames.len() * 4);
            for (w, _) in &frames {
                w.host_slices(&mut slices);
            }
            match link.write_now(&slices) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => break Ok(n as u64),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(0),
                Err(e) => break Err(e),
            }
        };
        let mut n = match written {
            Ok(n) => n,
            Err(e) => {
                // The rest is dropped with the connection.
                let current = frames.pop_front().map(|(_, q)| q);
                drop(frames);
                return Err(self.failed(link, e, current));
            }
        };
        while let Some((w, _)) = frames.front() {
            let rest = w.remaining();
            if n < rest {
                break;
            }
            n -= rest;
            let (_, queued) = frames.pop_front().expect("looked at above");
            if let Some(lane) = &queued.lane {
                lane.written.fetch_add(1, Ordering::Relaxed);
            }
            drop(queued);
        }
        // The link took less than all: the frame it stopped in (perhaps at
        // its first byte) goes on as the current one, the ones after it
        // wait at the queue's front, in order.
        let Some((mut w, q)) = frames.pop_front() else {
            return Ok(true);
        };
        w.advance(n);
        let mut s = self.lock();
        while let Some((_, later)) = frames.pop_back() {
            s.queue.push_front(later);
        }
        s.current = Some((Writing::Frame(w), q));
        Ok(false)
    }

    /// A write failed: the outbox closes, and what waits is dropped (its
    /// lanes are told). Called without the lock, by the turn's holder.
    fn failed(&self, link: &dyn ByteLink, e: io::Error, current: Option<Queued>) -> Pumped {
        let why = format!("writing to {}: {e}", link.label());
        tracing::debug!(peer = link.label(), error = %e, kind = ?e.kind(), "a write failed");
        let dropped = {
            let mut s = self.lock();
            s.closed = Some(why.clone());
            s.turn = false;
            std::mem::take(&mut s.queue)
        };
        drop(current);
        drop(dropped);
        Pumped::Failed(why)
    }

    /// Whether anything waits to be written (queued, or cut short).
    pub(crate) fn pending(&self) -> bool {
        let s = self.lock();
        s.closed.is_none() && (s.current.is_some() || !s.queue.is_empty())
    }

    /// Closes the outbox: nothing more is taken, and what waits is dropped
    /// (its lanes are told).
    pub(crate) fn close(&self, why: &str) {
        let (queue, current) = {
            let mut s = self.lock();
            if s.closed.is_none() {
                s.closed = Some(why.to_string());
            }
            (std::mem::take(&mut s.queue), s.current.take())
        };
        drop(queue);
        drop(current);
    }
}

/// Why an item could not be started.
enum NotStarted {
    /// The item cannot be written (a device that cannot be opened); the
    /// connection goes on without it.
    Item(io::Error),
    /// The link failed; the connection is over.
    Link(io::Error),
}

impl From<io::Error> for NotStarted {
    fn from(e: io::Error) -> Self {
        NotStarted::Item(e)
    }
}

/// Prepares the writing of one item.
fn start(
    item: &Outgoing,
    link: &dyn ByteLink,
    known: &mut HashSet<u32>,
) -> Result<Writing, NotStarted> {
    match item {
        Outgoing::Frame(frame) => Ok(Writing::Frame(FrameWriter::new(Arc::clone(frame))?)),
        Outgoing::Part { frame, plan, end } => Ok(Writing::Frame(FrameWriter::part(
            Arc::clone(frame),
            *plan,
            0..*end,
        ))),
        Outgoing::Slot { held, len, meta } => {
            let id = held.0.id;
            let first = known.insert(id);
            let pointer = Message::new()
                .field("slot", id)
                .field("offset", 0)
                .field("len", *len)
                .field("fd", first);
            let meta = FrameMeta {
                kind: Kind::Shm,
                id: None,
                ..meta.clone()
            };
            let frame = encode(&pointer, &meta, LINK_ENCODING).map_err(io::Error::other)?;
            let mut bytes = Vec::with_capacity(frame.frame_len() as usize);
            write_frame(&frame, &mut bytes)?;
            // The descriptor goes first, through the socket: the reader
            // takes it when the frame announcing it comes.
            if first {
                if let Err(e) = link.send_fd(held.0.fd()) {
                    known.remove(&id);
                    return Err(NotStarted::Link(e));
                }
            }
            // The peer releases the slot when it is done with it, which can
            // be as soon as the pointer's last byte is out: the hold is
            // kept before the first byte goes, or a release that outran
            // this thread would find nothing and the slot stay held.
            link.keep_until_released(held.share());
            Ok(Writing::Bytes { bytes, at: 0 })
        }
        Outgoing::Message { .. } => Err(NotStarted::Item(io::Error::new(
            io::ErrorKind::Unsupported,
            "a byte connection carries frames, not messages",
        ))),
    }
}

/// Frames at most this large (all on the host) are *small*: written
/// several to a vectored write, and published to shm peers through the
/// ring rather than in a shared slot — copying a few KiB costs less than
/// what each frame costs on its own.
pub(crate) const SMALL_FRAME_BYTES: u64 = 64 << 10;

/// Whether `frame` is a small host frame: one that may share a vectored
/// write with others, go through a shm ring, or be left to the I/O thread.
pub(crate) fn small_host_frame(frame: &crate::wire::Encoded) -> bool {
    frame.frame_len() <= SMALL_FRAME_BYTES && frame.host_only()
}
/// At most this many frames go in one vectored write.
const BATCH_FRAMES: usize = 64;
/// At most this many bytes go in one vectored write.
const BATCH_BYTES: u64 = 256 << 10;

/// Whether `w` may be written in one vectored write with others: small,
/// and all on the host.
fn batchable(w: &crate::outbound::FrameWriter) -> bool {
    w.is_whole() && w.remaining() <= SMALL_FRAME_BYTES && w.host_only()
}

/// Takes the small host frames at the front of `queue` (up to the batch's
/// limits), ready to be written after the one being started.
fn take_batch(queue: &mut VecDeque<Queued>) -> Vec<(crate::outbound::FrameWriter, Queued)> {
    let mut batch = Vec::new();
    let mut bytes = 0u64;
    while batch.len() + 1 < BATCH_FRAMES {
        let Some(Queued {
            item: Outgoing::Frame(frame),
            ..
        }) = queue.front()
        else {
            break;
        };
        let len = frame.frame_len();
        if len > SMALL_FRAME_BYTES || bytes + len > BATCH_BYTES {
            break;
        }
        let Ok(w) = crate::outbound::FrameWriter::new(Arc::clone(frame)) else {
            break;
        };
        if !w.host_only() {
            break;
        }
        bytes += len;
        let q = queue.pop_front().expect("looked at above");
        batch.push((w, q));
    }
    batch
}

/// Writes what fits of `bytes` from `at`; `Ok(true)` when all is written.
fn write_bytes(link: &dyn ByteLink, bytes: &[u8], at: &mut usize) -> io::Result<bool> {
    while *at < bytes.len() {
        match link.write_now(&[IoSlice::new(&bytes[*at..])]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Encoded;
    use crate::Tensor;
    use std::os::fd::RawFd;
    use std::sync::Mutex;
    use std::time::Duration;

    #[test]
    fn a_lane_counts_the_parts_on_stripes_until_they_are_written() {
        // A striped frame's shares on stripes: a flush waits for them
        // (a sender that flushed and left would otherwise cut them off),
        // and they take places, so a slow stripe slows its publisher.
        let lane = Arc::new(Lane::new(2, None, Overflow::Block));
        lane.part_queued();
        lane.part_queued();
        assert!(!lane.wait_empty(Instant::now() + Duration::from_millis(20)));
        assert!(!lane.wait_room(Some(Instant::now() + Duration::from_millis(20))));
        let waiter = std::thread::spawn({
            let lane = Arc::clone(&lane);
            move || lane.wait_empty(Instant::now() + Duration::from_secs(20))
        });
        lane.part_done();
        assert!(lane.wait_room(Some(Instant::now())), "half drained: room");
        lane.part_done();
        assert!(waiter.join().expect("waiter"), "emptied: the flush goes on");
        assert_eq!(lane.queued(), 0, "parts are not counted as messages");
    }

    /// A link that takes at most `room` bytes per call, then `WouldBlock`
    /// until `room` is refilled.
    struct Trickle {
        out: Mutex<Vec<u8>>,
        room: Mutex<usize>,
        per_call: usize,
        /// Every write fails, as to a peer that went away.
        broken: bool,
        /// Calls to `write_now` that took bytes.
        calls: Mutex<usize>,
    }

    impl Trickle {
        fn new(room: usize, per_call: usize) -> Self {
            Self {
                out: Mutex::new(Vec::new()),
                room: Mutex::new(room),
                per_call,
                broken: false,
                calls: Mutex::new(0),
            }
        }
    }

    impl ByteLink for Trickle {
        fn label(&self) -> &str {
            "trickle"
        }
        fn fd(&self) -> RawFd {
            -1
        }
        fn wants_writable(&self) -> bool {
            true
        }
        fn carries(&self) -> super::super::Carry {
            super::super::Carry::Frames
        }
        fn read_now(&self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.broken {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let mut room = self.room.lock().expect("lock");
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            let mut out = self.out.lock().expect("lock");
            for b in bufs {
                let take = b.len().min(*room).min(self.per_call - n);
                out.extend_from_slice(&b[..take]);
                n += take;
                *room -= take;
                if *room == 0 || n == self.per_call {
                    break;
                }
            }
            *self.calls.lock().expect("lock") += 1;
            Ok(n)
        }
        fn wait_readable(&self, _: Instant) -> io::Result<bool> {
            Ok(false)
        }
        fn shutdown(&self) {}
    }

    fn frame(seq: u64, n: usize) -> Arc<Encoded> {
        let data: Vec<u8> = (0..n).map(|i| (i * 13 + seq as usize) as u8).collect();
        let m = Message::new()
            .field("seq", seq)
            .tensor("x", Tensor::from_slice(&data, &[n]).expect("tensor"));
        Arc::new(encode(&m, &FrameMeta::message("/t", seq), LINK_ENCODING).expect("encode"))
    }

    fn bytes_of(f: &Encoded) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(f, &mut out).expect("write");
        out
    }

    #[test]
    fn frames_written_in_pieces_arrive_whole_and_in_order() {
        let link = Trickle::new(0, 1000);
        let outbox = Outbox::new();
        let frames: Vec<_> = (0..5).map(|i| frame(i, 777 * i as usize + 3)).collect();
        for f in &frames {
            outbox
                .push(Outgoing::Frame(Arc::clone(f)), None)
                .expect("open");
        }
        let mut rounds = 0;
        loop {
            *link.room.lock().expect("lock") = 1501;
            match outbox.pump(&link) {
                Pumped::Done => break,
                Pumped::Full => rounds += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(rounds > 2, "the frames needed several rounds");
        let want: Vec<u8> = frames.iter().flat_map(|f| bytes_of(f)).collect();
        assert!(*link.out.lock().expect("lock") == want);
    }

    #[test]
    fn drop_oldest_drops_only_items_not_started() {
        let link = Trickle::new(10, 10);
        let outbox = Outbox::new();
        let lane = Arc::new(Lane::new(2, None, Overflow::DropOldest));
        let frames: Vec<_> = (0..5).map(|i| frame(i, 100)).collect();
        outbox
            .push(
                Outgoing::Frame(Arc::clone(&frames[0])),
                Some(Arc::clone(&lane)),
            )
            .expect("open");
        // The first frame starts, and stops after 10 bytes.
        assert!(matches!(outbox.pump(&link), Pumped::Full));
        for f in &frames[1..] {
            outbox
                .push(Outgoing::Frame(Arc::clone(f)), Some(Arc::clone(&lane)))
                .expect("open");
        }
        assert_eq!(lane.dropped(), 3, "frames 1, 2 and 3 made room in turn");
        loop {
            *link.room.lock().expect("lock") = 1 << 20;
            if let Pumped::Done = outbox.pump(&link) {
                break;
            }
        }
        let want: Vec<u8> = bytes_of(&frames[0])
            .into_iter()
            .chain(bytes_of(&frames[4]))
            .collect();
        assert!(*link.out.lock().expect("lock") == want);
        assert_eq!(lane.queued(), 0);
    }

    #[test]
    fn a_publisher_at_the_lane_limit_is_woken_once_half_the_lane_is_written() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        let lane = Lane::new(8, None, Overflow::Block);
        for _ in 0..8 {
            lane.add(100);
        }
        assert!(lane.poll_room(&mut cx).is_pending());
        for (written, woken) in [(1, 0), (2, 0), (3, 0), (4, 1)] {
            lane.done(100);
            assert_eq!(
                count.0.load(Ordering::SeqCst),
                woken,
                "after {written} of 8 written"
            );
        }
        assert!(lane.poll_room(&mut cx).is_ready());
    }

    #[test]
    fn a_failed_write_closes_the_outbox_and_frees_its_lanes() {
        let broken = Trickle {
            broken: true,
            ..Trickle::new(1 << 20, 1 << 20)
        };
        let outbox = Outbox::new();
        let lane = Arc::new(Lane::new(8, None, Overflow::Block));
        for i in 0..3 {
            outbox
                .push(Outgoing::Frame(frame(i, 10)), Some(Arc::clone(&lane)))
                .expect("open");
        }
        assert!(matches!(outbox.pump(&broken), Pumped::Failed(_)));
        assert_eq!(lane.queued(), 0);
        assert!(outbox.push(Outgoing::Frame(frame(9, 1)), None).is_err());
    }

    #[test]
    fn a_slot_whose_descriptor_cannot_be_sent_fails_the_connection() {
        // A shm peer that died: sending a new slot's descriptor fails. The
        // connection is over (and reported lost); its frames are not
        // dropped one by one while the publisher goes on as if it were
        // served.
        let link = Trickle::new(1 << 20, 1 << 20);
        let slots =
            crate::transport::shm::slots::SlotPool::new(1 << 20, std::time::Duration::from_secs(1));
        let outbox = Outbox::new();
        let lane = Arc::new(Lane::new(8, None, Overflow::Block));
        for seq in 0..3 {
            let held = slots.take(4096).expect("slot");
            outbox
                .push(
                    Outgoing::Slot {
                        held,
                        len: 4096,
                        meta: FrameMeta::message("/t", seq),
                    },
                    Some(Arc::clone(&lane)),
                )
                .expect("open");
        }
        assert!(matches!(outbox.pump(&link), Pumped::Failed(_)));
        assert_eq!(lane.queued(), 0);
        assert_eq!(lane.written(), 0);
        assert!(outbox.push(Outgoing::Frame(frame(9, 1)), None).is_err());
    }

    /// A shm-like link whose peer releases every slot it holds as soon as
    /// any byte reaches it: before `write_now` returns to the writer.
    struct QuickReleaser {
        awaiting: Mutex<Vec<crate::transport::shm::slots::SlotUse>>,
        written: Mutex<usize>,
    }

    impl ByteLink for QuickReleaser {
        fn label(&self) -> &str {
            "quick releaser"
        }
        fn fd(&self) -> RawFd {
            -1
        }
        fn wants_writable(&self) -> bool {
            true
        }
        fn carries(&self) -> super::super::Carry {
            super::super::Carry::Frames
        }
        fn read_now(&self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let n: usize = bufs.iter().map(|b| b.len()).sum();
            *self.written.lock().expect("lock") += n;
            // The peer read the pointer and dropped the frame already.
            self.awaiting.lock().expect("lock").clear();
            Ok(n)
        }
        fn wait_readable(&self, _: Instant) -> io::Result<bool> {
            Ok(false)
        }
        fn shutdown(&self) {}
        fn send_fd(&self, _: RawFd) -> io::Result<()> {
            Ok(())
        }
        fn keep_until_released(&self, held: crate::transport::shm::slots::SlotUse) {
            self.awaiting.lock().expect("lock").push(held);
        }
    }

    #[test]
    fn a_slot_released_before_its_pointer_write_returns_is_free_again() {
        // Once in a while a receiver releases a slot before the writing
        // thread is back from the write that finished its pointer: the
        // hold must already be registered, or it is never given back and
        // the node's shared memory runs out.
        let link = QuickReleaser {
            awaiting: Mutex::new(Vec::new()),
            written: Mutex::new(0),
        };
        let slots = crate::transport::shm::slots::SlotPool::new(
            8192,
            std::time::Duration::from_millis(200),
        );
        let outbox = Outbox::new();
        for seq in 0..20 {
            // Two 4 KiB slots fit the pool: twenty pass only if each is released.
            let held = slots
                .take(4096)
                .expect("a slot comes back after each release");
            outbox
                .push(
                    Outgoing::Slot {
                        held,
                        len: 4096,
                        meta: FrameMeta::message("/t", seq),
                    },
                    None,
                )
                .expect("open");
            assert!(matches!(outbox.pump(&link), Pumped::Done));
            assert!(
                link.awaiting.lock().expect("lock").is_empty(),
                "message {seq}: the slot is still held"
            );
        }
        assert!(*link.written.lock().expect("lock") > 0);
    }

    #[test]
    fn small_frames_queued_together_leave_in_one_write_in_order() {
        let link = Trickle::new(1 << 20, 1 << 20);
        let outbox = Outbox::new();
        let lane = Arc::new(Lane::new(64, None, Overflow::Block));
        // Twenty small frames, a large one (written on its own), then five
        // small ones again.
        let mut frames: Vec<_> = (0..20).map(|i| frame(i, 100 + i as usize)).collect();
        frames.push(frame(20, 100 << 10));
        frames.extend((21..26).map(|i| frame(i, 50)));
        for f in &frames {
            outbox
                .push(Outgoing::Frame(Arc::clone(f)), Some(Arc::clone(&lane)))
                .expect("open");
        }
        assert!(matches!(outbox.pump(&link), Pumped::Done));
        let want: Vec<u8> = frames.iter().flat_map(|f| bytes_of(f)).collect();
        assert!(*link.out.lock().expect("lock") == want, "bytes in order");
        assert_eq!(lane.written(), 26);
        assert_eq!(lane.queued(), 0);
        assert_eq!(
            *link.calls.lock().expect("lock"),
            3,
            "the small frames before and after the large one each in one write"
        );
    }

    #[test]
    fn a_batch_cut_short_goes_on_where_it_stopped() {
        // Room for 2.5 of the batched frames at a time, in calls of any size.
        let one = bytes_of(&frame(0, 300)).len();
        let link = Trickle::new(0, 1 << 20);
        let outbox = Outbox::new();
        let lane = Arc::new(Lane::new(64, None, Overflow::Block));
        let frames: Vec<_> = (0..12).map(|i| frame(i, 300)).collect();
        for f in &frames {
            outbox
                .push(Outgoing::Frame(Arc::clone(f)), Some(Arc::clone(&lane)))
                .expect("open");
        }
        let mut rounds = 0;
        loop {
            *link.room.lock().expect("lock") = one * 5 / 2;
            rounds += 1;
            match outbox.pump(&link) {
                Pumped::Done => break,
                Pumped::Full => assert!(rounds < 100, "no progress"),
                other => panic!("{other:?}"),
            }
        }
        let want: Vec<u8> = frames.iter().flat_map(|f| bytes_of(f)).collect();
        assert!(*link.out.lock().expect("lock") == want, "bytes in order");
        assert_eq!(lane.written(), 12);
        assert_eq!(lane.queued(), 0);
    }
}
