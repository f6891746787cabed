//! Nodes in one process: publish/subscribe and request/reply over inproc and TCP,
//! queue policies, lost peers and hostile peers.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensorferry_device_map::{ChannelConfig, ChannelSpec, Overflow};
use tensorferry_engine::{
    pattern, DType, Error, Message, Node, Schema, Service, ServiceError, Subscription, Tensor,
};

const WAIT: Duration = Duration::from_secs(10);

/// Held by the tests that open shared-memory slots: one of them counts the
/// slot descriptors this process holds, which the others would change.
static SHM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn shm_lock() -> std::sync::MutexGuard<'static, ()> {
    SHM.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tensor(seq: u64) -> Tensor {
    pattern::tensor(DType::F32, &[64, 33], 5, seq, "x").expect("tensor")
}

fn tcp_pair() -> (Node, Node, String) {
    let server = Node::builder()
        .name("server")
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("server");
    let addr = server.listen_addrs()[0].to_string();
    let client = Node::builder().name("client").build().expect("client");
    (server, client, addr)
}

#[test]
fn tcp_fan_out_keeps_order_and_every_byte() {
    let (server, client, addr) = tcp_pair();
    let other = Node::builder().name("other").build().expect("node");
    let subs = [
        client.subscribe(&addr, "/cam").expect("sub"),
        other.subscribe(&addr, "/cam").expect("sub"),
    ];
    let publisher = server.publisher("/cam");
    publisher
        .wait_for_subscribers(2, WAIT)
        .expect("two subscribers");
    for seq in 0..20 {
        publisher
            .send(Message::new().field("i", seq).tensor("x", tensor(seq)))
            .expect("send");
    }
    for sub in &subs {
        for seq in 0..20u64 {
            let got = sub.recv_timeout(WAIT).expect("message");
            assert_eq!(got.seq, seq, "per-publisher order");
            assert_eq!(got.message.get_field("i"), Some(&serde_json::json!(seq)));
            let bytes = got.message.get("x").expect("x").packed().expect("host");
            assert_eq!(
                pattern::first_mismatch(DType::F32, 5, seq, "x", bytes.as_slice()),
                None
            );
            assert!(got.from.starts_with("tcp://"));
        }
    }
}

#[test]
fn publishers_racing_the_io_thread_for_one_tcp_connection_lose_nothing() {
    // Four publishers share one connection whose socket keeps filling
    // (frames just over the batching size, each written on its own):
    // each publisher and the I/O thread take turns writing, and one that
    // found the socket full must never be left without the I/O thread
    // watching for room, or the rest of its messages would wait forever.
    let (server, client, addr) = tcp_pair();
    let channels = ["/r0", "/r1", "/r2", "/r3"];
    let subs: Vec<_> = channels
        .iter()
        .map(|c| client.subscribe(&addr, *c).expect("sub"))
        .collect();
    let count = 600u64;
    let publishers: Vec<_> = channels
        .iter()
        .map(|c| {
            let p = server.publisher(*c);
            p.wait_for_subscribers(1, WAIT).expect("subscribed");
            std::thread::spawn(move || {
                let t = pattern::tensor(DType::U8, &[(64 << 10) + 64], 9, 0, "x").expect("tensor");
                for seq in 0..count {
                    p.send(Message::new().field("seq", seq).tensor("x", t.clone()))
                        .expect("send");
                }
            })
        })
        .collect();
    // One reader per subscription: a full queue stalls the whole connection.
    let readers: Vec<_> = subs
        .into_iter()
        .map(|sub| {
            std::thread::spawn(move || {
                for seq in 0..count {
                    let got = sub
                        .recv_timeout(WAIT)
                        .unwrap_or_else(|e| panic!("{} message {seq}: {e}", sub.channel()));
                    assert_eq!(got.message.get_field("seq"), Some(&serde_json::json!(seq)));
                }
            })
        })
        .collect();
    for t in publishers.into_iter().chain(readers) {
        t.join().expect("publisher or reader");
    }
}

