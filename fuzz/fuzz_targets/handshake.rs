//! Arbitrary bytes into either side of the tcp authentication handshake
//! (input format and checks: `tensorferry_fuzz::handshake`): the listener
//! fed a dialer's bytes in pieces, the dialer fed a listener's challenge
//! and proof. Neither may panic, accept a wrong answer or proof, refuse a
//! right one, or take a byte past the answer.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tensorferry_fuzz::handshake::run(data);
});
