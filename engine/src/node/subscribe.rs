//! Subscribing: [`Subscription`] takes a channel's messages from its queue
//! (or from a recording it replays) and lands each tensor on the device its
//! channel's map names before handing the message over.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use super::peers::Peer;
use super::read::Led;
use super::{lock, Guard, Node, NodeInner, ALL_CHANNELS};
use crate::address::Address;
use crate::delivery::Direction;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::queue::{Pop, Queue};
use crate::transport::file::FileConn;
use crate::transport::Connection;
use crate::wire::{Kind, TensorInfo};

/// A message as a subscriber receives it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The channel it was published on.
    pub channel: String,
    /// The publisher's sequence number.
    pub seq: u64,
    /// The message. Tensors that crossed a socket view a pooled receive buffer.
    pub message: Message,
    /// What the sender's header said of each tensor (source device, checksum),
    /// in message order; empty for messages that never left the process.
    pub tensors: Vec<TensorInfo>,
    /// Who sent it: the peer's address, or `local`.
    pub from: Arc<str>,
    /// When its first byte arrived (for a local message: when it was published).
    pub first_byte: Instant,
}

/// The [`Received::from`] of a message published by this node.
pub(crate) fn local_sender() -> Arc<str> {
    static LOCAL: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    Arc::clone(LOCAL.get_or_init(|| Arc::from("local")))
}

/// What waits in a subscription's queue: a message, or what went wrong
/// (a lost peer).
pub(crate) type SubQueue = Queue<Result<Received>>;

/// Most frames a subscriber reading its own connection takes at once past
/// the first, while their bytes are there already.
const READ_ON: usize = 32;

/// What a queued delivery weighs: its tensors' bytes.
fn delivered_bytes(d: &Result<Received>) -> u64 {
    d.as_ref().map_or(0, |r| r.message.payload_bytes())
}

/// Where a subscription's messages come from.
enum Source {
    /// Publishers here and peers, through the queue.
    Queue(Arc<SubQueue>),
    /// A recording, read as the subscription takes its messages.
    Replay(FileConn),
}

/// Receives the messages of one channel.
pub struct Subscription {
    node: Arc<NodeInner>,
    _guard: Arc<Guard>,
    channel: String,
    source: Source,
    /// The peer it was made through (`subscribe(addr, …)`), whose
    /// connection it reads itself while its queue is empty.
    via: Option<Weak<Peer>>,
    /// Ends its wait on the connection it reads; one per subscription, so
    /// that the queue holds it once however often the subscription waits.
    interrupt: Arc<Interrupt>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("replay", &matches!(self.source, Source::Replay(_)))
            .finish()
    }
}

impl Node {
    /// A subscription to `channel` ([`ALL_CHANNELS`] for every channel) from
    /// every peer, present and future, and from this node's own publishers.
    pub fn subscriber(&self, channel: impl Into<String>) -> Subscription {
        let channel = channel.into();
        let spec = self.inner.spec(&channel);
        let mut queue = SubQueue::new(spec.queue_depth, spec.overflow);
        if let Some(bytes) = spec.queue_bytes {
            queue = queue.with_bytes(bytes, delivered_bytes);
        }
        let queue = Arc::new(queue);
        if self.inner.is_closed() {
            queue.close();
        }
        let first = {
            let mut subs = lock(&self.inner.subs);
            let list = subs.entry(channel.clone()).or_default();
            list.push(Arc::clone(&queue));
            list.len() == 1
        };
        self.inner.reroute();
        if first {
            for peer in self.inner.live_peers() {
                self.inner.announce(&peer, &channel, Kind::Subscribe);
            }
        }
        self.inner.subscribers_changed.notify();
        Subscription {
            node: Arc::clone(&self.inner),
            _guard: Arc::clone(&self.guard),
            channel,
            source: Source::Queue(queue),
            via: None,
            interrupt: Arc::default(),
        }
    }

