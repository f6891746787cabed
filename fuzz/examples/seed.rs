//! Writes the seed corpus: frames made by `wire::encode` into
//! `corpus/decode_frame/`, and their headers and buffers (in the input format
//! of `decode_header`) into `corpus/decode_header/`; compact headers and
//! their buffers (the same input format) into `corpus/decode_compact/`; and
//! handshakes, right and wrong, from either side into `corpus/handshake/`.
//!
//! Run from `fuzz/`: `cargo run --example seed` (or pass the corpus folder).

use std::error::Error as StdError;
use std::fs;
use std::path::PathBuf;

use serde_json::{json, Value};
use tensorferry_device_map::Device;
use tensorferry_engine::auth::ANSWER_BYTES;
use tensorferry_engine::outbound::write_frame;
use tensorferry_engine::wire::{
    decode, encode, encode_staged, EncodeOptions, FrameMeta, Kind, Limits, Origin, PRELUDE_BYTES,
};
use tensorferry_engine::{Codec, DType, HostBuffer, Message, Result, Tensor};
use tensorferry_fuzz::handshake::{self, dialer_input, listener_input, Mode, Outcome};
use tensorferry_fuzz::{
    build_frame, check_frame, decode_compact_and_check, header_input, set_tensor_key,
};

/// A codec with a JSON part and two buffers, for an object in a seed.
struct PoseCodec;

impl Codec for PoseCodec {
    type Value = (String, [f32; 3], Vec<u8>);

    fn tag(&self) -> &str {
        "seed.pose/1"
    }

    fn encode(&self, v: &Self::Value) -> Result<(Value, Vec<HostBuffer>)> {
        let xyz: Vec<u8> = v.1.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok((
            json!({"frame": v.0}),
            vec![HostBuffer::copy_from(&xyz), HostBuffer::copy_from(&v.2)],
        ))
    }

    fn decode(&self, _: &Value, _: &[HostBuffer]) -> Result<Self::Value> {
        Err(tensorferry_engine::Error::Invalid(
            "seed codec only encodes".into(),
        ))
    }
}

/// A seed: a frame's header and buffers.
struct Seed {
    name: &'static str,
    header: Vec<u8>,
    buffers: Vec<HostBuffer>,
}

fn encoded(name: &'static str, m: &Message, meta: FrameMeta, checksums: bool) -> Result<Seed> {
    let enc = encode(
        m,
        &meta,
        EncodeOptions {
            checksums,
            ..EncodeOptions::default()
        },
    )?;
    let len = u32::from_le_bytes([enc.head()[8], enc.head()[9], enc.head()[10], enc.head()[11]]);
    Ok(Seed {
        name,
        header: enc.head()[PRELUDE_BYTES..PRELUDE_BYTES + len as usize].to_vec(),
        buffers: enc
            .buffers()
            .iter()
            .filter_map(|b| b.host().cloned())
            .collect(),
    })
}

