//! Striping: one large frame split across several tcp connections to the
//! same peer, so that each end copies on several cores at once (a single
//! stream is one copy on each side, on one core each).
//!
//! A connection that stripes has up to [`MAX_PARTS`]` - 1` *stripes*: extra
//! connections to the same peer, opened by the dialer (with the node's TLS
//! and secret, like any connection) and joined to the main one by a token
//! the listener gave out. Each stripe has a thread that reads it and one
//! that writes it; the main connection stays on its I/O thread.
//!
//! A striped frame of `L` bytes in `n` parts is cut at [`cuts`]: the main
//! connection carries a *plan* record (transfer number, `n`, `L`) and then
//! the frame's bytes `[0, c1)` (its whole head and the first share of its
//! buffers); stripe `i` carries a *chunk* record and then `[ci, ci+1)`. The
//! receiver reserves the whole frame against its budget when the main
//! connection's prelude comes, the stripes' threads read their shares
//! straight into that buffer, and the frame is decoded (every check a
//! frame gets) once all parts are in, in the main connection's order.
//!
//! Records are 32 bytes: a magic (`TFSP` plan, `TFSC` chunk, `TFSJ` join,
//! `TFSA` accepted), a version, and little-endian fields.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::outbox::{Lane, Outbox};
use super::{ByteLink, Connection, Outgoing};
use crate::outbound::FrameWriter;
use crate::wire::Encoded;

/// Bytes of every stripe record.
pub(crate) const RECORD_BYTES: usize = 32;
const PLAN: &[u8; 4] = b"TFSP";
const CHUNK: &[u8; 4] = b"TFSC";
const JOIN: &[u8; 4] = b"TFSJ";
const ACCEPT: &[u8; 4] = b"TFSA";
const VERSION: u16 = 1;
/// Most parts a frame is cut into (the main connection and 7 stripes).
pub(crate) const MAX_PARTS: usize = 8;
/// Cut points fall on multiples of this.
const CUT_ALIGN: u64 = 4096;
/// By default, frames from this size on are striped: one part per this
/// many bytes, at most one per core and at most 4.
pub(crate) const AUTO_PART_BYTES: u64 = 16 << 20;
/// Frames smaller than this are never striped, whatever a channel asks.
pub(crate) const MIN_STRIPED_BYTES: u64 = 1 << 20;
/// How often a thread waiting on a stripe looks whether it should stop.
const TICK: Duration = Duration::from_millis(200);
/// Bytes a stripe's reader reads at a time into a frame.
const READ_PIECE: usize = 4 << 20;

/// What joins a stripe to its main connection.
pub(crate) type Token = [u8; 16];

/// How many parts a frame of `len` bytes travels in, given its channel's
/// `stripes` setting (`None`: by size) and the parts this host's cores can
/// copy at once.
pub(crate) fn parts_for(len: u64, setting: Option<usize>) -> usize {
    if len < MIN_STRIPED_BYTES {
        return 1;
    }
    match setting {
        Some(n) => n.clamp(1, MAX_PARTS),
        None => {
            // Read once: asking costs a system call or two.
            static CORES: OnceLock<usize> = OnceLock::new();
            let cores =
                *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from));
            let by_size = usize::try_from(len / AUTO_PART_BYTES).unwrap_or(usize::MAX);
            by_size.clamp(1, cores.clamp(1, 4))
        }
    }
}

/// The `parts + 1` cut points of a frame of `len` bytes: part `i` is
/// `[cuts[i], cuts[i + 1])`. Shares are equal, rounded up to 4 KiB.
pub(crate) fn cuts(len: u64, parts: usize) -> Vec<u64> {
    let parts = parts.max(1) as u64;
    let share = len.div_ceil(parts).div_ceil(CUT_ALIGN) * CUT_ALIGN;
    (0..=parts).map(|i| (i * share).min(len)).collect()
}

fn record(magic: &[u8; 4], small: u16) -> [u8; RECORD_BYTES] {
    let mut r = [0u8; RECORD_BYTES];
    r[..4].copy_from_slice(magic);
    r[4..6].copy_from_slice(&VERSION.to_le_bytes());
    r[6..8].copy_from_slice(&small.to_le_bytes());
    r
}