#[test]
fn inproc_moves_messages_by_reference() {
    let server = Node::builder()
        .listen("inproc://by-ref")
        .build()
        .expect("server");
    let client = Node::builder().build().expect("client");
    let sub = client.subscribe("inproc://by-ref", "/t").expect("sub");
    let publisher = server.publisher("/t");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    let t = tensor(0);
    let ptr = t.contiguous_bytes().expect("host").as_ptr();
    publisher.send(Message::new().tensor("x", t)).expect("send");
    let got = sub.recv_timeout(WAIT).expect("message");
    assert_eq!(
        got.message
            .get("x")
            .expect("x")
            .contiguous_bytes()
            .expect("host")
            .as_ptr(),
        ptr
    );
    assert!(
        Node::builder().listen("inproc://by-ref").build().is_err(),
        "a name is taken once"
    );
}

#[test]
fn a_local_subscriber_gets_local_publications() {
    let node = Node::builder().build().expect("node");
    let all = node.subscriber("*");
    node.publisher("/a")
        .send(Message::new().field("k", 1))
        .expect("send");
    assert_eq!(all.recv_timeout(WAIT).expect("message").channel, "/a");
    assert!(matches!(all.try_recv(), Ok(None)));
}

fn config(depth: usize, overflow: Overflow) -> ChannelConfig {
    let mut c = ChannelConfig::new();
    c.insert("/q", ChannelSpec::default().with_queue(depth, overflow))
        .expect("valid");
    c
}

#[test]
fn drop_oldest_keeps_the_newest_and_counts_drops() {
    let node = Node::builder()
        .channels(config(4, Overflow::DropOldest))
        .build()
        .expect("node");
    let sub = node.subscriber("/q");
    let publisher = node.publisher("/q");
    for i in 0..10 {
        publisher
            .send(Message::new().field("i", i))
            .expect("never blocks");
    }
    assert_eq!(sub.dropped(), 6);
    let kept: Vec<u64> = std::iter::from_fn(|| sub.try_recv().expect("ok"))
        .map(|r| r.seq)
        .collect();
    assert_eq!(kept, [6, 7, 8, 9]);
}

