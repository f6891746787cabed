//! What the end-to-end tests share: running the `tensorferry` binary as a
//! user does, and reading what it prints.

#![allow(dead_code)] // each test file uses its own part of this

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};

use tensorferry::device_map::Device;
use tensorferry::kernels::runtime::{required, Runtime};

/// The `tensorferry` binary built for these tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tensorferry"))
}

/// Runs `tensorferry ARGS` to the end.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run tensorferry")
}

/// Starts a `tensorferry` process that prints `listening on ADDR` on
/// stderr (after any other lines); returns it and ADDR.
pub fn spawn_listening(args: &[&str]) -> (Child, String) {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tensorferry");
    let addr = listening_addr(child.stderr.take().expect("stderr"));
    (child, addr)
}

/// ADDR from the first `listening on ADDR` line of a child's output; the
/// rest is drained in the background so the child never blocks on a full
/// pipe or writes into a closed one.
pub fn listening_addr(output: impl Read + Send + 'static) -> String {
    let mut lines = BufReader::new(output).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("listening on ").map(str::to_string))
        .expect("the process prints the address it listens on");
    std::thread::spawn(move || for _ in lines {});
    addr
}

/// Waits for `child` and reads the one JSON object it printed on stdout.
pub fn finish(child: Child) -> (Output, serde_json::Value) {
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (out, json)
}

/// The process exited 0 (its stderr is shown otherwise).
pub fn assert_ok(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True when wgpu:0 opens here; prints why not, or panics when
/// `TENSORFERRY_REQUIRE_WGPU=1` says it must.
pub fn have_wgpu() -> bool {
    match Runtime::open(Device::wgpu(0)) {
        Ok(_) => true,
        Err(e) if required("TENSORFERRY_REQUIRE_WGPU") => {
            panic!("TENSORFERRY_REQUIRE_WGPU=1 but wgpu:0 cannot be opened: {e}")
        }
        Err(e) => {
            println!("SKIP: wgpu:0: {e}");
            false
        }
    }
}