fn u64_at(r: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&r[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Checks a record's magic and version; its small field.
fn opened(r: &[u8], magic: &[u8; 4], what: &str) -> Result<u16, String> {
    if r.len() < RECORD_BYTES || &r[..4] != magic {
        return Err(format!(
            "expected a stripe {what} record, found bytes {:02x?}",
            &r[..r.len().min(8)]
        ));
    }
    let version = u16::from_le_bytes([r[4], r[5]]);
    if version != VERSION {
        return Err(format!(
            "a stripe {what} record of version {version}; this build reads version {VERSION}"
        ));
    }
    Ok(u16::from_le_bytes([r[6], r[7]]))
}

/// Whether `bytes` (where a frame's prelude would be) start a plan record.
pub(crate) fn is_plan(bytes: &[u8]) -> bool {
    bytes.starts_with(PLAN)
}

/// Whether `bytes` (the first of a connection) start a join record.
pub(crate) fn is_join(bytes: &[u8]) -> bool {
    bytes.starts_with(JOIN)
}

/// The next frame on a main connection is striped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Striped frames sent on this connection before it.
    pub(crate) transfer: u64,
    /// Parts, the main connection's included.
    pub(crate) parts: usize,
    /// Bytes of the whole frame.
    pub(crate) frame_len: u64,
}

impl Plan {
    pub(crate) fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut r = record(PLAN, self.parts as u16);
        r[8..16].copy_from_slice(&self.transfer.to_le_bytes());
        r[16..24].copy_from_slice(&self.frame_len.to_le_bytes());
        r
    }

    pub(crate) fn parse(r: &[u8]) -> Result<Plan, String> {
        let parts = usize::from(opened(r, PLAN, "plan")?);
        if !(2..=MAX_PARTS).contains(&parts) {
            return Err(format!(
                "a stripe plan of {parts} parts; between 2 and {MAX_PARTS} are allowed"
            ));
        }
        Ok(Plan {
            transfer: u64_at(r, 8),
            parts,
            frame_len: u64_at(r, 16),
        })
    }
}

/// One stripe's share of a striped frame follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    transfer: u64,
    offset: u64,
    len: u64,
}

impl Chunk {
    fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut r = record(CHUNK, 0);
        r[8..16].copy_from_slice(&self.transfer.to_le_bytes());
        r[16..24].copy_from_slice(&self.offset.to_le_bytes());
        r[24..32].copy_from_slice(&self.len.to_le_bytes());
        r
    }

    fn parse(r: &[u8]) -> Result<Chunk, String> {
        opened(r, CHUNK, "chunk")?;
        Ok(Chunk {
            transfer: u64_at(r, 8),
            offset: u64_at(r, 16),
            len: u64_at(r, 24),
        })
    }
}

/// A new connection asks to be stripe `index` of the connection that was
/// given `token` (the join record), or is told it is (the accepted one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Join {
    pub(crate) token: Token,
    pub(crate) index: usize,
}

impl Join {
    fn encode(&self, magic: &[u8; 4]) -> [u8; RECORD_BYTES] {
        let mut r = record(magic, self.index as u16);
        r[8..24].copy_from_slice(&self.token);
        r
    }

    pub(crate) fn join_record(&self) -> [u8; RECORD_BYTES] {
        self.encode(JOIN)
    }

    pub(crate) fn accept_record(&self) -> [u8; RECORD_BYTES] {
        self.encode(ACCEPT)
    }

    fn parse(r: &[u8], magic: &[u8; 4], what: &str) -> Result<Join, String> {
        let index = usize::from(opened(r, magic, what)?);
        if !(1..MAX_PARTS).contains(&index) {
            return Err(format!(
                "a stripe {what} record for stripe {index}; stripes are numbered 1 to {}",
                MAX_PARTS - 1
            ));
        }
        let mut token = [0u8; 16];
        token.copy_from_slice(&r[8..24]);
        Ok(Join { token, index })
    }