    /// Connects to `addr` (if not yet connected) and subscribes to `channel`.
    /// If that connection is lost, the subscription reports it.
    ///
    /// A `file://PATH` address replays a recording (see [`Node::record`]):
    /// its messages on `channel` (every channel for [`ALL_CHANNELS`]) arrive
    /// in order, as fast as the subscription takes them, landed by this
    /// node's channel configuration like any others; after the last one the
    /// subscription reports [`Error::Closed`].
    ///
    /// # Errors
    ///
    /// When `addr` cannot be reached within the connect timeout.
    pub fn subscribe(&self, addr: &str, channel: impl Into<String>) -> Result<Subscription> {
        let addr: Address = addr.parse()?;
        if let Address::File(path) = &addr {
            return Ok(Subscription {
                node: Arc::clone(&self.inner),
                _guard: Arc::clone(&self.guard),
                channel: channel.into(),
                source: Source::Replay(FileConn::replay(path, self.inner.limits)?),
                via: None,
                interrupt: Arc::default(),
            });
        }
        let peer = self.inner.connect(&addr)?;
        let mut sub = self.subscriber(channel);
        sub.via = Some(Arc::downgrade(&peer));
        if let Source::Queue(q) = &sub.source {
            lock(&peer.origin).push(Arc::downgrade(q));
        }
        if !peer.is_alive() {
            return Err(Error::PeerLost {
                peer: peer.label.to_string(),
                reason: "closed while subscribing".into(),
            });
        }
        Ok(sub)
    }
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`Error::PeerLost`] when the connection this subscription was made
    /// through is lost (once; later calls wait for other peers); [`Error::Closed`]
    /// when the node shut down (or a replay ended); [`Error::Undelivered`]
    /// for a message that arrived but could not be landed (a checksum that
    /// does not match, a missing target device), naming its channel,
    /// sequence number and tensor (later calls go on with the next message).
    pub fn recv(&self) -> Result<Received> {
        self.recv_until(None)
    }

    /// The next message, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when nothing arrives in time; otherwise as [`recv`](Self::recv).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Received> {
        self.recv_until(Some(Instant::now() + timeout))
            .map_err(|e| match e {
                Error::Timeout { what, .. } => Error::Timeout {
                    what,
                    ms: timeout.as_millis() as u64,
                },
                e => e,
            })
    }

    fn recv_until(&self, deadline: Option<Instant>) -> Result<Received> {
        match &self.source {
            Source::Queue(q) => {
                // Without a deadline, reading is given back each second
                // (and taken again when nothing came).
                while q.looks_empty() && self.read_while_empty(q, deadline) && deadline.is_none() {}
                match q.pop(deadline) {
                    Pop::Item(d) => self.land(d),
                    Pop::Closed => Err(Error::Closed),
                    Pop::TimedOut => Err(Error::Timeout {
                        what: format!("waiting for a message on `{}`", self.channel),
                        ms: 0,
                    }),
                }
            }
            Source::Replay(file) => self.next_replayed(file),
        }
    }

    /// With nothing queued, reads the connection its messages come through
    /// on this thread, as a requester reads for its reply, instead of
    /// waiting for the I/O thread to read and wake it: one thread and no
    /// hand-off per message, and, over shm, no system call while messages
    /// keep coming. It leads only a link whose wait a message from
    /// elsewhere (another peer, this node's publishers) or closing can end,
    /// only the peer it subscribed through or the node's only peer, and
    /// only when nobody else reads it; otherwise the I/O thread reads.
    ///
    /// `true` when it read until the deadline (or a second, without one)
    /// with nothing for this subscription.
    fn read_while_empty(&self, queue: &Arc<SubQueue>, deadline: Option<Instant>) -> bool {
        let peer = match self.via.as_ref() {
            Some(via) => via.upgrade(),
            None => self.node.lone_peer(),
        };
        let Some(peer) = peer.filter(|p| p.is_alive()) else {
            return false;
        };
        let Some(stream) = peer.conn.stream() else {
            return false;
        };
        if !stream.link().interruptible() {
            return false;
        }
        let Some(lead) = stream.lead() else {
            return false;
        };
        let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        *lock(&self.interrupt.0) = Arc::downgrade(&peer);
        let waker = Waker::from(Arc::clone(&self.interrupt));
        let how = Led {
            deadline: until,
            spin_until: Instant::now(),
            nothing_yet: false,
            // Half the queue at most, so what it reads for itself fits (a
            // delivery that does not, to this queue or another, stalls and
            // ends the read as it would for the I/O thread).
            read_on: READ_ON.min(queue.depth() / 2),
            // It comes back for the next message as soon as its caller has
            // taken this one.
            park: true,
        };
        // Nothing came when it stopped short with the queue still empty at
        // the deadline: the caller may lead again.
        let done = self
            .node
            .read_led(&peer, lead, how, &mut || !queue.looks_empty(), &mut || {
                !queue.ready_or_wake(&waker)
            });
        !done && queue.looks_empty() && Instant::now() >= until
    }

    /// The next message if one is queued.
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv).
    pub fn try_recv(&self) -> Result<Option<Received>> {
        match &self.source {
            Source::Queue(q) => match q.try_pop() {
                Ok(Some(d)) => self.land(d).map(Some),
                Ok(None) => Ok(None),
                Err(()) => Err(Error::Closed),
            },
            Source::Replay(file) => self.next_replayed(file).map(Some),
        }
    }

    /// The next message, without blocking the thread: the async form of
    /// [`recv`](Self::recv), for any executor.
    ///
    /// # Examples
    ///
    /// ```
    /// # use tensorferry_engine::{Message, Node};
    /// let node = Node::builder().build()?;
    /// let sub = node.subscriber("/ticks");
    /// node.publisher("/ticks").send(Message::new().field("n", 1))?;
    /// let got = futures_lite_block_on(sub.recv_async())?;
    /// assert_eq!(got.message.get_field("n"), Some(&serde_json::json!(1)));
    /// # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let waker = std::task::Waker::noop();
    /// #     let mut cx = std::task::Context::from_waker(waker);
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; }
    /// #         std::thread::yield_now();
    /// #     }
    /// # }
    /// # Ok::<(), tensorferry_engine::Error>(())
    /// ```
    pub fn recv_async(&self) -> RecvFuture<'_> {
        RecvFuture { sub: self }
    }

    /// Messages as they arrive; ends when the node shuts down (or a replay ends).
    pub fn iter(&self) -> impl Iterator<Item = Result<Received>> + '_ {
        std::iter::from_fn(move || match self.recv() {
            Err(Error::Closed) => None,
            other => Some(other),
        })
    }

    /// Messages this subscription's queue dropped under `drop_oldest`.
    pub fn dropped(&self) -> u64 {
        match &self.source {
            Source::Queue(q) => q.dropped(),
            Source::Replay(_) => 0,
        }
    }

    /// Brings a delivered message's tensors to their target devices; a
    /// message that cannot be landed is named by channel, sequence number
    /// and sender.
    fn land(&self, delivered: Result<Received>) -> Result<Received> {
        let mut r = delivered?;
        r.message = match self
            .node
            .land(&r.channel, Direction::Forward, r.message, &r.tensors)
        {
            Ok(m) => m,
            Err(e) => {
                return Err(Error::Undelivered {
                    channel: r.channel,
                    seq: r.seq,
                    from: r.from.to_string(),
                    source: Box::new(e),
                })
            }
        };
        Ok(r)
    }

    /// The recording's next message on this subscription's channel.
    fn next_replayed(&self, file: &FileConn) -> Result<Received> {
        loop {
            let Some(frame) = file.next_frame() else {
                return Err(Error::Closed);
            };
            let frame = frame?;
            if frame.meta.kind != Kind::Message
                || (self.channel != ALL_CHANNELS && frame.meta.channel != self.channel)
            {
                continue;
            }
            return self.land(Ok(Received {
                channel: frame.meta.channel,
                seq: frame.meta.seq,
                message: frame.message,
                tensors: frame.tensors,
                from: Arc::from(file.label()),
                first_byte: Instant::now(),
            }));
        }
    }
}