#[test]
fn block_makes_the_publisher_wait_for_a_slow_subscriber() {
    let node = Node::builder()
        .channels(config(2, Overflow::Block))
        .build()
        .expect("node");
    let sub = node.subscriber("/q");
    let publisher = node.publisher("/q");
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    let writer = std::thread::spawn(move || {
        for i in 0..5 {
            publisher.send(Message::new().field("i", i)).expect("send");
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sent.load(Ordering::SeqCst),
        2,
        "the third send waits for room"
    );
    for seq in 0..5 {
        assert_eq!(sub.recv_timeout(WAIT).expect("message").seq, seq);
    }
    writer.join().expect("publisher finishes");
    assert_eq!(sub.dropped(), 0);
}

fn detect_service(fini: Arc<AtomicUsize>) -> Service {
    struct Detect {
        calls: usize,
        fini: Arc<AtomicUsize>,
    }
    impl tensorferry_engine::Handler for Detect {
        fn exec(&mut self, request: Message) -> Result<Message, ServiceError> {
            self.calls += 1;
            if request.get_field("fail").is_some() {
                return Err(ServiceError::new("no_luck", "asked to fail"));
            }
            let image = request.get("image").expect("the schema guarantees it");
            Ok(Message::new()
                .field("calls", self.calls)
                .field("rows", image.shape()[0]))
        }
        fn fini(&mut self) {
            self.fini.fetch_add(1, Ordering::SeqCst);
        }
    }
    Service::new(Detect { calls: 0, fini })
        .input(
            Schema::new()
                .tensor("image", DType::U8, "*,4")
                .expect("pattern"),
        )
        .output(Schema::new().field("rows"))
}

#[test]
fn services_check_schemas_report_errors_and_run_fini() {
    for (transport, inline) in [
        ("tcp://127.0.0.1:0", false),
        ("inproc://detect-svc", false),
        ("tcp://127.0.0.1:0", true),
        ("inproc://detect-svc-inline", true),
    ] {
        let fini = Arc::new(AtomicUsize::new(0));
        let server = Node::builder().listen(transport).build().expect("server");
        server
            .serve("/detect", detect_service(Arc::clone(&fini)).inline(inline))
            .expect("serve");
        let addr = server.listen_addrs()[0].to_string();
        // Busy polling changes how the requester waits, never what it gets.
        let client = Node::builder()
            .busy_poll(Duration::from_micros(if inline { 300 } else { 0 }))
            .build()
            .expect("client");
        let image = Tensor::zeros(DType::U8, &[3, 4]).expect("t");

        let reply = client
            .request(
                &addr,
                "/detect",
                Message::new().tensor("image", image.clone()),
                WAIT,
            )
            .expect("reply");
        assert_eq!(reply.get_field("rows"), Some(&serde_json::json!(3)));
        assert_eq!(reply.get_field("calls"), Some(&serde_json::json!(1)));

        let bad = Message::new().tensor("image", Tensor::zeros(DType::U8, &[3, 5]).expect("t"));
        match client.request(&addr, "/detect", bad, WAIT) {
            Err(Error::Remote { code, message, .. }) => {
                assert_eq!(code, "bad_request");
                assert!(message.contains("[*, 4]"), "{message}");
            }
            other => panic!("{transport}: {other:?}"),
        }
        let failing = Message::new()
            .field("fail", true)
            .tensor("image", image.clone());
        assert!(
            matches!(client.request(&addr, "/detect", failing, WAIT), Err(Error::Remote { code, .. }) if code == "no_luck")
        );
        assert!(
            matches!(client.request(&addr, "/nothing", Message::new(), WAIT), Err(Error::Remote { code, .. }) if code == "no_service")
        );
        let reply = client
            .request(
                &addr,
                "/detect",
                Message::new().tensor("image", image),
                WAIT,
            )
            .expect("reply");
        assert_eq!(
            reply.get_field("calls"),
            Some(&serde_json::json!(3)),
            "bad requests never reached the handler"
        );
        server.shutdown();
        let deadline = Instant::now() + WAIT;
        while fini.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            fini.load(Ordering::SeqCst),
            1,
            "{transport}: fini runs at shutdown"
        );
    }
}

#[test]
fn a_request_without_reply_times_out() {
    let (server, client, addr) = tcp_pair();
    server
        .serve(
            "/slow",
            Service::new(|m: Message| {
                std::thread::sleep(Duration::from_millis(500));
                Ok(m)
            }),
        )
        .expect("serve");
    let start = Instant::now();
    let err = client
        .request(&addr, "/slow", Message::new(), Duration::from_millis(100))
        .expect_err("timeout");
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_millis(450));
}

#[test]
fn a_lost_connection_is_reported_to_its_subscription_only() {
    let (server, client, addr) = tcp_pair();
    let sub = client.subscribe(&addr, "/cam").expect("sub");
    let local = client.subscriber("/local");
    server
        .publisher("/cam")
        .wait_for_subscribers(1, WAIT)
        .expect("subscribed");
    server.shutdown();
    match sub.recv_timeout(WAIT) {
        Err(Error::PeerLost { peer, .. }) => assert_eq!(peer, addr),
        other => panic!("{other:?}"),
    }
    client
        .publisher("/local")
        .send(Message::new())
        .expect("the node carries on");
    assert!(local.recv_timeout(WAIT).is_ok());
    assert!(client
        .request(&addr, "/x", Message::new(), Duration::from_millis(200))
        .is_err());
}

#[test]
fn garbage_from_one_peer_closes_it_and_others_carry_on() {
    let (server, client, addr) = tcp_pair();
    let sub = server.subscriber("/cam");
    let host = addr.trim_start_matches("tcp://");
    let mut raw = std::net::TcpStream::connect(host).expect("raw connect");
    raw.write_all(&[0xAB; 4096]).expect("write garbage");
    let mut half = std::net::TcpStream::connect(host).expect("raw connect");
    let frame = tensorferry_engine::wire::encode(
        &Message::new().tensor("x", tensor(0)),
        &tensorferry_engine::wire::FrameMeta::message("/cam", 0),
        Default::default(),
    )
    .expect("encode");
    half.write_all(&frame.head()[..40]).expect("half a frame");
    drop(half);
    let publisher = client.publisher("/cam");
    client.connect(&addr).expect("connect");
    publisher.wait_for_subscribers(1, WAIT).expect("subscribed");
    publisher
        .send(Message::new().tensor("x", tensor(7)))
        .expect("send");
    let got = sub
        .recv_timeout(WAIT)
        .expect("the good peer's message arrives");
    assert_eq!(got.seq, 0);
    // The server greeted the raw peer (its subscriptions), then closed it: EOF, not a timeout.
    let mut rest = Vec::new();
    raw.set_read_timeout(Some(WAIT)).expect("timeout");
    assert!(
        std::io::Read::read_to_end(&mut raw, &mut rest).is_ok(),
        "the garbage peer was closed"
    );
}

