//! The I/O layer as a user meets it: one I/O thread serves every connection
//! of a node, a full queue slows only its own connection, small messages
//! through shared memory keep coming when the subscriber lags, async waits
//! work on any executor, and the node's counters say what happened.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use tensorferry_device_map::{ChannelConfig, ChannelSpec, Overflow, Pattern};
use tensorferry_engine::{
    pattern, DType, Error, Message, Node, Publisher, Service, ServiceError, Subscription,
};

const WAIT: Duration = Duration::from_secs(20);

/// The least executor there is: polls on this thread, parks until woken.
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(thread::Thread, AtomicBool);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.1.store(true, Ordering::SeqCst);
            self.0.unpark();
        }
    }
    let unpark = Arc::new(Unpark(thread::current(), AtomicBool::new(false)));
    let waker = Waker::from(Arc::clone(&unpark));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        while !unpark.1.swap(false, Ordering::SeqCst) {
            thread::park_timeout(Duration::from_millis(100));
        }
    }
}

/// A node named "server" listening on `shm://tf-io-TAG-PID`, and that address.
fn shm_server(tag: &str) -> (Node, String) {
    let name = format!("shm://tf-io-{tag}-{}", std::process::id());
    let server = Node::builder()
        .name("server")
        .listen(&name)
        .build()
        .expect("server");
    (server, name)
}

fn publisher_node(name: &str) -> (Node, String) {
    let node = Node::builder()
        .name(name)
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("node");
    let addr = node.listen_addrs()[0].to_string();
    (node, addr)
}

/// A node named "client" subscribed to `channel` at `addr`, and `server`'s
/// publisher of it once it reaches that subscriber.
fn subscribed(server: &Node, addr: &str, channel: &str) -> (Node, Subscription, Publisher) {
    let client = Node::builder().name("client").build().expect("client");
    let sub = client.subscribe(addr, channel).expect("subscribe");
    let publisher = server.publisher(channel);
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    (client, sub, publisher)
}

#[test]
fn a_full_queue_stalls_its_own_connection_and_the_io_thread_serves_the_others() {
    let (slow_pub, slow_addr) = publisher_node("slow");
    let (fast_pub, fast_addr) = publisher_node("fast");
    let mut config = ChannelConfig::new();
    config
        .insert(
            "/slow",
            ChannelSpec::new(Pattern::PubSub).with_queue(1, Overflow::Block),
        )
        .expect("config");
    // One I/O thread reads both connections.
    let receiver = Node::builder()
        .name("receiver")
        .channels(config)
        .io_threads(1)
        .build()
        .expect("receiver");
    let stuck = receiver.subscribe(&slow_addr, "/slow").expect("subscribe");
    let fast = receiver.subscribe(&fast_addr, "/fast").expect("subscribe");
    let slow = slow_pub.publisher("/slow");
    slow.wait_for_subscribers(1, WAIT).expect("subscriber");
    // Far more than the subscription's queue, and than the socket holds:
    // the connection from `slow` stalls, and so does its publisher.
    let flood = thread::spawn(move || {
        for seq in 0..200u64 {
            let t = pattern::tensor(DType::U8, &[256 << 10], 1, seq, "x").expect("tensor");
            if slow.send(Message::new().tensor("x", t)).is_err() {
                break;
            }
        }
    });
    thread::sleep(Duration::from_millis(200));
    let quick = fast_pub.publisher("/fast");
    quick.wait_for_subscribers(1, WAIT).expect("subscriber");
    for seq in 0..100u64 {
        quick.send(Message::new().field("seq", seq)).expect("send");
    }
    for seq in 0..100u64 {
        let got = fast
            .recv_timeout(WAIT)
            .expect("the other connection is served");
        assert_eq!(got.seq, seq);
    }
    // The stalled one lost nothing: every message comes, in order, as it is taken.
    for seq in 0..200u64 {
        let got = stuck
            .recv_timeout(WAIT)
            .expect("the stalled connection goes on");
        assert_eq!(got.seq, seq);
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::U8, 1, seq, "x", bytes.as_slice()),
            None
        );
    }
    flood.join().expect("publisher");
}

