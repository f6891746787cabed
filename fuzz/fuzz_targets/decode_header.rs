//! A valid prelude and buffer table around an arbitrary header and a few
//! arbitrary buffers (input format: `tensorferry_fuzz::split_header_input`),
//! so that the fuzzer spends its time in the JSON header validation.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorferry_engine::Error;

fuzz_target!(|data: &[u8]| {
    let (header, buffers) = tensorferry_fuzz::split_header_input(data);
    let buffers: Vec<&[u8]> = buffers.iter().map(Vec::as_slice).collect();
    let frame = tensorferry_fuzz::build_frame(header, &buffers);
    let region = tensorferry_engine::HostBuffer::copy_from(&frame);
    for limits in [
        tensorferry_engine::wire::Limits::default(),
        tensorferry_fuzz::small_limits(),
    ] {
        match tensorferry_engine::wire::decode(&region, &limits) {
            Ok(decoded) => {
                assert_eq!(decoded.frame_len, frame.len() as u64);
                tensorferry_fuzz::check_frame(&decoded, frame.len());
            }
            // The prelude and the table are built by the format's rules, so
            // these would mean the builder or the decoder miscounts.
            Err(e @ (Error::Truncated { .. } | Error::UnknownVersion { .. })) => {
                panic!("a well-formed prelude was rejected: {e}")
            }
            Err(_) => {}
        }
    }
});
