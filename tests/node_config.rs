//! `recv` and `send` set up from a configuration file's `"node"` section:
//! the receiver listens where the file says, with the file's secret, and a
//! sender without that secret is turned away.

mod common;

use common::{assert_ok, finish, spawn_listening};

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tf-cli-node-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

#[test]
fn recv_listens_and_authenticates_as_its_configuration_says() {
    let dir = scratch("auth");
    std::fs::write(dir.join("secret"), "a shared secret of some length").expect("secret");
    // The secret file is found next to the configuration.
    let config = dir.join("recv.json");
    std::fs::write(
        &config,
        r#"{"node": {"listen": "tcp://127.0.0.1:0", "secret_file": "secret",
                     "receive_budget": "1GiB", "progress_timeout_s": 10},
            "channels": {"/cfg": {"checksum": true}}}"#,
    )
    .expect("config");
    let config = config.to_str().expect("utf-8 path");
    let (recv, addr) = spawn_listening(&[
        "recv",
        "--config",
        config,
        "--count",
        "3",
        "--verify",
        "--seed",
        "4",
        "--json",
        "--quiet",
        "--idle-timeout",
        "30",
    ]);
    assert!(addr.starts_with("tcp://127.0.0.1:"), "{addr}");

    // Without the secret: refused.
    let stranger = common::run(&[
        "send",
        "--to",
        &addr,
        "--channel",
        "/cfg",
        "--tensor",
        "x=f32:16",
        "--wait",
        "5",
    ]);
    assert_ne!(
        stranger.status.code(),
        Some(0),
        "a sender without the secret is refused"
    );

    // With it (the same file): every byte arrives.
    let secret = dir.join("secret");
    let sent = common::run(&[
        "send",
        "--to",
        &addr,
        "--channel",
        "/cfg",
        "--tensor",
        "x=f32:1000x100",
        "--count",
        "3",
        "--seed",
        "4",
        "--secret-file",
        secret.to_str().expect("utf-8"),
        "--checksum",
    ]);
    assert_ok(&sent);
    let (out, json) = finish(recv);
    assert_ok(&out);
    assert_eq!(json["messages"], 3);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bad_node_setting_is_reported_with_its_place_before_anything_starts() {
    let dir = scratch("bad");
    let config = dir.join("bad.json");
    std::fs::write(
        &config,
        r#"{"node": {"listen": "tcp://127.0.0.1:0", "receive_budget": "2gb"}}"#,
    )
    .expect("config");
    let out = common::run(&["recv", "--config", config.to_str().expect("utf-8")]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.receive_budget") && err.contains("2GiB"),
        "{err}"
    );
    let out = common::run(&["recv", "--quiet"]);
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen") && err.contains("\"node\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
