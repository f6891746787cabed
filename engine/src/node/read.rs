//! The read path: each frame a peer sends, to where it goes — a message to
//! the subscriptions of its channel, a request to its service, a reply to
//! the requester waiting for it, a subscription to the peer's records.
//!
//! It runs on an I/O thread (or a requester reading its own reply), where
//! nothing may wait for a consumer: a subscription or service queue that is
//! full under `block` *stalls* the connection — the frame waits in the peer
//! and the connection is not read — until the queue has room and wakes the
//! peer again. Backpressure reaches the sender through its socket while
//! every other connection goes on. Frames handed over in process (inproc)
//! run on the sender's thread instead, which simply waits for room.

use std::sync::{Arc, Weak};
use std::time::Instant;

use super::peers::Peer;
use super::services::Job;
use super::subscribe::{Received, SubQueue};
use super::{lock, NodeInner, ALL_CHANNELS};
use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::queue::Offer;
use crate::transport::outbox::LINK_ENCODING;
use crate::transport::shm::slots::{self, MappedSlot};
use crate::transport::stream::{End, Lead, Step};
use crate::transport::{Flow, Lane, Outgoing};
use crate::wire::{decode_at, encode, Frame, FrameMeta, Kind};

/// How a frame handler waits for a full queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// It waits (the sender's own thread: inproc).
    Block,
    /// It stalls the connection instead (an I/O thread).
    Stall,
}

/// How a thread leading a connection reads it (see [`NodeInner::read_led`]).
pub(crate) struct Led {
    /// When it gives up.
    pub(crate) deadline: Instant,
    /// Until when it spins rather than sleeps when nothing is there.
    pub(crate) spin_until: Instant,
    /// Nothing can be there yet (a request just written): unless it spins,
    /// it waits before its first read.
    pub(crate) nothing_yet: bool,
    /// Once done, how many more frames it may read while their bytes are
    /// there already (zero: it stops at done). A subscriber takes what one
    /// look at the link found, so the I/O thread is not handed bytes that
    /// were already in reach, nor woken to read them.
    pub(crate) read_on: usize,
    /// When done, it keeps the connection for its next read
    /// ([`Lead::park`]) instead of handing it back to the I/O thread.
    pub(crate) park: bool,
}

/// What a stalled connection still has to deliver.
pub(crate) enum Stalled {
    /// A message, to these subscriptions.
    Deliver {
        received: Received,
        to: Vec<Arc<SubQueue>>,
    },
    /// A request, to its service.
    Request {
        job: Job,
        service: Arc<super::services::ServiceSlot>,
    },
}

impl NodeInner {
    /// Runs one frame that came from `peer`.
    pub(crate) fn on_frame(&self, peer: &Arc<Peer>, frame: Frame, wait: Wait) -> Flow {
        let first_byte = Instant::now();
        let Frame {
            meta,
            message,
            tensors,
            frame_len,
        } = frame;
        match meta.kind {
            Kind::Message => {
                self.counters.received(&meta.channel, frame_len);
                let received = Received {
                    channel: meta.channel,
                    seq: meta.seq,
                    message,
                    tensors,
                    from: peer.label.clone(),
                    first_byte,
                };
                self.tap_received(&received);
                self.deliver(received, wait, Some(peer))
            }
            Kind::Shm => match self.open_slot_frame(peer, &message) {
                Ok(inner) => self.on_frame(peer, inner, wait),
                Err(e) => {
                    self.offend(peer, &e.to_string());
                    Flow::Continue
                }
            },
            Kind::Release => {
                let number = |k: &str| message.get_field(k).and_then(serde_json::Value::as_u64);
                if let (Some(slot), Some(offset), Some(stream)) =
                    (number("slot"), number("offset"), peer.conn.stream())
                {
                    if let Ok(slot) = u32::try_from(slot) {
                        stream.link().release_slot(slot, offset);
                        // A slot that waited for this release goes now.
                        let _ = stream.pump();
                    }
                }
                Flow::Continue
            }
            Kind::Subscribe | Kind::Unsubscribe => {
                self.on_control(peer, &meta.channel, meta.kind);
                Flow::Continue
            }
            Kind::Stripes => {
                self.on_stripes(peer, &message);
                Flow::Continue
            }
            Kind::Request => match meta.id {
                Some(id) => {
                    if let Some(replied) = lock(&peer.replied_at).take() {
                        self.serve_spin.observe(first_byte - replied);
                    }
                    self.counters.received(&meta.channel, frame_len);
                    let job = Job::new(peer, meta.channel, id, message, tensors);
                    self.dispatch_request(job, wait)
                }
                None => {
                    self.offend(peer, "it sent a request without an id");
                    Flow::Continue
                }
            },
            Kind::Reply => {
                if let Some(id) = meta.id {
                    self.complete(id, Ok((message, tensors)));
                }
                Flow::Continue
            }
            Kind::Error => {
                if let Some(id) = meta.id {
                    let text = |k: &str| {
                        message
                            .get_field(k)
                            .and_then(|v| v.as_str())
                            .unwrap_or("")
                            .to_string()
                    };
                    self.complete(
                        id,
                        Err(Error::Remote {
                            channel: meta.channel.clone(),
                            code: text("code"),
                            message: text("message"),
                        }),
                    );
                }
                Flow::Continue
            }
        }
    }

