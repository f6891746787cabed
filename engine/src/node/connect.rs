//! Listening, accepting and connecting: how a connection becomes a peer.
//!
//! Listeners are watched by the node's I/O threads: a new connection is
//! accepted there, and one that must still shake hands (shm) is driven
//! there too (shm: the rings; tcp: TLS and the secret's challenge, as the
//! node has them), without blocking, until it is open or its time is up — a
//! peer that never answers holds up nobody; one that fails or runs out of
//! time is dropped, logged and counted (`NodeStats::rejected`). Dialing
//! blocks only the caller.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use super::peers::{Driven, Peer};
use super::read::Wait;
use super::{lock, Listening, NodeInner};
use crate::address::Address;
use crate::error::{Error, Result};
use crate::reactor::{Readiness, Ready, Registration, Watched};
use crate::transport::assembler::Router;
use crate::transport::inproc::{Accept, InprocConn};
use crate::transport::{self, Accepted, Connection, Context, Handshake, Listener};
use crate::wire::Kind;

impl NodeInner {
    /// What transports need from this node.
    pub(crate) fn context(&self) -> Context {
        Context {
            node: self.name.clone(),
            connect_timeout: self.connect_timeout,
            pool: self.pool.clone(),
            limits: self.limits,
            router: Some(self.device_router()),
            inproc: Some(self.me.clone() as Weak<dyn Accept>),
            shm_uids: self.shm_uids.clone(),
            secret: self.secret.clone(),
            tls: self.tls.clone(),
        }
    }

    /// Starts listening on `addr`.
    pub(crate) fn listen(&self, addr: &Address, public: bool) -> Result<()> {
        let ctx = self.context();
        let listener: Arc<dyn Listener> =
            Arc::from(transport::for_address(addr).listen(addr, public, &ctx)?);
        let registration = listener.fd().map(|_| {
            self.add_watched(Arc::new(Accepting {
                node: self.me.clone(),
                listener: Arc::clone(&listener),
                ctx,
            }))
        });
        tracing::debug!(node = %self.name, address = %listener.address(), "listening");
        lock(&self.listening).push(Listening {
            listener,
            registration,
        });
        Ok(())
    }

    fn add_watched(&self, watched: Arc<dyn Watched>) -> crate::reactor::Registration {
        let reactor = lock(&self.reactor);
        match reactor.as_ref() {
            Some(r) => r.add(watched),
            // Shut down: a registration that leads nowhere.
            None => crate::reactor::Registration::detached(),
        }
    }

    /// The live connection to `addr`, made now if there is none.
    pub(crate) fn connect(&self, addr: &Address) -> Result<Arc<Peer>> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        // Looked up in place: a request pays no copy of the peer list.
        let known = lock(&self.peers)
            .iter()
            .find(|p| p.is_alive() && p.dialed.as_ref() == Some(addr))
            .cloned();
        if let Some(p) = known {
            return Ok(p);
        }
        let conn = transport::for_address(addr).connect(addr, &self.context())?;
        tracing::debug!(node = %self.name, peer = %addr, "connected");
        Ok(self.add_peer(conn, Some(addr.clone())))
    }

    /// Makes `conn` a peer: watched by an I/O thread (byte connections) or
    /// fed by the other node (inproc), then told what this node subscribes to.
    pub(crate) fn add_peer(&self, conn: Arc<dyn Connection>, dialed: Option<Address>) -> Arc<Peer> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let peer = Arc::new(Peer::new(id, Arc::clone(&conn), self.me.clone(), dialed));
        lock(&self.peers).push(Arc::clone(&peer));
        self.counters.peer_added();
        if conn.stream().is_some() {
            let registration = self.add_watched(Arc::new(Driven(Arc::clone(&peer))));
            peer.set_registration(registration);
        } else if let Some(inproc) = conn.inproc() {
            let (node, p) = (self.me.clone(), Arc::downgrade(&peer));
            let (node2, p2) = (node.clone(), p.clone());
            inproc.set_inbound(
                Arc::new(move |frame| {
                    if let (Some(node), Some(peer)) = (node.upgrade(), p.upgrade()) {
                        node.on_frame(&peer, frame, Wait::Block);
                    }
                }),
                Arc::new(move |why: &str| {
                    if let (Some(node), Some(peer)) = (node2.upgrade(), p2.upgrade()) {
                        node.lose(&peer, why);
                    }
                }),
            );
        }
        if self.is_closed() {
            self.lose(&peer, "this node shut down");
            return peer;
        }
        self.greet(&peer);
        peer
    }

    /// Tells a new peer every channel this node subscribes to.
    fn greet(&self, peer: &Arc<Peer>) {
        let channels: Vec<String> = lock(&self.subs).keys().cloned().collect();
        for channel in channels {
            self.announce(peer, &channel, Kind::Subscribe);
        }
    }

    /// Reads the tensors whose channel maps them to a device (CUDA, wgpu)
    /// straight from the socket to that device.
    fn device_router(&self) -> Router {
        let node = self.me.clone();
        Arc::new(move |plan| {
            let none = || vec![None; plan.tensors.len()];
            let direction = match plan.meta.kind {
                Kind::Message | Kind::Request => crate::delivery::Direction::Forward,
                Kind::Reply => crate::delivery::Direction::Reply,
                _ => return none(),
            };
            let Some(inner) = node.upgrade() else {
                return none();
            };
            let Ok(delivery) = inner.delivery(&plan.meta.channel, direction) else {
                return none();
            };
            if delivery.passes_host_tensors()
                && plan
                    .tensors
                    .iter()
                    .all(|t| t.device == tensorferry_device_map::Device::Cpu)
            {
                return none();
            }
            plan.tensors
                .iter()
                .map(|t| {
                    // A tensor whose target is missing is read to the host;
                    // its landing then reports the error.
                    let (target, _) = delivery.target(t.device).ok()?;
                    if target == tensorferry_device_map::Device::Cpu {
                        return None;
                    }
                    let rt = delivery.runtime_for(target).ok()?;
                    // Otherwise landing uploads it, on the receiving thread,
                    // while the I/O thread reads the next frame.
                    let len = plan.buffers.get(t.buffer).map_or(0, |r| r.len());
                    rt.overlaps_upload(len).then_some(rt)
                })
                .collect()
        })
    }
}

