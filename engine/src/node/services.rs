//! Services and requests: [`Node::serve`] registers a handler on a channel,
//! [`Node::request`] sends a request and waits for its reply.
//!
//! A request lands on its devices and is checked against the service's
//! input schema before the handler sees it. Handlers run on the node's
//! bounded worker pool, one request at a time per service (services share
//! the pool's threads), or inline on the thread that read the request when
//! marked quick ([`Service::inline`]). A requester reads the connection
//! itself while it waits (see [`crate::transport::stream`]), so its reply
//! wakes it directly.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Sender};
use serde_json::json;
use tensorferry_device_map::Overflow;

use super::peers::Peer;
use super::publish::encode_with;
use super::read::{Led, Stalled, Wait};
use super::{lock, Node, NodeInner};
use crate::address::Address;
use crate::delivery::Direction;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::queue::{Offer, Pop, Queue};
use crate::service::{Handler, Schema, Service, ServiceError};
use crate::transport::outbox::LINK_ENCODING;
use crate::transport::stream::Lead;
use crate::transport::{Carry, Flow, Outgoing};
use crate::wire::{encode, FrameMeta, Kind, TensorInfo};

/// A reply and what its header said of each tensor.
pub(crate) type Reply = std::result::Result<(Message, Vec<TensorInfo>), Error>;

/// A request this node waits on.
pub(crate) struct Pending {
    /// The peer it was sent to.
    pub(crate) peer: u64,
    slot: Arc<Queue<Reply>>,
}

/// A request on its way to a service.
pub(crate) struct Job {
    peer: Arc<Peer>,
    channel: String,
    id: u64,
    message: Message,
    infos: Vec<TensorInfo>,
}

impl Job {
    pub(crate) fn new(
        peer: &Arc<Peer>,
        channel: String,
        id: u64,
        message: Message,
        infos: Vec<TensorInfo>,
    ) -> Self {
        Self {
            peer: Arc::clone(peer),
            channel,
            id,
            message,
            infos,
        }
    }
}

/// A registered service.
pub(crate) struct ServiceSlot {
    input: Schema,
    output: Schema,
    handler: Mutex<Box<dyn Handler>>,
    inline: bool,
    queue: Queue<Job>,
    /// A worker is draining the queue (or is about to).
    scheduled: AtomicBool,
    /// The node is shutting down: no request runs any more.
    stopping: AtomicBool,
    /// `fini` ran.
    finished: AtomicBool,
    /// How long a worker that answered a request looks for the next one
    /// before it leaves (a request it finds needs no hand-off, no wake-up).
    spin: crate::spin::Spin,
    /// When the last request was answered: the gap to the next is what
    /// the spin learns from.
    answered_at: Mutex<Option<Instant>>,
}

impl ServiceSlot {
    /// Stops the service: nothing more is queued, and `fini` runs once —
    /// here if the handler is idle, else on the thread running it, when it
    /// is done (which may be this thread: a handler that shut its node down).
    fn finish(&self) {
        self.queue.close();
        self.stopping.store(true, Ordering::Release);
        if let Ok(mut handler) = self.handler.try_lock() {
            self.fini_once(handler.as_mut());
        }
    }

    fn fini_once(&self, handler: &mut dyn Handler) {
        if !self.finished.swap(true, Ordering::AcqRel) {
            handler.fini();
        }
    }
}

/// The longest a worker that answered a request spins for the next one.
/// Longer than a requester's spin ([`crate::spin::CAP`]): the gap between a
/// reply and the next request holds the requester's own work between its
/// calls (a Python caller's is tens of µs), and a worker that sleeps
/// through it costs two wake-ups per request (its I/O thread's and its
/// own). Measured with Python at both ends: 4 KiB round trips over tcp
/// took 40–60 µs with this cap and 88–117 µs with 50 µs.
const WORKER_SPIN_CAP: Duration = Duration::from_micros(200);

/// The node's worker pool for service handlers: a fixed number of threads,
/// started with the first service that needs them.
pub(crate) struct Workers {
    threads: usize,
    jobs: OnceLock<Sender<Box<dyn FnOnce() + Send>>>,
}

impl Workers {
    pub(crate) fn new(threads: usize) -> Self {
        Self {
            threads,
            jobs: OnceLock::new(),
        }
    }

