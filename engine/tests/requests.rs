//! Request/reply on one connection shared by many requesters, pub/sub traffic,
//! late replies, lost and hostile peers: a requester reads its own reply
//! from the connection while it waits, and must dispatch every other frame as
//! the connection's reader thread would.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tensorferry_engine::{pattern, DType, Error, Message, Node, Service, Tensor};

const WAIT: Duration = Duration::from_secs(20);

fn tensor(seq: u64) -> Tensor {
    pattern::tensor(DType::U8, &[1024], 5, seq, "x").expect("tensor")
}

/// A server listening on `transport` (`tcp` or `shm`) and its address.
fn server(transport: &str, tag: &str) -> (Node, String) {
    let listen = match transport {
        "shm" => format!("shm://tf-req-{tag}-{}", std::process::id()),
        _ => "tcp://127.0.0.1:0".to_string(),
    };
    let node = Node::builder()
        .name("server")
        .listen(listen)
        .build()
        .expect("server");
    let addr = node.listen_addrs()[0].to_string();
    (node, addr)
}

/// Echoes the request, adding `seen: true`.
fn echo(inline: bool) -> Service {
    Service::new(|m: Message| Ok(m.field("seen", true))).inline(inline)
}

fn number(m: &Message, key: &str) -> Option<u64> {
    m.get_field(key).and_then(serde_json::Value::as_u64)
}

