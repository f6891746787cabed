//! `tensorferry bench`: throughput and latency of each transport, each row
//! beside a baseline measured in the same run.
//!
//! shm and tcp rows run the receiver in a separate process (this binary again,
//! with a hidden `--role`), so the figures cross a real process boundary.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tensorferry::device_map::Pattern;
use tensorferry::engine::{pattern, DType, Message, Node, ALL_CHANNELS};
use tensorferry::kernels::runtime::cpu::CpuInfo;

use super::{human_bytes, print_json, Outcome};

/// Options of `tensorferry bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Transports to measure, comma-separated: inproc, shm, tcp.
    #[arg(long, value_delimiter = ',', default_value = "inproc,shm,tcp")]
    transport: Vec<Transport>,

    /// Message sizes, comma-separated, with units B, KiB, MiB, GiB (one tensor per message).
    #[arg(long, value_delimiter = ',', default_value = "4KiB,1MiB,64MiB,256MiB")]
    sizes: Vec<Size>,

    /// Element type of the tensor.
    #[arg(long, default_value = "f32")]
    dtype: DType,

    /// Seconds of sending per row (a memcpy baseline takes a fifth of that; a raw
    /// tcp baseline sends as many messages as its row).
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    duration: f64,

    /// `pubsub` streams messages one way; `reqrep` measures request/reply round
    /// trips (an echo service in the other process) against a raw ping-pong.
    #[arg(long, default_value = "pubsub")]
    pattern: Pattern,

    /// With --pattern reqrep: microseconds the requester spins for each reply
    /// before sleeping (lower latency, one core kept busy). 0 turns it off.
    #[arg(long, value_name = "US", default_value_t = 0)]
    busy_poll_us: u64,

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
    listen: Option<String>,
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

/// A byte count written with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size(u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{s}` is not a size such as 4KiB or 64MiB"))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" | "k" | "kb" => 1 << 10,
            "mib" | "m" | "mb" => 1 << 20,
            "gib" | "g" | "gb" => 1 << 30,
            other => {
                return Err(format!(
                    "`{s}`: unknown unit `{other}`; use B, KiB, MiB or GiB"
                ))
            }
        };
        let bytes = n
            .checked_mul(mult)
            .filter(|&b| b > 0)
            .ok_or_else(|| format!("`{s}` is not a usable size"))?;
        Ok(Size(bytes))
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What the receiving side measured for one row.
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

