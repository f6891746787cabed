//! Processes killed mid-message, a hundred times over: `tensorferry send`
//! killed (SIGKILL) while a receiver reads its frame, over tcp and shm, and
//! `tensorferry recv` killed while a sender streams to it.
//!
//! The process that survives is watched from outside: its descriptors,
//! threads, shared memory and resident memory after the kills are what they
//! were before (within the bound stated in each test); what it delivered is
//! every byte intact; a sender whose receiver was killed exits non-zero and
//! says how many messages were written. The figures are in
//! docs/reliability.md. `TENSORFERRY_KILLS=N` changes the number of kills
//! of each kind; `TENSORFERRY_LONG=1` kills 1,000 times with 64 MiB
//! messages.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver as Lines, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tensorferry::engine::pattern;
use tensorferry::{DType, Error, Message, Node, Received, Tensor};

mod common;
use common::procfs::{holdings, port_of, tcp_sockets, Holdings};
use common::{bin, long, run_seed, Reaped, Rng};

const WAIT: Duration = Duration::from_secs(60);
const CHANNEL: &str = "/faults";

/// The kill tests share two cores: one at a time, so each runs at the
/// pace its timing was sized for.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills of each kind: `TENSORFERRY_KILLS`, else 1,000 with
/// `TENSORFERRY_LONG=1`, else 100.
fn kills() -> usize {
    std::env::var("TENSORFERRY_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if long() { 1000 } else { 100 })
}

fn sigkill(child: &mut Child) {
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill sends a signal to a process id; our own child has not
    // been waited for, so its id is not reused.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
}

/// The exit status of `child` and what it wrote on stderr, once it exits
/// by itself within `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let mut stderr = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let status = poll_until(limit, "the process to exit", || {
        child.try_wait().expect("wait")
    });
    (status, reader.join().expect("stderr"))
}

/// Polls `ready` every millisecond until it returns something, for at most
/// `limit`; panics with `what` past it.
fn poll_until<T>(limit: Duration, what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------
// The long-lived receiver: a node in a child process of its own.

const RECEIVER_ENV: &str = "TENSORFERRY_TEST_RECEIVER";
const BUDGET_ENV: &str = "TENSORFERRY_TEST_RECEIVE_BUDGET";
const PLUG_ENV: &str = "TENSORFERRY_TEST_PLUG_BYTES";

/// Every tensor of `r` against the content `send --seed S --field seed=S`
/// generates; `expected` is scratch space.
fn check(r: &Received, expected: &mut Vec<u8>) -> Result<u64, String> {
    let seed = r
        .message
        .get_field("seed")
        .and_then(Value::as_u64)
        .ok_or("the message has no `seed` field")?;
    if r.message.tensors().len() == 0 {
        return Err("the message has no tensor".into());
    }
    for (name, t) in r.message.tensors() {
        let got = t.packed().map_err(|e| e.to_string())?;
        let got = got.as_slice();
        expected.resize(got.len(), 0);
        // Filling and comparing whole slices is several times faster than
        // locating a mismatch byte by byte; the offset is found only when
        // there is one.
        pattern::fill(t.dtype(), seed, r.seq, name, expected);
        if got != &expected[..] {
            let at = pattern::first_mismatch(t.dtype(), seed, r.seq, name, got);
            return Err(format!(
                "tensor `{name}`: byte {at:?} of {} differs",
                got.len()
            ));
        }
    }
    Ok(seed)
}

/// Not a test on its own: the long-lived receiver of the kill tests, which
/// run this test binary again with only this test selected.
///
/// It listens where `TENSORFERRY_TEST_RECEIVER` says, verifies every byte
/// of every message on `/faults` and prints a line for each
/// (`delivered SEED SEQ ok`, or `… BAD why`). Its node logs lost peers on
/// stderr. On stdin: `plug` makes it receive and hold a frame of
/// `TENSORFERRY_TEST_PLUG_BYTES` from a second node (tcp), so that with a
/// receive budget too small for both, the next frame waits unread;
/// `unplug` drops it. It ends when stdin closes.
#[test]
#[ignore = "run as a child process by the kill tests"]
fn receiver_process() {
    let Ok(listen) = std::env::var(RECEIVER_ENV) else {
        return;
    };
    let env_u64 = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "tensorferry_engine=info",
        ))
        .init();
    let mut builder = Node::builder().name("receiver").listen(&listen);
    if let Some(b) = env_u64(BUDGET_ENV) {
        builder = builder.receive_budget_bytes(b);
    }
    let node = builder.build().expect("receiver node");
    let addr = node.listen_addrs()[0].to_string();
    let data = node.subscriber(CHANNEL);
    let plugs = node.subscriber("/plug");
    // The plug travels over a connection of its own, so it is charged to
    // the receive budget like any frame from a peer.
    let plugger = env_u64(PLUG_ENV).map(|bytes| {
        let n = Node::builder().name("plug").build().expect("plug node");
        n.connect(&addr).expect("plug connects");
        let p = n.publisher("/plug");
        p.wait_for_subscribers(1, WAIT).expect("plug subscriber");
        let t = Tensor::zeros(DType::U8, &[bytes as usize]).expect("plug tensor");
        (n, p, t)
    });
    println!("listening on {addr}");

    let (tx, commands) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
        let _ = tx.send("quit".into());
    });
    let mut held = None;
    let mut scratch = Vec::new();
    loop {
        match commands.try_recv().as_deref() {
            Ok("plug") => {
                let (_, p, t) = plugger.as_ref().expect("started with a plug size");
                p.send(Message::new().tensor("z", t.clone()))
                    .expect("plug sent");
                held = Some(plugs.recv_timeout(WAIT).expect("plug received"));
                println!("plugged");
            }
            Ok("unplug") => {
                held = None;
                println!("unplugged");
            }
            Ok("quit") | Err(mpsc::TryRecvError::Disconnected) => break,
            Ok(other) => panic!("unknown command {other}"),
            Err(mpsc::TryRecvError::Empty) => {}
        }
        match data.recv_timeout(Duration::from_millis(5)) {
            Ok(r) => match check(&r, &mut scratch) {
                Ok(seed) => println!("delivered {seed} {} ok", r.seq),
                Err(why) => println!("delivered ? {} BAD {why}", r.seq),
            },
            Err(Error::Timeout { .. }) => {}
            Err(e) => println!("error {e}"),
        }
    }
    drop(held);
}