    /// A peer broke the protocol: its connection ends, and whoever depended
    /// on it is told what it did.
    pub(crate) fn offend(&self, peer: &Arc<Peer>, offence: &str) {
        tracing::warn!(node = %self.name, peer = %peer.label, offence, "closing a connection whose peer broke the protocol");
        self.counters.rejected();
        self.drop_peer(peer, offence, &|| Error::Misbehaved {
            peer: peer.label.to_string(),
            offence: offence.to_string(),
        });
    }

    /// Hands a message to this node's subscriptions of its channel (and of
    /// `*`). Under [`Wait::Stall`] a full queue stalls `peer`.
    pub(crate) fn deliver(&self, received: Received, wait: Wait, peer: Option<&Arc<Peer>>) -> Flow {
        let queues: SmallVec<[Arc<SubQueue>; 4]> = {
            let subs = lock(&self.subs);
            subs.get(&received.channel)
                .into_iter()
                .chain(subs.get(ALL_CHANNELS))
                .flatten()
                .cloned()
                .collect()
        };
        self.deliver_to(received, queues, wait, peer)
    }

    fn deliver_to(
        &self,
        received: Received,
        queues: impl IntoIterator<Item = Arc<SubQueue>>,
        wait: Wait,
        peer: Option<&Arc<Peer>>,
    ) -> Flow {
        let mut full = Vec::new();
        let mut queues = queues.into_iter().peekable();
        let mut received = Some(received);
        while let Some(q) = queues.next() {
            // The last queue takes the message itself, the others a clone.
            let item = match queues.peek() {
                Some(_) => received.clone(),
                None => received.take(),
            };
            let Some(item) = item.map(Ok) else { break };
            match wait {
                Wait::Block => {
                    // Refused only when the subscription closed meanwhile.
                    let _ = q.push(item, None);
                }
                Wait::Stall => match q.offer(item) {
                    Offer::Taken | Offer::Closed(_) => {}
                    Offer::Full(back) => {
                        full.push(q);
                        if received.is_none() {
                            received = back.ok();
                        }
                    }
                },
            }
        }
        if full.is_empty() {
            return Flow::Continue;
        }
        let (Some(peer), Some(received)) = (peer, received) else {
            return Flow::Continue;
        };
        if let Some(waker) = peer.waker() {
            full[0].wake_on_room(waker);
        }
        *lock(&peer.stalled) = Some(Stalled::Deliver { received, to: full });
        Flow::Stall
    }

    /// Reads and hands on `peer`'s frames on this thread, as its I/O thread
    /// would, while leading its connection (a requester waiting for its
    /// reply, a subscriber with nothing queued), until `done()` says what
    /// this thread waits for is there (`true`), or it stops short
    /// (`false`): the deadline passed, a full queue stalled the connection
    /// (the I/O thread reads on once it has room), or the connection ended
    /// or its wait failed (the peer is lost). Before it sleeps, it spins
    /// until `how.spin_until`, and `may_sleep()` has a last say (`false`:
    /// stop, as done).
    pub(crate) fn read_led(
        &self,
        peer: &Arc<Peer>,
        mut lead: Lead<'_>,
        how: Led,
        done: &mut dyn FnMut() -> bool,
        may_sleep: &mut dyn FnMut() -> bool,
    ) -> bool {
        // A delivery that waited for room goes before anything newer.
        if !self.retry_stalled(peer) {
            return false;
        }
        let mut wait_first =
            how.nothing_yet && how.spin_until <= Instant::now() && !lead.holds_bytes();
        let mut read_on = how.read_on;
        loop {
            if done() {
                if read_on == 0 || !lead.has_more() {
                    if how.park {
                        lead.park();
                    }
                    return true;
                }
                read_on -= 1;
            }
            if std::mem::take(&mut wait_first) {
                if let Err(e) = lead.wait_readable(how.deadline) {
                    drop(lead);
                    self.lose(peer, &format!("waiting to read: {e}"));
                    return false;
                }
            }
            match lead.step(&mut |frame| self.on_frame(peer, frame, Wait::Stall)) {
                // (A reader that is done looks at the clock no more: it
                // stops, or reads on at most `read_on` frames.)
                Step::Frame => {
                    if !done() && Instant::now() >= how.deadline {
                        return false;
                    }
                }
                Step::Stalled => return false,
                Step::Pending => {
                    let now = Instant::now();
                    if now >= how.deadline {
                        return false;
                    }
                    if now < how.spin_until {
                        std::hint::spin_loop();
                        continue;
                    }
                    if !may_sleep() {
                        if how.park {
                            lead.park();
                        }
                        return true;
                    }
                    if let Err(e) = lead.wait_readable(how.deadline) {
                        drop(lead);
                        self.lose(peer, &format!("waiting to read: {e}"));
                        return false;
                    }
                }
                Step::Ended(end) => {
                    drop(lead);
                    // Fails what waited on the peer, this reader's wait included.
                    match end {
                        End::Closed(why) => self.lose(peer, &why),
                        End::Broken(what) => self.offend(peer, &what),
                        End::Joined(_) => {
                            self.offend(peer, "a stripe's join where a reply was awaited")
                        }
                    }
                    return false;
                }
            }
        }
    }

