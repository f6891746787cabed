//! Peers that announce what they never send: a frame as large as the limit,
//! frames of a gigabyte from several connections at once. The receiver
//! stays up, its memory does not grow with what was announced, and a
//! well-behaved peer is served meanwhile.
//!
//! One test in its own binary: it reads this process's resident memory.

mod common;

use common::{announce, rss};

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tensorferry_engine::wire::{encode, EncodeOptions, FrameMeta};
use tensorferry_engine::{pattern, DType, Error, Message, Node};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn announced_frames_cost_no_memory_and_the_budget_holds() {
    let receiver = Node::builder()
        .name("receiver")
        .listen("tcp://127.0.0.1:0")
        .receive_budget_bytes(8 << 30)
        .build()
        .expect("receiver");
    let addr = receiver.listen_addrs()[0].to_string();
    let host = addr.trim_start_matches("tcp://").to_string();
    let sub = receiver.subscriber("/data");
    let before = rss();

    // A frame as large as the default limit (64 GiB), more than the budget:
    // refused, and only that connection closed.
    let mut huge = TcpStream::connect(&host).expect("connect");
    huge.write_all(&announce(64 << 30)).expect("announce");
    // Four frames of 1 GiB, let in (they fit the budget) and never sent.
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(&host).expect("connect");
            s.write_all(&announce(1 << 30)).expect("announce");
            s
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while receiver.stats().rejected == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(receiver.stats().rejected, 1, "the 64 GiB frame is refused");

    // A well-behaved peer is served meanwhile, every byte intact.
    let (_sender, publisher) = common::publisher_to(&addr);
    for seq in 0..20u64 {
        let t = pattern::tensor(DType::U8, &[1 << 20], 4, seq, "x").expect("tensor");
        publisher.send(Message::new().tensor("x", t)).expect("send");
    }
    for seq in 0..20u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::U8, 4, seq, "x", bytes.as_slice()),
            None
        );
    }
    // 68 GiB announced; what is resident grew by what was really received
    // (20 MiB) and the buffers around it, nowhere near a gigabyte.
    let grown = rss().saturating_sub(before);
    assert!(grown < 256 << 20, "resident memory grew by {grown} bytes");
    println!(
        "68 GiB announced, 20 MiB received: resident memory grew by {} MiB",
        grown >> 20
    );

    // The idle connections are still open, their frames waiting: the
    // receiver did not give up on them, nor crash.
    for s in &mut idle {
        s.write_all(b"").expect("still open");
    }
    assert!(receiver.stats().peers >= 5);
    drop(huge);
}

#[test]
fn a_frame_larger_than_the_budget_is_refused_and_the_node_goes_on() {
    let receiver = Node::builder()
        .name("small")
        .listen("tcp://127.0.0.1:0")
        .receive_budget_bytes(1 << 20)
        .build()
        .expect("receiver");
    receiver
        .serve("/echo", tensorferry_engine::Service::new(Ok))
        .expect("serve");
    let addr = receiver.listen_addrs()[0].to_string();
    let sender = Node::builder().name("sender").build().expect("sender");
    let big = Message::new().tensor(
        "x",
        pattern::tensor(DType::U8, &[2 << 20], 1, 0, "x").expect("tensor"),
    );
    // The receiver closes the connection: the sender learns it lost it.
    let r = sender.request(&addr, "/echo", big, WAIT);
    assert!(
        matches!(r, Err(Error::PeerLost { .. } | Error::Misbehaved { .. })),
        "{r:?}"
    );
    assert_eq!(receiver.stats().rejected, 1);
    // A request that fits is answered on a new connection.
    let small = Message::new().tensor(
        "x",
        pattern::tensor(DType::U8, &[1000], 1, 1, "x").expect("tensor"),
    );
    let reply = sender.request(&addr, "/echo", small, WAIT).expect("reply");
    assert_eq!(reply.get("x").map(|t| t.shape().to_vec()), Some(vec![1000]));
}

#[test]
fn received_frames_never_hold_more_than_the_budget_and_nothing_is_lost() {
    let receiver = Node::builder()
        .name("bounded")
        .listen("tcp://127.0.0.1:0")
        .receive_budget_bytes(4 << 20)
        .build()
        .expect("receiver");
    let addr = receiver.listen_addrs()[0].to_string();
    let sub = receiver.subscriber("/data");
    let (_sender, publisher) = common::publisher_to(&addr);
    let feeding = std::thread::spawn(move || {
        for seq in 0..40u64 {
            let t = pattern::tensor(DType::U8, &[1 << 20], 6, seq, "x").expect("tensor");
            publisher.send(Message::new().tensor("x", t)).expect("send");
        }
        publisher
    });
    // Nobody reads for a while: at most four frames of 1 MiB are let in.
    std::thread::sleep(Duration::from_millis(300));
    let stats = receiver.channel_stats("/data");
    assert!(
        stats.messages_received <= 4,
        "{} frames taken in with a budget of four",
        stats.messages_received
    );
    // Taking them lets the rest in, in order, every byte intact.
    for seq in 0..40u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        assert_eq!(got.seq, seq);
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::U8, 6, seq, "x", bytes.as_slice()),
            None
        );
    }
    feeding.join().expect("publisher");
}

#[test]
fn a_peer_that_closes_while_its_frame_waits_for_the_budget_is_lost_and_returns_it() {
    // A sender killed while its frame waits for the receive budget: its
    // bytes and its end are both in the socket when the frame is let in.
    // The receiver reads the bytes, then the end: the peer is lost and the
    // reservation comes back (it was once left half-closed, holding it).
    let receiver = Node::builder()
        .name("receiver")
        .listen("tcp://127.0.0.1:0")
        .receive_budget_bytes(3 << 19)
        .build()
        .expect("receiver");
    let addr = receiver.listen_addrs()[0].to_string();
    let host = addr.trim_start_matches("tcp://").to_string();
    let sub = receiver.subscriber("/data");
    let (_sender, publisher) = common::publisher_to(&addr);
    let message = |seq| {
        let t = pattern::tensor(DType::U8, &[1 << 20], 7, seq, "x").expect("tensor");
        Message::new().tensor("x", t)
    };
    // Held: 1 MiB of the 1.5 MiB budget.
    publisher.send(message(0)).expect("send");
    let held = sub.recv_timeout(WAIT).expect("message");

    // The first 200 KiB of a frame of 1 MiB, and the end.
    let mut frame = Vec::new();
    encode(
        &message(9),
        &FrameMeta::message("/data", 9),
        EncodeOptions::default(),
    )
    .expect("encode")
    .write_to(&mut frame)
    .expect("write");
    let mut cut = TcpStream::connect(&host).expect("connect");
    cut.write_all(&frame[..200 << 10])
        .expect("part of the frame");
    let lost_before = receiver.stats().peers_lost;
    // The end without a reset: what the receiver sent stays unread here.
    cut.shutdown(std::net::Shutdown::Write).expect("end");
    std::thread::sleep(Duration::from_millis(200));

    drop(held);
    let deadline = Instant::now() + WAIT;
    while receiver.stats().peers_lost == lost_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        receiver.stats().peers_lost,
        lost_before + 1,
        "the cut connection was never seen to end"
    );
    // Its reservation came back: a frame of 1 MiB fits again.
    publisher.send(message(1)).expect("send");
    let got = sub.recv_timeout(WAIT).expect("message");
    let bytes = got.message.get("x").expect("x").packed().expect("host");
    assert_eq!(
        pattern::first_mismatch(DType::U8, 7, 1, "x", bytes.as_slice()),
        None
    );
    drop(cut);
}
