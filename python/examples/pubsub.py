"""Publish and subscribe between two processes: a trainer streams weights,
a worker receives them without copying and reads them with NumPy.

Run: python pubsub.py            (starts the worker itself, over tcp)
     python pubsub.py shm        (over shared memory)
"""

import os
import subprocess
import sys

import numpy as np

import tensorferry as tf


def worker(address: str, count: int) -> None:
    sub = tf.Node().subscribe(address, "/weights")
    print("ready", flush=True)
    for _ in range(count):
        msg = sub.recv(timeout=30)
        w = np.from_dlpack(msg["w"])  # a read-only view of the received bytes
        assert msg["w"].data_ptr == w.ctypes.data  # no copy
        print(f"step {msg.fields['step']}: w {w.shape} {w.dtype}, mean {w.mean():.3f}", flush=True)


def trainer(transport: str, count: int) -> None:
    listen = f"shm://pubsub-example-{os.getpid()}" if transport == "shm" else "tcp://127.0.0.1:0"
    node = tf.Node(listen=listen, name="trainer")
    pub = node.publisher("/weights")
    child = subprocess.Popen(
        [sys.executable, __file__, "--worker", node.address, str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    pub.wait_for_subscribers(1, timeout=30)
    w = np.zeros((256, 1024), np.float32)
    for step in range(count):
        # A training step makes a new array: the one sent goes without a
        # copy, so it must stay unchanged until its bytes are written.
        w = w + 0.5
        pub.send({"step": step, "lr": 1e-3}, w=w)
    pub.flush(timeout=30)
    out, _ = child.communicate(timeout=60)
    print(out, end="")
    if child.returncode != 0:
        sys.exit(child.returncode)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        trainer(sys.argv[1] if len(sys.argv) > 1 else "tcp", count=5)
