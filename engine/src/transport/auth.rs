//! Shared-secret authentication of `tcp://` peers: a challenge–response
//! with HMAC-SHA256, both ways, before the first frame.
//!
//! When a node has a secret, every tcp connection opens with:
//!
//! 1. the listener sends `TFAU` and a fresh 32-byte nonce `Ns`;
//! 2. the dialer answers `TFAU`, its own fresh nonce `Nc` and
//!    `HMAC(secret, "tensorferry client" ‖ Ns ‖ Nc)`;
//! 3. the listener checks it (a constant-time comparison) and answers
//!    `HMAC(secret, "tensorferry server" ‖ Nc ‖ Ns)`, which the dialer checks.
//!
//! A peer without the secret, with a wrong one, or replaying an answer it
//! saw (it was for another `Ns`) is dropped before any frame is read; the
//! dialer learns whether the listener knew the secret too. The secret never
//! travels. This authenticates peers; it does not encrypt what they send:
//! with [TLS](super::tls) too, the exchange runs inside TLS, after the
//! listener's word.

use std::fmt;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::tcp::{recv_exact, send_all};
use super::ByteLink;
use crate::error::{Error, Result};

/// The bytes that open each message of the handshake.
const MAGIC: &[u8; 4] = b"TFAU";
const NONCE: usize = 32;
const TAG: usize = 32;
/// The dialer's answer: magic, its nonce, its tag.
const ANSWER: usize = 4 + NONCE + TAG;
/// Fewest bytes a secret may have.
pub const MIN_SECRET_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// A node's shared secret. It prints as `Secret(…)`, never its bytes.
#[derive(Clone)]
pub struct Secret(Arc<Vec<u8>>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// A secret of these bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for fewer than [`MIN_SECRET_BYTES`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(Error::Invalid(format!(
                "a secret of {} bytes is too short to authenticate peers: use at least {MIN_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | base64 > secret`)",
                bytes.len()
            )));
        }
        Ok(Secret(Arc::new(bytes)))
    }

    /// The secret in the file at `path` (its bytes, without a trailing
    /// newline).
    ///
    /// # Errors
    ///
    /// A file that cannot be read, or a secret too short.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Secret> {
        let path = path.as_ref();
        let mut bytes = std::fs::read(path)
            .map_err(|e| Error::io_path("cannot read the secret in", path, e))?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        Secret::new(bytes)
    }

    /// The secret in the environment variable `name`.
    ///
    /// # Errors
    ///
    /// A variable that is not set, or a secret too short.
    pub fn from_env(name: &str) -> Result<Secret> {
        let value = std::env::var_os(name).ok_or_else(|| {
            Error::Invalid(format!("the environment variable {name} holds no secret"))
        })?;
        Secret::new(value.into_encoded_bytes())
    }

    fn tag(&self, role: &[u8], first: &[u8], second: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(role);
        mac.update(first);
        mac.update(second);
        mac
    }
}

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    rand::fill(&mut n);
    n
}

/// The dialer's side, on a new link (plain, or TLS once its handshake is
/// done): answers the challenge and checks the listener's proof, waiting on
/// this thread until `deadline`.
///
/// # Errors
///
/// A listener that sends no challenge (it has no secret, is not a
/// tensorferry node, or waits for a TLS handshake), that refuses the
/// answer, or whose proof is wrong.
pub(crate) fn dial(
    link: &dyn ByteLink,
    secret: &Secret,
    peer: &str,
    deadline: Instant,
) -> Result<()> {
    let failed = |what: String| Error::PeerLost {
        peer: peer.to_string(),
        reason: what,
    };
    let mut challenge = [0u8; 4 + NONCE];
    recv_exact(link, &mut challenge, deadline).map_err(|e| {
        failed(format!(
            "it sent no authentication challenge ({e}): does it have a secret? (a listener that requires TLS sends nothing either: give this node TLS too if it does)"
        ))
    })?;
    if &challenge[..4] != MAGIC {
        return Err(failed(
            "it answered without an authentication challenge: it has no secret, or is not a tensorferry node".into(),
        ));
    }
    let server_nonce = &challenge[4..];
    let client_nonce = nonce();
    let mut answer = Vec::with_capacity(ANSWER);
    answer.extend_from_slice(MAGIC);
    answer.extend_from_slice(&client_nonce);
    answer.extend_from_slice(
        &secret
            .tag(b"tensorferry client", server_nonce, &client_nonce)
            .finalize()
            .into_bytes(),
    );
    send_all(link, &answer, deadline)
        .map_err(|e| failed(format!("sending the authentication answer: {e}")))?;
    let mut proof = [0u8; TAG];
    recv_exact(link, &mut proof, deadline)
        .map_err(|_| failed("it refused this node's secret (the two secrets differ)".into()))?;
    secret
        .tag(b"tensorferry server", &client_nonce, server_nonce)
        .verify_slice(&proof)
        .map_err(|_| {
            failed("its proof of the secret is wrong: it does not know this node's secret".into())
        })?;
    Ok(())
}

/// The listener's side of one connection, driven without blocking:
/// [`advance`](Challenge::advance) sends the challenge, reads the answer as
/// it comes, checks it and sends the proof.
pub(crate) struct Challenge {
    link: Option<Box<dyn ByteLink>>,
    secret: Secret,
    nonce: [u8; NONCE],
    got: Vec<u8>,
    /// What is to be sent: the challenge, then the proof; and how much of it went.
    out: Vec<u8>,
    sent: usize,
    /// The answer was checked: once the proof is out, the link is open.
    checked: bool,
    /// The last advance stopped for room in the socket.
    wants_write: bool,
}

