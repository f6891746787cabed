//! `tensorferry bench`: throughput and latency of each transport, each row
//! beside a baseline measured in the same run.
//!
//! shm and tcp rows run each receiver in a separate process (this binary
//! again, with a hidden `--role`), so the figures cross a real process
//! boundary. `--listen` and `--to` split a tcp run over two hosts: one side
//! receives, the other sends, and the raw-socket baseline crosses the same
//! two hosts.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tensorferry::device_map::{ChannelConfig, ChannelSpec, Device, DeviceMap, Inventory, Pattern};
use tensorferry::engine::{
    pattern, Address, DType, Message, Node, NodeBuilder, Publisher, Subscription, Tensor,
    ALL_CHANNELS,
};
use tensorferry::kernels::cast;
use tensorferry::kernels::runtime::cpu::CpuInfo;
use tensorferry::kernels::runtime::cuda::CudaDeviceInfo;
use tensorferry::kernels::runtime::wgpu::AdapterInfo;
use tensorferry::kernels::runtime::{HostReport, Probe, Runtime};

use super::values::{self, Strict};
use super::{futex_floor, human_bytes, memory, print_json, Outcome};

const DEFAULT_SIZES: [u64; 4] = [4 << 10, 1 << 20, 64 << 20, 256 << 20];
const DEFAULT_DURATION_S: f64 = 2.0;
const MAX_SUBSCRIBERS: usize = 64;
/// The channel the measured messages travel on.
const DATA: &str = "/bench";
/// The channel on which a `--listen` side talks back to its `--to` side.
const CONTROL: &str = "/bench/control";

/// Options of `tensorferry bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Transports to measure, comma-separated: inproc, shm, tcp [default:
    /// inproc,shm,tcp; with --to: tcp].
    #[arg(long, value_delimiter = ',')]
    transport: Option<Vec<Transport>>,

    /// Message sizes, comma-separated: whole numbers with one of the units
    /// B, KiB, MiB, GiB, written exactly so (1KiB = 1024 bytes), or bytes
    /// without a unit (one tensor per message) [default: 4KiB,1MiB,64MiB,256MiB].
    ///
    /// Each size is at least 1 byte and a whole number of --dtype elements.
    /// A row holds several messages of its size at once (two, or with tcp one
    /// more per subscriber, three with --pattern reqrep); a size whose row
    /// would need more than this machine's memory is refused before anything
    /// is allocated.
    #[arg(long, value_delimiter = ',', value_parser = Strict(values::size), allow_hyphen_values = true)]
    sizes: Option<Vec<u64>>,

    /// Element type of the tensor [default: f32].
    #[arg(long)]
    dtype: Option<DType>,

    /// Device the sent tensor lives on: cpu, cuda:N or wgpu:N [default: cpu].
    /// A device tensor is cast and checksummed there and read back while its
    /// frame is written (or, inproc, handed over by reference).
    #[arg(long, value_name = "DEVICE")]
    src: Option<Device>,

    /// Device the received tensor lands on: cpu, cuda:N or wgpu:N [default:
    /// cpu]. The channel's device map sends --src to --dst; bytes bound for a
    /// device go from the socket straight to it. Rows with a device then also
    /// measure a plain copy of the same bytes to (or from) that device, and
    /// the baseline is the slower of that copy and the transport's baseline.
    #[arg(long, value_name = "DEVICE")]
    dst: Option<Device>,

    /// Send the tensor as this dtype on the wire (cast where it lives, cast
    /// back where it lands), e.g. `--wire-dtype bf16` for f32 tensors.
    /// GB/s counts the bytes delivered, not the fewer bytes that travelled.
    #[arg(long, value_name = "DTYPE")]
    wire_dtype: Option<DType>,

    /// Checksum every tensor where it lives and verify it where it lands.
    #[arg(long)]
    checksum: bool,

    /// Over how many tcp connections a message of 1MiB or more is spread:
    /// `auto` (one per 16MiB of the message, at most one per core and at
    /// most 4) or 1 to 8 (1: one connection, no striping) [default: auto].
    /// The channel setting `stripes` does the same outside the bench.
    #[arg(long, value_name = "auto|N", value_parser = Strict(stripes_arg), allow_hyphen_values = true)]
    stripes: Option<Stripes>,

    /// Seconds of sending per row, above 0 and at most 604800 (a week)
    /// [default: 2] (a memcpy baseline takes a fifth of that; a raw socket
    /// or channel baseline passes as many messages as its row).
    #[arg(long, value_name = "SECS", value_parser = Strict(values::seconds), allow_hyphen_values = true)]
    duration: Option<f64>,

    /// `pubsub` streams messages one way; `reqrep` measures request/reply round
    /// trips (an echo service in the other process) against a raw ping-pong
    /// (shm rows also against a futex ping-pong through shared memory, what
    /// waking another process costs at least).
    #[arg(long, default_value = "pubsub")]
    pattern: Pattern,

    /// Publish/subscribe fan-out: every message goes to N subscribers (N
    /// receiving processes for shm and tcp, N subscribing nodes for inproc),
    /// 1 to 64 [default: 1].
    ///
    /// Each row reports the aggregate GB/s of all subscribers, each
    /// subscriber's GB/s (--json) and the slowest one's. The baseline stays
    /// the one-subscriber baseline: a channel of references (inproc), a raw
    /// Unix socket stream (shm below 1MiB), a memcpy (shm from 1MiB), a raw
    /// socket stream (tcp). Not with --pattern reqrep, --listen or --to.
    #[arg(long, value_name = "N", value_parser = Strict(subscribers), allow_hyphen_values = true)]
    subscribers: Option<usize>,

    /// With --pattern reqrep: microseconds the requester spins for each reply,
    /// and the echo's reader for the next request, before sleeping (lower
    /// latency, a core kept busy on each side). 0 turns all spinning off; at
    /// most 1000000 (a second). Without it, both ends run in the default
    /// mode: the requester spins adaptively for its reply, and the echo's
    /// reader for the next request (at most 50 µs, only while they come
    /// that fast).
    #[arg(long, value_name = "US", value_parser = Strict(values::busy_poll_us), allow_hyphen_values = true)]
    busy_poll_us: Option<u64>,

    /// Run only the receiving side of tcp rows, for a `bench --to` on another
    /// host; it prints each row as the row ends.
    ///
    /// Protocol: the listener's node listens on tcp://HOST:PORT (port 0 picks
    /// one; the first line on stderr says `listening on ADDR`) and subscribes
    /// to `/bench`. Its raw baseline listens on the same host at PORT+1 (a
    /// free port when PORT is 0). When the sender's node subscribes to
    /// `/bench/control`, the listener publishes there `{"raw_port", "machine"}`
    /// and the sender opens the raw stream. For each row the sender publishes
    /// on `/bench` a `begin` message (the row's settings), its tensors for
    /// --duration seconds, and a `stop` message; then it writes on the raw
    /// stream a 16-byte header (message size, message count: little-endian
    /// u64) and as many messages of that size. The listener measures both
    /// (from the first byte to the last, into one reused buffer for the raw
    /// stream) and publishes the row's figures on `/bench/control`. A `done`
    /// message on `/bench` ends the session and the listener exits. The
    /// sender chooses --sizes, --dtype and --duration. One-way latency reads
    /// both hosts' clocks: meaningful only when they are synchronized.
    #[arg(long, value_name = "tcp://HOST:PORT", conflicts_with = "to")]
    listen: Option<String>,

    /// Run only the sending side of tcp rows against a `bench --listen` at
    /// tcp://HOST:PORT (on another host); its raw baseline stream goes to the
    /// port the listener announces (see --listen for the protocol).
    #[arg(long, value_name = "tcp://HOST:PORT")]
    to: Option<String>,

    /// Also draw throughput against message size to this SVG file: one line per
    /// transport, its baseline dashed (publish/subscribe only).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,

    /// Print one JSON object with every setting, the machine and every row.
    #[arg(long)]
    json: bool,

    /// Internal: run as the receiving process of a row.
    #[arg(long, hide = true)]
    role: Option<String>,

    /// Internal: where the receiving process listens.
    #[arg(long, hide = true)]
    role_listen: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Inproc,
    Shm,
    Tcp,
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "inproc" => Ok(Transport::Inproc),
            "shm" => Ok(Transport::Shm),
            "tcp" => Ok(Transport::Tcp),
            other => Err(format!(
                "`{other}` is not a transport; write inproc, shm or tcp"
            )),
        }
    }
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Inproc => "inproc",
            Transport::Shm => "shm",
            Transport::Tcp => "tcp",
        }
    }
}

