//! Real processes talking over TCP: `send` and `recv` as a user runs them.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{assert_ok, bin, finish, run, spawn_listening};

/// A `recv --json` summary of `n` messages whose every byte was verified.
fn assert_verified(v: &serde_json::Value, n: u64) {
    assert_eq!(
        (v["messages"].as_u64(), v["verified"].as_bool()),
        (Some(n), Some(true)),
        "{v}"
    );
}

#[test]
fn tcp_send_to_a_listening_receiver_verifies_every_byte() {
    let (recv, addr) = spawn_listening(&[
        "recv",
        "--listen",
        "tcp://127.0.0.1:0",
        "--count",
        "5",
        "--verify",
        "--seed",
        "3",
        "--json",
        "--idle-timeout",
        "30",
    ]);
    let send = run(&[
        "send",
        "--to",
        &addr,
        "--channel",
        "/cam",
        "--tensor",
        "x=f32:256x257",
        "--tensor",
        "m=u8:7",
        "--count",
        "5",
        "--seed",
        "3",
        "--checksum",
    ]);
    assert_ok(&send);
    let (out, v) = finish(recv);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["messages"], 5);
    assert_eq!(v["bytes"], 5 * (256 * 257 * 4 + 7));
    assert_eq!(v["verified"], true);
    assert_eq!(v["tensors"][0]["shape"], serde_json::json!([256, 257]));
    assert_eq!(v["tensors"][0]["device"], "cpu");
}

