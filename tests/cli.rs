//! The `tensorferry` binary as a user runs it: exit codes, output and errors.

use std::process::{Command, Output};

fn tensorferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tensorferry"))
        .args(args)
        .output()
        .expect("the tensorferry binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tensorferry-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/channels.json");

#[test]
fn check_map_resolves_the_shipped_example_against_a_stated_inventory() {
    let out = tensorferry(&[
        "check-map",
        EXAMPLE,
        "--devices",
        "cpu,cuda:0,cuda:1,cuda:2,cuda:3,wgpu:0",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["valid"], true);
    assert_eq!(v["errors"], serde_json::json!([]));
    let r = &v["channels"]["/notify/exchange"]["resolved"];
    assert_eq!(r["cuda:0"]["target"], "cuda:1");
    assert_eq!(r["cuda:1"]["target"], "cuda:0");
    assert_eq!(r["cuda:1"]["reason"], "explicit");
    assert_eq!(r["cuda:2"]["target"], "cpu");
    assert_eq!(r["cuda:2"]["reason"], "default");
    assert_eq!(
        v["channels"]["/detect"]["resolved"]["cuda:0"]["target"],
        "cuda:1"
    );
    assert_eq!(
        v["channels"]["/activations"]["resolved"]["cpu"]["target"],
        "cuda:0"
    );
}

#[test]
fn check_map_passes_on_this_host_whatever_it_has() {
    let out = tensorferry(&["check-map", EXAMPLE]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("/notify/exchange"));
}

#[test]
fn check_map_lists_every_error_with_its_place_and_exits_2() {
    let bad = temp_file(
        "bad.json",
        r#"{"channels": {
            "/a": {"pattern": "reqrep", "device_map": {"cuda:0": "cpu", "gpu:1": "cpu"}},
            "/b": {"device_map": {"cuda:1": "cuda:0", "1": "cpu"}, "fallbak": "cpu"}
        }}"#,
    );
    let path = bad.to_str().expect("utf-8 path");
    let out = tensorferry(&["check-map", path, "--devices", "cpu,cuda:0,cuda:1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(r#"channels["/a"].device_map["gpu:1"]"#),
        "{err}"
    );
    assert!(err.contains(r#"channels["/b"].device_map["1"]"#), "{err}");
    assert!(err.contains(r#"channels["/b"].fallbak"#), "{err}");
    assert!(err.contains("3 error(s)"), "{err}");

    let out = tensorferry(&["check-map", path, "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON even when invalid");
    assert_eq!(v["valid"], false);
    let errors = v["errors"].as_array().expect("errors array");
    assert_eq!(errors.len(), 3, "{v}");
    assert_eq!(errors[0]["channel"], "/a");
    assert!(errors[0]["message"]
        .as_str()
        .expect("message")
        .contains("`cuda:0` and `gpu:1` both map to cpu"));
}

#[test]
fn check_map_reports_a_missing_target_naming_what_the_host_has() {
    let file = temp_file(
        "missing.json",
        r#"{"channels": {"/a": {"device_map": {"cuda:0": "cuda:5"}}}}"#,
    );
    let out = tensorferry(&[
        "check-map",
        file.to_str().expect("utf-8"),
        "--devices",
        "cuda:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("cuda:5") && err.contains("cpu, cuda:0"),
        "{err}"
    );
}

#[test]
fn check_map_reports_unknown_wire_dtypes_and_impossible_casts() {
    let file = temp_file(
        "wire.json",
        r#"{"channels": {"/a": {"wire_dtype": {"f32": "bf16", "i32": "f16", "f64": "bfloat17"},
            "checksum": true, "keep_wire_dtype": "yes"}}}"#,
    );
    let out = tensorferry(&[
        "check-map",
        file.to_str().expect("utf-8"),
        "--devices",
        "cpu",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    for want in [
        r#"channels["/a"].wire_dtype["i32"]: i32 cannot travel as f16"#,
        r#"channels["/a"].wire_dtype["f64"]: `bfloat17` is not a dtype"#,
        r#"channels["/a"].keep_wire_dtype"#,
    ] {
        assert!(err.contains(want), "{want} in {err}");
    }
    assert!(!err.contains(r#"wire_dtype["f32"]"#), "{err}");
}

#[test]
fn check_map_gives_line_and_column_for_malformed_json() {
    let file = temp_file(
        "broken.json",
        "{\"channels\": {\n  \"/a\": {\"pattern\": }\n}}",
    );
    let out = tensorferry(&[
        "check-map",
        file.to_str().expect("utf-8"),
        "--devices",
        "cpu",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("line 2, column 21"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_map_rejects_bad_arguments_with_exit_2() {
    let out = tensorferry(&["check-map", EXAMPLE, "--devices", "cpu,tpu:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("`tpu:0` is not a device"),
        "{}",
        stderr(&out)
    );

    let out = tensorferry(&["check-map", "/nonexistent/channels.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));

    let out = tensorferry(&["check-map"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn devices_reports_the_cpu_and_a_reason_for_each_missing_runtime() {
    let out = tensorferry(&["devices", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert!(v["cpu"]["cores"].as_u64().expect("cores") >= 1);
    assert_eq!(v["inventory"][0], "cpu");
    for runtime in ["cuda", "wgpu"] {
        let devices = v[runtime]["devices"].as_array().expect("devices array");
        if devices.is_empty() {
            let why = v[runtime]["unavailable"]
                .as_str()
                .expect("a reason when there are no devices");
            assert!(!why.is_empty());
        }
    }
    let out = tensorferry(&["devices"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("cpu "));
}

#[test]
fn help_explains_each_subcommand() {
    let out = tensorferry(&["--help"]);
    assert!(stdout(&out).contains("check-map") && stdout(&out).contains("devices"));
    let out = tensorferry(&["check-map", "--help"]);
    assert!(stdout(&out).contains("--devices") && stdout(&out).contains("cuda:0"));
}

fn scratch(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("tensorferry-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name).to_str().expect("utf-8 path").to_string()
}

fn send_file(path: &str, extra: &[&str]) {
    let to = format!("file://{path}");
    let mut args = vec![
        "send",
        "--to",
        &to,
        "--channel",
        "/cam",
        "--tensor",
        "x=f32:64x33",
        "--tensor",
        "flag=bool:5",
    ];
    args.extend_from_slice(extra);
    let out = tensorferry(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn send_records_and_recv_replays_verifying_every_byte() {
    let path = scratch("rec.tfm");
    send_file(
        &path,
        &[
            "--count",
            "4",
            "--seed",
            "9",
            "--checksum",
            "--field",
            "step=17",
            "--field",
            "note=hello",
        ],
    );
    let from = format!("file://{path}");
    let out = tensorferry(&["recv", "--from", &from, "--verify", "--seed", "9", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["messages"], 4);
    assert_eq!(v["bytes"], 4 * (64 * 33 * 4 + 5));
    assert_eq!(v["verified"], true);
    assert!(v["gbps"].as_f64().is_some() && v["seconds"].as_f64().is_some());
    let x = &v["tensors"][0];
    assert_eq!(
        (&x["name"], &x["dtype"], &x["shape"], &x["device"]),
        (
            &serde_json::json!("x"),
            &serde_json::json!("f32"),
            &serde_json::json!([64, 33]),
            &serde_json::json!("cpu")
        )
    );
    assert_eq!(
        (
            &x["source_device"],
            &x["wire_dtype"],
            &x["checksum_verified"]
        ),
        (
            &serde_json::json!("cpu"),
            &serde_json::json!("f32"),
            &serde_json::json!(true)
        )
    );

    // The wrong seed is caught, by tensor and offset.
    let out = tensorferry(&[
        "recv", "--from", &from, "--verify", "--seed", "8", "--quiet", "--count", "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("message 0 tensor `x`: byte 0 of 8448"),
        "{}",
        stderr(&out)
    );

    // Asking for more messages than the file holds is an error.
    let out = tensorferry(&["recv", "--from", &from, "--count", "5", "--quiet"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("expected 5 messages"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn recv_and_inspect_report_a_flipped_byte_and_a_truncated_file() {
    let path = scratch("flip.tfm");
    send_file(&path, &["--count", "2", "--checksum"]);
    let mut bytes = std::fs::read(&path).expect("read");
    let frame_len = bytes.len() / 2;
    bytes[frame_len - 64 * 3] ^= 0x10; // inside tensor x of message 0
    std::fs::write(&path, &bytes).expect("write");
    let out = tensorferry(&[
        "recv",
        "--from",
        &format!("file://{path}"),
        "--verify",
        "--quiet",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("rejected: message 0") && err.contains("tensor `x`: checksum mismatch"),
        "{err}"
    );
    assert!(
        !err.contains("message 1"),
        "the intact message is delivered: {err}"
    );
    let out = tensorferry(&["inspect", &path]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("MISMATCH"), "{}", stdout(&out));

    let cut = scratch("cut.tfm");
    std::fs::write(&cut, &bytes[..frame_len + 100]).expect("write");
    let out = tensorferry(&["inspect", &cut, "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(
        v["frames"].as_array().map(Vec::len),
        Some(1),
        "the intact frame is shown"
    );
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("frame 1: truncated"),
        "{v}"
    );
    std::fs::write(
        &cut,
        b"garbage that is not a frame at all, longer than a prelude",
    )
    .expect("write");
    let out = tensorferry(&["inspect", &cut]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a tensorferry frame"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn convert_round_trips_through_safetensors() {
    let tfm = scratch("conv.tfm");
    send_file(&tfm, &["--count", "3", "--seed", "4", "--field", "step=2"]);
    let st = scratch("conv.safetensors");
    let out = tensorferry(&["convert", &tfm, &st]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let back = scratch("back.tfm");
    let out = tensorferry(&["convert", &st, &back]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = tensorferry(&[
        "recv",
        "--from",
        &format!("file://{back}"),
        "--verify",
        "--seed",
        "4",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(
        (v["messages"].as_u64(), v["verified"].as_bool()),
        (Some(3), Some(true))
    );
    let out = tensorferry(&["inspect", &back, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["frames"][2]["channel"], "/cam");
    assert_eq!(v["frames"][2]["seq"], 2);
    assert_eq!(v["frames"][2]["fields"]["step"], 2);
    let out = tensorferry(&["convert", &tfm, &scratch("x.npy")]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn send_rejects_bad_options_with_exit_2() {
    let to = format!("file://{}", scratch("never.tfm"));
    for args in [
        vec!["send", "--to", &to, "--tensor", "x=f33:4"],
        vec!["send", "--to", &to, "--tensor", "x=f32:4@tpu:0"],
        vec!["send", "--to", "tcpx://h:1", "--tensor", "x=f32:4"],
        vec!["send", "--to", &to, "--tensor", "x=f32:4", "--rate", "-1"],
        vec!["send", "--to", &to],
    ] {
        let out = tensorferry(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn bench_reports_every_row_beside_its_baseline() {
    let out = tensorferry(&[
        "bench",
        "--transport",
        "inproc,shm,tcp",
        "--sizes",
        "4KiB,64KiB",
        "--duration",
        "0.2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 6);
    for r in rows {
        assert!(r["messages"].as_u64().expect("messages") > 0, "{r}");
        assert!(r["gbps"].as_f64().expect("gbps") > 0.0, "{r}");
        assert!(r["baseline_gbps"].as_f64().expect("baseline") > 0.0, "{r}");
        assert!(
            r["ratio"].as_f64().is_some() && r["p99_us"].as_f64().is_some(),
            "{r}"
        );
        // inproc moves references: a channel of references is its baseline;
        // small shm messages are set beside a raw Unix socket stream.
        let want = match r["transport"].as_str() {
            Some("tcp") => "raw tcp",
            Some("inproc") => "channel",
            _ => "raw unix",
        };
        assert_eq!(r["baseline"], want, "{r}");
    }
    assert!(v["machine"]["cores"].as_u64().expect("cores") >= 1);
    for gpu in ["cuda", "wgpu"] {
        // The devices found, or why there are none.
        let probe = &v["machine"][gpu];
        assert!(
            probe["devices"].is_array()
                && (!probe["devices"].as_array().expect("list").is_empty()
                    || probe["unavailable"].is_string()),
            "{gpu}: {probe}"
        );
    }
    assert_eq!(v["settings"]["dtype"], "f32");
    for bad in [
        ["--sizes", "4XB"],
        ["--transport", "udp"],
        ["--duration", "-1"],
    ] {
        let out = tensorferry(&["bench", bad[0], bad[1]]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}

#[test]
fn bench_reqrep_measures_round_trips_against_a_raw_ping_pong() {
    let out = tensorferry(&[
        "bench",
        "--pattern",
        "reqrep",
        "--transport",
        "shm,tcp",
        "--sizes",
        "4KiB",
        "--duration",
        "0.2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert!(r["messages"].as_u64().expect("requests") > 0, "{r}");
        assert!(r["p50_us"].as_f64().expect("p50") > 0.0, "{r}");
        assert!(
            r["baseline_p50_us"].as_f64().expect("baseline") > 0.0,
            "{r}"
        );
    }
    assert_eq!(rows[0]["baseline"], "raw unix");
    assert_eq!(rows[1]["baseline"], "raw tcp");
    // shm rows also measure the floor of a sleeping hand-off; tcp rows do not.
    assert!(
        rows[0]["futex_floor_p50_us"].as_f64().expect("floor") > 0.0,
        "{}",
        rows[0]
    );
    assert!(rows[1]["futex_floor_p50_us"].is_null(), "{}", rows[1]);
    assert_eq!(v["settings"]["pattern"], "reqrep");
}

#[test]
fn bench_plot_draws_each_transport_and_its_baseline() {
    let svg = scratch("bench.svg");
    let out = tensorferry(&[
        "bench",
        "--transport",
        "inproc,shm,tcp",
        "--sizes",
        "4KiB,1MiB",
        "--duration",
        "0.2",
        "--plot",
        &svg,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = std::fs::read_to_string(&svg).expect("the plot was written");
    assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(80)]);
    for label in [
        "shm baseline: raw unix, memcpy",
        "tcp baseline: raw tcp",
        "GB/s",
        // Ticks at the measured sizes, written as --sizes takes them.
        "\n4KiB\n",
        "\n1MiB\n",
    ] {
        assert!(text.contains(label), "the plot lacks `{label}`");
    }
    // References are not copies: inproc stays off the plot.
    assert!(!text.contains("inproc"), "the plot shows inproc");
    // The table's sizes are what --sizes takes, so a row can be run again.
    let table = stdout(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with("shm") && l.contains("raw unix"))
        .unwrap_or_else(|| panic!("no shm 4KiB row: {table}"));
    let size = row.split_whitespace().nth(1).expect("a size column");
    assert_eq!(size, "4KiB", "{row}");
    let again = tensorferry(&[
        "bench",
        "--transport",
        "shm",
        "--sizes",
        size,
        "--duration",
        "0.05",
        "--json",
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
}

#[test]
fn bench_fans_out_to_several_subscribers_beside_the_same_baseline() {
    let out = tensorferry(&[
        "bench",
        "--transport",
        "inproc,tcp",
        "--sizes",
        "64KiB",
        "--duration",
        "0.1",
        "--subscribers",
        "2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["settings"]["subscribers"], 2);
    assert_eq!(v["settings"]["mode"], "local");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert_eq!(r["subscribers"], 2, "{r}");
        let each = r["subscriber_gbps"].as_array().expect("per subscriber");
        assert_eq!(each.len(), 2, "{r}");
        assert!(each.iter().all(|g| g.as_f64() > Some(0.0)), "{r}");
        let total = r["gbps"].as_f64().expect("aggregate");
        let slowest = r["slowest_subscriber_gbps"].as_f64().expect("slowest");
        assert!(slowest > 0.0 && slowest <= total, "{r}");
        assert!(r["baseline_gbps"].as_f64().expect("baseline") > 0.0, "{r}");
        assert!(r["slowest_subscriber_ratio"].as_f64().is_some(), "{r}");
    }
    assert_eq!(rows[0]["baseline"], "channel");
    assert_eq!(rows[1]["baseline"], "raw tcp");

    let out = tensorferry(&[
        "bench",
        "--transport",
        "inproc",
        "--sizes",
        "4KiB",
        "--duration",
        "0.05",
        "--subscribers",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("3 subscribers (fan-out)"), "{text}");
    assert!(text.contains("channel"), "{text}");
}

#[test]
fn bench_lands_on_a_device_and_reports_the_device_copy_beside_the_transport() {
    // A wgpu adapter (lavapipe in CI) is needed; without one this prints why.
    let have =
        tensorferry::kernels::runtime::Runtime::open(tensorferry::device_map::Device::wgpu(0));
    if let Err(e) = have {
        assert!(
            !tensorferry::kernels::runtime::required("TENSORFERRY_REQUIRE_WGPU"),
            "TENSORFERRY_REQUIRE_WGPU=1 but wgpu:0 cannot be opened: {e}"
        );
        println!("SKIP: wgpu:0: {e}");
        return;
    }
    let out = tensorferry(&[
        "bench",
        "--transport",
        "inproc,tcp",
        "--sizes",
        "64KiB",
        "--dst",
        "wgpu:0",
        "--wire-dtype",
        "bf16",
        "--checksum",
        "--duration",
        "0.2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let s = &v["settings"];
    assert_eq!(
        (&s["src"], &s["dst"], &s["wire_dtype"], &s["checksum"]),
        (
            &serde_json::json!("cpu"),
            &serde_json::json!("wgpu:0"),
            &serde_json::json!("bf16"),
            &serde_json::json!(true)
        )
    );
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for r in rows {
        assert!(r["messages"].as_u64().expect("messages") > 0, "{r}");
        assert_eq!(r["device_baseline"], "upload wgpu:0", "{r}");
        let (base, transport, device) = (
            r["baseline_gbps"].as_f64().expect("baseline"),
            r["transport_baseline_gbps"].as_f64().expect("transport"),
            r["device_baseline_gbps"].as_f64().expect("device"),
        );
        assert!(base > 0.0 && base == transport.min(device), "{r}");
    }
}

#[test]
fn bench_rejects_invalid_fan_out_and_two_host_options() {
    for (args, says) in [
        (
            vec!["--subscribers", "0"],
            "--subscribers must be a whole number from 1 to 64, not `0`",
        ),
        (vec!["--subscribers", "x"], "--subscribers"),
        (
            vec!["--subscribers", "2", "--pattern", "reqrep"],
            "--pattern pubsub",
        ),
        (
            vec!["--subscribers", "1", "--pattern", "reqrep"],
            "drop --subscribers",
        ),
        (
            vec!["--listen", "tcp://127.0.0.1:0", "--to", "tcp://127.0.0.1:9"],
            "cannot be used with",
        ),
        (vec!["--to", "tcp://127.0.0.1:0"], "give the port"),
        (vec!["--to", "shm://x"], "tcp://HOST:PORT"),
        (vec!["--listen", "127.0.0.1:7000"], "tcp://HOST:PORT"),
        (
            vec!["--to", "tcp://127.0.0.1:9", "--transport", "shm"],
            "tcp only",
        ),
        (
            vec!["--to", "tcp://127.0.0.1:9", "--pattern", "reqrep"],
            "--pattern reqrep",
        ),
        (
            vec!["--to", "tcp://127.0.0.1:9", "--subscribers", "2"],
            "one receiving side",
        ),
        (
            vec!["--listen", "tcp://127.0.0.1:0", "--sizes", "4KiB"],
            "the sending side (--to) chooses",
        ),
        (
            vec!["--listen", "tcp://127.0.0.1:0", "--plot", "x.svg"],
            "--plot",
        ),
        (
            vec!["--to", "tcp://127.0.0.1:9", "--dst", "wgpu:0"],
            "one host for now",
        ),
        (
            vec!["--pattern", "reqrep", "--checksum"],
            "--pattern pubsub",
        ),
        (vec!["--wire-dtype", "u8"], "cannot travel as u8"),
        (vec!["--dtype", "i32", "--wire-dtype", "f16"], "i32 tensors"),
        (vec!["--dst", "cuda:77"], "--dst cuda:77"),
        (vec!["--src", "tpu:0"], "--src"),
    ] {
        let out = tensorferry(&[&["bench"], args.as_slice()].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

/// The binary with `args` and the environment changed as `env` says
/// (`None` removes a variable); its output and its process id.
fn tensorferry_env(args: &[&str], env: &[(&str, Option<&str>)]) -> (Output, u32) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tensorferry"));
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (key, value) in env {
        match value {
            Some(v) => cmd.env(key, v),
            None => cmd.env_remove(key),
        };
    }
    let child = cmd.spawn().expect("the tensorferry binary runs");
    let pid = child.id();
    (child.wait_with_output().expect("it ends"), pid)
}

#[test]
fn without_xdg_runtime_dir_no_driver_error_reaches_stderr_and_nothing_is_left() {
    let bench = [
        "bench",
        "--transport",
        "inproc,shm",
        "--sizes",
        "4KiB",
        "--duration",
        "0.05",
    ];
    for args in [&["devices"][..], &["devices", "--json"], &bench] {
        let (out, pid) = tensorferry_env(args, &[("XDG_RUNTIME_DIR", None)]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            !err.lines().any(|l| l.starts_with("error:")) && !err.contains("XDG_RUNTIME_DIR"),
            "{args:?}: {err}"
        );
        let left = std::fs::read_dir(std::env::temp_dir())
            .expect("temp dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| {
                n.strip_prefix(&format!("tensorferry-runtime-{pid}"))
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
            });
        assert_eq!(left, None, "{args:?}: its runtime directory is removed");
    }
}

#[test]
fn host_runs_start_no_gpu_driver() {
    // wgpu logs (through RUST_LOG) whenever something probes its adapters.
    let log = [("RUST_LOG", Some("wgpu_core=trace,wgpu_hal=trace"))];
    let (out, _) = tensorferry_env(&["devices"], &log);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    if !stderr(&out).contains("wgpu_") {
        println!("SKIP: this build's wgpu logs nothing when probed");
        return;
    }
    let path = scratch("host-only.tfm");
    send_file(&path, &["--checksum"]);
    let from = format!("file://{path}");
    let bench = [
        "bench",
        "--transport",
        "inproc,shm",
        "--sizes",
        "4KiB",
        "--duration",
        "0.05",
        "--checksum",
        "--json",
    ];
    for args in [&["recv", "--from", &from, "--verify"][..], &bench] {
        let (out, _) = tensorferry_env(args, &log);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(
            !stderr(&out).contains("wgpu_"),
            "{args:?} probed wgpu: {}",
            stderr(&out)
        );
    }
}

#[test]
fn every_subcommand_takes_verbose_flags_and_help_explains_them() {
    for args in [
        &["-v", "devices"][..],
        &["devices", "-vv"],
        &[
            "--verbose",
            "check-map",
            EXAMPLE,
            "--devices",
            "cpu,cuda:0,cuda:1,cuda:2,cuda:3,wgpu:0",
        ],
        &["-vvv", "inspect", "--help"],
    ] {
        let out = tensorferry(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
    let help = stdout(&tensorferry(&["--help"]));
    assert!(
        help.contains("-v, --verbose") && help.contains("RUST_LOG"),
        "{help}"
    );
    let help = stdout(&tensorferry(&["bench", "--help"]));
    assert!(help.contains("--verbose"), "{help}");
}

/// Runs `args`, which must be refused as bad input: exit 2, every one of
/// `says` on stderr, and no panic or failed allocation on the way there.
fn refused(args: &[&str], says: &[&str]) -> String {
    let out = tensorferry(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation of"),
        "{args:?}: {err}"
    );
    for s in says {
        assert!(err.contains(s), "{args:?} should say `{s}`: {err}");
    }
    err
}

/// This machine's memory in bytes, as the binary reads it.
fn mem_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("MemTotal in kB");
    kib * 1024
}

#[test]
fn send_refuses_tensors_this_machine_cannot_hold_before_allocating_them() {
    let path = scratch("too-large.tfm");
    let to = format!("file://{path}");
    refused(
        &[
            "send",
            "--to",
            &to,
            "--tensor",
            "x=f32:100000x100000x100000",
        ],
        &[
            "--tensor x (f32 of shape 100000x100000x100000)",
            "needs 4000000000000000 bytes",
            "this machine's memory",
            "MemTotal",
        ],
    );
    // Each fits alone; one message holds both.
    let each = format!("{}", mem_total() / 4 * 3);
    let (a, b) = (format!("a=u8:{each}"), format!("b=u8:{each}"));
    refused(
        &["send", "--to", &to, "--tensor", &a, "--tensor", &b],
        &[
            "host tensors a, b",
            &format!("needs {} bytes", mem_total() / 4 * 6),
        ],
    );
    // Counts that overflow 64 bits, even where a zero dimension leaves no element.
    refused(
        &[
            "send",
            "--to",
            &to,
            "--tensor",
            "x=f32:0x99999999999x99999999999",
        ],
        &["its dimensions multiply to more than a 64-bit count holds"],
    );
    refused(
        &["send", "--to", &to, "--tensor", "x=f64:4611686018427387904"],
        &["4611686018427387904 elements of 8 bytes"],
    );
    assert!(
        !std::path::Path::new(&path).exists(),
        "nothing is opened before the sizes are checked"
    );
}

#[test]
fn bench_refuses_sizes_this_machine_cannot_hold_before_allocating_them() {
    refused(
        &["bench", "--sizes", "1000GiB"],
        &[
            "--sizes 1000GiB",
            "2 buffers of 1073741824000 bytes",
            "needs 2147483648000 bytes",
            "MemTotal",
            "give smaller --sizes",
        ],
    );
    // Two buffers fit; a tcp row with three subscribers holds four.
    let half = format!("{}B", mem_total() / 2 / 4 * 4);
    refused(
        &[
            "bench",
            "--transport",
            "tcp",
            "--subscribers",
            "3",
            "--sizes",
            &half,
        ],
        &["the tcp row holds 4 buffers", "each receiving process"],
    );
    refused(
        &[
            "bench",
            "--pattern",
            "reqrep",
            "--transport",
            "shm",
            "--sizes",
            &half,
        ],
        &["holds 3 buffers"],
    );
}

#[test]
fn bench_sizes_take_the_documented_units_exactly() {
    for (size, meant) in [
        ("4kb", "4KiB"),
        ("4KB", "4KiB"),
        ("4Kb", "4KiB"),
        ("4k", "4KiB"),
        ("64MB", "64MiB"),
        ("1gb", "1GiB"),
        ("4 KiB", "4KiB"),
        ("1.5MiB", "1536KiB"),
    ] {
        refused(
            &["bench", "--sizes", size],
            &[
                "--sizes takes",
                "B, KiB, MiB",
                &format!("did you mean {meant}?"),
            ],
        );
    }
    refused(&["bench", "--sizes", "4XB"], &["B, KiB, MiB and GiB"]);
    refused(&["bench", "--sizes", "0"], &["at least 1 byte"]);
    refused(&["bench", "--sizes", "-4KiB"], &["at least 1 byte"]);
    refused(
        &["bench", "--sizes", "4097B"],
        &["whole number of 4-byte elements"],
    );
    let out = tensorferry(&[
        "bench",
        "--transport",
        "inproc",
        "--sizes",
        "4096,8KiB",
        "--duration",
        "0.05",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(
        v["settings"]["sizes_bytes"],
        serde_json::json!([4096, 8192])
    );
}

#[test]
fn negative_zero_and_unbounded_numbers_are_refused_by_name() {
    let to = format!("file://{}", scratch("never-numbers.tfm"));
    let send = ["send", "--to", to.as_str(), "--tensor", "x=f32:4"];
    let recv = ["recv", "--listen", "tcp://127.0.0.1:0"];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            [&send[..], &["--count", "-1"]].concat(),
            "--count must be a whole number ≥ 1, not `-1`",
        ),
        ([&send[..], &["--count", "0"]].concat(), "--count must be"),
        ([&send[..], &["--count", "1.5"]].concat(), "not `1.5`"),
        (
            [&send[..], &["--count", "--json"]].concat(),
            "was the value left out?",
        ),
        ([&send[..], &["--seed", "-3"]].concat(), "--seed must be"),
        (
            [&send[..], &["--subscribers", "-1"]].concat(),
            "--subscribers must be a whole number ≥ 1",
        ),
        ([&send[..], &["--wait", "-1"]].concat(), "--wait must be"),
        ([&send[..], &["--wait", "1e30"]].concat(), "at most 604800"),
        ([&send[..], &["--rate", "-3"]].concat(), "--rate must be"),
        ([&send[..], &["--rate", "1e-30"]].concat(), "one a week"),
        (
            [&recv[..], &["--count", "-1"]].concat(),
            "--count must be a whole number ≥ 1, not `-1`",
        ),
        ([&recv[..], &["--seed", "-1"]].concat(), "--seed must be"),
        (
            [&recv[..], &["--idle-timeout", "NaN"]].concat(),
            "--idle-timeout must be a number of seconds above 0",
        ),
        (
            vec!["bench", "--subscribers", "-1"],
            "--subscribers must be a whole number from 1 to 64, not `-1`",
        ),
        (
            vec!["bench", "--duration", "-1"],
            "--duration must be a number of seconds above 0 and at most 604800",
        ),
        (vec!["bench", "--duration", "0"], "not `0`"),
        (vec!["bench", "--duration", "nan"], "not `nan`"),
        (vec!["bench", "--duration", "-inf"], "not `-inf`"),
        (vec!["bench", "--duration", "1e30"], "not `1e30`"),
        (vec!["bench", "--duration", "2s"], "write 2, without a unit"),
        (
            vec!["bench", "--busy-poll-us", "-5"],
            "--busy-poll-us must be a whole number from 0 to 1000000, not `-5`",
        ),
        (vec!["bench", "--busy-poll-us", "1.5"], "not `1.5`"),
        (vec!["bench", "--busy-poll-us", "2000000"], "not `2000000`"),
    ];
    for (args, says) in cases {
        refused(&args, &[says]);
    }
}

#[test]
fn inproc_is_refused_where_another_process_must_connect() {
    for args in [
        &["recv", "--listen", "inproc://x", "--idle-timeout", "5"][..],
        &["recv", "--from", "inproc://x", "--idle-timeout", "5"],
        &["send", "--to", "inproc://x", "--tensor", "x=f32:4"],
        &[
            "send",
            "--listen",
            "inproc://x",
            "--tensor",
            "x=f32:4",
            "--wait",
            "5",
        ],
    ] {
        refused(
            args,
            &[
                "inproc://x",
                "no other process can reach it",
                "shm://NAME",
                "tcp://HOST:PORT",
            ],
        );
    }
    refused(&["bench", "--to", "inproc://x"], &["tcp://HOST:PORT"]);
}