#[test]
fn small_messages_through_shared_memory_all_arrive_when_the_subscriber_lags() {
    let (server, name) = shm_server("lag");
    let (client, sub, publisher) = subscribed(&server, &name, "/small");
    const N: u64 = 20_000;
    let sender = thread::spawn(move || {
        for seq in 0..N {
            let t = pattern::tensor(DType::U8, &[4096], 2, seq, "x").expect("tensor");
            publisher.send(Message::new().tensor("x", t)).expect("send");
        }
        publisher
    });
    for seq in 0..N {
        let got = sub.recv_timeout(WAIT).expect("message");
        assert_eq!(got.seq, seq);
        if seq % 1000 == 0 {
            let bytes = got.message.get("x").expect("x").packed().expect("host");
            assert_eq!(
                pattern::first_mismatch(DType::U8, 2, seq, "x", bytes.as_slice()),
                None
            );
            // A lagging subscriber: the publisher waits instead of the
            // connection filling with slots.
            thread::sleep(Duration::from_millis(20));
        }
    }
    let publisher = sender.join().expect("publisher");
    assert_eq!(client.peer_count(), 1, "the connection is still up");
    assert_eq!(publisher.dropped(), 0);
}

#[test]
fn async_waits_work_without_any_runtime_of_the_engine() {
    let (server, addr) = publisher_node("server");
    server
        .serve(
            "/double",
            Service::new(|m: Message| {
                let n = m.get_field("n").and_then(|v| v.as_u64()).unwrap_or(0);
                Ok(Message::new().field("n", n * 2))
            }),
        )
        .expect("serve");
    let client = Node::builder().name("client").build().expect("client");
    let sub = client.subscribe(&addr, "/ticks").expect("subscribe");
    let publisher = server.publisher("/ticks");
    block_on(publisher.wait_for_subscribers_async(1)).expect("subscriber");
    let sending = thread::spawn(move || {
        block_on(async {
            for n in 0..10u64 {
                publisher
                    .send_async(Message::new().field("n", n))
                    .await
                    .expect("send");
            }
        });
        publisher
    });
    let got: Vec<u64> = block_on(async {
        let mut got = Vec::new();
        for _ in 0..10 {
            let r = sub.recv_async().await.expect("message");
            got.push(
                r.message
                    .get_field("n")
                    .and_then(|v| v.as_u64())
                    .expect("n"),
            );
        }
        got
    });
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    sending.join().expect("sender");
    let reply = block_on(
        client
            .request_async(&addr, "/double", Message::new().field("n", 21))
            .expect("request"),
    )
    .expect("reply");
    assert_eq!(reply.get_field("n").and_then(|v| v.as_u64()), Some(42));
    // An error reply comes back as an error, asynchronously too.
    let missing = block_on(
        client
            .request_async(&addr, "/nobody", Message::new())
            .expect("request"),
    );
    assert!(
        matches!(&missing, Err(Error::Remote { code, .. }) if code == "no_service"),
        "{missing:?}"
    );
    // A shut-down node ends an async receive.
    let idle = client.subscriber("/never");
    let ender = {
        let client = client.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            client.shutdown();
        })
    };
    let start = Instant::now();
    assert!(matches!(block_on(idle.recv_async()), Err(Error::Closed)));
    assert!(start.elapsed() < WAIT);
    ender.join().expect("ender");
}

