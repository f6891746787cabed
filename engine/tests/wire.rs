//! The wire format: round trips, zero-copy, and every rejection a hostile peer can provoke.

use serde_json::json;
use tensorferry_engine::outbound::{copy_frame_into, write_frame};
use tensorferry_engine::wire::{
    decode, encode, EncodeOptions, FrameMeta, Kind, Limits, MAGIC, PRELUDE_BYTES,
};
use tensorferry_engine::{DType, Error, HostBuffer, Message, Tensor};

fn bytes_of(m: &Message, opts: EncodeOptions) -> Vec<u8> {
    let enc = encode(m, &FrameMeta::message("/t", 5), opts).expect("encode");
    let mut out = Vec::new();
    write_frame(&enc, &mut out).expect("write");
    assert_eq!(out.len() as u64, enc.frame_len());
    out
}

fn dec(bytes: &[u8]) -> Result<tensorferry_engine::wire::Frame, Error> {
    decode(&HostBuffer::copy_from(bytes), &Limits::default())
}

fn sample() -> Message {
    let m = Tensor::from_slice(&(0..12).map(|i| i as f32).collect::<Vec<_>>(), &[3, 4]).expect("t");
    Message::new()
        .field("step", 17)
        .field("tag", json!({"a": [1, 2]}))
        .tensor("m", m.clone())
        .tensor("mt", m.transpose(0, 1).expect("t"))
        .tensor("b", Tensor::from_slice(&[1u8, 0, 1], &[3]).expect("t"))
        .tensor("scalar", Tensor::from_slice(&[7i64], &[]).expect("t"))
        .tensor("empty", Tensor::zeros(DType::F16, &[0, 5]).expect("t"))
}

/// A frame around `header` with `buffers`, laid out by the rules of the format.
fn frame_with_header(header: &str, buffers: &[&[u8]]) -> Vec<u8> {
    let align = |x: usize, a: usize| x.div_ceil(a) * a;
    let table = align(PRELUDE_BYTES + header.len(), 8);
    let data = align(table + 8 * buffers.len(), 64);
    let mut end = data;
    let mut starts = Vec::new();
    for b in buffers {
        starts.push(end);
        end = align(end + b.len(), 64);
    }
    let mut f = vec![0u8; end];
    f[..4].copy_from_slice(&MAGIC);
    f[4..6].copy_from_slice(&1u16.to_le_bytes());
    f[8..12].copy_from_slice(&(header.len() as u32).to_le_bytes());
    f[12..16].copy_from_slice(&(buffers.len() as u32).to_le_bytes());
    f[16..24].copy_from_slice(&(end as u64).to_le_bytes());
    f[32..32 + header.len()].copy_from_slice(header.as_bytes());
    for (i, b) in buffers.iter().enumerate() {
        f[table + 8 * i..table + 8 * i + 8].copy_from_slice(&(b.len() as u64).to_le_bytes());
        f[starts[i]..starts[i] + b.len()].copy_from_slice(b);
    }
    f
}

