//! The `handshake` target: arbitrary bytes into either side of the `tcp://`
//! authentication handshake (`tensorferry_engine::auth`), checked against
//! the protocol as the `auth` module documents it, with HMAC-SHA256
//! computed here apart from the engine.
//!
//! An input is one byte of [`Mode`], then what the side reads:
//!
//! - listener side: one byte `k` (modulo 16), `k` piece lengths (one byte
//!   each), then the bytes the dialer sends. The bytes are handed over in
//!   pieces of those lengths, in turn (a length of 0 hands over nothing),
//!   as a socket might deliver them.
//! - dialer side: one byte `c` (modulo 80), the `c` bytes of the challenge,
//!   then the listener's proof: every byte left.
//!
//! A peer that does not know the secret cannot forge a tag, and neither can
//! a fuzzer: in the modes that sign, the target puts the right tag (or the
//! dialer's whole answer) in place and the input's bytes are XORed onto it,
//! so all-zero bytes give a right answer and any other byte a wrong one.
//! The fuzzer thereby reaches acceptance as easily as refusal, and the
//! checks can say which must happen.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tensorferry_engine::auth::{
    DialerHandshake, Heard, ListenerHandshake, ANSWER_BYTES, CHALLENGE_BYTES, PROOF_BYTES,
};
use tensorferry_engine::Secret;

/// The bytes both sides' messages open with.
const MAGIC: &[u8; 4] = b"TFAU";
const NONCE: usize = 32;

/// A secret shorter than SHA-256's 64-byte block, and one longer (HMAC
/// hashes a key longer than a block first).
const SHORT_SECRET: &[u8] = b"sixteen bytes!!!";
const LONG_SECRET: &[u8] =
    b"a secret that is longer than one block of SHA-256, which HMAC first hashes down to 32 bytes";

/// How the first byte of an input is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u8);

impl Mode {
    /// Bit 0: the dialer's side (else the listener's).
    pub const DIALER: u8 = 1;
    /// Bit 1: XOR the input onto the right tag (listener: the answer's,
    /// for the nonce the answer carries; dialer: the proof, which keeps
    /// the input's length).
    pub const SIGN: u8 = 2;
    /// Bit 2 (listener): XOR the input's first 68 bytes onto the answer a
    /// `DialerHandshake` makes for the challenge; the rest follows as is.
    pub const DIALER_ANSWER: u8 = 4;
    /// Bit 3: the long secret (else the short one).
    pub const LONG_SECRET: u8 = 8;
    /// Bit 4 (with `DIALER_ANSWER`): the dialer holds the other secret.
    pub const OTHER_SECRET: u8 = 16;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

/// How a run ended, for tests and seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The answer (listener) or the proof (dialer) was right.
    Accepted,
    /// It was refused.
    Refused,
    /// The listener needs more bytes than the input holds.
    Incomplete,
}

fn secret_bytes(long: bool) -> &'static [u8] {
    if long {
        LONG_SECRET
    } else {
        SHORT_SECRET
    }
}

fn secret(long: bool) -> Secret {
    Secret::new(secret_bytes(long).to_vec()).expect("both secrets are long enough")
}

/// HMAC-SHA256 of `key` over `role ‖ first ‖ second`: the protocol's tag,
/// written here apart from the engine's.
fn tag(key: &[u8], role: &[u8], first: &[u8], second: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(role);
    mac.update(first);
    mac.update(second);
    mac.finalize().into_bytes().into()
}

fn xor_onto(target: &mut [u8], mask: &[u8]) {
    for (t, m) in target.iter_mut().zip(mask) {
        *t ^= m;
    }
}

/// Runs one input on the side its first byte names and checks the result.
///
/// # Panics
///
/// When that side accepts what it must refuse, refuses what it must
/// accept, takes a byte past the answer, decides at the wrong byte, or
/// answers wrongly.
pub fn run(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::Incomplete;
    };
    let mode = Mode(mode);
    if mode.has(Mode::DIALER) {
        dialer(mode, rest)
    } else {
        listener(mode, rest)
    }
}

