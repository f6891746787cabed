//! A forwarder between `tensorferry send` and a receiver that flips bytes
//! of the frames it relays, as a faulty link or middlebox would past TCP's
//! own checksum. With checksums on, every message whose tensor bytes were
//! flipped is rejected, naming its channel, sequence number and tensor, and
//! every other one is delivered with every byte intact; flips in a frame's
//! head end its connection or reject its message, and the receiver goes on
//! serving. The figures are in docs/reliability.md.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tensorferry::engine::pattern;
use tensorferry::{ChannelConfig, Error, Node, ALL_CHANNELS};

mod common;
use common::{bin, finish, long, run_seed, spawn_listening, Reaped, Rng};

const WAIT: Duration = Duration::from_secs(60);
const CHANNEL: &str = "/corrupt";
/// The tensors of every message, in message order: name, dtype, shape.
const TENSORS: [(&str, &str); 2] = [("x", "f32:96x128"), ("y", "u8:30011")];

// ---------------------------------------------------------------------------
// Reading frames as they pass.

fn align(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// What the forwarder knows of a frame once its head has passed.
#[derive(Debug, Clone)]
struct FrameInfo {
    /// The header's kind code (compact form: 0 is a published message).
    kind: u8,
    seq: u64,
    /// Bytes of the head: prelude, header, buffer table and padding.
    head_len: u64,
    /// Where the header ends (the rest of the head is table and padding).
    header_end: u64,
    /// Each buffer's bytes within the frame, and the tensor it holds.
    buffers: Vec<(std::ops::Range<u64>, String)>,
}

/// Reads a compact header far enough to name each buffer's tensor.
fn tensor_names(header: &[u8], count: usize) -> Vec<(u64, String)> {
    let mut at = 0;
    let take = |at: &mut usize, n: usize| {
        let s = &header[*at..*at + n];
        *at += n;
        s
    };
    let string = |at: &mut usize| {
        let n = u32_at(header, *at) as usize;
        *at += 4;
        let s = String::from_utf8_lossy(&header[*at..*at + n]).into_owned();
        *at += n;
        s
    };
    let opts = header[1];
    at += 10;
    if opts & 1 != 0 {
        at += 8;
    }
    let _channel = string(&mut at);
    let _fields = string(&mut at);
    let n = u32_at(header, at) as usize;
    at += 4;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name = string(&mut at);
        let _dtype = string(&mut at);
        let _device = string(&mut at);
        let rank = take(&mut at, 1)[0] as usize;
        at += 8 * rank;
        let buffer = u64_at(header, at);
        at += 16;
        if opts & 2 != 0 {
            let _sum = string(&mut at);
        }
        if opts & 4 != 0 {
            let _cast = string(&mut at);
        }
        out.push((buffer, name));
    }
    assert_eq!(out.len(), count, "one tensor per buffer");
    out
}

/// Decides, for each frame, which of its bytes to flip: `(offset in the
/// frame, XOR mask)`.
type Plan = Box<dyn FnMut(&FrameInfo) -> Vec<(u64, u8)> + Send>;

/// Relays frames from `from` to `to`, flipping the bytes `plan` picks.
/// Returns at the end of `from`'s stream, or when `to` fails.
fn relay(from: &mut TcpStream, to: &mut TcpStream, plan: &mut Plan) -> io::Result<()> {
    let mut prelude = [0u8; 32];
    loop {
        match from.read_exact(&mut prelude) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        assert_eq!(&prelude[..4], b"TFRM", "the forwarder lost the stream");
        let header_len = u64::from(u32_at(&prelude, 8));
        let count = u32_at(&prelude, 12) as usize;
        let frame_len = u64_at(&prelude, 16);
        let table = align(32 + header_len, 8);
        let head_len = align(table + 8 * count as u64, 64);
        let mut head = vec![0u8; head_len as usize];
        head[..32].copy_from_slice(&prelude);
        from.read_exact(&mut head[32..])?;
        let header = &head[32..32 + header_len as usize];
        let compact = u16::from_le_bytes([prelude[6], prelude[7]]) & 1 != 0;
        assert!(compact, "nodes send compact headers");
        let names: BTreeMap<u64, String> = tensor_names(header, count).into_iter().collect();
        let mut start = head_len;
        let mut buffers = Vec::with_capacity(count);
        for i in 0..count {
            let len = u64_at(&head, table as usize + 8 * i);
            buffers.push((start..start + len, names[&(i as u64)].clone()));
            start += align(len, 64);
        }
        let info = FrameInfo {
            kind: header[0],
            seq: u64_at(header, 2),
            head_len,
            header_end: 32 + header_len,
            buffers,
        };
        let flips = plan(&info);
        let flip = |chunk: &mut [u8], at: u64| {
            for &(off, mask) in &flips {
                if (at..at + chunk.len() as u64).contains(&off) {
                    chunk[(off - at) as usize] ^= mask;
                }
            }
        };
        flip(&mut head, 0);
        to.write_all(&head)?;
        let mut at = head_len;
        let mut chunk = vec![0u8; 64 << 10];
        while at < frame_len {
            let n = ((frame_len - at) as usize).min(chunk.len());
            from.read_exact(&mut chunk[..n])?;
            flip(&mut chunk[..n], at);
            to.write_all(&chunk[..n])?;
            at += n as u64;
        }
    }
}

