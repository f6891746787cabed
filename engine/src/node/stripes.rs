//! Setting up a tcp connection's stripes ([`crate::transport::stripe`]):
//! the extra connections a large frame is spread over.
//!
//! Stripes are set up the first time a publisher has a frame for the peer
//! that its channel would stripe. Only the dialer can open connections, so
//! the listening side gives out a random token on the main connection (a
//! `stripes` control frame: `token`, `count`), asked for by the dialer
//! when it is the one that wants stripes (the same frame without a token);
//! the dialer then opens `count - 1` connections to the address it dialed,
//! each sending a join record with the token and its index. The listener
//! takes each such connection off its peers, answers it, and hands it to
//! the main connection. Frames go whole until the stripes have joined.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::peers::Peer;
use super::{lock, NodeInner};
use crate::message::Message;
use crate::transport::stream::StreamConn;
use crate::transport::stripe::{Join, Stripes, Token, MAX_PARTS};
use crate::transport::{Connection, Lane, Outgoing};
use crate::wire::{FrameMeta, Kind};

/// Most stripe connections a node keeps at once (each has two threads).
const MAX_STRIPE_LINKS: usize = 64;
/// How long an adopted stripe may take to write what its node had queued
/// on it (the subscriptions it told every new connection).
const RETIRE_WAIT: Duration = Duration::from_secs(2);

/// The tokens this node gave out, and how many stripe connections it has.
#[derive(Default)]
pub(crate) struct StripeBook {
    tokens: Mutex<HashMap<Token, (Weak<Peer>, usize)>>,
    links: AtomicUsize,
}

impl StripeBook {
    /// Reserves `n` stripe connections; `false` when the node has too many.
    fn reserve(&self, n: usize) -> bool {
        self.links
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |have| {
                (have + n <= MAX_STRIPE_LINKS).then_some(have + n)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        let _ = self
            .links
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |have| {
                Some(have.saturating_sub(n))
            });
    }
}

/// A peer's stripes: tcp connections (TLS included) have them.
fn stripes_of(peer: &Peer) -> Option<&Stripes> {
    peer.conn.stream().and_then(StreamConn::stripes)
}

impl NodeInner {
    /// Sends `item` to `peer`: a frame in `parts` parts over its stripes
    /// when they have joined, whole (asking for stripes the first time)
    /// when not.
    ///
    /// # Errors
    ///
    /// The connection takes nothing more.
    pub(crate) fn send_frame(
        &self,
        peer: &Arc<Peer>,
        item: Outgoing,
        lane: Option<Arc<Lane>>,
        parts: usize,
    ) -> std::result::Result<(), String> {
        if parts > 1 {
            if let (Outgoing::Frame(frame), Some(stream)) = (&item, peer.conn.stream()) {
                if let Some(sent) = stream.send_striped(frame, lane.clone(), parts) {
                    if sent.is_ok() {
                        self.counters.striped();
                    }
                    return sent;
                }
                self.want_stripes(peer, parts);
            }
        }
        peer.conn.send(item, lane)
    }

    /// A frame for `peer` would travel in `parts` parts: sets its stripes
    /// up, the first time only.
    pub(crate) fn want_stripes(&self, peer: &Arc<Peer>, parts: usize) {
        if parts < 2 || !stripes_of(peer).is_some_and(Stripes::ask) {
            return;
        }
        let parts = parts.min(MAX_PARTS);
        if peer.dialed.is_some() {
            // Asks the listener for a token.
            let ask = Message::new().field("count", parts as u64);
            self.send_stripes(peer, ask);
        } else {
            self.give_token(peer, parts);
        }
    }

    /// Counts `n` stripe connections for `stripes` against the node's
    /// limit; `false` when they do not fit, or were counted before (a
    /// connection's stripes are set up once).
    fn reserve_stripes(&self, stripes: &Stripes, n: usize) -> bool {
        if !self.stripes.reserve(n) {
            return false;
        }
        if !stripes.reserve(n) {
            self.stripes.release(n);
            return false;
        }
        true
    }

    /// `peer` is gone: its stripe connections no longer count.
    pub(crate) fn release_stripes(&self, peer: &Peer) {
        if let Some(stripes) = stripes_of(peer) {
            self.stripes.release(stripes.take_reserved());
        }
    }

    /// Gives `peer` (accepted here) a token its stripes join with.
    fn give_token(&self, peer: &Arc<Peer>, parts: usize) {
        let Some(stripes) = stripes_of(peer) else {
            return;
        };
        if !self.reserve_stripes(stripes, parts - 1) {
            tracing::debug!(node = %self.name, peer = %peer.label, "no stripes: the node has as many stripe connections as it keeps");
            return;
        }
        let mut token = [0u8; 16];
        rand::fill(&mut token);
        {
            let mut tokens = lock(&self.stripes.tokens);
            tokens.retain(|_, (p, _)| p.strong_count() > 0);
            tokens.insert(token, (Arc::downgrade(peer), parts));
        }
        stripes.hub.expect(parts);
        let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let offer = Message::new()
            .field("count", parts as u64)
            .field("token", hex);
        self.send_stripes(peer, offer);
    }

