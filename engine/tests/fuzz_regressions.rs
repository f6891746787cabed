//! Frames the fuzz targets in `fuzz/` found, or that reproduce what they
//! found, each of which once made `wire::decode` or the use of what it
//! returned panic or allocate without bound. Each must now be an `Err` from
//! `decode`.

use serde_json::{json, Value};
use tensorferry_engine::wire::{decode, encode, EncodeOptions, FrameMeta, Limits, PRELUDE_BYTES};
use tensorferry_engine::{Error, HostBuffer, Message, Tensor, ALIGN};

/// A frame around `header` and `buffers`, laid out by the rules of the format.
fn frame(header: &[u8], buffers: &[&[u8]]) -> Vec<u8> {
    let align = |x: usize, a: usize| x.div_ceil(a) * a;
    let table = align(PRELUDE_BYTES + header.len(), 8);
    let data = align(table + 8 * buffers.len(), ALIGN);
    let mut end = data;
    let mut starts = Vec::new();
    for b in buffers {
        starts.push(end);
        end = align(end + b.len(), ALIGN);
    }
    let mut f = vec![0u8; end];
    f[..4].copy_from_slice(b"TFRM");
    f[4..6].copy_from_slice(&1u16.to_le_bytes());
    f[8..12].copy_from_slice(&(header.len() as u32).to_le_bytes());
    f[12..16].copy_from_slice(&(buffers.len() as u32).to_le_bytes());
    f[16..24].copy_from_slice(&(end as u64).to_le_bytes());
    f[PRELUDE_BYTES..PRELUDE_BYTES + header.len()].copy_from_slice(header);
    for (i, (b, &s)) in buffers.iter().zip(&starts).enumerate() {
        f[table + 8 * i..table + 8 * i + 8].copy_from_slice(&(b.len() as u64).to_le_bytes());
        f[s..s + b.len()].copy_from_slice(b);
    }
    f
}

/// The frame of one f32 tensor `x` of shape [4, 3] (48 bytes), as `encode`
/// writes it, with `shape` and `strides` of `x` replaced in the header.
fn strided_x(shape: Value, strides: Value) -> Vec<u8> {
    strided_x_as("f32", shape, strides)
}

/// [`strided_x`], with the dtype replaced too.
fn strided_x_as(dtype: &str, shape: Value, strides: Value) -> Vec<u8> {
    let data: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let m = Message::new().tensor("x", Tensor::from_slice(&data, &[4, 3]).expect("tensor"));
    let enc = encode(&m, &FrameMeta::message("/t", 0), EncodeOptions::default()).expect("encode");
    let head = enc.head();
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    let mut header: Value =
        serde_json::from_slice(&head[PRELUDE_BYTES..PRELUDE_BYTES + len]).expect("json");
    // `tensors` is an array of descriptors, or an object of one-entry columns.
    match &mut header["tensors"] {
        Value::Array(descs) => {
            descs[0]["dtype"] = json!(dtype);
            descs[0]["shape"] = shape;
            descs[0]["strides"] = strides;
        }
        Value::Object(columns) => {
            columns.insert("dtype".into(), json!([dtype]));
            columns.insert("shape".into(), json!([shape]));
            columns.insert("strides".into(), json!([strides]));
        }
        other => panic!("unexpected tensors {other}"),
    }
    let header = serde_json::to_vec(&header).expect("json");
    frame(
        &header,
        &[enc.buffers()[0].host().expect("host").as_slice()],
    )
}

fn decoded(bytes: &[u8]) -> Result<tensorferry_engine::wire::Frame, Error> {
    decode(&HostBuffer::copy_from(bytes), &Limits::default())
}

fn assert_rejects_x(bytes: &[u8]) {
    match decoded(bytes) {
        Err(Error::Tensor { name, what }) => {
            assert_eq!(name, "x");
            assert!(what.contains("bytes"), "{what}");
        }
        other => panic!("expected a tensor error, got {other:?}"),
    }
}

#[test]
fn decode_header_finding_a_broadcast_view_wider_than_its_buffer_is_rejected() {
    // What `decode_header` found from the `broadcast` seed (a 4 × 3 f32 view
    // with strides [0, 1]) by changing one dtype: 12 f64 elements are 96
    // bytes, over a buffer of 48. It decoded, and packing allocated 96.
    assert_rejects_x(&strided_x_as("f64", json!([4, 3]), json!([0, 1])));
    // The seed itself is fine: 12 f32 elements in 48 bytes, rows repeated.
    let got = decoded(&strided_x(json!([4, 3]), json!([0, 1]))).expect("decode");
    let packed = got.message.get("x").expect("x").packed().expect("pack");
    assert_eq!(packed.as_slice()[..12], packed.as_slice()[36..]);
}

#[test]
fn a_strided_view_with_more_elements_than_its_buffer_is_rejected() {
    // Stride 0 makes 4e9 × 3 elements reach only 9 elements of the 12 sent:
    // decode used to accept it, and packing it allocated 48 GB.
    assert_rejects_x(&strided_x(json!([4_000_000_000u64, 3]), json!([0, 4])));
}

#[test]
fn a_strided_view_whose_byte_size_overflows_is_rejected() {
    // 2^61 × 3 elements fit in usize, 4 bytes each do not: decode used to
    // accept it, and `size_bytes()` (packing, checksums) overflowed.
    assert_rejects_x(&strided_x(json!([1u64 << 61, 3]), json!([0, 4])));
}

#[test]
fn a_strided_view_with_overlapping_strides_may_not_outgrow_its_buffer() {
    // No zero stride, but rows overlap: 1000 × 3 elements over 12.
    assert_rejects_x(&strided_x(json!([1000, 3]), json!([0, 1])));
    assert_rejects_x(&strided_x(json!([5, 3]), json!([1, 1])));
}

#[test]
fn a_strided_view_may_show_part_of_its_buffer() {
    // Columns 1..3 of the 4 × 3 matrix: 8 of the 12 elements sent.
    let got = decoded(&strided_x(json!([4, 2]), json!([3, 1]))).expect("decode");
    let x = got.message.get("x").expect("x");
    assert_eq!(x.packed().expect("pack").len(), 32);
}

#[test]
fn a_strided_view_of_exactly_its_bytes_still_decodes() {
    // The transpose of the 4 × 3 matrix: 12 elements in 48 bytes.
    let got = decoded(&strided_x(json!([3, 4]), json!([1, 3]))).expect("decode");
    let x = got.message.get("x").expect("x");
    assert_eq!(x.shape(), &[3, 4]);
    assert!(!x.is_contiguous());
    let packed = x.packed().expect("pack");
    let values: Vec<f32> = packed
        .as_slice()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    assert_eq!(values, [0., 3., 6., 9., 1., 4., 7., 10., 2., 5., 8., 11.]);
}

#[test]
fn an_empty_tensor_with_huge_dimensions_decodes_without_a_panic() {
    // No element, so no byte: but its other dimensions multiply past 64
    // bits, which once panicked while its layout was made.
    let bytes = strided_x(
        json!([0, 99_999_999_999u64, 99_999_999_999u64]),
        Value::Null,
    );
    match decoded(&bytes) {
        Ok(f) => assert_eq!(f.message.get("x").map(|t| t.shape()[0]), Some(0)),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