/// Receives until a `stop` message, measuring bytes, time and one-way latency.
fn receive(sub: &tensorferry::engine::Subscription, idle: Duration) -> Result<Measured, String> {
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
    publisher: &tensorferry::engine::Publisher,
    dtype: DType,
    size: u64,
    duration: Duration,
) -> Result<u64, String> {
    let elems = (size as usize / dtype.size_bytes()).max(1);
    let tensor = pattern::tensor(dtype, &[elems], 1, 0, "x").map_err(|e| e.to_string())?;
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

fn spawn_role(role: &str, listen: &str, size: u64) -> Result<(Child, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut child = Command::new(exe)
        .args([
            "bench",
            "--role",
            role,
            "--listen",
            listen,
            "--sizes",
            &format!("{size}B"),
        ])
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
fn run_role(role: &str, listen: &str, size: u64) -> Outcome {
    let idle = Duration::from_secs(60);
    match role {
        "receiver" => {
            let node = Node::builder()
                .name("bench-recv")
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
            // Each message lands in one reused buffer of its size: the least a
            // receiver that keeps the tensor must do (a small buffer that stays
            // in cache would measure the socket alone, not a tensor's arrival).
            let mut buf = vec![0u8; size as usize];
            let mut m = Measured::default();
            let mut first = None;
            'messages: loop {
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
            say!("{}", m.summary_json());
        }
        "responder" => {
            let node = Node::builder()
                .name("bench-echo")
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
fn request_reply(t: Transport, size: u64, args: &Args, row: usize) -> Result<Measured, String> {
    let duration = Duration::from_secs_f64(args.duration);
    let listen = match t {
        Transport::Shm => format!("shm://tf-bench-svc-{}-{row}", std::process::id()),
        Transport::Tcp => "tcp://127.0.0.1:0".to_string(),
        Transport::Inproc => {
            return Err(
                "--pattern reqrep measures shm and tcp; drop inproc from --transport".into(),
            )
        }
    };
    let (child, addr) = spawn_role("responder", &listen, size)?;
    let node = Node::builder()
        .busy_poll_us(args.busy_poll_us)
        .build()
        .map_err(|e| e.to_string())?;
    let elems = (size as usize / args.dtype.size_bytes()).max(1);
    let tensor = pattern::tensor(args.dtype, &[elems], 1, 0, "x").map_err(|e| e.to_string())?;
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

/// One memcpy of `size` bytes, repeated: the baseline for inproc and shm.
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
fn raw_tcp_gbps(size: u64, messages: u64) -> Result<f64, String> {
    let (child, addr) = spawn_role("raw-receiver", "tcp://127.0.0.1:0", size)?;
    let mut stream =
        TcpStream::connect(addr.trim_start_matches("tcp://")).map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let buf = vec![7u8; size as usize];
    for _ in 0..messages.max(1) {
        stream.write_all(&buf).map_err(|e| e.to_string())?;
    }
    drop(stream);
    let v = finish_role(child)?;
    Ok(Measured::from_json(&v).gbps())
}

fn measure(
    t: Transport,
    size: u64,
    args: &Args,
    row: usize,
) -> Result<(Measured, f64, &'static str), String> {
    let duration = Duration::from_secs_f64(args.duration);
    let baseline_time = duration / 5;
    if args.pattern == Pattern::ReqRep {
        let m = request_reply(t, size, args, row)?;
        let mut raw = raw_ping_pong(t, size, duration / 2, row)?;
        let name = if t == Transport::Shm {
            "raw unix"
        } else {
            "raw tcp"
        };
        // For round trips the baseline is the raw median round trip, in µs.
        return Ok((m, raw.percentile_us(0.5), name));
    }
    match t {
        Transport::Inproc => {
            let name = format!("bench-{}-{row}", std::process::id());
            let server = Node::builder()
                .listen(format!("inproc://{name}"))
                .build()
                .map_err(|e| e.to_string())?;
            let client = Node::builder().build().map_err(|e| e.to_string())?;
            let sub = client
                .subscribe(&format!("inproc://{name}"), "/bench")
                .map_err(|e| e.to_string())?;
            let publisher = server.publisher("/bench");
            publisher
                .wait_for_subscribers(1, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let receiver = std::thread::spawn(move || receive(&sub, Duration::from_secs(60)));
            blast(&publisher, args.dtype, size, duration)?;
            let m = receiver
                .join()
                .map_err(|_| "the receiving thread panicked")??;
            Ok((m, memcpy_gbps(size, baseline_time), "memcpy"))
        }
        Transport::Shm | Transport::Tcp => {
            let listen = match t {
                Transport::Shm => format!("shm://tf-bench-{}-{row}", std::process::id()),
                _ => "tcp://127.0.0.1:0".to_string(),
            };
            let (child, addr) = spawn_role("receiver", &listen, size)?;
            let node = Node::builder().build().map_err(|e| e.to_string())?;
            node.connect(&addr).map_err(|e| e.to_string())?;
            let publisher = node.publisher("/bench");
            publisher
                .wait_for_subscribers(1, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            blast(&publisher, args.dtype, size, duration)?;
            let v = finish_role(child)?;
            let m = Measured::from_json(&v);
            if t == Transport::Shm {
                Ok((m, memcpy_gbps(size, baseline_time), "memcpy"))
            } else {
                // The same messages as the row, so both streams have the same length.
                let base = raw_tcp_gbps(size, m.messages)?;
                Ok((m, base, "raw tcp"))
            }
        }
    }
}

pub fn run(args: &Args) -> Outcome {
    if let Some(role) = &args.role {
        let size = args.sizes.first().map_or(4 << 20, |s| s.0);
        return run_role(
            role,
            args.listen.as_deref().unwrap_or("tcp://127.0.0.1:0"),
            size,
        );
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err(format!(
            "--duration {}: give a positive number of seconds",
            args.duration
        ));
    }
    let rows_total = (args.transport.len() * args.sizes.len()) as u64;
    let bar = indicatif::ProgressBar::new(rows_total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rows  {msg}")
            .expect("a valid template"),
    );
    let mut rows = Vec::new();
    for (i, t) in args.transport.iter().enumerate() {
        for (j, size) in args.sizes.iter().enumerate() {
            bar.set_message(format!("{} {}", t.name(), human_bytes(size.0)));
            let (mut m, base, base_name) = measure(*t, size.0, args, i * args.sizes.len() + j)?;
            let gbps = m.gbps();
            if args.pattern == Pattern::ReqRep {
                let p50 = m.percentile_us(0.5);
                rows.push(json!({
                    "transport": t.name(), "size_bytes": size.0, "messages": m.messages, "gbps": gbps,
                    "messages_per_s": if m.seconds > 0.0 { m.messages as f64 / m.seconds } else { 0.0 },
                    "p50_us": p50, "p99_us": m.percentile_us(0.99),
                    "baseline": base_name, "baseline_p50_us": base, "ratio": if base > 0.0 { p50 / base } else { 0.0 },
                }));
                bar.inc(1);
                continue;
            }
            rows.push(json!({
                "transport": t.name(), "size_bytes": size.0, "messages": m.messages, "gbps": gbps,
                "messages_per_s": if m.seconds > 0.0 { m.messages as f64 / m.seconds } else { 0.0 },
                "p50_us": m.percentile_us(0.5), "p99_us": m.percentile_us(0.99),
                "baseline": base_name, "baseline_gbps": base, "ratio": if base > 0.0 { gbps / base } else { 0.0 },
            }));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let cpu = CpuInfo::probe();
    let settings = json!({"transports": args.transport.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "sizes_bytes": args.sizes.iter().map(|s| s.0).collect::<Vec<_>>(), "dtype": args.dtype,
        "duration_s": args.duration, "src": "cpu", "dst": "cpu",
        "pattern": if args.pattern == Pattern::ReqRep { "reqrep" } else { "pubsub" }, "subscribers": 1,
        "reqrep_service": "echo, inline", "busy_poll_us": args.busy_poll_us});
    if let Some(path) = &args.plot {
        if args.pattern == Pattern::ReqRep {
            eprintln!("--plot draws throughput; it is skipped for --pattern reqrep");
        } else {
            let title = format!(
                "tensorferry bench: {} cpu -> cpu, {} ({} cores)",
                args.dtype, cpu.model, cpu.cores
            );
            plot(path, &rows, &title)?;
        }
    }
    if args.json {
        print_json(&json!({"settings": settings, "machine": cpu, "rows": rows}));
        return Ok(ExitCode::SUCCESS);
    }
    if args.pattern == Pattern::ReqRep {
        say!(
            "tensorferry bench --pattern reqrep: {} tensor echoed, cpu -> cpu, {} s per row; machine: {} ({} cores)",
            args.dtype, args.duration, cpu.model, cpu.cores
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
        for r in &rows {
            say!(
                "{:<8} {:>9} {:>9} {:>10.0} {:>8.1} µs {:>8.1} µs  {:<9} {:>7.1} µs {:>6.2}",
                r["transport"].as_str().unwrap_or(""),
                human_bytes(r["size_bytes"].as_u64().unwrap_or(0)),
                r["messages"],
                r["messages_per_s"].as_f64().unwrap_or(0.0),
                r["p50_us"].as_f64().unwrap_or(0.0),
                r["p99_us"].as_f64().unwrap_or(0.0),
                r["baseline"].as_str().unwrap_or(""),
                r["baseline_p50_us"].as_f64().unwrap_or(0.0),
                r["ratio"].as_f64().unwrap_or(0.0),
            );
        }
        say!("ratio: median round trip over the raw socket's median round trip (lower is better)");
        return Ok(ExitCode::SUCCESS);
    }
    say!(
        "tensorferry bench: {} tensors, cpu -> cpu, {} s per row, one subscriber; machine: {} ({} cores)",
        args.dtype, args.duration, cpu.model, cpu.cores
    );
    say!(
        "{:<8} {:>9} {:>8} {:>8} {:>10} {:>10} {:>10}  {:<8} {:>8} {:>6}",
        "transport",
        "size",
        "messages",
        "GB/s",
        "msg/s",
        "p50",
        "p99",
        "baseline",
        "GB/s",
        "ratio"
    );
    for r in &rows {
        let us = |k: &str| {
            let v = r[k].as_f64().unwrap_or(0.0);
            if v >= 1000.0 {
                format!("{:.2} ms", v / 1e3)
            } else {
                format!("{v:.0} µs")
            }
        };
        say!(
            "{:<8} {:>9} {:>8} {:>8.2} {:>10.0} {:>10} {:>10}  {:<8} {:>8.2} {:>6.2}",
            r["transport"].as_str().unwrap_or(""),
            human_bytes(r["size_bytes"].as_u64().unwrap_or(0)),
            r["messages"],
            r["gbps"].as_f64().unwrap_or(0.0),
            r["messages_per_s"].as_f64().unwrap_or(0.0),
            us("p50_us"),
            us("p99_us"),
            r["baseline"].as_str().unwrap_or(""),
            r["baseline_gbps"].as_f64().unwrap_or(0.0),
            r["ratio"].as_f64().unwrap_or(0.0),
        );
    }
    say!("latency: one way, from the send call to the receiver taking the message (queueing included at full rate)");
    Ok(ExitCode::SUCCESS)
}

/// Draws throughput against message size: one line per transport, its baseline dashed.
fn plot(path: &std::path::Path, rows: &[Value], title: &str) -> Result<(), String> {
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
    let transports: Vec<&str> = ["inproc", "shm", "tcp"]
        .into_iter()
        .filter(|t| rows.iter().any(|r| r["transport"] == *t))
        .collect();
    let all: Vec<(f64, f64)> = transports
        .iter()
        .flat_map(|t| {
            points(t, "gbps")
                .into_iter()
                .chain(points(t, "baseline_gbps"))
        })
        .collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (x0 / 1.5..x1 * 1.5).log_scale(),
            (y0 / 2.0..y1 * 2.0).log_scale(),
        )
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("message size (bytes)")
        .y_desc("GB/s")
        .x_label_formatter(&|x| human_bytes(*x as u64))
        .draw()
        .map_err(|e| fail(&e))?;
    for (i, t) in transports.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points(t, "gbps"), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(*t)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        let base = points(t, "baseline_gbps");
        let name = rows
            .iter()
            .find(|r| r["transport"] == *t)
            .and_then(|r| r["baseline"].as_str())
            .unwrap_or("baseline");
        chart
            .draw_series(DashedLineSeries::new(base, 6, 4, color.stroke_width(1)))
            .map_err(|e| fail(&e))?
            .label(format!("{t}: {name} (baseline)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}
