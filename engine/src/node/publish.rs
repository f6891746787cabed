//! Publishing: [`Publisher::send`] prepares a message once per form its
//! subscribers need — by reference for this node's subscriptions and
//! in-process peers, one encoded frame for every TCP peer, one shared slot
//! for every shm peer — and hands it to each.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tensorferry_device_map::{Device, Overflow};
use tensorferry_kernels::DType;

use super::peers::Peer;
use super::read::Wait;
use super::stats::ChannelCounters;
use super::subscribe::Received;
use super::{lock, Guard, Node, NodeInner, ALL_CHANNELS};
use crate::buffer::HostBuffer;
use crate::delivery::{Delivery, Direction};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::transport::outbox::{small_host_frame, LINK_ENCODING};
use crate::transport::shm::slots::SlotUse;
use crate::transport::{stripe, Carry, Lane, Outgoing};
use crate::wire::{decode_at, encode, encode_staged, layout, Encoded, FrameMeta};

/// The item that sends a frame already in a shared slot.
fn slot_item(slot: Option<&(SlotUse, u64)>, meta: &FrameMeta) -> Outgoing {
    let (held, len) = slot.expect("a slot is filled before its item is made");
    Outgoing::Slot {
        held: held.share(),
        len: *len,
        meta: meta.clone(),
    }
}

/// Publishes messages on one channel.
pub struct Publisher {
    node: Arc<NodeInner>,
    _guard: Arc<Guard>,
    channel: String,
    seq: AtomicU64,
    /// Whom the channel's messages go to, as last worked out.
    route: Mutex<Option<Arc<Route>>>,
    /// The channel's counters.
    counters: Arc<ChannelCounters>,
}

/// A peer on a publisher's route.
struct RoutePeer {
    peer: Weak<Peer>,
    /// `None`: the peer has no lane (inproc); `Some` that no longer
    /// upgrades: its lane is gone (unsubscribed or lost).
    lane: Option<Weak<Lane>>,
    carries: Carry,
}

/// Whom a publisher's messages go to, as of one version of the node's
/// routes ([`NodeInner::reroute`]).
struct Route {
    version: u64,
    /// Peers subscribed to the channel, each with the lane its messages
    /// take. Held weakly: a lost peer and what its lane still holds go when
    /// the node lets go of them, not when this publisher next sends.
    peers: Vec<RoutePeer>,
    /// Whether this node has subscriptions to the channel.
    local: bool,
    /// Whether a recording may want the channel.
    recording: bool,
    /// The channel's `stripes` setting (tcp).
    stripes: Option<usize>,
}

/// A subscriber of a channel whose connection was lost, and what the
/// channel's publishers had handed it: read with [`Publisher::lost_subscribers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostSubscriber {
    /// The peer's address.
    pub peer: String,
    /// The channel it had subscribed to (`*` for every channel).
    pub channel: String,
    /// Why the connection ended.
    pub reason: String,
    /// Messages of the channel written whole to its connection before the
    /// loss (written is not acknowledged: the peer may not have read the
    /// last of them).
    pub written: u64,
    /// Messages queued for it and not written when the connection ended:
    /// they are lost.
    pub unsent: u64,
}

/// A lost subscriber as recorded when its connection ended, with its lane.
pub(crate) struct LostRecord {
    pub(crate) subscriber: LostSubscriber,
    pub(crate) lane: Option<Arc<Lane>>,
}