#[test]
fn many_requesters_on_one_connection_each_get_their_own_reply() {
    for transport in ["tcp", "shm"] {
        for inline in [true, false] {
            let (server, addr) = server(transport, &format!("many-{inline}"));
            server.serve("/echo", echo(inline)).expect("serve");
            let client = Node::builder().name("client").build().expect("client");
            client.connect(&addr).expect("connect");
            let threads: Vec<_> = (0..6u64)
                .map(|t| {
                    let client = client.clone();
                    let addr = addr.clone();
                    thread::spawn(move || {
                        for i in 0..150u64 {
                            let n = t * 1000 + i;
                            let reply = client
                                .request(
                                    &addr,
                                    "/echo",
                                    Message::new().field("n", n).tensor("x", tensor(n)),
                                    WAIT,
                                )
                                .expect("reply");
                            assert_eq!(number(&reply, "n"), Some(n), "a reply to someone else");
                            let x = reply.get("x").expect("x").as_slice::<u8>().expect("u8");
                            let want = tensor(n);
                            assert_eq!(x, want.as_slice::<u8>().expect("u8"));
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("requester");
            }
            assert_eq!(
                client.peer_count(),
                1,
                "{transport}: one connection throughout"
            );
        }
    }
}

#[test]
fn requests_interleave_with_pub_sub_on_one_connection() {
    for transport in ["tcp", "shm"] {
        let (server, addr) = server(transport, "pubsub");
        server.serve("/echo", echo(true)).expect("serve");
        let client = Node::builder().name("client").build().expect("client");
        let ticks = client.subscribe(&addr, "/tick").expect("subscribe");
        let up = server.subscriber("/up");
        let publisher = server.publisher("/tick");
        publisher.wait_for_subscribers(1, WAIT).expect("subscribed");
        let sent = 400u64;
        let feeder = thread::spawn(move || {
            for seq in 0..sent {
                publisher
                    .send(Message::new().field("tick", seq).tensor("x", tensor(seq)))
                    .expect("publish");
                if seq % 16 == 0 {
                    thread::sleep(Duration::from_micros(200));
                }
            }
            publisher.flush(WAIT).expect("flush");
        });
        let reader = thread::spawn(move || {
            for want in 0..sent {
                let got = ticks.recv_timeout(WAIT).expect("tick");
                assert_eq!(number(&got.message, "tick"), Some(want), "ticks in order");
            }
        });
        let client_up = client.publisher("/up");
        for n in 0..300u64 {
            let reply = client
                .request(&addr, "/echo", Message::new().field("n", n), WAIT)
                .expect("reply");
            assert_eq!(number(&reply, "n"), Some(n));
            if n % 10 == 0 {
                client_up
                    .send(Message::new().field("up", n))
                    .expect("publish up");
            }
        }
        feeder.join().expect("feeder");
        reader.join().expect("reader");
        client_up.flush(WAIT).expect("flush up");
        for want in (0..300u64).step_by(10) {
            let got = up.recv_timeout(WAIT).expect("up");
            assert_eq!(number(&got.message, "up"), Some(want));
        }
    }
}

#[test]
fn a_reply_after_the_timeout_is_dropped_and_the_next_request_gets_its_own() {
    for transport in ["tcp", "shm"] {
        for inline in [true, false] {
            let (server, addr) = server(transport, &format!("late-{inline}"));
            server
                .serve(
                    "/slow",
                    Service::new(|m: Message| {
                        if m.get_field("slow").is_some() {
                            thread::sleep(Duration::from_millis(300));
                        }
                        Ok(m)
                    })
                    .inline(inline),
                )
                .expect("serve");
            let client = Node::builder().name("client").build().expect("client");
            let start = Instant::now();
            let err = client
                .request(
                    &addr,
                    "/slow",
                    Message::new().field("n", 1).field("slow", true),
                    Duration::from_millis(100),
                )
                .expect_err("timeout");
            assert!(matches!(err, Error::Timeout { .. }), "{err}");
            assert!(
                start.elapsed() < Duration::from_millis(280),
                "the timeout holds"
            );
            // The late reply arrives while this request waits; it must not be taken for this one.
            let reply = client
                .request(&addr, "/slow", Message::new().field("n", 2), WAIT)
                .expect("reply");
            assert_eq!(number(&reply, "n"), Some(2));
            let reply = client
                .request(&addr, "/slow", Message::new().field("n", 3), WAIT)
                .expect("reply");
            assert_eq!(number(&reply, "n"), Some(3));
        }
    }
}

#[test]
fn a_lost_peer_fails_the_requests_waiting_on_it() {
    for transport in ["tcp", "shm"] {
        let (server, addr) = server(transport, "lost");
        let started = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&started);
        server
            .serve(
                "/stuck",
                Service::new(move |m: Message| {
                    s.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(1500));
                    Ok(m)
                }),
            )
            .expect("serve");
        let client = Node::builder().name("client").build().expect("client");
        client.connect(&addr).expect("connect");
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let client = client.clone();
                let addr = addr.clone();
                thread::spawn(move || {
                    let start = Instant::now();
                    let r = client.request(&addr, "/stuck", Message::new(), WAIT);
                    (r, start.elapsed())
                })
            })
            .collect();
        // All three requests must have reached the server (a request not yet
        // written when the peer goes is refused at connect instead).
        let deadline = Instant::now() + WAIT;
        while (started.load(Ordering::SeqCst) == 0
            || server.channel_stats("/stuck").messages_received < 3)
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(5));
        }
        server.shutdown();
        for w in waiting {
            let (r, took) = w.join().expect("requester");
            assert!(
                matches!(r, Err(Error::PeerLost { .. })),
                "{transport}: {r:?}"
            );
            assert!(
                took < Duration::from_secs(5),
                "{transport}: failed promptly"
            );
        }
    }
}

/// A fake server that answers the first request with `answer`, then waits.
fn fake_server(answer: Vec<u8>) -> (String, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("tcp://{}", listener.local_addr().expect("addr"));
    let handle = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 4096];
        // Whatever the client sends first (its request) is enough.
        let _ = s.read(&mut buf);
        let _ = s.write_all(&answer);
        thread::sleep(Duration::from_millis(600));
    });
    (addr, handle)
}

#[test]
fn garbage_instead_of_a_reply_fails_the_request() {
    let (addr, fake) = fake_server(vec![0xAB; 300]);
    let client = Node::builder().name("client").build().expect("client");
    let r = client.request(&addr, "/x", Message::new(), WAIT);
    // The error names the peer and what it did wrong.
    match &r {
        Err(Error::Misbehaved { peer, offence }) => {
            assert_eq!(peer, &addr);
            assert!(offence.contains("bad frame"), "{offence}");
        }
        other => panic!("{other:?}"),
    }
    fake.join().expect("fake server");
}