    pub(crate) fn parse_join(r: &[u8]) -> Result<Join, String> {
        Self::parse(r, JOIN, "join")
    }

    pub(crate) fn parse_accept(r: &[u8]) -> Result<Join, String> {
        Self::parse(r, ACCEPT, "accepted")
    }
}

/// The start of a frame buffer that stripes' readers write into.
#[derive(Clone, Copy)]
struct Base(*mut u8);

// SAFETY: the pointer is only dereferenced inside `Sink::write_into`, for a
// range that belongs to one stripe alone (the cuts are fixed when the sink
// is made and each index has one reader), while the sink is not cancelled;
// cancelling waits for every write in progress, and the buffer is let go
// only after that (`Claim` is dropped before the frame's buffer).
unsafe impl Send for Base {}
// SAFETY: as above; shared references never touch the bytes.
unsafe impl Sync for Base {}

struct SinkState {
    cancelled: bool,
    /// Bytes of its share each stripe may write while the frame is on
    /// probation (`u64::MAX` once it is reserved whole).
    window: u64,
    /// Stripes whose share is all in, by index (bit `i`).
    done: u8,
    /// Stripe readers writing into the buffer now.
    writers: usize,
    /// Stripes whose share is not all in.
    left: usize,
}

/// Where a striped frame's stripes land: its buffer and its cut points.
pub(crate) struct Sink {
    transfer: u64,
    base: Base,
    len: u64,
    cuts: Vec<u64>,
    state: Mutex<SinkState>,
    idle: Condvar,
    /// Bytes the stripes have brought so far.
    received: AtomicU64,
}

impl Sink {
    fn lock(&self) -> MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stripe `index`'s share.
    fn range(&self, index: usize) -> Option<Range<u64>> {
        (index >= 1 && index + 1 < self.cuts.len()).then(|| self.cuts[index]..self.cuts[index + 1])
    }

