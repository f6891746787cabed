//! Hostile `shm://` peers, made by hand from the documented protocol
//! (docs/wire-format.md, `shm://` connections): garbage in the ring, a ring
//! that claims more than it holds, an unsealed ring, an unknown byte on the
//! socket, a huge announced frame, a frame stopped half-way or trickled, a
//! peer that dies mid-frame. Each costs its own connection only; the
//! receiving process stays up and a well-behaved shm peer is served
//! meanwhile, every byte intact.

mod common;

use common::{announce, rss, wait_until};

use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tensorferry_engine::wire::{encode, EncodeOptions, FrameMeta};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use tensorferry_engine::{pattern, DType, Message, Node};

const WAIT: Duration = Duration::from_secs(20);
const HEADER: usize = 4096;
const RING: usize = 1 << 20;

/// A peer that speaks the shm handshake itself and then writes whatever
/// it is told into its ring.
struct RawPeer {
    socket: UnixStream,
    map: memmap2::MmapMut,
    head: u64,
}

impl RawPeer {
    /// Connects to `shm://name` and sends a ring: sealed as the protocol
    /// asks unless `sealed` is false.
    fn connect(name: &str, sealed: bool) -> RawPeer {
        let addr = SocketAddr::from_abstract_name(format!("tensorferry/{name}").as_bytes())
            .expect("address");
        let socket = UnixStream::connect_addr(&addr).expect("connect");
        let fd = memfd_create(
            c"hostile-ring",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .expect("memfd");
        let file = File::from(fd);
        file.set_len((HEADER + RING) as u64).expect("size");
        if sealed {
            fcntl(
                &file,
                FcntlArg::F_ADD_SEALS(
                    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
                ),
            )
            .expect("seal");
        }
        // SAFETY: this test's own memfd, sized above and kept open by the map.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.expect("map");
        let fds = [file.as_raw_fd()];
        sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &[IoSlice::new(b"P")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("send the ring");
        RawPeer {
            socket,
            map,
            head: 0,
        }
    }

    fn head_word(&self) -> &AtomicU64 {
        // SAFETY: offset 0 of a page-aligned mapping, 8-aligned; the
        // receiver reads it as an atomic too.
        unsafe { &*(self.map.as_ptr().cast::<AtomicU64>()) }
    }

    /// Copies `bytes` into the ring (the receiver must have room for them)
    /// without publishing.
    fn put(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let at = HEADER + ((self.head as usize + i) % RING);
            self.map[at] = *b;
        }
        self.head += bytes.len() as u64;
    }

    /// Publishes what was put and wakes the receiver's I/O thread.
    fn publish(&mut self) {
        self.head_word().store(self.head, Ordering::Release);
        let _ = self.socket.write_all(b"D");
    }

    /// Claims `head` without writing anything.
    fn claim(&mut self, head: u64) {
        self.head = head;
        self.publish();
    }

    /// Whether the receiver has closed this peer's socket.
    fn closed_by_receiver(&self, wait: Duration) -> bool {
        common::closed_by_peer(&self.socket, wait)
    }
}

/// A well-behaved shm publisher's messages reach `sub`, every byte intact.
fn served(name: &str, sub: &tensorferry_engine::Subscription, seed: u64) {
    let sender = Node::builder().name("good").build().expect("sender");
    sender.connect(&format!("shm://{name}")).expect("connect");
    let publisher = sender.publisher("/data");
    publisher.wait_for_subscribers(1, WAIT).expect("subscriber");
    for seq in 0..8u64 {
        let t = pattern::tensor(DType::U8, &[256 << 10], seed, seq, "x").expect("tensor");
        publisher.send(Message::new().tensor("x", t)).expect("send");
    }
    for seq in 0..8u64 {
        let got = sub.recv_timeout(WAIT).expect("message");
        assert_eq!(got.seq, seq);
        let bytes = got.message.get("x").expect("x").packed().expect("host");
        assert_eq!(
            pattern::first_mismatch(DType::U8, seed, seq, "x", bytes.as_slice()),
            None
        );
    }
}

fn receiver(name: &str) -> (Node, tensorferry_engine::Subscription) {
    let node = Node::builder()
        .name("receiver")
        .listen(format!("shm://{name}"))
        .progress_timeout(Duration::from_millis(300))
        .build()
        .expect("receiver");
    let sub = node.subscriber("/data");
    (node, sub)
}

#[test]
fn hostile_rings_cost_their_own_connection_only() {
    let name = format!("tf-hostile-{}", std::process::id());
    let (node, sub) = receiver(&name);

    // Garbage where a frame should start.
    let mut garbage = RawPeer::connect(&name, true);
    garbage.put(&[0xAB; 4096]);
    garbage.publish();
    wait_until("garbage is refused", WAIT, || node.stats().rejected >= 1);
    assert!(garbage.closed_by_receiver(WAIT));

    // A ring that claims more unread bytes than it holds.
    let mut liar = RawPeer::connect(&name, true);
    liar.claim(3 * RING as u64);
    wait_until("the lying ring is refused", WAIT, || {
        node.stats().rejected >= 2
    });
    assert!(liar.closed_by_receiver(WAIT));

    // A ring that could shrink under the receiver is not mapped.
    let unsealed = RawPeer::connect(&name, false);
    wait_until("the unsealed ring is refused", WAIT, || {
        node.stats().rejected >= 3
    });
    assert!(unsealed.closed_by_receiver(WAIT));

    // A byte the protocol does not have, on the socket.
    let mut chatter = RawPeer::connect(&name, true);
    chatter.socket.write_all(b"X").expect("write");
    assert!(chatter.closed_by_receiver(WAIT), "an unknown byte ends it");

    // A frame larger than the limit.
    let mut huge = RawPeer::connect(&name, true);
    huge.put(&announce(65 << 30));
    huge.publish();
    assert!(huge.closed_by_receiver(WAIT), "a 65 GiB frame is refused");

    // 1 GiB announced, then nothing: dropped after one progress period.
    let mut stalled = RawPeer::connect(&name, true);
    stalled.put(&announce(1 << 30));
    stalled.publish();
    assert!(
        stalled.closed_by_receiver(WAIT),
        "a stalled frame is dropped"
    );

    // Half a frame, then the peer dies: nothing of it is delivered.
    let mut dying = RawPeer::connect(&name, true);
    dying.put(&announce(1 << 20));
    dying.put(&[1u8; 1000]);
    dying.publish();
    thread::sleep(Duration::from_millis(50));
    drop(dying);

    // The process is up and serves a well-behaved peer, and nothing of
    // the hostile ones reached the subscription.
    served(&name, &sub, 11);
    assert!(
        matches!(sub.try_recv(), Ok(None)),
        "nothing else was delivered"
    );
    let stats = node.stats();
    assert!(stats.rejected >= 5, "{stats:?}");
    println!("shm hostile peers refused: {stats:?}");
}

/// CPU seconds this process has used (user and system), from `/proc`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let rest = stat.rsplit_once(')').expect("a command name").1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn a_peer_flooding_room_wake_ups_costs_work_in_proportion_to_its_bytes() {
    // A drained wake-up saying the peer made room pumps this side's
    // writer; a peer sending nothing but such wake-ups gets one cheap pump
    // per socket read, never a wait or a loop of its own.
    let name = format!("tf-hostile-space-{}", std::process::id());
    let (node, sub) = receiver(&name);
    let mut flood = RawPeer::connect(&name, true);
    let before = cpu_seconds();
    let chunk = [b'S'; 4096];
    for _ in 0..1024 {
        // 4 MiB of wake-ups; a full socket just waits for the reader.
        flood
            .socket
            .write_all(&chunk)
            .expect("the receiver reads them");
    }
    thread::sleep(Duration::from_millis(200));
    let spent = cpu_seconds() - before;
    assert!(
        !flood.closed_by_receiver(Duration::from_millis(10)),
        "wake-ups are allowed"
    );
    // Reading and dropping 4 MiB costs milliseconds; a spin or a wait per
    // byte would cost seconds (the bound is loose for a loaded machine).
    assert!(spent < 3.0, "{spent} s of CPU for 4 MiB of wake-ups");
    served(&name, &sub, 12);
    assert_eq!(node.stats().rejected, 0);
    println!("4 MiB of room wake-ups cost {spent:.3} s of CPU");
}