#[test]
fn half_a_reply_does_not_hold_a_requester_past_its_timeout() {
    // A valid prelude announcing a frame of 4 KiB, then nothing more.
    let prelude = common::announce(4096);
    let (addr, fake) = fake_server(prelude);
    let client = Node::builder().name("client").build().expect("client");
    let start = Instant::now();
    let r = client.request(&addr, "/x", Message::new(), Duration::from_millis(200));
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(start.elapsed() < Duration::from_millis(500));
    fake.join().expect("fake server");
}

#[test]
fn busy_polling_requesters_and_readers_share_one_connection() {
    for transport in ["tcp", "shm"] {
        let listen = match transport {
            "shm" => format!("shm://tf-req-spin-{}", std::process::id()),
            _ => "tcp://127.0.0.1:0".to_string(),
        };
        // Both ends spin: each reader keeps reading after a frame unless its
        // node waits for a reply on that connection, which its requester
        // then reads itself.
        let a = Node::builder()
            .name("a")
            .busy_poll(Duration::from_micros(300))
            .listen(listen)
            .build()
            .expect("a");
        let addr = a.listen_addrs()[0].to_string();
        let b = Node::builder()
            .name("b")
            .busy_poll(Duration::from_micros(300))
            .build()
            .expect("b");
        a.serve("/a", echo(true)).expect("serve a");
        let ticks = a.subscriber("/tick");
        b.connect(&addr).expect("connect");
        let b_ticks = b.publisher("/tick");
        b_ticks.wait_for_subscribers(1, WAIT).expect("subscriber");
        // Two requesters on b and a publisher, all on the one connection.
        let askers: Vec<_> = (0..2u64)
            .map(|t| {
                let b = b.clone();
                let addr = addr.clone();
                thread::spawn(move || {
                    for i in 0..200u64 {
                        let n = t * 1000 + i;
                        let reply = b
                            .request(
                                &addr,
                                "/a",
                                Message::new().field("i", n).tensor("x", tensor(n)),
                                WAIT,
                            )
                            .expect("reply from a");
                        assert_eq!(reply.get_field("i"), Some(&serde_json::json!(n)));
                        assert_eq!(reply.get_field("seen"), Some(&serde_json::json!(true)));
                    }
                })
            })
            .collect();
        for i in 0..50u64 {
            b_ticks
                .send(Message::new().field("tick", i))
                .expect("publish");
        }
        for asker in askers {
            asker.join().expect("asker");
        }
        for i in 0..50u64 {
            let got = ticks.recv_timeout(WAIT).expect("tick");
            assert_eq!(got.message.get_field("tick"), Some(&serde_json::json!(i)));
        }
    }
}

#[test]
fn a_request_larger_than_the_socket_buffers_is_written_while_its_requester_waits() {
    // The requester reads its reply itself: the rest of its request is
    // written by the I/O thread as the socket makes room.
    for transport in ["tcp", "shm"] {
        let (server, addr) = server(transport, "large");
        server.serve("/echo", echo(false)).expect("serve");
        let client = Node::builder().name("client").build().expect("client");
        for (seq, bytes) in [(0u64, 64usize << 20), (1, 10)] {
            let t = pattern::tensor(DType::U8, &[bytes], 9, seq, "x").expect("tensor");
            let reply = client
                .request(&addr, "/echo", Message::new().tensor("x", t), WAIT)
                .unwrap_or_else(|e| panic!("{transport}: {e}"));
            let got = reply
                .get("x")
                .expect("x")
                .contiguous_bytes()
                .expect("bytes");
            assert_eq!(got.len(), bytes);
            assert_eq!(
                pattern::first_mismatch(DType::U8, 9, seq, "x", got),
                None,
                "{transport}"
            );
        }
    }
}

