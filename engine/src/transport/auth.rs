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
//!
//! [`ListenerHandshake`] and [`DialerHandshake`] are the two sides as bytes
//! in and bytes out, with no socket; the node drives them on its `tcp://`
//! links. The listener holds at most the answer's 68 bytes, reads nothing
//! past them, and refuses an answer at its first byte that breaks `TFAU` (a
//! peer without a secret sends a frame, `TFRM…`).

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
/// Bytes of the listener's challenge: `TFAU` and its nonce.
pub const CHALLENGE_BYTES: usize = 4 + NONCE;
/// Bytes of the dialer's answer: `TFAU`, its nonce and its tag.
pub const ANSWER_BYTES: usize = 4 + NONCE + TAG;
/// Bytes of the listener's proof: its tag.
pub const PROOF_BYTES: usize = TAG;
/// Fewest bytes a secret may have.
pub const MIN_SECRET_BYTES: usize = 16;
/// What each side's tag starts with, so one side's tag never passes as the other's.
const CLIENT_ROLE: &[u8] = b"tensorferry client";
const SERVER_ROLE: &[u8] = b"tensorferry server";

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

/// The listener's side of one handshake, bytes only: the challenge it
/// sends, and what it makes of the dialer's answer as that arrives, in
/// pieces of any size. It never holds more than the answer's
/// [`ANSWER_BYTES`] and never takes a byte past them (what follows is the
/// peer's first frame); it refuses an answer as soon as its opening bytes
/// are not `TFAU`.
///
/// A node drives one per accepted `tcp://` connection; it needs no socket,
/// so the handshake can be tested (and fuzzed) on bytes alone.
///
/// # Examples
///
/// ```
/// use tensorferry_engine::auth::{DialerHandshake, Heard, ListenerHandshake};
/// use tensorferry_engine::Secret;
///
/// let secret = Secret::new(b"a secret of more than sixteen bytes".to_vec())?;
/// let mut listener = ListenerHandshake::new(secret.clone());
/// let mut dialer = DialerHandshake::new(secret);
/// let answer = dialer.answer(&listener.challenge())?;
/// // The answer may arrive in pieces; bytes after it are left alone.
/// assert_eq!(listener.receive(&answer[..10])?, (10, Heard::Incomplete));
/// let mut rest = answer[10..].to_vec();
/// rest.extend_from_slice(b"TFRM");
/// let (taken, heard) = listener.receive(&rest)?;
/// assert_eq!(taken, answer.len() - 10);
/// let Heard::Accepted(proof) = heard else { panic!("refused") };
/// dialer.check_proof(&proof)?;
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
pub struct ListenerHandshake {
    secret: Secret,
    nonce: [u8; NONCE],
    got: [u8; ANSWER_BYTES],
    len: usize,
    over: bool,
}

/// What a [`ListenerHandshake`] makes of the bytes it has taken so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// The answer is not complete: [`ListenerHandshake::wanted`] more bytes are needed.
    Incomplete,
    /// The answer is right: send this proof; the peer's frames follow.
    Accepted([u8; PROOF_BYTES]),
}

impl ListenerHandshake {
    /// A handshake with a fresh random nonce.
    pub fn new(secret: Secret) -> ListenerHandshake {
        ListenerHandshake {
            secret,
            nonce: nonce(),
            got: [0; ANSWER_BYTES],
            len: 0,
            over: false,
        }
    }

    /// The challenge to send before anything else: `TFAU` and this
    /// handshake's nonce.
    pub fn challenge(&self) -> [u8; CHALLENGE_BYTES] {
        let mut hello = [0u8; CHALLENGE_BYTES];
        hello[..4].copy_from_slice(MAGIC);
        hello[4..].copy_from_slice(&self.nonce);
        hello
    }

    /// How many more bytes the answer needs: read no more than this from
    /// the peer. 0 once the answer is decided.
    pub fn wanted(&self) -> usize {
        if self.over {
            0
        } else {
            ANSWER_BYTES - self.len
        }
    }

    /// Takes the front of `bytes`, at most [`wanted`](Self::wanted) of
    /// them, and returns how many it took and whether the answer is now
    /// complete and right. Empty `bytes` take nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when the answer does not open with `TFAU` (the
    /// peer has no secret configured, or is not a tensorferry node), when
    /// its tag is wrong (the peer does not know the secret, or replays an
    /// answer made for another challenge), and for any bytes after the
    /// answer was decided.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<(usize, Heard)> {
        if self.over {
            return Err(Error::Invalid("the handshake is over".into()));
        }
        let n = bytes.len().min(ANSWER_BYTES - self.len);
        self.got[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        let opening = self.len.min(MAGIC.len());
        if self.got[..opening] != MAGIC[..opening] {
            self.over = true;
            return Err(Error::Invalid(
                "it did not answer the authentication challenge (does it have the secret configured?)"
                    .into(),
            ));
        }
        if self.len < ANSWER_BYTES {
            return Ok((n, Heard::Incomplete));
        }
        self.over = true;
        let client_nonce = &self.got[4..4 + NONCE];
        self.secret
            .tag(CLIENT_ROLE, &self.nonce, client_nonce)
            .verify_slice(&self.got[4 + NONCE..])
            .map_err(|_| {
                Error::Invalid("its answer to the authentication challenge is wrong: it does not know this node's secret".into())
            })?;
        let proof = self
            .secret
            .tag(SERVER_ROLE, client_nonce, &self.nonce)
            .finalize()
            .into_bytes();
        Ok((n, Heard::Accepted(proof.into())))
    }
}

