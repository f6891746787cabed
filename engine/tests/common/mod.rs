//! What the engine's tests of misbehaving peers share: frames made by hand,
//! this process's memory, waiting for a condition, and telling whether a
//! receiver closed a raw connection.

#![allow(dead_code)] // each test file uses its own part of this

use std::io::Read;
use std::time::{Duration, Instant};

/// A valid prelude announcing a frame of `len` bytes whose header is the 2
/// bytes `{}`, and that header; nothing of the rest follows.
pub fn announce(len: u64) -> Vec<u8> {
    let mut prelude = Vec::new();
    prelude.extend_from_slice(b"TFRM");
    prelude.extend_from_slice(&1u16.to_le_bytes());
    prelude.extend_from_slice(&0u16.to_le_bytes());
    prelude.extend_from_slice(&2u32.to_le_bytes());
    prelude.extend_from_slice(&0u32.to_le_bytes());
    prelude.extend_from_slice(&len.to_le_bytes());
    prelude.extend_from_slice(&0u64.to_le_bytes());
    prelude.extend_from_slice(b"{}");
    prelude
}

/// A node named "sender" connected to `addr`, and its publisher on
/// `/data` once the node there subscribes.
pub fn publisher_to(addr: &str) -> (tensorferry_engine::Node, tensorferry_engine::Publisher) {
    let sender = tensorferry_engine::Node::builder()
        .name("sender")
        .build()
        .expect("sender");
    sender.connect(addr).expect("connect");
    let publisher = sender.publisher("/data");
    publisher
        .wait_for_subscribers(1, Duration::from_secs(20))
        .expect("subscriber");
    (sender, publisher)
}

/// This process's resident memory, in bytes.
pub fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Waits until `f` holds, for at most `wait`; panics saying `what` otherwise.
pub fn wait_until(what: &str, wait: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + wait;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A socket whose reads can time out.
pub trait Timed {
    /// Sets the read timeout.
    fn read_timeout(&self, wait: Duration);
    /// Reads what is there, waiting at most the read timeout.
    fn read_some(&self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl Timed for std::net::TcpStream {
    fn read_timeout(&self, wait: Duration) {
        self.set_read_timeout(Some(wait)).ok();
    }
    fn read_some(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&mut &*self).read(buf)
    }
}

impl Timed for std::os::unix::net::UnixStream {
    fn read_timeout(&self, wait: Duration) {
        self.set_read_timeout(Some(wait)).ok();
    }
    fn read_some(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&mut &*self).read(buf)
    }
}

/// Whether the other end closes `stream` within `wait` (a read sees the end
/// or a reset). What it sends first (its subscriptions, wake-ups) is read
/// past.
pub fn closed_by_peer(stream: &impl Timed, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut b = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.read_timeout(left);
        match stream.read_some(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}