#[test]
fn shm_fan_out_delivers_every_byte_and_reuses_slots() {
    let _shm = shm_lock();
    let name = format!("tf-test-{}", std::process::id());
    let server = Node::builder()
        .listen(format!("shm://{name}"))
        .build()
        .expect("server");
    let addr = server.listen_addrs()[0].to_string();
    let a = Node::builder().build().expect("a");
    let b = Node::builder().build().expect("b");
    let subs = [
        a.subscribe(&addr, "/cam").expect("sub"),
        b.subscribe(&addr, "/cam").expect("sub"),
    ];
    let publisher = server.publisher("/cam");
    publisher
        .wait_for_subscribers(2, WAIT)
        .expect("two subscribers");
    for seq in 0..30 {
        publisher
            .send(Message::new().field("i", seq).tensor("x", tensor(seq)))
            .expect("send");
        for sub in &subs {
            let got = sub.recv_timeout(WAIT).expect("message");
            assert_eq!(got.seq, seq);
            let bytes = got.message.get("x").expect("x").packed().expect("host");
            assert_eq!(
                pattern::first_mismatch(DType::F32, 5, seq, "x", bytes.as_slice()),
                None
            );
        }
    }
    // Every message was released as soon as it was dropped, so a few slots
    // served all 30 (releases travel back asynchronously: under load a send
    // may come before the last release, and take one more slot); without
    // reuse there would be one per message, 30 or more.
    let slots = std::fs::read_dir("/proc/self/fd")
        .expect("fd table")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.to_string_lossy().contains("tensorferry-slot"))
        .count();
    assert!(
        slots <= 15,
        "{slots} slot descriptors open: slots are not being reused"
    );
}

/// A node listening on a fresh `shm://` name (tagged `tag`) that serves
/// `service` on `channel`; and the address.
fn shm_server(tag: &str, channel: &str, service: Service) -> (Node, String) {
    let addr = format!("shm://tf-svc-{tag}-{}", std::process::id());
    let server = Node::builder()
        .listen(addr.clone())
        .build()
        .expect("server");
    server.serve(channel, service).expect("serve");
    (server, addr)
}

#[test]
fn shm_requests_and_replies_work_like_tcp() {
    let _shm = shm_lock();
    let (_server, addr) = shm_server(
        "echo",
        "/echo",
        Service::new(|m: Message| Ok(m.field("seen", true))),
    );
    let client = Node::builder().build().expect("client");
    let reply = client
        .request(&addr, "/echo", Message::new().tensor("x", tensor(1)), WAIT)
        .expect("reply");
    assert_eq!(reply.get_field("seen"), Some(&serde_json::json!(true)));
    assert_eq!(
        reply.get("x").map(|t| t.shape().to_vec()),
        Some(vec![64, 33])
    );
}

