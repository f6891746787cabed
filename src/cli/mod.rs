//! Subcommands, one module each.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for invalid input (a bad option, an invalid file).
pub const EXIT_INVALID: u8 = 2;

/// Why an `inproc://` address is refused where another process must reach it.
pub const INPROC_ELSEWHERE: &str = "inproc:// reaches nodes inside this one process, and no other process can reach it; use shm://NAME between processes on this host, or tcp://HOST:PORT";

/// GPU-aware tensor transport: move named tensors between threads, processes and
/// hosts, with per-channel device maps that say where each tensor lands.
#[derive(Debug, Parser)]
#[command(
    name = "tensorferry",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Diagnostics go to stderr: warnings and errors of tensorferry's crates by default, \
more with -v (info), -vv (debug) or -vvv (trace). RUST_LOG, when set, replaces that filter \
and may name other crates too, e.g. RUST_LOG=tensorferry_engine=debug,wgpu_hal=info. \
Without a usable XDG_RUNTIME_DIR, the GPU drivers get a private one for the run, removed at exit."
)]
struct Cli {
    /// Log more to stderr: -v info, -vv debug, -vvv trace [default: warnings
    /// only]. RUST_LOG, when set, takes precedence.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure throughput and latency of each transport (inproc, shm, tcp) for
    /// several message sizes, each row beside a baseline measured in the same
    /// run (a channel of references, a raw Unix or tcp socket stream, or a
    /// memcpy), with the ratio; rows print as they finish.
    Bench(bench::Args),
    /// List this host's devices: the CPU, CUDA devices (or why there are none)
    /// and wgpu adapters.
    Devices(devices::Args),
    /// Validate a channel configuration file and show where each source device's
    /// tensors land. Exit 0 when valid, 2 when not (every error is listed).
    CheckMap(check_map::Args),
    /// Send messages of generated tensors (content from --seed, so a receiver
    /// can verify every byte). `--to file://run.tfm` records them.
    Send(send::Args),
    /// Receive messages, print a line for each and a throughput summary.
    /// `--from file://run.tfm` replays a record file.
    Recv(recv::Args),
    /// Print every frame of a record file (channel, fields, tensors) and check
    /// its lengths and checksums. Exit 2 on a damaged file.
    Inspect(inspect::Args),
    /// Convert a record file to safetensors (to open it in PyTorch or NumPy), or back.
    Convert(convert::Args),
    /// Stores of tensors written once and read by many: serve one
    /// (`store serve`), put, get, list and evict entries. Proxies of its
    /// entries travel in messages and fetch on use.
    Store(store::Args),
}

/// How many times `-v` was given: processes this one starts get as many.
static VERBOSE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// `-v` repeated as often as it was given here, for a process this one starts.
pub fn verbose_args() -> Vec<String> {
    let n = VERBOSE.load(std::sync::atomic::Ordering::Relaxed);
    (0..n).map(|_| "-v".to_string()).collect()
}

/// Parses the command line and runs the subcommand.
pub fn run() -> ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|e| {
        // Help, version and usage errors leave through `exit`, which runs no
        // destructors: the runtime directory goes first.
        runtime_dir::remove();
        e.exit()
    });
    VERBOSE.store(cli.verbose, std::sync::atomic::Ordering::Relaxed);
    logging::init(cli.verbose);
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Devices(args) => devices::run(&args),
        Command::CheckMap(args) => check_map::run(&args),
        Command::Send(args) => send::run(&args),
        Command::Recv(args) => recv::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Store(args) => store::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

/// What a subcommand returns: its exit code, or a message for stderr (exit 2).
pub type Outcome = Result<ExitCode, String>;

/// Formats a byte count for people: `23.4 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Writes one line to stdout. A reader that went away (`tensorferry … | head`)
/// ends the program quietly instead of failing it.
pub fn emit(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        // `exit` runs no destructors: the runtime directory goes first.
        runtime_dir::remove();
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(i32::from(EXIT_INVALID));
    }
}

/// `println!` through [`emit`].
macro_rules! say {
    ($($arg:tt)*) => { $crate::cli::emit(format_args!($($arg)*)) };
}

mod bench;
mod check_map;
mod convert;
mod devices;
mod futex_floor;
mod inspect;
mod logging;
mod memory;
mod recv;
pub mod runtime_dir;
mod send;
mod store;
mod store_bench;
mod tensor_spec;
mod tls;
mod values;

/// Prints a JSON value to stdout, pretty.
pub fn print_json(value: &serde_json::Value) {
    say!(
        "{}",
        serde_json::to_string_pretty(value).expect("a serde_json::Value always serializes")
    );
}

