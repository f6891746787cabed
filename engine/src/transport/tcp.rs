//! `tcp://HOST:PORT`: frames as bytes on a TCP socket, between hosts (or on
//! one). Sockets are non-blocking and watched by the node's I/O threads;
//! writes are vectored (a frame's head and its tensors' bytes leave in one
//! call, never concatenated); Nagle's delay is off and the socket buffers
//! are large.

use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, sendmsg, MsgFlags, SockaddrStorage};

use std::sync::Arc;

use super::auth::{self, Challenge};
use super::{
    retry, stream_connection, Accepted, ByteLink, Carry, Connection, Context, Handshake, Listener,
    Transport,
};
use crate::address::Address;
use crate::error::{Error, Result};

/// The `tcp://` transport.
pub(crate) struct Tcp;

impl Transport for Tcp {
    fn listen(&self, addr: &Address, public: bool, ctx: &Context) -> Result<Box<dyn Listener>> {
        if !public && !addr.is_local_only()? {
            return Err(Error::Invalid(format!(
                "{addr} is reachable from other hosts; bind it with listen_public (the CLI: write the address explicitly) or use 127.0.0.1"
            )));
        }
        let sock = addr.socket_addrs()?;
        let listener =
            TcpListener::bind(&sock[..]).map_err(|e| Error::io(format!("binding {addr}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("reading the bound address", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring the listener", e))?;
        Ok(Box::new(TcpListening {
            listener,
            address: Address::Tcp(local.to_string()),
            secret: ctx.secret.clone(),
        }))
    }

    fn connect(&self, addr: &Address, ctx: &Context) -> Result<Arc<dyn Connection>> {
        let sock = addr.socket_addrs()?;
        let mut stream = retry(addr, ctx.connect_timeout, || TcpStream::connect(&sock[..]))?;
        if let Some(secret) = &ctx.secret {
            auth::dial(&mut stream, secret, &addr.to_string(), ctx.connect_timeout)?;
        }
        let link = TcpLink::new(stream, addr.to_string())?;
        Ok(stream_connection(Box::new(link), ctx))
    }
}

struct TcpListening {
    listener: TcpListener,
    address: Address,
    /// With a secret, every connection is challenged before its first frame.
    secret: Option<auth::Secret>,
}

impl Listener for TcpListening {
    fn address(&self) -> Address {
        self.address.clone()
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.listener.as_raw_fd())
    }

    fn accept(&self, ctx: &Context) -> io::Result<Option<Accepted>> {
        match self.listener.accept() {
            Ok((stream, from)) => {
                let label = format!("tcp://{from}");
                if let Some(secret) = &self.secret {
                    let challenge = Challenge::start(stream, secret.clone())?;
                    return Ok(Some(Accepted::Handshaking(Box::new(Authenticating {
                        challenge,
                        label,
                    }))));
                }
                let link = TcpLink::new(stream, label).map_err(io::Error::other)?;
                Ok(Some(Accepted::Open(stream_connection(Box::new(link), ctx))))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// An accepted connection answering its authentication challenge.
struct Authenticating {
    challenge: Challenge,
    label: String,
}

impl Handshake for Authenticating {
    fn fd(&self) -> RawFd {
        self.challenge.fd()
    }

    fn advance(&mut self, ctx: &Context) -> Result<Option<Arc<dyn Connection>>> {
        let Some(stream) = self.challenge.advance().map_err(|e| Error::Misbehaved {
            peer: self.label.clone(),
            offence: e.to_string(),
        })?
        else {
            return Ok(None);
        };
        let link = TcpLink::new(stream, self.label.clone())?;
        Ok(Some(stream_connection(Box::new(link), ctx)))
    }

    fn deadline(&self) -> Instant {
        self.challenge.deadline()
    }
}

/// One TCP connection's bytes.
pub(crate) struct TcpLink {
    stream: TcpStream,
    label: String,
}

impl TcpLink {
    /// Makes `stream` non-blocking and tunes it for throughput and latency.
    ///
    /// # Errors
    ///
    /// When the socket cannot be made non-blocking.
    pub(crate) fn new(stream: TcpStream, label: String) -> Result<Self> {
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("configuring a tcp connection", e))?;
        let _ = stream.set_nodelay(true);
        let sock = socket2::SockRef::from(&stream);
        let _ = sock.set_send_buffer_size(4 << 20);
        let _ = sock.set_recv_buffer_size(4 << 20);
        Ok(Self { stream, label })
    }
}

impl ByteLink for TcpLink {
    fn label(&self) -> &str {
        &self.label
    }

    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn wants_writable(&self) -> bool {
        true
    }

    fn carries(&self) -> Carry {
        Carry::Frames
    }

    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.stream.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
    }

    fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Never SIGPIPE: a peer that went away is an error to report.
        sendmsg::<SockaddrStorage>(
            self.stream.as_raw_fd(),
            bufs,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)
    }

    fn wait_readable(&self, deadline: Instant) -> io::Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        // Rounded up: a wait never ends before the deadline, so it never spins.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => Ok(Instant::now() < deadline),
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
