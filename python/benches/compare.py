"""tensorferry from Python beside the tools users would pick instead, in one run.

Each case runs a server in a child process and the client here, on this
host, over tcp (loopback) and over the same-host path each tool has:

* ``rtt``: 4 KiB request/reply round trips (a float32 array echoed back);
  the median and p90 of ``--rounds`` round trips after a warm-up.
* ``stream``: 64 MiB arrays sent one way; GB/s from the first send until
  the receiver says it has them all (it touches every message's first
  and last element, so nothing is skipped). For tensorferry the receiver
  also times itself the way ``tensorferry bench`` does (from the first
  message's arrival to the last's: connecting, setting up stripes and
  filling the pipeline left out), and with ``--rust-bench EXE`` each
  tensorferry tcp row runs between two runs of ``EXE bench --transport tcp
  --sizes 64MiB --duration 3`` and is compared with their mean, measured
  the same way: it then also sends for 3 s, as the Rust row does, instead
  of ``--count`` messages (the mean of one run before and one after
  cancels this machine's drift over minutes of load).
* ``to-numpy``: how long ``np.from_dlpack`` takes on a received tensor, by
  size (a copy would grow with it).

The peers, each skipped with the reason when it is not installed:

* tensorferry (tcp://, shm://; with ``--busy-poll-us N``, round trips
  also with both ends busy-polling, `+poll`);
* ``torch.distributed.rpc`` on TensorPipe (``rpc_sync`` for round trips,
  ``rpc_async`` with 4 in flight for throughput; tcp only, its ``uv``
  transport and ``basic`` channel, or its own choice of same-host channels);
* pyzmq with zero-copy multipart (REQ/REP, PUSH/PULL; tcp://, ipc://);
* pickle protocol 5 with out-of-band buffers over a socket (TCP, Unix).

Install the optional peers with::

    pip install torch pyzmq

Usage::

    python compare.py                 # everything, the default sizes
    python compare.py --quick         # fewer rounds and messages
    python compare.py --only tensorferry,pickle5 --cases rtt
    python compare.py --only tensorferry,torch-rpc --cases stream \
        --rust-bench target/release/tensorferry
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

RTT_BYTES = 4096
STREAM_BYTES = 64 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"tfbench-{name}-{uuid.uuid4().hex[:8]}")


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


# --------------------------------------------------------------------------
# Servers (run in a child: `compare.py --serve PEER CASE TRANSPORT ARG`)
# --------------------------------------------------------------------------


def tensorferry_config(transport: str) -> dict | None:
    """`tcp+poll`, `shm+poll` (with `--busy-poll-us N`): both ends poll for
    N µs after each message (the node section's `busy_poll_us`) instead of
    sleeping."""
    if not transport.endswith("+poll"):
        return None  # the default: spin as long as recent round trips suggest
    return {"node": {"busy_poll_us": int(os.environ.get("TFBENCH_BUSY_POLL_US", "0"))}}


def serve_tensorferry(case: str, transport: str, count: int) -> None:
    import tensorferry as tf

    if transport.startswith("tcp"):
        listen = "tcp://127.0.0.1:0"
    else:
        listen = f"shm://{uuid.uuid4().hex[:12]}"
    node = tf.Node(listen=listen, config=tensorferry_config(transport))
    if case == "rtt":
        node.serve("/echo", lambda m: m)
        emit(address=node.address)
        sys.stdin.read()
        return
    sub = node.subscriber("/x")
    emit(address=node.address)
    first = last = None
    received = 0
    while True:  # until the sender's `stop` message
        m = sub.recv(timeout=120)
        if m.fields.get("stop"):
            break
        x = np.from_dlpack(m["x"])
        _ = x[0] + x[-1]
        received += 1
        last = time.perf_counter()
        first = first or last
    # The messages after the first over the time they took to arrive.
    steady = (received - 1) * STREAM_BYTES / (last - first) if received > 1 and last > first else None
    emit(done=True, receiver_rate=steady, messages=received)
    sys.stdin.read()


def serve_zmq(case: str, transport: str, count: int) -> None:
    import zmq

    ctx = zmq.Context()
    addr = f"tcp://127.0.0.1:{free_port()}" if transport == "tcp" else f"ipc://{scratch('zmq')}"
    if case == "rtt":
        s = ctx.socket(zmq.REP)
        s.bind(addr)
        emit(address=addr)
        while True:
            frames = s.recv_multipart(copy=False)
            s.send_multipart(frames, copy=False)
    s = ctx.socket(zmq.PULL)
    s.bind(addr)
    emit(address=addr)
    for _ in range(count):
        frames = s.recv_multipart(copy=False)
        x = np.frombuffer(frames[1].buffer, np.float32)
        _ = x[0] + x[-1]
    emit(done=True)
    sys.stdin.read()


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("peer closed")
        got += k
    return buf


def pickle_send(sock: socket.socket, obj) -> None:
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    lengths = struct.pack(f"<QQ{len(raws)}Q", len(head), len(raws), *[r.nbytes for r in raws])
    sock.sendall(lengths[:16])
    sock.sendall(lengths[16:] + head)
    for r in raws:
        sock.sendall(r)


def pickle_recv(sock: socket.socket):
    head_len, nbuf = struct.unpack("<QQ", recv_exact(sock, 16))
    sizes = struct.unpack(f"<{nbuf}Q", recv_exact(sock, 8 * nbuf))
    head = recv_exact(sock, head_len)
    buffers = [recv_exact(sock, n) for n in sizes]
    return pickle.loads(head, buffers=buffers)


def serve_pickle(case: str, transport: str, count: int) -> None:
    if transport == "tcp":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        addr = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
    else:
        path = scratch("pickle")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        addr = f"unix:{path}"
    listener.listen(1)
    emit(address=addr)
    conn, _ = listener.accept()
    if transport == "tcp":
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if case == "rtt":
        try:
            while True:
                pickle_send(conn, pickle_recv(conn))
        except EOFError:
            return
    for _ in range(count):
        x = pickle_recv(conn)
        _ = x[0] + x[-1]
    emit(done=True)
    sys.stdin.read()


def torch_sink(x):
    return float(x[0] + x[-1])


def torch_echo(x):
    return x


def torch_options(transport: str):
    from torch.distributed import rpc

    if transport == "tcp":
        return rpc.TensorPipeRpcBackendOptions(
            num_worker_threads=4, _transports=["uv"], _channels=["basic"]
        )
    return rpc.TensorPipeRpcBackendOptions(num_worker_threads=4)


def serve_torch(case: str, transport: str, port: int) -> None:
    from torch.distributed import rpc

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    rpc.init_rpc("server", rank=1, world_size=2, rpc_backend_options=torch_options(transport))
    rpc.shutdown()


SERVERS = {
    "tensorferry": serve_tensorferry,
    "pyzmq": serve_zmq,
    "pickle5": serve_pickle,
    "torch-rpc": serve_torch,
}


class Child:
    """A server in a child process, talking JSON lines on stdout."""

    def __init__(self, peer: str, case: str, transport: str, arg: int):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", peer, case, transport, str(arg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self) -> dict:
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"the server ended (exit {self.proc.wait()})")
        return json.loads(text)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------


def timed_rounds(one, rounds: int) -> list[float]:
    for _ in range(max(10, rounds // 10)):
        one()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        one()
        out.append(time.perf_counter() - t0)
    return out


def rtt_tensorferry(transport: str, rounds: int) -> list[float]:
    import tensorferry as tf

    child = Child("tensorferry", "rtt", transport, 0)
    try:
        addr = child.line()["address"]
        node = tf.Node(config=tensorferry_config(transport))
        x = np.ones(RTT_BYTES // 4, np.float32)
        return timed_rounds(lambda: node.request(addr, "/echo", x=x, timeout=30), rounds)
    finally:
        child.close()


def stream_tensorferry(transport: str, count: int, seconds: float | None = None) -> float:
    """`count` messages, or as many as `seconds` of sending allows."""
    import tensorferry as tf

    child = Child("tensorferry", "stream", transport, count)
    try:
        addr = child.line()["address"]
        node = tf.Node()
        pub = node.publisher("/x")
        node.connect(addr)
        pub.wait_for_subscribers(1, timeout=30)
        x = np.ones(STREAM_BYTES // 4, np.float32)
        t0 = time.perf_counter()
        sent = 0
        while sent < count if seconds is None else time.perf_counter() - t0 < seconds:
            pub.send(x=x)
            sent += 1
        pub.send({"stop": True})
        done = child.line()
        return Rate(sent * STREAM_BYTES / (time.perf_counter() - t0), done.get("receiver_rate"), sent)
    finally:
        child.close()


class Rate(float):
    """A sender's rate (bytes/s) with, where the receiver timed itself, its own."""

    def __new__(cls, wall: float, receiver: float | None = None, messages: int | None = None):
        r = super().__new__(cls, wall)
        r.receiver = receiver
        r.messages = messages
        return r


RUST_BENCH_SECONDS = 3


def rust_bench_gbps(exe: str) -> float:
    """`tensorferry bench`'s own figure for 64 MiB over tcp (GB/s)."""
    out = subprocess.run([exe, "bench", "--transport", "tcp", "--sizes", "64MiB", "--duration",
                          str(RUST_BENCH_SECONDS), "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["rows"][0]["gbps"]


def rtt_zmq(transport: str, rounds: int) -> list[float]:
    import zmq

    child = Child("pyzmq", "rtt", transport, 0)
    try:
        addr = child.line()["address"]
        s = zmq.Context.instance().socket(zmq.REQ)
        s.connect(addr)
        x = np.ones(RTT_BYTES // 4, np.float32)

        def one():
            s.send_multipart([b"x", memoryview(x)], copy=False)
            frames = s.recv_multipart(copy=False)
            np.frombuffer(frames[1].buffer, np.float32)

        try:
            return timed_rounds(one, rounds)
        finally:
            s.close(linger=0)
    finally:
        child.proc.kill()
        child.close()


def stream_zmq(transport: str, count: int) -> float:
    import zmq

    child = Child("pyzmq", "stream", transport, count)
    try:
        addr = child.line()["address"]
        s = zmq.Context.instance().socket(zmq.PUSH)
        s.connect(addr)
        x = np.ones(STREAM_BYTES // 4, np.float32)
        t0 = time.perf_counter()
        for _ in range(count):
            s.send_multipart([b"x", memoryview(x)], copy=False)
        child.line()
        rate = count * STREAM_BYTES / (time.perf_counter() - t0)
        s.close(linger=0)
        return rate
    finally:
        child.close()


def pickle_connect(addr: str) -> socket.socket:
    kind, rest = addr.split(":", 1)
    if kind == "tcp":
        host, port = rest.rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    s = socket.socket(socket.AF_UNIX)
    s.connect(rest)
    return s


def rtt_pickle(transport: str, rounds: int) -> list[float]:
    child = Child("pickle5", "rtt", transport, 0)
    try:
        s = pickle_connect(child.line()["address"])
        x = np.ones(RTT_BYTES // 4, np.float32)

        def one():
            pickle_send(s, x)
            pickle_recv(s)

        try:
            return timed_rounds(one, rounds)
        finally:
            s.close()
    finally:
        child.close()


def stream_pickle(transport: str, count: int) -> float:
    child = Child("pickle5", "stream", transport, count)
    try:
        s = pickle_connect(child.line()["address"])
        x = np.ones(STREAM_BYTES // 4, np.float32)
        t0 = time.perf_counter()
        for _ in range(count):
            pickle_send(s, x)
        child.line()
        rate = count * STREAM_BYTES / (time.perf_counter() - t0)
        s.close()
        return rate
    finally:
        child.close()


def with_torch_rpc(transport: str, run):
    import torch
    from torch.distributed import rpc

    port = free_port()
    child = Child("torch-rpc", "any", transport, port)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    rpc.init_rpc("client", rank=0, world_size=2, rpc_backend_options=torch_options(transport))
    try:
        return run(torch, rpc)
    finally:
        rpc.shutdown()
        child.close()


def torch_client(case: str, transport: str, n: int) -> None:
    """One measurement in a process of its own: an RPC agent cannot be
    started again in a process whose agent shut down."""
    run = torch_rtt if case == "rtt" else torch_stream
    emit(result=with_torch_rpc(transport, lambda torch, rpc: run(torch, rpc, n)))


def in_torch_client(case: str, transport: str, n: int):
    proc = subprocess.run(
        [sys.executable, __file__, "--torch-client", case, transport, str(n)],
        stdout=subprocess.PIPE,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the torch-rpc client failed (exit {proc.returncode})")
    return json.loads(lines[-1])["result"]


def rtt_torch(transport: str, rounds: int) -> list[float]:
    return in_torch_client("rtt", transport, rounds)


def stream_torch(transport: str, count: int) -> float:
    return in_torch_client("stream", transport, count)


def torch_rtt(torch, rpc, rounds: int) -> list[float]:
    x = torch.ones(RTT_BYTES // 4, dtype=torch.float32)
    return timed_rounds(lambda: rpc.rpc_sync("server", torch_echo, args=(x,)), rounds)


def torch_stream(torch, rpc, count: int) -> float:
    x = torch.ones(STREAM_BYTES // 4, dtype=torch.float32)
    rpc.rpc_sync("server", torch_sink, args=(x,))  # connect and warm up
    t0 = time.perf_counter()
    flight = []
    for _ in range(count):
        flight.append(rpc.rpc_async("server", torch_sink, args=(x,)))
        if len(flight) == 4:
            flight.pop(0).wait()
    for f in flight:
        f.wait()
    return count * STREAM_BYTES / (time.perf_counter() - t0)


def to_numpy_times(sizes: list[int], repeats: int) -> list[tuple[int, float]]:
    import tensorferry as tf

    node = tf.Node()
    sub = node.subscriber("/x")
    pub = node.publisher("/x")
    out = []
    for n in sizes:
        pub.send(x=np.ones(n, np.uint8))
        t = sub.recv(timeout=60)["x"]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = np.from_dlpack(t)
            times.append(time.perf_counter() - t0)
            assert a.ctypes.data == t.data_ptr
            del a
        out.append((n, statistics.median(times)))
        del t
    return out


CLIENTS = {
    "tensorferry": (rtt_tensorferry, stream_tensorferry, ["tcp", "shm"]),
    "torch-rpc": (rtt_torch, stream_torch, ["tcp", "same-host"]),
    "pyzmq": (rtt_zmq, stream_zmq, ["tcp", "ipc"]),
    "pickle5": (rtt_pickle, stream_pickle, ["tcp", "unix"]),
}

MODULES = {"tensorferry": "tensorferry", "torch-rpc": "torch", "pyzmq": "zmq", "pickle5": "pickle"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(CLIENTS), help="peers to run, comma-separated (default: all)")
    ap.add_argument("--cases", default="rtt,stream,to-numpy", help="cases to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and messages")
    ap.add_argument("--rounds", type=int, help="round trips per rtt row (default 2000; 300 quick)")
    ap.add_argument("--count", type=int,
                    help="64 MiB messages per stream row (default 96: fewer leave filling and "
                         "draining the pipeline a large share; 6 quick)")
    ap.add_argument("--busy-poll-us", type=int, default=0,
                    help="also measure tensorferry round trips with both ends busy-polling this long (µs)")
    ap.add_argument("--rust-bench", metavar="EXE",
                    help="before and after each tensorferry tcp stream row, run `EXE bench --transport tcp "
                         "--sizes 64MiB` (a tensorferry executable, e.g. target/release/tensorferry) "
                         "and print the ratio to their mean")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    rounds = args.rounds or (300 if args.quick else 2000)
    count = args.count or (6 if args.quick else 96)
    if rounds < 1 or count < 1:
        ap.error("--rounds and --count must be at least 1")
    peers = [p for p in args.only.split(",") if p]
    unknown = [p for p in peers if p not in CLIENTS]
    if unknown:
        ap.error(f"unknown peer(s) {unknown}; choose from {list(CLIENTS)}")
    cases = set(args.cases.split(","))
    if args.busy_poll_us < 0:
        ap.error("--busy-poll-us must be 0 or more")
    if args.busy_poll_us:
        # Children read it from the environment they inherit.
        os.environ["TFBENCH_BUSY_POLL_US"] = str(args.busy_poll_us)
        CLIENTS["tensorferry"][2].extend(["tcp+poll", "shm+poll"])
    rows = []
    print(f"# {platform.node()} · Python {platform.python_version()} · {os.cpu_count()} CPUs · "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    for peer in peers:
        rtt, stream, transports = CLIENTS[peer]
        try:
            __import__(MODULES[peer])
        except ImportError as e:
            print(f"{peer:12} skipped: {e} (pip install torch pyzmq)", flush=True)
            continue
        for transport in transports:
            if "rtt" in cases:
                t = sorted(rtt(transport, rounds))
                row = {"peer": peer, "case": "rtt 4 KiB", "transport": transport,
                       "median_us": 1e6 * statistics.median(t), "p90_us": 1e6 * t[int(0.9 * (len(t) - 1))],
                       "rounds": rounds}
                rows.append(row)
                print(f"{peer:12} {transport:9} rtt 4 KiB    median {row['median_us']:8.1f} µs  "
                      f"p90 {row['p90_us']:8.1f} µs  ({rounds} rounds)", flush=True)
            if "stream" in cases and not transport.endswith("+poll"):
                beside_rust = args.rust_bench and peer == "tensorferry" and transport == "tcp"
                rust_before = rust_bench_gbps(args.rust_bench) if beside_rust else None
                if beside_rust:
                    # As long as the Rust row sends: a shorter stream counts
                    # the connection's warm-up (TCP's windows growing) more.
                    rate = stream(transport, count, seconds=RUST_BENCH_SECONDS)
                else:
                    rate = stream(transport, count)
                sent = getattr(rate, "messages", None) or count
                row = {"peer": peer, "case": "stream 64 MiB", "transport": transport,
                       "gb_per_s": rate / 1e9, "messages": sent}
                rows.append(row)
                print(f"{peer:12} {transport:9} 64 MiB       {rate / 1e9:8.2f} GB/s  ({sent} messages)",
                      flush=True)
                receiver = getattr(rate, "receiver", None)
                if receiver:
                    row["receiver_gb_per_s"] = receiver / 1e9
                    print(f"{'':22} as the receiver times it {receiver / 1e9:6.2f} GB/s", flush=True)
                if receiver and beside_rust:
                    rust_after = rust_bench_gbps(args.rust_bench)
                    rust = (rust_before + rust_after) / 2
                    row["rust_bench_gb_per_s"] = [rust_before, rust_after]
                    print(f"{'':22} tensorferry bench tcp    {rust:6.2f} GB/s (before {rust_before:.2f}, "
                          f"after {rust_after:.2f}): Python / Rust {receiver / 1e9 / rust:.2f}x", flush=True)
    if "to-numpy" in cases and "tensorferry" in peers:
        for n, s in to_numpy_times([4 << 10, 1 << 20, 64 << 20, 256 << 20], 21):
            rows.append({"peer": "tensorferry", "case": "np.from_dlpack", "bytes": n, "median_us": 1e6 * s})
            print(f"tensorferry  np.from_dlpack of a received {n >> 10:>7} KiB tensor: {1e6 * s:7.2f} µs",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-client":
        torch_client(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve":
        peer, case, transport, arg = sys.argv[2:6]
        SERVERS[peer](case, transport, int(arg))
    else:
        main()