    /// Runs `f` on the buffer's bytes `[at, at + len)` — fewer, up to the
    /// end of the window of the share that starts at `start`, waiting while
    /// the window is full — unless the frame was given up (`None`).
    fn write_into<R>(
        &self,
        start: u64,
        at: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R> {
        let len = {
            let mut s = self.lock();
            loop {
                if s.cancelled {
                    return None;
                }
                let room = start.saturating_add(s.window).saturating_sub(at);
                if room > 0 {
                    s.writers += 1;
                    break len.min(usize::try_from(room).unwrap_or(usize::MAX));
                }
                // On probation, and this share's first bytes are in: the
                // rest waits in the socket until the frame is admitted.
                s = self.idle.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        debug_assert!(at + len as u64 <= self.len);
        // SAFETY: `[at, at + len)` lies inside one stripe's share of a live
        // buffer of `self.len` bytes (checked by the caller against
        // `range`); only this stripe's reader writes it, and the buffer
        // stays allocated while `writers` is above zero (see `Base`).
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.base.0.add(at as usize), len) };
        let out = f(bytes);
        let mut s = self.lock();
        s.writers -= 1;
        if s.writers == 0 {
            self.idle.notify_all();
        }
        Some(out)
    }

    /// Whether stripe `index` brought its share already.
    fn has(&self, index: usize) -> bool {
        self.lock().done & (1 << index) != 0
    }

    /// Stripe `index`'s share is all in; `true` when it was the last.
    fn finish(&self, index: usize) -> bool {
        let mut s = self.lock();
        s.done |= 1 << index;
        s.left = s.left.saturating_sub(1);
        s.left == 0
    }

    /// Gives the frame up and waits until no reader writes into it.
    fn cancel(&self) {
        let mut s = self.lock();
        s.cancelled = true;
        // Readers waiting for the window to open see it too.
        self.idle.notify_all();
        while s.writers > 0 {
            s = self.idle.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A main connection's hold on a striped frame it is reading: dropping it
/// (the frame decoded, or given up) stops the stripes writing into it.
/// Held by the partial frame *before* its buffer, so it drops first.
pub(crate) struct Claim {
    sink: Arc<Sink>,
    hub: Arc<Hub>,
}

impl Claim {
    /// Where the main connection's part ends.
    fn main_end(&self) -> usize {
        self.sink.cuts[1] as usize
    }

    /// The main connection's part of the frame buffer, `[0, main_end)`:
    /// made from the buffer's address, not the buffer, so that it claims
    /// none of the stripes' shares while they are written.
    pub(crate) fn main_part(&mut self) -> &mut [u8] {
        // SAFETY: `base` is the start of a live buffer of `len` bytes (the
        // claim is dropped before it); `[0, main_end)` is written by the
        // main connection alone, the stripes writing only past it; `&mut
        // self` keeps two such slices from living at once.
        unsafe { std::slice::from_raw_parts_mut(self.sink.base.0, self.main_end()) }
    }

    /// The whole frame is reserved now: the stripes may write all of
    /// their shares.
    pub(crate) fn admit(&self) {
        self.sink.lock().window = u64::MAX;
        self.sink.idle.notify_all();
    }

    /// Whether every stripe's share is in.
    pub(crate) fn complete(&self) -> bool {
        self.sink.lock().left == 0
    }

    /// Bytes the stripes have brought so far.
    pub(crate) fn received(&self) -> u64 {
        self.sink.received.load(Ordering::Relaxed)
    }

    /// Whether the main connection's part is in and the stripes' are not.
    pub(crate) fn waits(&self, filled: usize) -> bool {
        filled == self.main_end() && !self.complete()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.sink.cancel();
        self.hub.lock().sinks.remove(&self.sink.transfer);
    }
}

#[derive(Default)]
struct HubState {
    sinks: HashMap<u64, Arc<Sink>>,
    /// The next transfer the main connection expects.
    next: u64,
    /// Parts the peer may stripe over (stripes agreed, plus the main).
    parts: usize,
    closed: bool,
}

/// The receiving side of a connection's stripes: the frames being read,
/// which stripes' readers wait for.
#[derive(Default)]
pub(crate) struct Hub {
    state: Mutex<HubState>,
    changed: Condvar,
    /// Runs the main connection's reader (a frame's last share came).
    waker: OnceLock<Waker>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_waker(&self, waker: Waker) {
        let _ = self.waker.set(waker);
    }

    /// The peer may stripe frames over `parts` parts from now on.
    pub(crate) fn expect(&self, parts: usize) {
        let mut s = self.lock();
        s.parts = s.parts.max(parts.min(MAX_PARTS));
    }

    /// Checks `plan` against what was agreed and the frame that follows it
    /// (`len` bytes, its head `head`); where the main connection's part of
    /// it ends.
    ///
    /// # Errors
    ///
    /// A plan out of order, over more parts than were agreed, for another
    /// length, or one whose first part would not hold the frame's head.
    pub(crate) fn check(&self, plan: &Plan, len: u64, head: u64) -> Result<u64, String> {
        let s = self.lock();
        if plan.transfer != s.next {
            return Err(format!(
                "a stripe plan for transfer {} where {} was next",
                plan.transfer, s.next
            ));
        }
        if plan.parts > s.parts {
            return Err(format!(
                "a frame striped over {} connections where {} were agreed",
                plan.parts,
                s.parts.max(1)
            ));
        }
        if plan.frame_len != len {
            return Err(format!(
                "a stripe plan for {} bytes before a frame of {len}",
                plan.frame_len
            ));
        }
        let first = cuts(len, plan.parts)[1];
        if first < head {
            return Err(format!(
                "a striped frame whose head ({head} bytes) does not fit its first part ({first} bytes)"
            ));
        }
        Ok(first)
    }

    /// The main connection read `plan` ([`check`](Self::check)ed) and took
    /// a buffer of `len` bytes at `base` for its frame: its stripes' readers
    /// may fill their shares, each at most `window` bytes of it until the
    /// frame is [admitted](Claim::admit) (on probation; `u64::MAX`: it is).
    pub(crate) fn open(
        self: &Arc<Self>,
        plan: &Plan,
        len: u64,
        base: *mut u8,
        window: u64,
    ) -> Claim {
        let mut s = self.lock();
        s.next += 1;
        let cuts = cuts(len, plan.parts);
        let sink = Arc::new(Sink {
            transfer: plan.transfer,
            base: Base(base),
            len,
            cuts,
            state: Mutex::new(SinkState {
                cancelled: false,
                window,
                done: 0,
                writers: 0,
                left: plan.parts - 1,
            }),
            idle: Condvar::new(),
            received: AtomicU64::new(0),
        });
        s.sinks.insert(plan.transfer, Arc::clone(&sink));
        self.changed.notify_all();
        Claim {
            sink,
            hub: Arc::clone(self),
        }
    }

    /// The sink of `transfer`, once the main connection has opened it;
    /// `Ok(None)` once the hub is closed.
    ///
    /// # Errors
    ///
    /// A transfer that is over (or never was striped this far).
    fn wait_sink(&self, transfer: u64) -> Result<Option<Arc<Sink>>, String> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return Ok(None);
            }
            if let Some(sink) = s.sinks.get(&transfer) {
                return Ok(Some(Arc::clone(sink)));
            }
            if transfer < s.next {
                return Err(format!("a chunk of transfer {transfer}, which is over"));
            }
            s = self
                .changed
                .wait_timeout(s, TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    fn wake_main(&self) {
        if let Some(w) = self.waker.get() {
            w.wake_by_ref();
        }
    }
}

struct SendQueue {
    parts: VecDeque<Part>,
    closed: bool,
}

/// A frame's share for a stripe, counted in its subscriber's lane until
/// it is written (or given up), so that a publisher's flush waits for it.
struct Part {
    writer: FrameWriter,
    lane: Option<Arc<Lane>>,
}

impl Drop for Part {
    fn drop(&mut self) {
        if let Some(lane) = &self.lane {
            lane.part_done();
        }
    }
}

/// What one stripe's writing thread writes, in order.
struct Sender {
    queue: Mutex<SendQueue>,
    more: Condvar,
}

impl Sender {
    fn lock(&self) -> MutexGuard<'_, SendQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, part: Part) {
        self.lock().parts.push_back(part);
        self.more.notify_one();
    }

    fn next(&self) -> Option<Part> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if let Some(p) = q.parts.pop_front() {
                return Some(p);
            }
            q = self.more.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn close(&self) {
        let dropped = {
            let mut q = self.lock();
            q.closed = true;
            std::mem::take(&mut q.parts)
        };
        drop(dropped);
        self.more.notify_all();
    }
}

/// Ends a stripe's writer: what is queued for it is dropped, and a writer
/// that panicked fails its connection (a frame it carried lacks a share).
struct WriterEnded {
    sender: Arc<Sender>,
    main: Weak<dyn Connection>,
    what: String,
}

impl Drop for WriterEnded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            fail(&self.main, &format!("{}: its writer failed", self.what));
        }
        self.sender.close();
    }
}

