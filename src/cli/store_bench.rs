//! `tensorferry store bench`: what a proxy costs, beside baselines measured
//! in the same run.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tensorferry::engine::store::{clear_cache, Proxy, Store, DEFAULT_CHANNEL};
use tensorferry::engine::{Message, Node, Tensor};
use tensorferry::kernels::DType;

use super::values::{self, Strict};
use super::{print_json, Outcome};

/// Options of `tensorferry store bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The large entry's size (B, KiB, MiB or GiB, e.g. 256MiB); the small
    /// one is 4KiB.
    #[arg(long, default_value = "256MiB", value_parser = Strict(values::size), allow_hyphen_values = true)]
    size: u64,

    /// Measurements of each kind; the median is reported (1 to 1000).
    #[arg(long, default_value_t = 5, value_parser = Strict(rounds), allow_hyphen_values = true)]
    rounds: u64,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

fn rounds(text: &str) -> Result<u64, String> {
    values::whole(text, 1, 1000)
}

const SMALL: u64 = 4096;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn message_of(bytes: u64) -> Result<Message, String> {
    let n = (bytes / 4) as usize;
    let t = tensorferry::engine::pattern::tensor(DType::F32, &[n], 1, 0, "x")
        .map_err(|e| e.to_string())?;
    Ok(Message::new().field("bytes", bytes).tensor("x", t))
}

/// A fresh proxy of `proxy` (as a receiver gets one), with an empty cache.
fn fresh(proxy: &Proxy, node: Option<&Node>) -> Result<Proxy, String> {
    clear_cache();
    let p = Proxy::from_json(&proxy.to_json()).map_err(|e| e.to_string())?;
    if let Some(n) = node {
        p.set_node(n);
    }
    Ok(p)
}

/// Seconds to resolve a fresh copy of `proxy`.
fn resolve_seconds(proxy: &Proxy, node: Option<&Node>) -> Result<f64, String> {
    let p = fresh(proxy, node)?;
    let started = Instant::now();
    let m = p.resolve().map_err(|e| e.to_string())?;
    let s = started.elapsed().as_secs_f64();
    drop(m);
    Ok(s)
}

/// CPU seconds (user and system) this process has used.
fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds_of(std::process::id())
}

/// CPU seconds (user and system) process `pid` has used, from `/proc`.
fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Work on the host for `length`: sums over a buffer that stays in cache.
fn compute(length: Duration) -> u64 {
    let data: Vec<u64> = (0..16_384).collect();
    let started = Instant::now();
    let mut acc = 0u64;
    while started.elapsed() < length {
        for v in &data {
            acc = acc.wrapping_mul(31).wrapping_add(*v);
        }
        acc = std::hint::black_box(acc);
    }
    acc
}

/// `tensorferry store serve` in another process on a directory; its address.
fn serve_elsewhere(dir: &std::path::Path, listen: &str) -> Result<(Stop, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let child = Command::new(exe)
        .args(["store", "serve", "--listen", listen, "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the serving process: {e}"))?;
    let mut child = Stop(child);
    let mut line = String::new();
    let stdout = child
        .0
        .stdout
        .as_mut()
        .ok_or("no stdout from the serving process")?;
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .split_whitespace()
        .find(|w| w.contains("://"))
        .map(|w| w.trim_end_matches(','))
        .ok_or_else(|| format!("the serving process said `{}`", line.trim()))?
        .to_string();
    Ok((child, addr))
}

struct Stop(Child);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &Args) -> Outcome {
    if args.size < SMALL || args.size % 4 != 0 {
        return Err(format!(
            "--size {}: give at least 4KiB, a multiple of 4 bytes",
            args.size
        ));
    }
    super::memory::check(
        "--size: the entry, held twice (the serving side's page cache and the received copy)",
        args.size.checked_mul(2),
        "give a smaller --size",
    )?;
    let dir = std::env::temp_dir().join(format!("tf-store-bench-{}", std::process::id()));
    let result = measure(args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    if args.json {
        print_json(&report);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn measure(args: &Args, dir: &std::path::Path) -> Result<Value, String> {
    let bar = indicatif::ProgressBar::new(4);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:20}] {pos}/{len}")
            .map_err(|e| e.to_string())?,
    );
    let store = Store::dir(dir).map_err(|e| e.to_string())?;
    bar.set_message("writing the entries");
    let small = store
        .put_proxy(&message_of(SMALL)?)
        .map_err(|e| e.to_string())?;
    let large = store
        .put_proxy(&message_of(args.size)?)
        .map_err(|e| e.to_string())?;
    bar.inc(1);

