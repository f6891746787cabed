//! Shared pieces of the fuzz targets: the frame builder used by
//! `decode_header` and `decode_compact`, the input format they read, the
//! checks run on every frame that decodes, and ([`handshake`]) the checks of
//! the authentication handshake.
//!
//! The checks panic on purpose: a panic here is a finding for libFuzzer.

pub mod handshake;

use serde_json::Value;
use tensorferry_device_map::Device;
use tensorferry_engine::outbound::write_frame;
use tensorferry_engine::wire::{
    decode, encode, encode_staged, plan_head, EncodeOptions, Frame, HeadPlan, Limits, Origin,
    FLAG_COMPACT, FLAG_SEALED, MAGIC, PRELUDE_BYTES, VERSION,
};
use tensorferry_engine::{Error, HostBuffer, ALIGN};

/// Most buffers a `decode_header` input describes.
pub const MAX_HEADER_INPUT_BUFFERS: usize = 12;

/// Small limits, so that the limit checks themselves are exercised.
pub fn small_limits() -> Limits {
    Limits {
        max_header_bytes: 512,
        max_tensors: 4,
        max_buffers: 4,
        max_message_bytes: 4096,
    }
}

/// No limits at all: for re-decoding a frame this crate encoded itself.
pub fn no_limits() -> Limits {
    Limits {
        max_header_bytes: u32::MAX,
        max_tensors: usize::MAX,
        max_buffers: u32::MAX,
        max_message_bytes: u64::MAX,
    }
}

fn align(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// A frame laid out by the rules of `docs/wire-format.md` around `header`
/// and `buffers`: header_len, buffer_count and frame_len are right, the
/// buffer table matches and every buffer starts on a 64-byte boundary.
pub fn build_frame(header: &[u8], buffers: &[&[u8]]) -> Vec<u8> {
    let table = align(PRELUDE_BYTES + header.len(), 8);
    let data = align(table + 8 * buffers.len(), ALIGN);
    let mut starts = Vec::with_capacity(buffers.len());
    let mut end = data;
    for b in buffers {
        starts.push(end);
        end = align(end + b.len(), ALIGN);
    }
    let mut f = vec![0u8; end];
    f[..4].copy_from_slice(&MAGIC);
    f[4..6].copy_from_slice(&VERSION.to_le_bytes());
    // Headers and buffer counts come from fuzz inputs of a few KiB at most.
    let header_len = u32::try_from(header.len()).unwrap_or(u32::MAX);
    let count = u32::try_from(buffers.len()).unwrap_or(u32::MAX);
    f[8..12].copy_from_slice(&header_len.to_le_bytes());
    f[12..16].copy_from_slice(&count.to_le_bytes());
    f[16..24].copy_from_slice(&(end as u64).to_le_bytes());
    f[PRELUDE_BYTES..PRELUDE_BYTES + header.len()].copy_from_slice(header);
    for (i, (b, &start)) in buffers.iter().zip(&starts).enumerate() {
        let entry = table + 8 * i;
        f[entry..entry + 8].copy_from_slice(&(b.len() as u64).to_le_bytes());
        f[start..start + b.len()].copy_from_slice(b);
    }
    f
}

/// [`build_frame`] with flag bit 0 of the prelude set: `header` is read as
/// a compact header.
pub fn build_compact_frame(header: &[u8], buffers: &[&[u8]]) -> Vec<u8> {
    let mut f = build_frame(header, buffers);
    f[6..8].copy_from_slice(&FLAG_COMPACT.to_le_bytes());
    f
}

/// Splits a `decode_header` input into a header and buffers.
///
/// The input is: one byte `n` (buffer count, taken modulo
/// `MAX_HEADER_INPUT_BUFFERS + 1`), `n` little-endian `u16` buffer lengths,
/// the buffers' bytes back to back (zero-filled where the input runs out),
/// and then the header: every byte that is left. The header comes last so
/// that inserting or removing bytes in it keeps the rest in place.
pub fn split_header_input(data: &[u8]) -> (&[u8], Vec<Vec<u8>>) {
    let Some((&n, mut rest)) = data.split_first() else {
        return (&[], Vec::new());
    };
    let n = usize::from(n) % (MAX_HEADER_INPUT_BUFFERS + 1);
    let mut lens = Vec::with_capacity(n);
    for _ in 0..n {
        let (len, tail) = match rest {
            [a, b, tail @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), tail),
            _ => (0, &[][..]),
        };
        lens.push(len);
        rest = tail;
    }
    let mut buffers = Vec::with_capacity(n);
    for len in lens {
        let take = len.min(rest.len());
        let mut b = rest[..take].to_vec();
        b.resize(len, 0);
        buffers.push(b);
        rest = &rest[take..];
    }
    (rest, buffers)
}