/// `--subscribers`: 1 to [`MAX_SUBSCRIBERS`], each one a process or a node.
/// A `--stripes` value: `None` for `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stripes(Option<usize>);

fn stripes_arg(text: &str) -> Result<Stripes, String> {
    if text == "auto" {
        return Ok(Stripes(None));
    }
    values::whole(text, 1, tensorferry::device_map::MAX_STRIPES as u64)
        .map(|n| Stripes(Some(n as usize)))
        .map_err(|e| format!("{e}, or auto"))
}

fn subscribers(text: &str) -> Result<usize, String> {
    values::whole(text, 1, MAX_SUBSCRIBERS as u64)
        .map(|n| usize::try_from(n).expect("at most MAX_SUBSCRIBERS"))
        .map_err(|e| format!("{e} (each subscriber is a process or a node)"))
}

/// A `tcp://HOST:PORT` given to --listen or --to.
#[derive(Debug, Clone)]
struct Endpoint {
    text: String,
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(option: &str, text: &str) -> Result<Self, String> {
        let shape = || {
            format!("{option} {text}: write a TCP address, tcp://HOST:PORT (the two-host mode measures tcp)")
        };
        let rest = text.strip_prefix("tcp://").ok_or_else(shape)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(shape)?;
        let port: u16 = port.parse().map_err(|_| shape())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(shape());
        }
        text.parse::<Address>()
            .map_err(|e| format!("{option} {text}: {e}"))?;
        Ok(Endpoint {
            text: text.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

/// How many buffers of a message's size a row holds at once on this
/// machine, and which they are.
fn held_at_once(
    t: Transport,
    pattern: Pattern,
    subscribers: usize,
    mode: &Mode,
) -> (u64, &'static str) {
    match (mode, pattern, t) {
        (Mode::Listen(_) | Mode::To(_), _, _) => (2, "the message and the raw baseline's buffer"),
        (Mode::Local, Pattern::ReqRep, _) => (3, "the request, the echo's copy and the reply"),
        (Mode::Local, _, Transport::Tcp) => (
            subscribers as u64 + 1,
            "the message sent and its copy in each receiving process",
        ),
        (Mode::Local, _, _) => (2, "the message and the memcpy baseline's second buffer"),
    }
}

/// Which side(s) of a row this process runs.
#[derive(Debug, Clone)]
enum Mode {
    /// Both sides, on this host.
    Local,
    /// The receiving side of tcp rows, for a sender on another host.
    Listen(Endpoint),
    /// The sending side of tcp rows, against a listener on another host.
    To(Endpoint),
}

/// The settings of a run, checked once.
#[derive(Debug, Clone)]
struct Plan {
    transports: Vec<Transport>,
    sizes: Vec<u64>,
    dtype: DType,
    duration: f64,
    pattern: Pattern,
    subscribers: usize,
    busy_poll_us: Option<u64>,
    mode: Mode,
    src: Device,
    dst: Device,
    wire_dtype: Option<DType>,
    checksum: bool,
    /// `--stripes` (`None`: auto).
    stripes: Option<usize>,
}

impl Plan {
    fn from_args(args: &Args) -> Result<Plan, String> {
        // Checked when parsed: positive, and at most a week.
        let duration = args.duration.unwrap_or(DEFAULT_DURATION_S);
        if args.subscribers.is_some() && args.pattern == Pattern::ReqRep {
            return Err("--subscribers applies to --pattern pubsub (fan-out); a reqrep row has one requester and one echo service: drop --subscribers".into());
        }
        let two_host = args.listen.is_some() || args.to.is_some();
        if two_host {
            let option = if args.listen.is_some() {
                "--listen"
            } else {
                "--to"
            };
            if args.pattern == Pattern::ReqRep {
                return Err(format!("--pattern reqrep with {option}: the two-host mode measures publish/subscribe streams; drop --pattern"));
            }
            if args.subscribers.is_some() {
                return Err(format!("--subscribers with {option}: the two-host mode has one receiving side; measure fan-out on one host (without --listen/--to)"));
            }
            if let Some(t) = args
                .transport
                .iter()
                .flatten()
                .find(|t| **t != Transport::Tcp)
            {
                return Err(format!(
                    "--transport {} with {option}: the two-host mode measures tcp only; drop --transport",
                    t.name()
                ));
            }
        }
        let mode = match (&args.listen, &args.to) {
            (Some(_), Some(_)) => return Err("give --listen or --to, not both".into()),
            (Some(text), None) => {
                // The sender chooses what is measured; the listener only receives.
                for (given, name) in [
                    (args.transport.is_some(), "--transport"),
                    (args.sizes.is_some(), "--sizes"),
                    (args.dtype.is_some(), "--dtype"),
                    (args.duration.is_some(), "--duration"),
                ] {
                    if given {
                        return Err(format!("{name} with --listen: the sending side (--to) chooses what is measured; give {name} there"));
                    }
                }
                if args.plot.is_some() {
                    return Err(
                        "--plot with --listen: the sending side (--to) draws the plot".into(),
                    );
                }
                Mode::Listen(Endpoint::parse("--listen", text)?)
            }
            (None, Some(text)) => {
                let end = Endpoint::parse("--to", text)?;
                if end.port == 0 {
                    return Err(format!(
                        "--to {text}: give the port the listener printed (`listening on ADDR`)"
                    ));
                }
                Mode::To(end)
            }
            (None, None) => Mode::Local,
        };
        let staged =
            args.src.is_some() || args.dst.is_some() || args.wire_dtype.is_some() || args.checksum;
        if staged && !matches!(mode, Mode::Local) {
            return Err("--src, --dst, --wire-dtype and --checksum are measured on one host for now; drop them with --listen/--to, or run both sides here".into());
        }
        if staged && args.pattern == Pattern::ReqRep {
            return Err("--src, --dst, --wire-dtype and --checksum apply to --pattern pubsub; a reqrep row echoes host tensors".into());
        }
        let dtype = args.dtype.unwrap_or(DType::F32);
        if let Some(wire) = args.wire_dtype {
            if !(cast::is_supported(dtype, wire) && cast::is_supported(wire, dtype)) {
                return Err(format!(
                    "--wire-dtype {wire}: {dtype} tensors cannot travel as {wire} (the casts that exist: {})",
                    cast::SUPPORTED
                ));
            }
        }
        let transports = match (&args.transport, &mode) {
            (Some(t), _) => t.clone(),
            (None, Mode::Local) => vec![Transport::Inproc, Transport::Shm, Transport::Tcp],
            (None, _) => vec![Transport::Tcp],
        };
        let sizes = args.sizes.clone().unwrap_or_else(|| DEFAULT_SIZES.to_vec());
        let subscribers = args.subscribers.unwrap_or(1);
        // Before anything of these sizes (or a device) is allocated.
        for &size in &sizes {
            let element = dtype.size_bytes() as u64;
            if size % element != 0 {
                return Err(format!(
                    "--sizes {}: a message is one {dtype} tensor, a whole number of {element}-byte elements; give a multiple of {element} bytes, e.g. {}",
                    values::in_largest_unit(size),
                    values::in_largest_unit((size / element).max(1) * element)
                ));
            }
            for &t in &transports {
                let (copies, which) = held_at_once(t, args.pattern, subscribers, &mode);
                let what = format!(
                    "--sizes {}: the {} row holds {copies} buffers of {size} bytes at once ({which}), so it",
                    values::in_largest_unit(size),
                    t.name()
                );
                memory::check(&what, size.checked_mul(copies), "give smaller --sizes")?;
            }
        }
        for (option, device) in [("--src", args.src), ("--dst", args.dst)] {
            if let Some(d) = device.filter(|d| *d != Device::Cpu) {
                Runtime::open(d).map_err(|e| format!("{option} {d}: {e}"))?;
            }
        }
        Ok(Plan {
            transports,
            sizes,
            dtype,
            duration,
            pattern: args.pattern,
            subscribers,
            busy_poll_us: args.busy_poll_us,
            mode,
            src: args.src.unwrap_or(Device::Cpu),
            dst: args.dst.unwrap_or(Device::Cpu),
            wire_dtype: args.wire_dtype,
            checksum: args.checksum,
            stripes: args.stripes.and_then(|s| s.0),
        })
    }

    /// The measured channel's settings: --src mapped to --dst, the wire cast
    /// and checksums. Both sides use it.
    fn channel_config(&self) -> Result<ChannelConfig, String> {
        channel_config(
            self.src,
            self.dst,
            self.dtype,
            self.wire_dtype,
            self.checksum,
            self.stripes,
        )
    }

    /// The options that give a receiving process the same channel.
    fn role_args(&self) -> Vec<String> {
        let mut args = vec![
            "--src".to_string(),
            self.src.to_string(),
            "--dst".into(),
            self.dst.to_string(),
            "--dtype".into(),
            self.dtype.to_string(),
        ];
        if let Some(w) = self.wire_dtype {
            args.extend(["--wire-dtype".into(), w.to_string()]);
        }
        if self.checksum {
            args.push("--checksum".into());
        }
        if let Some(n) = self.stripes {
            args.extend(["--stripes".into(), n.to_string()]);
        }
        args
    }

    /// A one-line description of the path measured.
    fn path_text(&self) -> String {
        let mut text = format!("{} -> {}", self.src, self.dst);
        if let Some(w) = self.wire_dtype {
            text += &format!(", {w} on the wire");
        }
        if self.checksum {
            text += ", checksummed";
        }
        if let Some(n) = self.stripes {
            text += &format!(", tcp stripes {n}");
        }
        text
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }

    fn pattern_name(&self) -> &'static str {
        if self.pattern == Pattern::ReqRep {
            "reqrep"
        } else {
            "pubsub"
        }
    }

    /// Every setting, for --json.
    fn settings_json(&self) -> Value {
        let (mode, listen, to) = match &self.mode {
            Mode::Local => ("local", None, None),
            Mode::Listen(e) => ("listen", Some(e.text.clone()), None),
            Mode::To(e) => ("to", None, Some(e.text.clone())),
        };
        json!({"transports": self.transports.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "sizes_bytes": self.sizes, "dtype": self.dtype,
            "duration_s": self.duration, "src": self.src, "dst": self.dst,
            "wire_dtype": self.wire_dtype, "checksum": self.checksum,
            "stripes": self.stripes.map_or(json!("auto"), |n| json!(n)),
            "pattern": self.pattern_name(), "subscribers": self.subscribers,
            "mode": mode, "listen": listen, "to": to,
            "reqrep_service": "echo, inline", "busy_poll_us": self.busy_poll_us})
    }
}

/// The machine a run measured: processor, cores, memory, and the GPUs the
/// CUDA and wgpu runtimes find (or why they find none). GPUs are probed only
/// when the run involves one (`with_gpus`): probing starts the drivers,
/// which a run of host rows has no need of.
fn machine(cpu: &CpuInfo, with_gpus: bool) -> Value {
    let mut v = json!(cpu);
    if with_gpus {
        let host = HostReport::probe();
        v["cuda"] = json!(host.cuda);
        v["wgpu"] = json!(host.wgpu);
    } else {
        let why = "not probed: this run involves no device";
        v["cuda"] = json!(Probe::<CudaDeviceInfo>::unavailable(why));
        v["wgpu"] = json!(Probe::<AdapterInfo>::unavailable(why));
    }
    v
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What one receiving side measured for one row.
#[derive(Debug, Default)]
struct Measured {
    messages: u64,
    bytes: u64,
    seconds: f64,
    latencies_ns: Vec<u64>,
    /// Percentiles measured elsewhere (by the receiving process), in µs.
    reported: Option<(f64, f64)>,
}

impl Measured {
    fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }

    fn percentile_us(&mut self, p: f64) -> f64 {
        if let Some((p50, p99)) = self.reported {
            return if p <= 0.5 { p50 } else { p99 };
        }
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        self.latencies_ns.sort_unstable();
        let i = ((self.latencies_ns.len() - 1) as f64 * p).round() as usize;
        self.latencies_ns[i] as f64 / 1e3
    }

    fn summary_json(&mut self) -> Value {
        json!({"messages": self.messages, "bytes": self.bytes, "seconds": self.seconds,
               "p50_us": self.percentile_us(0.5), "p99_us": self.percentile_us(0.99)})
    }

    fn from_json(v: &Value) -> Measured {
        Measured {
            messages: v["messages"].as_u64().unwrap_or(0),
            bytes: v["bytes"].as_u64().unwrap_or(0),
            seconds: v["seconds"].as_f64().unwrap_or(0.0),
            latencies_ns: Vec::new(),
            reported: Some((
                v["p50_us"].as_f64().unwrap_or(0.0),
                v["p99_us"].as_f64().unwrap_or(0.0),
            )),
        }
    }
}

/// A publish/subscribe row: every subscriber's figures beside the baseline.
///
/// `gbps` is the aggregate (all subscribers' bytes over the longest
/// subscriber's time); `slowest_subscriber_gbps` the slowest one's; latency
/// percentiles are the worst subscriber's; `ratio` is the aggregate over the
/// baseline and `slowest_subscriber_ratio` the slowest subscriber over it.
fn pubsub_row(
    transport: &str,
    size: u64,
    subs: &mut [Measured],
    base_gbps: f64,
    base_name: &str,
) -> Value {
    let bytes: u64 = subs.iter().map(|m| m.bytes).sum();
    let seconds = subs.iter().map(|m| m.seconds).fold(0.0, f64::max);
    let gbps = if seconds > 0.0 {
        bytes as f64 / seconds / 1e9
    } else {
        0.0
    };
    let each: Vec<f64> = subs.iter().map(Measured::gbps).collect();
    let slowest = each.iter().copied().reduce(f64::min).unwrap_or(0.0);
    let messages = subs.iter().map(|m| m.messages).min().unwrap_or(0);
    let p50 = subs
        .iter_mut()
        .map(|m| m.percentile_us(0.5))
        .fold(0.0, f64::max);
    let p99 = subs
        .iter_mut()
        .map(|m| m.percentile_us(0.99))
        .fold(0.0, f64::max);
    let ratio = |x: f64| if base_gbps > 0.0 { x / base_gbps } else { 0.0 };
    json!({
        "transport": transport, "size_bytes": size, "subscribers": subs.len(),
        "messages": messages, "gbps": gbps,
        "subscriber_gbps": each, "slowest_subscriber_gbps": slowest,
        "messages_per_s": if seconds > 0.0 { messages as f64 / seconds } else { 0.0 },
        "p50_us": p50, "p99_us": p99,
        "baseline": base_name, "baseline_gbps": base_gbps,
        "ratio": ratio(gbps), "slowest_subscriber_ratio": ratio(slowest),
    })
}

/// Receives until a `stop` message, measuring bytes, time and one-way latency.
fn receive(sub: &Subscription, idle: Duration) -> Result<Measured, String> {
    let mut m = Measured::default();
    let mut first = None;
    loop {
        let r = sub.recv_timeout(idle).map_err(|e| e.to_string())?;
        let arrived = now_ns();
        if r.message.get_field("stop").is_some() {
            break;
        }
        let start = *first.get_or_insert(r.first_byte);
        m.messages += 1;
        m.bytes += r.message.payload_bytes();
        m.seconds = start.elapsed().as_secs_f64();
        if let Some(sent) = r.message.get_field("t_ns").and_then(Value::as_u64) {
            m.latencies_ns.push(arrived.saturating_sub(sent));
        }
    }
    Ok(m)
}

/// Sends one tensor of `size` bytes repeatedly for `duration`, then a stop message.
fn blast(
    publisher: &Publisher,
    dtype: DType,
    src: Device,
    size: u64,
    duration: Duration,
) -> Result<u64, String> {
    let elems = (size as usize / dtype.size_bytes()).max(1);
    let tensor: Tensor = pattern::tensor(dtype, &[elems], 1, 0, "x")
        .and_then(|t| t.to_runtime(&Runtime::open(src)?))
        .map_err(|e| format!("--src {src}: {e}"))?;
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < duration || sent == 0 {
        let m = Message::new()
            .field("t_ns", now_ns())
            .tensor("x", tensor.clone());
        publisher.send(m).map_err(|e| e.to_string())?;
        sent += 1;
    }
    publisher
        .send(Message::new().field("stop", true))
        .map_err(|e| e.to_string())?;
    publisher
        .flush(Duration::from_secs(120))
        .map_err(|e| e.to_string())?;
    Ok(sent)
}

/// Reads messages of `size` bytes from a raw stream until `count` have
/// arrived or the stream ends. Each lands in one reused buffer of its size:
/// the least a receiver that keeps the tensor must do (a small buffer that
/// stays in cache would measure the socket alone, not a tensor's arrival).
fn read_raw(stream: &mut impl Read, size: u64, count: u64) -> Result<Measured, String> {
    let mut buf = vec![0u8; size as usize];
    let mut m = Measured::default();
    let mut first = None;
    'messages: while m.messages < count {
        let mut got = 0;
        while got < buf.len() {
            let n = stream.read(&mut buf[got..]).map_err(|e| e.to_string())?;
            if n == 0 {
                break 'messages;
            }
            first.get_or_insert_with(Instant::now);
            got += n;
        }
        m.bytes += got as u64;
        m.messages += 1;
        m.seconds = first.map_or(0.0, |s: Instant| s.elapsed().as_secs_f64());
    }
    Ok(m)
}

fn spawn_role(role: &str, listen: &str, size: u64) -> Result<(Child, String), String> {
    spawn_role_with(role, listen, size, &[])
}

fn spawn_role_with(
    role: &str,
    listen: &str,
    size: u64,
    extra: &[String],
) -> Result<(Child, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut child = Command::new(exe)
        .args([
            "bench",
            "--role",
            role,
            "--role-listen",
            listen,
            "--sizes",
            &format!("{size}B"),
        ])
        .args(extra)
        .args(super::verbose_args())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the receiving process: {e}"))?;
    let mut line = String::new();
    let stdout = child
        .stdout
        .as_mut()
        .ok_or("no stdout from the receiving process")?;
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .ok_or_else(|| format!("the receiving process said `{}`", line.trim()))?;
    Ok((child, addr.to_string()))
}

fn finish_role(child: Child) -> Result<Value, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    if !out.status.success() {
        return Err(format!("the receiving process failed: {last}"));
    }
    serde_json::from_str(last).map_err(|e| format!("the receiving process printed `{last}`: {e}"))
}