/// The dialer's side of one handshake, bytes only: its answer to the
/// listener's challenge, with a fresh nonce of its own, and the check of
/// the listener's proof. See [`ListenerHandshake`] for an example.
pub struct DialerHandshake {
    secret: Secret,
    nonce: [u8; NONCE],
    /// The listener's nonce, once its challenge is answered.
    answered: Option<[u8; NONCE]>,
}

impl DialerHandshake {
    /// A handshake with a fresh random nonce.
    pub fn new(secret: Secret) -> DialerHandshake {
        DialerHandshake {
            secret,
            nonce: nonce(),
            answered: None,
        }
    }

    /// The answer to the listener's challenge, which must be exactly its
    /// [`CHALLENGE_BYTES`].
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for a challenge of another length or one that
    /// does not open with `TFAU` (the listener has no secret, or is not a
    /// tensorferry node), and for a second challenge.
    pub fn answer(&mut self, challenge: &[u8]) -> Result<[u8; ANSWER_BYTES]> {
        if self.answered.is_some() {
            return Err(Error::Invalid(
                "it sent a second authentication challenge".into(),
            ));
        }
        let server_nonce: [u8; NONCE] = challenge
            .strip_prefix(MAGIC)
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| {
                Error::Invalid("it answered without an authentication challenge: it has no secret, or is not a tensorferry node".into())
            })?;
        self.answered = Some(server_nonce);
        let mut answer = [0u8; ANSWER_BYTES];
        answer[..4].copy_from_slice(MAGIC);
        answer[4..4 + NONCE].copy_from_slice(&self.nonce);
        answer[4 + NONCE..].copy_from_slice(
            &self
                .secret
                .tag(CLIENT_ROLE, &server_nonce, &self.nonce)
                .finalize()
                .into_bytes(),
        );
        Ok(answer)
    }

    /// Checks the listener's proof (its [`PROOF_BYTES`]) in constant time:
    /// `Ok` means the listener knows the secret.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] before a challenge was answered, and for a proof
    /// of another length or a wrong one.
    pub fn check_proof(&self, proof: &[u8]) -> Result<()> {
        let server_nonce = self.answered.ok_or_else(|| {
            Error::Invalid("a proof came before the authentication challenge was answered".into())
        })?;
        self.secret
            .tag(SERVER_ROLE, &self.nonce, &server_nonce)
            .verify_slice(proof)
            .map_err(|_| {
                Error::Invalid(
                    "its proof of the secret is wrong: it does not know this node's secret".into(),
                )
            })
    }
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
    let mut challenge = [0u8; CHALLENGE_BYTES];
    recv_exact(link, &mut challenge, deadline).map_err(|e| {
        failed(format!(
            "it sent no authentication challenge ({e}): does it have a secret? (a listener that requires TLS sends nothing either: give this node TLS too if it does)"
        ))
    })?;
    let mut handshake = DialerHandshake::new(secret.clone());
    let answer = handshake
        .answer(&challenge)
        .map_err(|e| failed(reason(e)))?;
    send_all(link, &answer, deadline)
        .map_err(|e| failed(format!("sending the authentication answer: {e}")))?;
    let mut proof = [0u8; PROOF_BYTES];
    recv_exact(link, &mut proof, deadline)
        .map_err(|_| failed("it refused this node's secret (the two secrets differ)".into()))?;
    handshake
        .check_proof(&proof)
        .map_err(|e| failed(reason(e)))?;
    Ok(())
}

/// What an [`Error::Invalid`] says, without its "not valid" frame.
fn reason(e: Error) -> String {
    match e {
        Error::Invalid(why) => why,
        other => other.to_string(),
    }
}