/// The inverse of [`split_header_input`], for writing seeds.
///
/// # Panics
///
/// With more than `MAX_HEADER_INPUT_BUFFERS` buffers or one longer than `u16::MAX`.
pub fn header_input(header: &[u8], buffers: &[&[u8]]) -> Vec<u8> {
    assert!(
        buffers.len() <= MAX_HEADER_INPUT_BUFFERS,
        "too many buffers"
    );
    let mut out = vec![buffers.len() as u8];
    for b in buffers {
        let len = u16::try_from(b.len()).expect("a seed buffer of at most 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
    }
    for b in buffers {
        out.extend_from_slice(b);
    }
    out.extend_from_slice(header);
    out
}

/// Sets `key` of tensor `index` in a header: `tensors` is either an array
/// of descriptors or an object of columns (one array per key). `None`
/// removes the key (writes `null` in a column). Returns false when the
/// header has no such tensor.
pub fn set_tensor_key(header: &mut Value, index: usize, key: &str, value: Option<Value>) -> bool {
    match header.get_mut("tensors") {
        Some(Value::Array(descs)) => match descs.get_mut(index).and_then(Value::as_object_mut) {
            Some(d) => {
                match value {
                    Some(v) => d.insert(key.into(), v),
                    None => d.remove(key),
                };
                true
            }
            None => false,
        },
        Some(Value::Object(columns)) => {
            let n = columns
                .get("name")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            if index >= n {
                return false;
            }
            let column = columns
                .entry(key)
                .or_insert_with(|| Value::Array(vec![Value::Null; n]));
            match column.as_array_mut().and_then(|c| c.get_mut(index)) {
                Some(slot) => {
                    *slot = value.unwrap_or(Value::Null);
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

/// Decodes `data` with the default and with small limits, and checks every
/// frame that decodes.
pub fn decode_and_check(data: &[u8]) {
    let region = HostBuffer::copy_from(data);
    for limits in [Limits::default(), small_limits()] {
        // What a stream reader plans from the head alone must never panic,
        // and must agree with the whole frame's decoding.
        let plan = plan_head(data, &limits, 0);
        if let Ok(frame) = decode(&region, &limits) {
            check_frame(&frame, data.len());
            check_plan(plan, &frame);
        }
    }
}

/// What `plan_head` said of a frame that then decoded must agree with it.
///
/// # Panics
///
/// When the plan failed, or names other routing, devices or buffers.
pub fn check_plan(plan: tensorferry_engine::Result<HeadPlan>, frame: &Frame) {
    let plan = plan.expect("the head of a frame that decodes plans");
    assert_eq!(plan.meta, frame.meta, "the plan's routing");
    let planned: Vec<(Device, usize)> = plan.tensors.iter().map(|t| (t.device, t.buffer)).collect();
    let decoded: Vec<(Device, usize)> =
        frame.tensors.iter().map(|t| (t.device, t.buffer)).collect();
    assert_eq!(planned, decoded, "the plan's devices and buffers");
}

/// What `decode_compact` does with one input (the `decode_header` input
/// format, the header read as a compact one): builds the frame, plans and
/// decodes it with the default and with small limits, and checks what
/// comes out. Returns how many of the two decodings succeeded.
///
/// # Panics
///
/// When a check fails (see [`check_frame`], [`check_compact_frame`] and
/// [`check_compact_error`]).
pub fn decode_compact_and_check(data: &[u8]) -> usize {
    let (header, buffers) = split_header_input(data);
    let buffers: Vec<&[u8]> = buffers.iter().map(Vec::as_slice).collect();
    let frame = build_compact_frame(header, &buffers);
    let region = HostBuffer::copy_from(&frame);
    let mut decoded = 0;
    for limits in [Limits::default(), small_limits()] {
        let plan = plan_head(&frame, &limits, 0);
        match decode(&region, &limits) {
            Ok(f) => {
                assert_eq!(f.frame_len, frame.len() as u64, "the frame's length");
                check_plan(plan, &f);
                check_frame(&f, frame.len());
                check_compact_frame(&f);
                decoded += 1;
            }
            Err(e) => check_compact_error(&e, header.len()),
        }
    }
    decoded
}

/// What must hold of an error for a frame whose prelude and buffer table
/// were built by the format's rules around a compact header of
/// `header_len` bytes: it is not about truncation or the version, and an
/// error in the compact header names a byte inside it.
///
/// # Panics
///
/// When it does not.
pub fn check_compact_error(e: &Error, header_len: usize) {
    match e {
        Error::Truncated { .. } | Error::UnknownVersion { .. } => {
            panic!("a well-formed prelude was rejected: {e}")
        }
        Error::Frame { offset, what } if what.starts_with("compact header") => {
            let header = PRELUDE_BYTES as u64..=(PRELUDE_BYTES + header_len) as u64;
            assert!(
                header.contains(offset),
                "`{what}` names byte {offset}, outside the header ({header:?})"
            );
        }
        _ => {}
    }
}

/// What must hold for every frame decoded from a compact header, besides
/// [`check_frame`]: no objects and no strided views (the compact form has
/// neither); and written again in compact form with what the header said
/// of each tensor (sender's device, checksum, dtype before a cast), it
/// decodes to the same routing, fields, tensors and descriptors — and,
/// when the fields hold no floating-point numbers (their text does not
/// survive a JSON round trip exactly), writing that again gives the same
/// bytes: the compact form is a fixed point of decode and encode.
///
/// # Panics
///
/// When any of that fails: a bug in the compact reader or writer.
pub fn check_compact_frame(frame: &Frame) {
    assert_eq!(
        frame.message.objects().len(),
        0,
        "a compact header carries no codec objects"
    );
    for ((name, t), info) in frame.message.tensors().zip(&frame.tensors) {
        assert!(
            t.is_contiguous(),
            "`{name}` from a compact header is strided"
        );
        assert_eq!(t.size_bytes() as u64, info.bytes, "bytes of `{name}`");
    }
    let origins: Vec<Origin> = frame
        .tensors
        .iter()
        .map(|i| Origin {
            device: i.device,
            cast_from: i.cast_from,
            checksum: i.checksum,
        })
        .collect();
    let compact_bytes = |f: &Frame| -> Vec<u8> {
        let encoded = encode_staged(
            &f.message,
            &origins,
            &f.meta,
            EncodeOptions {
                checksums: false,
                compact: true,
            },
        )
        .expect("a decoded compact message encodes again");
        let mut bytes = Vec::new();
        write_frame(&encoded, &mut bytes).expect("writing to a Vec cannot fail");
        bytes
    };
    let bytes = compact_bytes(frame);
    // Compact, and sealed exactly when a tensor carries a checksum.
    let sealed = frame.tensors.iter().any(|t| t.checksum.is_some());
    assert_eq!(
        u16::from_le_bytes([bytes[6], bytes[7]]),
        FLAG_COMPACT | if sealed { FLAG_SEALED } else { 0 },
        "a message without objects is written compact (its head sealed with checksums)"
    );
    let again =
        decode(&HostBuffer::copy_from(&bytes), &no_limits()).expect("a re-encoded frame decodes");
    assert_eq!(again.meta, frame.meta, "channel, seq, kind and id");
    assert!(
        frame
            .message
            .fields()
            .keys()
            .eq(again.message.fields().keys()),
        "field names"
    );
    assert_eq!(again.tensors.len(), frame.tensors.len());
    for (((name, t), (name2, t2)), (info, info2)) in frame
        .message
        .tensors()
        .zip(again.message.tensors())
        .zip(frame.tensors.iter().zip(&again.tensors))
    {
        assert_eq!(name, name2);
        assert_eq!(t.dtype(), t2.dtype(), "dtype of `{name}`");
        assert_eq!(t.shape(), t2.shape(), "shape of `{name}`");
        assert_eq!(
            t.packed().expect("packs").as_slice(),
            t2.packed().expect("packs").as_slice(),
            "bytes of `{name}`"
        );
        assert_eq!(info.device, info2.device, "sender's device of `{name}`");
        assert_eq!(info.checksum, info2.checksum, "checksum of `{name}`");
        assert_eq!(info.cast_from, info2.cast_from, "cast_from of `{name}`");
        assert_eq!(info.bytes, info2.bytes, "bytes of `{name}`");
    }
    assert_eq!(
        frame.verify_checksums().is_ok(),
        again.verify_checksums().is_ok(),
        "the checksums verify the same way"
    );
    if !frame.message.fields().values().any(holds_float) {
        assert!(
            compact_bytes(&again) == bytes,
            "the compact form of a decoded compact frame is not a fixed point"
        );
    }
}

/// Whether `v` holds a number that is neither an i64 nor a u64.
fn holds_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(holds_float),
        Value::Object(o) => o.values().any(holds_float),
        _ => false,
    }
}

/// What must hold for every frame `decode` accepts: its tensors can be read,
/// its checksums checked, and it survives `encode` and `decode` again with the
/// same channel, sequence number, names, dtypes, shapes and bytes.
///
/// # Panics
///
/// When any of that fails: a bug in the decoder (or the encoder).
pub fn check_frame(frame: &Frame, input_len: usize) {
    assert!(frame.frame_len <= input_len as u64, "frame past the input");
    assert_eq!(frame.tensors.len(), frame.message.tensors().len());
    let _ = frame.verify_checksums();

    let mut packed = Vec::with_capacity(frame.tensors.len());
    for ((name, t), info) in frame.message.tensors().zip(&frame.tensors) {
        assert_eq!(t.dtype(), info.dtype, "dtype of `{name}`");
        // Packing allocates the visible bytes: a frame must never make the
        // receiver allocate more than the frame itself carries.
        assert!(
            t.size_bytes() as u64 <= info.bytes,
            "`{name}` shows {} bytes of its {}-byte buffer",
            t.size_bytes(),
            info.bytes
        );
        let p = t.packed().expect("a decoded tensor packs");
        assert_eq!(p.len(), t.size_bytes(), "packed size of `{name}`");
        // Read every byte, so that the sanitizer sees any bad view.
        std::hint::black_box(p.as_slice().iter().fold(0u8, |a, &b| a ^ b));
        packed.push(p);
    }
    for (_, o) in frame.message.objects() {
        for b in &o.buffers {
            std::hint::black_box(b.as_slice().iter().fold(0u8, |a, &b| a ^ b));
        }
    }

    let encoded = encode(
        &frame.message,
        &frame.meta,
        EncodeOptions {
            checksums: true,
            ..EncodeOptions::default()
        },
    )
    .expect("a decoded message encodes again");
    let mut bytes = Vec::new();
    write_frame(&encoded, &mut bytes).expect("writing to a Vec cannot fail");
    assert_eq!(bytes.len() as u64, encoded.frame_len());
    let again =
        decode(&HostBuffer::copy_from(&bytes), &no_limits()).expect("a re-encoded frame decodes");
    assert_eq!(again.meta, frame.meta, "channel, seq, kind and id");
    assert_eq!(
        again
            .verify_checksums()
            .expect("checksums of a re-encoded frame"),
        frame.tensors.len()
    );
    assert_eq!(again.message.tensors().len(), frame.message.tensors().len());
    for (((name, t), (name2, t2)), p) in frame
        .message
        .tensors()
        .zip(again.message.tensors())
        .zip(&packed)
    {
        assert_eq!(name, name2);
        assert_eq!(t.dtype(), t2.dtype(), "dtype of `{name}`");
        assert_eq!(t.shape(), t2.shape(), "shape of `{name}`");
        let p2 = t2.packed().expect("a re-decoded tensor packs");
        assert_eq!(p.as_slice(), p2.as_slice(), "bytes of `{name}`");
    }
    assert_eq!(again.message.objects().len(), frame.message.objects().len());
    for ((name, o), (name2, o2)) in frame.message.objects().zip(again.message.objects()) {
        assert_eq!(name, name2);
        assert_eq!(o.tag, o2.tag);
        assert_eq!(o.buffers.len(), o2.buffers.len());
        for (b, b2) in o.buffers.iter().zip(&o2.buffers) {
            assert_eq!(b.as_slice(), b2.as_slice(), "buffer of object `{name}`");
        }
    }
    assert!(
        frame
            .message
            .fields()
            .keys()
            .eq(again.message.fields().keys()),
        "field names"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_inputs_split_back_into_their_parts() {
        let a = [1u8, 2, 3];
        let b = [9u8; 70];
        let input = header_input(b"{}", &[&a, &[], &b]);
        let (header, buffers) = split_header_input(&input);
        assert_eq!(header, b"{}");
        assert_eq!(buffers, vec![a.to_vec(), Vec::new(), b.to_vec()]);
        assert_eq!(split_header_input(&[]).0, b"");
        let (header, buffers) = split_header_input(&[2, 5, 0]);
        assert!(header.is_empty());
        assert_eq!(buffers, vec![vec![0; 5], Vec::new()]);
    }

    /// A compact header and buffers of a message with fields, a checksum
    /// column and two tensors, in the `decode_compact` input format.
    fn compact_input() -> Vec<u8> {
        use tensorferry_engine::wire::FrameMeta;
        use tensorferry_engine::{Message, Tensor};
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).expect("tensor");
        let m = Message::new()
            .field("step", 1)
            .tensor("t", t.clone())
            .tensor("tt", t.transpose(0, 1).expect("transpose"));
        let options = EncodeOptions {
            checksums: true,
            compact: true,
        };
        let enc = encode(&m, &FrameMeta::message("/x", 3), options).expect("encode");
        let head = enc.head();
        assert_eq!(
            u16::from_le_bytes([head[6], head[7]]),
            FLAG_COMPACT | FLAG_SEALED
        );
        let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
        let buffers: Vec<&[u8]> = enc
            .buffers()
            .iter()
            .map(|b| b.host().expect("host tensors").as_slice())
            .collect();
        header_input(&head[PRELUDE_BYTES..PRELUDE_BYTES + len], &buffers)
    }

    #[test]
    fn compact_frames_of_encode_decode_and_pass_the_compact_checks() {
        assert_eq!(decode_compact_and_check(&compact_input()), 2);
    }

    #[test]
    fn a_compact_header_cut_short_is_an_error_inside_it() {
        let input = compact_input();
        let (header, buffers) = split_header_input(&input);
        let buffers: Vec<&[u8]> = buffers.iter().map(Vec::as_slice).collect();
        for cut in [0, 1, 9, header.len() / 2, header.len() - 1] {
            let frame = build_compact_frame(&header[..cut], &buffers);
            let err = decode(&HostBuffer::copy_from(&frame), &Limits::default())
                .expect_err("a header cut short");
            assert!(
                matches!(&err, Error::Frame { what, .. } if what.starts_with("compact header")),
                "{err}"
            );
            check_compact_error(&err, cut);
        }
    }

    #[test]
    fn built_frames_match_what_encode_writes() {
        use tensorferry_engine::wire::FrameMeta;
        use tensorferry_engine::{Message, Tensor};
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).expect("tensor");
        let m = Message::new()
            .field("step", 1)
            .tensor("t", t.clone())
            .tensor("tt", t.transpose(0, 1).expect("transpose"))
            .tensor("b", Tensor::from_slice(&[1u8], &[1]).expect("tensor"));
        let enc =
            encode(&m, &FrameMeta::message("/x", 3), EncodeOptions::default()).expect("encode");
        let mut bytes = Vec::new();
        write_frame(&enc, &mut bytes).expect("write");
        let header_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let header = &bytes[PRELUDE_BYTES..PRELUDE_BYTES + header_len];
        let buffers: Vec<&[u8]> = enc
            .buffers()
            .iter()
            .map(|b| b.host().expect("host tensors").as_slice())
            .collect();
        assert_eq!(build_frame(header, &buffers), bytes);
        let frame = decode(&HostBuffer::copy_from(&bytes), &Limits::default()).expect("decode");
        check_frame(&frame, bytes.len());
    }
}