/// The hidden receiving roles.
fn run_role(
    role: &str,
    listen: &str,
    size: u64,
    config: ChannelConfig,
    dst: Device,
    busy_poll_us: Option<u64>,
) -> Outcome {
    let idle = Duration::from_secs(60);
    match role {
        "receiver" => {
            let node = Node::builder()
                .name("bench-recv")
                .channels(config)
                .inventory(inventory(dst))
                .listen(listen)
                .build()
                .map_err(|e| e.to_string())?;
            let sub = node.subscriber(ALL_CHANNELS);
            let bound = node
                .listen_addrs()
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            say!("listening {bound}");
            let mut m = receive(&sub, idle)?;
            say!("{}", m.summary_json());
        }
        "raw-receiver" => {
            let listener = TcpListener::bind(listen.trim_start_matches("tcp://"))
                .map_err(|e| e.to_string())?;
            let bound = listener.local_addr().map_err(|e| e.to_string())?;
            say!("listening tcp://{bound}");
            let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut m = read_raw(&mut stream, size, u64::MAX)?;
            say!("{}", m.summary_json());
        }
        "raw-unix-receiver" => {
            let path = listen.strip_prefix("unix:").unwrap_or(listen);
            let listener = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| format!("binding the Unix socket {path}: {e}"))?;
            say!("listening unix:{path}");
            let (mut stream, _) = listener.accept().map_err(|e| e.to_string())?;
            let _ = std::fs::remove_file(path);
            let mut m = read_raw(&mut stream, size, u64::MAX)?;
            say!("{}", m.summary_json());
        }
        "responder" => {
            let node = with_busy_poll(Node::builder().name("bench-echo"), busy_poll_us)
                .listen(listen)
                .build()
                .map_err(|e| e.to_string())?;
            node.serve(
                "/bench",
                // Inline, as the report says: the echo runs on the thread that read the request.
                tensorferry::engine::Service::new(|m: Message| Ok(m)).inline(true),
            )
            .map_err(|e| e.to_string())?;
            let sub = node.subscriber("/bench-stop");
            let bound = node
                .listen_addrs()
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            say!("listening {bound}");
            sub.recv_timeout(Duration::from_secs(600))
                .map_err(|e| e.to_string())?;
            say!("{{}}");
        }
        "futex-echo" => {
            let fd = listen
                .strip_prefix("fd://")
                .and_then(|n| n.parse::<i32>().ok())
                .ok_or_else(|| format!("futex-echo needs fd://N, not `{listen}`"))?;
            let region = futex_floor::Region::open(fd, size as usize)?;
            say!("listening {listen}");
            futex_floor::echo(region);
            say!("{{}}");
        }
        "raw-echo" => {
            let mut stream: Box<dyn ReadWrite> = if let Some(name) = listen.strip_prefix("unix://")
            {
                let addr = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes())
                    .map_err(|e| e.to_string())?;
                let l = std::os::unix::net::UnixListener::bind_addr(&addr)
                    .map_err(|e| e.to_string())?;
                say!("listening unix://{name}");
                Box::new(l.accept().map_err(|e| e.to_string())?.0)
            } else {
                let l = TcpListener::bind(listen.trim_start_matches("tcp://"))
                    .map_err(|e| e.to_string())?;
                say!(
                    "listening tcp://{}",
                    l.local_addr().map_err(|e| e.to_string())?
                );
                let s = l.accept().map_err(|e| e.to_string())?.0;
                let _ = s.set_nodelay(true);
                Box::new(s)
            };
            let mut size = [0u8; 8];
            stream.read_exact(&mut size).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; u64::from_le_bytes(size) as usize];
            while stream.read_exact(&mut buf).is_ok() {
                stream.write_all(&buf).map_err(|e| e.to_string())?;
            }
            say!("{{}}");
        }
        other => return Err(format!("unknown role `{other}`")),
    }
    Ok(ExitCode::SUCCESS)
}