#[test]
fn counters_say_what_a_node_sent_received_and_lost() {
    let (server, addr) = publisher_node("server");
    let (client, sub, publisher) = subscribed(&server, &addr, "/count");
    for seq in 0..5u64 {
        let t = pattern::tensor(DType::F32, &[100], 1, seq, "x").expect("tensor");
        publisher.send(Message::new().tensor("x", t)).expect("send");
    }
    for _ in 0..5 {
        sub.recv_timeout(WAIT).expect("message");
    }
    let sent = server.channel_stats("/count");
    let received = client.channel_stats("/count");
    assert_eq!(sent.messages_sent, 5);
    assert_eq!(received.messages_received, 5);
    assert_eq!(sent.bytes_sent, received.bytes_received);
    assert!(received.bytes_received >= 5 * 400);
    assert_eq!(client.stats().peers, 1);
    server.shutdown();
    assert!(matches!(
        sub.recv_timeout(WAIT),
        Err(Error::PeerLost { .. })
    ));
    let after = client.stats();
    assert_eq!((after.peers, after.peers_lost), (0, 1));
    assert_eq!(client.channel_stats("/nothing"), Default::default());
}

#[test]
fn a_publisher_learns_which_subscriber_was_lost_and_how_far_it_got() {
    let (server, addr) = publisher_node("server");
    let (client, sub, publisher) = subscribed(&server, &addr, "/lost");
    for n in 0..3u64 {
        publisher.send(Message::new().field("n", n)).expect("send");
    }
    for _ in 0..3 {
        sub.recv_timeout(WAIT).expect("message");
    }
    assert!(publisher.lost_subscribers().is_empty());
    // The subscriber's node goes without unsubscribing (as a killed process would).
    client.shutdown();
    let deadline = Instant::now() + WAIT;
    while publisher.lost_subscribers().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let lost = publisher.lost_subscribers();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(
        (lost[0].channel.as_str(), lost[0].written, lost[0].unsent),
        ("/lost", 3, 0)
    );
    // A subscriber that unsubscribes is not lost.
    let other = Node::builder().name("other").build().expect("other");
    let leaving = other.subscribe(&addr, "/lost").expect("subscribe");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    drop(leaving);
    let deadline = Instant::now() + WAIT;
    while publisher.subscribers() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(publisher.lost_subscribers().len(), 1);
}

#[test]
fn queues_bounded_in_bytes_keep_the_newest_and_count_the_rest() {
    let mut config = ChannelConfig::new();
    config
        .insert(
            "/big",
            ChannelSpec::new(Pattern::PubSub)
                .with_queue(64, Overflow::DropOldest)
                .with_queue_bytes(3 << 20),
        )
        .expect("config");
    let node = Node::builder().channels(config).build().expect("node");
    let sub = node.subscriber("/big");
    let publisher = node.publisher("/big");
    for seq in 0..10u64 {
        let t = pattern::tensor(DType::U8, &[1 << 20], 7, seq, "x").expect("tensor");
        publisher.send(Message::new().tensor("x", t)).expect("send");
    }
    // 64 places, but 3 MiB: the three newest are kept.
    assert_eq!(sub.dropped(), 7);
    let kept: Vec<u64> = (0..3)
        .map(|_| sub.recv_timeout(WAIT).expect("message").seq)
        .collect();
    assert_eq!(kept, vec![7, 8, 9]);
    assert!(sub.try_recv().expect("open").is_none());
}

