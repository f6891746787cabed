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
    let server = node("server", true, 2, true);
    let addr = server.listen_addrs()[0].to_string();
    let client = node("client", false, 2, true);
    client.connect(&addr).expect("connect");
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