/// The listener's side of one connection, driven without blocking:
/// [`advance`](Challenge::advance) sends the challenge, reads the answer as
/// it comes, checks it and sends the proof.
pub(crate) struct Challenge {
    link: Option<Box<dyn ByteLink>>,
    handshake: ListenerHandshake,
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
        let handshake = ListenerHandshake::new(secret);
        Challenge {
            link: Some(link),
            out: handshake.challenge().to_vec(),
            handshake,
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
        let mut buf = [0u8; ANSWER_BYTES];
        let proof =
            loop {
                let want = self.handshake.wanted();
                match link.read_now(&mut buf[..want]) {
                    Ok(0) => return Err(Error::Invalid(
                        "it closed the connection before answering the authentication challenge"
                            .into(),
                    )),
                    Ok(n) => {
                        if let (_, Heard::Accepted(proof)) = self.handshake.receive(&buf[..n])? {
                            break proof;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io("reading the authentication answer", e)),
                }
            };
        self.out = proof.to_vec();
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

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes().to_vec()).expect("secret")
    }

    #[test]
    fn an_answer_in_any_pieces_is_accepted_and_what_follows_is_left() {
        let s = secret("0123456789abcdef-shared");
        let mut listener = ListenerHandshake::new(s.clone());
        let mut dialer = DialerHandshake::new(s);
        let mut stream = dialer
            .answer(&listener.challenge())
            .expect("answer")
            .to_vec();
        stream.extend_from_slice(b"TFRM and a frame");
        let mut at = 0;
        // One byte at a time, then the rest at once: the answer's end is
        // found whatever the pieces, and no frame byte is taken.
        let proof = loop {
            assert_eq!(listener.wanted(), ANSWER_BYTES - at);
            let piece = if at < 40 {
                &stream[at..at + 1]
            } else {
                &stream[at..]
            };
            let (taken, heard) = listener.receive(piece).expect("a right answer");
            at += taken;
            if let Heard::Accepted(proof) = heard {
                break proof;
            }
        };
        assert_eq!(at, ANSWER_BYTES);
        assert_eq!(listener.wanted(), 0);
        dialer.check_proof(&proof).expect("the listener's proof");
        assert!(listener.receive(b"TFRM").is_err(), "the handshake is over");
    }

    #[test]
    fn an_answer_without_the_magic_is_refused_at_its_first_wrong_byte() {
        let mut listener = ListenerHandshake::new(secret("0123456789abcdef-shared"));
        assert_eq!(
            listener.receive(b"TF").expect("so far so good"),
            (2, Heard::Incomplete)
        );
        let err = listener.receive(b"RM").expect_err("a frame, not an answer");
        assert!(err.to_string().contains("did not answer"), "{err}");
        assert_eq!(listener.wanted(), 0);
        assert!(listener.receive(&[0; ANSWER_BYTES]).is_err());
    }

    #[test]
    fn an_answer_to_another_challenge_or_with_a_changed_bit_is_refused() {
        let s = secret("0123456789abcdef-shared");
        let first = ListenerHandshake::new(s.clone());
        let answer = DialerHandshake::new(s.clone())
            .answer(&first.challenge())
            .expect("answer");
        // Replayed to a listener whose challenge was another.
        let mut second = ListenerHandshake::new(s.clone());
        let err = second.receive(&answer).expect_err("a replay");
        assert!(err.to_string().contains("does not know"), "{err}");
        // Any bit of the nonce or the tag changed.
        for bit in [4 * 8, (4 + NONCE) * 8 + 3, ANSWER_BYTES * 8 - 1] {
            let mut listener = ListenerHandshake::new(s.clone());
            let mut forged = DialerHandshake::new(s.clone())
                .answer(&listener.challenge())
                .expect("answer");
            forged[bit / 8] ^= 1 << (bit % 8);
            assert!(listener.receive(&forged).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn the_dialer_refuses_a_wrong_challenge_or_proof() {
        let s = secret("0123456789abcdef-shared");
        let listener = ListenerHandshake::new(s.clone());
        let challenge = listener.challenge();
        let mut dialer = DialerHandshake::new(s.clone());
        assert!(
            dialer.check_proof(&[0; PROOF_BYTES]).is_err(),
            "no answer yet"
        );
        let mut frame = challenge;
        frame[..4].copy_from_slice(b"TFRM");
        for wrong in [&frame[..], &challenge[..CHALLENGE_BYTES - 1], b""] {
            let err = dialer.answer(wrong).expect_err("not a challenge");
            assert!(
                err.to_string()
                    .contains("without an authentication challenge"),
                "{err}"
            );
        }
        dialer.answer(&challenge).expect("answer");
        assert!(dialer.answer(&challenge).is_err(), "a second challenge");
        // A listener with another secret answers with a proof that fails.
        let mut other = ListenerHandshake::new(secret("0123456789abcdef-other"));
        let answer = DialerHandshake::new(secret("0123456789abcdef-other"))
            .answer(&other.challenge())
            .expect("answer");
        let Ok((_, Heard::Accepted(proof))) = other.receive(&answer) else {
            panic!("the same secret passes");
        };
        let err = dialer.check_proof(&proof).expect_err("another secret");
        assert!(
            err.to_string().contains("proof of the secret is wrong"),
            "{err}"
        );
        assert!(dialer.check_proof(&proof[..PROOF_BYTES - 1]).is_err());
    }
}
