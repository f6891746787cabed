//! What the end-to-end tests share: running the `tensorferry` binary as a
//! user does, and reading what it prints.

#![allow(dead_code)] // each test file uses its own part of this

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};

use tensorferry::device_map::Device;
use tensorferry::kernels::runtime::{required, Runtime};

pub mod procfs;

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

/// A small deterministic generator (xorshift64*), so a run can be repeated
/// from its printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A seed for this run: `TENSORFERRY_TEST_SEED` when set, else the clock.
pub fn run_seed() -> u64 {
    std::env::var("TENSORFERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// True when the long versions of the fault and load tests were asked for
/// (`TENSORFERRY_LONG=1`).
pub fn long() -> bool {
    std::env::var("TENSORFERRY_LONG").is_ok_and(|v| v == "1")
}

/// A child process killed (SIGKILL) and reaped when dropped, so a test that
/// fails leaves no process behind.
#[derive(Debug)]
pub struct Reaped(Option<Child>);

impl Reaped {
    /// Watches `child`.
    pub fn new(child: Child) -> Self {
        Reaped(Some(child))
    }

    /// The child, no longer killed when dropped.
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("held until dropped")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("held until dropped")
    }
}
