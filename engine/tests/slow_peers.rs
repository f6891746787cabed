//! Peers that begin a frame and then stall or trickle it, to keep their
//! share of the receive budget: dropped once a progress period passes
//! without enough of the frame. A slow but steady peer, and a frame that
//! waits on the receiver's own full queue, are not.

mod common;

use common::{announce, closed_by_peer, wait_until};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tensorferry_device_map::ChannelConfig;
use tensorferry_engine::{pattern, DType, Message, Node};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn a_peer_that_stops_or_trickles_a_frame_is_dropped_and_others_are_served() {
    let receiver = Node::builder()
        .name("receiver")
        .listen("tcp://127.0.0.1:0")
        .progress_timeout(Duration::from_millis(300))
        .min_receive_rate(256 << 10)
        .build()
        .expect("receiver");
    let addr = receiver.listen_addrs()[0].to_string();
    let host = addr.trim_start_matches("tcp://").to_string();
    let sub = receiver.subscriber("/data");

    // Announces 1 GiB, then sends nothing.
    let mut stopped = TcpStream::connect(&host).expect("connect");
    stopped.write_all(&announce(1 << 30)).expect("announce");
    // Announces 1 GiB, then 100 bytes every 50 ms (2 KB/s).
    let mut trickler = TcpStream::connect(&host).expect("connect");
    trickler.write_all(&announce(1 << 30)).expect("announce");
    let trickling = Arc::new(AtomicBool::new(true));
    let drip = {
        let trickling = Arc::clone(&trickling);
        let mut s = trickler.try_clone().expect("clone");
        thread::spawn(move || {
            let mut sent = 0u64;
            while trickling.load(Ordering::Relaxed) && s.write_all(&[7u8; 100]).is_ok() {
                sent += 100;
                thread::sleep(Duration::from_millis(50));
            }
            sent
        })
    };
    // A peer that connects and sends nothing is not judged: no frame began.
    let quiet = TcpStream::connect(&host).expect("connect");

    wait_until("both stalled peers are dropped", WAIT, || {
        receiver.stats().rejected >= 2
    });
    trickling.store(false, Ordering::Relaxed);
    let trickled = drip.join().expect("drip");
    assert!(
        closed_by_peer(&stopped, WAIT),
        "the stopped peer was closed"
    );
    assert!(
        closed_by_peer(&trickler, WAIT),
        "the trickler was closed ({trickled} bytes sent)"
    );
    assert!(
        !closed_by_peer(&quiet, Duration::from_millis(200)),
        "an idle peer stays connected"
    );
    assert_eq!(receiver.stats().rejected, 2);

    // A well-behaved peer is served, every byte intact.
    let (_sender, publisher) = common::publisher_to(&addr);
    for seq in 0..4u64 {
        let t = pattern::tensor(DType::U8, &[1 << 20], 3, seq, "x").expect("tensor");
        publisher.send(Message::new().tensor("x", t)).expect("send");
        let got = sub.recv_timeout(WAIT).expect("message");
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::U8, 3, seq, "x", bytes.as_slice()),
            None
        );
    }
    assert_eq!(receiver.stats().rejected, 2);
}

/// Relays `from` to `to` at about `bytes_per_sec`, in small steps.
fn throttle(mut from: TcpStream, mut to: TcpStream, bytes_per_sec: u64) {
    let step = 8 << 10;
    let pause = Duration::from_secs_f64(step as f64 / bytes_per_sec as f64);
    let mut buf = vec![0u8; step];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                thread::sleep(pause);
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_slow_steady_peer_and_a_frame_waiting_on_a_full_queue_are_not_dropped() {
    // Frames that take several progress periods each, at four times the
    // slowest allowed rate.
    let config = ChannelConfig::from_json_str(r#"{"channels": {"/data": {"queue_depth": 1}}}"#)
        .expect("config");
    let receiver = Node::builder()
        .name("receiver")
        .listen("tcp://127.0.0.1:0")
        .channels(config)
        .progress_timeout(Duration::from_millis(200))
        .min_receive_rate(256 << 10)
        .build()
        .expect("receiver");
    let addr = receiver.listen_addrs()[0].to_string();
    let target = addr.trim_start_matches("tcp://").to_string();
    let sub = receiver.subscriber("/data");

    // The slow peer reaches the receiver through a throttling relay.
    let relay = TcpListener::bind("127.0.0.1:0").expect("relay");
    let relay_addr = format!("tcp://{}", relay.local_addr().expect("addr"));
    thread::spawn(move || {
        for incoming in relay.incoming() {
            let Ok(client) = incoming else { break };
            let server = TcpStream::connect(&target).expect("to receiver");
            let (c2, s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            thread::spawn(move || throttle(client, server, 1 << 20));
            thread::spawn(move || throttle(s2, c2, 64 << 20));
        }
    });
    let slow = Node::builder().name("slow").build().expect("slow");
    slow.connect(&relay_addr).expect("connect");
    let publisher = slow.publisher("/data");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");

    // Nobody reads the queue of one for a while: the frames behind it wait
    // on this side, however many periods pass.
    let sending = thread::spawn(move || {
        for seq in 0..3u64 {
            let t = pattern::tensor(DType::U8, &[600 << 10], 5, seq, "x").expect("tensor");
            publisher.send(Message::new().tensor("x", t)).expect("send");
        }
        publisher
    });
    thread::sleep(Duration::from_millis(1500));
    for seq in 0..3u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        assert_eq!(got.seq, seq);
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::U8, 5, seq, "x", bytes.as_slice()),
            None
        );
    }
    let publisher = sending.join().expect("sender");
    assert_eq!(receiver.stats().rejected, 0, "nobody was dropped");
    assert!(publisher.lost_subscribers().is_empty());
}