#[test]
fn a_peer_that_stalls_a_frame_while_the_subscriber_reads_it_itself_is_dropped() {
    // The node's only peer: a subscriber waiting in `recv` reads its ring
    // itself and, after a message, keeps the connection between two
    // `recv`s. A frame announced at 1 GiB that then stalls must still be
    // dropped by the progress rule, cost no memory, and not keep the
    // subscriber's thread busy.
    let name = format!("tf-hostile-park-{}", std::process::id());
    let (node, sub) = receiver(&name);
    let mut peer = RawPeer::connect(&name, true);
    wait_until("the peer is connected", WAIT, || node.stats().peers == 1);
    let mut frame = Vec::new();
    encode(
        &Message::new().field("n", 1),
        &FrameMeta::message("/data", 0),
        EncodeOptions::default(),
    )
    .expect("encode")
    .write_to(&mut frame)
    .expect("write");
    peer.put(&frame);
    peer.publish();
    let got = sub.recv_timeout(WAIT).expect("the real message");
    assert_eq!(got.message.get_field("n"), Some(&1.into()));
    let before = rss();
    peer.put(&announce(1 << 30));
    peer.publish();
    // The subscriber keeps coming back, as a busy consumer does.
    let started = Instant::now();
    let mut waits = 0u32;
    while !peer.closed_by_receiver(Duration::from_millis(1)) {
        assert!(
            started.elapsed() < WAIT,
            "a stalled frame was not dropped while its subscriber read"
        );
        let _ = sub.recv_timeout(Duration::from_millis(20));
        waits += 1;
    }
    assert!(waits > 0);
    assert!(
        rss().saturating_sub(before) < 256 << 20,
        "the announced frame was allocated"
    );
    served(&name, &sub, 12);
}
