"""Proxies instead of tensors: a producer puts each step's large weights
into a store once and publishes a small proxy; a consumer process starts
fetching the next step's weights while it works on the current ones.

The store is served by the producer's node, so the consumer could be on
another host; the proxies travel as ordinary message fields.

Run: python proxies.py            (starts the consumer itself)
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import tensorferry as tf

STEPS = 4
SHAPE = (1024, 1024)  # 4 MiB of float32 per step


def consumer(address: str) -> None:
    node = tf.Node()
    tf.set_store_client_node(node)  # proxies of served stores resolve through it
    sub = node.subscribe(address, "/weights")
    print("ready", flush=True)
    ahead = tf.Proxy.from_json(sub.recv(timeout=30).fields["weights"])
    ahead.resolve_async()
    for step in range(STEPS):
        current = ahead
        if step + 1 < STEPS:
            # Start the next fetch now: it runs while this step computes.
            ahead = tf.Proxy.from_json(sub.recv(timeout=30).fields["weights"])
            ahead.resolve_async()
        w = np.from_dlpack(current.tensor(timeout=30))  # no copy of the fetched bytes
        started = time.monotonic()
        total = float(w.sum(dtype=np.float64))  # the "computation"
        took = time.monotonic() - started
        print(f"step {step}: {w.nbytes >> 20} MiB via proxy {current.key[:8]}, sum {total:.0f}"
              f" (computed in {took * 1e3:.1f} ms)", flush=True)


def producer() -> None:
    node = tf.Node(listen="tcp://127.0.0.1:0", name="producer")
    with tempfile.TemporaryDirectory() as folder:
        # Proxies name the node serving the store: they resolve wherever it is reachable.
        store = tf.Store.dir(folder).served_at(node.address)
        store.serve(node)
        pub = node.publisher("/weights")
        child = subprocess.Popen([sys.executable, __file__, "--consumer", node.address],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        pub.wait_for_subscribers(1, timeout=30)
        for step in range(STEPS):
            w = np.full(SHAPE, step + 1, np.float32)
            proxy = store.put_proxy({"step": step}, w=w)
            pub.send({"step": step, "weights": proxy})  # a proxy field goes as its JSON
        pub.flush(timeout=30)
        out, _ = child.communicate(timeout=120)
        print(out, end="")
        if child.returncode != 0:
            sys.exit(child.returncode)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--consumer"]:
        consumer(sys.argv[2])
    else:
        producer()