/// `--busy-poll-us`, when given; otherwise the node's default (adaptive
/// requester spin).
fn with_busy_poll(builder: NodeBuilder, busy_poll_us: Option<u64>) -> NodeBuilder {
    match busy_poll_us {
        Some(us) => builder.busy_poll(Duration::from_micros(us)),
        None => builder,
    }
}

/// A stream that reads and writes (TCP or Unix).
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Round trips of `size` bytes to an echo process over a raw socket: the reqrep baseline.
fn raw_ping_pong(
    t: Transport,
    size: u64,
    duration: Duration,
    row: usize,
) -> Result<Measured, String> {
    let listen = match t {
        Transport::Shm => format!("unix://tf-bench-echo-{}-{row}", std::process::id()),
        _ => "tcp://127.0.0.1:0".to_string(),
    };
    let (child, addr) = spawn_role("raw-echo", &listen, size)?;
    let mut stream: Box<dyn ReadWrite> = if let Some(name) = addr.strip_prefix("unix://") {
        let a = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name.as_bytes())
            .map_err(|e| e.to_string())?;
        Box::new(std::os::unix::net::UnixStream::connect_addr(&a).map_err(|e| e.to_string())?)
    } else {
        let s = TcpStream::connect(addr.trim_start_matches("tcp://")).map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        Box::new(s)
    };
    stream
        .write_all(&size.to_le_bytes())
        .map_err(|e| e.to_string())?;
    let out = vec![3u8; size as usize];
    let mut back = vec![0u8; size as usize];
    let mut m = Measured::default();
    let start = Instant::now();
    while start.elapsed() < duration || m.messages == 0 {
        let t0 = Instant::now();
        stream.write_all(&out).map_err(|e| e.to_string())?;
        stream.read_exact(&mut back).map_err(|e| e.to_string())?;
        m.latencies_ns.push(t0.elapsed().as_nanos() as u64);
        m.messages += 1;
        m.bytes += 2 * size;
    }
    m.seconds = start.elapsed().as_secs_f64();
    drop(stream);
    finish_role(child)?;
    Ok(m)
}

