//! `tensorferry store`: run a served store, and put, get, list and evict
//! entries of any store from the shell.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tensorferry::device_map::{ChannelConfig, Device};
use tensorferry::engine::safetensors::{export, import};
use tensorferry::engine::store::{Location, Overwrite, Store, DEFAULT_CHANNEL};
use tensorferry::engine::wire::{Frame, FrameMeta, TensorInfo};
use tensorferry::engine::{pattern, Message, Node};

use super::tensor_spec::TensorSpec;
use super::values::{self, Strict};
use super::{human_bytes, print_json, Outcome};

/// Options of `tensorferry store`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Serve a directory store on a node, so that other processes and hosts
    /// put, get and resolve proxies through it (`--store tcp://HOST:PORT`).
    /// Runs until stopped (Ctrl-C); every put is on disk before it is
    /// acknowledged, so stopping loses nothing.
    Serve(ServeArgs),
    /// Put one message (tensors from a safetensors file or generated, plus
    /// fields) under a new key or KEY; prints the key, or the proxy with --json.
    Put(PutArgs),
    /// Fetch the message under KEY: print its fields and tensors, check
    /// their checksums, and write them to a safetensors file with --out.
    Get(GetArgs),
    /// List the keys of a store with their sizes.
    Ls(LsArgs),
    /// Remove keys from a store. Exit 1 when one was not there.
    Evict(EvictArgs),
    /// Measure proxies against same-run baselines: resolving from a
    /// directory store (large and small, before first touch), from a store
    /// served by another process over tcp (against a raw tcp stream of the
    /// same bytes), and resolving ahead of a computation of equal length.
    Bench(super::store_bench::Args),
}

/// Where the store is and how to reach it.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The store: `dir:PATH` (or a plain path) for a directory on this
    /// host, or a node serving one, `tcp://HOST:PORT` (add `#CHANNEL` when
    /// it serves another channel than /tensorferry/store).
    #[arg(long, value_name = "LOCATION")]
    store: String,

    /// A file holding the shared secret of a served store's node (or the
    /// environment variable TENSORFERRY_SECRET). Never write a secret on
    /// the command line.
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,

    /// Seconds to wait for a served store to answer each call (above 0).
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = Strict(values::seconds), allow_hyphen_values = true)]
    timeout: f64,

    #[command(flatten)]
    tls: super::tls::TlsArgs,
}

