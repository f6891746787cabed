//! `tensorferry recv`: receive messages, print their summaries, verify their bytes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::json;
use tensorferry::device_map::ChannelConfig;
use tensorferry::engine::file::FileReader;
use tensorferry::engine::wire::verify_checksums;
use tensorferry::engine::{pattern, Address, Error, Node, Received, Subscription, ALL_CHANNELS};

use super::{human_bytes, print_json, Outcome, Summary, EXIT_INVALID};

/// Options of `tensorferry recv`.
#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["from", "listen"]))]
pub struct Args {
    /// Listen here and receive from every sender that connects: `tcp://HOST:PORT`
    /// (port 0 picks one; the address is printed on stderr). A non-loopback
    /// host such as 0.0.0.0 accepts other machines.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// Receive from here instead: `file://PATH` replays a record file;
    /// `tcp://HOST:PORT` connects to a sender that listens.
    #[arg(long, value_name = "ADDR")]
    from: Option<String>,

    /// Channel configuration (JSON; see `tensorferry check-map`): queue depth and overflow policy per channel.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Only messages on this channel (default: every channel).
    #[arg(long)]
    channel: Option<String>,

    /// Stop after this many messages; a file holding fewer is an error.
    #[arg(long)]
    count: Option<u64>,

    /// Give up after this many seconds without a message (network sources).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    idle_timeout: f64,

    /// Check every byte of every tensor against the content `send --seed` generates,
    /// and every checksum the sender sent; report mismatches by tensor and offset.
    #[arg(long)]
    verify: bool,

    /// Seed the sender used (with --verify).
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Print no per-message line.
    #[arg(long)]
    quiet: bool,

    /// Print the summary as one JSON object: messages, bytes, seconds, gbps, and
    /// the tensors of the last message (name, dtype, shape, device).
    #[arg(long)]
    json: bool,
}

/// Every byte mismatch and checksum failure of one message.
fn verify(r: &Received, seed: u64) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = verify_checksums(&r.message, &r.tensors) {
        problems.push(format!("message {}: {e}", r.seq));
    }
    for (name, t) in r.message.tensors() {
        match t.packed() {
            Ok(bytes) => {
                if let Some(at) =
                    pattern::first_mismatch(t.dtype(), seed, r.seq, name, bytes.as_slice())
                {
                    problems.push(format!(
                        "message {} tensor `{name}`: byte {at} of {} differs from the content sent with --seed {seed}",
                        r.seq,
                        bytes.len()
                    ));
                }
            }
            Err(e) => problems.push(format!("message {} tensor `{name}`: {e}", r.seq)),
        }
    }
    problems
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

/// Where messages come from.
enum Source {
    File(FileReader, String),
    Net { _node: Node, sub: Subscription },
}

impl Source {
    fn next(&mut self, idle: Duration) -> Option<Result<Received, String>> {
        match self {
            Source::File(reader, label) => reader.next().map(|frame| {
                frame.map_err(|e| e.to_string()).map(|f| Received {
                    channel: f.meta.channel,
                    seq: f.meta.seq,
                    message: f.message,
                    tensors: f.tensors,
                    from: label.clone(),
                    first_byte: Instant::now(),
                })
            }),
            Source::Net { sub, .. } => match sub.recv_timeout(idle) {
                Ok(r) => Some(Ok(r)),
                Err(Error::Timeout { .. }) => Some(Err(format!(
                    "no message for {} s (--idle-timeout)",
                    idle.as_secs_f64()
                ))),
                Err(Error::PeerLost { peer, reason }) => {
                    Some(Err(format!("connection to {peer} lost: {reason}")))
                }
                Err(e) => Some(Err(e.to_string())),
            },
        }
    }
}

fn open(args: &Args) -> Result<(Source, String), String> {
    let config = match &args.config {
        Some(path) => ChannelConfig::from_file(path).map_err(|e| e.to_string())?,
        None => ChannelConfig::new(),
    };
    let channel = args
        .channel
        .clone()
        .unwrap_or_else(|| ALL_CHANNELS.to_string());
    if let Some(text) = &args.listen {
        let addr: Address = text.parse().map_err(|e| format!("--listen: {e}"))?;
        if matches!(addr, Address::File(_)) {
            return Err(
                "--listen takes a network address; replay a file with --from file://PATH".into(),
            );
        }
        // Writing a non-loopback address on the command line is the explicit opt-in.
        let node = Node::builder()
            .name("recv")
            .channels(config)
            .listen_public(text)
            .build()
            .map_err(|e| e.to_string())?;
        let bound = node
            .listen_addrs()
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        eprintln!("listening on {bound}");
        let sub = node.subscriber(channel);
        return Ok((Source::Net { _node: node, sub }, bound));
    }
    let text = args
        .from
        .as_deref()
        .expect("clap requires --from or --listen");
    let addr: Address = text.parse().map_err(|e| format!("--from: {e}"))?;
    match &addr {
        Address::File(path) => {
            let reader = FileReader::open(path).map_err(|e| e.to_string())?;
            Ok((Source::File(reader, addr.to_string()), addr.to_string()))
        }
        _ => {
            let node = Node::builder()
                .name("recv")
                .channels(config)
                .build()
                .map_err(|e| e.to_string())?;
            let sub = node.subscribe(text, channel).map_err(|e| e.to_string())?;
            Ok((Source::Net { _node: node, sub }, addr.to_string()))
        }
    }
}

pub fn run(args: &Args) -> Outcome {
    if !(args.idle_timeout > 0.0 && args.idle_timeout.is_finite()) {
        return Err(format!(
            "--idle-timeout {}: give a positive number of seconds",
            args.idle_timeout
        ));
    }
    let idle = Duration::from_secs_f64(args.idle_timeout);
    let (mut source, label) = open(args)?;
    let mut summary = Summary::default();
    let mut first_byte = None;
    let mut problems = Vec::new();
    let mut failure = None;
    while args.count.is_none_or(|n| summary.messages < n) {
        let received = match source.next(idle) {
            None => break,
            Some(Ok(r)) => r,
            Some(Err(e)) => {
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
        let start = *first_byte.get_or_insert(received.first_byte);
        if args.verify {
            problems.extend(verify(&received, args.seed));
        }
        if !args.quiet && !args.json {
            say!("{}", describe(&received));
        }
        summary.record(&received.message, start.elapsed());
    }
    if failure.is_none() {
        if let Some(n) = args.count.filter(|&n| summary.messages < n) {
            failure = Some(format!(
                "expected {n} messages, {label} holds {}",
                summary.messages
            ));
        }
    }
    if args.json {
        let mut v = summary.to_json();
        v["from"] = json!(label);
        if args.verify {
            v["verified"] = json!(problems.is_empty());
            v["mismatches"] = json!(problems);
        }
        v["error"] = json!(failure);
        print_json(&v);
    } else {
        say!("received {} from {label}", summary.line());
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
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
