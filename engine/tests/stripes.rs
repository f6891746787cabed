//! Large messages striped over several tcp connections to one peer: they
//! arrive whole, every byte right, in order with the small ones between
//! them, whichever end dialed and with a shared secret; a peer that lies
//! about stripes is closed and counted, and the node serves others on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tensorferry_device_map::{ChannelConfig, ChannelSpec, Pattern};
use tensorferry_engine::{pattern, DType, Message, Node, Secret};

mod common;
use common::{closed_by_peer, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &[u8] = b"a secret of more than sixteen bytes";

/// Both nodes' channels: `/big` striped over `stripes` connections.
fn config(stripes: usize) -> ChannelConfig {
    let mut c = ChannelConfig::new();
    c.insert(
        "/big",
        ChannelSpec::new(Pattern::PubSub).with_stripes(stripes),
    )
    .expect("channel");
    c
}

fn node(name: &str, listen: bool, stripes: usize, secret: bool) -> Node {
    let mut b = Node::builder()
        .name(name)
        .channels(config(stripes))
        .connect_timeout(Duration::from_secs(5));
    if listen {
        b = b.listen("tcp://127.0.0.1:0");
    }
    if secret {
        b = b.secret(Secret::new(SECRET.to_vec()).expect("secret"));
    }
    b.build().expect("node")
}

/// A listening server and a client that dialed it, both striping `/big`
/// over `stripes` connections.
fn dialed(stripes: usize, secret: bool) -> (Node, Node) {
    let server = node("server", true, stripes, secret);
    let addr = server.listen_addrs()[0].to_string();
    let client = node("client", false, stripes, secret);
    client.connect(&addr).expect("connect");
    (server, client)
}

/// A message of one u8 tensor of `bytes` bytes, its content from `seq`.
fn message(seq: u64, bytes: usize) -> Message {
    let t = pattern::tensor(DType::U8, &[bytes], 5, seq, "x").expect("tensor");
    Message::new().field("seq", seq).tensor("x", t)
}

fn check(m: &Message, seq: u64, bytes: usize) {
    assert_eq!(
        m.get_field("seq").and_then(serde_json::Value::as_u64),
        Some(seq)
    );
    let got = m
        .get("x")
        .expect("tensor x")
        .contiguous_bytes()
        .expect("host bytes");
    assert_eq!(got.len(), bytes, "message {seq}");
    assert_eq!(
        pattern::first_mismatch(DType::U8, 5, seq, "x", got),
        None,
        "message {seq}"
    );
}

/// Sizes that stripe (1 MiB and up, none a multiple of the 4 KiB cuts)
/// between ones that do not.
fn size(i: u64) -> usize {
    match i % 4 {
        0 => (3 << 20) + 4097,
        1 => 17,
        2 => (1 << 20) + 1,
        _ => 70_000,
    }
}

/// `sender` publishes 24 messages on `/big` to `receiver`'s subscription
/// (made by `subscribe`), while `receiver` takes them: each arrives whole,
/// in order, and most large ones went striped.
fn stream(sender: &Node, subscribe: impl FnOnce() -> tensorferry_engine::Subscription) {
    let sub = subscribe();
    let publisher = sender.publisher("/big");
    publisher
        .wait_for_subscribers(1, WAIT)
        .expect("a subscriber");
    let sending = std::thread::spawn(move || {
        for i in 0..24u64 {
            publisher.send(message(i, size(i))).expect("publish");
            if i == 0 {
                // The first large message goes whole and sets the stripes
                // up; the next ones go over them once they have joined.
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        publisher
    });
    for i in 0..24u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        check(&got.message, i, size(i));
    }
    drop(sending.join().expect("publisher"));
    let striped = sender.stats().striped;
    assert!(
        (6..=12).contains(&striped),
        "{striped} of the 12 large messages went striped"
    );
}

#[test]
fn a_listener_stripes_large_messages_to_a_dialer_that_subscribed() {
    let server = node("server", true, 3, false);
    let addr = server.listen_addrs()[0].to_string();
    let client = node("client", false, 3, false);
    stream(&server, || {
        client.subscribe(&addr, "/big").expect("subscribe")
    });
    // The stripes are no peers of the server.
    assert_eq!(server.stats().peers, 1);
    assert_eq!(server.stats().rejected, 0);
}

#[test]
fn a_dialer_stripes_large_messages_to_a_listener_with_a_shared_secret() {
    let (server, client) = dialed(2, true);
    stream(&client, || server.subscriber("/big"));
    assert_eq!(server.stats().peers, 1);
    assert_eq!(client.stats().rejected + server.stats().rejected, 0);
}

#[test]
fn a_channel_with_one_stripe_sends_whole() {
    let server = node("server", true, 1, false);
    let addr = server.listen_addrs()[0].to_string();
    let client = node("client", false, 1, false);
    let sub = client.subscribe(&addr, "/big").expect("subscribe");
    let publisher = server.publisher("/big");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    for i in 0..4u64 {
        publisher.send(message(i, 2 << 20)).expect("publish");
        check(
            &sub.recv_timeout(WAIT).expect("message").message,
            i,
            2 << 20,
        );
    }
    assert_eq!(server.stats().striped, 0);
}

fn record(magic: &[u8; 4], small: u16) -> [u8; 32] {
    let mut r = [0u8; 32];
    r[..4].copy_from_slice(magic);
    r[4..6].copy_from_slice(&1u16.to_le_bytes());
    r[6..8].copy_from_slice(&small.to_le_bytes());
    r
}

#[test]
fn peers_that_lie_about_stripes_are_closed_and_counted() {
    let server = node("server", true, 2, false);
    let addr = server.listen_addrs()[0].to_string();
    let raw_addr = addr.trim_start_matches("tcp://").to_string();

    // A join with a token the server never gave.
    let mut join = TcpStream::connect(&raw_addr).expect("connect");
    let mut rec = record(b"TFSJ", 1);
    rec[8..24].copy_from_slice(&[7; 16]);
    join.write_all(&rec).expect("write");
    assert!(closed_by_peer(&join, WAIT), "a join with a made-up token");
    wait_until("the join is counted", WAIT, || server.stats().rejected == 1);

    // A plan on a connection that was given no stripes.
    let mut plan = TcpStream::connect(&raw_addr).expect("connect");
    let mut rec = record(b"TFSP", 2);
    rec[16..24].copy_from_slice(&(8u64 << 20).to_le_bytes());
    plan.write_all(&rec)
        .and_then(|()| plan.write_all(&common::announce(8 << 20)))
        .expect("write");
    assert!(closed_by_peer(&plan, WAIT), "a plan without stripes");
    wait_until("the plan is counted", WAIT, || server.stats().rejected == 2);

    // Records of another version, where a frame or a join may come.
    let mut newer = TcpStream::connect(&raw_addr).expect("connect");
    let mut rec = record(b"TFSJ", 1);
    rec[4..6].copy_from_slice(&9u16.to_le_bytes());
    newer.write_all(&rec).expect("write");
    let mut sink = Vec::new();
    newer.set_read_timeout(Some(WAIT)).expect("timeout");
    let _ = newer.read_to_end(&mut sink);
    wait_until("the newer record is counted", WAIT, || {
        server.stats().rejected == 3
    });

    // The server goes on: a well-behaved client's large messages stripe.
    let client = node("client", false, 2, false);
    stream(&server, || {
        client.subscribe(&addr, "/big").expect("subscribe")
    });
}

/// Peers that agreed stripes with the node, then announce a large striped
/// frame and send nothing more: each holds no more of the receive budget
/// than a frame on probation, so a well-behaved peer's large messages go
/// on arriving, and this process grows by little.
#[test]
fn a_striped_frame_that_stalls_holds_no_more_budget_than_a_whole_one() {
    use tensorferry_engine::outbound::write_frame;
    use tensorferry_engine::wire::{encode, EncodeOptions, FrameMeta, Kind};

    let server = Node::builder()
        .name("server")
        .listen("tcp://127.0.0.1:0")
        .channels(config(2))
        .receive_budget_bytes(256 << 20)
        .build()
        .expect("server");
    let addr = server.listen_addrs()[0].to_string();
    let raw_addr = addr.trim_start_matches("tcp://").to_string();
    let data = server.subscriber("/data");
    let before = common::rss();

    // Two peers ask for stripes as a dialer does; the server agrees (its
    // token offers are left unread), then each sends a plan and the
    // prelude of a 128 MiB frame (half the budget: on probation when
    // whole), and nothing more.
    let len = 128u64 << 20;
    let raws: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut raw = TcpStream::connect(&raw_addr).expect("connect");
            let ask = encode(
                &Message::new().field("count", 2u64),
                &FrameMeta {
                    channel: String::new(),
                    seq: 0,
                    kind: Kind::Stripes,
                    id: None,
                },
                EncodeOptions::default(),
            )
            .expect("encode");
            let mut bytes = Vec::new();
            write_frame(&ask, &mut bytes).expect("frame");
            raw.write_all(&bytes).expect("ask");
            raw
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for mut raw in &raws {
        let mut plan = record(b"TFSP", 2);
        plan[16..24].copy_from_slice(&len.to_le_bytes());
        raw.write_all(&plan)
            .and_then(|()| raw.write_all(&common::announce(len)))
            .expect("plan");
    }

    // A well-behaved peer's 8 MiB messages, while the frames stall (with
    // both reserved whole, the budget would have no room for them).
    let (_sender, publisher) = common::publisher_to(&addr);
    let started = std::time::Instant::now();
    for i in 0..3u64 {
        publisher.send(message(i, 8 << 20)).expect("publish");
        let got = data
            .recv_timeout(Duration::from_secs(10))
            .expect("a message while the striped frame stalls");
        check(&got.message, i, 8 << 20);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let grown = common::rss().saturating_sub(before);
    assert!(grown < 192 << 20, "grew by {} MiB", grown >> 20);
    drop(raws);
}

#[test]
fn a_publisher_that_flushes_and_leaves_has_sent_its_striped_messages_whole() {
    // `flush` returns once every part of every message is written, the
    // shares on the stripes included: a sender that leaves right after
    // (as `tensorferry send` does) loses nothing.
    let (server, client) = dialed(3, false);
    let sub = server.subscriber("/big");
    let publisher = client.publisher("/big");
    publisher
        .wait_for_subscribers(1, WAIT)
        .expect("a subscriber");
    const BIG: usize = (8 << 20) + 4097;
    publisher.send(message(0, BIG)).expect("publish");
    // The first goes whole and sets the stripes up.
    std::thread::sleep(Duration::from_millis(300));
    for i in 1..8u64 {
        publisher.send(message(i, BIG)).expect("publish");
    }
    publisher.flush(WAIT).expect("flush");
    let striped = client.stats().striped;
    drop(publisher);
    drop(client);
    for i in 0..8u64 {
        let got = sub
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("message {i} of 8 (the sender flushed, then left): {e}"));
        check(&got.message, i, BIG);
    }
    assert!(striped >= 4, "only {striped} of 8 messages went striped");
}