#[test]
fn a_pending_request_is_waited_for_in_steps_and_answered_on_the_waiting_thread() {
    // The Python binding's blocking request: wait a little, look for
    // signals, wait again; the request stays pending in between.
    for transport in ["tcp", "shm"] {
        let (server, addr) = server(transport, "steps");
        server
            .serve(
                "/late",
                Service::new(|m: Message| {
                    thread::sleep(Duration::from_millis(300));
                    Ok(m)
                }),
            )
            .expect("serve");
        let client = Node::builder().name("client").build().expect("client");
        let mut pending = client
            .request_async(&addr, "/late", Message::new().field("n", 7))
            .expect("request");
        let mut steps = 0;
        let reply = loop {
            steps += 1;
            assert!(steps < 400, "{transport}: no reply after {steps} steps");
            if let Some(reply) = pending.wait_until(Instant::now() + Duration::from_millis(50)) {
                break reply.unwrap_or_else(|e| panic!("{transport}: {e}"));
            }
        };
        assert!(
            steps > 1,
            "{transport}: the first step should have timed out"
        );
        assert_eq!(number(&reply, "n"), Some(7), "{transport}");
    }
}

#[test]
fn large_replies_over_shm_keep_coming_one_after_another() {
    // Each 64 MiB reply passes a 1 MiB ring many times over, the writer
    // waiting for room each time. A wake-up reporting room could be taken
    // off the socket by the writer's own read just after it pumped; the
    // rest of that reply then never came (about one run in ten of this
    // test stalled before the fix).
    let name = format!("shm://tf-large-replies-{}", std::process::id());
    let server = Node::builder()
        .name("server")
        .listen(&name)
        .build()
        .expect("server");
    let reply = Tensor::from_slice(&vec![1.5f32; 16 << 20], &[16 << 20]).expect("tensor");
    server
        .serve(
            "/big",
            Service::new(move |_: Message| Ok(Message::new().tensor("x", reply.clone()))),
        )
        .expect("serve");
    let client = Node::builder().name("client").build().expect("client");
    for i in 0..40 {
        let m = client
            .request(&name, "/big", Message::new(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("reply {i}: {e}"));
        let x = m.get("x").expect("x").as_slice::<f32>().expect("f32");
        assert_eq!((x.len(), x[0], x[x.len() - 1]), (16 << 20, 1.5, 1.5));
    }
}

/// Resident memory of this process, in bytes.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

#[test]
fn a_peer_that_claims_a_huge_frame_after_its_request_holds_no_worker_and_costs_no_memory() {
    // A worker that answered a request reads that connection itself while
    // it waits for the next: what the peer then claims must not hold it,
    // nor make this process allocate what the claim says.
    let (server, addr) = server("tcp", "claim");
    server.serve("/echo", echo(false)).expect("serve");
    let host = addr.trim_start_matches("tcp://").to_string();
    let before = resident_bytes();
    let mut raws = Vec::new();
    for id in 0..8u64 {
        let mut raw = std::net::TcpStream::connect(&host).expect("raw connect");
        let request = tensorferry_engine::wire::encode(
            &Message::new().field("i", id),
            &tensorferry_engine::wire::FrameMeta {
                channel: "/echo".into(),
                seq: 0,
                kind: tensorferry_engine::wire::Kind::Request,
                id: Some(id + 1),
            },
            Default::default(),
        )
        .expect("encode");
        let mut bytes = Vec::new();
        tensorferry_engine::outbound::write_frame(&request, &mut bytes).expect("frame bytes");
        bytes.extend_from_slice(&common::announce(1 << 30));
        raw.write_all(&bytes).expect("request, then a 1 GiB claim");
        raws.push(raw);
    }
    // Each raw peer gets its reply (the worker answered, then led the
    // connection into the claim), and a well-behaved client is answered
    // at once meanwhile.
    for raw in &mut raws {
        raw.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut reply = [0u8; 4];
        raw.read_exact(&mut reply).expect("the reply comes");
        assert_eq!(&reply, b"TFRM");
    }
    let client = Node::builder().name("client").build().expect("client");
    for i in 0..20u64 {
        let start = Instant::now();
        let reply = client
            .request(&addr, "/echo", Message::new().field("i", i), WAIT)
            .expect("reply");
        assert_eq!(number(&reply, "i"), Some(i));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "a good request waited {:?}",
            start.elapsed()
        );
    }
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 256 << 20,
        "eight claims of 1 GiB grew this process by {grown} bytes"
    );
    drop(raws);
}