impl LostRecord {
    /// The record with what its lane counts now: a message whose last
    /// bytes went out as the connection ended may be counted as written
    /// only after the loss was recorded (the writing thread counts it once
    /// its write returns); it was never unsent.
    fn now(&self) -> LostSubscriber {
        let mut l = self.subscriber.clone();
        if let Some(lane) = &self.lane {
            let late = lane.written().saturating_sub(l.written);
            l.written += late;
            l.unsent = l.unsent.saturating_sub(late);
        }
        l
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("channel", &self.channel)
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl Node {
    /// A publisher on `channel`.
    pub fn publisher(&self, channel: impl Into<String>) -> Publisher {
        let channel = channel.into();
        Publisher {
            node: Arc::clone(&self.inner),
            _guard: Arc::clone(&self.guard),
            counters: self.inner.counters.channel(&channel),
            channel,
            seq: AtomicU64::new(0),
            route: Mutex::new(None),
        }
    }
}

/// Encodes `message` with `delivery`'s sending rules; host tensors on a
/// channel without casts or checksums skip the preparing.
pub(crate) fn encode_with(
    delivery: &Delivery,
    message: &Message,
    meta: &FrameMeta,
) -> Result<Encoded> {
    let on_host = message.tensors().all(|(_, t)| t.device() == Device::Cpu);
    if on_host && !delivery.prepares_host_tensors() {
        return encode(message, meta, LINK_ENCODING);
    }
    let (wire, origins) = delivery.prepare(message)?;
    encode_staged(&wire, &origins, meta, LINK_ENCODING)
}

impl NodeInner {
    /// Encodes `message` for the wire on its channel: tensors on devices are
    /// cast and checksummed where they are (read back as the frame is written).
    pub(crate) fn encode_for(&self, message: &Message, meta: &FrameMeta) -> Result<Encoded> {
        let delivery = self.delivery(&meta.channel, Direction::Forward)?;
        encode_with(&delivery, message, meta)
    }

    /// The peers subscribed to `channel`, each with the lane its messages take.
    fn subscribed_peers(&self, channel: &str) -> Vec<(Arc<Peer>, Option<Arc<Lane>>)> {
        lock(&self.peers)
            .iter()
            .filter(|p| p.is_alive())
            .filter_map(|p| p.wants(channel).map(|lane| (Arc::clone(p), lane)))
            .collect()
    }

    fn has_local_subscribers(&self, channel: &str) -> bool {
        let subs = lock(&self.subs);
        subs.contains_key(channel) || subs.contains_key(ALL_CHANNELS)
    }
}

impl Publisher {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Sends `message` to every subscriber: this node's by reference, each
    /// peer's through its connection (encoded once for all of them). Under
    /// the channel's `block` policy this waits while a subscriber's queue is full.
    ///
    /// # Errors
    ///
    /// When the message cannot be encoded (duplicate names, a cast or
    /// checksum that fails), or the node is shut down.
    pub fn send(&self, message: Message) -> Result<()> {
        if self.node.is_closed() {
            return Err(Error::Closed);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dispatch(seq, Some(message), None)
    }

    /// The async form of [`send`](Self::send), for any executor: it waits
    /// without blocking the thread until every queue of this channel — this
    /// node's subscriptions and each connection's — has room, then sends.
    /// Delivery into another node of this process (`inproc://`) is done in
    /// place, and may still wait for that node's subscriber.
    pub fn send_async(&self, message: Message) -> SendFuture<'_> {
        SendFuture {
            publisher: self,
            message: Some(message),
        }
    }

    /// Lays out a message of `fields` (a message whose tensors are ignored) and
    /// the host tensors `(name, dtype, shape)` directly in shared memory: fill
    /// each tensor in place with [`Loan::fill`], then [`Loan::send`]. Subscribers
    /// over `shm://` get it with no copy at all; others get one copy.
    ///
    /// # Errors
    ///
    /// Duplicate names, sizes that overflow, or shared memory that cannot be created.
    pub fn loan(&self, fields: &Message, tensors: &[(&str, DType, &[usize])]) -> Result<Loan<'_>> {
        if self.node.is_closed() {
            return Err(Error::Closed);
        }
        if self
            .node
            .delivery(&self.channel, Direction::Forward)?
            .prepares_host_tensors()
        {
            return Err(Error::Invalid(format!(
                "channel `{}` casts or checksums tensors before they travel, and a loan sends its bytes as laid out; use send()",
                self.channel
            )));
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let layout = layout(
            &FrameMeta::message(self.channel.clone(), seq),
            fields.fields(),
            tensors,
        )?;
        let len = usize::try_from(layout.frame_len)
            .map_err(|_| Error::Invalid("frame too large".into()))?;
        let held = self.node.slots.take(len)?;
        held.0
            .with_bytes(|bytes| bytes[..layout.head.len()].copy_from_slice(&layout.head));
        Ok(Loan {
            publisher: self,
            held,
            seq,
            frame_len: layout.frame_len,
            names: tensors.iter().map(|(n, _, _)| n.to_string()).collect(),
            spans: layout.spans,
        })
    }

    /// Whom the channel's messages go to now: worked out again only when
    /// the node's routes changed since the last time.
    fn route(&self) -> Arc<Route> {
        let node = &self.node;
        // Read before looking: a change made meanwhile moves the version
        // past this one, and the next message looks again.
        let version = node.routes.load(Ordering::Acquire);
        let mut kept = lock(&self.route);
        if let Some(route) = kept.as_ref().filter(|r| r.version == version) {
            return Arc::clone(route);
        }
        let peers = node
            .subscribed_peers(&self.channel)
            .into_iter()
            .map(|(peer, lane)| RoutePeer {
                carries: peer.conn.carries(),
                peer: Arc::downgrade(&peer),
                lane: lane.as_ref().map(Arc::downgrade),
            })
            .collect();
        let route = Arc::new(Route {
            version,
            peers,
            local: node.has_local_subscribers(&self.channel),
            recording: node.records(&self.channel),
            stripes: node.spec(&self.channel).stripes,
        });
        *kept = Some(Arc::clone(&route));
        route
    }

    /// Hands a message to every subscriber. `message` is the message itself
    /// when the caller has one; `slot` holds the encoded frame when it is
    /// already in shared memory (a loan).
    fn dispatch(
        &self,
        seq: u64,
        mut message: Option<Message>,
        mut slot: Option<(SlotUse, u64)>,
    ) -> Result<()> {
        let now = Instant::now();
        let node = &self.node;
        let mut meta = FrameMeta::message(self.channel.clone(), seq);
        let route = self.route();
        let peers = &route.peers;
        let recording = route.recording;
        let needs_message =
            recording || route.local || peers.iter().any(|p| p.carries != Carry::Slots);
        if message.is_none() && needs_message {
            // A loan reaching subscribers that are not shm: decode a copy of the frame.
            let (held, len) = slot.as_ref().expect("a loan always has its slot");
            let bytes = held
                .0
                .with_bytes(|b| HostBuffer::copy_from(&b[..*len as usize]));
            message = Some(decode_at(&bytes, &node.limits, 0)?.message);
        }
        let mut encoded: Option<Arc<Encoded>> = None;
        let mut encode_once = |m: &Message, meta: &FrameMeta| -> Result<Arc<Encoded>> {
            if let Some(e) = &encoded {
                return Ok(Arc::clone(e));
            }
            let e = Arc::new(node.encode_for(m, meta)?);
            encoded = Some(Arc::clone(&e));
            Ok(e)
        };
        for (i, on_route) in peers.iter().enumerate() {
            let Some(peer) = on_route.peer.upgrade().filter(|p| p.is_alive()) else {
                continue;
            };
            let lane = match on_route.lane.as_ref().map(Weak::upgrade) {
                Some(None) => continue, // unsubscribed or lost meanwhile
                lane => lane.flatten(),
            };
            let item = match on_route.carries {
                Carry::Messages => {
                    let m = message.as_ref().expect("decoded above for non-shm peers");
                    m.check_names()?;
                    // The last to need the message takes it itself.
                    if i + 1 == peers.len() && !route.local && !recording {
                        Outgoing::Message {
                            meta: std::mem::replace(&mut meta, FrameMeta::message("", seq)),
                            message: message.take().expect("still here"),
                        }
                    } else {
                        Outgoing::Message {
                            meta: meta.clone(),
                            message: m.clone(),
                        }
                    }
                }
                Carry::Frames => Outgoing::Frame(encode_once(
                    message.as_ref().expect("decoded above for non-shm peers"),
                    &meta,
                )?),
                Carry::Slots => {
                    if slot.is_none() {
                        let m = message
                            .as_ref()
                            .expect("a message is at hand when no slot is");
                        let frame = encode_once(m, &meta)?;
                        if small_host_frame(&frame) {
                            // Small: through the ring itself, copied out by
                            // the reader; no slot to take, map and release
                            // (a release wakes the sender).
                            Outgoing::Frame(frame)
                        } else {
                            slot = Some(self.copy_to_slot(&frame)?);
                            slot_item(slot.as_ref(), &meta)
                        }
                    } else {
                        slot_item(slot.as_ref(), &meta)
                    }
                }
            };
            if let Some(lane) = &lane {
                if lane.overflow() == Overflow::Block {
                    lane.wait_room(None);
                }
            }
            let len = match &item {
                Outgoing::Frame(f) | Outgoing::Part { frame: f, .. } => f.frame_len(),
                Outgoing::Slot { len, .. } => *len,
                Outgoing::Message { .. } => 0,
            };
            let parts = match on_route.carries {
                Carry::Frames => stripe::parts_for(len, route.stripes),
                _ => 1,
            };
            // A connection that fails is reported lost by its reader.
            if node.send_frame(&peer, item, lane, parts).is_ok() {
                node.counters.sent(&self.counters, len);
            }
        }
        if let Some(message) = message {
            if recording {
                let frame = match encoded {
                    Some(e) => e,
                    None => Arc::new(node.encode_for(&message, &meta)?),
                };
                node.tap_frame(&self.channel, &frame);
            }
            if route.local {
                node.deliver(
                    Received {
                        channel: self.channel.clone(),
                        seq,
                        message,
                        tensors: Vec::new(),
                        from: super::subscribe::local_sender(),
                        first_byte: now,
                    },
                    Wait::Block,
                    None,
                );
            }
        }
        Ok(())
    }

    /// Copies an encoded frame into a free shared slot (the one copy of the shm path).
    fn copy_to_slot(&self, frame: &Encoded) -> Result<(SlotUse, u64)> {
        let len = frame.frame_len();
        let held = self
            .node
            .slots
            .take(usize::try_from(len).map_err(|_| Error::Invalid("frame too large".into()))?)?;
        held.0
            .with_bytes(|bytes| crate::outbound::copy_frame_into(frame, &mut bytes[..len as usize]))
            .map_err(|e| Error::io("writing into shared memory", e))?;
        Ok((held, len))
    }

    /// Subscribers reached: this node's own plus every peer that asked for the channel.
    pub fn subscribers(&self) -> usize {
        let local = {
            let subs = lock(&self.node.subs);
            subs.get(&self.channel).map_or(0, Vec::len) + subs.get(ALL_CHANNELS).map_or(0, Vec::len)
        };
        local + self.node.subscribed_peers(&self.channel).len()
    }

    /// Waits until at least `n` subscribers are reached.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when fewer than `n` have subscribed after `timeout`.
    pub fn wait_for_subscribers(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.node.subscribers_changed.generation();
            if self.subscribers() >= n {
                return Ok(());
            }
            if self.node.is_closed() {
                return Err(Error::Closed);
            }
            if !self.node.subscribers_changed.wait(seen, deadline) {
                return Err(Error::Timeout {
                    what: format!(
                        "waiting for {n} subscriber(s) of `{}` ({} so far)",
                        self.channel,
                        self.subscribers()
                    ),
                    ms: timeout.as_millis() as u64,
                });
            }
        }
    }

    /// The async form of [`wait_for_subscribers`](Self::wait_for_subscribers),
    /// without a time limit (use your executor's timeout).
    pub fn wait_for_subscribers_async(&self, n: usize) -> SubscribersFuture<'_> {
        SubscribersFuture { publisher: self, n }
    }

