//! Device-mapped delivery between real processes: `send` and `recv` with a
//! channel configuration, and request/reply between two processes. Targets
//! on a wgpu adapter need one (lavapipe in CI): without it these tests skip
//! with a printed reason, or fail under `TENSORFERRY_REQUIRE_WGPU=1`.

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

mod common;
use common::{assert_ok, bin, finish, have_wgpu, listening_addr, spawn_listening};

use tensorferry::device_map::{ChannelConfig, Device};
use tensorferry::engine::{Message, Node, Service, Tensor};

/// A config file holding `json`, removed when dropped.
struct Config(std::path::PathBuf);

impl Config {
    fn new(tag: &str, json: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tensorferry-staging-{tag}-{}.json",
            std::process::id()
        ));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(json.as_bytes()))
            .expect("write config");
        Config(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts `recv --listen` with `config`; returns it and the address it bound.
fn spawn_recv(config: &Config, count: u64) -> (Child, String) {
    spawn_listening(&[
        "recv",
        "--listen",
        "tcp://127.0.0.1:0",
        "--config",
        config.path(),
        "--count",
        &count.to_string(),
        "--verify",
        "--json",
        "--idle-timeout",
        "30",
    ])
}

fn send(addr: &str, config: &Config, tensors: &[&str], count: u64) -> Output {
    let mut args = vec![
        "send",
        "--to",
        addr,
        "--channel",
        "/t",
        "--config",
        config.path(),
    ];
    for t in tensors {
        args.extend(["--tensor", t]);
    }
    let count = count.to_string();
    args.extend(["--count", &count]);
    bin().args(&args).output().expect("run send")
}

/// The exit code and JSON summary of a finished `recv`.
fn finish_recv(child: Child) -> (Option<i32>, serde_json::Value) {
    let (out, v) = finish(child);
    (out.status.code(), v)
}

/// `(device, dtype, wire_dtype)` of the named tensor in a `recv --json` summary.
fn landed(v: &serde_json::Value, name: &str) -> (String, String, String) {
    let t = v["tensors"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no tensor {name} in {v}"));
    let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
    (s("device"), s("dtype"), s("wire_dtype"))
}

#[test]
fn recv_lands_tensors_on_the_mapped_wgpu_adapter_cast_and_verified_there() {
    if !have_wgpu() {
        return;
    }
    let config = Config::new(
        "wgpu",
        r#"{"channels": {"/t": {"device_map": {"cpu": "wgpu:0"},
            "wire_dtype": {"f32": "bf16"}, "checksum": true}}}"#,
    );
    let (recv, addr) = spawn_recv(&config, 3);
    assert_ok(&send(&addr, &config, &["x=f32:257x3", "m=u8:1001"], 3));
    let (code, v) = finish_recv(recv);
    assert_eq!(
        (code, v["verified"].as_bool()),
        (Some(0), Some(true)),
        "{v}"
    );
    assert_eq!(v["messages"], 3);
    assert_eq!(
        landed(&v, "x"),
        ("wgpu:0".into(), "f32".into(), "bf16".into()),
        "cast back to f32 on the adapter"
    );
    assert_eq!(landed(&v, "m"), ("wgpu:0".into(), "u8".into(), "u8".into()));
    assert_eq!(v["tensors"][0]["checksum_verified"], true);
}

#[test]
fn tensors_sent_from_a_wgpu_adapter_land_on_the_host() {
    if !have_wgpu() {
        return;
    }
    let config = Config::new(
        "from-wgpu",
        r#"{"channels": {"/t": {"device_map": {"wgpu:0": "cpu"}, "checksum": true,
            "wire_dtype": {"f32": "f16"}, "keep_wire_dtype": true}}}"#,
    );
    let (recv, addr) = spawn_recv(&config, 2);
    assert_ok(&send(&addr, &config, &["x=f32:64x64@wgpu:0"], 2));
    let (code, v) = finish_recv(recv);
    assert_eq!(
        (code, v["verified"].as_bool()),
        (Some(0), Some(true)),
        "{v}"
    );
    assert_eq!(
        landed(&v, "x"),
        ("cpu".into(), "f16".into(), "f16".into()),
        "kept in its wire dtype"
    );
    assert_eq!(v["tensors"][0]["source_device"], "wgpu:0");
}

