//! `tensorferry send`: generate messages with deterministic content and send them.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Value};
use tensorferry::device_map::{ChannelConfig, Device};
use tensorferry::engine::delivery::{Delivery, Direction};
use tensorferry::engine::file::FileWriter;
use tensorferry::engine::wire::{encode_staged, EncodeOptions, Encoded, FrameMeta};
use tensorferry::engine::{pattern, Address, Message, Node, Publisher};
use tensorferry::kernels::runtime::Runtime;

use super::tensor_spec::TensorSpec;
use super::values::{self, Strict};
use super::{memory, print_json, Outcome, Summary};

/// Options of `tensorferry send`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to send: `tcp://HOST:PORT` connects to a receiver that listens
    /// (`recv --listen`); `file://PATH` records the frames to a file.
    #[arg(long, value_name = "ADDR", conflicts_with = "listen")]
    to: Option<String>,

    /// Listen here instead and send to every receiver that connects
    /// (`recv --from tcp://…`), once --subscribers of them have. Without
    /// --to or --listen, the addresses of the --config file's "node"
    /// section are used.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// Receivers to wait for before sending (network transports), 1 or more.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = Strict(values::receivers), allow_hyphen_values = true)]
    subscribers: usize,

    /// Seconds to wait for receivers and for the last message to be written
    /// (above 0, at most 604800: a week).
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = Strict(values::seconds), allow_hyphen_values = true)]
    wait: f64,

    /// Channel name carried in every message.
    #[arg(long, default_value = "/tensorferry")]
    channel: String,

    /// A tensor to send: NAME=DTYPE:SHAPE[@DEVICE], e.g. `x=f32:1024x1024` or
    /// `x=f32:1024x1024@wgpu:0`. Repeat for several. Its content is generated
    /// from --seed, the message's sequence number and NAME, so `recv --verify`
    /// can check every byte; a tensor @DEVICE is generated on the host and
    /// copied there first, so it is sent from that device. A tensor larger
    /// than this machine's memory is refused before anything is allocated.
    #[arg(long = "tensor", value_name = "SPEC", required = true)]
    tensors: Vec<TensorSpec>,

    /// A JSON field added to every message: KEY=JSON (text that is not JSON is sent as a string).
    #[arg(long = "field", value_name = "KEY=JSON")]
    fields: Vec<String>,

    /// Number of messages (sequence numbers 0, 1, …), 1 or more.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = Strict(values::count), allow_hyphen_values = true)]
    count: u64,

    /// Seed of the generated content (0 to 2^64-1).
    #[arg(long, default_value_t = 0, value_parser = Strict(values::seed), allow_hyphen_values = true)]
    seed: u64,

    /// Messages per second (at least one a week); without it, as fast as possible.
    #[arg(long, value_name = "HZ", value_parser = Strict(values::rate), allow_hyphen_values = true)]
    rate: Option<f64>,

    /// Send each tensor's checksum (computed on the device that holds it),
    /// verified by the receiver on the device it lands on.
    #[arg(long)]
    checksum: bool,

    /// Channel configuration (JSON; see `tensorferry check-map`): the
    /// channel's `wire_dtype` casts and `checksum` apply to what is sent.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// A file holding the shared secret every tcp peer must prove it knows
    /// (an HMAC challenge, both ways, before the first message; at least 16
    /// bytes). Without it, the TENSORFERRY_SECRET environment variable is
    /// read. Never write a secret itself on the command line.
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,

    /// Append to an existing record file instead of replacing it.
    #[arg(long)]
    append: bool,

    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    tls: super::tls::TlsArgs,
}

pub(super) fn parse_field(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        format!("--field `{text}`: write KEY=JSON, e.g. step=17 or tags='[\"a\"]'")
    })?;
    if key.trim().is_empty() {
        return Err(format!("--field `{text}`: the key is empty"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.trim().to_string(), value))
}

/// Where messages go.
enum Sink {
    File(FileWriter),
    Net { _node: Node, publisher: Publisher },
}