fn seeds() -> std::result::Result<Vec<Seed>, Box<dyn StdError>> {
    let grid = Tensor::from_slice(&(0..12).map(|i| i as f32).collect::<Vec<_>>(), &[3, 4])?;
    let halves: Vec<u8> = (0u8..16).collect();
    let full = Message::new()
        .field("step", 17)
        .field("note", "seed")
        .field(
            "nested",
            json!({"a": [1, 2.5, null, true], "b": {"c": "d"}}),
        )
        .tensor("grid", grid.clone())
        .tensor("grid_t", grid.transpose(0, 1)?.narrow(0, 1, 3)?)
        .tensor(
            "mask",
            Tensor::from_host(DType::Bool, &[3], HostBuffer::copy_from(&[1, 0, 1]))?,
        )
        .tensor("ids", Tensor::from_slice(&[7i64, -1], &[2])?)
        .tensor("scalar", Tensor::from_slice(&[3u16], &[])?)
        .tensor(
            "half",
            Tensor::from_host(DType::BF16, &[2, 4], HostBuffer::copy_from(&halves))?,
        )
        .tensor("empty", Tensor::zeros(DType::F16, &[0, 5])?)
        .object(
            "pose",
            &PoseCodec,
            &("map".into(), [1.0, 2.0, 3.0], vec![9; 5]),
        )?;
    let request = Message::new()
        .field("q", "sum")
        .tensor("x", Tensor::from_slice(&[0.5f64, 1.5, -2.0], &[3])?)
        .tensor(
            "f8",
            Tensor::from_host(DType::F8E4M3, &[2], HostBuffer::copy_from(&[0x38, 0xb8]))?,
        );
    let reply =
        Message::new().object("pose", &PoseCodec, &("odom".into(), [0.0; 3], Vec::new()))?;

    let mut out = vec![
        encoded("message", &full, FrameMeta::message("/camera", 17), true)?,
        encoded(
            "request",
            &request,
            FrameMeta {
                channel: "/svc/sum".into(),
                seq: 3,
                kind: Kind::Request,
                id: Some(41),
            },
            false,
        )?,
        encoded(
            "reply",
            &reply,
            FrameMeta {
                channel: "/svc/pose".into(),
                seq: 4,
                kind: Kind::Reply,
                id: Some(41),
            },
            true,
        )?,
        encoded(
            "error",
            &Message::new().field("error", "no such service"),
            FrameMeta {
                channel: "/svc/none".into(),
                seq: 0,
                kind: Kind::Error,
                id: Some(2),
            },
            false,
        )?,
    ];

    // Senders never write `strides`, but decoders accept them: the message
    // header again, with the first tensor described as a transposed view.
    let mut header: Value = serde_json::from_slice(&out[0].header)?;
    let edited = set_tensor_key(&mut header, 0, "shape", Some(json!([4, 3])))
        && set_tensor_key(&mut header, 0, "strides", Some(json!([1, 4])))
        && set_tensor_key(&mut header, 0, "checksum", None);
    if !edited {
        return Err("the message seed has no tensor 0".into());
    }
    // And as a broadcast: every row of a 4 × 3 view is the first row (a
    // stride of 0), 12 elements shown out of 12 sent.
    let mut broadcast = header.clone();
    if !set_tensor_key(&mut broadcast, 0, "strides", Some(json!([0, 1]))) {
        return Err("the message seed has no tensor 0".into());
    }
    out.push(Seed {
        name: "broadcast",
        header: serde_json::to_vec(&broadcast)?,
        buffers: out[0].buffers.clone(),
    });
    out.push(Seed {
        name: "strided",
        header: serde_json::to_vec(&header)?,
        buffers: out[0].buffers.clone(),
    });
    Ok(out)
}

fn main() -> std::result::Result<(), Box<dyn StdError>> {
    let corpus = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let frames = corpus.join("decode_frame");
    let headers = corpus.join("decode_header");
    fs::create_dir_all(&frames)?;
    fs::create_dir_all(&headers)?;
    for seed in seeds()? {
        let buffers: Vec<&[u8]> = seed.buffers.iter().map(HostBuffer::as_slice).collect();
        let frame = build_frame(&seed.header, &buffers);
        // Every seed must decode and pass the targets' checks.
        let decoded = decode(&HostBuffer::copy_from(&frame), &Limits::default())?;
        check_frame(&decoded, frame.len());
        fs::write(frames.join(format!("seed-{}", seed.name)), &frame)?;
        fs::write(
            headers.join(format!("seed-{}", seed.name)),
            header_input(&seed.header, &buffers),
        )?;
        println!(
            "seed-{}: frame {} bytes, header {} bytes",
            seed.name,
            frame.len(),
            seed.header.len()
        );
    }
    // Nodes write compact headers on their connections: whole frames of
    // those for the frame target (flag bit 0 of the prelude set).
    let grid = Tensor::from_slice(&(0..6).map(|i| i as f32).collect::<Vec<_>>(), &[2, 3])?;
    let compact_seeds = [
        (
            "compact-request",
            Message::new().tensor("x", grid.clone()),
            FrameMeta {
                channel: "/svc/echo".into(),
                seq: 0,
                kind: Kind::Request,
                id: Some(9),
            },
        ),
        (
            "compact-message",
            Message::new()
                .field("step", 3)
                .field("tags", json!(["a", {"b": null}]))
                .tensor("grid", grid.clone())
                .tensor("grid_t", grid.transpose(0, 1)?)
                .tensor("ids", Tensor::from_slice(&[7i64, -1], &[2])?),
            FrameMeta::message("/camera", 17),
        ),
    ];
    for (name, m, meta) in compact_seeds {
        let enc = encode(
            &m,
            &meta,
            EncodeOptions {
                checksums: true,
                compact: true,
            },
        )?;
        let mut frame = Vec::new();
        write_frame(&enc, &mut frame)?;
        let decoded = decode(&HostBuffer::copy_from(&frame), &Limits::default())?;
        check_frame(&decoded, frame.len());
        fs::write(frames.join(format!("seed-{name}")), &frame)?;
        println!("seed-{name}: frame {} bytes", frame.len());
    }
    write_compact_seeds(&corpus.join("decode_compact"))?;
    write_handshake_seeds(&corpus.join("handshake"))?;
    Ok(())
}