impl Accept for NodeInner {
    fn accept_inproc(&self, conn: Arc<InprocConn>) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        self.add_peer(conn, None);
        Ok(())
    }
}

/// A listener, as its I/O thread drives it.
struct Accepting {
    node: Weak<NodeInner>,
    listener: Arc<dyn Listener>,
    ctx: Context,
}

impl Watched for Accepting {
    fn fd(&self) -> RawFd {
        self.listener.fd().unwrap_or(-1)
    }

    fn ready(&self, _why: Readiness) -> Ready {
        let Some(node) = self.node.upgrade() else {
            return Ready::Done;
        };
        loop {
            if node.is_closed() {
                return Ready::Done;
            }
            match self.listener.accept(&self.ctx) {
                Ok(Some(Accepted::Open(conn))) => {
                    tracing::debug!(node = %node.name, peer = conn.label(), "accepted");
                    node.add_peer(conn, None);
                }
                Ok(Some(Accepted::Handshaking(shake))) => {
                    node.add_watched(Arc::new(Shaking {
                        node: self.node.clone(),
                        fd: shake.fd(),
                        deadline: shake.deadline(),
                        shake: Mutex::new(Some(shake)),
                        ctx: self.ctx.clone(),
                        registration: OnceLock::new(),
                    }));
                }
                Ok(None) => return Ready::Wait,
                Err(e) => {
                    // Out of descriptors, say: the waiting connection stays
                    // in the backlog and is tried again with the next event.
                    tracing::warn!(node = %node.name, listener = %self.listener.address(), error = %e, "accepting a connection failed");
                    return Ready::Wait;
                }
            }
        }
    }
}

/// An accepted connection still shaking hands, as its I/O thread drives it.
struct Shaking {
    node: Weak<NodeInner>,
    fd: RawFd,
    deadline: Instant,
    shake: Mutex<Option<Box<dyn Handshake>>>,
    ctx: Context,
    /// Its place on the I/O thread, to wait for writability while a
    /// handshake's flight does not fit the socket.
    registration: OnceLock<Registration>,
}

impl Watched for Shaking {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn deadline(&self) -> Option<Instant> {
        Some(self.deadline)
    }

    fn registered(&self, registration: &Registration) {
        let _ = self.registration.set(registration.clone());
    }

    fn ready(&self, _why: Readiness) -> Ready {
        let Some(node) = self.node.upgrade() else {
            return Ready::Done;
        };
        let mut slot = lock(&self.shake);
        let Some(shake) = slot.as_mut() else {
            return Ready::Done;
        };
        match shake.advance(&self.ctx) {
            Ok(Some(conn)) => {
                slot.take();
                drop(slot);
                // The connection gets a place of its own on an I/O thread;
                // this one is done.
                node.add_peer(conn, None);
                Ready::Done
            }
            Ok(None) if Instant::now() < self.deadline => {
                if let Some(r) = self.registration.get() {
                    r.want_writable(shake.wants_writable());
                }
                Ready::Wait
            }
            Ok(None) => {
                tracing::warn!(node = %node.name, waited_for = shake.stage(), "dropping a connection whose peer did not finish opening it in time");
                node.counters.rejected();
                slot.take();
                Ready::Done
            }
            Err(e) => {
                tracing::warn!(node = %node.name, error = %e, "dropping a connection that failed its handshake");
                node.counters.rejected();
                slot.take();
                Ready::Done
            }
        }
    }
}
