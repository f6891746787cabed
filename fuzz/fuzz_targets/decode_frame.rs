//! Arbitrary bytes into `wire::decode`, with default and with small limits.
//! Every frame that decodes is read, checksum-verified, re-encoded and
//! decoded again (see `tensorferry_fuzz::check_frame`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tensorferry_fuzz::decode_and_check(data);
});
