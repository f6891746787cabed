//! Eight publishers and eight subscribers in separate processes, over tcp
//! and shm, for 5 s (`TENSORFERRY_LONG=1`: 60 s).
//!
//! - Under `block` (the default) nothing is lost or reordered: each
//!   subscriber receives every publisher's messages, sequence numbers
//!   consecutive, every byte intact.
//! - Slow subscribers under `drop_oldest`, with `queue_depth` and
//!   `queue_bytes`: their memory stays bounded while they fall far behind,
//!   what they miss is exactly what their queue dropped (and counted), and
//!   the other subscribers still get everything.
//!
//! The publishers are eight nodes in one process, each listening on tcp and
//! shm; each subscriber is a node in a process of its own that connects to
//! all eight. The figures are in docs/reliability.md.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tensorferry::engine::pattern;
use tensorferry::{ChannelConfig, DType, Error, Message, Node, Tensor};

mod common;
use common::procfs::{holdings, status_bytes};
use common::{long, Reaped};

const ROLE_ENV: &str = "TENSORFERRY_TEST_LOAD";
const CHANNEL: &str = "/load";
const PUBLISHERS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

/// The load tests each start seventeen processes: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn seconds() -> f64 {
    if long() {
        60.0
    } else {
        5.0
    }
}

// ---------------------------------------------------------------------------
// The roles.

/// Not a test on its own: a process of the load tests (publishers or one
/// subscriber), which run this test binary again with only this selected.
/// `TENSORFERRY_TEST_LOAD` holds its part as JSON.
#[test]
#[ignore = "run as a child process by the load tests"]
fn load_process() {
    let Ok(spec) = std::env::var(ROLE_ENV) else {
        return;
    };
    let spec: Value = serde_json::from_str(&spec).expect("role");
    match spec["role"].as_str() {
        Some("publishers") => publishers(&spec),
        Some("subscriber") => subscriber(&spec),
        other => panic!("unknown role {other:?}"),
    }
}

/// The tensor publisher `p` sends as message `seq`.
fn content(p: u64, seq: u64, bytes: usize) -> Tensor {
    pattern::tensor(DType::U8, &[bytes], p, seq, "x").expect("tensor")
}

/// Eight nodes, each listening on tcp and shm. On `go` each publishes as
/// fast as its subscribers take for `seconds`, then flushes and prints how
/// many it sent.
fn publishers(spec: &Value) {
    let mut commands = std::io::stdin().lines().map_while(Result::ok);
    let bytes = spec["bytes"].as_u64().expect("bytes") as usize;
    let subscribers = spec["subscribers"].as_u64().expect("subscribers") as usize;
    let secs = spec["seconds"].as_f64().expect("seconds");
    let nodes: Vec<Node> = (0..PUBLISHERS)
        .map(|i| {
            Node::builder()
                .name(format!("publisher-{i}"))
                .listen("tcp://127.0.0.1:0")
                .listen(format!("shm://tf-load-{}-{i}", std::process::id()))
                .build()
                .expect("publisher node")
        })
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        let addrs: Vec<String> = n.listen_addrs().iter().map(ToString::to_string).collect();
        println!("publisher {i} {}", addrs.join(" "));
    }
    assert_eq!(commands.next().as_deref(), Some("go"));
    let handles: Vec<_> = nodes
        .into_iter()
        .enumerate()
        .map(|(i, node)| {
            std::thread::spawn(move || {
                let publisher = node.publisher(CHANNEL);
                publisher
                    .wait_for_subscribers(subscribers, WAIT)
                    .expect("every subscriber");
                let start = Instant::now();
                let mut seq = 0u64;
                while start.elapsed().as_secs_f64() < secs {
                    let m = Message::new()
                        .field("p", i)
                        .tensor("x", content(i as u64, seq, bytes));
                    publisher.send(m).expect("send");
                    seq += 1;
                }
                publisher.flush(WAIT).expect("flush");
                let lost = publisher.lost_subscribers();
                assert!(lost.is_empty(), "publisher {i} lost {lost:?}");
                (seq, node)
            })
        })
        .collect();
    let done: Vec<(u64, Node)> = handles
        .into_iter()
        .map(|h| h.join().expect("publisher"))
        .collect();
    let sent: Vec<u64> = done.iter().map(|(n, _)| *n).collect();
    println!("{}", json!({ "sent": sent }));
    // The nodes stay up until the subscribers have drained.
    for _ in commands.by_ref() {}
}