impl Challenge {
    /// A challenge on a new link, sent by the first
    /// [`advance`](Self::advance).
    pub(crate) fn new(link: Box<dyn ByteLink>, secret: Secret) -> Challenge {
        let nonce = nonce();
        let mut hello = Vec::with_capacity(4 + NONCE);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&nonce);
        Challenge {
            link: Some(link),
            secret,
            nonce,
            got: Vec::with_capacity(ANSWER),
            out: hello,
            sent: 0,
            checked: false,
            wants_write: false,
        }
    }

    /// Whether the last [`advance`](Self::advance) waits for room in the socket.
    pub(crate) fn wants_write(&self) -> bool {
        self.wants_write
    }

    /// Sends what waits to be sent: `Ok(true)` when all of it went.
    fn push(&mut self, link: &dyn ByteLink) -> Result<bool> {
        let failed = |e| Error::io("sending the authentication challenge or proof", e);
        while self.sent < self.out.len() {
            match link.write_now(&[IoSlice::new(&self.out[self.sent..])]) {
                Ok(0) => return Err(failed(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(!link.send_held().map_err(failed)?)
    }

    /// Goes as far as it can now: `Ok(Some(link))` once the answer is
    /// checked and the proof sent, `Ok(None)` while it waits for the peer.
    ///
    /// # Errors
    ///
    /// A peer that closed, answered with something else, or does not know
    /// the secret.
    pub(crate) fn advance(&mut self) -> Result<Option<Box<dyn ByteLink>>> {
        let Some(link) = self.link.take() else {
            return Err(Error::Invalid("the handshake is over".into()));
        };
        let outcome = self.step(&*link);
        if matches!(outcome, Ok(true)) {
            return Ok(Some(link));
        }
        self.link = Some(link);
        outcome.map(|_| None)
    }

    /// One advance on `link`: `Ok(true)` when it is open.
    fn step(&mut self, link: &dyn ByteLink) -> Result<bool> {
        self.wants_write = false;
        if !self.push(link)? {
            self.wants_write = true;
            return Ok(false);
        }
        if self.checked {
            return Ok(true);
        }
        let mut buf = [0u8; ANSWER];
        while self.got.len() < ANSWER {
            let want = ANSWER - self.got.len();
            match link.read_now(&mut buf[..want]) {
                Ok(0) => {
                    return Err(Error::Invalid(
                        "it closed the connection before answering the authentication challenge"
                            .into(),
                    ))
                }
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading the authentication answer", e)),
            }
        }
        if &self.got[..4] != MAGIC {
            return Err(Error::Invalid(
                "it did not answer the authentication challenge (does it have the secret configured?)"
                    .into(),
            ));
        }
        let client_nonce = &self.got[4..4 + NONCE];
        self.secret
            .tag(b"tensorferry client", &self.nonce, client_nonce)
            .verify_slice(&self.got[4 + NONCE..])
            .map_err(|_| {
                Error::Invalid("its answer to the authentication challenge is wrong: it does not know this node's secret".into())
            })?;
        self.out = self
            .secret
            .tag(b"tensorferry server", client_nonce, &self.nonce)
            .finalize()
            .into_bytes()
            .to_vec();
        self.sent = 0;
        self.checked = true;
        if !self.push(link)? {
            self.wants_write = true;
            return Ok(false);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tcp::TcpLink;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn pair() -> (TcpLink, TcpLink) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        let link = |s| TcpLink::new(s, "test".into()).expect("link");
        (link(a), link(b))
    }

    fn run(client: Secret, server: Secret) -> (Result<()>, Result<Option<Box<dyn ByteLink>>>) {
        let (a, b) = pair();
        let mut challenge = Challenge::new(Box::new(b), server);
        let dialer = std::thread::spawn(move || {
            dial(&a, &client, "test", Instant::now() + Duration::from_secs(5))
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let served = loop {
            match challenge.advance() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => break other,
            }
        };
        drop(challenge);
        (dialer.join().expect("dialer"), served)
    }

    #[test]
    fn the_same_secret_passes_both_ways() {
        let s = Secret::new(b"0123456789abcdef-shared".to_vec()).expect("secret");
        let (dialed, served) = run(s.clone(), s);
        assert!(dialed.is_ok(), "{dialed:?}");
        assert!(matches!(served, Ok(Some(_))), "{:?}", served.err());
    }

    #[test]
    fn a_different_secret_is_refused_on_both_sides() {
        let a = Secret::new(b"0123456789abcdef-one".to_vec()).expect("secret");
        let b = Secret::new(b"0123456789abcdef-two".to_vec()).expect("secret");
        let (dialed, served) = run(a, b);
        assert!(dialed.is_err());
        let err = served.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("does not know this node's secret"), "{err}");
    }

    #[test]
    fn a_short_secret_is_refused_and_never_printed() {
        let err = Secret::new(b"short".to_vec()).expect_err("too short");
        assert!(err.to_string().contains("at least 16"), "{err}");
        let s = Secret::new(b"a secret never printed".to_vec()).expect("secret");
        assert_eq!(format!("{s:?}"), "Secret(…)");
    }
}
