//! What TLS costs on tcp, beside plain tcp in the same run:
//!
//! - `tls/f32-64MiB`: one f32 tensor of 64 MiB from a publisher to a
//!   subscriber, one message per iteration (as `transport`), over plain tcp
//!   and over TLS;
//! - `tls/pubsub-4KiB`: 1,000 messages of one 4 KiB tensor per iteration,
//!   published by a sender thread while the subscriber takes them
//!   (pipelined), over plain tcp and over TLS: messages per second;
//! - `tls/open`: a new node connects and makes its first request (a small
//!   echo round trip): plain tcp, tcp with a shared secret (HMAC
//!   challenge–response), TLS, TLS with the secret. Each sample is one
//!   connection; building the dialing node (and reading its PEM files) is
//!   not timed, nor is closing it.
//!
//! Both nodes live in this process and talk over loopback. Certificates
//! (ECDSA P-256, one CA) are made for the run with rcgen. After criterion's
//! report, a summary prints each row's median over its measured samples
//! (10 per throughput row, 200 connections per opening row; criterion's
//! warm-up left out) and the TLS/plain ratios.

// main and the bench functions need no docs.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tensorferry::engine::{pattern, DType, Message, Node, Secret, Service, TlsConfig};

const MIB: usize = 1 << 20;
const CHANNEL: &str = "/bench";
const BATCH: usize = 1000;
const WAIT: Duration = Duration::from_secs(60);
/// Samples of the throughput rows (one per `iter_custom` call).
const SAMPLES: usize = 10;
/// Connections measured per opening row (one per sample).
const CONNECTIONS: usize = 200;

/// Seconds per iteration of each row, in the order measured, criterion's
/// warm-up first (the summary takes the measured samples: the last ones).
static RECORD: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

fn record(row: &str, seconds_per_iteration: f64) {
    RECORD
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(row.to_string())
        .or_default()
        .push(seconds_per_iteration);
}

/// PEM files of a CA and a certificate for 127.0.0.1 it signed.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir =
            std::env::temp_dir().join(format!("tensorferry-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write pem");
            path
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "bench ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("key");
        let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = leaf.signed_by(&key, &issuer).expect("leaf");
        Pki {
            ca: write("ca.crt", ca_pem),
            cert: write("node.crt", cert.pem()),
            key: write("node.key", key.serialize_pem()),
            dir,
        }
    }

    fn listener(&self) -> TlsConfig {
        TlsConfig::new().cert_file(&self.cert).key_file(&self.key)
    }

    fn dialer(&self) -> TlsConfig {
        TlsConfig::new().ca_file(&self.ca)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How a row's connection is opened.
#[derive(Clone, Copy)]
struct Opening {
    name: &'static str,
    tls: bool,
    secret: bool,
}

const PLAIN: Opening = Opening {
    name: "tcp",
    tls: false,
    secret: false,
};
const SECRET: Opening = Opening {
    name: "tcp+secret",
    tls: false,
    secret: true,
};
const TLS: Opening = Opening {
    name: "tls",
    tls: true,
    secret: false,
};
const TLS_SECRET: Opening = Opening {
    name: "tls+secret",
    tls: true,
    secret: true,
};

fn secret() -> Secret {
    Secret::new(b"a bench secret of thirty-two by".to_vec()).expect("secret")
}

/// A listening node opened as `how`, serving an inline echo.
fn listener(pki: &Pki, how: Opening) -> (Node, String) {
    let mut b = Node::builder().name("bench-rx").listen("tcp://127.0.0.1:0");
    if how.tls {
        b = b.tls(pki.listener());
    }
    if how.secret {
        b = b.secret(secret());
    }
    let node = b.build().expect("the receiving node listens");
    node.serve("/echo", Service::new(Ok).inline(true))
        .expect("echo");
    let addr = node.listen_addrs()[0].to_string();
    (node, addr)
}

/// A dialing node opened as `how`.
fn dialer(pki: &Pki, how: Opening) -> Node {
    let mut b = Node::builder().name("bench-tx");
    if how.tls {
        b = b.tls(pki.dialer());
    }
    if how.secret {
        b = b.secret(secret());
    }
    b.build().expect("the sending node")
}

/// A subscriber on a listening node and a publisher on a node connected to it.
fn pair(
    pki: &Pki,
    how: Opening,
) -> (
    Node,
    Node,
    tensorferry::engine::Publisher,
    tensorferry::engine::Subscription,
) {
    let (rx, addr) = listener(pki, how);
    let sub = rx.subscriber(CHANNEL);
    let tx = dialer(pki, how);
    tx.connect(&addr).expect("connect");
    let publisher = tx.publisher(CHANNEL);
    publisher
        .wait_for_subscribers(1, Duration::from_secs(10))
        .expect("the subscription reaches the publisher");
    (rx, tx, publisher, sub)
}

fn large(c: &mut Criterion, pki: &Pki) {
    let bytes = 64 * MIB;
    let tensor = pattern::tensor(DType::F32, &[bytes / 4], 1, 0, "x").expect("tensor");
    let mut g = c.benchmark_group("tls/f32-64MiB");
    g.throughput(Throughput::Bytes(bytes as u64));
    for how in [PLAIN, TLS] {
        let (_rx, _tx, publisher, sub) = pair(pki, how);
        let row = format!("64MiB/{}", how.name);
        g.bench_function(format!("{}: publish -> subscriber", how.name), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    publisher
                        .send(Message::new().tensor("x", tensor.clone()))
                        .expect("send");
                    let got = sub.recv_timeout(WAIT).expect("recv");
                    black_box(got.message.payload_bytes());
                }
                let took = start.elapsed();
                record(&row, took.as_secs_f64() / iters as f64);
                took
            })
        });
    }
    g.finish();
}