/// Round trips of a `size`-byte tensor to an echo service in another process.
fn request_reply(t: Transport, size: u64, plan: &Plan, row: usize) -> Result<Measured, String> {
    let duration = plan.duration();
    let listen = match t {
        Transport::Shm => format!("shm://tf-bench-svc-{}-{row}", std::process::id()),
        Transport::Tcp => "tcp://127.0.0.1:0".to_string(),
        Transport::Inproc => {
            return Err(
                "--pattern reqrep measures shm and tcp; drop inproc from --transport".into(),
            )
        }
    };
    // Busy polling applies to both ends: the echo's reader spins for the next request too.
    let spin_args = match plan.busy_poll_us {
        Some(us) => vec!["--busy-poll-us".to_string(), us.to_string()],
        None => Vec::new(),
    };
    let (child, addr) = spawn_role_with("responder", &listen, size, &spin_args)?;
    let node = with_busy_poll(Node::builder(), plan.busy_poll_us)
        .build()
        .map_err(|e| e.to_string())?;
    let elems = (size as usize / plan.dtype.size_bytes()).max(1);
    let tensor = pattern::tensor(plan.dtype, &[elems], 1, 0, "x").map_err(|e| e.to_string())?;
    let mut m = Measured::default();
    let start = Instant::now();
    while start.elapsed() < duration || m.messages == 0 {
        let t0 = Instant::now();
        let reply = node
            .request(
                &addr,
                "/bench",
                Message::new().tensor("x", tensor.clone()),
                Duration::from_secs(30),
            )
            .map_err(|e| e.to_string())?;
        m.latencies_ns.push(t0.elapsed().as_nanos() as u64);
        m.messages += 1;
        m.bytes += 2 * reply.payload_bytes();
    }
    m.seconds = start.elapsed().as_secs_f64();
    node.connect(&addr).map_err(|e| e.to_string())?;
    let p = node.publisher("/bench-stop");
    let _ = p.wait_for_subscribers(1, Duration::from_secs(5));
    p.send(Message::new().field("stop", true))
        .map_err(|e| e.to_string())?;
    p.flush(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    finish_role(child)?;
    Ok(m)
}

/// The channel of a bench run: tensors from `src` land on `dst`, cast to
/// `wire` for the wire and checksummed when asked.
fn channel_config(
    src: Device,
    dst: Device,
    dtype: DType,
    wire: Option<DType>,
    checksum: bool,
    stripes: Option<usize>,
) -> Result<ChannelConfig, String> {
    let map = DeviceMap::builder()
        .entry(src.to_string(), dst.to_string())
        .build()
        .map_err(|e| e.to_string())?;
    let mut spec = ChannelSpec::new(Pattern::PubSub)
        .with_device_map(map)
        .with_checksum(checksum);
    if let Some(w) = wire {
        spec = spec.with_wire_dtype(dtype.name(), w.name());
    }
    if let Some(n) = stripes {
        spec = spec.with_stripes(n);
    }
    let mut config = ChannelConfig::new();
    config.insert(DATA, spec).map_err(|e| e.to_string())?;
    Ok(config)
}

/// The devices a bench node lands tensors on: the CPU and `dst` (opened
/// once when the run starts). Stating them keeps a node from probing every
/// device of the host, which would start GPU drivers a run of host rows
/// has no use for.
fn inventory(dst: Device) -> Inventory {
    Inventory::new([dst])
}

/// A plain copy of `size` bytes from the host to `dst` (or from `src` to the
/// host), repeated for `duration`: the device side of a device row's baseline.
fn device_copy_gbps(
    src: Device,
    dst: Device,
    size: u64,
    duration: Duration,
) -> Result<Option<(String, f64)>, String> {
    let mut slowest: Option<(String, f64)> = None;
    for (device, up) in [(dst, true), (src, false)] {
        if device == Device::Cpu {
            continue;
        }
        let rt = Runtime::open(device).map_err(|e| e.to_string())?;
        let host = vec![3u8; size as usize];
        let mut back = vec![0u8; size as usize];
        let buf = rt.upload(&host).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut copies = 0u64;
        while start.elapsed() < duration || copies == 0 {
            if up {
                std::hint::black_box(rt.upload(&host).map_err(|e| e.to_string())?);
            } else {
                rt.download(&buf, &mut back).map_err(|e| e.to_string())?;
            }
            copies += 1;
        }
        rt.synchronize().map_err(|e| e.to_string())?;
        let gbps = (copies * size) as f64 / start.elapsed().as_secs_f64() / 1e9;
        let name = if up {
            format!("upload {device}")
        } else {
            format!("download {device}")
        };
        if slowest.as_ref().is_none_or(|(_, g)| gbps < *g) {
            slowest = Some((name, gbps));
        }
    }
    Ok(slowest)
}

/// One memcpy of `size` bytes, repeated: the baseline of shm from 1MiB.
fn memcpy_gbps(size: u64, duration: Duration) -> f64 {
    let src = vec![1u8; size as usize];
    let mut dst = vec![0u8; size as usize];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    let mut copies = 0u64;
    while start.elapsed() < duration || copies == 0 {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        copies += 1;
    }
    (copies * size) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// A raw socket stream of `messages` writes of `size` bytes to another process: the tcp baseline.
pub(super) fn raw_tcp_gbps(size: u64, messages: u64) -> Result<f64, String> {
    raw_stream_gbps(
        "raw-receiver",
        "tcp://127.0.0.1:0",
        size,
        messages,
        |addr| {
            let stream = TcpStream::connect(addr.trim_start_matches("tcp://"))?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        },
    )
}

/// A raw Unix socket stream of `messages` writes of `size` bytes to
/// another process: the baseline of small shm messages (a socket is what
/// shared memory must beat for them; a memcpy for large ones).
fn raw_unix_gbps(size: u64, messages: u64) -> Result<f64, String> {
    let path = std::env::temp_dir().join(format!(
        "tf-bench-raw-{}-{}.sock",
        std::process::id(),
        now_ns()
    ));
    let listen = format!("unix:{}", path.display());
    raw_stream_gbps("raw-unix-receiver", &listen, size, messages, |addr| {
        std::os::unix::net::UnixStream::connect(addr.trim_start_matches("unix:"))
    })
}

/// `messages` writes of `size` bytes to a receiving process started as
/// `role`, through the stream `connect` opens to the address it reports.
fn raw_stream_gbps<S: Write>(
    role: &str,
    listen: &str,
    size: u64,
    messages: u64,
    connect: impl FnOnce(&str) -> std::io::Result<S>,
) -> Result<f64, String> {
    let (child, addr) = spawn_role(role, listen, size)?;
    let mut stream = connect(&addr).map_err(|e| e.to_string())?;
    let buf = vec![7u8; size as usize];
    for _ in 0..messages.max(1) {
        stream.write_all(&buf).map_err(|e| e.to_string())?;
    }
    drop(stream);
    let v = finish_role(child)?;
    Ok(Measured::from_json(&v).gbps())
}

/// `messages` references to one buffer of `size` bytes passed through a
/// bounded channel (64 deep, as a subscription queue) from one thread to
/// another, as GB/s of the bytes referred to: the inproc baseline, since
/// an inproc message moves by reference, never by copy.
fn channel_gbps(size: u64, messages: u64) -> Result<f64, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::sync::Arc<Vec<u8>>>(64);
    let data = std::sync::Arc::new(vec![7u8; size as usize]);
    let messages = messages.max(1);
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        for _ in 0..messages {
            if tx.send(std::sync::Arc::clone(&data)).is_err() {
                break;
            }
        }
    });
    let mut got = 0u64;
    while rx.recv().is_ok() {
        got += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| "the channel's sending thread panicked")?;
    Ok((got * size) as f64 / seconds.max(1e-9) / 1e9)
}

/// Shm messages below this size are compared with a raw Unix socket
/// stream, larger ones with a memcpy.
const SHM_SOCKET_BASELINE_BELOW: u64 = 1 << 20;