/// Ends the wait of a subscriber reading a connection itself (the peer
/// it reads last) when its queue gets an item from elsewhere, or closes.
#[derive(Default)]
struct Interrupt(std::sync::Mutex<Weak<Peer>>);

impl Wake for Interrupt {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let peer = lock(&self.0).upgrade();
        if let Some(stream) = peer.as_ref().and_then(|p| p.conn.stream()) {
            stream.link().interrupt_wait();
        }
    }
}

impl NodeInner {
    /// The only live peer with a byte connection, if there is one.
    fn lone_peer(&self) -> Option<Arc<Peer>> {
        let peers = lock(&self.peers);
        let mut live = peers
            .iter()
            .filter(|p| p.is_alive() && p.conn.stream().is_some());
        let one = live.next()?;
        live.next().is_none().then(|| Arc::clone(one))
    }
}

/// The future of [`Subscription::recv_async`].
#[must_use = "a future does nothing unless awaited"]
pub struct RecvFuture<'a> {
    sub: &'a Subscription,
}

impl Future for RecvFuture<'_> {
    type Output = Result<Received>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let sub = self.sub;
        match &sub.source {
            Source::Queue(q) => match q.poll_pop(cx) {
                Poll::Ready(Some(d)) => Poll::Ready(sub.land(d)),
                Poll::Ready(None) => Poll::Ready(Err(Error::Closed)),
                Poll::Pending => Poll::Pending,
            },
            // A mapped file: the next message is there, never waited for.
            Source::Replay(file) => Poll::Ready(sub.next_replayed(file)),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Source::Queue(queue) = &self.source else {
            return;
        };
        queue.close();
        let last = {
            let mut subs = lock(&self.node.subs);
            let list = subs.entry(self.channel.clone()).or_default();
            list.retain(|q| !Arc::ptr_eq(q, queue));
            let empty = list.is_empty();
            if empty {
                subs.remove(&self.channel);
            }
            empty
        };
        self.node.reroute();
        if last && !self.node.is_closed() {
            for peer in self.node.live_peers() {
                self.node.announce(&peer, &self.channel, Kind::Unsubscribe);
            }
        }
        self.node.subscribers_changed.notify();
    }
}