#[test]
fn shm_requests_larger_than_the_pipe_stream_through_it_from_several_threads() {
    let _shm = shm_lock();
    // Replies twice the request's size: both directions overflow the 1 MiB ring.
    let (_server, addr) = shm_server(
        "big",
        "/double",
        Service::new(|m: Message| {
            let x = m
                .get("x")
                .expect("x")
                .as_slice::<u32>()
                .expect("u32")
                .to_vec();
            let twice: Vec<u32> = x.iter().chain(x.iter()).map(|v| v ^ 0xA5A5_A5A5).collect();
            let n = twice.len();
            Ok(Message::new().tensor("y", Tensor::from_slice(&twice, &[n]).expect("t")))
        }),
    );
    let client = Arc::new(Node::builder().build().expect("client"));
    let workers: Vec<_> = (0..3u32)
        .map(|w| {
            let client = Arc::clone(&client);
            let addr = addr.clone();
            std::thread::spawn(move || {
                for round in 0..3u32 {
                    // 3 MiB of u32s plus an odd tail, different in every request.
                    let n = (3 << 18) + 7 * (w as usize) + round as usize;
                    let x: Vec<u32> = (0..n as u32)
                        .map(|i| i.wrapping_mul(2_654_435_761) ^ (w << 24) ^ round)
                        .collect();
                    let m = Message::new().tensor("x", Tensor::from_slice(&x, &[n]).expect("t"));
                    let reply = client.request(&addr, "/double", m, WAIT).expect("reply");
                    let y = reply
                        .get("y")
                        .expect("y")
                        .as_slice::<u32>()
                        .expect("u32")
                        .to_vec();
                    assert_eq!(y.len(), 2 * n);
                    for (i, v) in y.iter().enumerate() {
                        assert_eq!(
                            *v,
                            x[i % n] ^ 0xA5A5_A5A5,
                            "worker {w} round {round} element {i}"
                        );
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
}

#[test]
fn a_shm_peer_that_skips_the_handshake_is_dropped_and_others_are_served() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixStream};
    let _shm = shm_lock();
    let (_server, shm_addr) = shm_server("rude", "/echo", Service::new(Ok));
    let name = shm_addr.trim_start_matches("shm://");
    // Frame bytes where the pipe's descriptor should be, then silence.
    let addr =
        SocketAddr::from_abstract_name(format!("tensorferry/{name}").as_bytes()).expect("address");
    let mut rude = UnixStream::connect_addr(&addr).expect("connect");
    rude.write_all(b"TFRM garbage, no descriptor")
        .expect("write");
    let mut quiet = UnixStream::connect_addr(&addr).expect("connect");
    quiet.write_all(b"P").expect("write");
    // And one that says nothing at all: its handshake times out on its own thread.
    let silent = UnixStream::connect_addr(&addr).expect("connect");
    let client = Node::builder().build().expect("client");
    let started = Instant::now();
    let reply = client
        .request(
            &shm_addr,
            "/echo",
            Message::new().tensor("x", tensor(2)),
            Duration::from_secs(20),
        )
        .expect("a well-behaved peer is served");
    assert!(reply.get("x").is_some());
    // Nobody waited for the silent peer's handshake (5 s).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "served after {:?}",
        started.elapsed()
    );
    drop((rude, quiet, silent));
}

/// True when `addr` lies in a mapping of a tensorferry shared slot.
fn in_shared_slot(addr: usize) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .any(|l| {
            let Some((range, rest)) = l.split_once(' ') else {
                return false;
            };
            let Some((lo, hi)) = range.split_once('-') else {
                return false;
            };
            let (lo, hi) = (
                usize::from_str_radix(lo, 16).unwrap_or(0),
                usize::from_str_radix(hi, 16).unwrap_or(0),
            );
            rest.contains("tensorferry-slot") && (lo..hi).contains(&addr)
        })
}

#[test]
fn a_loan_is_filled_in_place_and_reaches_shm_and_local_subscribers() {
    let _shm = shm_lock();
    let name = format!("tf-loan-{}", std::process::id());
    let server = Node::builder()
        .listen(format!("shm://{name}"))
        .build()
        .expect("server");
    let client = Node::builder().build().expect("client");
    let remote = client
        .subscribe(&format!("shm://{name}"), "/img")
        .expect("sub");
    let local = server.subscriber("/img");
    let publisher = server.publisher("/img");
    publisher
        .wait_for_subscribers(2, WAIT)
        .expect("subscribers");
    for round in 0..3u8 {
        let mut loan = publisher
            .loan(
                &Message::new().field("round", round),
                &[
                    ("image", DType::U8, &[480, 640, 3]),
                    ("k", DType::F32, &[3]),
                ],
            )
            .expect("loan");
        loan.fill("image", |b| {
            b.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (i as u8) ^ round)
        })
        .expect("fill");
        loan.fill("k", |b| {
            b.copy_from_slice(bytemuck::cast_slice(&[1.5f32, 2.5, round as f32]))
        })
        .expect("fill");
        assert!(loan.fill("nope", |_| ()).is_err());
        loan.send().expect("send");
        for sub in [&remote, &local] {
            let got = sub.recv_timeout(WAIT).expect("message");
            assert_eq!(
                got.message.get_field("round"),
                Some(&serde_json::json!(round))
            );
            let image = got.message.get("image").expect("image");
            let bytes = image.as_slice::<u8>().expect("u8");
            assert!(bytes
                .iter()
                .enumerate()
                .all(|(i, &x)| x == (i as u8) ^ round));
            assert_eq!(
                got.message
                    .get("k")
                    .expect("k")
                    .as_slice::<f32>()
                    .expect("f32"),
                &[1.5, 2.5, round as f32]
            );
            if std::ptr::eq(sub, &remote) {
                assert!(
                    in_shared_slot(bytes.as_ptr() as usize),
                    "shm tensors view the shared slot"
                );
            }
        }
    }
}

#[test]
fn small_messages_cross_shm_through_the_ring_and_large_ones_in_a_shared_slot() {
    // A message of a few KiB is copied through the connection's ring (no
    // slot to take, map and release); one of 256 KiB is written once into
    // a shared slot that the subscriber's tensor views.
    let _shm = shm_lock();
    let (server, _client, subs, _) = shm_subscribed("inline", &["/mixed"]);
    let (sub, publisher) = (&subs[0], server.publisher("/mixed"));
    for (seq, elems) in [(0u64, 1021usize), (1, 64 << 10), (2, 3), (3, 64 << 10)] {
        let t = pattern::tensor(DType::F32, &[elems], 7, seq, "x").expect("tensor");
        publisher
            .send(Message::new().field("seq", seq).tensor("x", t.clone()))
            .expect("send");
        let got = sub.recv_timeout(WAIT).expect("message");
        assert_eq!(got.message.get_field("seq"), Some(&serde_json::json!(seq)));
        let x = got.message.get("x").expect("x");
        let bytes = x.contiguous_bytes().expect("host bytes");
        assert_eq!(
            bytes,
            t.contiguous_bytes().expect("host bytes"),
            "message {seq}: bytes differ"
        );
        let ptr = bytes.as_ptr() as usize;
        let large = elems * 4 > 64 << 10;
        assert_eq!(
            in_shared_slot(ptr),
            large,
            "message {seq} of {} bytes: in a shared slot = {}",
            elems * 4,
            !large
        );
    }
}

/// A shm server node and a client subscribed to `channels` through it.
fn shm_subscribed(tag: &str, channels: &[&str]) -> (Node, Node, Vec<Subscription>, String) {
    let name = format!("tf-{tag}-{}", std::process::id());
    let addr = format!("shm://{name}");
    let server = Node::builder().listen(&addr).build().expect("server");
    let client = Node::builder().build().expect("client");
    let subs = channels
        .iter()
        .map(|c| client.subscribe(&addr, *c).expect("sub"))
        .collect();
    for c in channels {
        server
            .publisher(*c)
            .wait_for_subscribers(1, WAIT)
            .expect("subscribed");
    }
    (server, client, subs, addr)
}

#[test]
fn a_shm_subscriber_reading_its_connection_still_gets_what_comes_from_elsewhere() {
    // A subscriber with nothing queued reads its shm connection itself and
    // sleeps on the ring; a message from this node's own publisher, the
    // node closing, or the peer's loss each end that sleep at once, not at
    // the deadline.
    let _shm = shm_lock();
    let (_server, client, subs, _) = shm_subscribed("lead-local", &["/a"]);
    let local = client.publisher("/a");
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        local
            .send(Message::new().field("from", "here"))
            .expect("send");
        local
    });
    let started = Instant::now();
    let got = subs[0].recv_timeout(WAIT).expect("the local message");
    assert_eq!(&*got.from, "local");
    assert!(
        started.elapsed() < WAIT / 2,
        "woken by the local message after {:?}",
        started.elapsed()
    );
    drop(sender.join().expect("sender"));

    let closer = std::thread::spawn({
        let client = client.clone();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            client.shutdown();
        }
    });
    let started = Instant::now();
    // Its subscription through the peer hears of the connection closing
    // with the node, then that the node closed.
    let r = subs[0].recv_timeout(WAIT);
    assert!(
        matches!(&r, Err(Error::PeerLost { reason, .. }) if reason.contains("shut down")),
        "{r:?}"
    );
    let r = subs[0].recv();
    assert!(matches!(r, Err(Error::Closed)), "{r:?}");
    assert!(started.elapsed() < WAIT / 2, "{:?}", started.elapsed());
    closer.join().expect("closer");

    let (server, _client, subs, addr) = shm_subscribed("lead-lost", &["/a"]);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        server.shutdown();
    });
    let started = Instant::now();
    match subs[0].recv_timeout(WAIT) {
        Err(Error::PeerLost { peer, .. }) => assert_eq!(peer, addr),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < WAIT / 2, "{:?}", started.elapsed());
    killer.join().expect("killer");
}