/// Messages, bytes and time of a send or receive run.
#[derive(Debug, Default)]
pub struct Summary {
    /// Messages counted.
    pub messages: u64,
    /// Tensor and object payload bytes.
    pub bytes: u64,
    seconds: f64,
    last_tensors: Vec<serde_json::Value>,
}

impl Summary {
    /// Counts `message`, which completed `at` after the run started.
    pub fn record(&mut self, message: &tensorferry::engine::Message, at: std::time::Duration) {
        self.messages += 1;
        self.bytes += message.payload_bytes();
        self.seconds = at.as_secs_f64();
        self.last_tensors = message
            .tensors()
            .map(|(n, t)| serde_json::json!({"name": n, "dtype": t.dtype(), "shape": t.shape(), "device": t.device()}))
            .collect();
    }

    /// Counts a message of `bytes` payload bytes whose tensors are not kept.
    pub fn record_bytes(&mut self, bytes: u64, at: std::time::Duration) {
        self.messages += 1;
        self.bytes += bytes;
        self.seconds = at.as_secs_f64();
    }

    /// Sets the run's end (e.g. after the last message was flushed).
    pub fn seconds_to(&mut self, at: std::time::Duration) {
        self.seconds = at.as_secs_f64();
    }

    fn gbps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }

    /// `{"messages", "bytes", "seconds", "gbps", "tensors"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"messages": self.messages, "bytes": self.bytes, "seconds": self.seconds,
                           "gbps": self.gbps(), "tensors": self.last_tensors})
    }

    /// `3 messages, 12.0 MiB in 0.010 s (1.26 GB/s)`.
    pub fn line(&self) -> String {
        format!(
            "{} message(s), {} in {:.3} s ({:.2} GB/s)",
            self.messages,
            human_bytes(self.bytes),
            self.seconds,
            self.gbps()
        )
    }
}

/// The environment variable a command reads a shared secret from when no
/// `--secret-file` is given.
pub const SECRET_ENV: &str = "TENSORFERRY_SECRET";

/// The shared secret tcp peers must prove they know: read from `file`, else
/// from the environment variable [`SECRET_ENV`]; none when neither is set.
/// Never from a command-line argument: those are visible to other users.
pub fn secret(file: Option<&std::path::Path>) -> Result<Option<tensorferry::Secret>, String> {
    match file {
        Some(path) => tensorferry::Secret::from_file(path)
            .map(Some)
            .map_err(|e| format!("--secret-file: {e}")),
        None if std::env::var_os(SECRET_ENV).is_some() => tensorferry::Secret::from_env(SECRET_ENV)
            .map(Some)
            .map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

/// A node builder from a configuration (its channels and its `"node"`
/// section), named `name`, with the command's own settings over the file's:
/// its secret (`--secret-file` or the environment), its TLS options and,
/// when given, its `--listen` address instead of the file's listen
/// addresses.
///
/// # Errors
///
/// A secret that cannot be read, or a node setting the engine refuses.
pub fn node_builder(
    name: &str,
    config: &tensorferry::device_map::ChannelConfig,
    secret_file: Option<&std::path::Path>,
    tls: &tls::TlsArgs,
    listen: Option<&str>,
) -> Result<tensorferry::NodeBuilder, String> {
    let mut config = config.clone();
    let command_secret = secret(secret_file)?;
    let node = config.node_mut();
    if command_secret.is_some() {
        node.secret = None;
    }
    if listen.is_some() {
        node.listen.clear();
        node.listen_public.clear();
    }
    // TLS options given to the command replace the file's TLS settings.
    if tls.config().is_some() {
        node.tls = None;
    }
    let mut builder = tensorferry::Node::builder()
        .name(name)
        .configure(config)
        .map_err(|e| e.to_string())?;
    if let Some(s) = command_secret {
        builder = builder.secret(s);
    }
    if let Some(config) = tls.config() {
        builder = builder.tls(config);
    }
    if let Some(addr) = listen {
        // Writing a non-loopback address on the command line is the explicit opt-in.
        builder = builder.listen_public(addr);
    }
    Ok(builder)
}

/// The addresses `node` listens on, ports resolved, as one line: `a, b`.
pub fn listening(node: &tensorferry::Node) -> String {
    node.listen_addrs()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a configuration's `"node"` section names addresses to listen on.
pub fn config_listens(config: &tensorferry::device_map::ChannelConfig) -> bool {
    let node = config.node();
    !node.listen.is_empty() || !node.listen_public.is_empty()
}
