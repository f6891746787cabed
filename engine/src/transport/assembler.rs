//! [`Assembler`]: builds frames from a byte stream read without blocking,
//! across calls, so that whoever reads a connection — its I/O thread, or a
//! requester reading its own reply — can stop at any byte and the next
//! reader goes on from there.
//!
//! Each frame is read straight into a pooled buffer once its prelude has
//! been checked against the limits (nothing past the prelude is allocated
//! for a frame over them). With a [`Router`], a frame's head decides where
//! each tensor's bytes go: a buffer routed to a device is read from the
//! socket straight into that device's upload ([`Runtime::begin_upload`]:
//! CUDA's pinned chunks, each copied while the next one arrives; wgpu's
//! staging steps), the rest into the frame buffer. What is read of a frame,
//! uploads included, survives `Pending` returns.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use tensorferry_kernels::runtime::{DeviceBuffer, Runtime, Uploading};

use super::stripe::{self, Claim, Hub, Join, Plan};
use crate::error::{Error, Result};
use crate::pool::{BufferPool, PooledBuffer};
use crate::tensor::Tensor;
use crate::wire::{decode_at, plan_head, Frame, HeadPlan, Limits, Prelude, PRELUDE_BYTES};

/// Given what a frame's head says, the runtime each tensor's bytes should
/// be read into (one entry per tensor; `None`: the host frame buffer).
pub type Router = Arc<dyn Fn(&HeadPlan) -> Vec<Option<Runtime>> + Send + Sync>;

/// Bytes read ahead of the current frame: a small frame and the prelude of the
/// next one come in one `recv`.
const AHEAD_BYTES: usize = 64 << 10;

/// A socket read without blocking.
pub(crate) trait Source {
    /// Reads what is there now; `WouldBlock` when nothing is.
    fn recv_now(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Whether a read costs no system call (a shared-memory ring): then a
    /// frame is read straight into its buffer after its prelude, not through
    /// the read-ahead buffer, which would copy it twice.
    fn cheap_reads(&self) -> bool {
        false
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
    /// The connection opened with a join record: it asks to be a stripe
    /// of another connection ([`stripe`]); nothing after it was read.
    Join(Join),
}

/// The frame being built.
struct Partial {
    /// A striped frame's hold on its stripes' shares. Declared before
    /// `buf` so it drops first: stripes stop writing before the buffer goes.
    claim: Option<Claim>,
    buf: PooledBuffer,
    /// The frame's length.
    len: usize,
    /// Where the part this connection carries ends (`len` unless striped).
    main_end: usize,
    /// Bytes of the frame read so far, into `buf` or into a device.
    filled: usize,
    /// Where the frame's head ends (its first buffer starts).
    head: usize,
    route: Route,
    /// While on probation (only the first bytes reserved against the
    /// budget), how many bytes may be read before the rest is reserved; 0
    /// once the whole frame is.
    probation: usize,
}

/// Where a partial frame's bytes go.
enum Route {
    /// All into the frame buffer.
    Host,
    /// Into the frame buffer up to the head, which then decides.
    Unplanned,
    /// Some buffers straight into devices.
    Devices(Box<Routed>),
}

/// The device-bound buffers of a frame and how far they are.
struct Routed {
    /// `(buffer index, byte range in the frame, runtime)`, in stream order.
    targets: Vec<(usize, Range<usize>, Runtime)>,
    /// The target being read or next to read.
    next: usize,
    /// The upload of `targets[next]`, once its first byte is due.
    current: Option<Uploading>,
    /// Buffers whose bytes are on their devices.
    done: Vec<(usize, DeviceBuffer)>,
}

impl Partial {
    /// Where the stretch being read ends, and whether it goes to a device.
    fn stretch(&self) -> (usize, bool) {
        match &self.route {
            Route::Host => (self.main_end, false),
            Route::Unplanned => (self.head, false),
            Route::Devices(r) => match r.targets.get(r.next) {
                Some((_, range, _)) if self.filled >= range.start => (range.end, true),
                Some((_, range, _)) => (range.start, false),
                None => (self.len, false),
            },
        }
    }
}

/// Builds frames from a stream read without blocking, across calls.
///
/// With a [`Router`], a frame's head decides where each tensor's bytes go:
/// a buffer routed to a device is read from the socket straight into that
/// device's upload ([`Runtime::begin_upload`]: CUDA's pinned chunks, each
/// copied while the next one arrives; wgpu's staging steps), the rest into
/// the frame buffer. What is read of a frame, uploads included, survives
/// `Pending` returns.
pub(crate) struct Assembler {
    pool: BufferPool,
    limits: Limits,
    /// Stream offset of the frame being built, for error messages.
    offset: u64,
    ahead: Box<[u8]>,
    /// The unread bytes of `ahead`.
    start: usize,
    end: usize,
    partial: Option<Partial>,
    router: Option<Router>,
    /// Smaller frames are never routed.
    route_min_bytes: usize,
    /// The last read from a socket returned less than it asked for: the
    /// socket was empty then, and new bytes will be reported, so the next
    /// read is not tried (it would only say "nothing yet").
    short_read: bool,
    /// The other end closed: its end may have come with the last bytes,
    /// reported once for both, so a short read no longer means "wait for
    /// the next report" — reads go on until the end is read.
    peer_closed: bool,
    /// Bytes the receive budget has no room for now (the next frame, or the
    /// rest of one on probation), and whether they go on probation.
    starved: Option<(usize, bool)>,
    /// Frames longer than this, up to half the budget, are let in on
    /// probation: this many of their bytes first ([`BufferPool::reserve_on_probation`]).
    probation_bytes: usize,
    /// The connection's stripes, when it may have some.
    hub: Option<Arc<Hub>>,
    /// The next frame is striped, as this plan says.
    plan: Option<Plan>,
}

/// Most bytes of a frame let in before the rest of it is reserved.
const PROBATION_BYTES: u64 = 64 << 20;

/// A socket source that says "nothing yet" without a system call right
/// after a read came back short (see [`Assembler::short_read`]).
struct Drained<'a> {
    inner: &'a mut dyn Source,
    skip: &'a mut bool,
    /// Whether a short read may be trusted to mean "empty" (not once the
    /// other end closed).
    trust_short: bool,
}

impl Source for Drained<'_> {
    fn recv_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if std::mem::take(self.skip) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.inner.recv_now(buf)?;
        *self.skip = self.trust_short && n > 0 && n < buf.len() && !self.inner.cheap_reads();
        Ok(n)
    }

    fn cheap_reads(&self) -> bool {
        self.inner.cheap_reads()
    }
}