/// The listener's side: pieces of a dialer's bytes into `ListenerHandshake`.
fn listener(mode: Mode, data: &[u8]) -> Outcome {
    let (pieces, sent) = match data.split_first() {
        Some((&k, rest)) => {
            let k = usize::from(k % 16).min(rest.len());
            (&rest[..k], &rest[k..])
        }
        None => (&[][..], &[][..]),
    };
    let key = secret_bytes(mode.has(Mode::LONG_SECRET));
    let mut handshake = ListenerHandshake::new(secret(mode.has(Mode::LONG_SECRET)));
    let challenge = handshake.challenge();
    assert_eq!(challenge.len(), CHALLENGE_BYTES);
    assert_eq!(&challenge[..4], MAGIC, "the challenge opens with TFAU");
    let server_nonce = &challenge[4..];

    // What the dialer sends.
    let mut stream = sent.to_vec();
    if mode.has(Mode::DIALER_ANSWER) {
        let other = mode.has(Mode::OTHER_SECRET) != mode.has(Mode::LONG_SECRET);
        let mut dialer = DialerHandshake::new(secret(other));
        let mut answer = dialer
            .answer(&challenge)
            .expect("a dialer answers the listener's challenge")
            .to_vec();
        xor_onto(&mut answer, sent);
        answer.extend_from_slice(sent.get(ANSWER_BYTES..).unwrap_or_default());
        stream = answer;
    } else if mode.has(Mode::SIGN) && stream.len() > 4 + NONCE {
        let right = tag(
            key,
            b"tensorferry client",
            server_nonce,
            &stream[4..4 + NONCE],
        );
        let end = stream.len().min(ANSWER_BYTES);
        let mut signed = right[..end - 4 - NONCE].to_vec();
        xor_onto(&mut signed, &stream[4 + NONCE..end]);
        stream[4 + NONCE..end].copy_from_slice(&signed);
    }

    // What must happen, from the protocol alone: a refusal at the first
    // byte that breaks `TFAU`; else nothing before 68 bytes; at 68, the
    // answer is right exactly when its tag is the HMAC for this challenge
    // and the nonce it carries.
    let wrong_opening = stream.iter().zip(MAGIC).position(|(got, want)| got != want);
    let right_tag = (stream.len() >= ANSWER_BYTES).then(|| {
        tag(
            key,
            b"tensorferry client",
            server_nonce,
            &stream[4..4 + NONCE],
        )
    });
    let accept =
        wrong_opening.is_none() && right_tag.is_some_and(|t| stream[4 + NONCE..ANSWER_BYTES] == t);

    let mut taken = 0;
    let mut turn = 0;
    let mut idle = 0;
    let outcome = loop {
        let wanted = handshake.wanted();
        assert_eq!(wanted, ANSWER_BYTES - taken, "bytes still wanted");
        if taken == stream.len() {
            break Outcome::Incomplete;
        }
        // Pieces of the given lengths in turn; with none, all at once.
        let len = match pieces.get(turn % pieces.len().max(1)) {
            Some(&l) => usize::from(l),
            None => stream.len(),
        };
        turn += 1;
        // Pieces of length 0 only would never finish.
        idle = if len == 0 { idle + 1 } else { 0 };
        if idle > pieces.len() {
            break Outcome::Incomplete;
        }
        let piece = &stream[taken..stream.len().min(taken + len)];
        match handshake.receive(piece) {
            Ok((n, heard)) => {
                assert_eq!(n, piece.len().min(wanted), "bytes taken of a piece");
                taken += n;
                assert!(taken <= ANSWER_BYTES, "a byte past the answer was taken");
                if let Some(i) = wrong_opening {
                    assert!(taken <= i, "byte {i} breaks TFAU but was taken");
                }
                match heard {
                    Heard::Incomplete => {
                        assert!(taken < ANSWER_BYTES, "a whole answer is undecided")
                    }
                    Heard::Accepted(proof) => {
                        assert!(accept, "a wrong answer was accepted: {stream:02x?}");
                        assert_eq!(taken, ANSWER_BYTES, "accepted before the answer's end");
                        let right = tag(
                            key,
                            b"tensorferry server",
                            &stream[4..4 + NONCE],
                            server_nonce,
                        );
                        assert_eq!(proof, right, "the listener's proof");
                        break Outcome::Accepted;
                    }
                }
            }
            Err(_) => {
                assert!(!accept, "a right answer was refused: {stream:02x?}");
                let end = taken + piece.len().min(wanted);
                match wrong_opening {
                    // Refused in the piece that holds the first wrong byte.
                    Some(i) => assert!(
                        (taken..end).contains(&i),
                        "byte {i} breaks TFAU, refused with bytes {taken}..{end}"
                    ),
                    None => assert_eq!(end, ANSWER_BYTES, "refused before the answer's end"),
                }
                break Outcome::Refused;
            }
        }
    };
    if outcome != Outcome::Incomplete {
        assert_eq!(handshake.wanted(), 0, "a decided handshake wants nothing");
        assert!(
            handshake.receive(b"TFAU").is_err(),
            "a decided handshake takes no more"
        );
    }
    outcome
}