/// A forwarder on 127.0.0.1: each connection it accepts is relayed to
/// `target` (the receiver's bytes back untouched), its frames through `plan`.
struct Forwarder {
    addr: String,
}

impl Forwarder {
    fn start(
        target: &str,
        plan: impl FnMut(&FrameInfo) -> Vec<(u64, u8)> + Send + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = format!("tcp://{}", listener.local_addr().expect("addr"));
        let target = target.trim_start_matches("tcp://").to_string();
        let plan: Arc<Mutex<Plan>> = Arc::new(Mutex::new(Box::new(plan)));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = TcpStream::connect(&target) else {
                    return;
                };
                let (mut back_from, mut back_to) = (
                    server.try_clone().expect("clone"),
                    client.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = io::copy(&mut back_from, &mut back_to);
                    let _ = back_to.shutdown(Shutdown::Write);
                });
                let plan = Arc::clone(&plan);
                std::thread::spawn(move || {
                    let mut plan = plan.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = relay(&mut client, &mut server, &mut plan);
                    let _ = server.shutdown(Shutdown::Write);
                });
            }
        });
        Forwarder { addr }
    }
}

fn sender(to: &str, count: u64, seed: u64) -> std::process::Command {
    let mut cmd = bin();
    cmd.args([
        "send",
        "--to",
        to,
        "--channel",
        CHANNEL,
        "--count",
        &count.to_string(),
        "--seed",
        &seed.to_string(),
        "--checksum",
    ]);
    for (name, spec) in TENSORS {
        cmd.args(["--tensor", &format!("{name}={spec}")]);
    }
    cmd
}

// ---------------------------------------------------------------------------
// Flipped tensor bytes.

/// `message N on `CHANNEL`` and `tensor `NAME`` from a rejection.
fn rejected_seq_and_tensor(text: &str) -> (u64, String) {
    let seq = text
        .split("message ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sequence number in: {text}"));
    let tensor = text
        .split("tensor `")
        .nth(1)
        .and_then(|t| t.split('`').next())
        .unwrap_or_else(|| panic!("no tensor in: {text}"))
        .to_string();
    (seq, tensor)
}

