//! What a process holds, read from `/proc`: descriptors, threads, shared
//! memory and resident memory, so a test can tell whether a process that
//! outlived its peers kept anything of theirs.

use std::fmt;

/// What one process holds at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holdings {
    /// Open file descriptors (`/proc/PID/fd`).
    pub fds: usize,
    /// Threads (`/proc/PID/task`).
    pub threads: usize,
    /// Descriptors of anonymous shared memory (links to `/memfd:…`).
    pub memfds: usize,
    /// Mappings of anonymous shared memory (`/memfd:` lines of `/proc/PID/maps`).
    pub memfd_maps: usize,
    /// Resident memory in bytes (`VmRSS`).
    pub rss: u64,
}

impl fmt::Display for Holdings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} fds, {} threads, {} memfds, {} memfd mappings, {} MiB resident",
            self.fds,
            self.threads,
            self.memfds,
            self.memfd_maps,
            self.rss >> 20
        )
    }
}

/// What process `pid` holds now.
pub fn holdings(pid: u32) -> Holdings {
    let dir = format!("/proc/{pid}");
    let links: Vec<String> = std::fs::read_dir(format!("{dir}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let threads = std::fs::read_dir(format!("{dir}/task"))
        .expect("/proc/PID/task")
        .count();
    let maps = std::fs::read_to_string(format!("{dir}/maps")).unwrap_or_default();
    Holdings {
        fds: links.len(),
        threads,
        memfds: links.iter().filter(|l| l.starts_with("/memfd:")).count(),
        memfd_maps: maps.lines().filter(|l| l.contains("/memfd:")).count(),
        rss: rss(pid),
    }
}

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// A size line of `/proc/PID/status` (`VmRSS`, `RssAnon`: private memory,
/// `RssShmem`: shared memory the process has touched), in bytes.
pub fn status_bytes(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// One TCP socket of this network namespace (`/proc/net/tcp` and `tcp6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// State code (1: established, 10: listening).
    pub state: u8,
    /// Bytes written and not yet taken by the peer.
    pub tx_queue: u64,
    /// Bytes received and not yet read by the owner.
    pub rx_queue: u64,
}

/// Every TCP socket of this network namespace.
pub fn tcp_sockets() -> Vec<TcpSocket> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 5 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            let (tx, rx) = cols[4].split_once(':').unwrap_or(("0", "0"));
            out.push(TcpSocket {
                local_port: port(cols[1]),
                remote_port: port(cols[2]),
                state: u8::from_str_radix(cols[3], 16).unwrap_or(0),
                tx_queue: u64::from_str_radix(tx, 16).unwrap_or(0),
                rx_queue: u64::from_str_radix(rx, 16).unwrap_or(0),
            });
        }
    }
    out
}

/// The port of a `tcp://HOST:PORT` address.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}
