//! `tcp://HOST:PORT`: frames as bytes on a TCP socket, between hosts (or on
//! one). Sockets are non-blocking and watched by the node's I/O threads;
//! writes are vectored (a frame's head and its tensors' bytes leave in one
//! call, never concatenated); Nagle's delay is off and the socket buffers
//! are large.
//!
//! A node with TLS ([`tls`](super::tls)) or a shared secret
//! ([`auth`](super::auth)) opens each connection before its first frame:
//! the dialer on its own thread, within the connect timeout; the listener's
//! side (`Opening`) on its I/O thread, without blocking, within 5 s.

use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, sendmsg, MsgFlags, SockaddrStorage};

use super::auth::{self, Challenge};
use super::tls::{self, Shake, Tls, TlsLink};
use super::{
    retry, stream_connection, Accepted, ByteLink, Carry, Connection, Context, Handshake, Listener,
    Transport,
};
use crate::address::Address;
use crate::error::{Error, Result};

/// How long an accepted connection may take to open (its TLS handshake and
/// its answer to the secret's challenge, as the node has them).
const OPENING_WAIT: Duration = Duration::from_secs(5);

/// The `tcp://` transport.
pub(crate) struct Tcp;

impl Transport for Tcp {
    fn listen(&self, addr: &Address, public: bool, ctx: &Context) -> Result<Box<dyn Listener>> {
        if !public && !addr.is_local_only()? {
            return Err(Error::Invalid(format!(
                "{addr} is reachable from other hosts; bind it with listen_public (the CLI: write the address explicitly) or use 127.0.0.1"
            )));
        }
        if ctx.tls.as_ref().is_some_and(|t| !t.can_listen()) {
            return Err(Error::Invalid(format!(
                "cannot listen on {addr} with TLS: this node has no certificate; give it one and its key (TlsConfig::cert_file and key_file, the CLI's --tls-cert and --tls-key)"
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
            tls: ctx.tls.clone(),
        }))
    }

    /// Connects, then opens the connection as the node requires: the TLS
    /// handshake and the listener's word, then the secret's
    /// challenge–response, each within the connect timeout.
    fn connect(&self, addr: &Address, ctx: &Context) -> Result<Arc<dyn Connection>> {
        let (link, _) = dial(addr, ctx)?;
        Ok(stream_connection(link, ctx))
    }
}

/// Connects to `addr` and opens the link as the node requires (TLS, the
/// secret); with the deadline the connect timeout set for what follows.
fn dial(addr: &Address, ctx: &Context) -> Result<(Box<dyn ByteLink>, Instant)> {
    let sock = addr.socket_addrs()?;
    let stream = retry(addr, ctx.connect_timeout, || TcpStream::connect(&sock[..]))?;
    let deadline = Instant::now() + ctx.connect_timeout;
    let tcp = TcpLink::new(stream, addr.to_string())?;
    let link: Box<dyn ByteLink> = match &ctx.tls {
        Some(tls) => Box::new(tls.dial(tcp, addr, deadline)?),
        None => Box::new(tcp),
    };
    if let Some(secret) = &ctx.secret {
        auth::dial(&*link, secret, &addr.to_string(), deadline)?;
    }
    Ok((link, deadline))
}

/// Opens stripe `join.index` of a connection to `addr` (see
/// [`stripe`](super::stripe)): a connection opened as any other (TLS and
/// the secret, as the node has them), that sends its join record and waits
/// for the listener's word. Frames the listener sent before it read the
/// join (what it tells every new connection) are skipped.
///
/// # Errors
///
/// Connecting or opening fails, or the listener does not accept the
/// stripe within the connect timeout.
pub(crate) fn dial_stripe(
    addr: &Address,
    ctx: &Context,
    join: super::stripe::Join,
) -> Result<Arc<dyn Connection>> {
    use super::stripe::{Join, RECORD_BYTES};
    let (link, deadline) = dial(addr, ctx)?;
    let failed = |e: io::Error| Error::io(format!("opening a stripe to {addr}"), e);
    send_all(&*link, &join.join_record(), deadline).map_err(failed)?;
    let refused = |what: String| Error::Misbehaved {
        peer: addr.to_string(),
        offence: format!("answering a stripe's join: {what}"),
    };
    // At most this many frames, of at most 1 MiB each, before the word.
    for _ in 0..1024 {
        let mut rec = [0u8; RECORD_BYTES];
        recv_exact(&*link, &mut rec, deadline).map_err(failed)?;
        if rec.starts_with(&crate::wire::MAGIC) {
            let p = crate::wire::Prelude::parse(&rec, &ctx.limits, 0)?;
            if p.frame_len > 1 << 20 {
                return Err(refused(format!("a frame of {} bytes", p.frame_len)));
            }
            let mut rest = vec![0u8; (p.frame_len as usize).saturating_sub(RECORD_BYTES)];
            recv_exact(&*link, &mut rest, deadline).map_err(failed)?;
            continue;
        }
        let accepted = Join::parse_accept(&rec).map_err(refused)?;
        if accepted != join {
            return Err(refused("it accepted another stripe".into()));
        }
        return Ok(stream_connection(link, ctx));
    }
    Err(refused("no word after 1,024 frames".into()))
}

struct TcpListening {
    listener: TcpListener,
    address: Address,
    /// With a secret, every connection is challenged before its first frame.
    secret: Option<auth::Secret>,
    /// With TLS, every connection is TLS.
    tls: Option<Arc<Tls>>,
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
                let tcp = TcpLink::new(stream, label.clone()).map_err(io::Error::other)?;
                let deadline = Instant::now() + OPENING_WAIT;
                let fd = tcp.fd();
                let stage = match (&self.tls, &self.secret) {
                    (None, None) => {
                        return Ok(Some(Accepted::Open(stream_connection(Box::new(tcp), ctx))))
                    }
                    (None, Some(secret)) => {
                        Stage::Auth(Challenge::new(Box::new(tcp), secret.clone()))
                    }
                    (Some(tls), _) => Stage::Tls(tls.accept(tcp).map_err(io::Error::other)?),
                };
                Ok(Some(Accepted::Handshaking(Box::new(Opening {
                    fd,
                    stage,
                    secret: self.secret.clone(),
                    label,
                    deadline,
                    wants_write: false,
                }))))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Where an accepted connection is in its opening.
enum Stage {
    /// The TLS handshake.
    Tls(TlsLink),
    /// Telling the dialer it was accepted (inside TLS).
    Saying(TlsLink),
    /// The secret's challenge.
    Auth(Challenge),
    /// Failed, or handed on.
    Gone,
}

/// An accepted connection opening, as its I/O thread drives it without
/// blocking: its TLS handshake and the listener's word (with TLS), then
/// its answer to the secret's challenge (with a secret).
struct Opening {
    stage: Stage,
    secret: Option<auth::Secret>,
    label: String,
    fd: RawFd,
    deadline: Instant,
    wants_write: bool,
}

impl Opening {
    fn refused(&self, offence: String) -> Error {
        Error::Misbehaved {
            peer: self.label.clone(),
            offence,
        }
    }
}

impl Handshake for Opening {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn advance(&mut self, ctx: &Context) -> Result<Option<Arc<dyn Connection>>> {
        loop {
            match std::mem::replace(&mut self.stage, Stage::Gone) {
                Stage::Tls(link) => match link.shake() {
                    Ok(Shake::Done) => {
                        // rustls takes the word whole: nothing waits before it.
                        link.write_now(&[IoSlice::new(tls::ACCEPTED)])
                            .map_err(|e| Error::io(format!("writing to {}", self.label), e))?;
                        self.stage = Stage::Saying(link);
                    }
                    Ok(wait) => {
                        self.wants_write = wait == Shake::Write;
                        self.stage = Stage::Tls(link);
                        return Ok(None);
                    }
                    Err(e) => {
                        return Err(Error::Tls {
                            peer: self.label.clone(),
                            what: tls::explain_to_listener(&e),
                        })
                    }
                },
                Stage::Saying(link) => {
                    if link
                        .send_held()
                        .map_err(|e| Error::io(format!("writing to {}", self.label), e))?
                    {
                        self.wants_write = true;
                        self.stage = Stage::Saying(link);
                        return Ok(None);
                    }
                    match &self.secret {
                        Some(secret) => {
                            self.stage =
                                Stage::Auth(Challenge::new(Box::new(link), secret.clone()));
                        }
                        None => return Ok(Some(stream_connection(Box::new(link), ctx))),
                    }
                }
                Stage::Auth(mut challenge) => match challenge.advance() {
                    Ok(Some(link)) => return Ok(Some(stream_connection(link, ctx))),
                    Ok(None) => {
                        self.wants_write = challenge.wants_write();
                        self.stage = Stage::Auth(challenge);
                        return Ok(None);
                    }
                    Err(e) => return Err(self.refused(e.to_string())),
                },
                Stage::Gone => return Err(Error::Invalid("the opening is over".into())),
            }
        }
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn wants_writable(&self) -> bool {
        self.wants_write
    }