#[test]
fn shm_subscribers_of_one_connection_each_get_their_messages_in_order() {
    // Two subscriptions through one connection, each on its own thread:
    // whichever reads the connection hands the other's messages to its
    // queue, in order, with every byte; slots (large) and the ring (small)
    // alike.
    let _shm = shm_lock();
    let (server, _client, subs, _) = shm_subscribed("lead-two", &["/a", "/b"]);
    let count = 400u64;
    let receivers: Vec<_> = subs
        .into_iter()
        .map(|sub| {
            std::thread::spawn(move || {
                for seq in 0..count {
                    let got = sub.recv_timeout(WAIT).expect("message");
                    assert_eq!(got.seq, seq, "{}", sub.channel());
                    let x = got.message.get("x").expect("x");
                    let bytes = x.contiguous_bytes().expect("host");
                    assert_eq!(
                        pattern::first_mismatch(DType::U8, 3, seq, "x", bytes),
                        None,
                        "{} message {seq}",
                        sub.channel()
                    );
                }
            })
        })
        .collect();
    let (a, b) = (server.publisher("/a"), server.publisher("/b"));
    for seq in 0..count {
        let len = if seq % 50 == 7 {
            300 << 10
        } else {
            1000 + seq as usize
        };
        for p in [&a, &b] {
            let t = pattern::tensor(DType::U8, &[len], 3, seq, "x").expect("tensor");
            p.send(Message::new().tensor("x", t)).expect("send");
        }
    }
    for r in receivers {
        r.join().expect("receiver");
    }
}