    // 1. A directory store: resolving maps the file; nothing is read
    // until the tensor is touched.
    bar.set_message("resolving from the directory store");
    let mut small_s = Vec::new();
    let mut large_s = Vec::new();
    for round in 0..args.rounds {
        // Each goes first in half the rounds.
        if round % 2 == 0 {
            small_s.push(resolve_seconds(&small, None)?);
            large_s.push(resolve_seconds(&large, None)?);
        } else {
            large_s.push(resolve_seconds(&large, None)?);
            small_s.push(resolve_seconds(&small, None)?);
        }
    }
    let mut touch_s = Vec::new();
    for _ in 0..args.rounds {
        let p = fresh(&large, None)?;
        let t: Tensor = p.tensor().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let sum = t.checksum().map_err(|e| e.to_string())?;
        std::hint::black_box(sum);
        touch_s.push(started.elapsed().as_secs_f64());
    }
    bar.inc(1);

    // 2. A store served by another process over tcp, against a raw tcp
    // stream of the same bytes to another process; then over shm.
    bar.set_message("fetching from a served store");
    let tcp = served_fetches(args, dir, "tcp://127.0.0.1:0", large.key())?;
    let raw_gbps = super::bench::raw_tcp_gbps(args.size, args.rounds.max(3))?;
    bar.inc(1);
    bar.set_message("fetching from a store served over shm");
    let shm_name = format!("shm://tf-store-bench-{}", std::process::id());
    let shm = served_fetches(args, dir, &shm_name, large.key())?;
    bar.inc(1);
    bar.finish_and_clear();

    let small_us = median(small_s) * 1e6;
    let large_us = median(large_s) * 1e6;
    Ok(json!({
        "size": args.size,
        "rounds": args.rounds,
        "dir": {
            "resolve_small_us": small_us,
            "resolve_large_us": large_us,
            "large_over_small": large_us / small_us,
            "touch_large_ms": median(touch_s) * 1e3,
        },
        "served": {
            "raw_tcp_gbps": raw_gbps,
            "ratio": tcp["gbps"].as_f64().unwrap_or(0.0) / raw_gbps,
            "tcp": tcp,
            "shm": shm,
        },
    }))
}

/// Fetches of `key` from a store on `dir` served by another process
/// listening on `listen`: time and CPU per fetch, and resolving ahead of a
/// computation as long as a fetch, on the host's cores and off them.
fn served_fetches(
    args: &Args,
    dir: &std::path::Path,
    listen: &str,
    key: &str,
) -> Result<Value, String> {
    let (server, addr) = serve_elsewhere(dir, listen)?;
    let server_pid = server.0.id();
    let node = Node::builder()
        .name("store-bench")
        .build()
        .map_err(|e| e.to_string())?;
    let served = Store::remote(&node, &addr, DEFAULT_CHANNEL)
        .map_err(|e| e.to_string())?
        .proxy(key)
        .map_err(|e| e.to_string())?;
    resolve_seconds(&served, Some(&node))?; // connect and warm the pool
    let mut fetch_s = Vec::new();
    let (client_before, server_before) = (own_cpu_seconds(), cpu_seconds_of(server_pid));
    for _ in 0..args.rounds {
        fetch_s.push(resolve_seconds(&served, Some(&node))?);
    }
    let per_fetch = |before: Option<f64>, after: Option<f64>| {
        before
            .zip(after)
            .map(|(b, a)| (a - b) / args.rounds as f64 * 1e3)
    };
    let client_cpu_ms = per_fetch(client_before, own_cpu_seconds());
    let server_cpu_ms = per_fetch(server_before, cpu_seconds_of(server_pid));
    let fetch = median(fetch_s);
    let length = Duration::from_secs_f64(fetch);
    let on_cpu = overlap(&served, &node, args.rounds, fetch, || {
        std::hint::black_box(compute(length));
    })?;
    let off_cpu = overlap(&served, &node, args.rounds, fetch, || {
        std::thread::sleep(length)
    })?;
    node.shutdown();
    Ok(json!({
        "address": addr,
        "fetch_ms": fetch * 1e3,
        "gbps": args.size as f64 / fetch / 1e9,
        "client_cpu_ms": client_cpu_ms,
        "server_cpu_ms": server_cpu_ms,
        "ahead": {"host_compute": on_cpu, "device_wait": off_cpu},
    }))
}