/// A compact header and its buffers, as a node writes them: `origins`
/// says what the sender says of each tensor (device, cast, checksum).
fn compact_seed(
    m: &Message,
    origins: Option<&[Origin]>,
    meta: &FrameMeta,
    checksums: bool,
) -> Result<Vec<u8>> {
    let options = EncodeOptions {
        checksums,
        compact: true,
    };
    let enc = match origins {
        Some(o) => encode_staged(m, o, meta, options)?,
        None => encode(m, meta, options)?,
    };
    let head = enc.head();
    let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    let buffers: Vec<&[u8]> = enc
        .buffers()
        .iter()
        .filter_map(|b| b.host().map(HostBuffer::as_slice))
        .collect();
    Ok(header_input(
        &head[PRELUDE_BYTES..PRELUDE_BYTES + len],
        &buffers,
    ))
}

/// Compact headers of every kind, with and without ids, fields,
/// checksums, casts and other devices, into `dir`; each must decode and
/// pass the `decode_compact` checks.
fn write_compact_seeds(dir: &std::path::Path) -> std::result::Result<(), Box<dyn StdError>> {
    fs::create_dir_all(dir)?;
    let grid = Tensor::from_slice(&(0..6).map(|i| i as f32).collect::<Vec<_>>(), &[2, 3])?;
    let halves = Tensor::from_host(
        DType::BF16,
        &[2, 2],
        HostBuffer::copy_from(&[0x80, 0x3f, 0, 0x40, 0x40, 0x40, 0x80, 0x40]),
    )?;
    let f8 = Tensor::from_host(DType::F8E4M3, &[2], HostBuffer::copy_from(&[0x38, 0xb8]))?;
    let staged = Message::new()
        .field("step", 9)
        .tensor("activations", halves)
        .tensor("scale", f8)
        .tensor("ids", Tensor::from_slice(&[7u32, 8, 9], &[3])?);
    let origins = [
        Origin {
            device: Device::Cuda(0),
            cast_from: Some(DType::F32),
            checksum: None,
        },
        Origin {
            device: Device::Wgpu(1),
            cast_from: Some(DType::F32),
            checksum: None,
        },
        Origin {
            device: Device::Cpu,
            cast_from: None,
            checksum: None,
        },
    ];
    let meta = |channel: &str, seq, kind, id| FrameMeta {
        channel: channel.into(),
        seq,
        kind,
        id,
    };
    let seeds = [
        (
            "request",
            compact_seed(
                &Message::new().tensor("x", grid.clone()),
                None,
                &meta("/svc/echo", 0, Kind::Request, Some(9)),
                false,
            )?,
        ),
        (
            "message",
            compact_seed(
                &Message::new()
                    .field("step", 3)
                    .field("tags", json!(["a", {"b": null}, -4]))
                    .tensor("grid", grid.clone())
                    .tensor("grid_t", grid.transpose(0, 1)?)
                    .tensor("ids", Tensor::from_slice(&[7i64, -1], &[2])?)
                    .tensor("scalar", Tensor::from_slice(&[3u16], &[])?)
                    .tensor("empty", Tensor::zeros(DType::F16, &[0, 5])?)
                    .tensor(
                        "mask",
                        Tensor::from_host(DType::Bool, &[3], HostBuffer::copy_from(&[1, 0, 1]))?,
                    ),
                None,
                &FrameMeta::message("/camera", 17),
                true,
            )?,
        ),
        (
            "staged",
            compact_seed(
                &staged,
                Some(&origins),
                &meta("/activations", u64::MAX, Kind::Reply, Some(u64::MAX)),
                true,
            )?,
        ),
        (
            "float-fields",
            compact_seed(
                &Message::new()
                    .field("lr", 0.001)
                    .field("loss", json!([1.5e-7, -2.25]))
                    .tensor("w", Tensor::from_slice(&[0.5f64], &[1])?),
                None,
                &meta("/weights", 2, Kind::Message, None),
                false,
            )?,
        ),
        (
            "error",
            compact_seed(
                &Message::new()
                    .field("code", "busy")
                    .field("message", "try again"),
                None,
                &meta("/svc/echo", 1, Kind::Error, Some(9)),
                false,
            )?,
        ),
        (
            "subscribe",
            compact_seed(
                &Message::new(),
                None,
                &meta("*", 0, Kind::Subscribe, None),
                false,
            )?,
        ),
        (
            "shm",
            compact_seed(
                &Message::new()
                    .field("slot", 3)
                    .field("offset", 4096)
                    .field("len", 640)
                    .field("fd", true),
                None,
                &meta("/camera", 5, Kind::Shm, None),
                false,
            )?,
        ),
    ];
    for (name, input) in seeds {
        let decoded = decode_compact_and_check(&input);
        if decoded == 0 {
            return Err(format!("the compact seed {name} does not decode").into());
        }
        fs::write(dir.join(format!("seed-{name}")), &input)?;
        println!("seed-{name}: compact input {} bytes", input.len());
    }
    Ok(())
}