/// The dialer's side: a listener's challenge and proof into `DialerHandshake`.
fn dialer(mode: Mode, data: &[u8]) -> Outcome {
    let (challenge, proof) = match data.split_first() {
        Some((&c, rest)) => rest.split_at(usize::from(c % 80).min(rest.len())),
        None => (&[][..], &[][..]),
    };
    let key = secret_bytes(mode.has(Mode::LONG_SECRET));
    let mut handshake = DialerHandshake::new(secret(mode.has(Mode::LONG_SECRET)));
    assert!(
        handshake.check_proof(proof).is_err(),
        "a proof before any challenge was accepted"
    );
    let is_challenge = challenge.len() == CHALLENGE_BYTES && challenge.starts_with(MAGIC);
    let answer = match handshake.answer(challenge) {
        Ok(answer) => answer,
        Err(_) => {
            assert!(!is_challenge, "a challenge was refused: {challenge:02x?}");
            return Outcome::Refused;
        }
    };
    assert!(is_challenge, "answered a non-challenge: {challenge:02x?}");
    assert_eq!(&answer[..4], MAGIC, "the answer opens with TFAU");
    let server_nonce = &challenge[4..];
    let client_nonce = &answer[4..4 + NONCE];
    assert_eq!(
        answer[4 + NONCE..],
        tag(key, b"tensorferry client", server_nonce, client_nonce),
        "the dialer's tag"
    );
    assert!(
        handshake.answer(challenge).is_err(),
        "a second challenge was answered"
    );

    let right = tag(key, b"tensorferry server", client_nonce, server_nonce);
    let mut proof = proof.to_vec();
    if mode.has(Mode::SIGN) {
        // As long as the input: shorter or longer ones stay wrong.
        let n = proof.len().min(PROOF_BYTES);
        let mut signed = right[..n].to_vec();
        xor_onto(&mut signed, &proof);
        signed.extend_from_slice(&proof[n..]);
        proof = signed;
    }
    let accept = proof == right;
    match handshake.check_proof(&proof) {
        Ok(()) => {
            assert!(accept, "a wrong proof was accepted: {proof:02x?}");
            Outcome::Accepted
        }
        Err(_) => {
            assert!(!accept, "the right proof was refused");
            Outcome::Refused
        }
    }
}

/// An input for `run`: the listener's side, the dialer's bytes in `pieces`.
pub fn listener_input(mode: u8, pieces: &[u8], sent: &[u8]) -> Vec<u8> {
    assert!(pieces.len() < 16, "at most 15 piece lengths");
    let mut out = vec![mode & !Mode::DIALER, pieces.len() as u8];
    out.extend_from_slice(pieces);
    out.extend_from_slice(sent);
    out
}