impl Sink {
    fn open(
        args: &Args,
        config: &ChannelConfig,
        wait: Duration,
    ) -> Result<(Sink, Address), String> {
        if args.listen.is_some() || (args.to.is_none() && super::config_listens(config)) {
            // Not a file nor inproc: check_address said so.
            let node = super::node_builder(
                "send",
                config,
                args.secret_file.as_deref(),
                &args.tls,
                args.listen.as_deref(),
            )?
            .build()
            .map_err(|e| e.to_string())?;
            let Some(bound) = node.listen_addrs().first().cloned() else {
                return Err("the node listens nowhere".into());
            };
            let all: Vec<String> = node
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect();
            eprintln!("listening on {}", all.join(", "));
            let publisher = node.publisher(args.channel.clone());
            publisher
                .wait_for_subscribers(args.subscribers, wait)
                .map_err(|e| e.to_string())?;
            return Ok((
                Sink::Net {
                    _node: node,
                    publisher,
                },
                bound,
            ));
        }
        let Some(text) = args.to.as_deref() else {
            return Err("say where to send: --to ADDR, --listen ADDR, or \"listen\" in the --config file's \"node\" section".into());
        };
        let addr: Address = text.parse().map_err(|e| format!("--to: {e}"))?;
        match &addr {
            Address::File(path) => {
                let writer = if args.append {
                    FileWriter::append(path)
                } else {
                    FileWriter::create(path)
                }
                .map_err(|e| e.to_string())?;
                Ok((Sink::File(writer), addr))
            }
            _ => {
                let node = super::node_builder(
                    "send",
                    config,
                    args.secret_file.as_deref(),
                    &args.tls,
                    None,
                )?
                .connect_timeout(wait)
                .build()
                .map_err(|e| e.to_string())?;
                node.connect(text).map_err(|e| e.to_string())?;
                let publisher = node.publisher(args.channel.clone());
                publisher
                    .wait_for_subscribers(args.subscribers, wait)
                    .map_err(|e| e.to_string())?;
                Ok((
                    Sink::Net {
                        _node: node,
                        publisher,
                    },
                    addr,
                ))
            }
        }
    }

    fn send(
        &mut self,
        message: Message,
        frame: impl FnOnce(&Message) -> Result<Encoded, String>,
    ) -> Result<(), String> {
        match self {
            Sink::File(w) => w.write(&frame(&message)?).map_err(|e| e.to_string()),
            Sink::Net { publisher, .. } => publisher.send(message).map_err(|e| e.to_string()),
        }
    }

    /// An error when a receiver was lost before all `count` messages were
    /// written to it (it says how many were, and why it was lost).
    fn check_receivers(&self, count: u64) -> Result<(), String> {
        let Sink::Net { publisher, .. } = self else {
            return Ok(());
        };
        let short: Vec<String> = publisher
            .lost_subscribers()
            .into_iter()
            .filter(|l| l.written < count)
            .map(|l| {
                format!(
                    "{}: {} of {count} message(s) were written to it before it was lost ({})",
                    l.peer, l.written, l.reason
                )
            })
            .collect();
        if short.is_empty() {
            Ok(())
        } else {
            Err(format!("a receiver was lost: {}", short.join("; ")))
        }
    }

    /// Flushes what was sent; an error when a receiver was lost before all
    /// `count` messages were written to it.
    fn finish(&mut self, wait: Duration, count: u64) -> Result<(), String> {
        match self {
            Sink::File(w) => w.sync().map_err(|e| e.to_string()),
            Sink::Net { publisher, .. } => {
                let flushed = publisher.flush(wait);
                self.check_receivers(count)?;
                flushed.map_err(|e| e.to_string())
            }
        }
    }
}

/// Refuses tensors this machine cannot hold: each alone, and the host
/// tensors of one message together (every message holds them at once).
fn check_memory(tensors: &[TensorSpec]) -> Result<(), String> {
    let fix = "give a smaller shape";
    for t in tensors {
        let shape: Vec<String> = t.shape.iter().map(ToString::to_string).collect();
        let what = format!(
            "--tensor {} ({} of shape {})",
            t.name,
            t.dtype,
            shape.join("x")
        );
        memory::check(&what, Some(t.bytes), fix)?;
    }
    let host: Vec<&TensorSpec> = tensors.iter().filter(|t| t.device == Device::Cpu).collect();
    if host.len() > 1 {
        let names: Vec<&str> = host.iter().map(|t| t.name.as_str()).collect();
        let total = host
            .iter()
            .try_fold(0u64, |sum, t| sum.checked_add(t.bytes));
        let what = format!("one message of the host tensors {}", names.join(", "));
        memory::check(&what, total, "give smaller shapes or fewer tensors")?;
    }
    Ok(())
}

