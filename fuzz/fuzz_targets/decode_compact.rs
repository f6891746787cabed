//! A valid prelude (compact flag set) and buffer table around an arbitrary
//! compact header and a few arbitrary buffers (the `decode_header` input
//! format: `tensorferry_fuzz::split_header_input`), so that the fuzzer
//! spends its time in the compact header reader. Every frame that decodes
//! is checked as in the other targets, and must survive being written
//! compact again (`tensorferry_fuzz::check_compact_frame`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tensorferry_fuzz::decode_compact_and_check(data);
});
