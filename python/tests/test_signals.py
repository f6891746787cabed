"""Ctrl-C interrupts blocking calls (they release the GIL and check signals)."""

import signal
import time

import pytest

WAITER = """
import time
node = tf.Node(listen="tcp://127.0.0.1:0")
what = sys.argv[1]
if what == "recv":
    sub = node.subscriber("/never")
    call = lambda: sub.recv()
elif what == "request":
    node.serve("/sleepy", lambda r: time.sleep(60))
    client = tf.Node()
    call = lambda: client.request(node.address, "/sleepy")
elif what == "subscribers":
    pub = node.publisher("/nobody")
    call = lambda: pub.wait_for_subscribers(1)
elif what == "subscribe":
    # Nothing listens there: connecting retries until its timeout.
    client = tf.Node(connect_timeout=60)
    call = lambda: client.subscribe("tcp://127.0.0.1:1", "/x")
elif what == "send":
    node = tf.Node(config={"channels": {"/full": {"queue_depth": 1, "overflow": "block"}}})
    sub = node.subscriber("/full")  # never read
    pub = node.publisher("/full")
    pub.send({"n": 0})  # fills the queue
    call = lambda: pub.send({"n": 1}, x=np.zeros(4))
emit(ready=True)
start = time.monotonic()
try:
    call()
    emit(outcome="returned")
except KeyboardInterrupt:
    emit(outcome="interrupted", after=time.monotonic() - start)
"""


@pytest.mark.parametrize("call", ["recv", "request", "subscribers", "send", "subscribe"])
def test_ctrl_c_interrupts_a_blocking_call(peer, call):
    p = peer(WAITER, call)
    assert p.line()["ready"]
    time.sleep(0.3)  # let it block
    sent = time.monotonic()
    p.proc.send_signal(signal.SIGINT)
    got = p.line(timeout=10)
    assert got["outcome"] == "interrupted"
    assert time.monotonic() - sent < 5
    p.wait()


def test_other_threads_run_while_a_call_waits():
    import threading

    import tensorferry as tf

    sub = tf.Node().subscriber("/never")
    counted = 0
    stop = threading.Event()

    def count():
        nonlocal counted
        while not stop.is_set():
            counted += 1

    t = threading.Thread(target=count)
    t.start()
    with pytest.raises(tf.TimeoutError):
        sub.recv(timeout=0.3)
    stop.set()
    t.join()
    assert counted > 1000