/// The receiver process, as its parent sees it.
struct LongLived {
    child: Reaped,
    stdin: ChildStdin,
    addr: String,
    /// Its stdout, line by line.
    lines: Lines<String>,
    /// Its `peer lost` log lines, and those read but not yet asked for.
    lost: Lines<String>,
    lost_seen: Vec<String>,
    /// Messages it delivered, and those that failed verification.
    delivered: u64,
    bad: Vec<String>,
}

impl LongLived {
    fn start(listen: &str, env: &[(&str, u64)]) -> LongLived {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["--exact", "receiver_process", "--ignored", "--nocapture"])
            .env(RECEIVER_ENV, listen)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v.to_string());
        }
        let mut child = cmd.spawn().expect("spawn the receiver");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let (tx, lost) = mpsc::channel();
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                if l.contains("peer lost") {
                    let _ = tx.send(l);
                } else if l.contains("ERROR") || l.contains("panicked") {
                    eprintln!("receiver: {l}");
                }
            }
        });
        let mut me = LongLived {
            child: Reaped::new(child),
            stdin,
            addr: String::new(),
            lines,
            delivered: 0,
            bad: Vec::new(),
            lost,
            lost_seen: Vec::new(),
        };
        let line = me.next_line(|l| l.starts_with("listening on "));
        me.addr = line["listening on ".len()..].to_string();
        me
    }

    /// Reads its stdout until a line satisfies `want`, counting the
    /// messages it delivered on the way.
    fn next_line(&mut self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => panic!("the receiver went quiet"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the receiver exited: {:?}", self.child.try_wait())
                }
            };
            self.count(&line);
            if want(&line) {
                return line;
            }
        }
    }

    fn count(&mut self, line: &str) {
        if line.starts_with("delivered ") {
            self.delivered += 1;
            if !line.ends_with(" ok") {
                self.bad.push(line.to_string());
            }
        } else if line.starts_with("error ") {
            self.bad.push(line.to_string());
        }
    }

    /// Counts what it printed so far, without waiting.
    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.count(&l);
        }
    }

    fn command(&mut self, cmd: &str, answer: &str) {
        writeln!(self.stdin, "{cmd}").expect("command");
        self.next_line(|l| l == answer);
    }

    /// The line it logged on losing the peer whose address contains `peer`.
    fn lost(&mut self, peer: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.lost_seen.iter().position(|l| l.contains(peer)) {
                return self.lost_seen.remove(i);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lost.recv_timeout(left).unwrap_or_else(|_| {
                let port = self.addr.rsplit(':').next().unwrap_or("").to_string();
                let sockets: Vec<_> = tcp_sockets()
                    .into_iter()
                    .filter(|s| {
                        s.local_port.to_string() == port || s.remote_port.to_string() == port
                    })
                    .collect();
                panic!(
                    "the receiver never lost {peer}; it lost {:?}; sockets {sockets:?}",
                    self.lost_seen
                )
            });
            self.lost_seen.push(line);
        }
    }

    fn holdings(&self) -> Holdings {
        holdings(self.child.id())
    }

    /// What it holds once no shared memory is left mapped: with no shm
    /// peer connected, the last slot of a lost one is unmapped when the
    /// last view of its message goes, a moment after the loss is printed.
    fn unmapped(&self) -> Holdings {
        self.holdings_when(|now| (now.memfds, now.memfd_maps) == (0, 0))
    }

    /// Waits until what it holds settles back to `before` (descriptors,
    /// threads, shared memory; resident memory is compared by the caller).
    fn settles_to(&self, before: &Holdings) -> Holdings {
        self.holdings_when(|now| {
            (now.fds, now.threads, now.memfds, now.memfd_maps)
                == (before.fds, before.threads, before.memfds, before.memfd_maps)
        })
    }

    /// What it holds once `settled` says so, or after 10 s.
    fn holdings_when(&self, settled: impl Fn(&Holdings) -> bool) -> Holdings {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.holdings();
            if settled(&now) || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) {
        let LongLived {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let _ = child.wait();
    }
}

