//! `tensorferry recv`: receive messages, print their summaries, verify their bytes.

use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;
use tensorferry::engine::file::FileReader;
use tensorferry::engine::wire::Frame;
use tensorferry::engine::{pattern, Address};

use super::{human_bytes, print_json, Outcome, Summary, EXIT_INVALID};

/// Options of `tensorferry recv`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to receive from: `file://PATH` replays a record file.
    #[arg(long, value_name = "ADDR")]
    from: String,

    /// Only messages on this channel (others are skipped).
    #[arg(long)]
    channel: Option<String>,

    /// Stop after this many messages; fewer is an error.
    #[arg(long)]
    count: Option<u64>,

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

/// Every byte mismatch and checksum failure of one frame.
fn verify(frame: &Frame, seed: u64) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = frame.verify_checksums() {
        problems.push(format!("message {}: {e}", frame.meta.seq));
    }
    for (name, t) in frame.message.tensors() {
        match t.packed() {
            Ok(bytes) => {
                if let Some(at) =
                    pattern::first_mismatch(t.dtype(), seed, frame.meta.seq, name, bytes.as_slice())
                {
                    problems.push(format!(
                        "message {} tensor `{name}`: byte {at} of {} differs from the content sent with --seed {seed}",
                        frame.meta.seq,
                        bytes.len()
                    ));
                }
            }
            Err(e) => problems.push(format!("message {} tensor `{name}`: {e}", frame.meta.seq)),
        }
    }
    problems
}

fn describe(frame: &Frame) -> String {
    let tensors: Vec<String> = frame
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
    format!(
        "{} #{}: {}",
        frame.meta.channel,
        frame.meta.seq,
        tensors.join(", ")
    )
}

pub fn run(args: &Args) -> Outcome {
    let address: Address = args.from.parse().map_err(|e| format!("--from: {e}"))?;
    let Address::File(path) = &address else {
        return Err(format!(
            "--from {address}: this transport cannot receive yet"
        ));
    };
    let reader = FileReader::open(path).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut summary = Summary::default();
    let mut problems = Vec::new();
    let mut failure = None;
    for frame in reader {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        };
        if args
            .channel
            .as_ref()
            .is_some_and(|c| *c != frame.meta.channel)
        {
            continue;
        }
        if args.verify {
            problems.extend(verify(&frame, args.seed));
        }
        if !args.quiet && !args.json {
            say!("{}", describe(&frame));
        }
        summary.record(&frame.message, start.elapsed());
        if args.count.is_some_and(|n| summary.messages >= n) {
            break;
        }
    }
    if failure.is_none() {
        if let Some(n) = args.count.filter(|&n| summary.messages < n) {
            failure = Some(format!(
                "expected {n} messages, {address} holds {}",
                summary.messages
            ));
        }
    }
    if args.json {
        let mut v = summary.to_json();
        v["from"] = json!(address.to_string());
        if args.verify {
            v["verified"] = json!(problems.is_empty());
            v["mismatches"] = json!(problems);
        }
        v["error"] = json!(failure);
        print_json(&v);
    } else {
        say!("received {} from {address}", summary.line());
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