    fn start(&self, node: &str) -> Result<&Sender<Box<dyn FnOnce() + Send>>> {
        if let Some(tx) = self.jobs.get() {
            return Ok(tx);
        }
        let (tx, rx) = unbounded::<Box<dyn FnOnce() + Send>>();
        for i in 0..self.threads {
            let rx = rx.clone();
            thread::Builder::new()
                .name(format!("tf-worker-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .map_err(|e| Error::io("starting a service worker thread", e))?;
        }
        tracing::debug!(node, threads = self.threads, "service workers started");
        Ok(self.jobs.get_or_init(|| tx))
    }

    fn spawn(&self, job: Box<dyn FnOnce() + Send>) -> bool {
        self.jobs.get().is_some_and(|tx| tx.send(job).is_ok())
    }
}

impl Node {
    /// Registers a request/reply service on `channel`, running its `init` now
    /// and its `fini` when the node shuts down.
    ///
    /// # Errors
    ///
    /// When a service already serves `channel`, `init` fails, or the worker
    /// threads cannot be started.
    pub fn serve(&self, channel: impl Into<String>, service: Service) -> Result<()> {
        let channel = channel.into();
        let Service {
            input,
            output,
            mut handler,
            inline,
        } = service;
        if !inline {
            self.inner.workers.start(&self.inner.name)?;
        }
        let mut services = lock(&self.inner.services);
        if services.contains_key(&channel) {
            return Err(Error::Invalid(format!(
                "a service already serves `{channel}`"
            )));
        }
        handler.init().map_err(|e| Error::Remote {
            channel: channel.clone(),
            code: e.code,
            message: format!("init failed: {}", e.message),
        })?;
        let spec = self.inner.spec(&channel);
        services.insert(
            channel,
            Arc::new(ServiceSlot {
                input,
                output,
                handler: Mutex::new(handler),
                inline,
                queue: Queue::new(spec.queue_depth, Overflow::Block),
                scheduled: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                finished: AtomicBool::new(false),
                spin: self.inner.serve_spin.like_up_to(WORKER_SPIN_CAP),
                answered_at: Mutex::new(None),
            }),
        );
        Ok(())
    }

    /// Sends `request` to the service on `channel` at `addr` and waits for its reply.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when no reply comes in `timeout`; [`Error::Remote`] for
    /// an error reply (a schema mismatch, a handler error, no such service);
    /// [`Error::PeerLost`] when the connection drops first.
    pub fn request(
        &self,
        addr: &str,
        channel: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message> {
        let inner = &self.inner;
        let (peer, id, slot) = inner.open_request(addr)?;
        let deadline = Instant::now() + timeout;
        // Lead the connection's read side when no one else does, before the
        // reply can arrive: this thread then reads the reply itself.
        let lead = peer.conn.stream().and_then(|s| s.lead());
        let outcome = inner
            .send_request(&peer, channel, id, &request)
            .and_then(|()| inner.wait_reply(&peer, lead, &slot, deadline))
            .and_then(|reply| match reply {
                Some(result) => result,
                None => Err(Error::Timeout {
                    what: format!("waiting for the reply of `{channel}` at {addr}"),
                    ms: timeout.as_millis() as u64,
                }),
            })
            .and_then(|(reply, infos)| inner.land(channel, Direction::Reply, reply, &infos));
        lock(&inner.pending).remove(&id);
        outcome
    }

    /// The async form of [`request`](Self::request), for any executor,
    /// without a time limit (use your executor's timeout; dropping the
    /// future gives the request up). Connecting, when there is no
    /// connection to `addr` yet, happens before the future is returned.
    ///
    /// # Errors
    ///
    /// A malformed or unreachable address, or a request that cannot be
    /// encoded; the future's own errors are those of [`request`](Self::request).
    pub fn request_async(
        &self,
        addr: &str,
        channel: &str,
        request: Message,
    ) -> Result<RequestFuture> {
        let inner = &self.inner;
        let (peer, id, slot) = inner.open_request(addr)?;
        if let Err(e) = inner.send_request(&peer, channel, id, &request) {
            lock(&inner.pending).remove(&id);
            return Err(e);
        }
        Ok(RequestFuture {
            node: Arc::clone(inner),
            peer,
            channel: channel.to_string(),
            id,
            slot,
        })
    }
}

/// The future of [`Node::request_async`]: the reply, landed on its devices.
#[must_use = "a future does nothing unless awaited"]
pub struct RequestFuture {
    node: Arc<NodeInner>,
    peer: Arc<Peer>,
    channel: String,
    id: u64,
    slot: Arc<Queue<Reply>>,
}

impl std::fmt::Debug for RequestFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestFuture({} #{})", self.channel, self.id)
    }
}

impl RequestFuture {
    /// Waits for the reply on this thread until `deadline`, reading the
    /// connection itself when nobody else does, as [`Node::request`] does
    /// (the reply then costs no hand-off from the I/O thread). `None` when
    /// the deadline passed first: the request stays pending, to be waited
    /// for again, polled, or given up by dropping the future.
    ///
    /// # Errors
    ///
    /// Those of [`Node::request`], but for the timeout.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<Result<Message>> {
        let lead = self.peer.conn.stream().and_then(|s| s.lead());
        match self.node.wait_reply(&self.peer, lead, &self.slot, deadline) {
            Ok(Some(reply)) => Some(reply.and_then(|(reply, infos)| {
                self.node
                    .land(&self.channel, Direction::Reply, reply, &infos)
            })),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

impl Future for RequestFuture {
    type Output = Result<Message>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.slot.poll_pop(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Err(Error::Closed)),
            Poll::Ready(Some(reply)) => Poll::Ready(reply.and_then(|(reply, infos)| {
                self.node
                    .land(&self.channel, Direction::Reply, reply, &infos)
            })),
        }
    }
}

impl Drop for RequestFuture {
    fn drop(&mut self) {
        lock(&self.node.pending).remove(&self.id);
    }
}

impl NodeInner {
    /// Connects, picks an id and records the request as pending.
    fn open_request(&self, addr: &str) -> Result<(Arc<Peer>, u64, Arc<Queue<Reply>>)> {
        let addr: Address = addr.parse()?;
        let peer = self.connect(&addr)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Queue::new(1, Overflow::Block));
        lock(&self.pending).insert(
            id,
            Pending {
                peer: peer.id,
                slot: Arc::clone(&slot),
            },
        );
        Ok((peer, id, slot))
    }

    fn send_request(
        &self,
        peer: &Arc<Peer>,
        channel: &str,
        id: u64,
        request: &Message,
    ) -> Result<()> {
        let meta = FrameMeta {
            channel: channel.to_string(),
            seq: 0,
            kind: Kind::Request,
            id: Some(id),
        };
        let item = match peer.conn.carries() {
            Carry::Messages => Outgoing::Message {
                meta,
                message: request.clone(),
            },
            Carry::Frames | Carry::Slots => {
                Outgoing::Frame(Arc::new(self.encode_for(request, &meta)?))
            }
        };
        peer.conn.send(item, None).map_err(|reason| {
            // The connection is broken: the next request dials anew.
            self.lose(peer, &reason);
            Error::PeerLost {
                peer: peer.label.to_string(),
                reason,
            }
        })
    }

    /// Waits for the reply in `slot` until `deadline` (`None` when it
    /// passed): reading the connection itself when it leads it, spinning
    /// first for the node's busy-poll time.
    fn wait_reply(
        &self,
        peer: &Arc<Peer>,
        lead: Option<Lead<'_>>,
        slot: &Queue<Reply>,
        deadline: Instant,
    ) -> Result<Option<Reply>> {
        let started = Instant::now();
        let spin = self.reply_spin.budget();
        let spin_until = started + spin;
        let got = |reply: Reply| {
            self.reply_spin.observe(started.elapsed());
            Ok(Some(reply))
        };
        if let Some(lead) = lead {
            // However it stops, the reply (or the peer's loss) is then in
            // the slot, or is waited for there while the I/O thread reads.
            self.read_led(
                peer,
                lead,
                Led {
                    deadline,
                    spin_until,
                    nothing_yet: true,
                    read_on: 0,
                    park: false,
                },
                &mut || !slot.looks_empty(),
                &mut || true,
            );
        }
        while Instant::now() < spin_until {
            if let Ok(Some(reply)) = slot.try_pop() {
                return got(reply);
            }
            std::hint::spin_loop();
        }
        match slot.pop(Some(deadline)) {
            Pop::Item(reply) => got(reply),
            Pop::TimedOut => {
                self.reply_spin.observe(started.elapsed());
                Ok(None)
            }
            Pop::Closed => Err(Error::Closed),
        }
    }

    /// Hands a reply to the requester waiting for it.
    pub(crate) fn complete(&self, id: u64, result: Reply) {
        if let Some(p) = lock(&self.pending).remove(&id) {
            let _ = p.slot.offer(result);
        }
    }

    /// Fails every request waiting on `peer` with `error`.
    pub(crate) fn fail_requests_to(&self, peer: &Peer, error: &dyn Fn() -> Error) {
        let failed: Vec<Pending> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| p.peer == peer.id)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id))
                .collect()
        };
        for p in failed {
            let _ = p.slot.offer(Err(error()));
        }
    }

    /// A request arrived: to its service, inline or through the service's queue.
    pub(crate) fn dispatch_request(&self, job: Job, wait: Wait) -> Flow {
        let service = lock(&self.services).get(&job.channel).cloned();
        let Some(service) = service else {
            let err = ServiceError::new(
                "no_service",
                format!(
                    "no service is registered on `{}` at {}",
                    job.channel, self.name
                ),
            );
            self.send_reply(&job, Err(err));
            return Flow::Continue;
        };
        if service.inline {
            let peer = Arc::clone(&job.peer);
            self.run_job(&service, job);
            // Answered on the thread that read it: the thread that may
            // spin for the next request (see `peers.rs`).
            *lock(&peer.replied_at) = Some(Instant::now());
            return Flow::Continue;
        }
        self.queue_request(job, service, wait)
    }

    /// Queues a request for its service's worker.
    pub(crate) fn queue_request(&self, job: Job, service: Arc<ServiceSlot>, wait: Wait) -> Flow {
        let refused = match wait {
            Wait::Block => match service.queue.push(job, None) {
                Ok(()) => None,
                Err(Offer::Closed(job) | Offer::Full(job)) => Some(job),
                Err(Offer::Taken) => None,
            },
            Wait::Stall => match service.queue.offer(job) {
                Offer::Taken => None,
                Offer::Closed(job) => Some(job),
                Offer::Full(job) => {
                    let peer = Arc::clone(&job.peer);
                    if let Some(waker) = peer.waker() {
                        service.queue.wake_on_room(waker);
                    }
                    *lock(&peer.stalled) = Some(Stalled::Request { job, service });
                    return Flow::Stall;
                }
            },
        };
        if let Some(job) = refused {
            self.send_reply(
                &job,
                Err(ServiceError::new(
                    "shutting_down",
                    "the service is stopping",
                )),
            );
            return Flow::Continue;
        }
        self.schedule(&service);
        Flow::Continue
    }

    /// Has a worker drain `service`'s queue, unless one does already.
    fn schedule(&self, service: &Arc<ServiceSlot>) {
        if service.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let (node, svc) = (self.me.clone(), Arc::clone(service));
        let ran = self.workers.spawn(Box::new(move || loop {
            let Some(node) = node.upgrade() else { return };
            let mut from = None;
            loop {
                while let Ok(Some(job)) = svc.queue.try_pop() {
                    if let Some(t) = lock(&svc.answered_at).take() {
                        svc.spin.observe(t.elapsed());
                    }
                    from = Some(Arc::clone(&job.peer));
                    node.run_job(&svc, job);
                    *lock(&svc.answered_at) = Some(Instant::now());
                }
                // Requests that follow each other closely are taken here,
                // without a hand-off from the I/O thread and its wake-up.
                if !node.wait_for_next(&svc, from.as_ref()) {
                    break;
                }
            }
            svc.scheduled.store(false, Ordering::Release);
            // A request queued between the last look and the flag going
            // down is taken by this worker, unless another took the flag.
            if svc.queue.len() == 0 || svc.scheduled.swap(true, Ordering::AcqRel) {
                return;
            }
        }));
        if !ran {
            service.scheduled.store(false, Ordering::Release);
        }
    }

    /// A worker that answered a request of `service` waits for the next one
    /// as long as the service's spin allows, reading the connection the
    /// last came on itself when nobody else does (the next request then
    /// needs no I/O thread woken, nor a hand-off); `true` when one came.
    fn wait_for_next(&self, service: &ServiceSlot, from: Option<&Arc<Peer>>) -> bool {
        let budget = service.spin.budget();
        if budget.is_zero() {
            return false;
        }
        let until = Instant::now() + budget;
        let came = || !service.queue.looks_empty();
        if let Some(peer) = from.filter(|p| p.is_alive()) {
            if let Some(lead) = peer.conn.stream().and_then(|s| s.lead()) {
                let led = Led {
                    deadline: until,
                    spin_until: until,
                    nothing_yet: false,
                    read_on: 0,
                    park: false,
                };
                self.read_led(peer, lead, led, &mut || came(), &mut || false);
            }
        }
        while !came() {
            if service.stopping.load(Ordering::Acquire) || Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
        true
    }

    /// Lands a request, checks it and answers it.
    fn run_job(&self, service: &ServiceSlot, job: Job) {
        let request = match self.land(
            &job.channel,
            Direction::Forward,
            job.message.clone(),
            &job.infos,
        ) {
            Ok(r) => r,
            Err(e) => {
                let err = ServiceError::new(
                    "staging",
                    format!("the request could not be delivered here: {e}"),
                );
                self.send_reply(&job, Err(err));
                return;
            }
        };
        if let Err(why) = service.input.check(&request) {
            self.send_reply(&job, Err(ServiceError::new("bad_request", why)));
            return;
        }
        let reply = {
            let mut handler = lock(&service.handler);
            let reply = if service.stopping.load(Ordering::Acquire) {
                Err(ServiceError::new(
                    "shutting_down",
                    "the service is stopping",
                ))
            } else {
                answer(&job.channel, handler.as_mut(), &service.output, request)
            };
            // Stopped while it ran: `fini` is this thread's to run.
            if service.stopping.load(Ordering::Acquire) {
                service.fini_once(handler.as_mut());
            }
            reply
        };
        self.send_reply(&job, reply);
    }

    /// Sends the reply (or error) of `job` back on its connection, cast and
    /// checksummed by the channel's reply rules.
    fn send_reply(&self, job: &Job, result: std::result::Result<Message, ServiceError>) {
        let (kind, message) = match result {
            Ok(m) => (Kind::Reply, m),
            Err(e) => (
                Kind::Error,
                Message::new()
                    .field("code", e.code)
                    .field("message", e.message),
            ),
        };
        let meta = FrameMeta {
            channel: job.channel.clone(),
            seq: 0,
            kind,
            id: Some(job.id),
        };
        let item = match job.peer.conn.carries() {
            Carry::Messages => Ok(Outgoing::Message {
                meta: meta.clone(),
                message,
            }),
            Carry::Frames | Carry::Slots => self
                .delivery(&job.channel, Direction::Reply)
                .and_then(|d| encode_with(&d, &message, &meta))
                .map(|f| Outgoing::Frame(Arc::new(f))),
        };
        let item = item.or_else(|e| {
            let fallback = Message::new().field("code", "bad_reply").field(
                "message",
                json!(format!("the reply cannot be encoded: {e}")),
            );
            encode(
                &fallback,
                &FrameMeta {
                    kind: Kind::Error,
                    ..meta
                },
                LINK_ENCODING,
            )
            .map(|f| Outgoing::Frame(Arc::new(f)))
        });
        if let Ok(item) = item {
            // A connection that fails is reported lost by its reader.
            let _ = job.peer.conn.send(item, None);
        }
    }

    /// Stops every service: nothing more is queued, and each `fini` runs
    /// once its handler is idle.
    pub(crate) fn stop_services(&self) {
        let services: Vec<Arc<ServiceSlot>> =
            lock(&self.services).drain().map(|(_, s)| s).collect();
        for s in services {
            s.finish();
        }
    }
}

/// Runs `exec` on one request, turning a panic into an error reply and checking
/// the reply against the output schema.
fn answer(
    channel: &str,
    handler: &mut dyn Handler,
    output: &Schema,
    request: Message,
) -> std::result::Result<Message, ServiceError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.exec(request))) {
        Ok(Ok(reply)) => match output.check(&reply) {
            Ok(()) => Ok(reply),
            Err(why) => Err(ServiceError::new(
                "bad_reply",
                format!("the handler's reply {why}"),
            )),
        },
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ServiceError::new(
            "handler_panicked",
            format!("the handler of `{channel}` panicked"),
        )),
    }
}