/// Per-tensor descriptors turned into the format's columns: every key seen
/// becomes an array with one entry per tensor (null where a tensor lacks it).
fn columns(descs: &[serde_json::Value]) -> serde_json::Value {
    let mut keys: Vec<String> = Vec::new();
    for d in descs {
        for k in d.as_object().expect("object").keys() {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let mut out = serde_json::Map::new();
    for k in keys {
        let column = descs
            .iter()
            .map(|d| d.get(&k).cloned().unwrap_or(json!(null)))
            .collect();
        out.insert(k.clone(), column);
    }
    if descs.is_empty() {
        for k in ["name", "dtype", "shape", "device", "buffer", "bytes"] {
            out.insert(k.into(), json!([]));
        }
    }
    serde_json::Value::Object(out)
}

fn header_of(descs: &[serde_json::Value]) -> String {
    json!({"channel": "/t", "seq": 1, "kind": "message", "fields": {}, "tensors": columns(descs)})
        .to_string()
}

fn header_with(tensor: serde_json::Value) -> String {
    header_of(&[tensor])
}

fn good_desc() -> serde_json::Value {
    json!({"name": "x", "dtype": "f32", "shape": [2], "device": "cpu", "buffer": 0, "bytes": 8})
}

/// Both header forms, with checksums.
fn both_forms() -> [EncodeOptions; 2] {
    [false, true].map(|compact| EncodeOptions {
        checksums: true,
        compact,
    })
}

#[test]
fn round_trips_fields_tensors_and_strided_views() {
    for opts in both_forms() {
        round_trip_sample(opts);
    }
}

fn round_trip_sample(opts: EncodeOptions) {
    let m = sample();
    let frame = dec(&bytes_of(&m, opts)).expect("decode");
    assert_eq!(
        frame.meta,
        FrameMeta {
            channel: "/t".into(),
            seq: 5,
            kind: Kind::Message,
            id: None
        }
    );
    assert_eq!(frame.message.fields(), m.fields());
    assert_eq!(frame.verify_checksums().expect("checksums"), 5);
    let names: Vec<_> = frame
        .message
        .tensors()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(names, ["m", "mt", "b", "scalar", "empty"]);
    for (name, t) in m.tensors() {
        let got = frame.message.get(name).expect("present");
        assert_eq!((got.dtype(), got.shape()), (t.dtype(), t.shape()), "{name}");
        assert_eq!(
            got.packed().expect("host").as_slice(),
            t.packed().expect("host").as_slice(),
            "{name}"
        );
    }
    // The transposed view travelled packed: exactly its 12 elements.
    let mt = frame.message.get("mt").expect("mt");
    assert_eq!(
        mt.as_slice::<f32>().expect("f32")[..4],
        [0.0, 4.0, 8.0, 1.0]
    );
    assert_eq!(frame.tensors[1].bytes, 48);
}

#[test]
fn encoding_shares_tensor_bytes_and_decoding_views_the_frame() {
    let big = Tensor::zeros(DType::F32, &[1 << 20]).expect("4 MiB");
    let m = Message::new().tensor("big", big.clone());
    let enc = encode(&m, &FrameMeta::message("/t", 0), EncodeOptions::default()).expect("encode");
    assert!(
        enc.head().len() < 1024,
        "the head is O(header), not O(tensor)"
    );
    assert_eq!(
        enc.buffers()[0].host().expect("host").as_slice().as_ptr(),
        big.contiguous_bytes().expect("host").as_ptr()
    );
    let mut bytes = Vec::new();
    write_frame(&enc, &mut bytes).expect("write");
    let region = HostBuffer::copy_from(&bytes);
    let frame = decode(&region, &Limits::default()).expect("decode");
    let t = frame.message.get("big").expect("big");
    let at =
        t.contiguous_bytes().expect("host").as_ptr() as usize - region.as_slice().as_ptr() as usize;
    assert_eq!(at % 64, 0);
    assert!(at < 1024, "the tensor views the frame in place");
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    for opts in both_forms() {
        let bytes = bytes_of(&sample(), opts);
        for cut in 0..bytes.len() {
            let err = dec(&bytes[..cut]).expect_err("truncated");
            assert!(
                matches!(err, Error::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }
}

#[test]
fn every_single_byte_corruption_is_an_error_or_a_consistent_frame() {
    for opts in both_forms() {
        corrupt_every_byte(opts);
    }
}

fn corrupt_every_byte(opts: EncodeOptions) {
    let bytes = bytes_of(&sample(), opts);
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x41;
        let Ok(frame) = dec(&b) else { continue };
        if frame.verify_checksums().is_err() {
            continue;
        }
        // A frame that still decodes and verifies never delivers changed bytes
        // under an unchanged name, dtype and shape.
        for (name, t) in frame.message.tensors() {
            let Some(orig) = sample().get(name).cloned() else {
                continue;
            };
            if (orig.dtype(), orig.shape()) == (t.dtype(), t.shape()) {
                assert_eq!(
                    orig.packed().expect("host").as_slice(),
                    t.packed().expect("host").as_slice(),
                    "byte {i} changed tensor `{name}` undetected"
                );
            }
        }
    }
}

#[test]
fn rejects_unknown_versions_naming_both() {
    let mut b = bytes_of(&sample(), EncodeOptions::default());
    b[4..6].copy_from_slice(&2u16.to_le_bytes());
    let err = dec(&b).expect_err("version");
    assert!(
        matches!(
            err,
            Error::UnknownVersion {
                found: 2,
                supported: 1
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("version 2") && err.to_string().contains("version 1"));
    let mut b = bytes_of(&sample(), EncodeOptions::default());
    b[0] = b'X';
    assert!(dec(&b)
        .expect_err("magic")
        .to_string()
        .contains("not a tensorferry frame"));
    let mut b = bytes_of(&sample(), EncodeOptions::default());
    b[6] = 4;
    assert!(dec(&b).expect_err("flags").to_string().contains("flags"));
    // A head flagged as sealed must carry its seal.
    let mut b = bytes_of(&sample(), EncodeOptions::default());
    b[6] = 2;
    assert!(dec(&b)
        .expect_err("sealed without a seal")
        .to_string()
        .contains("head's checksum does not match"));
    // A JSON header flagged as compact is refused, not misread.
    let mut b = bytes_of(&sample(), EncodeOptions::default());
    b[6] = 1;
    assert!(dec(&b)
        .expect_err("compact flag on JSON")
        .to_string()
        .contains("compact header"));
}

#[test]
fn compact_headers_carry_what_json_headers_carry() {
    use tensorferry_device_map::Device;
    use tensorferry_engine::wire::{decode_at, encode_staged, Origin};
    let m = sample();
    let origins: Vec<Origin> = m
        .tensors()
        .enumerate()
        .map(|(i, _)| Origin {
            device: if i % 2 == 0 {
                Device::Cpu
            } else {
                Device::Cuda(1)
            },
            cast_from: (i == 0).then_some(DType::F64),
            checksum: None,
        })
        .collect();
    let metas = [
        FrameMeta::message("/camera/ä", 9),
        FrameMeta {
            channel: "/detect".into(),
            seq: 0,
            kind: Kind::Request,
            id: Some(u64::MAX),
        },
        FrameMeta {
            channel: "/detect".into(),
            seq: 3,
            kind: Kind::Error,
            id: Some(7),
        },
    ];
    for meta in metas {
        let frames = [false, true].map(|compact| {
            let opts = EncodeOptions {
                checksums: true,
                compact,
            };
            let enc = encode_staged(&m, &origins, &meta, opts).expect("encode");
            let mut out = Vec::new();
            write_frame(&enc, &mut out).expect("write");
            (
                out.len(),
                decode_at(&HostBuffer::copy_from(&out), &Limits::default(), 0),
            )
        });
        let [(json_len, json), (compact_len, compact)] = frames;
        let (json, compact) = (json.expect("json"), compact.expect("compact"));
        assert!(
            compact_len <= json_len,
            "compact {compact_len} > json {json_len}"
        );
        assert_eq!(compact.meta, json.meta);
        assert_eq!(compact.tensors, json.tensors);
        assert_eq!(compact.message.fields(), json.message.fields());
        for (name, t) in json.message.tensors() {
            let c = compact.message.get(name).expect("same names");
            assert_eq!((c.dtype(), c.shape()), (t.dtype(), t.shape()), "{name}");
            assert_eq!(
                c.packed().expect("host").as_slice(),
                t.packed().expect("host").as_slice()
            );
        }
    }
    // No fields at all is the common case of a request: nothing to parse.
    let bare = Message::new().tensor("x", Tensor::from_slice(&[1.0f32, 2.0], &[2]).expect("t"));
    let b = bytes_of(
        &bare,
        EncodeOptions {
            checksums: false,
            compact: true,
        },
    );
    let f = dec(&b).expect("decode");
    assert!(f.message.fields().is_empty());
    assert_eq!(
        f.message
            .get("x")
            .expect("x")
            .as_slice::<f32>()
            .expect("f32"),
        [1.0, 2.0]
    );
}

#[test]
fn rejects_lengths_pointing_past_the_end() {
    let f = frame_with_header(&header_with(good_desc()), &[&[0u8; 8]]);
    assert!(dec(&f).is_ok());
    let table = (PRELUDE_BYTES + header_with(good_desc()).len()).div_ceil(8) * 8;
    for bad in [65u64, 1 << 40, u64::MAX] {
        let mut g = f.clone();
        g[table..table + 8].copy_from_slice(&bad.to_le_bytes());
        let err = dec(&g).expect_err("past end");
        assert!(
            err.to_string().contains("past the frame's end"),
            "{bad}: {err}"
        );
    }
    let mut g = f.clone();
    g[16..24].copy_from_slice(&(f.len() as u64 + 64).to_le_bytes());
    assert!(matches!(dec(&g), Err(Error::Truncated { .. })));
    let mut g = f.clone();
    g[16..24].copy_from_slice(&(f.len() as u64 - 64).to_le_bytes());
    assert!(dec(&g).is_err(), "frame_len shorter than the buffers");
    let mut g = f.clone();
    g[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        dec(&g),
        Err(Error::Limit {
            what: "header size",
            ..
        })
    ));
    let mut g = f;
    g[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        dec(&g),
        Err(Error::Limit {
            what: "buffer count",
            ..
        })
    ));
}

#[test]
fn rejects_overflowing_and_inconsistent_descriptors() {
    let cases = [
        (
            json!({"name": "x", "dtype": "f32", "shape": [1u64 << 40, 1u64 << 40], "device": "cpu", "buffer": 0, "bytes": 8}),
            "more elements",
        ),
        (
            json!({"name": "x", "dtype": "f64", "shape": [u64::MAX / 4], "device": "cpu", "buffer": 0, "bytes": 8}),
            "is not 8 bytes",
        ),
        (
            json!({"name": "x", "dtype": "f32", "shape": [3], "device": "cpu", "buffer": 0, "bytes": 8}),
            "is not 8 bytes",
        ),
        (
            json!({"name": "x", "dtype": "f32", "shape": [2], "device": "cpu", "buffer": 0, "bytes": 12}),
            "says 12 bytes",
        ),
        (
            json!({"name": "x", "dtype": "f24", "shape": [2], "device": "cpu", "buffer": 0, "bytes": 8}),
            "`f24` is not a dtype",
        ),
        (
            json!({"name": "x", "dtype": "f32", "shape": [2], "device": "tpu:0", "buffer": 0, "bytes": 8}),
            "`tpu:0` is not a device",
        ),
        (
            json!({"name": "x", "dtype": "f32", "shape": [2], "device": "cpu", "buffer": 1, "bytes": 8}),
            "out of range",
        ),
        (
            json!({"name": "x", "dtype": "f32", "shape": [2], "device": "cpu", "buffer": 0, "bytes": 8, "checksum": "zz"}),
            "not a checksum",
        ),
        (
            json!({"name": "x", "dtype": "f32", "shape": [2], "strides": [5], "device": "cpu", "buffer": 0, "bytes": 8}),
            "reaches byte",
        ),
        (
            json!({"name": "x", "dtype": "f32", "shape": [2, 2], "strides": [1], "device": "cpu", "buffer": 0, "bytes": 8}),
            "dimensions",
        ),
    ];
    for (desc, want) in cases {
        let err = dec(&frame_with_header(&header_with(desc.clone()), &[&[0u8; 8]]))
            .expect_err("bad descriptor");
        let msg = err.to_string();
        assert!(msg.contains(want), "{desc}: {msg}");
        if !msg.contains("dimensions") {
            assert!(msg.contains("tensor `x`"), "errors name the tensor: {msg}");
        }
    }
}

#[test]
fn rejects_duplicate_names_unused_buffers_and_reused_buffers() {
    let two = |a: serde_json::Value, b: serde_json::Value| header_of(&[a, b]);
    let mut second = good_desc();
    second["buffer"] = json!(1);
    let dup = frame_with_header(&two(good_desc(), second.clone()), &[&[0u8; 8], &[0u8; 8]]);
    assert!(matches!(dec(&dup), Err(Error::DuplicateName { .. })));
    second["name"] = json!("y");
    second["buffer"] = json!(0);
    let reused = frame_with_header(&two(good_desc(), second), &[&[0u8; 8]]);
    assert!(dec(&reused)
        .expect_err("reused")
        .to_string()
        .contains("used twice"));
    let unused = frame_with_header(&header_with(good_desc()), &[&[0u8; 8], &[1u8; 3]]);
    assert!(dec(&unused)
        .expect_err("unused")
        .to_string()
        .contains("not used"));
    let m = Message::new()
        .tensor("a", Tensor::zeros(DType::U8, &[1]).expect("t"))
        .tensor("a", Tensor::zeros(DType::U8, &[1]).expect("t"));
    assert!(matches!(
        encode(&m, &FrameMeta::message("/t", 0), EncodeOptions::default()),
        Err(Error::DuplicateName { .. })
    ));
}

#[test]
fn rejects_headers_that_are_not_the_expected_json() {
    for header in [
        "not json".to_string(),
        "[]".to_string(),
        "{\"channel\": \"/t\"".to_string(),
        json!({"channel": "/t", "seq": 1, "kind": "message", "fields": {}, "tensors": columns(&[]), "extra": 1}).to_string(),
        json!({"channel": "/t", "seq": 1, "kind": "message", "tensors": columns(&[])}).to_string(),
        json!({"channel": "/t", "seq": -1, "kind": "message", "fields": {}, "tensors": columns(&[])}).to_string(),
        json!({"channel": "/t", "seq": 1, "kind": "shout", "fields": {}, "tensors": columns(&[])}).to_string(),
        json!({"channel": "/t", "seq": 1, "kind": "message", "fields": {}, "tensors": []}).to_string(),
        json!({"channel": "/t", "seq": 1, "kind": "message", "fields": {},
               "tensors": {"name": ["x"], "dtype": [], "shape": [[2]], "device": ["cpu"], "buffer": [0], "bytes": [8]}}).to_string(),
        header_with(json!({"name": "x", "dtype": "f32", "shape": [2], "device": "cpu", "buffer": 0, "bytes": 8, "more": 1})),
        header_with(json!({"name": "x", "dtype": "f32", "shape": [2], "buffer": 0, "bytes": 8})),
        "{\"channel\": \"/t\", \"channel\": \"/u\", \"seq\": 1, \"kind\": \"message\", \"fields\": {}, \"tensors\": []}".to_string(),
    ] {
        let err = dec(&frame_with_header(&header, &[])).expect_err(&header);
        assert!(matches!(err, Error::Header { .. } | Error::Frame { .. }), "{header}: {err}");
    }
    let mut f = frame_with_header("{\"a\": \"\u{e9}\"}", &[]);
    f[PRELUDE_BYTES + 7] = 0xff;
    assert!(dec(&f).expect_err("utf-8").to_string().contains("UTF-8"));
}

#[test]
fn enforces_configured_limits_before_allocating() {
    let bytes = bytes_of(&sample(), EncodeOptions::default());
    let region = HostBuffer::copy_from(&bytes);
    let tight = |f: fn(&mut Limits)| {
        let mut l = Limits::default();
        f(&mut l);
        decode(&region, &l)
    };
    assert!(matches!(
        tight(|l| l.max_header_bytes = 16),
        Err(Error::Limit {
            what: "header size",
            ..
        })
    ));
    assert!(matches!(
        tight(|l| l.max_tensors = 2),
        Err(Error::Limit {
            what: "tensor count",
            ..
        })
    ));
    assert!(matches!(
        tight(|l| l.max_buffers = 2),
        Err(Error::Limit {
            what: "buffer count",
            ..
        })
    ));
    assert!(matches!(
        tight(|l| l.max_message_bytes = 64),
        Err(Error::Limit {
            what: "frame size",
            ..
        })
    ));
}

#[test]
fn copying_a_frame_into_a_region_gives_the_bytes_a_stream_gets() {
    // One buffer large enough to be copied in pieces on several threads.
    let big: Vec<u8> = (0..(9 << 20) + 13).map(|i| (i * 31 % 251) as u8).collect();
    let m = Message::new()
        .tensor("big", Tensor::from_slice(&big, &[big.len()]).expect("big"))
        .tensor(
            "small",
            Tensor::from_slice(&[1u16, 2, 3], &[3]).expect("small"),
        );
    let enc = encode(
        &m,
        &FrameMeta::message("/c", 4),
        EncodeOptions {
            checksums: true,
            ..EncodeOptions::default()
        },
    )
    .expect("encode");
    let mut streamed = Vec::new();
    write_frame(&enc, &mut streamed).expect("write");
    let mut region = vec![0xAAu8; enc.frame_len() as usize];
    copy_frame_into(&enc, &mut region).expect("copy");
    assert_eq!(region, streamed, "padding zeroed, every byte in place");
    let mut short = vec![0u8; region.len() - 64];
    assert!(copy_frame_into(&enc, &mut short).is_err());
}
