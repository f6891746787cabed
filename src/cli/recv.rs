//! `tensorferry recv`: receive messages, print their summaries, verify their bytes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;
use tensorferry::device_map::{ChannelConfig, ChannelSpec, Device, Inventory, Reason};
use tensorferry::engine::delivery::{Delivery, Direction};
use tensorferry::engine::file::FileReader;
use tensorferry::engine::{pattern, Address, Error, Node, Received, Subscription, ALL_CHANNELS};
use tensorferry::kernels::{cpu, DType};

use super::values::{self, Strict};
use super::{human_bytes, print_json, Outcome, Summary, EXIT_INVALID, INPROC_ELSEWHERE};

/// Options of `tensorferry recv`.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("source").args(["from", "listen"]))]
pub struct Args {
    /// Listen here and receive from every sender that connects: `tcp://HOST:PORT`
    /// (port 0 picks one; the address is printed on stderr). A non-loopback
    /// host such as 0.0.0.0 accepts other machines. Without --listen or
    /// --from, the addresses of the --config file's "node" section are used.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// Receive from here instead: `file://PATH` replays a record file;
    /// `tcp://HOST:PORT` connects to a sender that listens.
    #[arg(long, value_name = "ADDR")]
    from: Option<String>,

    /// Channel configuration (JSON; see `tensorferry check-map`): per channel,
    /// the device map (each tensor lands on the device it maps its sender's
    /// device to, on this host), fallback, `wire_dtype` (cast back on the
    /// target device unless `keep_wire_dtype`), `checksum` (verified on the
    /// target device), queue depth and overflow policy. Also applied to
    /// messages replayed from a file. Its "node" section sets the node
    /// itself: listen addresses, receive budget, limits, progress timeout,
    /// secret file, shm users, busy polling (options given here win).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// A file holding the shared secret every tcp peer must prove it knows
    /// (an HMAC challenge, both ways, before the first message; at least 16
    /// bytes). Without it, the TENSORFERRY_SECRET environment variable is
    /// read. Never write a secret itself on the command line.
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,

    /// Only messages on this channel (default: every channel).
    #[arg(long)]
    channel: Option<String>,

    /// Stop after this many messages (1 or more); a file holding fewer is an error.
    #[arg(long, value_name = "N", value_parser = Strict(values::count), allow_hyphen_values = true)]
    count: Option<u64>,

    /// Give up after this many seconds without a message (network sources;
    /// above 0, at most 604800: a week).
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = Strict(values::seconds), allow_hyphen_values = true)]
    idle_timeout: f64,

    /// Check every byte of every tensor against the content `send --seed` generates,
    /// and every checksum the sender sent; report mismatches by tensor and offset.
    #[arg(long)]
    verify: bool,

    /// Seed the sender used (with --verify; 0 to 2^64-1).
    #[arg(long, default_value_t = 0, value_parser = Strict(values::seed), allow_hyphen_values = true)]
    seed: u64,

    /// Print no per-message line.
    #[arg(long)]
    quiet: bool,

    /// Print the summary as one JSON object: messages, bytes, seconds, gbps, and
    /// the tensors of the last message (name, dtype, shape, device).
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    tls: super::tls::TlsArgs,
}

/// The bytes a tensor sent as `sent` (generated from the seed) should have
/// after travelling as `wire` and being delivered as `delivered`.
fn expected_bytes(
    sent: DType,
    wire: DType,
    delivered: DType,
    shape: &[usize],
    r: &Received,
    seed: u64,
    name: &str,
) -> Result<Vec<u8>, String> {
    let t = pattern::tensor(sent, shape, seed, r.seq, name).map_err(|e| e.to_string())?;
    let mut bytes = t.packed().map_err(|e| e.to_string())?.as_slice().to_vec();
    let mut dtype = sent;
    for next in [wire, delivered] {
        if next != dtype {
            let mut out = vec![0u8; bytes.len() / dtype.size_bytes() * next.size_bytes()];
            cpu::cast(&bytes, dtype, &mut out, next).map_err(|e| e.to_string())?;
            bytes = out;
            dtype = next;
        }
    }
    Ok(bytes)
}

/// Every byte mismatch of one message: each tensor (read back from its
/// device) against the content `send --seed` generates, passed through the
/// same casts it went through. (Checksums were verified when it landed.)
fn verify(r: &Received, seed: u64) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, (name, t)) in r.message.tensors().enumerate() {
        let info = r.tensors.get(i);
        let wire = info.map_or(t.dtype(), |i| i.dtype);
        let sent = info.and_then(|i| i.cast_from).unwrap_or(wire);
        let got = t
            .to_host()
            .and_then(|h| h.packed().map(|b| b.as_slice().to_vec()))
            .map_err(|e| e.to_string());
        let got = match got {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("message {} tensor `{name}`: {e}", r.seq));
                continue;
            }
        };
        let at = if sent == t.dtype() && wire == t.dtype() {
            pattern::first_mismatch(t.dtype(), seed, r.seq, name, &got)
        } else {
            match expected_bytes(sent, wire, t.dtype(), t.shape(), r, seed, name) {
                Ok(want) => want.iter().zip(&got).position(|(a, b)| a != b),
                Err(e) => {
                    problems.push(format!("message {} tensor `{name}`: {e}", r.seq));
                    continue;
                }
            }
        };
        if let Some(at) = at {
            problems.push(format!(
                "message {} tensor `{name}`: byte {at} of {} differs from the content sent with --seed {seed}",
                r.seq,
                got.len()
            ));
        }
    }
    problems
}