/// One node connected to every publisher. It checks every message (which
/// publisher, which sequence number, every byte) and, on `drain`, reads
/// until nothing came for a second, then prints what it saw.
fn subscriber(spec: &Value) {
    let slow = Duration::from_micros(spec["slow_us"].as_u64().unwrap_or(0));
    let mut builder = Node::builder().name("subscriber");
    if let Some(config) = spec.get("config") {
        builder = builder
            .channels(ChannelConfig::from_json_str(&config.to_string()).expect("channel config"));
    }
    let node = builder.build().expect("subscriber node");
    for addr in spec["publishers"].as_array().expect("publishers") {
        node.connect(addr.as_str().expect("address"))
            .expect("connect");
    }
    let sub = node.subscriber(CHANNEL);
    println!("ready");
    let (tx, drain) = mpsc::channel();
    std::thread::spawn(move || {
        for c in std::io::stdin().lines().map_while(Result::ok) {
            if c == "drain" {
                let _ = tx.send(());
            }
        }
    });
    let mut next = [0u64; PUBLISHERS];
    let mut received = [0u64; PUBLISHERS];
    let mut missing = [0u64; PUBLISHERS];
    let (mut reordered, mut bad) = (0u64, Vec::<String>::new());
    let mut scratch = Vec::new();
    let mut draining = false;
    loop {
        if !draining && drain.try_recv().is_ok() {
            draining = true;
        }
        let wait = if draining {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(50)
        };
        let r = match sub.recv_timeout(wait) {
            Ok(r) => r,
            Err(Error::Timeout { .. }) if draining => break,
            Err(Error::Timeout { .. }) => continue,
            Err(e) => panic!("subscriber: {e}"),
        };
        let p = r.message.get_field("p").and_then(Value::as_u64).expect("p") as usize;
        if r.seq < next[p] {
            reordered += 1;
        } else {
            missing[p] += r.seq - next[p];
            next[p] = r.seq + 1;
        }
        received[p] += 1;
        let x = r.message.get("x").expect("x").packed().expect("host");
        scratch.resize(x.len(), 0);
        pattern::fill(DType::U8, p as u64, r.seq, "x", &mut scratch);
        if x.as_slice() != &scratch[..] && bad.len() < 5 {
            bad.push(format!("publisher {p} message {}", r.seq));
        }
        drop(r);
        if !slow.is_zero() {
            std::thread::sleep(slow);
        }
    }
    println!(
        "{}",
        json!({
            "received": received,
            "missing": missing,
            "reordered": reordered,
            "bad": bad,
            "dropped": sub.dropped(),
            "node_dropped": node.stats().dropped,
            "holdings": holdings(std::process::id()).to_string(),
        })
    );
}

// ---------------------------------------------------------------------------
// The parent's side.