/// A stripe joined to a connection.
struct Stripe {
    conn: Arc<dyn Connection>,
    sender: Arc<Sender>,
}

#[derive(Default)]
struct SendSide {
    /// Stripe `i` at `stripes[i - 1]`, as they join.
    stripes: Vec<Option<Stripe>>,
    /// Striped frames sent so far.
    next: u64,
}

/// A connection's stripes, both ways; see the [module docs](self).
#[derive(Default)]
pub(crate) struct Stripes {
    pub(crate) hub: Arc<Hub>,
    send: Mutex<SendSide>,
    /// Stripes were asked for (once per connection).
    asked: AtomicBool,
    closed: AtomicBool,
    /// Stripe connections counted against the node's limit for it.
    reserved: std::sync::atomic::AtomicUsize,
}

impl Stripes {
    fn lock(&self) -> MutexGuard<'_, SendSide> {
        self.send.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `true` the first time only: whoever gets it sets the stripes up.
    pub(crate) fn ask(&self) -> bool {
        !self.asked.swap(true, Ordering::AcqRel)
    }

    /// Records `n` stripe connections counted for this connection; `false`
    /// when some were before (its stripes are set up once).
    pub(crate) fn reserve(&self, n: usize) -> bool {
        self.reserved
            .compare_exchange(0, n, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The stripe connections counted for it, now let go.
    pub(crate) fn take_reserved(&self) -> usize {
        self.reserved.swap(0, Ordering::AcqRel)
    }

    /// Makes `conn` stripe `index` of the connection `main`: a thread
    /// reads it into `main`'s frames, another writes what `main` stripes.
    ///
    /// # Errors
    ///
    /// The index is taken or the stripes are closed; a thread that could
    /// not be started.
    pub(crate) fn attach(
        &self,
        conn: Arc<dyn Connection>,
        index: usize,
        main: Weak<dyn Connection>,
    ) -> Result<(), String> {
        if conn.stream().is_none() || !(1..MAX_PARTS).contains(&index) {
            return Err(format!("stripe {index} cannot join"));
        }
        let mut side = self.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err("the connection is closed".into());
        }
        if side.stripes.len() < index {
            side.stripes.resize_with(index, || None);
        }
        if side.stripes[index - 1].is_some() {
            return Err(format!("stripe {index} has joined already"));
        }
        let sender = Arc::new(Sender {
            queue: Mutex::new(SendQueue {
                parts: VecDeque::new(),
                closed: false,
            }),
            more: Condvar::new(),
        });
        let label = conn.label().to_string();
        let (rconn, hub, rmain) = (Arc::clone(&conn), Arc::clone(&self.hub), main.clone());
        std::thread::Builder::new()
            .name(format!("tf-stripe{index}-in"))
            .spawn(move || {
                let link = rconn.stream().expect("checked above").link();
                if let Err(why) = read_stripe(link, index, &hub) {
                    fail(&rmain, &format!("stripe {index} ({label}): {why}"));
                }
            })
            .map_err(|e| format!("starting a stripe's reader: {e}"))?;
        let (wconn, wsender) = (Arc::clone(&conn), Arc::clone(&sender));
        let label = conn.label().to_string();
        std::thread::Builder::new()
            .name(format!("tf-stripe{index}-out"))
            .spawn(move || {
                // However the writer ends, the shares still queued for it
                // are given up (their lanes let go of them) and, unless the
                // stripes were closed, its connection fails with it.
                let ended = WriterEnded {
                    sender: Arc::clone(&wsender),
                    main: main.clone(),
                    what: format!("stripe {index} ({label})"),
                };
                let link = wconn.stream().expect("checked above").link();
                if let Err(why) = write_stripe(link, &wsender) {
                    fail(&main, &format!("{}: {why}", ended.what));
                }
            })
            .map_err(|e| format!("starting a stripe's writer: {e}"))?;
        side.stripes[index - 1] = Some(Stripe { conn, sender });
        Ok(())
    }

    /// Sends `frame` in `parts` parts when that many are joined (fewer
    /// when fewer are): its first part through `out` (counted against
    /// `lane`), the others each through a stripe. `None` when it cannot be
    /// striped (no stripe yet, a device buffer in it, a head too large):
    /// the caller sends it whole.
    ///
    /// # Errors
    ///
    /// The main connection takes nothing more.
    pub(crate) fn send(
        &self,
        out: &Outbox,
        frame: &Arc<Encoded>,
        lane: Option<Arc<Lane>>,
        parts: usize,
    ) -> Option<Result<(), String>> {
        let len = frame.frame_len();
        if parts < 2 || !frame.host_only() || self.closed.load(Ordering::Acquire) {
            return None;
        }
        let mut side = self.lock();
        // Stripes joined so far, counted from 1 without gaps.
        let joined = side.stripes.iter().take_while(|s| s.is_some()).count();
        let parts = parts.min(joined + 1);
        if parts < 2 {
            return None;
        }
        let cuts = cuts(len, parts);
        if cuts[1] < frame.head().len() as u64 {
            return None;
        }
        let transfer = side.next;
        let plan = Plan {
            transfer,
            parts,
            frame_len: len,
        };
        // Under the lock: the main connection's plans and every stripe's
        // chunks go in the same order. The shares count in the lane before
        // the first part does, so a flush never finds it empty between.
        if let Some(lane) = &lane {
            for _ in 1..parts {
                lane.part_queued();
            }
        }
        if let Err(why) = out.push(
            Outgoing::Part {
                frame: Arc::clone(frame),
                plan: plan.encode(),
                end: cuts[1],
            },
            lane.clone(),
        ) {
            if let Some(lane) = &lane {
                for _ in 1..parts {
                    lane.part_done();
                }
            }
            return Some(Err(why));
        }
        side.next += 1;
        for (i, stripe) in side.stripes.iter().take(parts - 1).enumerate() {
            let stripe = stripe.as_ref().expect("counted above");
            let range = cuts[i + 1]..cuts[i + 2];
            let chunk = Chunk {
                transfer,
                offset: range.start,
                len: range.end - range.start,
            };
            stripe.sender.push(Part {
                writer: FrameWriter::part(Arc::clone(frame), chunk.encode(), range),
                lane: lane.clone(),
            });
        }
        Some(Ok(()))
    }

    /// Ends every stripe: their threads stop, frames waiting on them are
    /// given up.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.hub.close();
        let stripes = std::mem::take(&mut self.lock().stripes);
        for s in stripes.into_iter().flatten() {
            s.sender.close();
            s.conn.close("its connection closed");
        }
    }
}

