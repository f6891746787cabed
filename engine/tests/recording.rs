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
    let recording = client.record("/cam", &addr).expect("record");
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
