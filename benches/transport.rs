//! One f32 tensor of 1 MiB and of 64 MiB moved from a publisher to a
//! subscriber over each transport (inproc, shm, tcp): one message per
//! iteration, timed from `send` until the subscriber holds it.
//!
//! Both nodes live in this process (the receiving node listens, the
//! publishing node connects to it, as in `tensorferry bench`); shm and tcp
//! still cross a real Unix or TCP socket and a reader thread. Baselines in the
//! same group: one memcpy of the same bytes for inproc and shm, and for tcp one
//! write of the same bytes over a connected loopback `TcpStream` pair, read
//! into one reused buffer by a thread that then signals the timing thread.

// criterion_group! and criterion_main! generate undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use tensorferry::engine::{pattern, DType, Message, Node, Publisher, Subscription};

const MIB: usize = 1 << 20;
const CHANNEL: &str = "/bench";

/// A receiving node listening on `addr`, and a publisher on a node connected to it.
/// The nodes are returned so they outlive the benchmark.
fn pair(addr: &str) -> (Node, Node, Publisher, Subscription) {
    let rx = Node::builder()
        .name("bench-rx")
        .listen(addr)
        .build()
        .expect("the receiving node listens");
    let sub = rx.subscriber(CHANNEL);
    let bound = rx.listen_addrs()[0].to_string();
    let tx = Node::builder()
        .name("bench-tx")
        .build()
        .expect("the sending node");
    tx.connect(&bound).expect("connect");
    let publisher = tx.publisher(CHANNEL);
    publisher
        .wait_for_subscribers(1, Duration::from_secs(10))
        .expect("the subscription reaches the publisher");
    (rx, tx, publisher, sub)
}

fn memcpy_baseline(g: &mut BenchmarkGroup<'_, WallTime>, bytes: usize) {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    g.bench_function("baseline: memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(dst.as_ptr());
        })
    });
}

/// One write of `bytes` over loopback TCP; a thread reads them into one reused
/// buffer and signals, as a node's reader thread hands a message to its subscriber.
fn raw_tcp_baseline(g: &mut BenchmarkGroup<'_, WallTime>, bytes: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    let mut out = TcpStream::connect(addr).expect("connect loopback");
    let (mut inbound, _) = listener.accept().expect("accept");
    let _ = out.set_nodelay(true);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; bytes];
        while inbound.read_exact(&mut buf).is_ok() {
            if done_tx.send(()).is_err() {
                break;
            }
        }
    });
    let payload = vec![7u8; bytes];
    g.bench_function("baseline: raw tcp stream", |b| {
        b.iter(|| {
            out.write_all(black_box(&payload)).expect("write");
            done_rx.recv().expect("the reader thread runs");
        })
    });
    drop(out);
    reader.join().expect("the reader thread ends");
}

fn transports(c: &mut Criterion) {
    let pid = std::process::id();
    for (label, bytes) in [("1MiB", MIB), ("64MiB", 64 * MIB)] {
        let tensor = pattern::tensor(DType::F32, &[bytes / 4], 1, 0, "x").expect("tensor");
        for transport in ["inproc", "shm", "tcp"] {
            let addr = match transport {
                "inproc" => format!("inproc://bench-transport-{pid}-{label}"),
                "shm" => format!("shm://tf-bench-transport-{pid}-{label}"),
                _ => "tcp://127.0.0.1:0".to_string(),
            };
            let mut g = c.benchmark_group(format!("transport/{transport}/f32-{label}"));
            g.throughput(Throughput::Bytes(bytes as u64));
            let (_rx, _tx, publisher, sub) = pair(&addr);
            g.bench_function("publish -> subscriber", |b| {
                b.iter(|| {
                    publisher
                        .send(Message::new().tensor("x", tensor.clone()))
                        .expect("send");
                    let got = sub.recv_timeout(Duration::from_secs(30)).expect("recv");
                    black_box(got.message.payload_bytes())
                })
            });
            if transport == "tcp" {
                raw_tcp_baseline(&mut g, bytes);
            } else {
                memcpy_baseline(&mut g, bytes);
            }
            g.finish();
        }
    }
}

criterion_group! {
    name = transport;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = transports
}
criterion_main!(transport);