/// `tensorferry send` of `count` messages of `bytes` to `addr`, with seed
/// (and field `seed`) `seed`.
fn sender(addr: &str, bytes: usize, count: u64, seed: u64) -> Command {
    let mut cmd = bin();
    cmd.args([
        "send",
        "--to",
        addr,
        "--channel",
        CHANNEL,
        "--tensor",
        &format!("x=u8:{bytes}"),
        "--count",
        &count.to_string(),
        "--seed",
        &seed.to_string(),
        "--field",
        &format!("seed={seed}"),
    ]);
    cmd
}

/// A clean run of `count` messages that the receiver delivers, every byte
/// intact; returns once it counted them and lost the sender.
fn clean_run(rx: &mut LongLived, bytes: usize, count: u64, seed: u64) {
    let out = sender(&rx.addr, bytes, count, seed).output().expect("send");
    assert!(
        out.status.success(),
        "a clean send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for seq in 0..count {
        let want = format!("delivered {seed} {seq} ok");
        let line = rx.next_line(|l| l.starts_with("delivered ") && l.contains(&format!(" {seq} ")));
        assert_eq!(line, want);
    }
}

/// What a resident-memory comparison allows: the receiver's pooled
/// receive buffers (kept for reuse) and allocator slack, far below what a
/// leak of one message per kill would cost.
const RSS_SLACK: u64 = 96 << 20;

fn assert_no_leak(
    label: &str,
    before: &Holdings,
    after: &Holdings,
    message_bytes: usize,
    n: usize,
) {
    println!("{label}: before the kills {before}; after {after}");
    assert_eq!(
        (after.fds, after.threads, after.memfds, after.memfd_maps),
        (before.fds, before.threads, before.memfds, before.memfd_maps),
        "{label}: descriptors, threads or shared memory left behind"
    );
    let grown = after.rss.saturating_sub(before.rss);
    assert!(
        grown <= RSS_SLACK,
        "{label}: resident memory grew by {} MiB over {n} kills of {} MiB messages",
        grown >> 20,
        message_bytes >> 20
    );
}

// ---------------------------------------------------------------------------
// Senders killed.

/// A frame larger than what the kernel buffers between two tcp sockets of a
/// node (4 MiB asked each way, doubled by the kernel), so a sender whose
/// receiver does not read cannot have written all of it.
fn tcp_message_bytes() -> usize {
    if long() {
        64 << 20
    } else {
        20 << 20
    }
}

/// Senders started, and killed, together.
const TCP_BATCH: u64 = 4;