#[test]
fn a_peer_that_sends_its_last_frame_and_closes_at_once_is_seen_to_go() {
    // The last frame and the end of the stream often reach the socket
    // together, in one readiness event: the reader must see both.
    let (tcp_server, tcp) = publisher_node("server");
    let (shm_node, shm) = shm_server("last");
    for (server, addr, round) in (0..40).map(|round| {
        if round % 2 == 0 {
            (&tcp_server, &tcp, round)
        } else {
            (&shm_node, &shm, round)
        }
    }) {
        let client = Node::builder().name("client").build().expect("node");
        let sub = client.subscribe(addr, "/x").expect("subscribe");
        let publisher = server.publisher("/x");
        publisher
            .wait_for_subscribers(1, WAIT)
            .expect("the subscription arrives");
        drop(sub); // an unsubscribe frame, then at once the end of the stream
        client.shutdown();
        let deadline = Instant::now() + WAIT;
        while server.peer_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "round {round} ({addr}): the server still counts the closed connection"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn a_tensor_in_shared_memory_outlives_its_node_while_the_sender_goes_on() {
    let (server, name) = shm_server("outlive");
    let publisher = server.publisher("/x");
    let frame = |round: u64| {
        let t = pattern::tensor(DType::U8, &[64 << 10], 3, round, "x").expect("tensor");
        Message::new().tensor("x", t)
    };
    let first = Node::builder().name("first").build().expect("first");
    let sub = first.subscribe(&name, "/x").expect("subscribe");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    publisher.send(frame(0)).expect("send");
    let kept = sub.recv_timeout(WAIT).expect("message").message;
    // The receiving node goes, the tensor it received stays.
    drop(sub);
    first.shutdown();
    let deadline = Instant::now() + WAIT;
    while server.peer_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "the server saw the first node go"
        );
        thread::sleep(Duration::from_millis(5));
    }
    // The sender goes on with another subscriber, writing slots anew.
    let second = Node::builder().name("second").build().expect("second");
    let sub = second.subscribe(&name, "/x").expect("subscribe");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    for round in 1..=8 {
        publisher.send(frame(round)).expect("send");
        let got = sub.recv_timeout(WAIT).expect("message");
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::U8, 3, round, "x", bytes.as_slice()),
            None
        );
    }
    let bytes = kept.get("x").expect("x").packed().expect("host");
    assert_eq!(
        pattern::first_mismatch(DType::U8, 3, 0, "x", bytes.as_slice()),
        None,
        "the kept tensor's slot was written again"
    );
}

#[test]
fn a_subscriber_that_stops_reading_its_shm_connection_hands_it_back_to_the_io_thread() {
    // A subscriber reading its own shm connection keeps it between two
    // `recv`s instead of waking the I/O thread. When it stops calling
    // `recv`, what else comes on that connection (here: another channel,
    // taken without ever reading the connection) must still be delivered,
    // soon, and nothing of its own channel may be lost.
    let (server, name) = shm_server("park");
    let client = Node::builder().name("client").build().expect("client");
    let reader = client.subscribe(&name, "/read").expect("subscribe");
    let polled = client.subscribe(&name, "/polled").expect("subscribe");
    let to_reader = server.publisher("/read");
    let to_polled = server.publisher("/polled");
    to_reader.wait_for_subscribers(1, WAIT).expect("subscriber");
    to_polled.wait_for_subscribers(1, WAIT).expect("subscriber");
    let (asked, ask) = std::sync::mpsc::channel::<()>();
    let (took, taken) = std::sync::mpsc::channel::<u64>();
    let reading = thread::spawn(move || {
        // Each `recv` starts before its message is sent: the reader waits
        // on the connection itself, reads the message there and keeps the
        // connection when it returns.
        while ask.recv().is_ok() {
            let got = reader.recv_timeout(WAIT).expect("the reader's message");
            let round = got.message.get_field("round").and_then(|v| v.as_u64());
            took.send(round.expect("a round")).expect("report");
        }
        reader
    });
    for round in 0..20u64 {
        asked.send(()).expect("ask");
        thread::sleep(Duration::from_millis(20));
        to_reader
            .send(Message::new().field("round", round))
            .expect("send");
        assert_eq!(taken.recv_timeout(WAIT).expect("taken"), round);
        // The reader stopped reading: the other channel's messages arrive
        // all the same, through the I/O thread.
        for k in 0..5u64 {
            to_polled
                .send(Message::new().field("k", round * 5 + k))
                .expect("send");
        }
        let started = Instant::now();
        for k in 0..5u64 {
            let got = loop {
                if let Some(got) = polled.try_recv().expect("open") {
                    break got;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "round {round}: message {k} of a channel nobody reads stayed unread"
                );
                thread::sleep(Duration::from_micros(200));
            };
            assert_eq!(got.message.get_field("k"), Some(&(round * 5 + k).into()));
        }
    }
    drop(asked);
    let reader = reading.join().expect("reader");
    // Messages for the reader that came while it did not read wait for it, in order.
    for seq in 0..300u64 {
        to_reader
            .send(Message::new().field("late", seq))
            .expect("send");
    }
    thread::sleep(Duration::from_millis(50));
    for seq in 0..300u64 {
        let got = reader.recv_timeout(WAIT).expect("a late message");
        assert_eq!(got.message.get_field("late"), Some(&seq.into()));
    }
}