#[test]
fn shm_slot_descriptors_reach_whichever_thread_reads_while_publishers_and_requests_race() {
    // Large messages travel in shared slots whose descriptors come on the
    // socket ahead of the frames that name them. Three publishers send at
    // once over one connection while a requester on the receiving side
    // leads the same connection for its replies and three subscribers read
    // it themselves in turn: whichever thread reads a slot frame must find
    // its descriptor (an error there drops the peer). Every byte is checked.
    let _shm = shm_lock();
    let channels = ["/s0", "/s1", "/s2"];
    let (server, client, subs, addr) = shm_subscribed("slots-race", &channels);
    server
        .serve("/echo", Service::new(Ok).inline(true))
        .expect("serve");
    let count = 120u64;
    let publishers: Vec<_> = channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = server.publisher(*c);
            std::thread::spawn(move || {
                for seq in 0..count {
                    let len = (80 << 10) + ((seq as usize * 7919 + i * 131) % (220 << 10));
                    let t = pattern::tensor(DType::U8, &[len], 11 + i as u64, seq, "x")
                        .expect("tensor");
                    p.send(Message::new().tensor("x", t)).expect("send");
                }
            })
        })
        .collect();
    let readers: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, sub)| {
            std::thread::spawn(move || {
                for seq in 0..count {
                    let got = sub
                        .recv_timeout(WAIT)
                        .unwrap_or_else(|e| panic!("{} message {seq}: {e}", sub.channel()));
                    let bytes = got.message.get("x").expect("x").packed().expect("host");
                    assert_eq!(
                        pattern::first_mismatch(
                            DType::U8,
                            11 + i as u64,
                            seq,
                            "x",
                            bytes.as_slice()
                        ),
                        None,
                        "{} message {seq}",
                        sub.channel()
                    );
                }
            })
        })
        .collect();
    let requester = std::thread::spawn(move || {
        for i in 0..200u64 {
            let reply = client
                .request(
                    &addr,
                    "/echo",
                    Message::new().field("i", i).tensor("y", tensor(i)),
                    WAIT,
                )
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(reply.get_field("i"), Some(&serde_json::json!(i)));
        }
    });
    for t in publishers.into_iter().chain(readers).chain([requester]) {
        t.join().expect("publisher, reader or requester");
    }
}