    fn stage(&self) -> &'static str {
        match self.stage {
            Stage::Tls(_) => "its TLS handshake",
            Stage::Saying(_) => "taking the listener's word",
            Stage::Auth(_) => "its answer to the secret's challenge",
            Stage::Gone => "its opening",
        }
    }
}

/// Waits until `fd` can be read (or written, with `writable`), at most
/// until `deadline`; `false` when it passed.
fn wait_fd(fd: impl AsFd, writable: bool, deadline: Instant) -> io::Result<bool> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(false);
    }
    // Rounded up: a wait never ends before the deadline, so it never spins.
    let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    let flags = if writable {
        PollFlags::POLLOUT
    } else {
        PollFlags::POLLIN
    };
    let mut fds = [PollFd::new(fd.as_fd(), flags)];
    match poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(0) => Ok(Instant::now() < deadline),
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// For a dialer opening a connection: writes all of `bytes` through
/// `link`, waiting for room, by `deadline`.
///
/// # Errors
///
/// The link's errors; `TimedOut` when the deadline passes.
pub(crate) fn send_all(link: &dyn ByteLink, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "the peer took nothing in time");
    let mut at = 0;
    while at < bytes.len() {
        match link.write_now(&[IoSlice::new(&bytes[at..])]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !link.wait_writable(deadline)? {
                    return Err(timed_out());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    while link.send_held()? {
        if !link.wait_writable(deadline)? {
            return Err(timed_out());
        }
    }
    Ok(())
}

/// For a dialer opening a connection: reads exactly `buf.len()` bytes from
/// `link` by `deadline`.
///
/// # Errors
///
/// The link's errors; `UnexpectedEof` when the peer closed first,
/// `TimedOut` when the deadline passes.
pub(crate) fn recv_exact(link: &dyn ByteLink, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match link.read_now(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !link.wait_readable(deadline)? {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nothing came in time",
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
        // Socket buffers are left to the kernel's autotuning, which grows
        // them with the connection's needs up to `tcp_rmem`/`tcp_wmem`. A
        // size set by hand turns autotuning off and is cut to
        // `rmem_max`/`wmem_max`, a few hundred KiB on many hosts: measured
        // here, 64 MiB messages moved at 0.78–1.05× a raw stream with 4 MiB
        // set and 0.96–1.25× autotuned (seven alternations).
        Ok(Self { stream, label })
    }

    /// Waits until the socket can be read (or written, with `writable`), at
    /// most until `deadline`; `false` when it passed.
    ///
    /// # Errors
    ///
    /// The wait's own errors.
    pub(crate) fn wait(&self, writable: bool, deadline: Instant) -> io::Result<bool> {
        wait_fd(&self.stream, writable, deadline)
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
        self.wait(false, deadline)
    }

    fn wait_writable(&self, deadline: Instant) -> io::Result<bool> {
        self.wait(true, deadline)
    }

    fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