/// Handshakes from either side, each with the outcome it must have, into `dir`.
fn write_handshake_seeds(dir: &std::path::Path) -> std::result::Result<(), Box<dyn StdError>> {
    fs::create_dir_all(dir)?;
    // An answer's shape: `TFAU`, a nonce, and a tag of zeros (which the
    // signing modes turn into the right tag).
    let mut answer = b"TFAU".to_vec();
    answer.extend_from_slice(&[0x5a; 32]);
    answer.extend_from_slice(&[0; 32]);
    let mut answer_then_frame = answer.clone();
    answer_then_frame.extend_from_slice(b"TFRM\x01\x00\x01\x00");
    let mut challenge = b"TFAU".to_vec();
    challenge.extend_from_slice(&[0xa5; 32]);
    let mut bad_tag = answer.clone();
    bad_tag[ANSWER_BYTES - 1] = 1;
    let mut frame = b"TFRM".to_vec();
    frame.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
    frame.resize(64, 0);
    let sign = Mode::SIGN;
    let seeds: [(&str, Vec<u8>, Outcome); 15] = [
        (
            "listener-signed",
            listener_input(sign, &[], &answer),
            Outcome::Accepted,
        ),
        (
            "listener-signed-pieces",
            listener_input(
                sign | Mode::LONG_SECRET,
                &[1, 3, 0, 30, 7],
                &answer_then_frame,
            ),
            Outcome::Accepted,
        ),
        (
            "listener-bad-tag",
            listener_input(sign, &[], &bad_tag),
            Outcome::Refused,
        ),
        (
            "listener-unsigned",
            listener_input(0, &[9], &answer),
            Outcome::Refused,
        ),
        (
            "listener-dialer",
            listener_input(Mode::DIALER_ANSWER, &[36], &[]),
            Outcome::Accepted,
        ),
        (
            "listener-dialer-frame",
            listener_input(Mode::DIALER_ANSWER, &[], &{
                let mut f = vec![0; ANSWER_BYTES];
                f.extend_from_slice(&frame);
                f
            }),
            Outcome::Accepted,
        ),
        (
            "listener-other-secret",
            listener_input(Mode::DIALER_ANSWER | Mode::OTHER_SECRET, &[], &[]),
            Outcome::Refused,
        ),
        // A peer without a secret sends its first frame.
        (
            "listener-frame",
            listener_input(0, &[2, 2], &frame),
            Outcome::Refused,
        ),
        (
            "listener-short",
            listener_input(sign, &[], &answer[..50]),
            Outcome::Incomplete,
        ),
        (
            "dialer-signed",
            dialer_input(sign, &challenge, &[0; 32]),
            Outcome::Accepted,
        ),
        (
            "dialer-signed-long",
            dialer_input(sign | Mode::LONG_SECRET, &challenge, &[0; 32]),
            Outcome::Accepted,
        ),
        (
            "dialer-wrong-proof",
            dialer_input(0, &challenge, &[0; 32]),
            Outcome::Refused,
        ),
        (
            "dialer-long-proof",
            dialer_input(sign, &challenge, &[0; 33]),
            Outcome::Refused,
        ),
        (
            "dialer-short-challenge",
            dialer_input(sign, &challenge[..35], &[0; 32]),
            Outcome::Refused,
        ),
        // A listener without a secret: the dialer reads a frame's first bytes.
        (
            "dialer-frame",
            dialer_input(sign, &frame[..36], &frame[36..]),
            Outcome::Refused,
        ),
    ];
    for (name, input, want) in seeds {
        let got = handshake::run(&input);
        if got != want {
            return Err(format!("the handshake seed {name} ends {got:?}, not {want:?}").into());
        }
        fs::write(dir.join(format!("seed-{name}")), &input)?;
        println!(
            "seed-{name}: handshake input {} bytes, {want:?}",
            input.len()
        );
    }
    Ok(())
}