/// An input for `run`: the dialer's side, with this challenge and proof.
pub fn dialer_input(mode: u8, challenge: &[u8], proof: &[u8]) -> Vec<u8> {
    assert!(challenge.len() < 80, "a challenge of at most 79 bytes");
    let mut out = vec![mode | Mode::DIALER, challenge.len() as u8];
    out.extend_from_slice(challenge);
    out.extend_from_slice(proof);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_shape(nonce: u8, mask: u8) -> Vec<u8> {
        let mut a = MAGIC.to_vec();
        a.extend_from_slice(&[nonce; NONCE]);
        a.extend_from_slice(&[mask; 32]);
        a
    }

    #[test]
    fn a_signed_answer_without_a_mask_is_accepted_and_any_other_refused() {
        for long in [0, Mode::LONG_SECRET] {
            let sign = Mode::SIGN | long;
            assert_eq!(
                run(&listener_input(sign, &[1, 7, 0, 30], &answer_shape(5, 0))),
                Outcome::Accepted
            );
            let mut masked = answer_shape(5, 0);
            masked[50] = 0x10;
            assert_eq!(run(&listener_input(sign, &[], &masked)), Outcome::Refused);
            // Unsigned, the input's own tag is wrong.
            assert_eq!(
                run(&listener_input(long, &[], &answer_shape(5, 0))),
                Outcome::Refused
            );
        }
    }

    #[test]
    fn the_dialers_answer_passes_unless_changed_or_of_another_secret() {
        let mode = Mode::DIALER_ANSWER;
        assert_eq!(run(&listener_input(mode, &[3], &[])), Outcome::Accepted);
        let mut frame_after = vec![0; ANSWER_BYTES];
        frame_after.extend_from_slice(b"TFRM");
        assert_eq!(
            run(&listener_input(mode, &[], &frame_after)),
            Outcome::Accepted
        );
        assert_eq!(
            run(&listener_input(mode, &[], &[0, 0, 1])),
            Outcome::Refused
        );
        let other = mode | Mode::OTHER_SECRET;
        assert_eq!(run(&listener_input(other, &[], &[])), Outcome::Refused);
    }

    #[test]
    fn short_or_wrongly_opened_answers_are_incomplete_or_refused_early() {
        assert_eq!(run(&listener_input(0, &[2], b"TFA")), Outcome::Incomplete);
        assert_eq!(run(&listener_input(0, &[0, 2], b"TFRM")), Outcome::Refused);
        assert_eq!(run(&listener_input(0, &[0], b"TFAU")), Outcome::Incomplete);
        assert_eq!(run(&[]), Outcome::Incomplete);
    }

    #[test]
    fn the_dialer_accepts_only_the_right_proof_of_a_real_challenge() {
        let mut challenge = MAGIC.to_vec();
        challenge.extend_from_slice(&[9; NONCE]);
        let sign = Mode::SIGN;
        assert_eq!(
            run(&dialer_input(sign, &challenge, &[0; 32])),
            Outcome::Accepted
        );
        assert_eq!(
            run(&dialer_input(sign, &challenge, &[0; 31])),
            Outcome::Refused
        );
        assert_eq!(
            run(&dialer_input(sign, &challenge, &[0; 33])),
            Outcome::Refused
        );
        assert_eq!(
            run(&dialer_input(sign, &challenge, &[1; 32])),
            Outcome::Refused
        );
        assert_eq!(
            run(&dialer_input(0, &challenge, &[0; 32])),
            Outcome::Refused
        );
        assert_eq!(
            run(&dialer_input(sign, &challenge[..35], &[0; 32])),
            Outcome::Refused
        );
        challenge[3] = b'M';
        assert_eq!(
            run(&dialer_input(sign, &challenge, &[0; 32])),
            Outcome::Refused
        );
    }
}
