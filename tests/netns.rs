//! Two hosts in network namespaces: `tensorferry recv` in one, `tensorferry
//! send` in the other, joined through a third namespace where a packet
//! forwarder bridges their links — first clean, then delaying every frame
//! 10 ms and dropping 1% of them, so the kernels' own TCP retransmits. Every
//! byte is verified (`recv --verify`) and the throughput of both runs is
//! reported (docs/reliability.md).
//!
//! The forwarder is this test binary run again in the middle namespace: it
//! reads whole Ethernet frames from one veth with an `AF_PACKET` socket and
//! writes them to the other after the delay, at the packet level (a stream
//! relay could not lose packets). The links send one segment per frame
//! (`gso_max_segs 1`), so frames are at most the MTU; the forwarder sets
//! each TCP checksum, which the sending veth leaves to offload.
//!
//! Needs root, `ip` and network namespaces; skipped with the reason
//! otherwise. Namespaces and links are removed afterwards, also when the
//! test fails. `TENSORFERRY_LONG=1` moves 16 times more bytes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::{finish, long, Reaped, Rng};

const FORWARDER_ENV: &str = "TENSORFERRY_TEST_FORWARDER";

// ---------------------------------------------------------------------------
// The namespaces.

/// Runs `ip ARGS`; the error says what failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Three namespaces — sender, forwarder, receiver — and the two veth pairs
/// between them; all removed when dropped.
struct Hosts {
    sender: String,
    middle: String,
    receiver: String,
    /// The forwarder's ends of the two links.
    links: [String; 2],
    receiver_ip: &'static str,
}