#[test]
fn senders_killed_mid_frame_over_tcp_leave_the_receiver_whole() {
    let _one = one_at_a_time();
    let n = kills();
    let bytes = tcp_message_bytes();
    // Room for one message frame, or for the plug, never for both: while
    // the plug is held, a sender's frame is announced and waits unread, and
    // the sender blocks with part of it written.
    let plug = (bytes / 2) as u64;
    let budget = bytes as u64 + plug - (1 << 20);
    let mut rx = LongLived::start(
        "tcp://127.0.0.1:0",
        &[(BUDGET_ENV, budget), (PLUG_ENV, plug)],
    );
    let port = port_of(&rx.addr);
    clean_run(&mut rx, bytes, 2, 1_000_000);
    rx.lost(":");
    let before = rx.holdings();
    let (mut cut, mut reset) = (0, 0);
    let mut unread = Vec::with_capacity(n);
    let start = Instant::now();
    let mut seed = 0;
    while seed < n as u64 {
        // A few senders at once: each one's frame waits behind the plug,
        // so each is killed mid-frame whatever the others do.
        rx.command("plug", "plugged");
        let batch = (n as u64 - seed).min(TCP_BATCH);
        let mut sends: Vec<Reaped> = (seed..seed + batch)
            .map(|s| {
                Reaped::new(
                    sender(&rx.addr, bytes, 1_000_000, s)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawn send"),
                )
            })
            .collect();
        seed += batch;
        // Each sender's first frame has begun to arrive and waits unread:
        // its first bytes sit in the receiver's socket, the rest in the
        // sender.
        let socks = poll_until(WAIT, "the senders' first frames", || {
            for s in &mut sends {
                if let Ok(Some(status)) = s.try_wait() {
                    panic!("send exited before it was killed: {status}");
                }
            }
            let waiting: Vec<_> = tcp_sockets()
                .into_iter()
                .filter(|s| s.local_port == port && s.state == 1 && s.rx_queue > 0)
                .collect();
            (waiting.len() as u64 == batch).then_some(waiting)
        });
        for s in &mut sends {
            sigkill(s);
        }
        rx.command("unplug", "unplugged");
        for sock in socks {
            unread.push(sock.rx_queue);
            let why = rx.lost(&format!(":{}", sock.remote_port));
            if why.contains("ended mid-frame") {
                cut += 1;
            } else if why.contains("reset") {
                reset += 1;
            } else {
                panic!("a killed sender's frame was not cut: {why}");
            }
        }
    }
    let killing = start.elapsed();
    // Still serving: a clean sender's messages arrive whole.
    clean_run(&mut rx, bytes, 2, 2_000_000);
    rx.lost(":");
    let after = rx.settles_to(&before);
    rx.drain();
    let (delivered, bad) = (rx.delivered, rx.bad.clone());
    rx.stop();
    assert!(bad.is_empty(), "delivered with wrong bytes: {bad:?}");
    // Only the clean runs' messages: every killed sender's frame was cut.
    assert_eq!(delivered, 4);
    unread.sort_unstable();
    println!(
        "tcp: {n} senders killed mid-frame ({} MiB frames) in {:.1} s: {cut} ended mid-frame, {reset} reset; \
         unread bytes at the kill: min {} KiB, median {} KiB; {delivered} messages delivered, all verified",
        bytes >> 20,
        killing.as_secs_f64(),
        unread[0] >> 10,
        unread[n / 2] >> 10,
    );
    assert_no_leak("tcp receiver", &before, &after, bytes, n);
}

#[test]
fn senders_killed_mid_message_over_shm_leave_the_receiver_whole() {
    let _one = one_at_a_time();
    let n = kills();
    let bytes = if long() { 64 << 20 } else { 2 << 20 };
    let name = format!("shm://tf-faults-{}", std::process::id());
    let mut rx = LongLived::start(&name, &[]);
    clean_run(&mut rx, bytes, 2, 1_000_000);
    rx.lost(":");
    let before = rx.unmapped();
    let mut rng = Rng::new(run_seed());
    let start = Instant::now();
    let mut after_first = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let mut send = Reaped::new(
            sender(&rx.addr, bytes, 1_000_000, i)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn send"),
        );
        // Its first message arrived: it is making the next ones, some in
        // the receiver's hands (shared slots the receiver maps).
        let first = rx.delivered;
        rx.next_line(|l| l.starts_with(&format!("delivered {i} ")));
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        sigkill(&mut send);
        rx.lost("shm");
        rx.drain();
        after_first.push(rx.delivered - first - 1);
    }
    let killing = start.elapsed();
    clean_run(&mut rx, bytes, 2, 2_000_000);
    rx.lost(":");
    let after = rx.settles_to(&before);
    rx.drain();
    let (delivered, bad) = (rx.delivered, rx.bad.clone());
    rx.stop();
    assert!(bad.is_empty(), "delivered with wrong bytes: {bad:?}");
    println!(
        "shm: {n} senders killed mid-stream ({} MiB messages) in {:.1} s; {delivered} messages delivered, all verified \
         ({} after a sender's first and before its loss)",
        bytes >> 20,
        killing.as_secs_f64(),
        after_first.iter().sum::<u64>()
    );
    assert_no_leak("shm receiver", &before, &after, bytes, n);
}