fn small(c: &mut Criterion, pki: &Pki) {
    let tensor = pattern::tensor(DType::U8, &[4096], 1, 0, "x").expect("tensor");
    let mut g = c.benchmark_group("tls/pubsub-4KiB");
    g.throughput(Throughput::Elements(BATCH as u64));
    for how in [PLAIN, TLS] {
        let (_rx, _tx, publisher, sub) = pair(pki, how);
        // The sender publishes a batch when told; the timing thread receives it.
        let (go, batches) = mpsc::channel::<()>();
        let tensor = tensor.clone();
        let sender = std::thread::spawn(move || {
            for () in batches {
                for _ in 0..BATCH {
                    publisher
                        .send(Message::new().tensor("x", tensor.clone()))
                        .expect("send");
                }
            }
        });
        let row = format!("4KiB/{}", how.name);
        g.bench_function(format!("{}: {BATCH} messages", how.name), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    go.send(()).expect("the sender runs");
                    for _ in 0..BATCH {
                        black_box(sub.recv_timeout(WAIT).expect("recv").seq);
                    }
                }
                let took = start.elapsed();
                record(&row, took.as_secs_f64() / iters as f64);
                took
            })
        });
        drop(go);
        sender.join().expect("the sender ends");
    }
    g.finish();
}

fn open(c: &mut Criterion, pki: &Pki) {
    let mut g = c.benchmark_group("tls/open");
    // One connection per sample: the median is the median connection.
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(CONNECTIONS);
    // Short enough that each sample is one connection (criterion says it
    // could not finish in time, and runs one per sample).
    g.warm_up_time(Duration::from_millis(200));
    g.measurement_time(Duration::from_millis(50));
    for how in [PLAIN, SECRET, TLS, TLS_SECRET] {
        let (_rx, addr) = listener(pki, how);
        let row = format!("open/{}", how.name);
        g.bench_function(format!("{}: connect + first round trip", how.name), |b| {
            b.iter_custom(|iters| {
                let mut took = Duration::ZERO;
                for _ in 0..iters {
                    let node = dialer(pki, how);
                    let start = Instant::now();
                    let reply = node
                        .request(&addr, "/echo", Message::new().field("n", 1), WAIT)
                        .expect("reply");
                    let one = start.elapsed();
                    black_box(reply);
                    record(&row, one.as_secs_f64());
                    took += one;
                    drop(node);
                }
                took
            })
        });
    }
    g.finish();
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Each row's median and the TLS/plain ratios, from this run.
fn summary() {
    let record = RECORD.lock().unwrap_or_else(|p| p.into_inner());
    // The measured samples: criterion's warm-up came before them.
    let med = |row: &str| {
        let n = if row.starts_with("open/") {
            CONNECTIONS
        } else {
            SAMPLES
        };
        record
            .get(row)
            .map(|v| &v[v.len().saturating_sub(n)..])
            .map(|v| (median(v), v.len()))
    };
    println!("\nsummary (medians of this run; samples in brackets)");
    if let (Some((plain, n1)), Some((tls, n2))) = (med("64MiB/tcp"), med("64MiB/tls")) {
        let gbps = |s: f64| (64 * MIB) as f64 / s / 1e9;
        println!(
            "  f32 64 MiB publish -> subscriber: tcp {:.2} GB/s [{n1}], tls {:.2} GB/s [{n2}], tls/tcp {:.2}",
            gbps(plain),
            gbps(tls),
            plain / tls
        );
    }
    if let (Some((plain, n1)), Some((tls, n2))) = (med("4KiB/tcp"), med("4KiB/tls")) {
        let rate = |s: f64| BATCH as f64 / s;
        println!(
            "  4 KiB pub/sub, pipelined: tcp {:.0} msg/s [{n1}], tls {:.0} msg/s [{n2}], tls/tcp {:.2}",
            rate(plain),
            rate(tls),
            plain / tls
        );
    }
    if let Some((plain, _)) = med("open/tcp") {
        for how in [PLAIN, SECRET, TLS, TLS_SECRET] {
            if let Some((s, n)) = med(&format!("open/{}", how.name)) {
                println!(
                    "  connect + first round trip, {:<10}: {:>8.1} µs median [{n} connections], {:.1}x plain tcp",
                    how.name,
                    s * 1e6,
                    s / plain
                );
            }
        }
    }
}

fn main() {
    let pki = Pki::new();
    let mut c = Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    large(&mut c, &pki);
    small(&mut c, &pki);
    open(&mut c, &pki);
    c.final_summary();
    summary();
}