/// Adds to the summary's last tensors what the sender's header said: the
/// device each came from and the dtype it travelled in.
fn annotate(summary: &mut Summary, r: &Received) {
    for (entry, info) in summary.last_tensors.iter_mut().zip(&r.tensors) {
        entry["source_device"] = json!(info.device);
        entry["wire_dtype"] = json!(info.dtype);
        entry["checksum_verified"] = json!(info.checksum.is_some());
    }
}

fn describe(r: &Received) -> String {
    let tensors: Vec<String> = r
        .message
        .tensors()
        .map(|(n, t)| {
            format!(
                "{n} {}{:?} on {} ({})",
                t.dtype(),
                t.shape(),
                t.device(),
                human_bytes(t.size_bytes() as u64)
            )
        })
        .collect();
    format!("{} #{}: {}", r.channel, r.seq, tensors.join(", "))
}

/// What the source gave.
enum Next {
    /// A message, its tensors on their target devices.
    Got(Received),
    /// A message that arrived but could not be delivered (a missing target,
    /// a checksum mismatch): reported, and receiving goes on.
    Rejected(String),
    /// The end: the connection or the file failed.
    Failed(String),
}

/// Where messages come from. One per process: the size of its variants
/// does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    File(Replay),
    Net { _node: Node, sub: Subscription },
}

/// A record file, its messages landed as the configuration says.
struct Replay {
    reader: FileReader,
    label: String,
    config: ChannelConfig,
    /// Per channel, and whether its messages land on the host alone.
    stagers: HashMap<(String, bool), Delivery>,
    /// `--channel`: messages of other channels are skipped, not landed.
    only: Option<String>,
}

impl Replay {
    fn land(&mut self, mut r: Received) -> Result<Received, String> {
        let default = ChannelSpec::default();
        let spec = self.config.get(&r.channel).unwrap_or(&default);
        // A message whose every tensor the map sends to the host lands the
        // same whatever devices this host has: its stager gets the CPU as
        // its inventory instead of probing the host, which would start
        // every GPU driver to replay host tensors.
        let host_only = r.tensors.iter().all(|i| lands_on_host(spec, i.device));
        let key = (r.channel.clone(), host_only);
        if !self.stagers.contains_key(&key) {
            let inventory = host_only.then(|| Arc::new(Inventory::cpu_only()));
            let stager =
                Delivery::new(spec, Direction::Forward, inventory).map_err(|e| e.to_string())?;
            self.stagers.insert(key.clone(), stager);
        }
        let (message, _) = self.stagers[&key]
            .land(r.message, &r.tensors)
            .map_err(|e| format!("message {} on {}: {e}", r.seq, r.channel))?;
        r.message = message;
        Ok(r)
    }
}

/// True when `spec` sends tensors from `source` to the host by its own rules
/// (an entry, the default, or keeping a host tensor on the host), not as a
/// fallback for a device this host might lack.
fn lands_on_host(spec: &ChannelSpec, source: Device) -> bool {
    spec.resolve(source, &Inventory::cpu_only()).is_ok_and(|r| {
        r.target == Device::Cpu
            && !matches!(
                r.reason,
                Reason::FallbackCpu { .. } | Reason::FallbackWgpu { .. }
            )
    })
}

impl Source {
    fn next(&mut self, idle: Duration) -> Option<Next> {
        match self {
            Source::File(replay) => replay.reader.next().map(|frame| match frame {
                Err(e) => Next::Failed(e.to_string()),
                Ok(f) => {
                    let r = Received {
                        channel: f.meta.channel,
                        seq: f.meta.seq,
                        message: f.message,
                        tensors: f.tensors,
                        from: replay.label.as_str().into(),
                        first_byte: Instant::now(),
                    };
                    if replay.only.as_ref().is_some_and(|c| *c != r.channel) {
                        // Skipped by the caller's --channel filter.
                        return Next::Got(r);
                    }
                    match replay.land(r) {
                        Ok(r) => Next::Got(r),
                        Err(e) => Next::Rejected(e),
                    }
                }
            }),
            Source::Net { sub, .. } => Some(match sub.recv_timeout(idle) {
                Ok(r) => Next::Got(r),
                Err(Error::Timeout { .. }) => Next::Failed(format!(
                    "no message for {} s (--idle-timeout)",
                    idle.as_secs_f64()
                )),
                Err(Error::PeerLost { peer, reason }) => {
                    Next::Failed(format!("connection to {peer} lost: {reason}"))
                }
                Err(e @ (Error::Undelivered { .. } | Error::Tensor { .. })) => {
                    Next::Rejected(e.to_string())
                }
                Err(e) => Next::Failed(e.to_string()),
            }),
        }
    }
}

