//! TLS 1.3 for `tcp://` peers (rustls, with the ring provider).
//!
//! A node given a [`TlsConfig`] speaks TLS on every tcp connection it
//! makes or accepts: the address stays `tcp://HOST:PORT`, and a peer
//! without TLS is refused (a dialer without it is told the listener speaks
//! TLS; a listener without it closes the connection, counted and logged).
//! A connection opens with:
//!
//! 1. the TLS handshake: the listener proves its certificate (signed by a CA
//!    the dialer trusts, for the name the dialer dialed, or the one it was
//!    told to expect); a listener with a client CA requires the dialer's
//!    certificate too (mutual TLS);
//! 2. the listener's word that it accepted the dialer (`TFTL`, inside TLS):
//!    with TLS 1.3 a dialer finishes its handshake before the listener has
//!    checked its certificate, and this is how a refusal reaches the dialer
//!    while it connects instead of at its first request;
//! 3. with a shared secret, the challenge–response of [`auth`](super::auth),
//!    inside TLS.
//!
//! [`TlsLink`] is the [`ByteLink`] of such a connection: the non-blocking
//! socket of a [`TcpLink`] wrapped in a rustls connection. It reads the
//! socket into a buffer of its own (16 KiB during the handshake, 256 KiB
//! after) and hands rustls the records; what a
//! writer hands it is encrypted at once and written as far as the socket
//! takes it, and records the socket had no room for wait in rustls until it
//! has ([`ByteLink::send_held`]): the connection's writer then waits for
//! writability as it does for a plain socket.

use std::io::{self, IoSlice, Read};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore,
    ServerConfig, ServerConnection,
};

use super::tcp::TcpLink;
use super::{ByteLink, Carry};
use crate::address::Address;
use crate::error::{Error, Result};

/// What a listener sends, inside TLS, once it has accepted a dialer.
pub(crate) const ACCEPTED: &[u8; 4] = b"TFTL";

/// Bytes of the socket read at once, before rustls takes them record by
/// record, once the handshake is done.
const INBOX_BYTES: usize = 256 << 10;

/// The same during the handshake: a peer that has not proven anything yet
/// makes the node hold little.
const HANDSHAKE_INBOX_BYTES: usize = 16 << 10;

/// Most bytes of TLS records a link holds for the socket: a writer hands it
/// at most this much plaintext at a time.
const HELD_BYTES: usize = 256 << 10;

/// TLS settings of a node: its certificate, the CAs it trusts, and whether
/// its listeners require dialers' certificates. Read and checked by
/// [`NodeBuilder::build`](crate::NodeBuilder::build); every tcp connection
/// of a node with TLS is TLS (1.3 only).
///
/// A listener needs a certificate and its key; a dialer needs the CA that
/// signed its listeners' certificates. Files are PEM.
///
/// # Examples
///
/// ```no_run
/// use tensorferry_engine::{Node, TlsConfig};
///
/// // A listener that requires its dialers' certificates too.
/// let listener = Node::builder()
///     .listen_public("tcp://0.0.0.0:7070")
///     .tls(TlsConfig::new()
///         .cert_file("server.crt")
///         .key_file("server.key")
///         .client_ca_file("clients-ca.crt"))
///     .build()?;
/// // A dialer that trusts the listener's CA and presents its own certificate.
/// let dialer = Node::builder()
///     .tls(TlsConfig::new()
///         .ca_file("ca.crt")
///         .cert_file("client.crt")
///         .key_file("client.key"))
///     .build()?;
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    server_name: Option<String>,
}

impl TlsConfig {
    /// No files yet: set what the node needs.
    pub fn new() -> Self {
        Self::default()
    }