/// Resolving `proxy` ahead of `work` (as long as the fetch, `fetch`
/// seconds): the median time of both together, and the part of the fetch
/// that did not add to the work's time.
fn overlap(
    proxy: &Proxy,
    node: &Node,
    rounds: u64,
    fetch: f64,
    work: impl Fn(),
) -> Result<Value, String> {
    let mut total_s = Vec::new();
    let mut work_s = Vec::new();
    for _ in 0..rounds {
        let p = fresh(proxy, Some(node))?;
        let started = Instant::now();
        p.resolve_async();
        let w = Instant::now();
        work();
        work_s.push(w.elapsed().as_secs_f64());
        let m = p.resolve().map_err(|e| e.to_string())?;
        total_s.push(started.elapsed().as_secs_f64());
        drop(m);
    }
    let total = median(total_s);
    let worked = median(work_s);
    let hidden = ((fetch - (total - worked).max(0.0)) / fetch).clamp(0.0, 1.0);
    Ok(
        json!({"fetch_ms": fetch * 1e3, "compute_ms": worked * 1e3, "total_ms": total * 1e3, "hidden": hidden}),
    )
}

fn print_report(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let size = super::human_bytes(r["size"].as_u64().unwrap_or(0));
    say!(
        "proxies, median of {} round(s); each resolve starts from a fresh proxy and an empty cache",
        r["rounds"]
    );
    say!("");
    say!("directory store (resolve maps the entry; bytes are read when touched)");
    say!(
        "  resolve 4 KiB          {:>10.1} µs",
        f(&r["dir"]["resolve_small_us"])
    );
    say!(
        "  resolve {size:<14} {:>10.1} µs   {:.2}× the 4 KiB one",
        f(&r["dir"]["resolve_large_us"]),
        f(&r["dir"]["large_over_small"])
    );
    say!(
        "  then touch every byte  {:>10.1} ms   (checksum of the {size})",
        f(&r["dir"]["touch_large_ms"])
    );
    say!("");
    for (transport, title) in [
        ("tcp", "served store, another process over tcp loopback"),
        ("shm", "served store, another process over shared memory"),
    ] {
        let t = &r["served"][transport];
        say!("{title}");
        say!(
            "  resolve {size:<14} {:>10.1} ms   {:.2} GB/s",
            f(&t["fetch_ms"]),
            f(&t["gbps"])
        );
        if transport == "tcp" {
            say!(
                "  raw tcp stream         {:>10}      {:.2} GB/s   (baseline: writes of {size} to another process)",
                "",
                f(&r["served"]["raw_tcp_gbps"])
            );
            say!(
                "  ratio                  {:>10}      {:.2}×",
                "",
                f(&r["served"]["ratio"])
            );
        }
        say!(
            "  CPU per fetch          {:>10.1} ms here, {:.1} ms in the serving process",
            f(&t["client_cpu_ms"]),
            f(&t["server_cpu_ms"])
        );
        say!("  resolved ahead of a computation as long as the fetch:");
        for (kind, what) in [
            ("host_compute", "on the host's cores"),
            ("device_wait", "off the host's cores (a device kernel, I/O)"),
        ] {
            let a = &t["ahead"][kind];
            say!(
                "    {what}: {:.1} ms + {:.1} ms took {:.1} ms, {:.0}% of the fetch hidden",
                f(&a["fetch_ms"]),
                f(&a["compute_ms"]),
                f(&a["total_ms"]),
                f(&a["hidden"]) * 100.0
            );
        }
        say!("");
    }
}