#[test]
fn a_missing_target_follows_the_channel_fallback() {
    let wgpu = have_wgpu();
    for (fallback, want) in [
        ("cpu", Some("cpu")),
        ("wgpu", Some(if wgpu { "wgpu:0" } else { "cpu" })),
        ("error", None),
    ] {
        let config = Config::new(
            fallback,
            &format!(
                r#"{{"channels": {{"/t": {{"device_map": {{"cpu": "cuda:9"}}, "fallback": "{fallback}"}}}}}}"#
            ),
        );
        let (recv, addr) = spawn_recv(&config, 1);
        assert_ok(&send(&addr, &config, &["x=i32:33"], 1));
        let (code, v) = finish_recv(recv);
        match want {
            Some(device) => {
                assert_eq!(code, Some(0), "{fallback}: {v}");
                assert_eq!(landed(&v, "x").0, device, "{fallback}: {v}");
            }
            None => {
                assert_eq!(code, Some(1), "{fallback}: {v}");
                let why = v["rejected"][0].as_str().unwrap_or_default();
                assert!(
                    why.contains("cuda:9") && why.contains("`x`"),
                    "{fallback}: {v}"
                );
                assert_eq!(v["messages"], 0, "nothing half-delivered");
            }
        }
    }
}

const RESPONDER_ENV: &str = "TENSORFERRY_TEST_RESPONDER_CONFIG";

/// Not a test on its own: the responder process of
/// `replies_return_to_the_requesting_device_across_processes`, which runs
/// this test binary again with only this test selected.
#[test]
#[ignore = "run as a child process by another test"]
fn responder_process() {
    let Ok(path) = std::env::var(RESPONDER_ENV) else {
        return;
    };
    let config = ChannelConfig::from_file(&path).expect("config");
    let node = Node::builder()
        .channels(config)
        .listen("tcp://127.0.0.1:0")
        .build()
        .expect("node");
    node.serve(
        "/echo",
        Service::new(|m: Message| {
            let x = m.get("x").expect("x").clone();
            Ok(Message::new()
                .field("landed_on", x.device().to_string())
                .tensor("x", x))
        }),
    )
    .expect("serve");
    println!("listening on {}", node.listen_addrs()[0]);
    // Serve until the parent closes stdin.
    let _ = std::io::stdin().lines().count();
}

#[test]
fn replies_return_to_the_requesting_device_across_processes() {
    if !have_wgpu() {
        return;
    }
    let config = Config::new(
        "reqrep",
        r#"{"channels": {"/echo": {"pattern": "reqrep", "device_map": {"cpu": "wgpu:0"}}}}"#,
    );
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "responder_process", "--ignored", "--nocapture"])
        .env(RESPONDER_ENV, config.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn responder");
    let addr = listening_addr(child.stdout.take().expect("stdout"));
    let node = Node::builder()
        .channels(ChannelConfig::from_file(&config.0).expect("config"))
        .build()
        .expect("node");
    let data: Vec<f32> = (0..1000).map(|i| (i as f32).sqrt()).collect();
    let reply = node
        .request(
            &addr,
            "/echo",
            Message::new().tensor("x", Tensor::from_slice(&data, &[10, 100]).expect("x")),
            Duration::from_secs(30),
        )
        .expect("reply");
    drop(child.stdin.take());
    let _ = child.wait();
    assert_eq!(
        reply.get_field("landed_on"),
        Some(&serde_json::json!("wgpu:0")),
        "the request landed on the mapped device"
    );
    let x = reply.get("x").expect("x");
    assert_eq!(x.device(), Device::Cpu, "the reply came back to the host");
    assert_eq!(x.as_slice::<f32>().expect("f32"), &data[..]);
}