    /// This node's certificate chain (PEM, its own certificate first, then
    /// any intermediates): shown by its listeners, and to a listener that
    /// requires a dialer's certificate. Needs [`key_file`](Self::key_file).
    /// Required for a node that listens on tcp.
    pub fn cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cert = Some(path.into());
        self
    }

    /// The private key of [`cert_file`](Self::cert_file)'s certificate
    /// (PEM: PKCS#8, PKCS#1 or SEC1).
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.key = Some(path.into());
        self
    }

    /// The CA certificates (PEM, one or more) a listener's certificate must
    /// be signed by for this node to dial it. Required for a node that dials
    /// over tcp; no system roots are used.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(path.into());
        self
    }

    /// Mutual TLS: this node's listeners require every dialer to present a
    /// certificate signed by a CA in this file (PEM), and refuse one
    /// without. Default: dialers are not asked for a certificate.
    pub fn client_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(path.into());
        self
    }

    /// The name a listener's certificate must hold, for every tcp address
    /// this node dials. Default: the host of the address dialed (a DNS name
    /// or an IP address). Set it when dialing by IP address a listener whose
    /// certificate names its host.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Reads the files and makes the rustls configurations.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or holds no usable PEM item, a key that
    /// does not fit its certificate, a server name that is not a DNS name
    /// or an IP address, a key without a certificate or the other way
    /// round, or a client CA without a certificate to listen with.
    pub(crate) fn load(&self) -> Result<Tls> {
        let mut provider = rustls::crypto::ring::default_provider();
        // AES-128-GCM first: the fastest of the TLS 1.3 suites on processors
        // with AES instructions; the others stay for peers that prefer them.
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let provider = Arc::new(provider);
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((certs(cert, "certificate chain")?, key_in(key)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::Invalid(
                    "TLS: a certificate without its key; give the key too (TlsConfig::key_file, the CLI's --tls-key)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::Invalid(
                    "TLS: a key without its certificate; give the certificate chain too (TlsConfig::cert_file, the CLI's --tls-cert)".into(),
                ))
            }
        };
        let server = match &identity {
            Some((chain, key)) => {
                let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| Error::Invalid(format!("TLS: {e}")))?;
                let builder = match &self.client_ca {
                    Some(path) => {
                        let roots = roots(path, "client CA")?;
                        let verifier = WebPkiClientVerifier::builder_with_provider(
                            Arc::new(roots),
                            Arc::clone(&provider),
                        )
                        .build()
                        .map_err(|e| {
                            Error::Invalid(format!(
                                "TLS: the client CA in `{}` cannot verify certificates: {e}",
                                path.display()
                            ))
                        })?;
                        builder.with_client_cert_verifier(verifier)
                    }
                    None => builder.with_no_client_auth(),
                };
                let mut config = builder
                    .with_single_cert(chain.clone(), key.clone_key())
                    .map_err(|e| self.identity_error(&e))?;
                // Sessions are not resumed: every connection proves its
                // certificates afresh, and nothing follows the handshake.
                config.send_tls13_tickets = 0;
                Some(Arc::new(config))
            }
            None if self.client_ca.is_some() => {
                return Err(Error::Invalid(
                    "TLS: a client CA is for listeners, and a listener needs its own certificate and key (TlsConfig::cert_file and key_file, the CLI's --tls-cert and --tls-key)".into(),
                ))
            }
            None => None,
        };
        let client = match &self.ca {
            Some(path) => {
                let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| Error::Invalid(format!("TLS: {e}")))?
                    .with_root_certificates(roots(path, "CA")?);
                let mut config = match identity {
                    Some((chain, key)) => builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| self.identity_error(&e))?,
                    None => builder.with_no_client_auth(),
                };
                config.resumption = Resumption::disabled();
                Some(Arc::new(config))
            }
            None => None,
        };
        let server_name = self
            .server_name
            .as_ref()
            .map(|name| {
                ServerName::try_from(name.clone()).map_err(|_| {
                    Error::Invalid(format!(
                        "TLS: the server name `{name}` is neither a DNS name nor an IP address"
                    ))
                })
            })
            .transpose()?;
        Ok(Tls {
            server,
            client,
            server_name,
        })
    }

    fn identity_error(&self, e: &rustls::Error) -> Error {
        let name =
            |p: &Option<PathBuf>| p.as_deref().map_or("?".into(), |p| p.display().to_string());
        Error::Invalid(format!(
            "TLS: the key in `{}` cannot be used with the certificate in `{}`: {e} (is it the certificate's own key?)",
            name(&self.key),
            name(&self.cert)
        ))
    }
}

/// The certificates in the PEM file at `path`.
fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |e: rustls::pki_types::pem::Error| {
        Error::Invalid(format!(
            "TLS: cannot read the {what} in `{}`: {e}",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(bad)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(bad)?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "TLS: `{}` holds no certificate; the {what} must be PEM (`-----BEGIN CERTIFICATE-----` blocks)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The private key in the PEM file at `path`.
fn key_in(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::Invalid(format!(
            "TLS: cannot read a private key in `{}`: {e} (a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)",
            path.display()
        ))
    })
}

/// The trust roots in the PEM file at `path`.
fn roots(path: &Path, what: &str) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in certs(path, what)? {
        store.add(cert).map_err(|e| {
            Error::Invalid(format!(
                "TLS: a certificate in the {what} file `{}` cannot be a trust root: {e}",
                path.display()
            ))
        })?;
    }
    Ok(store)
}