    /// Waits until every message queued for this channel's peers has been
    /// written to its connection.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when messages are still queued after `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for (_, lane) in self.node.subscribed_peers(&self.channel) {
            let Some(lane) = lane else { continue };
            if !lane.wait_empty(deadline) {
                let lanes = self.node.subscribed_peers(&self.channel);
                let lanes = lanes.iter().filter_map(|(_, l)| l.as_ref());
                let (queued, parts) = lanes.fold((0, 0), |(q, p), l| {
                    (q + l.queued(), p + l.parts_on_stripes())
                });
                let parts = if parts > 0 {
                    format!(" and {parts} share(s) of striped ones on their stripes")
                } else {
                    String::new()
                };
                return Err(Error::Timeout {
                    what: format!("flushing {queued} message(s){parts} of `{}`", self.channel),
                    ms: timeout.as_millis() as u64,
                });
            }
        }
        Ok(())
    }

    /// The subscribers of this channel whose connection was lost (oldest
    /// first), each with how many messages had been written to it and how
    /// many were queued and lost: the status a publisher reads to know that
    /// not everything reached everyone. Cumulative for the node (the last
    /// 4,096 losses).
    ///
    /// # Examples
    ///
    /// ```
    /// use tensorferry_engine::Node;
    ///
    /// let node = Node::builder().build()?;
    /// assert!(node.publisher("/x").lost_subscribers().is_empty());
    /// # Ok::<(), tensorferry_engine::Error>(())
    /// ```
    pub fn lost_subscribers(&self) -> Vec<LostSubscriber> {
        lock(&self.node.lost_subscribers)
            .iter()
            .filter(|r| {
                let c = &r.subscriber.channel;
                *c == self.channel || c == ALL_CHANNELS
            })
            .map(LostRecord::now)
            .collect()
    }

    /// Messages dropped by `drop_oldest` in the queues of peers subscribed to this channel.
    pub fn dropped(&self) -> u64 {
        self.node
            .subscribed_peers(&self.channel)
            .iter()
            .filter_map(|(_, l)| l.as_ref().map(|l| l.dropped()))
            .sum()
    }

    /// Whether every queue `send` would wait on has room now; if not, the
    /// context's waker is woken when one that was full has room.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        for (_, lane) in self.node.subscribed_peers(&self.channel) {
            if let Some(lane) = lane {
                if lane.overflow() == Overflow::Block && lane.poll_room(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        }
        let queues: Vec<_> = {
            let subs = lock(&self.node.subs);
            subs.get(&self.channel)
                .into_iter()
                .chain(subs.get(ALL_CHANNELS))
                .flatten()
                .cloned()
                .collect()
        };
        for q in queues {
            if q.poll_room(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
    }
}

/// The future of [`Publisher::send_async`].
#[must_use = "a future does nothing unless awaited"]
pub struct SendFuture<'a> {
    publisher: &'a Publisher,
    message: Option<Message>,
}