    fn send_stripes(&self, peer: &Arc<Peer>, message: Message) {
        let meta = FrameMeta {
            channel: String::new(),
            seq: 0,
            kind: Kind::Stripes,
            id: None,
        };
        if let Err(why) = self.send_control(peer, meta, message) {
            self.lose(peer, &why);
        }
    }

    /// A `stripes` control frame from `peer`: a dialer asking for a token,
    /// or a listener giving one (then its stripes are opened, on a thread
    /// of their own).
    pub(crate) fn on_stripes(&self, peer: &Arc<Peer>, message: &Message) {
        let count = message
            .get_field("count")
            .and_then(serde_json::Value::as_u64)
            .and_then(|c| usize::try_from(c).ok())
            .filter(|c| (2..=MAX_PARTS).contains(c));
        let token = message.get_field("token").and_then(|t| t.as_str());
        let (Some(count), Some(stripes)) = (count, stripes_of(peer)) else {
            self.offend(
                peer,
                &format!("a stripes frame without a count from 2 to {MAX_PARTS}, or not on tcp"),
            );
            return;
        };
        match (&peer.dialed, token) {
            (None, None) => {
                if stripes.ask() {
                    self.give_token(peer, count);
                }
            }
            (Some(addr), Some(hex)) => {
                let Some(token) = parse_token(hex) else {
                    self.offend(peer, "a stripes frame whose token is not 32 hex digits");
                    return;
                };
                // Asked for or not, the stripes are set up once.
                stripes.ask();
                if !self.reserve_stripes(stripes, count - 1) {
                    return;
                }
                stripes.hub.expect(count);
                let (node, main, addr) = (self.me.clone(), Arc::downgrade(peer), addr.clone());
                let ctx = self.context();
                let spawned = std::thread::Builder::new()
                    .name("tf-stripe-dial".into())
                    .spawn(move || {
                        for index in 1..count {
                            let (Some(node), Some(main)) = (node.upgrade(), main.upgrade()) else {
                                return;
                            };
                            if !main.is_alive() {
                                return;
                            }
                            let joined = crate::transport::tcp::dial_stripe(
                                &addr,
                                &ctx,
                                Join { token, index },
                            )
                            .map_err(|e| e.to_string())
                            .and_then(|conn| {
                                let stripes = stripes_of(&main).ok_or("not a tcp peer")?;
                                stripes.attach(
                                    conn,
                                    index,
                                    Arc::downgrade(&main.conn) as Weak<dyn Connection>,
                                )
                            });
                            if let Err(e) = joined {
                                tracing::warn!(node = %node.name, peer = %main.label, error = %e, "a stripe could not be opened; large frames go over the ones that were");
                                return;
                            }
                        }
                    });
                if spawned.is_err() {
                    self.release_stripes(peer);
                }
            }
            _ => self.offend(
                peer,
                "a stripes frame out of place (a token goes from the listener to the dialer)",
            ),
        }
    }

    /// `stripe`, a connection accepted here, asked to join the connection
    /// this node gave `join.token` to: it leaves the peers and becomes
    /// that connection's stripe `join.index`.
    pub(crate) fn adopt_stripe(&self, stripe: &Arc<Peer>, join: Join) {
        let main = {
            let tokens = lock(&self.stripes.tokens);
            tokens
                .get(&join.token)
                .filter(|(_, count)| join.index < *count)
                .and_then(|(p, _)| p.upgrade())
        };
        let Some(main) = main.filter(|m| m.is_alive()) else {
            self.offend(
                stripe,
                "it asked to join a connection as a stripe with a token this node did not give (or for a stripe it did not offer)",
            );
            return;
        };
        let (Some(stream), Some(main_stripes)) = (stripe.conn.stream(), stripes_of(&main)) else {
            return;
        };
        if !stripe.mark_lost() {
            return;
        }
        lock(&self.peers).retain(|p| p.id != stripe.id);
        self.reroute();
        let deadline = Instant::now() + RETIRE_WAIT;
        let adopted = stream
            .retire(deadline)
            .and_then(|()| {
                crate::transport::tcp::send_all(stream.link(), &join.accept_record(), deadline)
                    .map_err(|e| format!("answering it: {e}"))
            })
            .and_then(|()| {
                main_stripes.attach(
                    Arc::clone(&stripe.conn),
                    join.index,
                    Arc::downgrade(&main.conn) as Weak<dyn Connection>,
                )
            });
        if let Err(why) = adopted {
            tracing::warn!(node = %self.name, peer = %stripe.label, error = %why, "a stripe could not join its connection");
            stripe.conn.close(&why);
        }
    }
}

fn parse_token(hex: &str) -> Option<Token> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut token = [0u8; 16];
    for (i, b) in token.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(token)
}