/// A node's TLS, ready to use: what [`TlsConfig::load`] made.
pub(crate) struct Tls {
    server: Option<Arc<ServerConfig>>,
    client: Option<Arc<ClientConfig>>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("listens", &self.server.is_some())
            .field("dials", &self.client.is_some())
            .finish()
    }
}

impl Tls {
    /// Whether the node can listen: it has a certificate and its key.
    pub(crate) fn can_listen(&self) -> bool {
        self.server.is_some()
    }

    /// The listener's side of a new connection, its handshake to be driven
    /// with [`TlsLink::shake`].
    ///
    /// # Errors
    ///
    /// When the node has no certificate (checked when it was built).
    pub(crate) fn accept(&self, tcp: TcpLink) -> Result<TlsLink> {
        let config = self.server.as_ref().ok_or_else(|| {
            Error::Invalid("TLS: this node has no certificate to listen with (TlsConfig::cert_file and key_file, the CLI's --tls-cert and --tls-key)".into())
        })?;
        let conn = ServerConnection::new(Arc::clone(config))
            .map_err(|e| Error::Invalid(format!("TLS: {e}")))?;
        Ok(TlsLink::new(tcp, rustls::Connection::Server(conn)))
    }

    /// The dialer's side: the handshake, then the listener's word, waited
    /// for on this thread until `deadline`.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] saying what failed and what to change: a certificate
    /// that does not verify, a listener without TLS or one that refused
    /// this node's certificate; [`Error::Invalid`] for a node with no CA.
    pub(crate) fn dial(&self, tcp: TcpLink, addr: &Address, deadline: Instant) -> Result<TlsLink> {
        let peer = addr.to_string();
        let config = self.client.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "TLS: this node has no CA to verify {peer} with; give it the CA that signed the listener's certificate (TlsConfig::ca_file, the CLI's --tls-ca)"
            ))
        })?;
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => host_name(addr)?,
        };
        let conn = ClientConnection::new(Arc::clone(config), name)
            .map_err(|e| Error::Invalid(format!("TLS: {e}")))?;
        let link = TlsLink::new(tcp, rustls::Connection::Client(conn));
        let failed = |what: String| Error::Tls {
            peer: peer.clone(),
            what,
        };
        let budget = deadline.saturating_duration_since(Instant::now());
        let timed_out = || {
            failed(format!(
                "the listener did not finish the TLS handshake within {} ms: does it speak TLS?",
                budget.as_millis()
            ))
        };
        loop {
            let ready = match link.shake() {
                Ok(Shake::Done) => break,
                Ok(Shake::Read) => link.wait_readable(deadline),
                Ok(Shake::Write) => link.wait_writable(deadline),
                Err(e) => return Err(failed(explain_to_dialer(&e))),
            };
            match ready {
                Ok(true) => {}
                Ok(false) => return Err(timed_out()),
                Err(e) => return Err(Error::io(format!("TLS handshake with {peer}"), e)),
            }
        }
        let mut word = [0u8; ACCEPTED.len()];
        super::tcp::recv_exact(&link, &mut word, deadline).map_err(|e| {
            if e.kind() == io::ErrorKind::TimedOut {
                failed("the listener did not say whether it accepted this node after the TLS handshake: is it a tensorferry node?".into())
            } else {
                failed(explain_to_dialer(&e))
            }
        })?;
        if &word != ACCEPTED {
            return Err(failed(
                "it sent something else than a tensorferry listener after the TLS handshake".into(),
            ));
        }
        Ok(link)
    }
}

/// The name to verify a listener's certificate against: the host of `addr`.
fn host_name(addr: &Address) -> Result<ServerName<'static>> {
    let Address::Tcp(hp) = addr else {
        return Err(Error::Invalid(format!(
            "TLS is for tcp:// addresses, not {addr}"
        )));
    };
    let host = hp.rsplit_once(':').map_or(hp.as_str(), |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| {
        Error::Invalid(format!(
            "TLS: `{host}` (from {addr}) is neither a DNS name nor an IP address to verify a certificate against; set the name to verify (TlsConfig::server_name, the CLI's --tls-server-name)"
        ))
    })
}

/// How far a handshake got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shake {
    /// It is over: the link carries application bytes.
    Done,
    /// It waits for the peer's bytes.
    Read,
    /// It waits for room in the socket.
    Write,
}

/// A rustls connection and the socket bytes it has not taken yet.
struct State {
    conn: rustls::Connection,
    inbox: Box<[u8]>,
    /// The bytes of `inbox` rustls has not taken: `inbox[start..end]`.
    start: usize,
    end: usize,
}