impl Assembler {
    /// Builds frames into buffers from `pool`, within `limits`.
    pub(crate) fn new(pool: BufferPool, limits: Limits) -> Self {
        Self {
            limits,
            offset: 0,
            ahead: vec![0; AHEAD_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            partial: None,
            router: None,
            route_min_bytes: AHEAD_BYTES,
            short_read: false,
            peer_closed: false,
            starved: None,
            probation_bytes: usize::try_from(PROBATION_BYTES.min(pool.budget_bytes() / 16))
                .unwrap_or(usize::MAX)
                .max(PRELUDE_BYTES),
            pool,
            hub: None,
            plan: None,
        }
    }

    /// Lets the peer stripe frames over `hub`'s stripes.
    pub(crate) fn with_stripes(mut self, hub: Arc<Hub>) -> Self {
        self.hub = Some(hub);
        self
    }

    /// How many bytes of a frame of `len` bytes are let in before the rest
    /// is reserved: `None` for a frame reserved whole (a small one, or one
    /// over half the budget, which could never be admitted while others
    /// wait on probation).
    fn probation_for(&self, len: usize) -> Option<usize> {
        let half = self.pool.budget_bytes() / 2;
        (len > self.probation_bytes && len as u64 <= half).then_some(self.probation_bytes)
    }

    /// Reads the tensors `router` sends to a device straight into it (see
    /// the type's docs). Only frames larger than one read-ahead are routed:
    /// a smaller frame is in memory after a read or two anyway, and its
    /// tensors reach their devices when they land, so small frames (the
    /// requests and replies of a round trip) pay nothing for routing.
    pub(crate) fn with_router(mut self, router: Router) -> Self {
        self.router = Some(router);
        self
    }

    /// The next frame if all of it has arrived.
    ///
    /// # Errors
    ///
    /// A stream that ends mid-frame, an I/O error, a frame the decoder
    /// rejects (its head included, once it is in), or an upload that fails.
    /// Nothing beyond the prelude is allocated for a frame over the limits.
    /// After an error the partial frame is dropped, its uploads with it
    /// (their staging chunks go back to the pool).
    pub(crate) fn next(&mut self, source: &mut dyn Source) -> Result<Next> {
        self.starved = None;
        let mut skip = std::mem::take(&mut self.short_read);
        let outcome = self.step(&mut Drained {
            inner: source,
            skip: &mut skip,
            trust_short: !self.peer_closed,
        });
        self.short_read = skip;
        match &outcome {
            Err(_) => self.partial = None,
            Ok(Next::Pending) => {
                // About to wait for the socket: staging chunks whose copies
                // are done go back to the pool meanwhile.
                let upload = match &mut self.partial {
                    Some(Partial {
                        route: Route::Devices(r),
                        ..
                    }) => r.current.as_mut(),
                    _ => None,
                };
                if let Some(up) = upload {
                    if let Err(e) = up.pause() {
                        self.partial = None;
                        return Err(self.upload_error(e));
                    }
                }
            }
            Ok(_) => {}
        }
        outcome
    }

    fn step(&mut self, source: &mut dyn Source) -> Result<Next> {
        loop {
            if let Some(p) = &self.partial {
                if matches!(p.route, Route::Unplanned) && p.filled >= p.head {
                    self.plan()?;
                    continue;
                }
                // (A striped frame on probation is admitted below before
                // its main part can be all in.)
                if p.filled == p.main_end && p.probation == 0 {
                    if p.claim.as_ref().is_some_and(|c| !c.complete()) {
                        // The stripes bring the rest; the last one wakes
                        // this connection's reader.
                        return Ok(Next::Pending);
                    }
                    return self.complete().map(Next::Frame);
                }
                if p.probation > 0
                    && (p.filled >= p.probation || matches!(p.route, Route::Devices(_)))
                {
                    // Its first bytes came: the rest is reserved now, or the
                    // frame waits (unread) until the budget has room.
                    let Some(p) = self.partial.as_mut() else {
                        continue;
                    };
                    if !p.buf.admit() {
                        self.starved = Some((p.buf.unreserved() as usize, false));
                        return Ok(Next::Pending);
                    }
                    p.probation = 0;
                    if let Some(claim) = &p.claim {
                        // The stripes may write past their first bytes now.
                        claim.admit();
                    }
                    continue;
                }
                let (mut upto, to_device) = p.stretch();
                if p.probation > 0 {
                    upto = upto.min(p.probation);
                }
                let read = if to_device {
                    self.feed_device(source)?
                } else {
                    self.feed_host(source, upto)?
                };
                if let Some(next) = read {
                    return Ok(next);
                }
                continue;
            }
            let have = self.end - self.start;
            if have >= PRELUDE_BYTES {
                let prelude = &self.ahead[self.start..self.start + PRELUDE_BYTES];
                let striping = |what: String| Error::Frame {
                    offset: self.offset,
                    what,
                };
                if self.offset == 0 && stripe::is_join(prelude) {
                    let join = Join::parse_join(prelude).map_err(striping)?;
                    self.start += PRELUDE_BYTES;
                    return Ok(Next::Join(join));
                }
                if stripe::is_plan(prelude) {
                    if self.hub.is_none() || self.plan.is_some() {
                        return Err(striping(
                            "a stripe plan where none may be (this connection has no stripes, or the last plan had no frame)".into(),
                        ));
                    }
                    self.plan = Some(Plan::parse(prelude).map_err(striping)?);
                    self.start += PRELUDE_BYTES;
                    self.offset += PRELUDE_BYTES as u64;
                    continue;
                }
                let p = Prelude::parse(prelude, &self.limits, self.offset)
                    .map_err(|e| self.tls_instead().unwrap_or(e))?;
                let len = usize::try_from(p.frame_len).map_err(|_| Error::Limit {
                    what: "frame size",
                    value: p.frame_len,
                    limit: usize::MAX as u64,
                })?;
                // A striped frame: the main connection's part, checked now.
                let main_end = match (&self.plan, &self.hub) {
                    (Some(plan), Some(hub)) => {
                        let first = hub.check(plan, len as u64, p.data_start).map_err(|what| {
                            Error::Frame {
                                offset: self.offset,
                                what,
                            }
                        })?;
                        first as usize
                    }
                    _ => len,
                };
                let striped = self.plan.is_some();
                let routed = !striped && self.router.is_some() && len >= self.route_min_bytes;
                // The whole frame is reserved against the node's receive
                // budget before its first byte is read (its pages become
                // resident only as bytes arrive); no room: the prelude stays
                // where it is and the connection waits. A large frame's
                // first bytes come on probation; a striped frame's first
                // bytes are shared among its parts, each writing no more of
                // its share until the rest is reserved.
                let probation = self.probation_for(len);
                let parts = self.plan.map_or(1, |plan| plan.parts);
                let window = probation.map(|first| (first / parts).max(1));
                let reserved = match probation {
                    Some(first) => self.pool.reserve_on_probation(len, first),
                    None => self.pool.reserve(len),
                };
                let mut buf = match reserved {
                    Ok(Some(buf)) => buf,
                    Ok(None) => {
                        self.starved = Some(match probation {
                            Some(first) => (first, true),
                            None => (len, false),
                        });
                        return Ok(Next::Pending);
                    }
                    Err(e) => {
                        return Err(Error::Frame {
                            offset: self.offset,
                            what: format!("a frame of {len} bytes cannot be taken in: {e}"),
                        })
                    }
                };
                let claim = match (self.plan.take(), &self.hub) {
                    (Some(plan), Some(hub)) => Some(hub.open(
                        &plan,
                        len as u64,
                        buf.as_mut_slice().as_mut_ptr(),
                        window.map_or(u64::MAX, |w| w as u64),
                    )),
                    _ => None,
                };
                self.partial = Some(Partial {
                    main_end,
                    claim,
                    buf,
                    len,
                    filled: 0,
                    // `Prelude::parse` checked it is within the frame.
                    head: p.data_start as usize,
                    route: if routed {
                        Route::Unplanned
                    } else {
                        Route::Host
                    },
                    probation: window.map_or(0, |w| w.min(main_end)),
                });
                continue;
            }
            self.ahead.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, have);
            let upto = if source.cheap_reads() {
                PRELUDE_BYTES
            } else {
                self.ahead.len()
            };
            match source.recv_now(&mut self.ahead[have..upto]) {
                Ok(0) if have == 0 => return Ok(Next::End),
                Ok(0) => return Err(self.cut()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Next::Pending),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(self.context(), e)),
            }
        }
    }

    /// Reads the partial frame's head and asks the router where its buffers go.
    fn plan(&mut self) -> Result<()> {
        let (Some(p), Some(router)) = (&mut self.partial, &self.router) else {
            return Ok(());
        };
        let plan = plan_head(&p.buf.as_mut_slice()[..p.head], &self.limits, self.offset)?;
        let targets = device_targets(&plan, &router(&plan));
        p.route = if targets.is_empty() {
            Route::Host
        } else {
            Route::Devices(Box::new(Routed {
                targets,
                next: 0,
                current: None,
                done: Vec::new(),
            }))
        };
        Ok(())
    }

    /// Moves bytes of the partial frame up to `upto` into its buffer: first
    /// those read ahead, then one read. `Some` when the read says to stop.
    fn feed_host(&mut self, source: &mut dyn Source, upto: usize) -> Result<Option<Next>> {
        let Some(p) = &mut self.partial else {
            return Ok(None);
        };
        let bytes = match &mut p.claim {
            // Stripes write past this part meanwhile.
            Some(claim) => claim.main_part(),
            None => p.buf.as_mut_slice(),
        };
        let n = (upto - p.filled).min(self.end - self.start);
        bytes[p.filled..p.filled + n].copy_from_slice(&self.ahead[self.start..self.start + n]);
        self.start += n;
        p.filled += n;
        if p.filled == upto {
            return Ok(None);
        }
        // `ahead` is used up; a large rest goes straight into the frame.
        (self.start, self.end) = (0, 0);
        let direct = upto - p.filled >= AHEAD_BYTES || source.cheap_reads();
        let target = if direct {
            &mut bytes[p.filled..upto]
        } else {
            &mut self.ahead[..]
        };
        match source.recv_now(target) {
            Ok(0) => Err(self.cut()),
            Ok(n) if direct => {
                p.filled += n;
                Ok(None)
            }
            Ok(n) => {
                self.end = n;
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(Next::Pending)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(Error::io(self.context(), e)),
        }
    }

    /// Moves bytes of the device-bound buffer being read into its upload:
    /// first those read ahead, then one read straight into the upload's
    /// space. Finishes the upload once its last byte is in, so that at most
    /// one upload per connection holds staging chunks. `Some` when the read
    /// says to stop.
    fn feed_device(&mut self, source: &mut dyn Source) -> Result<Option<Next>> {
        let context = self.context();
        let Some(Partial {
            filled,
            route: Route::Devices(r),
            ..
        }) = &mut self.partial
        else {
            return Ok(None);
        };
        let (index, range, rt) = &r.targets[r.next];
        let failed = |e: tensorferry_kernels::Error| {
            Error::io(
                context.clone(),
                io::Error::other(format!("reading buffer {index} into {}: {e}", rt.device())),
            )
        };
        let up = match &mut r.current {
            Some(up) => up,
            None => match rt.begin_upload(range.len()) {
                Ok(up) => r.current.insert(up),
                Err(_) => {
                    // The device cannot take it now (out of memory, say): the
                    // bytes go to the frame buffer instead, and landing the
                    // message then copies them there or rejects that message
                    // alone, with its reason; the connection goes on.
                    r.targets.remove(r.next);
                    return Ok(None);
                }
            },
        };
        let want = range.end - *filled;
        let have = self.end - self.start;
        let mut stop = None;
        if want > 0 && up.remaining() != want {
            return Err(failed(tensorferry_kernels::Error::SizeMismatch {
                op: "reading into an upload",
                what: "bytes the upload still takes",
                expected: want,
                actual: up.remaining(),
            }));
        }
        if want > 0 && have > 0 {
            let space = up.space().map_err(failed)?;
            let n = space.len().min(want).min(have);
            space[..n].copy_from_slice(&self.ahead[self.start..self.start + n]);
            up.advance(n).map_err(failed)?;
            self.start += n;
            *filled += n;
        } else if want > 0 {
            (self.start, self.end) = (0, 0);
            // A small rest comes through `ahead`, with what follows it.
            let direct = want >= AHEAD_BYTES;
            let outcome = if direct {
                let space = up.space().map_err(failed)?;
                let m = space.len().min(want);
                source.recv_now(&mut space[..m])
            } else {
                source.recv_now(&mut self.ahead[..])
            };
            match outcome {
                Ok(0) => return Err(self.cut()),
                Ok(n) if direct => {
                    up.advance(n).map_err(failed)?;
                    *filled += n;
                }
                Ok(n) => self.end = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => stop = Some(Next::Pending),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(context, e)),
            }
        }
        if *filled == range.end {
            let index = *index;
            let up = r.current.take().expect("made above");
            let dev = up.finish().map_err(failed)?;
            r.done.push((index, dev));
            r.next += 1;
        }
        Ok(stop)
    }

    /// Decodes the whole partial frame; tensors read into devices take
    /// their device buffers.
    fn complete(&mut self) -> Result<Frame> {
        let mut p = self
            .partial
            .take()
            .expect("called with a whole partial frame");
        // Every stripe's share is in: nothing writes into the buffer now.
        drop(p.claim.take());
        // Device-bound ranges of the buffer were never filled: the decoder
        // checks lengths and places, not their bytes, and those tensors are
        // replaced below.
        let frame = decode_at(&p.buf.freeze(), &self.limits, self.offset)?;
        self.offset += frame.frame_len;
        match p.route {
            Route::Devices(r) if !r.done.is_empty() => with_device_tensors(frame, r.done),
            _ => Ok(frame),
        }
    }

    /// Whether the last `Pending` came from the receive budget (the next
    /// frame does not fit now) rather than from the socket; then `waker` is
    /// woken when the budget has room, and `true` is returned.
    pub(crate) fn wait_for_budget(&self, waker: &std::task::Waker) -> bool {
        match self.starved {
            Some((len, probation)) => {
                self.pool.wake_when_room(len, probation, waker);
                true
            }
            None => false,
        }
    }

    /// Where the frame being received stands, when one has begun and waits
    /// for its peer: `(stream bytes received so far, bytes it still
    /// lacks)`. `None` between frames (nothing of the next one read yet) and
    /// while the frame waits for the receive budget (this side's doing).
    pub(crate) fn progress(&self) -> Option<(u64, u64)> {
        if self.starved.is_some() {
            return None;
        }
        let ahead = (self.end - self.start) as u64;
        match &self.partial {
            Some(p) => {
                // A striped frame's stripes count as its progress too.
                let stripes = p.claim.as_ref().map_or(0, Claim::received);
                let lacking = (p.len - p.filled) as u64;
                Some((
                    self.offset + p.filled as u64 + stripes + ahead,
                    lacking.saturating_sub(ahead + stripes),
                ))
            }
            None if ahead == 0 => None,
            None => Some((
                self.offset + ahead,
                (PRELUDE_BYTES as u64).saturating_sub(ahead).max(1),
            )),
        }
    }

    /// The socket has reported new bytes (or whoever reads is about to wait
    /// for it to): the next read is tried again, short read or not.
    pub(crate) fn expect_more(&mut self) {
        self.short_read = false;
    }

    /// The socket has reported that the other end closed: every read from
    /// now on is tried, so the end is read even when it came with the last
    /// bytes (one report for both).
    pub(crate) fn peer_closed(&mut self) {
        self.peer_closed = true;
        self.short_read = false;
    }

    /// Whether the frame being read waits for its stripes alone (they wake
    /// the I/O thread, not a requester reading the socket).
    pub(crate) fn waits_on_stripes(&self) -> bool {
        self.partial
            .as_ref()
            .is_some_and(|p| p.claim.as_ref().is_some_and(|c| c.waits(p.filled)))
    }

    /// Whether bytes were read ahead that no frame has taken yet: the socket
    /// no longer reports them, so whoever leads next must not leave them.
    pub(crate) fn holds_bytes(&self) -> bool {
        self.end > self.start || self.partial.is_some()
    }

    /// The error to report when the stream opens with a TLS record (a
    /// handshake or an alert) where a frame should be: the peer speaks TLS
    /// and this node does not.
    fn tls_instead(&self) -> Option<Error> {
        let head = &self.ahead[self.start..self.end];
        let tls = self.offset == 0
            && self.partial.is_none()
            && head.len() >= 3
            && matches!(head[0], 0x15 | 0x16)
            && head[1] == 0x03
            && head[2] <= 0x04;
        tls.then(|| Error::Frame {
            offset: 0,
            what: "the peer speaks TLS and this node does not: give this node TLS too (NodeBuilder::tls; the CLI's --tls-ca, and --tls-cert and --tls-key to listen)".into(),
        })
    }

    fn context(&self) -> String {
        format!("reading the frame at stream byte {}", self.offset)
    }

    fn upload_error(&self, e: tensorferry_kernels::Error) -> Error {
        Error::io(self.context(), io::Error::other(e.to_string()))
    }

    fn cut(&self) -> Error {
        if let Some(e) = self.tls_instead() {
            return e;
        }
        Error::io(
            self.context(),
            io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended mid-frame"),
        )
    }
}

