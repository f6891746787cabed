//! `inproc://NAME`: nodes in one process. A message is handed over by
//! reference — its tensors' buffers are shared, never copied — on the
//! sender's thread, straight into the receiving node's read path; no
//! thread, socket or byte is involved.
//!
//! A connection is a pair of [`InprocConn`]s, one per node, each the
//! other's *twin*: sending on one runs the twin's inbound handler, which
//! the node at that end installs when it takes the connection. Frames sent
//! before a handler is installed wait for it, in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::{Carry, Connection, Context, Flow, Listener, Outgoing, ReadStop, Transport};
use crate::address::Address;
use crate::error::{Error, Result};
use crate::wire::Frame;

/// The `inproc://` transport.
pub(crate) struct Inproc;

/// A node, as far as in-process connections to it need it.
pub(crate) trait Accept: Send + Sync {
    /// Takes the listening end of a new connection (installs its handler).
    ///
    /// # Errors
    ///
    /// When the node is shutting down.
    fn accept_inproc(&self, conn: Arc<InprocConn>) -> Result<()>;
}

/// What runs a frame that arrived on one end of a connection.
pub(crate) type Inbound = Arc<dyn Fn(Frame) + Send + Sync>;

/// What runs when the other end closed (with why).
pub(crate) type Lost = Arc<dyn Fn(&str) + Send + Sync>;

fn registry() -> &'static Mutex<HashMap<String, Weak<dyn Accept>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<dyn Accept>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl Transport for Inproc {
    fn listen(&self, addr: &Address, _public: bool, ctx: &Context) -> Result<Box<dyn Listener>> {
        let Address::Inproc(name) = addr else {
            return Err(Error::Invalid(format!(
                "{addr} is not an inproc:// address"
            )));
        };
        let node = ctx
            .inproc
            .clone()
            .ok_or_else(|| Error::Invalid(format!("{addr}: only a node can listen in process")))?;
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        if reg.get(name).is_some_and(|w| w.strong_count() > 0) {
            return Err(Error::Invalid(format!(
                "{addr} is already taken in this process"
            )));
        }
        reg.insert(name.clone(), node);
        Ok(Box::new(InprocListening {
            address: addr.clone(),
        }))
    }

    fn connect(&self, addr: &Address, ctx: &Context) -> Result<Arc<dyn Connection>> {
        let Address::Inproc(name) = addr else {
            return Err(Error::Invalid(format!(
                "{addr} is not an inproc:// address"
            )));
        };
        let remote = registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::Invalid(format!("nothing listens on {addr} in this process")))?;
        let (here, there) = InprocConn::pair(addr.to_string(), format!("inproc peer {}", ctx.node));
        remote.accept_inproc(there)?;
        Ok(here)
    }
}

/// The name of an inproc listener; dropping it frees the name.
struct InprocListening {
    address: Address,
}

impl Listener for InprocListening {
    fn address(&self) -> Address {
        self.address.clone()
    }

    fn fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    fn accept(&self, _ctx: &Context) -> std::io::Result<Option<super::Accepted>> {
        Ok(None)
    }
}

impl Drop for InprocListening {
    fn drop(&mut self) {
        if let Address::Inproc(name) = &self.address {
            registry()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
        }
    }
}

/// One end of an in-process connection.
pub(crate) struct InprocConn {
    label: String,
    twin: OnceLock<Weak<InprocConn>>,
    state: Mutex<InboundState>,
}

struct InboundState {
    handler: Option<Inbound>,
    lost: Option<Lost>,
    /// Frames that came before the handler.
    waiting: Vec<Frame>,
    closed: bool,
}

impl InprocConn {
    /// Both ends of a new connection: `(dialing end, listening end)`.
    fn pair(here: String, there: String) -> (Arc<InprocConn>, Arc<InprocConn>) {
        let make = |label| {
            Arc::new(InprocConn {
                label,
                twin: OnceLock::new(),
                state: Mutex::new(InboundState {
                    handler: None,
                    lost: None,
                    waiting: Vec::new(),
                    closed: false,
                }),
            })
        };
        let (a, b) = (make(here), make(there));
        let _ = a.twin.set(Arc::downgrade(&b));
        let _ = b.twin.set(Arc::downgrade(&a));
        (a, b)
    }

    /// Installs what runs the frames that arrive on this end (and runs
    /// those that came before it), and what runs when the other end closes.
    pub(crate) fn set_inbound(&self, handler: Inbound, lost: Lost) {
        let waiting = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.handler = Some(Arc::clone(&handler));
            s.lost = Some(lost);
            std::mem::take(&mut s.waiting)
        };
        for frame in waiting {
            handler(frame);
        }
    }

    /// Runs a frame sent by the twin.
    fn arrive(&self, frame: Frame) -> std::result::Result<(), String> {
        let handler = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.closed {
                return Err(format!("{} is closed", self.label));
            }
            match &s.handler {
                Some(h) => Arc::clone(h),
                None => {
                    s.waiting.push(frame);
                    return Ok(());
                }
            }
        };
        handler(frame);
        Ok(())
    }

    fn twin(&self) -> Option<Arc<InprocConn>> {
        self.twin.get().and_then(Weak::upgrade)
    }
}

impl Connection for InprocConn {
    fn label(&self) -> &str {
        &self.label
    }

    fn carries(&self) -> Carry {
        Carry::Messages
    }

    fn send(
        &self,
        item: Outgoing,
        _lane: Option<Arc<super::Lane>>,
    ) -> std::result::Result<(), String> {
        let Outgoing::Message { meta, message } = item else {
            return Err("an in-process connection carries messages, not frames".into());
        };
        let twin = self
            .twin()
            .ok_or_else(|| "the other node is gone".to_string())?;
        twin.arrive(Frame {
            meta,
            message,
            tensors: Vec::new(),
            frame_len: 0,
        })
    }

    fn read(&self, _on_frame: &mut dyn FnMut(Frame) -> Flow, _how: super::Reading) -> ReadStop {
        // Frames are handed over by the sender, never read.
        ReadStop::Idle
    }

    fn inproc(&self) -> Option<&InprocConn> {
        Some(self)
    }

    /// Closes this end and tells the other end's node.
    fn close(&self, why: &str) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.closed {
                return;
            }
            s.closed = true;
        }
        let Some(twin) = self.twin() else { return };
        let lost = {
            let mut s = twin.state.lock().unwrap_or_else(|p| p.into_inner());
            s.closed = true;
            s.lost.take()
        };
        if let Some(lost) = lost {
            lost(why);
        }
    }
}