fn open(args: &Args) -> Result<(Source, String), String> {
    let config = match &args.config {
        Some(path) => {
            tensorferry::engine::delivery::load_config(path).map_err(|e| e.to_string())?
        }
        None => ChannelConfig::new(),
    };
    let channel = args
        .channel
        .clone()
        .unwrap_or_else(|| ALL_CHANNELS.to_string());
    if args.listen.is_some() || (args.from.is_none() && super::config_listens(&config)) {
        if let Some(text) = &args.listen {
            let addr: Address = text.parse().map_err(|e| format!("--listen: {e}"))?;
            if matches!(addr, Address::File(_)) {
                return Err(
                    "--listen takes a network address; replay a file with --from file://PATH"
                        .into(),
                );
            }
        }
        let node = super::node_builder(
            "recv",
            &config,
            args.secret_file.as_deref(),
            &args.tls,
            args.listen.as_deref(),
        )?
        .build()
        .map_err(|e| e.to_string())?;
        let bound = super::listening(&node);
        eprintln!("listening on {bound}");
        let sub = node.subscriber(channel);
        return Ok((Source::Net { _node: node, sub }, bound));
    }
    let Some(text) = args.from.as_deref() else {
        return Err("say where to receive from: --listen ADDR, --from ADDR, or \"listen\" in the --config file's \"node\" section".into());
    };
    let addr: Address = text.parse().map_err(|e| format!("--from: {e}"))?;
    match &addr {
        Address::File(path) => {
            let reader = FileReader::open(path).map_err(|e| e.to_string())?;
            let replay = Replay {
                reader,
                label: addr.to_string(),
                config,
                stagers: HashMap::new(),
                only: args.channel.clone(),
            };
            Ok((Source::File(replay), addr.to_string()))
        }
        _ => {
            let node = super::node_builder(
                "recv",
                &config,
                args.secret_file.as_deref(),
                &args.tls,
                None,
            )?
            .build()
            .map_err(|e| e.to_string())?;
            let sub = node.subscribe(text, channel).map_err(|e| e.to_string())?;
            Ok((Source::Net { _node: node, sub }, addr.to_string()))
        }
    }
}

/// Refuses an address no sender can reach, before anything is opened.
fn check_address(args: &Args) -> Result<(), String> {
    for (option, text) in [("--listen", &args.listen), ("--from", &args.from)] {
        let Some(text) = text else { continue };
        let addr: Address = text.parse().map_err(|e| format!("{option}: {e}"))?;
        if matches!(addr, Address::Inproc(_)) {
            return Err(format!("{option} {addr}: {INPROC_ELSEWHERE}"));
        }
    }
    Ok(())
}

pub fn run(args: &Args) -> Outcome {
    check_address(args)?;
    // Checked when parsed: positive, and at most a week.
    let idle = Duration::from_secs_f64(args.idle_timeout);
    let (mut source, label) = open(args)?;
    let mut summary = Summary::default();
    let mut first_byte = None;
    let mut problems = Vec::new();
    let mut failure = None;
    let mut rejected = Vec::new();
    let mut arrived = 0u64;
    while args.count.is_none_or(|n| arrived < n) {
        let received = match source.next(idle) {
            None => break,
            Some(Next::Got(r)) => r,
            Some(Next::Rejected(why)) => {
                tracing::warn!("rejected: {why}");
                rejected.push(why);
                arrived += 1;
                continue;
            }
            Some(Next::Failed(e)) => {
                failure = Some(e);
                break;
            }
        };
        if args
            .channel
            .as_ref()
            .is_some_and(|c| *c != received.channel)
        {
            continue;
        }
        arrived += 1;
        let start = *first_byte.get_or_insert(received.first_byte);
        if args.verify {
            problems.extend(verify(&received, args.seed));
        }
        if !args.quiet && !args.json {
            say!("{}", describe(&received));
        }
        summary.record(&received.message, start.elapsed());
        annotate(&mut summary, &received);
    }
    if failure.is_none() {
        if let Some(n) = args.count.filter(|&n| arrived < n) {
            failure = Some(format!("expected {n} messages, {label} holds {arrived}"));
        }
    }
    if args.json {
        let mut v = summary.to_json();
        v["from"] = json!(label);
        if args.verify {
            v["verified"] = json!(problems.is_empty());
            v["mismatches"] = json!(problems);
        }
        v["rejected"] = json!(rejected);
        v["error"] = json!(failure);
        print_json(&v);
    } else {
        say!("received {} from {label}", summary.line());
        if !rejected.is_empty() {
            say!("rejected {} message(s) (reasons on stderr)", rejected.len());
        }
        if args.verify && problems.is_empty() && failure.is_none() {
            say!("verified: every byte of every tensor matches");
        }
    }
    for p in &problems {
        eprintln!("mismatch: {p}");
    }
    if let Some(f) = &failure {
        eprintln!("error: {f}");
        return Ok(ExitCode::from(EXIT_INVALID));
    }
    Ok(if problems.is_empty() && rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