/// A child of this test binary in `role`, its stdin and its stdout lines.
struct Role {
    child: Reaped,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Role {
    fn start(spec: Value) -> Role {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "load_process", "--ignored", "--nocapture"])
            .env(ROLE_ENV, spec.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn a load process");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Role {
            child: Reaped::new(child),
            stdin,
            lines,
        }
    }

    fn child(&self) -> &Child {
        &self.child
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("command");
    }

    /// The next line it prints that `want` accepts.
    fn line(&self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT * 2;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .recv_timeout(left)
                .expect("a load process went quiet or exited");
            if want(&l) {
                return l;
            }
        }
    }

    fn json(&self) -> Value {
        let l = self.line(|l| l.starts_with('{'));
        serde_json::from_str(&l).expect("JSON")
    }

    fn end(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// A subscriber of the load.
struct Sub {
    role: Role,
    label: String,
    slow: bool,
}

/// A slow subscriber's memory.
#[derive(Debug, Clone)]
struct Memory {
    label: String,
    pid: u32,
    anon_ready: u64,
    anon_max: u64,
    shmem_max: u64,
}

impl Memory {
    fn sample(&mut self) {
        self.anon_max = self.anon_max.max(status_bytes(self.pid, "RssAnon"));
        self.shmem_max = self.shmem_max.max(status_bytes(self.pid, "RssShmem"));
    }
}

/// What one run saw.
struct Run {
    sent: Vec<u64>,
    reports: Vec<(String, bool, Value)>,
    /// Memory of each slow subscriber, when ready and at most during the
    /// run: private (`RssAnon`), and shared memory of the publishers' slots
    /// it mapped (`RssShmem`).
    rss: Vec<Memory>,
    seconds: f64,
}

/// Publishes for `seconds()` to `subs` subscribers, each given by
/// (label, transport, slow microseconds per message, channel config).
fn run(bytes: usize, subs: &[(&str, &str, u64, Option<Value>)]) -> Run {
    let secs = seconds();
    let mut publishers = Role::start(json!({
        "role": "publishers",
        "bytes": bytes,
        "subscribers": subs.len(),
        "seconds": secs,
    }));
    let mut addrs: Vec<Vec<String>> = Vec::new();
    for i in 0..PUBLISHERS {
        let l = publishers.line(|l| l.starts_with(&format!("publisher {i} ")));
        addrs.push(l.split(' ').skip(2).map(str::to_string).collect());
    }
    let mut started: Vec<Sub> = subs
        .iter()
        .map(|(label, transport, slow_us, config)| {
            let publishers: Vec<&String> = addrs
                .iter()
                .map(|a| {
                    a.iter()
                        .find(|x| x.starts_with(transport))
                        .expect("an address of the transport")
                })
                .collect();
            let mut spec = json!({
                "role": "subscriber",
                "publishers": publishers,
                "slow_us": slow_us,
            });
            if let Some(c) = config {
                spec["config"] = c.clone();
            }
            Sub {
                role: Role::start(spec),
                label: label.to_string(),
                slow: *slow_us > 0,
            }
        })
        .collect();
    for s in &started {
        s.role.line(|l| l == "ready");
    }
    let mut rss_at: Vec<Memory> = started
        .iter()
        .filter(|s| s.slow)
        .map(|s| {
            let pid = s.role.child().id();
            let anon = status_bytes(pid, "RssAnon");
            Memory {
                label: s.label.clone(),
                pid,
                anon_ready: anon,
                anon_max: anon,
                shmem_max: status_bytes(pid, "RssShmem"),
            }
        })
        .collect();
    publishers.say("go");
    // Each slow subscriber's resident memory while it falls behind.
    let (tx, sent) = mpsc::channel();
    let pubs = std::thread::spawn(move || {
        let v = publishers.json();
        let _ = tx.send(v);
        publishers
    });
    let start = Instant::now();
    let sent: Value = loop {
        match sent.recv_timeout(Duration::from_millis(100)) {
            Ok(v) => break v,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("the publishers: {e}"),
        }
        for m in &mut rss_at {
            m.sample();
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    let publishers = pubs.join().expect("publishers");
    for s in &mut started {
        s.role.say("drain");
    }
    let reports = started
        .into_iter()
        .map(|s| {
            let v = s.role.json();
            s.role.end();
            (s.label, s.slow, v)
        })
        .collect();
    publishers.end();
    Run {
        sent: sent["sent"]
            .as_array()
            .expect("sent")
            .iter()
            .map(|n| n.as_u64().expect("count"))
            .collect(),
        reports,
        rss: rss_at,
        seconds,
    }
}

/// A subscriber that got every message of every publisher, in order,
/// every byte intact.
fn assert_got_everything(label: &str, sent: &[u64], v: &Value) {
    let received: Vec<u64> = serde_json::from_value(v["received"].clone()).expect("received");
    assert_eq!(received, sent, "{label}: {v}");
    assert_eq!(v["missing"], json!(vec![0u64; PUBLISHERS]), "{label}: {v}");
    assert_eq!(v["reordered"], 0, "{label}: {v}");
    assert_eq!(v["bad"], json!([]), "{label}: {v}");
    assert_eq!(v["dropped"], 0, "{label}: {v}");
}

#[test]
fn eight_publishers_to_eight_subscribers_under_block_lose_and_reorder_nothing() {
    let _one = one_at_a_time();
    let bytes = 4096;
    let subs: Vec<(String, &str)> = (0..8)
        .map(|i| {
            let t = if i < 4 { "tcp" } else { "shm" };
            (format!("subscriber {i} ({t})"), t)
        })
        .collect();
    let spec: Vec<(&str, &str, u64, Option<Value>)> = subs
        .iter()
        .map(|(l, t)| (l.as_str(), *t, 0, None))
        .collect();
    let r = run(bytes, &spec);
    for (label, _, v) in &r.reports {
        assert_got_everything(label, &r.sent, v);
    }
    let published: u64 = r.sent.iter().sum();
    let delivered = published * subs.len() as u64;
    println!(
        "block: 8 publishers x 8 subscribers (4 tcp, 4 shm), {bytes} B messages, {:.1} s: \
         {published} published ({:.0}/s), {delivered} delivered ({:.0}/s), none lost or reordered; per publisher {:?}",
        r.seconds,
        published as f64 / r.seconds,
        delivered as f64 / r.seconds,
        r.sent
    );
}

#[test]
fn slow_subscribers_under_drop_oldest_stay_bounded_and_count_what_they_miss() {
    let _one = one_at_a_time();
    let bytes = 64 << 10;
    let (depth, queue_bytes) = (16u64, 2u64 << 20);
    let drop_oldest = json!({"channels": {CHANNEL: {
        "overflow": "drop_oldest", "queue_depth": depth, "queue_bytes": queue_bytes}}});
    let mut spec: Vec<(String, &str, u64, Option<Value>)> = (0..6)
        .map(|i| {
            let t = if i < 3 { "tcp" } else { "shm" };
            (format!("subscriber {i} ({t})"), t, 0, None)
        })
        .collect();
    for t in ["tcp", "shm"] {
        spec.push((
            format!("slow subscriber ({t})"),
            t,
            20_000,
            Some(drop_oldest.clone()),
        ));
    }
    let spec_ref: Vec<(&str, &str, u64, Option<Value>)> = spec
        .iter()
        .map(|(l, t, s, c)| (l.as_str(), *t, *s, c.clone()))
        .collect();
    let r = run(bytes, &spec_ref);
    let published: u64 = r.sent.iter().sum();
    // A bound on the slow subscribers' private memory far below what they
    // missed: a queue that kept everything would cross it twice over.
    // Four times the queue's bytes: the queue, the frames being read from
    // eight connections, and the receive buffers kept for reuse.
    let bound: u64 = 4 * queue_bytes;
    for (label, slow, v) in &r.reports {
        if !slow {
            assert_got_everything(label, &r.sent, v);
            continue;
        }
        let received: Vec<u64> = serde_json::from_value(v["received"].clone()).expect("received");
        // In order, every byte intact; what it missed is what its queue
        // dropped, and was counted.
        assert_eq!(v["reordered"], 0, "{label}: {v}");
        assert_eq!(v["bad"], json!([]), "{label}: {v}");
        let missed: u64 = r.sent.iter().zip(&received).map(|(s, g)| s - g).sum();
        assert_eq!(v["dropped"], missed, "{label}: {v}");
        assert_eq!(v["node_dropped"], missed, "{label}: {v}");
        let m = r.rss.iter().find(|m| m.label == *label).expect("memory");
        let grown = m.anon_max.saturating_sub(m.anon_ready);
        println!(
            "drop_oldest, {label}: received {} of {published} ({} dropped and counted, {} MiB); \
             private memory {} MiB when ready, at most {} MiB (+{} MiB); publishers' shared slots \
             it mapped: at most {} MiB resident; at the end it held {}",
            received.iter().sum::<u64>(),
            missed,
            (missed * bytes as u64) >> 20,
            m.anon_ready >> 20,
            m.anon_max >> 20,
            grown >> 20,
            m.shmem_max >> 20,
            v["holdings"],
        );
        assert!(
            missed * bytes as u64 > 2 * bound,
            "{label}: it fell only {missed} messages behind; the bound proves nothing"
        );
        assert!(
            grown <= bound,
            "{label}: private memory grew by {} MiB",
            grown >> 20
        );
    }
    println!(
        "drop_oldest: 8 publishers, 6 subscribers at full speed and 2 slow ones (20 ms a message, queue_depth {depth}, \
         queue_bytes {} MiB), {bytes} B messages, {:.1} s: {published} published ({:.0}/s)",
        queue_bytes >> 20,
        r.seconds,
        published as f64 / r.seconds
    );
}
