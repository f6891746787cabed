//! Recording what a node sees to a `file://` and replaying it through a
//! subscription.

use std::time::Duration;

use tensorferry_engine::{pattern, DType, Error, Message, Node, ALL_CHANNELS};

const WAIT: Duration = Duration::from_secs(10);

fn scratch(name: &str) -> String {
    let path = std::env::temp_dir().join(format!("tensorferry-{name}-{}.tfm", std::process::id()));
    format!("file://{}", path.display())
}

#[test]
fn a_recording_replays_every_message_in_order_with_every_byte() {
    let addr = scratch("record");
    let server = Node::builder()
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("server");
    let tcp = server.listen_addrs()[0].to_string();
    let client = Node::builder().build().expect("client");
    // The client records what it receives from the server on /cam.
    let live = client.subscribe(&tcp, "/cam").expect("subscribe");
    let recording = client.record(&addr, "/cam").expect("record");
    let publisher = server.publisher("/cam");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    let other = server.publisher("/other");
    for seq in 0..20u64 {
        let t = pattern::tensor(DType::F32, &[33, 7], 2, seq, "x").expect("tensor");
        publisher
            .send(Message::new().field("i", seq).tensor("x", t))
            .expect("send");
        other
            .send(Message::new().field("not", "recorded"))
            .expect("send");
    }
    for _ in 0..20 {
        live.recv_timeout(WAIT).expect("live message");
    }
    assert_eq!(recording.stop().expect("stop"), 20);

    let reader = Node::builder().build().expect("reader");
    let replay = reader.subscribe(&addr, ALL_CHANNELS).expect("replay");
    for seq in 0..20u64 {
        let got = replay.recv_timeout(WAIT).expect("replayed");
        assert_eq!((got.channel.as_str(), got.seq), ("/cam", seq));
        assert_eq!(got.message.get_field("i"), Some(&serde_json::json!(seq)));
        assert!(got.from.starts_with("file://"), "{}", got.from);
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::F32, 2, seq, "x", bytes.as_slice()),
            None
        );
    }
    assert!(matches!(replay.recv_timeout(WAIT), Err(Error::Closed)));

    // A channel filter replays only that channel.
    let none = reader.subscribe(&addr, "/other").expect("replay");
    assert!(matches!(none.recv_timeout(WAIT), Err(Error::Closed)));

    // Files are not peers: the errors say what to do instead.
    let err = reader.connect(&addr).expect_err("not a peer");
    assert!(err.to_string().contains("Node::record"), "{err}");
    let missing = reader.subscribe("file:///nonexistent/x.tfm", "/cam");
    assert!(missing.is_err());
    let _ = std::fs::remove_file(addr.trim_start_matches("file://"));
}

#[test]
fn received_messages_are_recorded_as_they_came_and_replay_like_them() {
    use tensorferry_device_map::{ChannelConfig, ChannelSpec, Pattern};
    let addr = scratch("record-cast");
    let mut config = ChannelConfig::new();
    config
        .insert(
            "/act",
            ChannelSpec::new(Pattern::PubSub)
                .with_wire_dtype("f32", "bf16")
                .with_checksum(true)
                .with_queue(4, tensorferry_device_map::Overflow::Block),
        )
        .expect("config");
    let server = Node::builder()
        .channels(config.clone())
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("server");
    let tcp = server.listen_addrs()[0].to_string();
    let client = Node::builder()
        .channels(config.clone())
        .build()
        .expect("client");
    let live = client.subscribe(&tcp, "/act").expect("subscribe");
    let recording = client.record(&addr, "/act").expect("record");
    let publisher = server.publisher("/act");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    let values: Vec<f32> = (0..300).map(|i| (i % 128) as f32 * 0.5).collect(); // exact in bf16
                                                                               // More messages than the queues hold, sent while the recording runs.
    let n = 40u64;
    let feeder = std::thread::spawn(move || {
        for seq in 0..n {
            let t = tensorferry_engine::Tensor::from_slice(&values, &[300]).expect("t");
            publisher
                .send(Message::new().field("i", seq).tensor("x", t))
                .expect("send");
            std::thread::sleep(Duration::from_millis(2));
        }
        publisher
    });
    for _ in 0..n {
        let got = live.recv_timeout(WAIT).expect("live");
        assert_eq!(got.message.get("x").expect("x").dtype(), DType::F32);
    }
    let _publisher = feeder.join().expect("feeder");
    assert_eq!(recording.stop().expect("stop"), n);

    // Replayed with the same configuration: cast back, checksums verified,
    // every message (a lagging reader of a queue of 4 included) and then the end.
    let reader = Node::builder().channels(config).build().expect("reader");
    let replay = reader.subscribe(&addr, "/act").expect("replay");
    for seq in 0..n {
        std::thread::sleep(Duration::from_millis(1));
        let got = replay.recv_timeout(WAIT).expect("replayed");
        assert_eq!(got.seq, seq);
        let x = got.message.get("x").expect("x");
        assert_eq!(x.dtype(), DType::F32, "cast back on replay");
        assert_eq!(
            x.as_slice::<f32>().expect("f32")[299],
            (299 % 128) as f32 * 0.5
        );
        assert_eq!(got.tensors[0].cast_from, Some(DType::F32));
        assert!(got.tensors[0].checksum.is_some());
    }
    assert!(matches!(replay.recv_timeout(WAIT), Err(Error::Closed)));
    let _ = std::fs::remove_file(addr.trim_start_matches("file://"));
}

#[test]
fn a_recording_stops_promptly_while_messages_keep_coming() {
    use tensorferry_device_map::{ChannelConfig, ChannelSpec, Overflow, Pattern};
    let addr = scratch("record-busy");
    // The subscriber never reads: its queue drops the oldest, so the
    // publisher never waits for it whatever the recording's stop takes.
    let mut config = ChannelConfig::new();
    config
        .insert(
            "/tick",
            ChannelSpec::new(Pattern::PubSub).with_queue(4, Overflow::DropOldest),
        )
        .expect("config");
    let node = Node::builder().channels(config).build().expect("node");
    let recording = node.record(&addr, ALL_CHANNELS).expect("record");
    let publisher = node.publisher("/tick");
    let _sub = node.subscriber("/tick");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&stop);
    let feeder = std::thread::spawn(move || {
        let mut seq = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = publisher.send(Message::new().field("i", seq));
            seq += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = std::time::Instant::now();
    let written = recording.stop().expect("stop");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(written > 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    feeder.join().expect("feeder");
    let _ = std::fs::remove_file(addr.trim_start_matches("file://"));
}