/// Refuses an address no receiver can use, before any device is opened.
fn check_address(args: &Args) -> Result<(), String> {
    let (option, text) = match (&args.listen, &args.to) {
        (Some(text), _) => ("--listen", text),
        (None, Some(text)) => ("--to", text),
        (None, None) => return Ok(()),
    };
    let addr: Address = text.parse().map_err(|e| format!("{option}: {e}"))?;
    match addr {
        Address::Inproc(_) => Err(format!("{option} {addr}: {}", super::INPROC_ELSEWHERE)),
        Address::File(_) if option == "--listen" => {
            Err("--listen takes a network address; record a file with --to file://PATH".into())
        }
        _ => Ok(()),
    }
}

pub fn run(args: &Args) -> Outcome {
    check_address(args)?;
    check_memory(&args.tensors)?;
    let fields = args
        .fields
        .iter()
        .map(|f| parse_field(f))
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = match &args.config {
        Some(path) => {
            tensorferry::engine::delivery::load_config(path).map_err(|e| e.to_string())?
        }
        None => ChannelConfig::new(),
    };
    let mut spec = config.get(&args.channel).cloned().unwrap_or_default();
    spec.checksum |= args.checksum;
    config
        .insert(args.channel.clone(), spec.clone())
        .map_err(|e| e.to_string())?;
    let stager = Delivery::new(&spec, Direction::Forward, None).map_err(|e| e.to_string())?;
    let mut runtimes: HashMap<Device, Runtime> = HashMap::new();
    for t in &args.tensors {
        if let std::collections::hash_map::Entry::Vacant(slot) = runtimes.entry(t.device) {
            let rt = Runtime::open(t.device).map_err(|e| format!("--tensor {}: {e}", t.name))?;
            slot.insert(rt);
        }
    }
    // Both were checked when parsed: positive, and at most a week.
    let interval = args.rate.map(|hz| Duration::from_secs_f64(1.0 / hz));
    let wait = Duration::from_secs_f64(args.wait);
    let (mut sink, address) = Sink::open(args, &config, wait)?;
    let mut summary = Summary::default();
    let start = Instant::now();
    for seq in 0..args.count {
        if let Some(every) = interval {
            let due = start + every.mul_f64(seq as f64);
            if let Some(pause) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(pause);
            }
        }
        let mut message = Message::new();
        for (k, v) in &fields {
            message = message.field(k.clone(), v.clone());
        }
        for t in &args.tensors {
            let tensor = pattern::tensor(t.dtype, &t.shape, args.seed, seq, &t.name)
                .and_then(|host| host.to_runtime(&runtimes[&t.device]))
                .map_err(|e| format!("--tensor {}: {e}", t.name))?;
            message = message.tensor(t.name.clone(), tensor);
        }
        let channel = args.channel.clone();
        let record = |m: &Message| {
            let (wire, origins) = stager.prepare(m).map_err(|e| e.to_string())?;
            encode_staged(
                &wire,
                &origins,
                &FrameMeta::message(channel, seq),
                EncodeOptions::default(),
            )
            .map_err(|e| e.to_string())
        };
        let bytes = message.payload_bytes();
        sink.send(message, record)?;
        summary.record_bytes(bytes, start.elapsed());
        // A receiver lost on the way: stop now, and say how far it got.
        sink.check_receivers(args.count)?;
    }
    sink.finish(wait, args.count)?;
    summary.seconds_to(start.elapsed());
    if args.json {
        let mut v = summary.to_json();
        v["to"] = json!(address.to_string());
        print_json(&v);
    } else {
        say!("sent {} to {address}", summary.line());
    }
    Ok(ExitCode::SUCCESS)
}