/// The buffers of a frame to read straight into a device, in stream order:
/// `(buffer index, byte range in the frame, runtime)` for each contiguous
/// tensor that `routes` (one entry per tensor of `plan`) sends to a runtime.
pub(crate) fn device_targets(
    plan: &HeadPlan,
    routes: &[Option<Runtime>],
) -> Vec<(usize, std::ops::Range<usize>, Runtime)> {
    let mut streamed: Vec<Option<&Runtime>> = vec![None; plan.buffers.len()];
    for (t, route) in plan.tensors.iter().zip(routes) {
        if let (Some(rt), true) = (route, t.contiguous) {
            // `plan_head` checked the index against the table.
            if let Some(slot) = streamed.get_mut(t.buffer) {
                *slot = Some(rt);
            }
        }
    }
    streamed
        .into_iter()
        .zip(&plan.buffers)
        .enumerate()
        .filter_map(|(i, (rt, range))| rt.map(|rt| (i, range.clone(), rt.clone())))
        .collect()
}

/// `frame` with the tensors whose buffers were read into devices taking
/// those device buffers (their host ranges were never filled).
///
/// # Errors
///
/// [`Error::Tensor`] for a device buffer whose length does not fit its
/// tensor's dtype and shape.
pub(crate) fn with_device_tensors(
    mut frame: Frame,
    mut on_devices: Vec<(usize, DeviceBuffer)>,
) -> Result<Frame> {
    let mut tensors = Vec::with_capacity(frame.tensors.len());
    for ((name, t), info) in frame.message.tensors().zip(&frame.tensors) {
        let t = match on_devices.iter().position(|(i, _)| *i == info.buffer) {
            Some(k) => {
                let (_, dev) = on_devices.swap_remove(k);
                Tensor::from_device(t.dtype(), t.shape(), dev)
                    .map_err(|e| Error::tensor(name, e.to_string()))?
            }
            None => t.clone(),
        };
        tensors.push((name.to_string(), t));
    }
    frame.message = frame.message.with_tensors(tensors);
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode, EncodeOptions, FrameMeta, HeadPlan};
    use crate::{Message, Tensor};
    use std::sync::Arc;
    use tensorferry_device_map::Device;

    /// A socket stand-in: hands out pieces of 1 to `most` bytes with
    /// `WouldBlock` between them, nothing past `open` (more may arrive
    /// later), and ends after `data`.
    struct Pieces {
        data: Vec<u8>,
        at: usize,
        open: usize,
        most: usize,
        seed: u64,
        blocked: bool,
        /// Reads cost nothing (a shared-memory ring): frames skip the read-ahead.
        cheap: bool,
    }

    impl Pieces {
        fn new(data: Vec<u8>, most: usize) -> Self {
            Self {
                open: data.len(),
                data,
                at: 0,
                most,
                seed: 0x9E37_79B9_7F4A_7C15,
                blocked: false,
                cheap: false,
            }
        }

        fn below(&mut self, n: usize) -> usize {
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            (self.seed % n as u64) as usize
        }
    }

    impl Source for Pieces {
        fn recv_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // Every other call finds nothing, as a socket drained faster than it fills.
            self.blocked = !self.blocked;
            if self.blocked || self.at == self.open && self.at < self.data.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let most = 1 + self.below(self.most);
            let n = buf.len().min(most).min(self.open - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }

        fn cheap_reads(&self) -> bool {
            self.cheap
        }
    }

    fn bytes(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 251) as u8 ^ salt).collect()
    }

    /// A frame's tensors, in order: `(name, bytes)`.
    type Tensors = Vec<(String, Vec<u8>)>;

    fn frame(seq: u64, tensors: &Tensors) -> Vec<u8> {
        let mut m = Message::new();
        for (name, b) in tensors {
            m = m.tensor(name.as_str(), Tensor::from_slice(b, &[b.len()]).expect("t"));
        }
        let mut out = Vec::new();
        encode(&m, &FrameMeta::message("/s", seq), EncodeOptions::default())
            .expect("encode")
            .write_to(&mut out)
            .expect("write");
        out
    }

    /// Three frames: device-bound and host-bound tensors mixed (odd
    /// lengths, an empty one, one larger than the read-ahead), then one
    /// with nothing routed.
    fn stream() -> (Vec<u8>, Vec<Tensors>) {
        let frames: Vec<Tensors> = vec![
            vec![
                ("big".into(), bytes(AHEAD_BYTES * 2 + 13, 1)),
                ("small".into(), bytes(1001, 2)),
                ("tiny".into(), bytes(3, 3)),
                ("empty".into(), Vec::new()),
                ("mid".into(), bytes(5003, 4)),
            ],
            vec![
                ("a".into(), bytes(77, 5)),
                ("b".into(), bytes(AHEAD_BYTES + 1, 6)),
            ],
            vec![("host".into(), bytes(40_000, 7))],
        ];
        let mut out = Vec::new();
        for (seq, f) in frames.iter().enumerate() {
            out.extend(frame(seq as u64, f));
        }
        (out, frames)
    }

    /// Routes every tensor whose index is even to `rt`, except in frames
    /// with a single tensor.
    fn even_to(rt: Runtime) -> Router {
        Arc::new(move |plan: &HeadPlan| {
            let n = plan.tensors.len();
            (0..n)
                .map(|i| (n > 1 && i % 2 == 0).then(|| rt.clone()))
                .collect()
        })
    }

    /// An assembler with the source it reads.
    struct Fed {
        a: Assembler,
        source: Pieces,
    }

    impl Fed {
        fn new(source: Pieces, pool: &BufferPool) -> Self {
            Self {
                a: Assembler::new(pool.clone(), Limits::default()),
                source,
            }
        }

        fn next(&mut self) -> Result<Next> {
            self.a.next(&mut self.source)
        }

        fn holds_bytes(&self) -> bool {
            self.a.holds_bytes()
        }
    }

    fn assembler(source: Pieces, router: Router, pool: &BufferPool) -> Fed {
        let mut fed = Fed::new(source, pool);
        fed.a = fed.a.with_router(router);
        fed.a.route_min_bytes = 0;
        fed
    }

    /// Reads frames until the stream ends; counts the `Pending`s.
    fn read_all(a: &mut Fed) -> Result<(Vec<Frame>, usize)> {
        let (mut frames, mut pending) = (Vec::new(), 0);
        loop {
            match a.next()? {
                Next::Frame(f) => frames.push(f),
                Next::Pending => pending += 1,
                Next::End => return Ok((frames, pending)),
                Next::Join(j) => panic!("a join record in a frame stream: {j:?}"),
            }
        }
    }

    fn host_bytes(t: &Tensor) -> Vec<u8> {
        t.to_host()
            .expect("host")
            .packed()
            .expect("packed")
            .as_slice()
            .to_vec()
    }

    fn check(frames: &[Frame], want: &[Tensors], device: Device) {
        assert_eq!(frames.len(), want.len());
        for (f, tensors) in frames.iter().zip(want) {
            let n = tensors.len();
            for (i, (name, b)) in tensors.iter().enumerate() {
                let t = f.message.get(name).expect("tensor");
                let routed = n > 1 && i % 2 == 0;
                let expect = if routed { device } else { Device::Cpu };
                assert_eq!(t.device(), expect, "{name}");
                assert_eq!(&host_bytes(t), b, "{name}: bytes");
            }
        }
    }

    #[test]
    fn routed_tensors_arrive_byte_exact_through_small_pieces() {
        let (data, want) = stream();
        let pool = BufferPool::new(16 << 20);
        for most in [1 << 20, 4096, 7] {
            let mut a = assembler(
                Pieces::new(data.clone(), most),
                even_to(Runtime::Cpu),
                &pool,
            );
            let (frames, pending) = read_all(&mut a).expect("frames");
            assert!(pending > 0);
            check(&frames, &want, Device::Cpu);
            assert!(!a.holds_bytes());
        }
    }

    #[test]
    fn cheap_reads_take_each_frame_straight_into_its_buffer() {
        let (data, want) = stream();
        let pool = BufferPool::new(16 << 20);
        for most in [1 << 20, 4096, 7] {
            let mut source = Pieces::new(data.clone(), most);
            source.cheap = true;
            let mut a = Fed::new(source, &pool);
            let (frames, _) = read_all(&mut a).expect("frames");
            // No router: every tensor on the host, every byte in place.
            check(&frames, &want, Device::Cpu);
            assert!(!a.holds_bytes());
            // Nothing past a prelude was ever read ahead.
            assert!(a.a.end <= PRELUDE_BYTES);
        }
    }

    #[test]
    fn routed_tensors_land_on_the_adapter() {
        let rt = match Runtime::open(Device::wgpu(0)) {
            Ok(rt) => rt,
            Err(e) if tensorferry_kernels::runtime::required("TENSORFERRY_REQUIRE_WGPU") => {
                panic!("TENSORFERRY_REQUIRE_WGPU=1 but wgpu:0 cannot be opened: {e}")
            }
            Err(e) => {
                println!("SKIP: wgpu:0: {e}");
                return;
            }
        };
        let (data, want) = stream();
        let pool = BufferPool::new(16 << 20);
        for most in [1 << 20, 999] {
            let mut a = assembler(Pieces::new(data.clone(), most), even_to(rt.clone()), &pool);
            let (frames, _) = read_all(&mut a).expect("frames");
            check(&frames, &want, Device::wgpu(0));
        }
    }

    #[test]
    fn a_frame_cut_mid_device_buffer_resumes_on_another_thread() {
        let (data, want) = stream();
        let pool = BufferPool::new(16 << 20);
        let mut source = Pieces::new(data, 3000);
        // Up to the middle of "big", the first device-bound buffer.
        source.open = 1000 + AHEAD_BYTES;
        let mut a = assembler(source, even_to(Runtime::Cpu), &pool);
        for _ in 0..10_000 {
            assert!(matches!(a.next().expect("no error"), Next::Pending));
        }
        assert!(a.holds_bytes());
        assert!(
            matches!(&a.a.partial, Some(Partial { route: Route::Devices(r), .. }) if r.current.is_some()),
            "an upload is under way"
        );
        let (frames, _) = std::thread::spawn(move || {
            a.source.open = a.source.data.len();
            read_all(&mut a)
        })
        .join()
        .expect("thread")
        .expect("frames");
        check(&frames, &want, Device::Cpu);
    }

    #[test]
    fn a_stream_that_ends_mid_device_buffer_is_an_error_and_keeps_nothing() {
        let (data, _) = stream();
        let pool = BufferPool::new(16 << 20);
        let first = frame(0, &stream().1[0]).len();
        let mut a = assembler(
            Pieces::new(data[..1000 + AHEAD_BYTES].to_vec(), 500),
            even_to(Runtime::Cpu),
            &pool,
        );
        let err = read_all(&mut a).expect_err("cut");
        assert!(err.to_string().contains("ended mid-frame"), "{err}");
        assert!(a.a.partial.is_none(), "the partial frame is dropped");
        assert!(
            pool.idle_bytes() >= first,
            "its buffer went back to the pool"
        );
    }

    #[test]
    fn a_head_that_does_not_plan_is_an_error_before_the_buffers_arrive() {
        let mut data = frame(0, &stream().1[0]);
        let at = data
            .windows(5)
            .position(|w| w == b"\"cpu\"")
            .expect("a device in the header");
        data[at + 1..at + 4].copy_from_slice(b"tpu");
        let pool = BufferPool::new(16 << 20);
        // Only the head arrives: planning it fails at once.
        let mut source = Pieces::new(data, 100);
        source.open = 2000;
        let mut a = assembler(source, even_to(Runtime::Cpu), &pool);
        let err = loop {
            match a.next() {
                Ok(Next::Pending) => {}
                Ok(_) => panic!("no frame can come"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("tpu"), "{err}");
        assert!(a.a.partial.is_none());
    }

    #[test]
    fn frames_below_the_routing_size_are_not_routed() {
        let (data, want) = stream();
        let pool = BufferPool::new(16 << 20);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let inner = even_to(Runtime::Cpu);
        let router: Router = Arc::new(move |plan: &HeadPlan| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            inner(plan)
        });
        let mut a = Fed::new(Pieces::new(data, 1 << 20), &pool);
        a.a = a.a.with_router(router);
        let (frames, _) = read_all(&mut a).expect("frames");
        // Only the first two frames are larger than one read-ahead.
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(
            frames[2].message.get("host").map(host_bytes),
            Some(want[2][0].1.clone())
        );
    }
}