/// One publish/subscribe row on this host: `plan.subscribers` receivers.
fn fan_out(t: Transport, size: u64, plan: &Plan, row: usize) -> Result<Value, String> {
    let duration = plan.duration();
    let baseline_time = duration / 5;
    let n = plan.subscribers;
    let pid = std::process::id();
    let mut subs = match t {
        Transport::Inproc => {
            let name = format!("inproc://bench-{pid}-{row}");
            let server = Node::builder()
                .channels(plan.channel_config()?)
                .inventory(inventory(plan.dst))
                .listen(&name)
                .build()
                .map_err(|e| e.to_string())?;
            let mut clients = Vec::new();
            let mut receivers = Vec::new();
            for _ in 0..n {
                let client = Node::builder()
                    .channels(plan.channel_config()?)
                    .inventory(inventory(plan.dst))
                    .build()
                    .map_err(|e| e.to_string())?;
                let sub = client.subscribe(&name, DATA).map_err(|e| e.to_string())?;
                receivers.push(std::thread::spawn(move || {
                    receive(&sub, Duration::from_secs(60))
                }));
                clients.push(client);
            }
            let publisher = server.publisher(DATA);
            publisher
                .wait_for_subscribers(n, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            blast(&publisher, plan.dtype, plan.src, size, duration)?;
            receivers
                .into_iter()
                .map(|r| r.join().map_err(|_| "a receiving thread panicked")?)
                .collect::<Result<Vec<_>, String>>()?
        }
        Transport::Shm | Transport::Tcp => {
            let node = Node::builder()
                .channels(plan.channel_config()?)
                .inventory(inventory(plan.dst))
                .build()
                .map_err(|e| e.to_string())?;
            let mut children = Vec::new();
            for k in 0..n {
                let listen = match t {
                    Transport::Shm => format!("shm://tf-bench-{pid}-{row}-{k}"),
                    _ => "tcp://127.0.0.1:0".to_string(),
                };
                let (child, addr) = spawn_role_with("receiver", &listen, size, &plan.role_args())?;
                children.push(child);
                node.connect(&addr).map_err(|e| e.to_string())?;
            }
            let publisher = node.publisher(DATA);
            publisher
                .wait_for_subscribers(n, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            blast(&publisher, plan.dtype, plan.src, size, duration)?;
            children
                .into_iter()
                .map(|c| finish_role(c).map(|v| Measured::from_json(&v)))
                .collect::<Result<Vec<_>, String>>()?
        }
    };
    // As many messages as one subscriber received, so both streams have the same length.
    let messages = subs.iter().map(|m| m.messages).min().unwrap_or(1);
    let (base, base_name) = match t {
        Transport::Tcp => (raw_tcp_gbps(size, messages)?, "raw tcp"),
        Transport::Inproc => (channel_gbps(size, messages)?, "channel"),
        Transport::Shm if size < SHM_SOCKET_BASELINE_BELOW => {
            (raw_unix_gbps(size, messages)?, "raw unix")
        }
        Transport::Shm => (memcpy_gbps(size, baseline_time), "memcpy"),
    };
    let device = device_copy_gbps(plan.src, plan.dst, size, baseline_time)?;
    let mut row = match &device {
        Some((name, gbps)) if *gbps < base => pubsub_row(t.name(), size, &mut subs, *gbps, name),
        _ => pubsub_row(t.name(), size, &mut subs, base, base_name),
    };
    row["transport_baseline"] = json!(base_name);
    row["transport_baseline_gbps"] = json!(base);
    if let Some((name, gbps)) = device {
        row["device_baseline"] = json!(name);
        row["device_baseline_gbps"] = json!(gbps);
    }
    Ok(row)
}

/// One request/reply row beside a raw ping-pong of the same bytes.
/// Round trips of `size` bytes through shared memory with futex wake-ups:
/// the floor of any hand-off that sleeps (see `futex_floor`).
fn futex_ping_pong(size: u64, duration: Duration) -> Result<Measured, String> {
    let (region, fd) = futex_floor::Region::create(size as usize)?;
    let (child, _) = spawn_role("futex-echo", &futex_floor::fd_arg(&fd), size)?;
    drop(fd);
    let latencies_ns = futex_floor::ask(region, duration)?;
    finish_role(child)?;
    let messages = latencies_ns.len() as u64;
    Ok(Measured {
        seconds: latencies_ns.iter().sum::<u64>() as f64 / 1e9,
        messages,
        bytes: 2 * size * messages,
        latencies_ns,
        ..Measured::default()
    })
}

fn round_trips(t: Transport, size: u64, plan: &Plan, row: usize) -> Result<Value, String> {
    let mut m = request_reply(t, size, plan, row)?;
    let mut raw = raw_ping_pong(t, size, plan.duration() / 2, row)?;
    let floor = match t {
        Transport::Shm => Some(futex_ping_pong(size, plan.duration() / 2)?.percentile_us(0.5)),
        _ => None,
    };
    let base_name = if t == Transport::Shm {
        "raw unix"
    } else {
        "raw tcp"
    };
    // For round trips the baseline is the raw median round trip, in µs.
    let base = raw.percentile_us(0.5);
    let p50 = m.percentile_us(0.5);
    Ok(json!({
        "transport": t.name(), "size_bytes": size, "messages": m.messages, "gbps": m.gbps(),
        "messages_per_s": if m.seconds > 0.0 { m.messages as f64 / m.seconds } else { 0.0 },
        "p50_us": p50, "p99_us": m.percentile_us(0.99),
        "baseline": base_name, "baseline_p50_us": base, "ratio": if base > 0.0 { p50 / base } else { 0.0 },
        "futex_floor_p50_us": floor,
    }))
}

fn progress(rows: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(rows as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rows  {msg}")
            .expect("a valid template"),
    );
    bar
}

/// `--listen`: the receiving side of a two-host run (see `Args::listen` for the protocol).
fn listen_side(end: &Endpoint, plan: &Plan, json_out: bool) -> Outcome {
    let node = Node::builder()
        .name("bench-listen")
        .listen_public(&end.text)
        .build()
        .map_err(|e| format!("--listen {}: {e}", end.text))?;
    let bound = node
        .listen_addrs()
        .first()
        .cloned()
        .ok_or("the node bound no address")?;
    let ip = bound
        .socket_addrs()
        .map_err(|e| e.to_string())?
        .first()
        .map(std::net::SocketAddr::ip)
        .ok_or("the bound address has no IP")?;
    let raw_port = if end.port == 0 {
        0
    } else {
        end.port.checked_add(1).ok_or_else(|| {
            format!(
                "--listen {}: the raw baseline needs PORT+1; pick a lower port",
                end.text
            )
        })?
    };
    let raw = TcpListener::bind((ip, raw_port)).map_err(|e| {
        format!(
            "--listen {}: the raw baseline cannot listen on port {raw_port}: {e}; free it or pick another PORT",
            end.text
        )
    })?;
    let raw_addr = raw.local_addr().map_err(|e| e.to_string())?;
    let sub = node.subscriber(DATA);
    let control = node.publisher(CONTROL);
    eprintln!("listening on {bound}");
    eprintln!("raw baseline on tcp://{raw_addr}; run `tensorferry bench --to {bound}` on the sending host");
    while control
        .wait_for_subscribers(1, Duration::from_secs(60))
        .is_err()
    {}
    let cpu = CpuInfo::probe();
    control
        .send(
            Message::new()
                .field("raw_port", raw_addr.port())
                .field("machine", machine(&cpu, false)),
        )
        .map_err(|e| e.to_string())?;
    let (mut stream, peer) = raw.accept().map_err(|e| e.to_string())?;
    let idle = Duration::from_secs(60);
    stream
        .set_read_timeout(Some(idle))
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut sender = Value::Null;
    loop {
        let r = sub
            .recv_timeout(idle)
            .map_err(|e| format!("the sender went silent: {e}"))?;
        let f = |k: &str| r.message.get_field(k).cloned().unwrap_or(Value::Null);
        if f("done") != Value::Null {
            break;
        }
        let Some(row) = f("begin").as_u64() else {
            return Err(format!(
                "the sender at {} does not speak this protocol (no `begin`)",
                r.from
            ));
        };
        let size = f("size_bytes").as_u64().unwrap_or(0);
        if sender.is_null() {
            sender = json!({"sizes_bytes": f("sizes_bytes"), "dtype": f("dtype"),
                            "duration_s": f("duration_s"), "machine": f("machine")});
            if !json_out {
                say!(
                    "tensorferry bench --listen {bound}: {} tensors from {} for {} s per row, one subscriber; raw baseline on tcp://{raw_addr} from {peer}; machine: {} ({} cores)",
                    sender["dtype"].as_str().unwrap_or("?"),
                    r.from,
                    sender["duration_s"],
                    cpu.model,
                    cpu.cores
                );
                print_pubsub_header();
            }
        }
        let mut m = receive(&sub, idle)?;
        let mut header = [0u8; 16];
        stream
            .read_exact(&mut header)
            .map_err(|e| format!("the raw baseline stream: {e}"))?;
        let raw_size = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let raw_count = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        if raw_size != size || raw_size == 0 {
            return Err(format!(
                "the raw baseline stream announced {raw_size}-byte messages for a {size}-byte row"
            ));
        }
        // The sender checked its --sizes against its own memory, not this machine's.
        memory::check(
            &format!(
                "the sender's {} row: its raw baseline's buffer",
                values::in_largest_unit(size)
            ),
            Some(raw_size),
            "give smaller --sizes to the sending side (--to)",
        )?;
        let mut base = read_raw(&mut stream, raw_size, raw_count)?;
        control
            .send(
                Message::new()
                    .field("row", row)
                    .field("node", m.summary_json())
                    .field("raw", base.summary_json()),
            )
            .map_err(|e| e.to_string())?;
        let r = pubsub_row("tcp", size, &mut [m], base.gbps(), "raw tcp");
        if !json_out {
            print_pubsub_row(&r);
        }
        rows.push(r);
    }
    control
        .flush(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let mut settings = plan.settings_json();
    settings["listen"] = json!(bound.to_string());
    settings["raw_listen"] = json!(format!("tcp://{raw_addr}"));
    // What was measured is what the sender chose.
    for key in ["sizes_bytes", "dtype", "duration_s"] {
        settings[key] = sender[key].clone();
    }
    settings["sender_machine"] = sender["machine"].clone();
    if json_out {
        print_json(&json!({"settings": settings, "machine": machine(&cpu, false), "rows": rows}));
    } else {
        print_pubsub_footer(true);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--to`: the sending side of a two-host run (see `Args::listen` for the protocol).
fn to_side(end: &Endpoint, plan: &Plan, bar: &indicatif::ProgressBar) -> Result<Value, String> {
    let node = Node::builder()
        .name("bench-to")
        .build()
        .map_err(|e| e.to_string())?;
    let control = node
        .subscribe(&end.text, CONTROL)
        .map_err(|e| format!("--to {}: {e}", end.text))?;
    let hello = control
        .recv_timeout(Duration::from_secs(30))
        .map_err(|e| format!("--to {}: no answer from a bench --listen: {e}", end.text))?;
    let raw_port = hello
        .message
        .get_field("raw_port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| {
            format!(
                "--to {}: the peer is not a `tensorferry bench --listen`",
                end.text
            )
        })?;
    let listener_machine = hello
        .message
        .get_field("machine")
        .cloned()
        .unwrap_or(Value::Null);
    let mut stream = TcpStream::connect((end.host.as_str(), raw_port)).map_err(|e| {
        format!(
            "--to {}: the raw baseline port {raw_port} does not answer: {e}",
            end.text
        )
    })?;
    let _ = stream.set_nodelay(true);
    let raw_to = format!("tcp://{}", stream.peer_addr().map_err(|e| e.to_string())?);
    let publisher = node.publisher(DATA);
    publisher
        .wait_for_subscribers(1, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let cpu = CpuInfo::probe();
    let mut rows = Vec::new();
    for (row, &size) in plan.sizes.iter().enumerate() {
        bar.set_message(format!("tcp {} to {}", human_bytes(size), end.text));
        publisher
            .send(
                Message::new()
                    .field("begin", row as u64)
                    .field("size_bytes", size)
                    .field("sizes_bytes", json!(plan.sizes))
                    .field("dtype", json!(plan.dtype))
                    .field("duration_s", plan.duration)
                    .field("machine", machine(&cpu, false)),
            )
            .map_err(|e| e.to_string())?;
        let sent = blast(&publisher, plan.dtype, plan.src, size, plan.duration())?;
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&size.to_le_bytes());
        header[8..].copy_from_slice(&sent.to_le_bytes());
        stream
            .write_all(&header)
            .map_err(|e| format!("the raw baseline stream: {e}"))?;
        let buf = vec![7u8; size as usize];
        for _ in 0..sent {
            stream
                .write_all(&buf)
                .map_err(|e| format!("the raw baseline stream: {e}"))?;
        }
        let wait = Duration::from_secs_f64((10.0 * plan.duration).max(120.0));
        let result = control
            .recv_timeout(wait)
            .map_err(|e| format!("no figures from the listener for row {row}: {e}"))?;
        let field = |k: &str| result.message.get_field(k).cloned().unwrap_or(Value::Null);
        if field("row").as_u64() != Some(row as u64) {
            return Err(format!(
                "the listener answered for row {} while row {row} ran",
                field("row")
            ));
        }
        let base = Measured::from_json(&field("raw")).gbps();
        rows.push(pubsub_row(
            "tcp",
            size,
            &mut [Measured::from_json(&field("node"))],
            base,
            "raw tcp",
        ));
        bar.inc(1);
    }
    publisher
        .send(Message::new().field("done", true))
        .map_err(|e| e.to_string())?;
    publisher
        .flush(Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    let mut settings = plan.settings_json();
    settings["raw_baseline_to"] = json!(raw_to);
    Ok(
        json!({"settings": settings, "machine": machine(&cpu, false), "listener_machine": listener_machine, "rows": rows}),
    )
}

pub fn run(args: &Args) -> Outcome {
    if let Some(role) = &args.role {
        let size = args
            .sizes
            .as_ref()
            .and_then(|s| s.first())
            .map_or(4 << 20, |&s| s);
        let dst = args.dst.unwrap_or(Device::Cpu);
        let config = channel_config(
            args.src.unwrap_or(Device::Cpu),
            dst,
            args.dtype.unwrap_or(DType::F32),
            args.wire_dtype,
            args.checksum,
            args.stripes.and_then(|s| s.0),
        )?;
        return run_role(
            role,
            args.role_listen.as_deref().unwrap_or("tcp://127.0.0.1:0"),
            size,
            config,
            dst,
            args.busy_poll_us,
        );
    }
    let plan = Plan::from_args(args)?;
    if let Mode::Listen(end) = &plan.mode {
        return listen_side(end, &plan, args.json);
    }
    let cpu = CpuInfo::probe();
    let report = if let Mode::To(end) = &plan.mode {
        let bar = progress(plan.sizes.len());
        let report = to_side(end, &plan, &bar)?;
        bar.finish_and_clear();
        report
    } else {
        let bar = progress(plan.transports.len() * plan.sizes.len());
        // The table's head, then each row as it is measured (a long run
        // shows what it has, on a terminal or in a log).
        let table = !args.json;
        if table {
            bar.suspend(|| match plan.pattern {
                Pattern::ReqRep => print_round_trips_header(&plan, &cpu),
                _ => {
                    print_pubsub_title(&plan, &cpu);
                    print_pubsub_header();
                }
            });
        }
        let mut rows = Vec::new();
        for (i, t) in plan.transports.iter().enumerate() {
            for (j, &size) in plan.sizes.iter().enumerate() {
                bar.set_message(format!("{} {}", t.name(), human_bytes(size)));
                let row = i * plan.sizes.len() + j;
                let measured = if plan.pattern == Pattern::ReqRep {
                    round_trips(*t, size, &plan, row)?
                } else {
                    fan_out(*t, size, &plan, row)?
                };
                if table {
                    bar.suspend(|| match plan.pattern {
                        Pattern::ReqRep => print_round_trip_row(&measured),
                        _ => print_pubsub_row(&measured),
                    });
                }
                rows.push(measured);
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        let with_gpus = plan.src != Device::Cpu || plan.dst != Device::Cpu;
        json!({"settings": plan.settings_json(), "machine": machine(&cpu, with_gpus), "rows": rows})
    };
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    if let Some(path) = &args.plot {
        if plan.pattern == Pattern::ReqRep {
            tracing::warn!("--plot draws throughput; it is skipped for --pattern reqrep");
        } else {
            let title = format!(
                "tensorferry bench: {} {}, {} subscriber(s), {} ({} cores)",
                plan.dtype,
                plan.path_text(),
                plan.subscribers,
                cpu.model,
                cpu.cores
            );
            plot(path, &rows, &title)?;
        }
    }
    if args.json {
        print_json(&report);
        return Ok(ExitCode::SUCCESS);
    }
    if plan.pattern == Pattern::ReqRep {
        print_round_trips_footer(&rows);
        return Ok(ExitCode::SUCCESS);
    }
    if let Mode::To(end) = &plan.mode {
        say!(
            "tensorferry bench --to {}: {} tensors, cpu -> cpu, {} s per row, one subscriber (the listener); raw baseline to {}; this machine: {} ({} cores); listener: {} ({} cores)",
            end.text,
            plan.dtype,
            plan.duration,
            report["settings"]["raw_baseline_to"].as_str().unwrap_or("?"),
            cpu.model,
            cpu.cores,
            report["listener_machine"]["model"].as_str().unwrap_or("?"),
            report["listener_machine"]["cores"]
        );
        print_pubsub_header();
        for r in &rows {
            print_pubsub_row(r);
        }
    }
    print_pubsub_footer(matches!(plan.mode, Mode::To(_)));
    Ok(ExitCode::SUCCESS)
}

/// A message size as `--sizes` takes it (`4KiB`, `64MiB`, `1000B`).
fn size_text(bytes: u64) -> String {
    tensorferry_device_map::units::in_largest_unit(bytes)
}

fn print_pubsub_title(plan: &Plan, cpu: &CpuInfo) {
    let subscribers = if plan.subscribers == 1 {
        "one subscriber".to_string()
    } else {
        format!("{} subscribers (fan-out)", plan.subscribers)
    };
    say!(
        "tensorferry bench: {} tensors, {}, {} s per row, {subscribers}; machine: {} ({} cores)",
        plan.dtype,
        plan.path_text(),
        plan.duration,
        cpu.model,
        cpu.cores
    );
}

fn print_round_trips_header(plan: &Plan, cpu: &CpuInfo) {
    let spin = match plan.busy_poll_us {
        Some(0) => "no spinning".to_string(),
        Some(us) => format!("both ends busy-poll {us} µs"),
        None => "default mode (both ends spin adaptively)".to_string(),
    };
    say!(
        "tensorferry bench --pattern reqrep: {} tensor echoed, cpu -> cpu, {} s per row, {spin}; machine: {} ({} cores)",
        plan.dtype, plan.duration, cpu.model, cpu.cores
    );
    say!(
        "{:<8} {:>9} {:>9} {:>10} {:>10} {:>10}  {:<9} {:>10} {:>6}",
        "transport",
        "size",
        "requests",
        "req/s",
        "RTT p50",
        "RTT p99",
        "baseline",
        "RTT p50",
        "ratio"
    );
}

fn print_round_trip_row(r: &Value) {
    say!(
        "{:<8} {:>9} {:>9} {:>10.0} {:>8.1} µs {:>8.1} µs  {:<9} {:>7.1} µs {:>6.2}",
        r["transport"].as_str().unwrap_or(""),
        size_text(r["size_bytes"].as_u64().unwrap_or(0)),
        r["messages"].as_u64().unwrap_or(0),
        r["messages_per_s"].as_f64().unwrap_or(0.0),
        r["p50_us"].as_f64().unwrap_or(0.0),
        r["p99_us"].as_f64().unwrap_or(0.0),
        r["baseline"].as_str().unwrap_or(""),
        r["baseline_p50_us"].as_f64().unwrap_or(0.0),
        r["ratio"].as_f64().unwrap_or(0.0),
    );
}

fn print_round_trips_footer(rows: &[Value]) {
    say!("ratio: median round trip over the raw socket's median round trip (lower is better)");
    for r in rows {
        if let Some(floor) = r["futex_floor_p50_us"].as_f64() {
            say!(
                "{} {}: a futex ping-pong of the same bytes through shared memory (no socket, no engine, both sides sleeping) takes {floor:.1} µs",
                r["transport"].as_str().unwrap_or(""),
                size_text(r["size_bytes"].as_u64().unwrap_or(0)),
            );
        }
    }
}

fn print_pubsub_header() {
    say!(
        "{:<8} {:>9} {:>4} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10}  {:<8} {:>8} {:>6} {:>6}",
        "transport",
        "size",
        "subs",
        "messages",
        "GB/s",
        "per sub",
        "msg/s",
        "p50",
        "p99",
        "baseline",
        "GB/s",
        "ratio",
        "sub"
    );
}

fn print_pubsub_row(r: &Value) {
    let us = |k: &str| {
        let v = r[k].as_f64().unwrap_or(0.0);
        if v >= 1e6 {
            format!("{:.2} s", v / 1e6)
        } else if v >= 1000.0 {
            format!("{:.2} ms", v / 1e3)
        } else {
            format!("{v:.0} µs")
        }
    };
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    say!(
        "{:<8} {:>9} {:>4} {:>8} {:>8.2} {:>8.2} {:>10.0} {:>10} {:>10}  {:<8} {:>8.2} {:>6.2} {:>6.2}",
        r["transport"].as_str().unwrap_or(""),
        size_text(r["size_bytes"].as_u64().unwrap_or(0)),
        r["subscribers"].as_u64().unwrap_or(0),
        r["messages"].as_u64().unwrap_or(0),
        f("gbps"),
        f("slowest_subscriber_gbps"),
        f("messages_per_s"),
        us("p50_us"),
        us("p99_us"),
        r["baseline"].as_str().unwrap_or(""),
        f("baseline_gbps"),
        f("ratio"),
        f("slowest_subscriber_ratio"),
    );
}

fn print_pubsub_footer(two_hosts: bool) {
    say!("GB/s: all subscribers together; per sub: the slowest subscriber; ratio: GB/s over the baseline's; sub: per sub over the baseline's");
    say!("baseline: inproc moves references, so its baseline is a bounded channel passing the same number of references between two threads; shm is compared with a raw Unix socket stream of the same messages below 1MiB and with one memcpy from 1MiB; tcp with a raw socket stream of the same messages; with a device at either end, the slower of that and a plain upload to (download from) the device");
    say!("messages: per subscriber; latency: one way, from the send call to the receiver taking the message (queueing included at full rate), the worst subscriber's");
    if two_hosts {
        say!("across two hosts, one-way latency reads both hosts' clocks: meaningful only when they are synchronized");
    }
}

/// Draws throughput against message size: one line per transport with a
/// marker at each measured size, its baseline dashed, ticks at the measured
/// sizes, and the legend beside the chart. Inproc rows are left out: they
/// move references, so their GB/s is not a copy rate to set beside the others.
fn plot(path: &std::path::Path, rows: &[Value], title: &str) -> Result<(), String> {
    use plotters::coord::combinators::BindKeyPoints;
    use plotters::prelude::*;

    let fail = |e: &dyn std::fmt::Display| format!("--plot {}: {e}", path.display());
    let points = |t: &str, key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .filter(|r| r["transport"] == t)
            .map(|r| {
                (
                    r["size_bytes"].as_f64().unwrap_or(1.0),
                    r[key].as_f64().unwrap_or(0.0).max(1e-3),
                )
            })
            .collect()
    };
    // Colours that read on white (no yellow): blue for shm, orange for tcp.
    let transports: Vec<(&str, RGBColor)> = [
        ("shm", RGBColor(31, 90, 180)),
        ("tcp", RGBColor(214, 95, 0)),
    ]
    .into_iter()
    .filter(|(t, _)| rows.iter().any(|r| r["transport"] == *t))
    .collect();
    if transports.is_empty() {
        return Err(fail(&"nothing to draw: inproc rows are left out of the plot (they move references), so measure shm or tcp too"));
    }
    let all: Vec<(f64, f64)> = transports
        .iter()
        .flat_map(|(t, _)| {
            points(t, "gbps")
                .into_iter()
                .chain(points(t, "baseline_gbps"))
        })
        .collect();
    let mut sizes: Vec<f64> = all.iter().map(|p| p.0).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let (x0, x1) = (sizes[0], sizes[sizes.len() - 1]);
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let (area, legend) = root.split_horizontally(820);
    let mut chart = ChartBuilder::on(&area)
        .caption(title, ("sans-serif", 16))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (x0 / 1.5..x1 * 1.5)
                .log_scale()
                .with_key_points(sizes.clone()),
            (y0 / 2.0..y1 * 2.0).log_scale(),
        )
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("message size")
        .y_desc("GB/s")
        .x_label_formatter(&|x| size_text(x.round() as u64))
        .draw()
        .map_err(|e| fail(&e))?;
    let mut entries = Vec::new();
    for (t, color) in &transports {
        let measured = points(t, "gbps");
        chart
            .draw_series(LineSeries::new(measured.clone(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(measured.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| fail(&e))?;
        let base = points(t, "baseline_gbps");
        chart
            .draw_series(DashedLineSeries::new(
                base.clone(),
                6,
                4,
                color.stroke_width(1),
            ))
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(
                base.iter()
                    .map(|&p| Cross::new(p, 4, color.stroke_width(1))),
            )
            .map_err(|e| fail(&e))?;
        // Each size's own baseline name (shm's changes with the size).
        let mut names: Vec<&str> = rows
            .iter()
            .filter(|r| r["transport"] == *t)
            .filter_map(|r| r["baseline"].as_str())
            .collect();
        names.dedup();
        entries.push((t.to_string(), *color, true));
        entries.push((format!("{t} baseline: {}", names.join(", ")), *color, false));
    }
    for (i, (label, color, solid)) in entries.iter().enumerate() {
        let y = 60 + 26 * i as i32;
        // A solid sample for the measured line, a dashed one for its baseline.
        let pieces: &[(i32, i32)] = if *solid {
            &[(8, 40)]
        } else {
            &[(8, 16), (20, 28), (32, 40)]
        };
        let width = if *solid { 2 } else { 1 };
        for &(from, to) in pieces {
            legend
                .draw(&PathElement::new(
                    vec![(from, y), (to, y)],
                    color.stroke_width(width),
                ))
                .map_err(|e| fail(&e))?;
        }
        legend
            .draw(&Text::new(label.clone(), (48, y - 7), ("sans-serif", 14)))
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}