#[test]
fn published_messages_that_come_fast_over_tcp_are_all_written_without_another_send() {
    // Messages published hard on each other over tcp are left to the I/O
    // thread, which writes what gathered: the last of a burst must go out
    // although nothing is sent after it (no flush either), whatever the
    // length of the burst and of the pause after it.
    let (server, addr) = publisher_node("server");
    let (_client, sub, publisher) = subscribed(&server, &addr, "/burst");
    let mut seq = 0u64;
    for round in 0..60u64 {
        let burst = 1 + (round * 37) % 200;
        let first = seq;
        // Built first, so that they leave back to back.
        let messages: Vec<Message> = (first..first + burst)
            .map(|n| {
                let t = pattern::tensor(DType::U8, &[4096], 4, n, "x").expect("tensor");
                Message::new().field("n", n).tensor("x", t)
            })
            .collect();
        for m in messages {
            publisher.send(m).expect("send");
            seq += 1;
        }
        for want in first..seq {
            let got = sub
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("round {round}: message {want} of {seq}: {e}"));
            assert_eq!(got.message.get_field("n"), Some(&want.into()));
            if want + 1 == seq {
                let bytes = got.message.get("x").expect("x").packed().expect("host");
                assert_eq!(
                    pattern::first_mismatch(DType::U8, 4, want, "x", bytes.as_slice()),
                    None
                );
            }
        }
        // Pauses around the gap that decides who writes.
        thread::sleep(Duration::from_micros((round % 5) * 30));
    }
    assert_eq!(publisher.dropped(), 0);
}

#[test]
fn an_inline_service_that_publishes_a_burst_over_tcp_does_not_wait_on_its_own_io_thread() {
    // An inline handler runs on the I/O thread. Messages it publishes fast
    // must be written there and then: left for "the I/O thread" to write,
    // they would fill their lane and the handler's next send would wait
    // for the thread it runs on.
    let (server, addr) = publisher_node("server");
    let out = server.publisher("/out");
    let burst = server.publisher("/out");
    server
        .serve(
            "/burst",
            Service::new(move |m: Message| {
                // Built first, so that they leave back to back.
                let t = pattern::tensor(DType::U8, &[4096], 6, 0, "x").expect("tensor");
                let messages: Vec<Message> = (0..300u64)
                    .map(|n| Message::new().field("n", n).tensor("x", t.clone()))
                    .collect();
                for message in messages {
                    burst
                        .send(message)
                        .map_err(|e| ServiceError::new("send", e.to_string()))?;
                }
                Ok(m)
            })
            .inline(true),
        )
        .expect("serve");
    let client = Node::builder().name("client").build().expect("client");
    let sub = client.subscribe(&addr, "/out").expect("subscribe");
    out.wait_for_subscribers(1, WAIT).expect("subscriber");
    let reading = thread::spawn(move || {
        for n in 0..300u64 {
            let got = sub.recv_timeout(WAIT).expect("a message of the burst");
            assert_eq!(got.message.get_field("n"), Some(&n.into()));
        }
    });
    let reply = client
        .request(&addr, "/burst", Message::new(), Duration::from_secs(20))
        .expect("the handler returns");
    assert!(reply.tensors().next().is_none());
    reading.join().expect("every message of the burst arrives");
}