// ---------------------------------------------------------------------------
// Receivers killed.

/// `N` of `M message(s) were written` from a sender's error.
fn written(err: &str, count: u64) -> Option<u64> {
    let tail = format!(" of {count} message(s) were written");
    let end = err.find(&tail)?;
    err[..end].rsplit(' ').next()?.parse().ok()
}

/// Kills `recv` processes while a `send` streams to each, `n` times, and
/// checks each sender's report. `mid` waits, with the receiver stopped,
/// until it is caught mid-message, and says how.
fn receivers_killed(listen: &str, bytes: usize, mid: impl Fn(&Child, &str) -> String) {
    let n = kills();
    let count = 1_000_000u64;
    let start = Instant::now();
    let mut written_total = 0;
    let mut how = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..n as u64 {
        let mut recv = Reaped::new(
            bin()
                .args(["recv", "--listen", listen, "--channel", CHANNEL])
                .args(["--idle-timeout", "60"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn recv"),
        );
        let addr = common::listening_addr(recv.stderr.take().expect("stderr"));
        let mut lines = BufReader::new(recv.stdout.take().expect("stdout")).lines();
        let mut send = Reaped::new(
            sender(&addr, bytes, count, i)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn send"),
        );
        // One message delivered: the stream is under way.
        let first = lines.next().and_then(Result::ok).expect("a first message");
        assert!(first.starts_with(&format!("{CHANNEL} #0")), "{first}");
        signal(&recv, libc::SIGSTOP);
        *how.entry(mid(&recv, &addr)).or_default() += 1;
        sigkill(&mut recv);
        let delivered = 1 + lines.map_while(Result::ok).count() as u64;
        let (status, err) = exit_within(&mut send, WAIT);
        assert!(!status.success(), "kill {i}: send succeeded: {err}");
        assert!(err.contains("a receiver was lost"), "kill {i}: {err}");
        let w = written(&err, count).unwrap_or_else(|| panic!("kill {i}: {err}"));
        assert!(
            (delivered..count).contains(&w),
            "kill {i}: {w} written, {delivered} delivered: {err}"
        );
        written_total += w;
    }
    println!(
        "{listen}: {n} receivers killed mid-message ({} MiB messages) in {:.1} s; every sender exited non-zero \
         saying how many were written ({written_total} in all); caught {how:?}",
        bytes >> 20,
        start.elapsed().as_secs_f64(),
    );
}

#[test]
fn receivers_killed_mid_message_over_shm_are_reported_by_their_sender() {
    let _one = one_at_a_time();
    let listen = format!("shm://tf-faults-recv-{}", std::process::id());
    let bytes = if long() { 64 << 20 } else { 1 << 20 };
    receivers_killed(&listen, bytes, |recv, _| {
        // The stopped receiver maps the sender's ring and slots: it dies
        // holding them.
        let h = holdings(recv.id());
        assert!(h.memfd_maps >= 2, "the receiver maps no slot: {h}");
        "holding the sender's shared memory".into()
    });
}

#[test]
fn receivers_killed_mid_frame_over_tcp_are_reported_by_their_sender() {
    let _one = one_at_a_time();
    let bytes = if long() { 64 << 20 } else { 1 << 20 };
    receivers_killed("tcp://127.0.0.1:0", bytes, |_, addr| {
        // The stopped receiver's socket fills with the frames that follow:
        // it dies with part of one unread.
        let port = port_of(addr);
        poll_until(WAIT, "unread bytes at the stopped receiver", || {
            tcp_sockets()
                .into_iter()
                .find(|s| s.local_port == port && s.state == 1 && s.rx_queue > 0)
        });
        "with unread bytes of a frame".into()
    });
}
