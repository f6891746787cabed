//! `tensorferry send`: generate messages with deterministic content and send them.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tensorferry::device_map::Device;
use tensorferry::engine::file::FileWriter;
use tensorferry::engine::wire::{encode, EncodeOptions, FrameMeta};
use tensorferry::engine::{pattern, Address, Message};

use super::tensor_spec::TensorSpec;
use super::{print_json, Outcome, Summary};

/// Options of `tensorferry send`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to send: `file://PATH` records the frames to a file.
    #[arg(long, value_name = "ADDR")]
    to: String,

    /// Channel name carried in every message.
    #[arg(long, default_value = "/tensorferry")]
    channel: String,

    /// A tensor to send: NAME=DTYPE:SHAPE[@DEVICE], e.g. `x=f32:1024x1024`. Repeat for several.
    /// Its content is generated from --seed, the message's sequence number and NAME,
    /// so `recv --verify` can check every byte.
    #[arg(long = "tensor", value_name = "SPEC", required = true)]
    tensors: Vec<TensorSpec>,

    /// A JSON field added to every message: KEY=JSON (text that is not JSON is sent as a string).
    #[arg(long = "field", value_name = "KEY=JSON")]
    fields: Vec<String>,

    /// Number of messages (sequence numbers 0, 1, …).
    #[arg(long, default_value_t = 1)]
    count: u64,

    /// Seed of the generated content.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Messages per second; without it, as fast as possible.
    #[arg(long, value_name = "HZ")]
    rate: Option<f64>,

    /// Send each tensor's checksum, verified by the receiver.
    #[arg(long)]
    checksum: bool,

    /// Append to an existing record file instead of replacing it.
    #[arg(long)]
    append: bool,

    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_field(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        format!("--field `{text}`: write KEY=JSON, e.g. step=17 or tags='[\"a\"]'")
    })?;
    if key.trim().is_empty() {
        return Err(format!("--field `{text}`: the key is empty"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.trim().to_string(), value))
}

pub fn run(args: &Args) -> Outcome {
    let address: Address = args.to.parse().map_err(|e| format!("--to: {e}"))?;
    let fields = args
        .fields
        .iter()
        .map(|f| parse_field(f))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(t) = args.tensors.iter().find(|t| t.device != Device::Cpu) {
        return Err(format!(
            "--tensor {}: sending from {} needs device staging, which this build does not have; use @cpu",
            t.name, t.device
        ));
    }
    let interval = match args.rate {
        Some(hz) if hz.is_finite() && hz > 0.0 => Some(Duration::from_secs_f64(1.0 / hz)),
        Some(hz) => {
            return Err(format!(
                "--rate {hz}: give a positive number of messages per second"
            ))
        }
        None => None,
    };
    let Address::File(path) = &address else {
        return Err(format!("--to {address}: this transport cannot send yet"));
    };
    let mut writer = if args.append {
        FileWriter::append(path)
    } else {
        FileWriter::create(path)
    }
    .map_err(|e| e.to_string())?;
    let options = EncodeOptions {
        checksums: args.checksum,
    };
    let mut summary = Summary::default();
    let start = Instant::now();
    for seq in 0..args.count {
        if let Some(every) = interval {
            let due = start + every.mul_f64(seq as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut message = Message::new();
        for (k, v) in &fields {
            message = message.field(k.clone(), v.clone());
        }
        for t in &args.tensors {
            let tensor = pattern::tensor(t.dtype, &t.shape, args.seed, seq, &t.name)
                .map_err(|e| e.to_string())?;
            message = message.tensor(t.name.clone(), tensor);
        }
        let frame = encode(
            &message,
            &FrameMeta::message(args.channel.clone(), seq),
            options,
        )
        .map_err(|e| e.to_string())?;
        writer.write(&frame).map_err(|e| e.to_string())?;
        summary.record(&message, start.elapsed());
    }
    writer.sync().map_err(|e| e.to_string())?;
    if args.json {
        let mut v = summary.to_json();
        v["to"] = json!(address.to_string());
        print_json(&v);
    } else {
        say!("sent {} to {address}", summary.line());
    }
    Ok(ExitCode::SUCCESS)
}