fn open_slots() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd table")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.to_string_lossy().contains("tensorferry-slot"))
        .count()
}

#[test]
fn shared_memory_is_capped_and_a_slow_subscriber_makes_the_publisher_wait() {
    let _shm = shm_lock();
    let name = format!("tf-cap-{}", std::process::id());
    let server = Node::builder()
        .listen(format!("shm://{name}"))
        .shm_bytes(3 << 20)
        .build()
        .expect("server");
    let client = Node::builder().build().expect("client");
    let sub = client
        .subscribe(&format!("shm://{name}"), "/big")
        .expect("sub");
    let publisher = server.publisher("/big");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    let before = open_slots();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    let writer = std::thread::spawn(move || {
        for seq in 0..10u64 {
            let t = pattern::tensor(DType::U8, &[900 << 10], 5, seq, "x").expect("tensor");
            publisher.send(Message::new().tensor("x", t)).expect("send");
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        sent.load(Ordering::SeqCst),
        3,
        "three 1 MiB slots fit in 3 MiB; the fourth send waits"
    );
    for seq in 0..10u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        assert_eq!(got.seq, seq);
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::U8, 5, seq, "x", bytes.as_slice()),
            None
        );
    }
    writer
        .join()
        .expect("the publisher finishes once slots are released");
    // The sender's three slots, plus the receiver's mappings of them.
    assert!(
        open_slots() - before <= 6,
        "{} slot descriptors",
        open_slots() - before
    );
}

#[test]
fn a_publisher_follows_subscribers_and_recordings_that_come_and_go_between_its_messages() {
    let name = format!("inproc://routes-{}", std::process::id());
    let node = Node::builder().listen(&name).build().expect("node");
    let other = Node::builder().build().expect("other");
    let publisher = node.publisher("/r");
    let send = |i: u64| {
        publisher
            .send(Message::new().field("i", i).tensor("x", tensor(i)))
            .expect("send");
    };
    let take = |sub: &Subscription| -> u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        got.message
            .get_field("i")
            .and_then(|v| v.as_u64())
            .expect("i")
    };
    send(0); // nobody yet
    let remote = other.subscribe(&name, "/r").expect("remote");
    publisher
        .wait_for_subscribers(1, WAIT)
        .expect("remote came");
    send(1);
    let local = node.subscriber("/r");
    send(2);
    let dir = tempfile_dir();
    let file = dir.join("r.tfrec");
    let recording = node
        .record(&format!("file://{}", file.display()), "/r")
        .expect("record");
    send(3);
    assert_eq!((take(&remote), take(&remote), take(&remote)), (1, 2, 3));
    drop(remote);
    let deadline = Instant::now() + WAIT;
    while publisher.subscribers() > 1 {
        assert!(
            Instant::now() < deadline,
            "the remote's unsubscribe never came"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    send(4);
    assert_eq!(
        recording.stop().expect("stop"),
        2,
        "messages 3 and 4 recorded"
    );
    send(5);
    for i in 2..=5 {
        assert_eq!(take(&local), i);
    }
    drop(local);
    send(6);
    let again = node.subscriber("/r");
    send(7);
    assert_eq!(take(&again), 7);
    assert!(again.try_recv().expect("open").is_none());
    let replay = Node::builder()
        .build()
        .expect("replay")
        .subscribe(&format!("file://{}", file.display()), "/r")
        .expect("replay");
    assert_eq!((take(&replay), take(&replay)), (3, 4));
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tf-routes-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