impl Future for SendFuture<'_> {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.publisher.poll_room(cx).is_pending() {
            return Poll::Pending;
        }
        let Some(message) = self.message.take() else {
            return Poll::Ready(Ok(()));
        };
        Poll::Ready(self.publisher.send(message))
    }
}

/// The future of [`Publisher::wait_for_subscribers_async`].
#[must_use = "a future does nothing unless awaited"]
pub struct SubscribersFuture<'a> {
    publisher: &'a Publisher,
    n: usize,
}

impl Future for SubscribersFuture<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let signal = &self.publisher.node.subscribers_changed;
        loop {
            let seen = signal.generation();
            if self.publisher.subscribers() >= self.n {
                return Poll::Ready(Ok(()));
            }
            if self.publisher.node.is_closed() {
                return Poll::Ready(Err(Error::Closed));
            }
            if signal.poll_changed(seen, cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// A message laid out in shared memory by [`Publisher::loan`], filled in place.
pub struct Loan<'p> {
    publisher: &'p Publisher,
    held: SlotUse,
    seq: u64,
    frame_len: u64,
    names: Vec<String>,
    spans: Vec<std::ops::Range<usize>>,
}

impl Loan<'_> {
    /// Lets `fill` write the bytes of tensor `name` in place (they start zeroed
    /// or with a previous message's bytes: write all of them).
    ///
    /// # Errors
    ///
    /// When the loan has no tensor `name`.
    pub fn fill<T>(&mut self, name: &str, fill: impl FnOnce(&mut [u8]) -> T) -> Result<T> {
        let i = self.names.iter().position(|n| n == name).ok_or_else(|| {
            Error::Invalid(format!(
                "the loan has no tensor `{name}`; it has: {}",
                self.names.join(", ")
            ))
        })?;
        let span = self.spans[i].clone();
        Ok(self.held.0.with_bytes(|b| fill(&mut b[span])))
    }

    /// The sequence number the message will carry.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Sends the message to every subscriber.
    ///
    /// # Errors
    ///
    /// When the node shut down, or a non-shm subscriber's copy cannot be made.
    pub fn send(self) -> Result<()> {
        let Loan {
            publisher,
            held,
            seq,
            frame_len,
            ..
        } = self;
        publisher.dispatch(seq, None, Some((held, frame_len)))
    }
}
