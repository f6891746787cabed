//! A well-behaved peer's throughput, alone and then while the same
//! receiver holds thousands of idle connections, peers that spray garbage
//! and reconnect, peers that announce gigabyte frames and stall, and peers
//! that trickle: the receiver stays up, its resident memory stays within
//! what the idle connections are documented to cost, and the well-behaved
//! peer keeps most of its throughput (the same-run ratio is printed; the
//! assertion only catches starvation).
//!
//! One test in its own binary: it reads this process's resident memory and
//! raises its open-files limit.

mod common;

use common::{announce, rss};

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tensorferry_engine::{pattern, DType, Message, Node, Publisher, Subscription};

const WAIT: Duration = Duration::from_secs(30);
/// Idle connections, when the open-files limit allows (two descriptors each).
const IDLE: usize = 3000;
const MESSAGES: u64 = 200;
const BYTES: usize = 1 << 20;

/// Raises the open-files limit as far as allowed; how many it is now.
fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(got, 0);
    limit.rlim_cur = limit.rlim_max.min(65_536);
    // SAFETY: setrlimit reads the struct; raising the soft limit up to the
    // hard one needs no privilege.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(set, 0);
    limit.rlim_cur
}

/// Sends `MESSAGES` messages and takes them, every byte checked; bytes per
/// second.
fn run(publisher: &Publisher, sub: &Subscription, seed: u64) -> f64 {
    let tensors: Vec<_> = (0..4u64)
        .map(|i| pattern::tensor(DType::U8, &[BYTES], seed, i, "x").expect("tensor"))
        .collect();
    let expected: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.packed().expect("host").as_slice().to_vec())
        .collect();
    let start = Instant::now();
    thread::scope(|s| {
        s.spawn(|| {
            for seq in 0..MESSAGES {
                let t = tensors[(seq % 4) as usize].clone();
                publisher.send(Message::new().tensor("x", t)).expect("send");
            }
        });
        for seq in 0..MESSAGES {
            let got = sub.recv_timeout(WAIT).expect("message");
            let bytes = got.message.get("x").expect("x").packed().expect("host");
            assert!(
                bytes.as_slice() == expected[(seq % 4) as usize].as_slice(),
                "message {seq} arrived with other bytes"
            );
        }
    });
    (MESSAGES as usize * BYTES) as f64 / start.elapsed().as_secs_f64()
}

#[test]
fn a_well_behaved_peer_is_served_while_others_attack() {
    let files = raise_open_files();
    let idle_count = IDLE.min((files.saturating_sub(256) / 2) as usize);
    let receiver = Node::builder()
        .name("receiver")
        .listen("tcp://127.0.0.1:0")
        .progress_timeout(Duration::from_secs(1))
        .build()
        .expect("receiver");
    let addr = receiver.listen_addrs()[0].to_string();
    let host = addr.trim_start_matches("tcp://").to_string();
    let sub = receiver.subscriber("/data");
    let (_sender, publisher) = common::publisher_to(&addr);

    // Warm up, then the baseline, alone.
    run(&publisher, &sub, 1);
    let alone = run(&publisher, &sub, 2);
    let before = rss();

    // Thousands of idle connections.
    let idle: Vec<TcpStream> = (0..idle_count)
        .map(|_| TcpStream::connect(&host).expect("an idle connection"))
        .collect();
    let deadline = Instant::now() + WAIT;
    while receiver.peer_count() < idle_count + 1 {
        assert!(
            Instant::now() < deadline,
            "the idle connections were not taken in"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let attacking = Arc::new(AtomicBool::new(true));
    let garbage_sent = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    // Two peers that spray garbage and reconnect, over and over.
    for _ in 0..2 {
        let (attacking, sent) = (Arc::clone(&attacking), Arc::clone(&garbage_sent));
        let host = host.clone();
        attackers.push(thread::spawn(move || {
            let junk: Vec<u8> = (0..4096u32)
                .map(|i| i.wrapping_mul(2_654_435_761) as u8)
                .collect();
            while attacking.load(Ordering::Relaxed) {
                if let Ok(mut s) = TcpStream::connect(&host) {
                    let _ = s.write_all(&junk);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    // Eight peers that announce 1 GiB and stall, again each time they are dropped.
    for _ in 0..8 {
        let attacking = Arc::clone(&attacking);
        let host = host.clone();
        attackers.push(thread::spawn(move || {
            while attacking.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(&host) else {
                    continue;
                };
                let _ = s.write_all(&announce(1 << 30));
                // Held until the receiver drops it (about a second).
                s.set_read_timeout(Some(Duration::from_millis(100))).ok();
                let mut b = [0u8; 512];
                while attacking.load(Ordering::Relaxed) {
                    match std::io::Read::read(&mut s, &mut b) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
            }
        }));
    }

    let attacked = run(&publisher, &sub, 3);
    let after = rss();
    attacking.store(false, Ordering::Relaxed);
    for a in attackers {
        a.join().expect("attacker");
    }
    let stats = receiver.stats();
    let grown = after.saturating_sub(before);
    let ratio = attacked / alone;
    println!(
        "well-behaved tcp 1 MiB pub/sub: {:.2} GB/s alone, {:.2} GB/s under attack ({ratio:.2}x) \
         with {idle_count} idle connections, {} garbage connections and 8 stalling peers; \
         {} connections refused; resident memory grew by {} MiB ({} KiB per idle connection)",
        alone / 1e9,
        attacked / 1e9,
        garbage_sent.load(Ordering::Relaxed),
        stats.rejected,
        grown >> 20,
        grown / 1024 / idle_count.max(1) as u64,
    );
    assert!(stats.rejected >= 2, "attackers were refused: {stats:?}");
    // Starvation, not speed: the well-behaved peer must not be shut out.
    assert!(ratio > 0.25, "throughput under attack fell to {ratio:.2}x");
    // Each idle connection costs its read-ahead buffer at most
    // (docs/reliability.md), besides the frames in flight.
    let bound = idle_count as u64 * (80 << 10) + (256 << 20);
    assert!(
        grown < bound,
        "resident memory grew by {grown} bytes (bound {bound})"
    );
    drop(idle);
}