    /// Tries again what `peer` could not deliver; `true` when nothing is
    /// left waiting (the connection may be read again).
    pub(crate) fn retry_stalled(&self, peer: &Arc<Peer>) -> bool {
        let _turn = lock(&peer.retrying);
        let Some(stalled) = lock(&peer.stalled).take() else {
            return true;
        };
        match stalled {
            Stalled::Deliver { received, to } => {
                self.deliver_to(received, to, Wait::Stall, Some(peer)) == Flow::Continue
            }
            Stalled::Request { job, service } => {
                self.queue_request(job, service, Wait::Stall) == Flow::Continue
            }
        }
    }

    /// A peer asked for (or dropped) a channel.
    fn on_control(&self, peer: &Arc<Peer>, channel: &str, kind: Kind) {
        let mut wants = lock(&peer.wants);
        match kind {
            Kind::Subscribe if !wants.contains_key(channel) => {
                let lane = peer.conn.stream().map(|_| {
                    let spec = self.spec(channel);
                    Arc::new(Lane::new(spec.queue_depth, spec.queue_bytes, spec.overflow))
                });
                wants.insert(channel.to_string(), lane);
            }
            Kind::Unsubscribe => {
                if let Some(Some(lane)) = wants.remove(channel) {
                    lane.close();
                }
            }
            _ => return,
        }
        drop(wants);
        self.reroute();
        self.subscribers_changed.notify();
    }

    /// Sends a subscribe or unsubscribe to `peer`.
    pub(crate) fn announce(&self, peer: &Arc<Peer>, channel: &str, kind: Kind) {
        let meta = FrameMeta {
            channel: channel.to_string(),
            seq: 0,
            kind,
            id: None,
        };
        let sent = self.send_control(peer, meta, Message::new());
        if let Err(why) = sent {
            self.lose(peer, &why);
        }
    }

    /// Sends a frame the node makes itself (control, errors) on `peer`'s
    /// connection, as that connection carries it.
    pub(crate) fn send_control(
        &self,
        peer: &Peer,
        meta: FrameMeta,
        message: Message,
    ) -> std::result::Result<(), String> {
        let item = match peer.conn.carries() {
            crate::transport::Carry::Messages => Outgoing::Message { meta, message },
            _ => Outgoing::Frame(Arc::new(
                encode(&message, &meta, LINK_ENCODING).map_err(|e| e.to_string())?,
            )),
        };
        peer.conn.send(item, None)
    }

    /// Decodes the message frame a `shm` frame points to, in place in the shared slot.
    fn open_slot_frame(&self, peer: &Arc<Peer>, pointer: &Message) -> Result<Frame> {
        let field = |k: &str| pointer.get_field(k);
        let number = |k: &str| {
            field(k)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| Error::Invalid(format!("it sent a shm frame without a valid `{k}`")))
        };
        let (slot, offset, len) = (number("slot")?, number("offset")?, number("len")?);
        let slot = u32::try_from(slot).map_err(|_| {
            Error::Invalid(format!("it named shm slot {slot}, which is out of range"))
        })?;
        let stream = peer.conn.stream().ok_or_else(|| {
            Error::Invalid("it sent a shm frame over a link without shared memory".into())
        })?;
        let mut drained = false;
        let map = {
            let mut mapped = lock(&peer.mapped);
            if field("fd").and_then(serde_json::Value::as_bool) == Some(true) {
                let fd = stream.link().take_fd().ok_or_else(|| {
                    Error::Invalid(
                        "it announced a shared-memory descriptor that did not arrive".into(),
                    )
                })?;
                mapped.insert(slot, Arc::new(MappedSlot::map(fd)?));
                drained = true;
            }
            mapped.get(&slot).cloned().ok_or_else(|| {
                Error::Invalid(format!("it named shm slot {slot}, which it never sent"))
            })?
        };
        // Taking a descriptor drained the socket's wake-ups too: one that
        // reported room to write is acted on here.
        if drained && stream.link().take_room_rung() {
            let _ = stream.pump();
        }
        let weak: Weak<Peer> = Arc::downgrade(peer);
        let release = Box::new(move || {
            let Some(peer) = weak.upgrade() else { return };
            let fields = Message::new().field("slot", slot).field("offset", offset);
            let meta = FrameMeta {
                channel: String::new(),
                seq: 0,
                kind: Kind::Release,
                id: None,
            };
            if let Ok(f) = encode(&fields, &meta, LINK_ENCODING) {
                let _ = peer.conn.send(Outgoing::Frame(Arc::new(f)), None);
            }
        });
        let region = slots::view(&map, offset, len, release)?;
        let frame = decode_at(&region, &self.limits, 0)?;
        if frame.meta.kind != Kind::Message {
            return Err(Error::Invalid(
                "a shared slot held a frame that is not a message".into(),
            ));
        }
        Ok(frame)
    }
}