impl Hosts {
    /// Why not, when this machine cannot make them.
    fn make() -> Result<Hosts, String> {
        // SAFETY: geteuid takes no arguments, cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        // Unique per set of hosts: tests of one process make theirs at once.
        static MADE: AtomicU64 = AtomicU64::new(0);
        let tag = (std::process::id() % 100_000) * 10
            + (MADE.fetch_add(1, Ordering::Relaxed) % 10) as u32;
        let hosts = Hosts {
            sender: format!("tf{tag}s"),
            middle: format!("tf{tag}m"),
            receiver: format!("tf{tag}r"),
            links: [format!("tf{tag}sm"), format!("tf{tag}rm")],
            receiver_ip: "10.77.0.2",
        };
        ip(&["netns", "add", &hosts.sender])?;
        // From here on, what exists is removed on drop, also on error.
        ip(&["netns", "add", &hosts.middle])?;
        ip(&["netns", "add", &hosts.receiver])?;
        let (s, m, r) = (&hosts.sender, &hosts.middle, &hosts.receiver);
        let [sm, rm] = &hosts.links;
        let (s_end, r_end) = (format!("tf{tag}s0"), format!("tf{tag}r0"));
        for (ns, end, peer) in [(s, &s_end, sm), (r, &r_end, rm)] {
            ip(&[
                "link", "add", end, "netns", ns, "type", "veth", "peer", "name", peer, "netns", m,
            ])?;
        }
        for (ns, dev, addr) in [
            (s, &s_end, Some("10.77.0.1/24")),
            (r, &r_end, Some("10.77.0.2/24")),
            (m, sm, None),
            (m, rm, None),
        ] {
            if let Some(addr) = addr {
                ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            }
            // One TCP segment per frame: what the forwarder reads is a
            // packet, never a 64 KiB offload batch.
            ip(&["-n", ns, "link", "set", dev, "gso_max_segs", "1", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// `ip netns exec NS PROGRAM`.
    fn exec(&self, ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Removing a namespace removes the links in it (and their peers).
        for ns in [&self.sender, &self.middle, &self.receiver] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

// ---------------------------------------------------------------------------
// The forwarder.

/// An `AF_PACKET` socket that reads and writes whole Ethernet frames on
/// interface `name`, not the frames it sends itself.
fn packet_socket(name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain system calls on integers and on structs we own; the
    // descriptor is owned once it is checked.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let cname = std::ffi::CString::new(name).expect("name");
        let index = libc::if_nametoindex(cname.as_ptr());
        assert!(index > 0, "no interface {name}");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        let r = libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(r, 0, "bind to {name}: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        let r = libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        assert_eq!(
            r,
            0,
            "PACKET_IGNORE_OUTGOING: {}",
            std::io::Error::last_os_error()
        );
        fd
    }
}

/// Sets the TCP checksum of an Ethernet frame carrying IPv4 and TCP (the
/// sending veth leaves it to an offload that a frame read from a packet
/// socket never gets).
fn set_tcp_checksum(frame: &mut [u8]) {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let start = 14 + ihl;
    let end = 14 + total;
    if end > frame.len() || start + 20 > end {
        return;
    }
    frame[start + 16] = 0;
    frame[start + 17] = 0;
    // The ones' complement sum of 16-bit words, taken 32 bits at a time
    // (carries fold back in at the end): four times fewer steps, which
    // matters in an unoptimized test build forwarding every frame.
    let mut sum: u64 = u64::from(u32::from_be_bytes([
        frame[26], frame[27], frame[28], frame[29],
    ])) + u64::from(u32::from_be_bytes([
        frame[30], frame[31], frame[32], frame[33],
    ])) + 6
        + (end - start) as u64;
    let segment = &frame[start..end];
    let mut words = segment.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum += u64::from(u32::from_be_bytes(tail));
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = !(sum as u16);
    frame[start + 16..start + 18].copy_from_slice(&sum.to_be_bytes());
}

/// What one direction of the forwarder did.
#[derive(Default)]
struct Counts {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    largest: AtomicU64,
}

/// Forwards frames from `from` to `to`, each `delay` later, dropping each
/// with probability `loss_ppm` / 1,000,000.
fn forward(from: &str, to: &str, delay: Duration, loss_ppm: u64, seed: u64, counts: Arc<Counts>) {
    use std::os::fd::AsRawFd;
    let (rx, tx) = (packet_socket(from), packet_socket(to));
    let (queue, due) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let out = Arc::clone(&counts);
    std::thread::spawn(move || {
        for (at, mut frame) in due {
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            set_tcp_checksum(&mut frame);
            // SAFETY: writes `frame`'s initialized bytes to our socket.
            let n = unsafe { libc::send(tx.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n == frame.len() as isize {
                out.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let frame = buf[..n as usize].to_vec();
        counts.largest.fetch_max(n as u64, Ordering::Relaxed);
        if rng.below(1_000_000) < loss_ppm {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if queue.send((Instant::now() + delay, frame)).is_err() {
            return;
        }
    }
}

/// Not a test on its own: the forwarder of the netns test, run in the
/// middle namespace. `TENSORFERRY_TEST_FORWARDER` is `A,B,DELAY_MS,LOSS_PPM`;
/// it bridges interfaces A and B both ways until stdin closes, then prints
/// what it did as one JSON line.
#[test]
#[ignore = "run as a child process by the netns test"]
fn forwarder_process() {
    let Ok(spec) = std::env::var(FORWARDER_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split(',').collect();
    let (a, b) = (parts[0].to_string(), parts[1].to_string());
    let delay = Duration::from_millis(parts[2].parse().expect("delay"));
    let loss: u64 = parts[3].parse().expect("loss");
    let (ab, ba) = (Arc::new(Counts::default()), Arc::new(Counts::default()));
    for (from, to, counts, seed) in [(a.clone(), b.clone(), &ab, 1), (b, a, &ba, 2)] {
        let counts = Arc::clone(counts);
        std::thread::spawn(move || forward(&from, &to, delay, loss, seed, counts));
    }
    println!("forwarding");
    let _ = std::io::stdin().lines().count();
    let get = |c: &Counts| {
        serde_json::json!({
            "forwarded": c.forwarded.load(Ordering::Relaxed),
            "dropped": c.dropped.load(Ordering::Relaxed),
            "largest_frame": c.largest.load(Ordering::Relaxed),
        })
    };
    println!(
        "{}",
        serde_json::json!({"to_receiver": get(&ab), "to_sender": get(&ba)})
    );
    std::process::exit(0);
}

// ---------------------------------------------------------------------------
// The runs.

/// The forwarder between the two hosts, delaying by `delay_ms` and
/// dropping `loss_ppm` per million frames, once it forwards; and the lines
/// it prints after.
fn start_forwarder(
    hosts: &Hosts,
    delay_ms: u64,
    loss_ppm: u64,
) -> (Reaped, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let me = std::env::current_exe().expect("test binary");
    let mut forwarder = Reaped::new(
        hosts
            .exec(&hosts.middle, me.to_str().expect("utf-8 path"))
            .args(["--exact", "forwarder_process", "--ignored", "--nocapture"])
            .env(
                FORWARDER_ENV,
                format!(
                    "{},{},{delay_ms},{loss_ppm}",
                    hosts.links[0], hosts.links[1]
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the forwarder"),
    );
    let mut lines = BufReader::new(forwarder.stdout.take().expect("stdout")).lines();
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l == "forwarding"),
        "the forwarder did not start"
    );
    (forwarder, lines)
}

/// One transfer of `count` messages of `bytes` through the forwarder set to
/// `delay_ms` and `loss_ppm`: the receiver's summary and the forwarder's.
fn transfer(
    hosts: &Hosts,
    port: u16,
    bytes: usize,
    count: u64,
    delay_ms: u64,
    loss_ppm: u64,
) -> (serde_json::Value, serde_json::Value) {
    let (mut forwarder, lines) = start_forwarder(hosts, delay_ms, loss_ppm);
    let bin = env!("CARGO_BIN_EXE_tensorferry");
    let listen = format!("tcp://{}:{port}", hosts.receiver_ip);
    let recv = Reaped::new(
        hosts
            .exec(&hosts.receiver, bin)
            .args(["recv", "--listen", &listen, "--verify", "--seed", "11"])
            .args([
                "--count",
                &count.to_string(),
                "--json",
                "--idle-timeout",
                "60",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn recv"),
    );
    let sent = hosts
        .exec(&hosts.sender, bin)
        .args(["send", "--to", &listen, "--wait", "60", "--seed", "11"])
        .args([
            "--tensor",
            &format!("x=u8:{bytes}"),
            "--count",
            &count.to_string(),
        ])
        .output()
        .expect("send");
    assert!(
        sent.status.success(),
        "send: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let (out, summary) = finish(recv.into_inner());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{summary} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(forwarder.stdin.take());
    let stats = lines
        .map_while(Result::ok)
        .find_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .expect("the forwarder's figures");
    (summary, stats)
}

#[test]
fn send_and_recv_in_two_namespaces_verify_every_byte_clean_and_through_a_lossy_link() {
    let hosts = match Hosts::make() {
        Ok(h) => h,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    let mib = 1 << 20;
    let (clean_count, lossy_count) = if long() { (256, 64) } else { (32, 4) };
    let mut figures = Vec::new();
    for (label, count, delay_ms, loss_ppm, port) in [
        ("clean", clean_count, 0, 0, 7071),
        ("10 ms delay, 1% loss", lossy_count, 10, 10_000, 7072),
    ] {
        let start = Instant::now();
        let (summary, fwd) = transfer(&hosts, port, mib, count, delay_ms, loss_ppm);
        let wall = start.elapsed();
        assert_eq!(summary["messages"], count, "{summary}");
        assert_eq!(summary["bytes"], count * mib as u64, "{summary}");
        assert_eq!(summary["verified"], true, "{summary}");
        // Frames, not offload batches: the loss is per packet.
        for dir in ["to_receiver", "to_sender"] {
            let largest = fwd[dir]["largest_frame"].as_u64().expect("largest");
            assert!(largest <= 1514, "{dir}: a frame of {largest} bytes: {fwd}");
        }
        if loss_ppm > 0 {
            let dropped = fwd["to_receiver"]["dropped"].as_u64().expect("dropped");
            assert!(dropped > 0, "nothing was dropped: {fwd}");
        }
        let mbps = summary["bytes"].as_f64().expect("bytes")
            / summary["seconds"].as_f64().expect("seconds")
            / 1e6;
        println!(
            "{label}: {count} MiB in {:.2} s (recv: {mbps:.1} MB/s, {} s wall); forwarder {fwd}",
            summary["seconds"],
            wall.as_secs_f64()
        );
        figures.push((label, mbps));
    }
    println!(
        "throughput clean / lossy: {:.1} / {:.1} MB/s",
        figures[0].1, figures[1].1
    );
    drop(hosts);
}

#[test]
fn a_store_served_on_one_host_is_written_and_read_from_the_other() {
    let hosts = match Hosts::make() {
        Ok(h) => h,
        Err(why) => {
            println!("SKIP: {why}");
            return;
        }
    };
    let (_forwarder, _lines) = start_forwarder(&hosts, 0, 0);
    let bin = env!("CARGO_BIN_EXE_tensorferry");
    let dir = std::env::temp_dir().join(format!("tensorferry-netns-store-{}", std::process::id()));
    let store = format!("tcp://{}:7073", hosts.receiver_ip);
    let mut server = Reaped::new(
        hosts
            .exec(&hosts.receiver, bin)
            .args(["store", "serve", "--listen", &store, "--dir"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn store serve"),
    );
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the server's first line");
    assert!(line.contains(&store), "{line}");
    let run = |args: &[&str]| {
        let out = hosts
            .exec(&hosts.sender, bin)
            .args(args)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON")
    };
    let proxy = run(&[
        "store",
        "put",
        "--store",
        &store,
        "--key",
        "layer-3",
        "--tensor",
        "w=f32:512x1024",
        "--json",
    ]);
    let got = run(&["store", "get", "--store", &store, "layer-3", "--json"]);
    assert_eq!(got["valid"], true, "{got}");
    assert_eq!(
        got["tensors"][0]["checksum"],
        proxy["tensors"][0]["checksum"]
    );
    assert_eq!(got["bytes"], 512 * 1024 * 4);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_frame_read_from_a_packet_socket_gets_its_tcp_checksum() {
    // An IPv4/TCP frame whose checksum a sender left to offload: the
    // forwarder's checksum must be the one the receiver computes (the sum
    // over the pseudo-header and segment, checksum included, is 0xffff).
    let mut frame = vec![0u8; 14 + 20 + 20 + 7];
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    frame[14] = 0x45;
    frame[16..18].copy_from_slice(&((20 + 20 + 7) as u16).to_be_bytes());
    frame[23] = 6;
    frame[26..30].copy_from_slice(&[10, 77, 0, 1]);
    frame[30..34].copy_from_slice(&[10, 77, 0, 2]);
    let mut rng = Rng::new(3);
    for b in &mut frame[34..] {
        *b = rng.below(256) as u8;
    }
    set_tcp_checksum(&mut frame);
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += (u32::from(pair[0]) << 8) | pair.get(1).map_or(0, |&b| u32::from(b));
        }
    };
    add(&frame[26..34]);
    add(&[0, 6, 0, 27]);
    add(&frame[34..]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff);
    let _ = std::io::stdout().flush();
}
