//! A node set up from a configuration file's `"node"` section: listen
//! addresses, the secret, limits and the progress check come from the file,
//! so an operator changes them without code.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tensorferry_engine::delivery::load_config;
use tensorferry_engine::{pattern, DType, Error, Message, Node, Secret};

const WAIT: Duration = Duration::from_secs(20);

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tf-node-config-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

#[test]
fn listen_secret_and_limits_come_from_the_file() {
    let dir = scratch("full");
    write(&dir, "secret.key", "a secret of at least sixteen bytes");
    // The secret file is named relative to the configuration's folder.
    let path = write(
        &dir,
        "node.json",
        r#"{"node": {"name": "from-file", "listen": ["tcp://127.0.0.1:0"],
             "secret_file": "secret.key", "limits": {"frame_bytes": "1MiB"},
             "progress_timeout_s": 0.3},
            "channels": {"/data": {"queue_depth": 4}}}"#,
    );
    let config = load_config(&path).expect("config");
    let receiver = Node::builder()
        .configure(config)
        .expect("configure")
        .build()
        .expect("receiver");
    assert_eq!(
        receiver.listen_addrs().len(),
        1,
        "listens where the file says"
    );
    let addr = receiver.listen_addrs()[0].to_string();
    let sub = receiver.subscriber("/data");

    // A peer without the secret is dropped: its subscription ends.
    let stranger = Node::builder().name("stranger").build().expect("node");
    // It learns so when subscribing, or from its subscription.
    let refused = match stranger.subscribe(&addr, "/data") {
        Err(_) => true,
        Ok(sub) => sub.recv_timeout(WAIT).is_err(),
    };
    assert!(refused, "the stranger is dropped");
    wait_rejected(&receiver, 1);

    // A peer with it is served, within the file's frame limit.
    let secret = Secret::new("a secret of at least sixteen bytes").expect("secret");
    let sender = Node::builder().secret(secret).build().expect("sender");
    sender.connect(&addr).expect("connect");
    let publisher = sender.publisher("/data");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    let t = pattern::tensor(DType::U8, &[1000], 1, 0, "x").expect("tensor");
    publisher.send(Message::new().tensor("x", t)).expect("send");
    let got = sub.recv_timeout(WAIT).expect("message");
    assert_eq!(
        got.message.get("x").map(|t| t.shape().to_vec()),
        Some(vec![1000])
    );

    // A frame over the file's 1 MiB limit ends that connection.
    let big = pattern::tensor(DType::U8, &[2 << 20], 1, 1, "x").expect("tensor");
    publisher
        .send(Message::new().tensor("x", big))
        .expect("send");
    wait_rejected(&receiver, 2);
    std::fs::remove_dir_all(&dir).ok();
}

fn wait_rejected(node: &Node, n: u64) {
    let deadline = Instant::now() + WAIT;
    while node.stats().rejected < n {
        assert!(
            Instant::now() < deadline,
            "{n} peer(s) not refused: {:?}",
            node.stats()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_progress_check_comes_from_the_file() {
    let dir = scratch("progress");
    let path = write(
        &dir,
        "node.json",
        r#"{"node": {"listen": "tcp://127.0.0.1:0", "progress_timeout_s": 0.2, "min_receive_rate": "1MiB"}}"#,
    );
    let receiver = Node::builder()
        .configure(load_config(&path).expect("config"))
        .expect("configure")
        .build()
        .expect("receiver");
    let host = receiver.listen_addrs()[0]
        .to_string()
        .trim_start_matches("tcp://")
        .to_string();
    let prelude = common::announce(1 << 20);
    let mut s = TcpStream::connect(&host).expect("connect");
    s.write_all(&prelude).expect("announce");
    wait_rejected(&receiver, 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_secret_that_cannot_be_read_names_its_key() {
    let dir = scratch("missing");
    let path = write(
        &dir,
        "node.json",
        r#"{"node": {"secret_env": "TENSORFERRY_TEST_UNSET_SECRET_VARIABLE"}}"#,
    );
    let e = Node::builder()
        .configure(load_config(&path).expect("config"))
        .expect_err("no such variable");
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("node.secret_env"), "{e}");
    let path = write(&dir, "bad.json", r#"{"node": {"receive_budget": "8 GB"}}"#);
    let e = load_config(&path).expect_err("bad size").to_string();
    assert!(
        e.contains("node.receive_budget") && e.contains("8GiB"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