#[test]
fn messages_striped_over_several_connections_between_two_processes_verify() {
    let config =
        std::env::temp_dir().join(format!("tensorferry-stripes-{}.json", std::process::id()));
    std::fs::write(&config, r#"{"channels": {"/big": {"stripes": 3}}}"#).expect("config");
    let config_path = config.to_str().expect("utf-8");
    let (recv, addr) = spawn_listening(&[
        "recv",
        "--listen",
        "tcp://127.0.0.1:0",
        "--config",
        config_path,
        "--count",
        "8",
        "--verify",
        "--seed",
        "4",
        "--json",
        "--idle-timeout",
        "30",
    ]);
    // 5 MB and an odd byte: shares that end off the 4 KiB cuts.
    let send = run(&[
        "send",
        "--to",
        &addr,
        "--config",
        config_path,
        "--channel",
        "/big",
        "--tensor",
        "x=u8:5000001",
        "--tensor",
        "y=f32:3",
        "--count",
        "8",
        "--seed",
        "4",
    ]);
    let _ = std::fs::remove_file(&config);
    assert_ok(&send);
    let (out, v) = finish(recv);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_verified(&v, 8);
    assert_eq!(v["bytes"], 8 * (5_000_001 + 12));
}

#[test]
fn send_fails_and_says_how_many_were_written_when_its_receiver_is_killed() {
    for listen in [
        "tcp://127.0.0.1:0".to_string(),
        format!("shm://tf-lost-{}", std::process::id()),
    ] {
        let (mut recv, addr) = spawn_listening(&[
            "recv",
            "--listen",
            &listen,
            "--json",
            "--idle-timeout",
            "30",
        ]);
        let mut send = bin()
            .args([
                "send",
                "--to",
                &addr,
                "--tensor",
                "x=u8:65536",
                "--count",
                "1000000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("send runs");
        std::thread::sleep(Duration::from_millis(500));
        recv.kill().expect("kill the receiver");
        let _ = recv.wait();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = send.try_wait().expect("send") {
                break s;
            }
            assert!(Instant::now() < deadline, "{listen}: send did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = send.wait_with_output().expect("send output");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success(), "{listen}: {err}");
        assert!(
            err.contains("was lost") && err.contains("of 1000000 message(s) were written"),
            "{listen}: {err}"
        );
    }
}

#[test]
fn a_shm_listener_refuses_processes_of_another_user() {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: running a process as another user needs root");
        return;
    }
    let name = format!("shm://tf-uid-{}", std::process::id());
    let (recv, addr) = spawn_listening(&[
        "recv",
        "--listen",
        &name,
        "--count",
        "1",
        "--json",
        "--idle-timeout",
        "20",
    ]);
    // `nobody`: another user than the receiver's.
    let out = match bin()
        .args([
            "send", "--to", &addr, "--tensor", "x=u8:16", "--count", "1", "--wait", "2",
        ])
        .uid(65534)
        .gid(65534)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            println!("SKIP: the binary cannot run as another user here: {e}");
            let _ = finish(recv);
            return;
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Permission denied") && err.contains("exec") {
        println!("SKIP: the binary cannot run as another user here: {err}");
        let _ = finish(recv);
        return;
    }
    assert!(
        !out.status.success(),
        "another user's send succeeded: {err}"
    );
    // The receiver's own user still gets in.
    let ok = run(&["send", "--to", &addr, "--tensor", "x=u8:16", "--count", "1"]);
    assert_ok(&ok);
    let (out, v) = finish(recv);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["messages"], 1);
}

#[test]
fn send_and_recv_with_a_secret_file_and_a_sender_without_it_refused() {
    let dir = std::env::temp_dir();
    let secret = dir.join(format!("tensorferry-secret-{}", std::process::id()));
    std::fs::write(&secret, b"a secret of at least sixteen bytes\n").expect("secret file");
    let secret = secret.to_string_lossy().into_owned();
    let (recv, addr) = spawn_listening(&[
        "recv",
        "--listen",
        "tcp://127.0.0.1:0",
        "--secret-file",
        &secret,
        "--count",
        "2",
        "--verify",
        "--json",
        "--idle-timeout",
        "20",
    ]);
    // Without the secret: refused before any message.
    let refused = run(&[
        "send", "--to", &addr, "--tensor", "x=u8:100", "--count", "1", "--wait", "3",
    ]);
    assert!(!refused.status.success());
    // With it, from the environment: served.
    let ok = bin()
        .args([
            "send", "--to", &addr, "--tensor", "x=u8:100", "--count", "2",
        ])
        .env("TENSORFERRY_SECRET", "a secret of at least sixteen bytes")
        .output()
        .expect("send");
    assert_ok(&ok);
    let (out, v) = finish(recv);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_verified(&v, 2);
    let _ = std::fs::remove_file(&secret);
}

#[test]
fn a_listening_sender_fans_out_to_several_receivers() {
    let (send, addr) = spawn_listening(&[
        "send",
        "--listen",
        "tcp://127.0.0.1:0",
        "--subscribers",
        "3",
        "--channel",
        "/fan",
        "--tensor",
        "x=bf16:64x64",
        "--count",
        "10",
        "--seed",
        "9",
        "--json",
    ]);
    let receivers: Vec<Child> = (0..3)
        .map(|_| {
            bin()
                .args([
                    "recv",
                    "--from",
                    &addr,
                    "--channel",
                    "/fan",
                    "--count",
                    "10",
                    "--verify",
                    "--seed",
                    "9",
                    "--json",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn recv")
        })
        .collect();
    for r in receivers {
        let (out, v) = finish(r);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{v} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_verified(&v, 10);
    }
    let (out, v) = finish(send);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["messages"], 10);
}

#[test]
fn a_sender_killed_mid_message_leaves_the_receiver_serving_others() {
    killed_sender_leaves_receiver_serving("tcp://127.0.0.1:0".to_string());
}

#[test]
fn a_shm_sender_killed_mid_message_leaves_the_receiver_serving_others() {
    killed_sender_leaves_receiver_serving(format!("shm://tf-killed-{}", std::process::id()));
}

fn killed_sender_leaves_receiver_serving(listen: String) {
    let (recv, addr) = spawn_listening(&[
        "recv",
        "--listen",
        &listen,
        "--channel",
        "/k",
        "--count",
        "3",
        "--verify",
        "--json",
        "--idle-timeout",
        "60",
    ]);
    // 64 MiB messages, sent without pause: killed, it stops inside one.
    let mut big = bin()
        .args([
            "send",
            "--to",
            &addr,
            "--channel",
            "/other",
            "--tensor",
            "x=u8:67108864",
            "--count",
            "1000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sender");
    std::thread::sleep(Duration::from_millis(1500));
    big.kill().expect("kill");
    let _ = big.wait();
    let good = run(&[
        "send",
        "--to",
        &addr,
        "--channel",
        "/k",
        "--tensor",
        "y=f64:100",
        "--count",
        "3",
    ]);
    assert_ok(&good);
    let (out, v) = finish(recv);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_verified(&v, 3);
}

#[test]
fn unreachable_and_malformed_addresses_fail_cleanly() {
    let start = Instant::now();
    let out = run(&[
        "send",
        "--to",
        "tcp://127.0.0.1:1",
        "--tensor",
        "x=u8:4",
        "--wait",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to tcp://127.0.0.1:1"));
    assert!(start.elapsed() < Duration::from_secs(10));
    let out = run(&["recv", "--listen", "tcp://127.0.0.1", "--count", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["send", "--to", "inproc://x", "--tensor", "x=u8:4"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["recv"]);
    assert_eq!(out.status.code(), Some(2), "a source is required");
}

fn dev_shm() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn shm_between_processes_verifies_and_leaves_nothing_behind() {
    let before = dev_shm();
    let name = format!("tf-e2e-{}", std::process::id());
    let addr = format!("shm://{name}");
    let (recv, shown) = spawn_listening(&[
        "recv",
        "--listen",
        &addr,
        "--count",
        "20",
        "--verify",
        "--seed",
        "2",
        "--json",
        "--idle-timeout",
        "30",
    ]);
    assert_eq!(shown, addr);
    let send = run(&[
        "send",
        "--to",
        &addr,
        "--tensor",
        "x=f32:512x513",
        "--tensor",
        "y=i64:3",
        "--count",
        "20",
        "--seed",
        "2",
        "--checksum",
    ]);
    assert_ok(&send);
    let (out, v) = finish(recv);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_verified(&v, 20);
    assert_eq!(
        dev_shm(),
        before,
        "no shared-memory file may outlive its processes"
    );
    let sockets = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    assert!(
        !sockets.contains(&name),
        "the socket must vanish with its process"
    );
}

#[test]
fn bench_listen_and_to_measure_tcp_and_its_raw_baseline_between_two_processes() {
    let (mut listener, addr) =
        spawn_listening(&["bench", "--listen", "tcp://127.0.0.1:0", "--json"]);
    let sender = run(&[
        "bench",
        "--to",
        &addr,
        "--sizes",
        "4KiB,64KiB",
        "--duration",
        "0.1",
        "--json",
    ]);
    if sender.status.code() != Some(0) {
        let _ = listener.kill();
    }
    assert_ok(&sender);
    let sent: serde_json::Value =
        serde_json::from_slice(&sender.stdout).expect("the sender prints JSON");
    let (out, got) = finish(listener);
    assert_ok(&out);

    assert_eq!(sent["settings"]["mode"], "to");
    assert_eq!(sent["settings"]["to"], addr.as_str());
    assert_eq!(got["settings"]["mode"], "listen");
    assert_eq!(got["settings"]["listen"], addr.as_str());
    assert_eq!(
        got["settings"]["sizes_bytes"],
        serde_json::json!([4096, 65536])
    );
    assert_eq!(got["settings"]["duration_s"], 0.1);
    let raw = got["settings"]["raw_listen"].as_str().expect("raw listen");
    assert_eq!(sent["settings"]["raw_baseline_to"], raw);
    assert_ne!(raw, addr, "the raw baseline has its own port");
    let (sent_rows, got_rows) = (
        sent["rows"].as_array().expect("rows"),
        got["rows"].as_array().expect("rows"),
    );
    assert_eq!((sent_rows.len(), got_rows.len()), (2, 2));
    for (s, g) in sent_rows.iter().zip(got_rows) {
        assert_eq!(s["transport"], "tcp");
        assert_eq!(s["baseline"], "raw tcp");
        assert!(s["messages"].as_u64() > Some(0), "{s}");
        assert!(s["gbps"].as_f64() > Some(0.0), "{s}");
        assert!(s["baseline_gbps"].as_f64() > Some(0.0), "{s}");
        // Both sides report what the listener measured.
        for k in ["size_bytes", "messages", "gbps", "baseline_gbps", "ratio"] {
            assert_eq!(s[k], g[k], "{k}: {s} / {g}");
        }
    }
}

/// PEM files of a CA, a listener certificate for 127.0.0.1 and a client
/// certificate, all signed by the CA, in a directory removed on drop.
struct Certs {
    dir: std::path::PathBuf,
}

impl Certs {
    fn new() -> Certs {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let dir = std::env::temp_dir().join(format!("tensorferry-cli-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).expect("pem");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("key");
        write("ca.crt", ca.self_signed(&ca_key).expect("ca").pem());
        let issuer = Issuer::new(ca, ca_key);
        for (name, san) in [("server", "127.0.0.1"), ("client", "client.example")] {
            let params = CertificateParams::new(vec![san.to_string()]).expect("params");
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &issuer).expect("signed");
            write(&format!("{name}.crt"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn send_and_recv_over_mutual_tls_and_senders_without_it_refused() {
    let certs = Certs::new();
    let (recv, addr) = spawn_listening(&[
        "recv",
        "--listen",
        "tcp://127.0.0.1:0",
        "--tls-cert",
        &certs.path("server.crt"),
        "--tls-key",
        &certs.path("server.key"),
        "--tls-client-ca",
        &certs.path("ca.crt"),
        "--count",
        "3",
        "--verify",
        "--seed",
        "4",
        "--json",
        "--idle-timeout",
        "60",
    ]);
    // Without TLS: refused.
    let plain = run(&[
        "send", "--to", &addr, "--tensor", "x=u8:100", "--count", "1", "--wait", "2",
    ]);
    assert!(!plain.status.success(), "a plaintext sender got through");
    // TLS without a client certificate: refused, and told what to give.
    let anonymous = run(&[
        "send",
        "--to",
        &addr,
        "--tls-ca",
        &certs.path("ca.crt"),
        "--tensor",
        "x=u8:100",
        "--count",
        "1",
        "--wait",
        "5",
    ]);
    let err = String::from_utf8_lossy(&anonymous.stderr);
    assert!(
        !anonymous.status.success() && err.contains("requires a client certificate"),
        "{err}"
    );
    // With its certificate: every byte arrives.
    let ok = run(&[
        "send",
        "--to",
        &addr,
        "--tls-ca",
        &certs.path("ca.crt"),
        "--tls-cert",
        &certs.path("client.crt"),
        "--tls-key",
        &certs.path("client.key"),
        "--tensor",
        "x=f32:512x1024",
        "--count",
        "3",
        "--seed",
        "4",
        "--wait",
        "20",
    ]);
    assert_ok(&ok);
    let (out, v) = finish(recv);
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_verified(&v, 3);
}

#[test]
fn tls_options_are_explained_in_help() {
    for command in ["send", "recv"] {
        let out = run(&[command, "--help"]);
        assert_ok(&out);
        let help = String::from_utf8_lossy(&out.stdout);
        for option in [
            "--tls-cert",
            "--tls-key",
            "--tls-ca",
            "--tls-client-ca",
            "--tls-server-name",
        ] {
            assert!(help.contains(option), "{command} --help lacks {option}");
        }
    }
}