impl StoreArgs {
    /// The store, and the node through which a served one is reached.
    fn open(&self) -> Result<(Store, Option<Node>), String> {
        let location: Location = self
            .store
            .parse()
            .map_err(|e: tensorferry::Error| format!("--store: {e}"))?;
        match location {
            Location::Memory { .. } => Err(
                "--store: a memory store lives inside one process; give dir:PATH or a served store's tcp://HOST:PORT".into(),
            ),
            Location::Dir { path } => Ok((Store::dir(&path).map_err(|e| e.to_string())?, None)),
            Location::Served { addr, channel } => {
                if addr.starts_with("inproc://") {
                    return Err(format!("--store {addr}: {}", super::INPROC_ELSEWHERE));
                }
                let node = super::node_builder(
                    "store-client",
                    &ChannelConfig::new(),
                    self.secret_file.as_deref(),
                    &self.tls,
                    None,
                )?
                .build()
                .map_err(|e| e.to_string())?;
                let store = Store::remote(&node, &addr, &channel)
                    .map_err(|e| e.to_string())?
                    .with_timeout(Duration::from_secs_f64(self.timeout));
                Ok((store, Some(node)))
            }
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Where to listen: `tcp://HOST:PORT` (port 0 picks one; the address is
    /// printed), or `shm://NAME` for this host's processes only.
    #[arg(long, value_name = "ADDR")]
    listen: String,

    /// The directory of the store (created when absent).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,

    /// The channel the store answers on.
    #[arg(long, default_value = DEFAULT_CHANNEL)]
    channel: String,

    /// A file holding the shared secret every peer must prove it knows (or
    /// the environment variable TENSORFERRY_SECRET).
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,

    /// Stop after this many seconds (above 0) instead of running until stopped.
    #[arg(long = "for", value_name = "SECS", value_parser = Strict(values::seconds), allow_hyphen_values = true)]
    run_for: Option<f64>,

    #[command(flatten)]
    tls: super::tls::TlsArgs,
}

#[derive(Debug, clap::Args)]
struct PutArgs {
    #[command(flatten)]
    store: StoreArgs,

    /// The key [default: a new random key]. A key has 1 to 200 ASCII
    /// letters, digits, `.`, `_` and `-`, and is written once.
    #[arg(long)]
    key: Option<String>,

    /// Replace what KEY holds (proxies made before then fail to resolve).
    #[arg(long, requires = "key")]
    overwrite: bool,

    /// Tensors from a safetensors file (every tensor of it).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,

    /// A tensor to generate: NAME=DTYPE:SHAPE, e.g. `w=f32:1024x1024`, its
    /// content from --seed as `send` makes it. Repeat for several.
    #[arg(long = "tensor", value_name = "SPEC")]
    tensors: Vec<TensorSpec>,

    /// Seed of generated content (0 to 2^64-1).
    #[arg(long, default_value_t = 0, value_parser = Strict(values::seed), allow_hyphen_values = true)]
    seed: u64,

    /// A JSON field of the message: KEY=JSON. Repeat for several.
    #[arg(long = "field", value_name = "KEY=JSON")]
    fields: Vec<String>,

    /// Print the proxy (JSON) instead of the key.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct GetArgs {
    #[command(flatten)]
    store: StoreArgs,

    /// The key.
    key: String,

    /// Also write the tensors to this safetensors file.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,

    /// Print one JSON object: key, fields, tensors, bytes, seconds.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct LsArgs {
    #[command(flatten)]
    store: StoreArgs,

    /// Print a JSON list of {key, bytes}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct EvictArgs {
    #[command(flatten)]
    store: StoreArgs,

    /// The keys to remove.
    #[arg(required = true)]
    keys: Vec<String>,
}

pub fn run(args: &Args) -> Outcome {
    match &args.command {
        Command::Serve(a) => serve(a),
        Command::Put(a) => put(a),
        Command::Get(a) => get(a),
        Command::Ls(a) => ls(a),
        Command::Evict(a) => evict(a),
        Command::Bench(a) => super::store_bench::run(a),
    }
}

fn serve(args: &ServeArgs) -> Outcome {
    if args.listen.starts_with("inproc://") {
        return Err(format!(
            "--listen {}: {}",
            args.listen,
            super::INPROC_ELSEWHERE
        ));
    }
    let store = Store::dir(&args.dir).map_err(|e| e.to_string())?;
    let node = super::node_builder(
        "store",
        &ChannelConfig::new(),
        args.secret_file.as_deref(),
        &args.tls,
        Some(&args.listen),
    )?
    .build()
    .map_err(|e| e.to_string())?;
    store
        .serve(&node, &args.channel)
        .map_err(|e| e.to_string())?;
    let entries = store.list().map_err(|e| e.to_string())?;
    say!(
        "serving store {} ({} key(s)) at {} on {}",
        args.dir.display(),
        entries.len(),
        super::listening(&node),
        args.channel
    );
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if args
            .run_for
            .is_some_and(|s| started.elapsed().as_secs_f64() >= s)
        {
            node.shutdown();
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn put(args: &PutArgs) -> Outcome {
    if args.file.is_none() && args.tensors.is_empty() && args.fields.is_empty() {
        return Err(
            "nothing to put: give --file FILE.safetensors, --tensor SPEC or --field KEY=JSON"
                .into(),
        );
    }
    if let Some(key) = &args.key {
        tensorferry::engine::store::check_key(key).map_err(|e| format!("--key: {e}"))?;
    }
    let mut message = Message::new();
    if let Some(path) = &args.file {
        let frames = import(path, "/store").map_err(|e| e.to_string())?;
        for frame in frames {
            for (name, t) in frame.message.tensors() {
                message = message.tensor(name, t.clone());
            }
            for (k, v) in frame.message.fields() {
                message = message.field(k.clone(), v.clone());
            }
        }
    }
    for spec in &args.tensors {
        if spec.device != Device::Cpu {
            return Err(format!(
                "--tensor {}: a stored tensor is generated on the host; leave out @{}",
                spec.name, spec.device
            ));
        }
        super::memory::check(
            &format!("--tensor {}: the tensor", spec.name),
            Some(spec.bytes),
            "give a smaller shape",
        )?;
        let t = pattern::tensor(spec.dtype, &spec.shape, args.seed, 0, &spec.name)
            .map_err(|e| e.to_string())?;
        message = message.tensor(spec.name.clone(), t);
    }
    for text in &args.fields {
        let (k, v) = super::send::parse_field(text)?;
        message = message.field(k, v);
    }
    let (store, _node) = args.store.open()?;
    let overwrite = if args.overwrite {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    };
    let key = match &args.key {
        Some(k) => {
            store
                .put_as(k, &message, overwrite)
                .map_err(|e| e.to_string())?;
            k.clone()
        }
        None => store.put(&message).map_err(|e| e.to_string())?,
    };
    if args.json {
        print_json(&store.proxy(&key).map_err(|e| e.to_string())?.to_json());
    } else {
        say!("{key}");
    }
    Ok(ExitCode::SUCCESS)
}

fn get(args: &GetArgs) -> Outcome {
    let (store, _node) = args.store.open()?;
    let started = Instant::now();
    let (message, manifest) = store.get_entry(&args.key).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    for ((name, t), want) in message.tensors().zip(&manifest.tensors) {
        match t.checksum() {
            Ok(got) if got == want.checksum => {}
            Ok(got) => problems.push(format!(
                "tensor `{name}`: checksum {got}, stored {}",
                want.checksum
            )),
            Err(e) => problems.push(format!("tensor `{name}`: {e}")),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &args.out {
        let infos = message
            .tensors()
            .enumerate()
            .map(|(i, (_, t))| TensorInfo {
                dtype: t.dtype(),
                device: t.device(),
                buffer: i,
                bytes: t.size_bytes() as u64,
                checksum: None,
                cast_from: None,
            })
            .collect();
        let frame = Frame {
            meta: FrameMeta::message("/store", 0),
            message: message.clone(),
            tensors: infos,
            frame_len: manifest.frame_bytes,
        };
        export(std::slice::from_ref(&frame), path).map_err(|e| e.to_string())?;
    }
    let tensors: Vec<Value> = manifest
        .tensors
        .iter()
        .map(|t| json!({"name": t.name, "dtype": t.dtype, "shape": t.shape, "bytes": t.bytes, "checksum": t.checksum}))
        .collect();
    if args.json {
        print_json(&json!({
            "key": args.key, "fields": message.fields(), "tensors": tensors,
            "bytes": manifest.tensor_bytes(), "seconds": seconds, "valid": problems.is_empty(), "problems": problems,
        }));
    } else {
        say!(
            "{} ({}) from {}",
            args.key,
            human_bytes(manifest.tensor_bytes()),
            store.location()
        );
        if !message.fields().is_empty() {
            say!("  fields {}", Value::Object(message.fields().clone()));
        }
        for t in &manifest.tensors {
            say!(
                "  {:<16} {:<6} {:?}, {} bytes, checksum {}",
                t.name,
                t.dtype,
                t.shape,
                t.bytes,
                t.checksum
            );
        }
        if let Some(path) = &args.out {
            say!(
                "wrote {} tensor(s) to {}",
                manifest.tensors.len(),
                path.display()
            );
        }
    }
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            eprintln!("error: {p}");
        }
        Ok(ExitCode::from(super::EXIT_INVALID))
    }
}

fn ls(args: &LsArgs) -> Outcome {
    let (store, _node) = args.store.open()?;
    let entries = store.list().map_err(|e| e.to_string())?;
    if args.json {
        print_json(&json!(entries));
    } else {
        for e in &entries {
            say!("{:<40} {}", e.key, human_bytes(e.bytes));
        }
        let total: u64 = entries.iter().map(|e| e.bytes).sum();
        say!(
            "{} key(s), {} in {}",
            entries.len(),
            human_bytes(total),
            store.location()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn evict(args: &EvictArgs) -> Outcome {
    let (store, _node) = args.store.open()?;
    let mut missing = 0;
    for key in &args.keys {
        if store.evict(key).map_err(|e| e.to_string())? {
            say!("evicted {key}");
        } else {
            eprintln!("{key}: not in {}", store.location());
            missing += 1;
        }
    }
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
