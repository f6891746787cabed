//! `tensorferry store` as users run it, each step its own process: a
//! directory store and a served one written by one process and read by
//! another, with the errors a user meets (a key written twice, an evicted
//! key, a store that refuses the peer or is gone).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

fn tensorferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensorferry"))
        .args(args)
        .env_remove("TENSORFERRY_SECRET")
        .output()
        .expect("the tensorferry binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn json(out: &Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Checks that a command was refused (exit 2) saying each of `says`.
fn refused(out: &Output, says: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for s in says {
        assert!(err.contains(s), "`{s}` not in: {err}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tensorferry-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A `store serve` process and the address it printed.
struct Server(Child);

impl Server {
    fn start(dir: &Path, secret: Option<&Path>) -> (Server, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensorferry"));
        cmd.args(["store", "serve", "--listen", "tcp://127.0.0.1:0", "--dir"])
            .arg(dir)
            .env_remove("TENSORFERRY_SECRET")
            .stdout(Stdio::piped());
        if let Some(s) = secret {
            cmd.arg("--secret-file").arg(s);
        }
        let mut child = cmd.spawn().expect("store serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("its first line");
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("tcp://"))
            .unwrap_or_else(|| panic!("an address in `{line}`"))
            .to_string();
        (Server(child), addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_directory_store_written_by_one_process_is_read_by_another() {
    let dir = scratch("dir");
    let store = format!("dir:{}", dir.display());
    let put = tensorferry(&[
        "store",
        "put",
        "--store",
        &store,
        "--tensor",
        "w=f32:300x7",
        "--tensor",
        "ids=i64:5",
        "--field",
        "step=12",
        "--seed",
        "3",
        "--json",
    ]);
    let proxy = json(&put);
    let key = proxy["key"].as_str().expect("key").to_string();
    assert_eq!(proxy["tensors"][0]["bytes"], 300 * 7 * 4);
    assert_eq!(proxy["store"]["kind"], "dir");

    let out = dir.join("w.safetensors");
    let got = json(&tensorferry(&[
        "store",
        "get",
        "--store",
        &store,
        &key,
        "--json",
        "--out",
        out.to_str().expect("utf-8"),
    ]));
    assert_eq!(got["valid"], true, "{got}");
    assert_eq!(got["fields"]["step"], 12);
    assert_eq!(got["tensors"][0]["shape"], serde_json::json!([300, 7]));
    assert_eq!(
        got["tensors"][0]["checksum"],
        proxy["tensors"][0]["checksum"]
    );
    assert!(out.is_file(), "--out wrote the safetensors file");

    // Written once: a second put of the key is refused, saying how to replace it.
    let named = tensorferry(&[
        "store", "put", "--store", &store, "--key", "weights", "--tensor", "w=f32:4",
    ]);
    assert_eq!(named.status.code(), Some(0), "{}", text(&named.stderr));
    let again = tensorferry(&[
        "store", "put", "--store", &store, "--key", "weights", "--tensor", "w=f32:4",
    ]);
    refused(&again, &["overwrite"]);
    let replaced = tensorferry(&[
        "store",
        "put",
        "--store",
        &store,
        "--key",
        "weights",
        "--overwrite",
        "--tensor",
        "w=f32:8",
    ]);
    assert_eq!(
        replaced.status.code(),
        Some(0),
        "{}",
        text(&replaced.stderr)
    );

    let listing = json(&tensorferry(&["store", "ls", "--store", &store, "--json"]));
    let keys: Vec<&str> = listing
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["key"].as_str())
        .collect();
    let mut want = vec![key.as_str(), "weights"];
    want.sort_unstable();
    assert_eq!(keys, want);

    let evict = tensorferry(&["store", "evict", "--store", &store, &key, "never-put"]);
    assert_eq!(evict.status.code(), Some(1), "one key was not there");
    assert!(text(&evict.stdout).contains(&format!("evicted {key}")));
    let gone = tensorferry(&["store", "get", "--store", &store, &key]);
    refused(&gone, &["never put there, or was evicted"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_served_store_is_reached_by_other_processes_with_its_secret_only() {
    let dir = scratch("served");
    let secret = dir.join("secret");
    std::fs::write(&secret, "a store secret of more than sixteen bytes").expect("secret");
    let secret = secret.to_str().expect("utf-8").to_string();
    let data = scratch("served-data");
    let (server, addr) = Server::start(&data, Some(Path::new(&secret)));

    let put = tensorferry(&[
        "store",
        "put",
        "--store",
        &addr,
        "--secret-file",
        &secret,
        "--key",
        "shard-0",
        "--tensor",
        "x=bf16:1024x33",
        "--field",
        "epoch=2",
    ]);
    assert_eq!(put.status.code(), Some(0), "{}", text(&put.stderr));
    assert!(
        data.join("shard-0.tfm").is_file(),
        "the serving process wrote it to its directory"
    );

    let got = json(&tensorferry(&[
        "store",
        "get",
        "--store",
        &addr,
        "--secret-file",
        &secret,
        "shard-0",
        "--json",
    ]));
    assert_eq!(got["valid"], true, "{got}");
    assert_eq!(got["fields"]["epoch"], 2);
    assert_eq!(got["tensors"][0]["dtype"], "bf16");

    // A process without the secret is refused by the store's node.
    let stranger = tensorferry(&["store", "ls", "--store", &addr, "--timeout", "5"]);
    refused(
        &stranger,
        &["cannot be reached", "requires a shared secret"],
    );

    drop(server);
    let after = tensorferry(&[
        "store",
        "get",
        "--store",
        &addr,
        "--secret-file",
        &secret,
        "shard-0",
    ]);
    refused(&after, &[&format!("store {addr} cannot be reached")]);

    // What the store held is still on disk for the next server.
    let (_server, addr) = Server::start(&data, Some(Path::new(&secret)));
    let again = json(&tensorferry(&[
        "store",
        "get",
        "--store",
        &addr,
        "--secret-file",
        &secret,
        "shard-0",
        "--json",
    ]));
    assert_eq!(
        again["tensors"][0]["checksum"],
        got["tensors"][0]["checksum"]
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn bad_store_options_say_what_to_give() {
    for (args, says) in [
        (
            vec!["store", "ls", "--store", "memory:x"],
            "lives inside one process",
        ),
        (
            vec!["store", "put", "--store", "dir:unused"],
            "nothing to put",
        ),
        (vec!["store", "get", "--store", "tcp://", "k"], "--store"),
        (
            vec![
                "store",
                "put",
                "--store",
                "dir:unused",
                "--key",
                "a/b",
                "--tensor",
                "w=f32:1",
            ],
            "`/` is not allowed",
        ),
    ] {
        let out = tensorferry(&args);
        refused(&out, &[says]);
    }
}

#[test]
fn the_store_bench_reports_each_measurement_beside_its_baseline() {
    let out = tensorferry(&[
        "store", "bench", "--size", "1MiB", "--rounds", "1", "--json",
    ]);
    let r = json(&out);
    assert!(
        r["dir"]["resolve_large_us"].as_f64().expect("µs") > 0.0,
        "{r}"
    );
    assert!(
        r["served"]["raw_tcp_gbps"].as_f64().expect("GB/s") > 0.0,
        "{r}"
    );
    assert!(r["served"]["ratio"].as_f64().expect("ratio") > 0.0, "{r}");
    for transport in ["tcp", "shm"] {
        let t = &r["served"][transport];
        assert!(t["gbps"].as_f64().expect("GB/s") > 0.0, "{r}");
        for kind in ["host_compute", "device_wait"] {
            let a = &t["ahead"][kind];
            let (fetch, compute, total) = (
                a["fetch_ms"].as_f64().expect("ms"),
                a["compute_ms"].as_f64().expect("ms"),
                a["total_ms"].as_f64().expect("ms"),
            );
            // Resolving ahead takes at least the computation, and at most
            // the computation and the fetch one after the other (with room
            // for this loaded machine's noise).
            assert!(
                total >= compute && total <= 3.0 * (compute + fetch) + 50.0,
                "{r}"
            );
            assert!(a["hidden"].as_f64().is_some(), "{r}");
        }
    }
}