#[test]
fn every_message_with_flipped_tensor_bytes_is_rejected_naming_channel_seq_and_tensor() {
    let count: u64 = if long() { 5000 } else { 400 };
    let seed = run_seed();
    println!("seed {seed} (TENSORFERRY_TEST_SEED repeats this run)");
    let config =
        std::env::temp_dir().join(format!("tensorferry-corrupt-{}.json", std::process::id()));
    std::fs::write(
        &config,
        format!(r#"{{"channels": {{"{CHANNEL}": {{"checksum": true}}}}}}"#),
    )
    .expect("config");
    let (recv, addr) = spawn_listening(&[
        "recv",
        "--listen",
        "tcp://127.0.0.1:0",
        "--config",
        config.to_str().expect("utf-8"),
        "--count",
        &count.to_string(),
        "--verify",
        "--seed",
        "5",
        "--json",
        "--idle-timeout",
        "60",
    ]);
    let recv = Reaped::new(recv);
    // Half the messages get one to three bytes flipped, in one or both
    // tensors; the first tensor flipped is the one a rejection names.
    let corrupted: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    let flips = Arc::new(Mutex::new(0u64));
    let mut rng = Rng::new(seed);
    let fwd = {
        let corrupted = Arc::clone(&corrupted);
        let flips = Arc::clone(&flips);
        Forwarder::start(&addr, move |f| {
            if f.kind != 0 || f.buffers.is_empty() || rng.below(2) == 0 {
                return Vec::new();
            }
            let n = 1 + rng.below(3);
            let mut out: Vec<(u64, u8)> = (0..n)
                .map(|_| {
                    let (range, _) = &f.buffers[rng.below(f.buffers.len() as u64) as usize];
                    let off = range.start + rng.below(range.end - range.start);
                    (off, 1 + rng.below(255) as u8)
                })
                .collect();
            out.sort_unstable();
            out.dedup_by_key(|(off, _)| *off);
            let first = f
                .buffers
                .iter()
                .find(|(r, _)| out.iter().any(|(o, _)| r.contains(o)))
                .map(|(_, name)| name.clone())
                .expect("a flip lies in a tensor");
            *flips.lock().expect("lock") += out.len() as u64;
            corrupted.lock().expect("lock").insert(f.seq, first);
            out
        })
    };
    let start = Instant::now();
    let out = sender(&fwd.addr, count, 5).output().expect("send");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (out, v) = finish(recv.into_inner());
    let elapsed = start.elapsed();
    let _ = std::fs::remove_file(&config);
    let corrupted = corrupted.lock().expect("lock").clone();
    let rejected: Vec<String> = v["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| r.as_str().expect("text").to_string())
        .collect();
    // Every corrupted message was rejected, and named: its channel, its
    // sequence number, the tensor whose bytes were flipped.
    let mut named = BTreeMap::new();
    for r in &rejected {
        assert!(
            r.contains(&format!("on `{CHANNEL}`")) && r.contains("checksum mismatch"),
            "{r}"
        );
        let (seq, tensor) = rejected_seq_and_tensor(r);
        assert!(named.insert(seq, tensor).is_none(), "rejected twice: {r}");
    }
    assert_eq!(named, corrupted, "rejections against corruptions");
    // Every other one was delivered, every byte intact.
    let delivered = v["messages"].as_u64().expect("messages");
    assert_eq!(delivered, count - corrupted.len() as u64, "{v}");
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["mismatches"], serde_json::json!([]));
    assert_eq!(out.status.code(), Some(1), "rejections make recv exit 1");
    println!(
        "{count} messages sent through the forwarder in {:.1} s: {} corrupted ({} bytes flipped in tensor payloads), \
         {} rejected naming channel, seq and tensor, {delivered} delivered and verified byte for byte",
        elapsed.as_secs_f64(),
        corrupted.len(),
        flips.lock().expect("lock"),
        rejected.len(),
    );
}

// ---------------------------------------------------------------------------
// Flipped head bytes.

/// A message delivered in run `run` is one that was sent: its channel,
/// sequence number, tensors, dtypes, shapes and every byte.
fn check_delivered(run: u64, r: &tensorferry::Received) {
    assert_eq!(
        r.channel, CHANNEL,
        "run {run}: delivered on another channel"
    );
    assert!(r.seq < PER_RUN, "run {run}: seq {} was never sent", r.seq);
    assert_eq!(r.message.tensors().len(), TENSORS.len(), "run {run}");
    for (name, spec) in TENSORS {
        let t = r
            .message
            .get(name)
            .unwrap_or_else(|| panic!("run {run}: no tensor `{name}`"));
        let (dtype, shape) = spec.split_once(':').expect("spec");
        assert_eq!(t.dtype().to_string(), dtype, "run {run}: `{name}`");
        let dims: Vec<usize> = shape.split('x').map(|d| d.parse().expect("dim")).collect();
        assert_eq!(t.shape(), &dims[..], "run {run}: `{name}`");
        let bytes = t.packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(t.dtype(), run, r.seq, name, bytes.as_slice()),
            None,
            "run {run}: message {} tensor `{name}` delivered with wrong bytes",
            r.seq
        );
    }
}

/// A flipped head byte: the message, its offset in the frame, the region.
type Flip = (u64, u64, &'static str);

/// Where in a frame's head a flipped byte lay.
fn region(f: &FrameInfo, off: u64) -> &'static str {
    if off < 32 {
        "prelude"
    } else if off < f.header_end {
        "header"
    } else {
        "table and padding"
    }
}