/// One TLS connection's bytes; see the [module docs](self).
pub(crate) struct TlsLink {
    tcp: TcpLink,
    state: Mutex<State>,
    /// Plaintext, or socket bytes rustls has not taken, wait inside the
    /// link: the socket will not report them.
    buffered: AtomicBool,
}

/// The socket, as rustls writes to it.
struct Socket<'a>(&'a TcpLink);

impl io::Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_now(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_now(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsLink {
    fn new(tcp: TcpLink, mut conn: rustls::Connection) -> Self {
        conn.set_buffer_limit(Some(HELD_BYTES));
        Self {
            tcp,
            state: Mutex::new(State {
                conn,
                inbox: vec![0; HANDSHAKE_INBOX_BYTES].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            buffered: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drives the handshake as far as it goes now, without blocking.
    ///
    /// # Errors
    ///
    /// The socket's errors, a peer that closed, or a TLS failure
    /// (`InvalidData`, carrying the [`rustls::Error`]: see
    /// [`explain_to_dialer`] and [`explain_to_listener`]).
    pub(crate) fn shake(&self) -> io::Result<Shake> {
        let mut st = self.lock();
        loop {
            if self.write_held(&mut st)? {
                return Ok(Shake::Write);
            }
            if !st.conn.is_handshaking() {
                if st.inbox.len() < INBOX_BYTES {
                    // The handshake is done: room for bulk reads, keeping
                    // what rustls has not taken yet.
                    let mut inbox = vec![0; INBOX_BYTES].into_boxed_slice();
                    let rest = st.end - st.start;
                    inbox[..rest].copy_from_slice(&st.inbox[st.start..st.end]);
                    (st.inbox, st.start, st.end) = (inbox, 0, rest);
                }
                self.note_buffered(&mut st);
                return Ok(Shake::Done);
            }
            if self.feed(&mut st)? {
                continue;
            }
            match self.tcp.read_now(&mut st.inbox) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ))
                }
                Ok(n) => (st.start, st.end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Shake::Read),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Hands rustls the socket bytes it has not taken, and has it decrypt
    /// them: `Ok(false)` when there were none.
    fn feed(&self, st: &mut State) -> io::Result<bool> {
        let State {
            conn,
            inbox,
            start,
            end,
        } = st;
        if start == end {
            return Ok(false);
        }
        let mut rest: &[u8] = &inbox[*start..*end];
        let n = conn.read_tls(&mut rest)?;
        if n == 0 {
            // The peer closed TLS (close_notify): nothing after it counts.
            *start = *end;
            return Ok(true);
        }
        *start += n;
        if let Err(e) = conn.process_new_packets() {
            // The alert that tells the peer why goes if the socket takes it.
            let _ = conn.write_tls(&mut Socket(&self.tcp));
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(true)
    }

    /// Writes the TLS records rustls holds as far as the socket takes them:
    /// `Ok(true)` when some still wait for room.
    fn write_held(&self, st: &mut State) -> io::Result<bool> {
        while st.conn.wants_write() {
            match st.conn.write_tls(&mut Socket(&self.tcp)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Records whether bytes wait inside the link that the socket will not
    /// report.
    fn note_buffered(&self, st: &mut State) {
        let plaintext = st
            .conn
            .process_new_packets()
            .is_ok_and(|s| s.plaintext_bytes_to_read() > 0);
        self.buffered
            .store(plaintext || st.start < st.end, Ordering::Release);
    }
}

impl ByteLink for TlsLink {
    fn label(&self) -> &str {
        self.tcp.label()
    }

    fn fd(&self) -> RawFd {
        self.tcp.fd()
    }

    fn wants_writable(&self) -> bool {
        true
    }

    fn carries(&self) -> Carry {
        Carry::Frames
    }

    /// Fills `buf` with plaintext until it is full or the socket has
    /// nothing more: a short read means the socket was drained, as it does
    /// for a plain socket.
    fn read_now(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        let mut ended = false;
        let mut st = self.lock();
        while filled < buf.len() {
            match st.conn.reader().read(&mut buf[filled..]) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => {
                    filled += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket closed without a TLS close_notify: tensorferry
                // peers close that way, and frames carry their own lengths
                // (one cut short is reported as such).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    ended = true;
                    break;
                }
                Err(e) => return Err(e),
            }
            if self.feed(&mut st)? {
                continue;
            }
            match self.tcp.read_now(&mut st.inbox) {
                Ok(0) => {
                    // Tells rustls the socket ended: its reader says so next.
                    st.conn.read_tls(&mut io::empty())?;
                }
                Ok(n) => {
                    (st.start, st.end) = (0, n);
                    // A writer of this connection may go between two reads.
                    drop(st);
                    st = self.lock();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.note_buffered(&mut st);
        if filled > 0 || ended {
            Ok(filled)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// Takes what rustls holds room for (at most 256 KiB of records wait at
    /// once), after writing the records that waited: `WouldBlock` while
    /// those do not fit.
    fn write_now(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut st = self.lock();
        if self.write_held(&mut st)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = io::Write::write_vectored(&mut st.conn.writer(), bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.write_held(&mut st)?;
        Ok(n)
    }

    fn send_held(&self) -> io::Result<bool> {
        let mut st = self.lock();
        self.write_held(&mut st)
    }

    fn holds_output(&self) -> bool {
        self.lock().conn.wants_write()
    }

    fn idle_read(&self) -> bool {
        self.buffered.load(Ordering::Acquire)
    }

    fn has_input(&self) -> bool {
        self.buffered.load(Ordering::Acquire)
    }

    fn wait_readable(&self, deadline: Instant) -> io::Result<bool> {
        if self.buffered.load(Ordering::Acquire) {
            return Ok(true);
        }
        self.tcp.wait_readable(deadline)
    }

    fn wait_writable(&self, deadline: Instant) -> io::Result<bool> {
        self.tcp.wait(true, deadline)
    }

    /// Says goodbye (a TLS close_notify, if the socket takes it), then ends
    /// the socket both ways.
    fn shutdown(&self) {
        {
            let mut st = self.lock();
            st.conn.send_close_notify();
            let _ = self.write_held(&mut st);
        }
        self.tcp.shutdown();
    }
}

/// The TLS failure an I/O error carries, if it does.
fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// What a dialer is told when opening a TLS connection failed, and what to
/// change.
pub(crate) fn explain_to_dialer(e: &io::Error) -> String {
    let Some(tls) = tls_error(e) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => format!(
                "it closed the connection during the TLS handshake ({e}): a listener without TLS does so (configure TLS on it too), and so does one that refused this node's certificate"
            ),
            _ => format!("the TLS handshake failed: {e}"),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "its certificate is not signed by a CA this node trusts: give this node the CA that signed it (TlsConfig::ca_file, the CLI's --tls-ca)".into(),
            CertificateError::NotValidForName => "its certificate is not valid for the name dialed: dial a name the certificate holds, or set the name to verify (TlsConfig::server_name, the CLI's --tls-server-name)".into(),
            CertificateError::NotValidForNameContext { expected, presented } => format!(
                "its certificate is not valid for `{}` (it holds {}): dial a name the certificate holds, or set the name to verify (TlsConfig::server_name, the CLI's --tls-server-name)",
                expected.to_str(),
                if presented.is_empty() { "no name".to_string() } else { presented.join(", ") }
            ),
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => format!(
                "its certificate is outside its validity period ({cert:?}): renew it, or check both hosts' clocks"
            ),
            other => format!("its certificate is not valid: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => "the listener requires a client certificate: give this node a certificate signed by a CA the listener trusts, and its key (TlsConfig::cert_file and key_file, the CLI's --tls-cert and --tls-key)".into(),
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied => format!(
                "the listener refused this node's certificate ({alert:?}): it must be signed by a CA the listener trusts for clients, and valid now"
            ),
            other => format!("the listener refused the TLS handshake ({other:?}): does it speak TLS 1.3 with a certificate?"),
        },
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => format!(
            "it does not speak TLS (it answered with something else than a TLS handshake: {tls}): configure TLS on the listener too, or dial it from a node without TLS"
        ),
        other => format!("the TLS handshake failed: {other}"),
    }
}

/// What a listener logs when a dialer failed to open a TLS connection.
pub(crate) fn explain_to_listener(e: &io::Error) -> String {
    let Some(tls) = tls_error(e) else {
        return format!("the TLS handshake failed: {e}");
    };
    match tls {
        rustls::Error::NoCertificatesPresented => {
            "it presented no client certificate, and this listener requires one".into()
        }
        rustls::Error::InvalidCertificate(cert) => {
            format!("its client certificate is not valid: {cert:?}")
        }
        rustls::Error::AlertReceived(alert) => format!(
            "it refused this node's certificate or the handshake ({alert:?}): does it trust the CA that signed this node's certificate, for the name it dialed?"
        ),
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => format!(
            "it does not speak TLS ({tls}): a node without TLS, or another protocol"
        ),
        other => format!("the TLS handshake failed: {other}"),
    }
}
