//! A node with a thousand idle connections and a thousand subscriptions
//! runs on its I/O threads alone, within an open-files limit of 4,096, and
//! serves a well-behaved peer meanwhile.
//!
//! One test in its own binary: it counts the threads of this process.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use tensorferry_engine::wire::{encode, EncodeOptions, FrameMeta, Kind};
use tensorferry_engine::{pattern, DType, Message, Node};

const WAIT: Duration = Duration::from_secs(30);
const IDLE: usize = 1000;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// The frame a peer sends to subscribe to `channel`.
fn subscribe_frame(channel: &str) -> Vec<u8> {
    let meta = FrameMeta {
        channel: channel.to_string(),
        seq: 0,
        kind: Kind::Subscribe,
        id: None,
    };
    let mut out = Vec::new();
    encode(&Message::new(), &meta, EncodeOptions::default())
        .expect("encode")
        .write_to(&mut out)
        .expect("write");
    out
}

#[test]
fn a_thousand_idle_peers_cost_no_thread_and_one_descriptor_each() {
    // The limit an operator meets on many machines.
    let limit = libc::rlimit {
        rlim_cur: 4096,
        rlim_max: 4096,
    };
    // SAFETY: setrlimit reads the struct it is given; lowering our own
    // limit needs no privilege.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(set, 0, "setrlimit: {}", std::io::Error::last_os_error());

    let before_nodes = threads();
    let server = Node::builder()
        .name("server")
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("server");
    let addr = server.listen_addrs()[0].to_string();
    let client = Node::builder().name("client").build().expect("client");
    let live = client.subscribe(&addr, "/data").expect("subscribe");
    let publisher = server.publisher("/data");
    publisher.wait_for_subscribers(1, WAIT).expect("the client");
    let with_nodes = threads();
    assert_eq!(
        with_nodes - before_nodes,
        2,
        "one I/O thread per node, nothing else"
    );

    let files_before = open_files();
    let host = addr.trim_start_matches("tcp://").to_string();
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut s = TcpStream::connect(&host).expect("an idle connection");
        s.write_all(&subscribe_frame(&format!("/idle/{i}")))
            .expect("subscribe");
        idle.push(s);
    }
    // Every idle peer's subscription is in: the server counts them.
    for i in [0, IDLE / 2, IDLE - 1] {
        server
            .publisher(format!("/idle/{i}"))
            .wait_for_subscribers(1, WAIT)
            .expect("an idle peer's subscription");
    }
    assert_eq!(server.peer_count(), IDLE + 1);

    // The well-behaved peer is served meanwhile, every byte intact.
    for seq in 0..50u64 {
        let t = pattern::tensor(DType::F32, &[256, 1024], 3, seq, "x").expect("tensor");
        publisher.send(Message::new().tensor("x", t)).expect("send");
    }
    for seq in 0..50u64 {
        let got = live.recv_timeout(WAIT).expect("message");
        assert_eq!(got.seq, seq);
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::F32, 3, seq, "x", bytes.as_slice()),
            None
        );
    }

    let after = threads();
    assert_eq!(after, with_nodes, "threads grew with peers or channels");
    // The idle peers' sockets here and the server's side of each: two
    // descriptors per connection, and nothing more.
    let files = open_files() - files_before;
    assert!(
        files <= 2 * IDLE + 8,
        "{files} descriptors for {IDLE} connections"
    );
    println!(
        "{IDLE} idle peers: {after} threads in this process ({} before the nodes), {files} more descriptors",
        before_nodes
    );

    // More I/O threads, when asked for, and no more than that.
    let before = threads();
    let wide = Node::builder().io_threads(3).build().expect("node");
    assert_eq!(threads() - before, 3);
    drop(wide);
}