/// Messages per run of the head test.
const PER_RUN: u64 = 4;

#[test]
fn flipped_head_bytes_end_the_connection_or_reject_the_message_never_deliver_it_wrong() {
    let runs: u64 = if long() { 1000 } else { 100 };
    let per_run = PER_RUN;
    let seed = run_seed();
    println!("seed {seed} (TENSORFERRY_TEST_SEED repeats this run)");
    let mut config = ChannelConfig::new();
    config
        .insert(
            CHANNEL,
            tensorferry::ChannelSpec::default().with_checksum(true),
        )
        .expect("config");
    let receiver = Node::builder()
        .name("receiver")
        .listen("tcp://127.0.0.1:0")
        .channels(config)
        .build()
        .expect("receiver");
    let sub = receiver.subscriber(ALL_CHANNELS);
    let target = receiver.listen_addrs()[0].to_string();
    // In each run, one message frame gets one byte of its head flipped.
    let flipped: Arc<Mutex<Vec<Flip>>> = Arc::default();
    let mut rng = Rng::new(seed);
    let mut frame_no = 0u64;
    let fwd = {
        let flipped = Arc::clone(&flipped);
        Forwarder::start(&target, move |f| {
            if f.kind != 0 || f.buffers.is_empty() {
                return Vec::new();
            }
            frame_no += 1;
            if (frame_no - 1) % per_run != 1 {
                return Vec::new();
            }
            let off = rng.below(f.head_len);
            flipped
                .lock()
                .expect("lock")
                .push((f.seq, off, region(f, off)));
            vec![(off, 1 << rng.below(8))]
        })
    };
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_region: BTreeMap<(&str, String), u64> = BTreeMap::new();
    let start = Instant::now();
    for run in 0..runs {
        let before = receiver.stats();
        let out = sender(&fwd.addr, per_run, run).output().expect("send");
        // What the receiver made of this run: each message delivered (and
        // checked against what was sent), rejected, or never there.
        let mut delivered = BTreeSet::new();
        let mut rejected = Vec::new();
        // The run's connection always ends (the sender exited): until then,
        // and until nothing more is queued, take what arrives.
        let deadline = Instant::now() + WAIT;
        loop {
            let ended = receiver.stats().peers_lost > before.peers_lost;
            match sub.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => {
                    check_delivered(run, &r);
                    assert!(delivered.insert(r.seq), "run {run}: seq {} twice", r.seq);
                }
                Err(e @ Error::Undelivered { .. }) => rejected.push(e.to_string()),
                Err(Error::Timeout { .. }) if ended => break,
                Err(Error::Timeout { .. }) => {}
                Err(e) => panic!("run {run}: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "run {run}: the receiver went quiet"
            );
        }
        let dropped = receiver.stats().rejected > before.rejected;
        let (seq, off, place) = *flipped.lock().expect("lock").last().expect("a flip");
        let outcome = if !rejected.is_empty() {
            assert_eq!(rejected.len(), 1, "run {run}: {rejected:?}");
            assert!(
                rejected[0].contains(&format!("message {seq} on `{CHANNEL}`")),
                "run {run}: {rejected:?}"
            );
            "message rejected"
        } else if delivered.len() == per_run as usize {
            // A flip the frame does not depend on (padding): all intact.
            "delivered intact"
        } else {
            // The connection ended at the flipped frame: what came before
            // it was delivered, nothing of it or after it. The sender was
            // told it lost its receiver, unless every message had gone into
            // its socket before the receiver closed it (nothing is
            // acknowledged).
            assert!(dropped, "run {run}: messages missing, and the receiver did not drop the connection: {delivered:?}");
            assert_eq!(
                delivered,
                (0..seq).collect(),
                "run {run} (flip at byte {off} of message {seq}'s {place})"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() || err.contains("a receiver was lost"),
                "run {run}: {err}"
            );
            "connection ended"
        };
        *outcomes.entry(outcome.into()).or_default() += 1;
        *by_region.entry((place, outcome.into())).or_default() += 1;
    }
    // Still serving: the node took every run's connection and goes on.
    println!(
        "{runs} runs of {per_run} messages, one head byte flipped in each, in {:.1} s: {outcomes:?}; by region {by_region:?}",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(outcomes.values().sum::<u64>(), runs);
}