impl Drop for Stripes {
    fn drop(&mut self) {
        self.close();
    }
}

/// A stripe failed: so does its main connection (a frame may lack a part).
fn fail(main: &Weak<dyn Connection>, why: &str) {
    if let Some(main) = main.upgrade() {
        tracing::debug!(
            peer = main.label(),
            error = why,
            "a stripe ended; closing its connection"
        );
        main.close(why);
        if let Some(stream) = main.stream() {
            stream.nudge();
        }
    }
}

/// Waits until `link` has bytes, looking every tick whether the hub
/// closed; `false` when it did.
fn wait_readable(link: &dyn ByteLink, hub: &Hub) -> io::Result<bool> {
    loop {
        if hub.is_closed() {
            return Ok(false);
        }
        if link.wait_readable(Instant::now() + TICK)? {
            return Ok(true);
        }
    }
}

/// Reads a stripe's chunks into their frames until the stripe ends.
fn read_stripe(link: &dyn ByteLink, index: usize, hub: &Hub) -> Result<(), String> {
    let fault = |e: io::Error| format!("reading: {e}");
    loop {
        let mut rec = [0u8; RECORD_BYTES];
        let mut got = 0;
        while got < RECORD_BYTES {
            match link.read_now(&mut rec[got..]) {
                // The peer closed between records (as it does when it
                // leaves): the main connection's end says what follows; a
                // frame still waiting on this stripe is judged by the
                // progress rule.
                Ok(0) if got == 0 || hub.is_closed() => return Ok(()),
                Ok(0) => return Err("it closed inside a record".into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_readable(link, hub).map_err(fault)? {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) if hub.is_closed() => return Ok(()),
                Err(e) => return Err(fault(e)),
            }
        }
        let chunk = Chunk::parse(&rec)?;
        let Some(sink) = hub.wait_sink(chunk.transfer)? else {
            return Ok(());
        };
        if sink.has(index) {
            return Err(format!(
                "it sent its share of transfer {} twice",
                chunk.transfer
            ));
        }
        let want = sink
            .range(index)
            .ok_or_else(|| format!("transfer {} has no part for it", chunk.transfer))?;
        if chunk.offset != want.start || chunk.len != want.end - want.start {
            return Err(format!(
                "it announced bytes {}..{} of transfer {} where its share is {}..{}",
                chunk.offset,
                chunk.offset.saturating_add(chunk.len),
                chunk.transfer,
                want.start,
                want.end
            ));
        }
        let mut at = want.start;
        while at < want.end {
            let n = usize::try_from(want.end - at).map_or(READ_PIECE, |n| n.min(READ_PIECE));
            match sink.write_into(want.start, at, n, |buf| link.read_now(buf)) {
                None => return Ok(()),
                Some(Ok(0)) => return Err("it closed inside a chunk".into()),
                Some(Ok(k)) => {
                    at += k as u64;
                    sink.received.fetch_add(k as u64, Ordering::Relaxed);
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_readable(link, hub).map_err(fault)? {
                        return Ok(());
                    }
                }
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Some(Err(_)) if hub.is_closed() => return Ok(()),
                Some(Err(e)) => return Err(fault(e)),
            }
        }
        if sink.finish(index) {
            hub.wake_main();
        }
    }
}

/// Writes what the main connection stripes over this stripe, in order.
fn write_stripe(link: &dyn ByteLink, sender: &Sender) -> Result<(), String> {
    let fault = |e: io::Error| format!("writing: {e}");
    let closed = || sender.lock().closed;
    while let Some(mut part) = sender.next() {
        loop {
            match part.writer.write_some(&mut |bufs| link.write_now(bufs)) {
                Ok(true) => break,
                Ok(false) => {
                    if closed() {
                        return Ok(());
                    }
                    link.wait_writable(Instant::now() + TICK).map_err(fault)?;
                }
                Err(_) if closed() => return Ok(()),
                Err(e) => return Err(fault(e)),
            }
        }
        link.flush();
        while link.send_held().map_err(fault)? {
            if closed() {
                return Ok(());
            }
            link.wait_writable(Instant::now() + TICK).map_err(fault)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_cover_the_frame_in_order_on_4_kib_boundaries() {
        for (len, parts) in [
            (64u64 << 20, 2),
            ((64 << 20) + 13, 3),
            (1 << 20, 8),
            (5000, 2),
        ] {
            let c = cuts(len, parts);
            assert_eq!(c.len(), parts + 1);
            assert_eq!((c[0], c[parts]), (0, len));
            assert!(c.windows(2).all(|w| w[0] <= w[1]));
            assert!(c[..parts].iter().all(|x| x % CUT_ALIGN == 0));
        }
    }

    #[test]
    fn records_read_back_and_foreign_ones_are_refused() {
        let plan = Plan {
            transfer: 7,
            parts: 3,
            frame_len: 1 << 30,
        };
        assert_eq!(Plan::parse(&plan.encode()), Ok(plan));
        let join = Join {
            token: [9; 16],
            index: 2,
        };
        assert_eq!(Join::parse_join(&join.join_record()), Ok(join));
        assert_eq!(Join::parse_accept(&join.accept_record()), Ok(join));
        assert!(Join::parse_join(&join.accept_record()).is_err());
        let mut too_many = plan.encode();
        too_many[6..8].copy_from_slice(&9u16.to_le_bytes());
        assert!(Plan::parse(&too_many)
            .expect_err("nine parts")
            .contains("between 2 and 8"));
        let mut newer = plan.encode();
        newer[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert!(Plan::parse(&newer)
            .expect_err("a newer version")
            .contains("version 2"));
        let chunk = Chunk {
            transfer: 1,
            offset: 4096,
            len: 10,
        };
        assert_eq!(Chunk::parse(&chunk.encode()), Ok(chunk));
        assert!(Chunk::parse(b"TFRM and then some bytes of a frame..").is_err());
    }

    #[test]
    fn parts_follow_the_setting_and_never_stripe_small_frames() {
        assert_eq!(parts_for(MIN_STRIPED_BYTES - 1, Some(4)), 1);
        assert_eq!(parts_for(MIN_STRIPED_BYTES, Some(4)), 4);
        assert_eq!(parts_for(1 << 30, Some(1)), 1);
        assert_eq!(parts_for(1 << 30, Some(99)), MAX_PARTS);
        assert_eq!(parts_for(AUTO_PART_BYTES - 1, None), 1);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(parts_for(1 << 30, None), cores.clamp(1, 4));
    }
}
